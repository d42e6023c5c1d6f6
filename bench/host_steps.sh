#!/usr/bin/env bash
# The host's work per GPU training step, measured without a GPU: `train_bench narrow` on
# burn's wgpu backend over Mesa's software Vulkan device (lavapipe), the default against
# one variant, ROUNDS rounds alternating the two so that the machine's noise falls on both:
#   --burn-steps  layer norm, attention's softmax, dropout and the loss as burn composes them
#                 (the default takes `fused::gpu`'s single steps): host_steps.md
#   --no-fusion   burn-fusion off, every operation its own kernel: host_steps-no-fusion.md
#   --burn-cat    FlatAdamW lays parameters and gradients end to end with burn's cat, a
#                 kernel per piece (the default: `end_to_end`'s one kernel):
#                 host_steps-burn-cat.md
#   --cast-each   with BASE --f16 (mixed precision; lavapipe has no bf16): each parameter cast
#                 by autodiff, where the default casts them all at once (FlatAdamW):
#                 host_steps-f16-cast-each.md
# BASE flags go to both runs.
#
# A thread's CPU time is not its work. CubeCL 0.10 runs each device on threads of its own
# that pass work along queues and busy-wait on each other (spinning, then yielding):
#   - the main thread builds the autodiff graph, runs the backward pass and records every
#     operation;
#   - `DSU-*` is burn-fusion's server: it fuses the recorded operations and plans kernels;
#   - `DSD-*` is CubeCL's device server: it allocates and launches the kernels; the threads
#     it starts inherit its name: on lavapipe the driver's queue and its kernel workers
#     (two here), shown as `lavapipe` (their work is the driver's; their kernels, JIT code,
#     apart).
# A thread waiting for the next one spins inside CubeCL's channel, so every thread burns
# about the step's wall time whatever it does. `perf record` samples the timed steps only
# (`train_bench --perf-ctl`), and each sample is sorted by the function it landed in:
#   - waiting: CubeCL's channel loops (`ChannelDeviceHandle::submit_inner`,
#     `custom_channel::Server::start`) and `sched_yield`;
#   - kernel mode: the Linux kernel (mostly the scheduling behind those yields);
#   - lavapipe's kernels: JIT code (the GPU's share, which a GPU would run instead);
#   - work: everything else.
# And, from /proc's schedstat, the time each thread was ready to run but had no core: on a
# machine with fewer cores than busy threads, a thread doing the device's work waits
# there, and step times stop comparing between variants with different thread counts.
# Writes bench/results/host_steps.md.
#
#   bash bench/host_steps.sh [ROUNDS] [STEPS] [VARIANT] [BASE]  # 3 rounds of 20, --burn-steps;
#                                                         # needs mesa-vulkan-drivers, linux-perf
#   bash bench/host_steps.sh 3 20 --cast-each --f16
set -euo pipefail
cd "$(dirname "$0")/.."
compgen -G "/usr/share/vulkan/icd.d/lvp_icd.*.json" >/dev/null || {
    echo "no lavapipe: apt-get install mesa-vulkan-drivers" >&2
    exit 1
}
perf record -e cpu-clock -o /dev/null -- true 2>/dev/null || {
    echo "perf cannot sample here: apt-get install linux-perf (and perf_event_paranoid <= 2)" >&2
    exit 1
}
rounds=${1:-3} steps=${2:-20} variant=${3:---burn-steps} base=${4:-}
case "$variant $base" in
"--burn-steps " | "--no-fusion " | "--burn-cat " | "--cast-each --f16") ;;
*)
    echo "usage: bash bench/host_steps.sh [ROUNDS] [STEPS] [--burn-steps | --no-fusion | --burn-cat | --cast-each --f16]" >&2
    exit 2
    ;;
