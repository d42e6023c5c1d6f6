"""Sorts `perf script -F comm,tid,period,ip,sym,dso` samples of train_bench's timed steps by
thread and by what the thread was doing (see bench/host_steps.sh), in ms per step; prints
one JSON line with train_bench's own result.

    perf script -i DATA -F comm,tid,period,ip,sym,dso |
        python3 bench/host_samples.py ROUND STEPS RUN.json VARIANT
"""

import json
import re
import sys

# "<comm> <tid> <period ns> <address> <symbol> (<dso>)"; the symbol may hold spaces, the comm
# does not.
SAMPLE = re.compile(r"^\s*(\S+)\s+(\d+)\s+(\d+)\s+[0-9a-f]+\s+(.*?)\s*\((.*)\)\s*$")

# CubeCL 0.10's channel between a device's threads: the client's loop while the queue is
# full and the server's loop while it is empty; and the yields they make.
WAITING = ("ChannelDeviceHandle<S>::submit_inner", "custom_channel::Server::start", "sched_yield")


def role(comm: str) -> str:
    """The role of a thread by name. `DSD-*` is CubeCL's device server and every thread it
    started, which inherit its name: on lavapipe, the driver's queue and kernel workers
    (told apart in `main` by what they run)."""
    if comm.startswith("DSU-"):
        return "fusion"
    if comm.startswith("DSD-"):
        return "device"
    if comm.startswith("train_bench"):
        return "main"
    return "other"


def kind(dso: str, sym: str) -> str:
    # lavapipe's compiled kernels: anonymous executable memory, which perf names after the
    # process's (absent) JIT map or as "[JIT]".
    if dso.startswith("[JIT]") or re.search(r"perf-\d+\.map$", dso) or dso == "//anon":
        return "jit"
    if any(w in sym for w in WAITING):
        return "waiting"
    if dso.startswith("[kernel"):
        return "kernel"
    return "work"


def main() -> None:
    round_, steps, run_json, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    run = json.loads(open(run_json).read().strip().splitlines()[-1])
    # Each thread's samples: (kind, ms per step) by thread id, with its role.
    samples: dict[str, list[tuple[str, float, str]]] = {}
    roles: dict[str, str] = {}
    unparsed = 0
    for line in sys.stdin:
        m = SAMPLE.match(line)
        if not m:
            unparsed += 1
            continue
        comm, tid, period, sym, dso = m.groups()
        roles[tid] = role(comm)
        samples.setdefault(tid, []).append((kind(dso, sym), int(period) / 1e6 / steps, dso))
    threads: dict[str, dict[str, float]] = {}
    for tid, rows in samples.items():
        name = roles[tid]
        # Of the `DSD-*` threads, CubeCL's device server is the one running this binary's
        # code (CubeCL, wgpu); the rest are lavapipe's (its queue and kernel workers).
        ours = sum(ms for _, ms, dso in rows if dso.endswith("/train_bench"))
        if name == "device" and ours < 0.05 * sum(ms for _, ms, _ in rows):
            name = "lavapipe"
        t = threads.setdefault(
            name, {"cpu": 0.0, "work": 0.0, "waiting": 0.0, "kernel": 0.0, "jit": 0.0}
        )
        for k, ms, _ in rows:
            t["cpu"] += ms
            t[k] += ms
    if not threads:
        sys.exit("host_samples.py: no samples (did perf sample the timed steps?)")
    # Time each thread was ready to run but had no core (train_bench reads /proc's
    # schedstat, by thread name): more busy threads than cores shows here. The `DSD-*`
    # threads share one name, so their sum goes to the device server and lavapipe together.
    for name, ms in (run.get("runqueue_ms_per_step_by_thread") or {}).items():
        into = "lavapipe" if role(name) == "device" and "lavapipe" in threads else role(name)
        if into in threads:
            threads[into]["runqueue"] = threads[into].get("runqueue", 0.0) + ms
    print(
        json.dumps(
            {
                "round": round_,
                "steps": steps,
                "variant": variant,
                "step_ms": run["step_ms"],
                "threads": threads,
                "unparsed_lines": unparsed,
            }
        )
    )


if __name__ == "__main__":
    main()
