"""Kernel launches and kernel time per training step, by kernel, from two CubeCL profile
logs (`CUBECL_DEBUG_LOG=... CUBECL_DEBUG_OPTION=profile train_bench PRESET STEPS`) of runs
SHORT and LONG steps long: the difference over LONG - SHORT steps cancels the set-up and
the warm-up. CubeCL's profile mode waits for each kernel and times it alone, so a kernel's
time is its own, without overlap, and the profiled step runs slower than an unprofiled one.

    python3 bench/kernel_time.py SHORT.log LONG.log SHORT LONG TITLE

Prints a Markdown table (stdout). Used by bench/launches.sh (lavapipe) and
bench/gpu_table.sh (CUDA).
"""

import collections
import re
import sys

# "| 217.672µs  | PrngKernel | NormalFamily | WgpuRuntime": the time, the kernel's name and
# type arguments, the runtime last.
LINE = re.compile(r"^\|\s*([0-9.]+)\s*(ns|µs|us|ms|s)\s*\|(.*)\|\s*(\w+Runtime)\s*$")
UNIT_MS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def launches(path: str) -> list[tuple[str, float]]:
    """Every launch in one log, in order: the kernel's name and its time in ms."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            m = LINE.match(line.rstrip())
            if m:
                # The kernel's name without its type arguments (the columns after the first).
                name = m.group(3).split("|")[0].strip()
                out.append((name, float(m.group(1)) * UNIT_MS[m.group(2)]))
    return out


def main() -> None:
    short_log, long_log = sys.argv[1], sys.argv[2]
    short, long_ = int(sys.argv[3]), int(sys.argv[4])
    title = sys.argv[5]
    first, last = launches(short_log), launches(long_log)
    steps = long_ - short
    # The launches of the long run's last `steps` steps. Counting by difference is exact;
    # times are not (the first launches of a run include compiling and autotuning, which
    # vary from run to run), so they are summed over those last launches only.
    extra = len(last) - len(first)
    if extra <= 0:
        sys.exit(f"kernel_time.py: no kernel launches in {long_log} beyond {short_log}")
    count: collections.Counter = collections.Counter()
    ms: collections.Counter = collections.Counter()
    for name, t in last[-extra:]:
        count[name] += 1
        ms[name] += t
    rows = sorted(((n, count[n] / steps, ms[n] / steps) for n in count), key=lambda r: -r[2])
    total_n = sum(r[1] for r in rows)
    total_t = sum(r[2] for r in rows)
    print(f"{title}: **{total_n:,.0f}** launches, **{total_t:,.2f} ms** of kernel time per step\n")
    # Every step launches the same kernels, so each count per step is whole, unless the
    # runs differed (burn-fusion's choices vary a little between runs) or a log was cut
    # short: said beside the table, not hidden in it.
    ragged = [n for n, c, _ in rows if abs(c - round(c)) > 1e-9]
    if ragged:
        print(f"Counts not whole per step for {', '.join(ragged)}: the two runs launched "
              "differently (or a log was cut short); read this table with care.\n")
    print("| kernel | launches per step | ms per step | share | µs per launch |")
    print("|---|---:|---:|---:|---:|")
    for name, n, t in rows:
        share = t / total_t if total_t > 0 else 0.0
        print(f"| {name} | {n:,.1f} | {t:,.3f} | {share:.1%} | {t / n * 1e3:,.1f} |")


if __name__ == "__main__":
    main()
