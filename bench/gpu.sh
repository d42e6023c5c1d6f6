#!/usr/bin/env bash
# Training on a GPU, for a machine lent with one (see README "Benchmarks"): tokens/s, model
# FLOPs utilisation and warm-up of both presets in fp32 and bf16 mixed precision, with the
# kernel cache cold and then warm, beside PyTorch on the same GPU where it is installed.
# Writes bench/results/gpu.md.
#
# Build on any machine (no GPU or nvcc needed), then carry bench/bin to the GPU machine:
#   cargo build --release --locked -p orchestrate-model --features cuda --example train_bench
#   mkdir -p bench/bin && cp target/release/examples/train_bench bench/bin/train_bench-cuda
#   bash bench/gpu.sh [STEPS] [PEAK_TFLOPS]   # PEAK: the GPU's dense bf16 peak (H100 SXM: 989)
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
peak=${2:-989}
bin=${TRAIN_BENCH:-bench/bin/train_bench-cuda}
out=$(mktemp -d)
export ORCHESTRATE_KERNEL_CACHE=$out/kernels
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
for preset in mini spec512; do
    for prec in "" --bf16; do
        for pass in cold warm; do
            timeout 300 "$bin" "$preset" "$steps" --device cuda $prec |
                sed "s/^{/{\"cache\": \"$pass\", /" >>"$out/ours.jsonl" ||
                echo "{\"model\": \"$preset\", \"error\": \"$prec $pass failed or timed out\"}" >>"$out/ours.jsonl"
        done
    done
    timeout 300 "$bin" "$preset" "$steps" --device cuda --bf16 --checkpointing |
        sed 's/^{/{"cache": "warm", /' >>"$out/ours.jsonl"
done
PY=${TORCH_PY:-python3}
if "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    timeout 600 "$PY" ../shared/bench/torch_seq2seq_baseline.py --steps "$steps" | grep '"kind": "train"' >"$out/torch.jsonl"
else
    : >"$out/torch.jsonl"
fi
mkdir -p bench/results
python3 - "$out/ours.jsonl" "$out/torch.jsonl" "$gpu" "$peak" <<'PY' | tee bench/results/gpu.md
import json, sys, datetime
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
torch = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
gpu, peak = sys.argv[3], float(sys.argv[4])
print(f"Training on {gpu}, batch 32, source 128, target 128, vocab 8000 ({datetime.date.today()}); MFU against {peak:.0f} TFLOP/s\n")
print("| model | engine | precision | kernel cache | warm-up s | step ms | tokens/s | MFU |\n|---|---|---|---|---:|---:|---:|---:|")
for o in ours:
    if "error" in o:
        print(f"| {o['model']} | burn (ours) | | | | {o['error']} | | |"); continue
    ck = " + checkpointing" if o["checkpointing"] else ""
    print(f"| {o['model']} | burn 0.21 cuda (ours) | {o['precision']}{ck} | {o['cache']} | {o['warmup_s']} | {o['step_ms']} | {o['tokens_per_s']:,} | {100 * o['model_tflops_per_s'] / peak:.1f}% |")
names = {"mini-8m": "mini", "seed-512": "spec512"}
for t in torch:
    if "error" in t: continue
    prec = ("bf16 autocast" if t.get("amp") else "fp32") + (" compiled" if t.get("compile") else " eager")
    print(f"| {names.get(t['model'], t['model'])} | PyTorch | {prec} | | | {t['step_ms']} | {t['tokens_per_s']:,} | |")
if not torch:
    print("\nPyTorch with CUDA was not installed on this machine: no peer row.")
PY
