#!/usr/bin/env bash
# Training throughput, the `train` stage's model in burn (flex CPU backend) beside the PyTorch
# reference ../shared/bench/torch_seq2seq_baseline.py, same shapes (batch 32, source 128,
# target 128, vocab 8000), same machine, in alternating rounds. Writes bench/results/train.md.
#
#   bash bench/train.sh [STEPS] [ROUNDS]   # makes bench/.venv-torch with torch on first use
#
# Each round measures ours and then PyTorch, preset by preset, so a noisy neighbour slows
# both sides of one ratio rather than one side of all of them; the table keeps every
# round's pair and the median ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
steps=${1:-3}
rounds=${2:-2}
TORCH_PY=${TORCH_PY:-}
if [ -z "$TORCH_PY" ]; then
    [ -x bench/.venv-torch/bin/python ] || { python3 -m venv bench/.venv-torch && bench/.venv-torch/bin/pip install -q torch numpy; }
    TORCH_PY=$root/bench/.venv-torch/bin/python
fi
cargo build --release --locked -q -p orchestrate-model --example train_bench
runs=$(mktemp)
trap 'rm -f "$runs" "$runs.err" "$runs.md"' EXIT
for round in $(seq "$rounds"); do
    for preset in mini spec512; do
        peer=$([ "$preset" = mini ] && echo mini-8m || echo seed-512)
        echo "round $round: $preset" >&2
        target/release/examples/train_bench "$preset" "$steps" >> "$runs"
        if ! "$TORCH_PY" ../shared/bench/torch_seq2seq_baseline.py --steps "$steps" --models "$peer" \
            2>"$runs.err" | grep '"kind": "train"' | grep -v '"amp": true' >> "$runs"; then
            echo "the PyTorch reference gave no result for $peer:" >&2
            tail -5 "$runs.err" >&2
            exit 1
        fi
    done
done
mkdir -p bench/results
# What PyTorch ran with: its threads, the CPU kernels it picked and its BLAS (on an AMD CPU,
# MKL's code path is a known reason for a slow peer), so a ratio can be read for what it is.
torch_version=$("$TORCH_PY" -c 'import torch; print(f"{torch.__version__} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()} kernels, MKL {torch.backends.mkl.is_available()})")')
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
python3 - "$runs" "$torch_version" "$commit" "$steps" "$rounds" > "$runs.md" <<'PY'
import json, sys, datetime, subprocess, statistics
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
# The vector width picks the kernels of both sides (flex's and PyTorch's) at run time, and
# one "AMD EPYC" name covers hosts with and without AVX-512: said, so runs compare.
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
vectors = "AVX-512" if "avx512f" in flags else ("AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
try:
    l1d = open("/sys/devices/system/cpu/cpu0/cache/index0/size").read().strip()
except OSError:
    l1d = "unknown"
print(f"Training throughput, batch 32, source 128, target 128, vocab 8000 ({datetime.date.today()}, {cpu}, {vectors}, L1d {l1d} a core, {cores} cores, CPU)\n")
print("Each round: ours, then PyTorch fp32 eager, one after the other.\n")
print("| model | round | ours step | ours tokens/s | PyTorch step | PyTorch tokens/s | ratio |\n|---|---|---|---|---|---|---|")
names = {"mini": "mini-8m", "spec512": "seed-512"}
summary = {}
for model, peer in names.items():
    ours = [r for r in runs if r.get("engine") == "burn" and r["model"] == model]
    theirs = [r for r in runs if r.get("model") == peer]
    for i, (o, t) in enumerate(zip(ours, theirs), 1):
        ratio = o["tokens_per_s"] / t["tokens_per_s"]
        summary[model] = (summary.get(model, ([], o, t))[0] + [ratio], o, t)
        print(f"| {model} | {i} | {o['step_ms']:.0f} ms | {o['tokens_per_s']:,.0f} | {t['step_ms']:.0f} ms | {t['tokens_per_s']:,} | {ratio:.2f} |")
print()
for model, (ratios, o, t) in summary.items():
    print(f"- {model}: median ratio **{statistics.median(ratios):.2f}** over {len(ratios)} rounds "
          f"(ours: burn 0.21 flex, {o['threads']} threads, {o['params']:,} parameters; PyTorch: {t['params']:,})")
torch_version, commit, steps, rounds = sys.argv[2:6]
print(f"\nPyTorch {torch_version}, run on the CPU; commit {commit}, `bash bench/train.sh {steps} {rounds}`.")
PY
# Only a complete table replaces train.md; the run it replaces moves to the top of
# train-history.md (below its heading), so a number the README quotes keeps its table.
if [ -f bench/results/train.md ]; then
    history=bench/results/train-history.md
    [ -f "$history" ] || printf '%s\n\n%s\n' '# Earlier CPU training runs' \
        'Each `bash bench/train.sh` moves the run it replaces in `train.md` here; newest first.' > "$history"
    { head -n 3 "$history"; echo; cat bench/results/train.md; echo; echo '---'; tail -n +4 "$history"; } > "$history.new"
    mv "$history.new" "$history"
fi
mv "$runs.md" bench/results/train.md
cat bench/results/train.md