esac
# host_steps.md (--burn-steps), host_steps-no-fusion.md, host_steps-burn-cat.md,
# host_steps-f16-cast-each.md
results=bench/results/host_steps${base:+-${base#--}}
[ "$variant" = --burn-steps ] || results+="-${variant#--}"
results+=.md
cargo build --release --locked -q -p orchestrate-model --features wgpu --example train_bench
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
mkfifo "$work/ctl" "$work/ack"
# Held open both ways here, so that neither perf nor train_bench blocks opening them.
exec {ctl_fd}<>"$work/ctl" {ack_fd}<>"$work/ack"
for round in $(seq "$rounds"); do
    for flag in "" "$variant"; do
        echo "round $round: narrow, $steps steps on wgpu, $base ${flag:-default}" >&2
        data="$work/$round${flag:-default}.data"
        perf record -q -e cpu-clock -F 999 -D -1 --control "fifo:$work/ctl,$work/ack" \
            -o "$data" -- target/release/examples/train_bench narrow "$steps" --device wgpu \
            --perf-ctl "$work/ctl,$work/ack" $base $flag > "$work/run.json"
        perf script -i "$data" -F comm,tid,period,ip,sym,dso 2>/dev/null |
            python3 bench/host_samples.py "$round" "$steps" "$work/run.json" "${flag:-default}" \
                >> "$work/rows.jsonl"
    done
done
exec {ctl_fd}>&- {ack_fd}>&-
mkdir -p bench/results
python3 - "$work/rows.jsonl" "$(git rev-parse --short HEAD)" \
    "$(lscpu | sed -n 's/^Model name: *//p')" "$(nproc)" "$variant" "$base" <<'PY' | tee "$results"
import datetime, json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = f" {sys.argv[6]}" if sys.argv[6] else ""
print(f"Host work per `narrow`{base} training step on burn's wgpu backend (lavapipe), "
      f"{datetime.date.today()}, commit {sys.argv[2]}, {sys.argv[3]} ({sys.argv[4]} threads); "
      f"`perf record` samples of the timed steps, sorted as bench/host_steps.sh says\n")
kinds = {"default": "default (fused::gpu, burn-fusion)",
         "--burn-steps": "burn's compositions (--burn-steps)",
         "--no-fusion": "burn-fusion off (--no-fusion)",
         "--burn-cat": "burn's cat, a kernel per piece (--burn-cat)",
         "--cast-each": "each parameter cast by autodiff (--cast-each)"}
if base:
    kinds["default"] = "default (all parameters cast at once, FlatAdamW)"
roles = ["main", "fusion", "device", "lavapipe"]
print("| round | variant | step ms | thread | CPU ms | work | waiting | kernel mode | lavapipe's kernels | ready, no core |")
print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
def ready(role, t):
    # /proc names the device server and lavapipe's threads alike: one sum, on lavapipe's row.
    if "runqueue" in t:
        return f"{t['runqueue']:.1f}"
    return "with lavapipe's" if role == "device" else ""
for r in rows:
    for role in roles:
        t = r["threads"].get(role)
        if t:
            print(f"| {r['round']} | {kinds[r['variant']]} | {r['step_ms']:.1f} | {role} | "
                  f"{t['cpu']:.1f} | {t['work']:.1f} | {t['waiting']:.1f} | {t['kernel']:.1f} | "
                  f"{t['jit']:.1f} | {ready(role, t)} |")
def host_work(r):
    return sum(t["work"] for name, t in r["threads"].items() if name != "lavapipe")
med = lambda rs, f: statistics.median(f(r) for r in rs)
print("\nMedians over the rounds, ms per step (host work: the main thread's, the fusion "
      "server's and the device server's, not their waiting; lavapipe's driver and kernels "
      "apart):\n")
print("| variant | step | main work | fusion work | device work | host work | lavapipe's driver | lavapipe's kernels |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
by = {}
for r in rows:
    by.setdefault(r["variant"], []).append(r)
for kind, rs in by.items():
    work_of = lambda name: (lambda r: r["threads"].get(name, {}).get("work", 0.0))
    print(f"| {kinds[kind]} | {med(rs, lambda r: r['step_ms']):.1f} | "
          f"{med(rs, work_of('main')):.1f} | {med(rs, work_of('fusion')):.1f} | "
          f"{med(rs, work_of('device')):.1f} | {med(rs, host_work):.1f} | "
          f"{med(rs, work_of('lavapipe')):.1f} | "
          f"{med(rs, lambda r: sum(t['jit'] for t in r['threads'].values())):.1f} |")
variant = sys.argv[5]
if "default" in by and variant in by:
    ours, burns = by["default"], by[variant]
    print(f"\nThe default against {variant}: host work "
          f"{med(ours, host_work) / med(burns, host_work):.2f}x, step "
          f"{med(ours, lambda r: r['step_ms']) / med(burns, lambda r: r['step_ms']):.2f}x.")
PY
