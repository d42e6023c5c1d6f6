#!/usr/bin/env bash
# Training throughput, the `train` stage's model in burn (flex CPU backend) beside the PyTorch
# reference ../shared/bench/torch_seq2seq_baseline.py, same shapes (batch 32, source 128,
# target 128, vocab 8000), same machine, one run. Writes bench/results/train.md.
#
#   bash bench/train.sh [STEPS]     # makes bench/.venv-torch with torch on first use
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
steps=${1:-3}
TORCH_PY=${TORCH_PY:-}
if [ -z "$TORCH_PY" ]; then
    [ -x bench/.venv-torch/bin/python ] || { python3 -m venv bench/.venv-torch && bench/.venv-torch/bin/pip install -q torch numpy; }
    TORCH_PY=$root/bench/.venv-torch/bin/python
fi
cargo build --release --locked -q -p orchestrate-model --example train_bench
ours=()
for preset in mini spec512; do
    ours+=("$(target/release/examples/train_bench "$preset" "$steps")")
done
theirs=$("$TORCH_PY" ../shared/bench/torch_seq2seq_baseline.py --steps "$steps" | grep '"kind": "train"' || true)
mkdir -p bench/results
python3 - "$theirs" "${ours[@]}" <<'PY' | tee bench/results/train.md
import json, sys, datetime, subprocess
torch = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
ours = [json.loads(x) for x in sys.argv[2:]]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
print(f"Training throughput, batch 32, source 128, target 128, vocab 8000 ({datetime.date.today()}, {cpu}, {cores} cores, CPU)\n")
print("| model | engine | params | step | tokens/s | ratio to PyTorch |\n|---|---|---|---|---|---|")
names = {"mini": "mini-8m", "spec512": "seed-512"}
for o in ours:
    t = next((x for x in torch if x.get("model") == names[o["model"]] and not x.get("amp")), None)
    if t:
        print(f"| {o['model']} | PyTorch {t.get('device', 'cpu')} fp32 eager | {t['params']:,} | {t['step_ms']:.0f} ms | {t['tokens_per_s']:,} | 1.00 |")
    ratio = f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}" if t else "n/a"
    print(f"| {o['model']} | burn 0.21 flex (ours) | {o['params']:,} | {o['step_ms']:.0f} ms | {o['tokens_per_s']:,.0f} | {ratio} |")
PY
