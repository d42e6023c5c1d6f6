#!/usr/bin/env bash
# The allocator's share of a CPU training step: the `train` stage's model (train_bench,
# batch 32, source 128, target 128, vocab 8000) with orchestrate-alloc, the allocator the
# `orchestrate` binary uses, and with glibc's (`--system-alloc`), alternating run by run.
# Writes bench/results/alloc.md.
#
#   bash bench/alloc.sh [STEPS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-4}
rounds=${2:-3}
[ -x /usr/bin/time ] || { echo "needs GNU time for page faults and peak RSS: apt-get install time" >&2; exit 1; }
cargo build --release --locked -q -p orchestrate-model --example train_bench
runs=$(mktemp)
trap 'rm -f "$runs"' EXIT
for round in $(seq "$rounds"); do
    # Which allocator goes first alternates by round, so neither always runs on a machine
    # the other has just warmed (or slowed).
    if [ $((round % 2)) = 1 ]; then order=(--system-alloc ""); else order=("" --system-alloc); fi
    for preset in mini spec512; do
        for alloc in "${order[@]}"; do
            echo "round $round: $preset ${alloc:-orchestrate-alloc}" >&2
            # Minor page faults of the whole run (warm-up step included) beside its JSON line.
            /usr/bin/time -f '{"minor_faults": %R, "max_rss_kb": %M}' -o "$runs.time" \
                target/release/examples/train_bench "$preset" "$steps" $alloc > "$runs.json"
            python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); a.update(json.load(open(sys.argv[2]))); print(json.dumps(a))' \
                "$runs.json" "$runs.time" >> "$runs"
        done
    done
done
rm -f "$runs.json" "$runs.time"
mkdir -p bench/results
python3 - "$runs" "$steps" <<'PY' | tee bench/results/alloc.md
import json, sys, datetime, statistics
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
print(f"CPU training step, orchestrate-alloc vs glibc malloc ({datetime.date.today()}, {cpu}, "
      f"{runs[0]['threads']} threads, {sys.argv[2]} steps after a warm-up step)\n")
print("| model | round | glibc step | faults | orchestrate-alloc step | faults | blocks mapped | speed-up |\n|---|---|---|---|---|---|---|---|")
for model in ("mini", "spec512"):
    sys_runs = [r for r in runs if r["model"] == model and r["allocator"] == "system"]
    ours = [r for r in runs if r["model"] == model and r["allocator"] == "orchestrate"]
    ratios = []
    for i, (s, o) in enumerate(zip(sys_runs, ours), 1):
        ratios.append(s["step_ms"] / o["step_ms"])
        print(f"| {model} | {i} | {s['step_ms']:.0f} ms | {s['minor_faults']:,} | {o['step_ms']:.0f} ms "
              f"| {o['minor_faults']:,} | {o['blocks_mapped']} | {ratios[-1]:.2f}x |")
    print(f"| {model} | median | | | | | | **{statistics.median(ratios):.2f}x** |")
print("\nPeak RSS (last round): " + ", ".join(
    f"{r['model']} {r['allocator']} {r['max_rss_kb'] / 1024:,.0f} MiB" for r in runs[-4:]))
PY
