#!/usr/bin/env bash
# The host's share of a GPU training step, with and without `fused::gpu`'s single steps
# (layer norm, attention's softmax, dropout, the loss), measured without a GPU: `train_bench narrow`
# on burn's wgpu backend over Mesa's software Vulkan device (lavapipe), ROUNDS rounds
# alternating the two so that the machine's noise falls on both. The main thread records
# every operation for burn-autodiff and burn-fusion and launches the kernels, as on CUDA;
# lavapipe runs the kernels on other threads of the same CPU, so step times here also
# include the kernels' work, and the main thread's CPU time is the number to compare.
# Writes bench/results/host_steps.md.
#
#   bash bench/host_steps.sh [ROUNDS] [STEPS]    # needs mesa-vulkan-drivers; 3 rounds of 20
set -euo pipefail
cd "$(dirname "$0")/.."
compgen -G "/usr/share/vulkan/icd.d/lvp_icd.*.json" >/dev/null || {
    echo "no lavapipe: apt-get install mesa-vulkan-drivers" >&2
    exit 1
}
rounds=${1:-3} steps=${2:-20}
cargo build --release --locked -q -p orchestrate-model --features wgpu --example train_bench
runs=$(mktemp)
trap 'rm -f "$runs"' EXIT
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
for round in $(seq "$rounds"); do
    for variant in own --burn-steps; do
        echo "round $round: narrow, $steps steps on wgpu, $variant" >&2
        flag=$([ "$variant" = own ] || echo "$variant")
        target/release/examples/train_bench narrow "$steps" --device wgpu $flag |
            sed "s/^{/{\"round\": $round, /" >> "$runs"
    done
done
mkdir -p bench/results
python3 - "$runs" "$(git rev-parse --short HEAD)" "$(lscpu | sed -n 's/^Model name: *//p')" \
    "$(nproc)" <<'PY' | tee bench/results/host_steps.md
import datetime, json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print(f"Host work per `narrow` training step on burn's wgpu backend (lavapipe), "
      f"{datetime.date.today()}, commit {sys.argv[2]}, {sys.argv[3]} ({sys.argv[4]} threads)\n")
print("| round | steps | step ms | main thread CPU ms | all threads CPU ms |")
print("|---:|---|---:|---:|---:|")
def main_ms(r):
    by = r["cpu_ms_per_step_by_thread"]
    return by.get("main", by.get("train_bench", max(by.values())))
rows = {}
for r in runs:
    kind = "burn's compositions" if r["burn_steps"] else "one step each (fused::gpu)"
    rows.setdefault(kind, []).append(r)
    print(f"| {r['round']} | {kind} | {r['step_ms']:.1f} | {main_ms(r):.1f} | "
          f"{r['host_cpu_ms_per_step']:.1f} |")
ours, burns = rows["one step each (fused::gpu)"], rows["burn's compositions"]
med = lambda rs, f: statistics.median(f(r) for r in rs)
print(f"\nMedians, one step each against burn's compositions: main thread CPU "
      f"{med(ours, main_ms):.1f} / {med(burns, main_ms):.1f} ms "
      f"({med(ours, main_ms) / med(burns, main_ms):.2f}x), step "
      f"{med(ours, lambda r: r['step_ms']):.1f} / {med(burns, lambda r: r['step_ms']):.1f} ms "
      f"({med(ours, lambda r: r['step_ms']) / med(burns, lambda r: r['step_ms']):.2f}x).")
PY
