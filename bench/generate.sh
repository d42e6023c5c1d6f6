#!/usr/bin/env bash
# Greedy generation of the `mini` shape: 50 new tokens from a 32-token prompt, with our
# key/value cache (batch 1 and 32), recomputing the prefix (batch 1), and the PyTorch
# reference's greedy loop (../shared/bench/torch_seq2seq_baseline.py), same machine, one run.
# Writes bench/results/generate.md.
#
#   bash bench/generate.sh [RUNS]     # makes bench/.venv-torch with torch on first use
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
runs=${1:-20}
TORCH_PY=${TORCH_PY:-}
if [ -z "$TORCH_PY" ]; then
    [ -x bench/.venv-torch/bin/python ] || { python3 -m venv bench/.venv-torch && bench/.venv-torch/bin/pip install -q torch numpy; }
    TORCH_PY=$root/bench/.venv-torch/bin/python
fi
cargo build --release --locked -q -p orchestrate-model --example generate_bench
ours=$(target/release/examples/generate_bench "$runs")
# The peer's lines or a clear failure: a table without its peer rows would read as a result.
theirs=$("$TORCH_PY" ../shared/bench/torch_seq2seq_baseline.py --models mini-8m --steps 1 | grep '"kind": "generate"') || {
    echo "the PyTorch reference gave no generation result" >&2; exit 1; }
mkdir -p bench/results
python3 - "$ours" "$theirs" <<'PY' | tee bench/results/generate.md
import json, sys, datetime, subprocess
ours = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
torch = [json.loads(l) for l in sys.argv[2].splitlines() if l.strip()]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
print(f"Greedy generation, `mini` shape (d256, 4+4 layers, vocab 8000), prompt 32, 50 new tokens ({datetime.date.today()}, {cpu}, {cores} cores, CPU)\n")
print("| engine | mode | batch | p50 ms | p95 ms | tokens/s |\n|---|---|---:|---:|---:|---:|")
for t in torch:
    print(f"| PyTorch {t['device']} eager | recompute prefix (nn.Transformer) | {t['batch']} | {t['latency_ms_median']} | {t['latency_ms_max']} (max of 5) | {t['tokens_per_s']:,} |")
for o in ours:
    if o["kind"] != "generate": continue
    print(f"| burn 0.21 flex (ours) | {o['mode'].replace('_', ' ')} | {o['batch']} | {o['latency_ms_p50']} | {o['latency_ms_p95']} | {o['tokens_per_s']:,} |")
gen = [o for o in ours if o["kind"] == "generate"]
kv = next(o for o in gen if o["mode"] == "kv_cache" and o["batch"] == 1)
sp = next(o for o in ours if o["kind"] == "cache_speedup")
print(f"\nKV cache vs recomputing the prefix, batch 1: {sp['ratio_p50']:.1f}x faster (median of {sp['pairs']} back-to-back pairs; slowest pair {sp['ratio_min']:.1f}x). The recomputing loop projects only the last position, as the PyTorch reference does.")
t1 = next((t for t in torch if t["batch"] == 1), None)
recompute = next((o for o in gen if o["mode"] == "recompute_prefix" and o["batch"] == 1), None)
if t1 and recompute:
    # Like for like first: both recompute the prefix every token, as the reference does.
    print(f"Recomputing the prefix, ours vs PyTorch's greedy loop, batch 1 (the same algorithm): {t1['latency_ms_median'] / recompute['latency_ms_p50']:.2f}x.")
if t1:
    print(f"KV cache (ours) vs PyTorch's greedy loop, which recomputes the prefix, batch 1 (different algorithms: what a user of each gets): {t1['latency_ms_median'] / kv['latency_ms_p50']:.1f}x faster.")
t32 = next((t for t in torch if t["batch"] == 32), None)
kv32 = next((o for o in gen if o["mode"] == "kv_cache" and o["batch"] == 32), None)
if t32 and kv32:
    print(f"Batch 32, KV cache (ours) vs PyTorch's recomputing loop (different algorithms): {kv32['tokens_per_s'] / t32['tokens_per_s']:.1f}x PyTorch's tokens/s.")
PY
