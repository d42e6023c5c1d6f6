#!/usr/bin/env bash
# Every GPU check in one call, for a machine lent with one (see README "Benchmarks"). GPU time
# is scarce, so the checks run in order of importance under one deadline, each writing its
# JSON lines as it goes; what the deadline cuts off is reported as skipped, not lost.
#
#   bash bench/gpu.sh --build      # here, no GPU or nvcc needed: the CUDA builds of the two
#                                  # benches and of `orchestrate`, stripped, the PyTorch
#                                  # reference and the fortune corpus, into bench/bin/
#   bash bench/gpu.sh [SECONDS] [PEAK_TFLOPS]   # on the GPU machine (default 450 s; PEAK:
#                                  # the GPU's dense bf16 peak, H100 SXM 989, for MFU)
#
# Results: $RESULTS (default bench/results/gpu/) gets ours.jsonl, torch.jsonl, pipeline.log and
# gpu.md; bench/results/gpu.md is written from them.
#
# What runs, in order: (1) training throughput of `mini`, fp32, with the kernel cache cold,
# then again warm (the warm-up the issue asks to be under 10 s on a second run); (2) the
# PyTorch reference on the same GPU (fp32 eager, bf16 autocast, bf16 compiled; greedy
# generation at batch 1 and 32); (3) our generation with the key/value cache against
# recomputing the prefix; (4) `mini` in bf16 and bf16 + gradient checkpointing; (5) `spec512`
# fp32 and bf16, and PyTorch's `seed-512`; (6) the whole pipeline (pipelines/full.yaml, the
# real corpus, `device: auto` picking the GPU for training, evaluation on the GPU, 300 training
# steps) through `orchestrate run`, then `orchestrate serve --device cuda` on what it deployed.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=bench/bin

if [ "${1:-}" = "--build" ]; then
    set -e
    cargo build --release --locked --features cuda --bin orchestrate
    cargo build --release --locked -p orchestrate-model --features cuda \
        --example train_bench --example generate_bench
    mkdir -p "$bin"
    # Stripped and xz-packed (the three binaries: 170 MB stripped, 27 MB packed), because
    # what travels to a lent GPU machine is limited to 64 MiB.
    rm -rf "$bin" && mkdir -p "$bin"
    for b in examples/train_bench examples/generate_bench orchestrate; do
        strip -o "$bin/$(basename "$b")-cuda" "target/release/$b"
        xz -T2 -9 "$bin/$(basename "$b")-cuda"
    done
    cp ../shared/bench/torch_seq2seq_baseline.py "$bin/"
    tar -cJf "$bin/fortunes.tar.xz" -C /usr/share/games fortunes
    du -sh "$bin"
    exit 0
fi

# Unpack what --build packed (Python's lzma and tarfile: no xz needed on the GPU machine).
python3 - "$bin" <<'PY'
import lzma, os, pathlib, shutil, sys, tarfile
bin = pathlib.Path(sys.argv[1])
for packed in bin.glob("*-cuda.xz"):
    out = packed.with_suffix("")
    if not out.exists():
        with lzma.open(packed) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(out, 0o755)
if (bin / "fortunes.tar.xz").exists() and not (bin / "fortunes").exists():
    with tarfile.open(bin / "fortunes.tar.xz") as t:
        t.extractall(bin)
PY

budget=${1:-450}
peak=${2:-989}
deadline=$((SECONDS + budget))
res=${RESULTS:-bench/results/gpu}
mkdir -p "$res"
: >"$res/ours.jsonl"
: >"$res/torch.jsonl"
export ORCHESTRATE_KERNEL_CACHE=${ORCHESTRATE_KERNEL_CACHE:-$(mktemp -d)/kernels}

# `within LIMIT cmd...`: runs cmd for at most LIMIT seconds, less if the deadline is nearer;
# skips it when under 20 s are left.
within() {
    local limit=$1 left=$((deadline - SECONDS))
    shift
    if ((left < 20)); then
        echo "skipped, out of time: $*" >&2
        return 124
    fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$@"
}

# `ours LABEL LIMIT ARGS...`: one train_bench run, its JSON line tagged with LABEL.
ours() {
    local label=$1 limit=$2
    shift 2
    local line
    if line=$(within "$limit" "$bin/train_bench-cuda" "$@" --device cuda | grep '^{'); then
        echo "$line" | sed "s/^{/{\"run\": \"$label\", /" >>"$res/ours.jsonl"
    else
        echo "{\"run\": \"$label\", \"model\": \"$1\", \"error\": \"exit $? (124: out of time)\"}" >>"$res/ours.jsonl"
    fi
}

torch_run() {
    local limit=$1
    shift
    within "$limit" env PYTHONUNBUFFERED=1 python3 "$bin/torch_seq2seq_baseline.py" "$@" >>"$res/torch.jsonl" ||
        echo "{\"error\": \"torch $* exit $?\"}" >>"$res/torch.jsonl"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    ls "${CUDA_PATH:-/usr/local/cuda}/include/cuda.h" && ldconfig -p | grep -m2 nvrtc
} >"$res/machine.txt" 2>&1
cat "$res/machine.txt"

ours mini-fp32-cold 200 mini 20
ours mini-fp32-warm 45 mini 20
torch_run 120 --models mini-8m --steps 20
gen=$(within 60 "$bin/generate_bench-cuda" 10 --device cuda) && echo "$gen" >>"$res/ours.jsonl" ||
    echo '{"run": "generate", "error": "failed or out of time"}' >>"$res/ours.jsonl"
ours mini-bf16-cold 90 mini 20 --bf16
ours mini-bf16-ckpt 45 mini 20 --bf16 --checkpointing
ours spec512-fp32-cold 100 spec512 20
ours spec512-bf16-cold 80 spec512 20 --bf16
torch_run 90 --models seed-512 --steps 20

# The product itself: the real corpus through every stage, training on the GPU.
if [ -d "$bin/fortunes" ] && ((deadline - SECONDS > 60)); then
    mkdir -p /usr/share/games && rm -rf /usr/share/games/fortunes && cp -r "$bin/fortunes" /usr/share/games/fortunes
    within 600 "$bin/orchestrate-cuda" run pipelines/full.yaml --no-serve \
        --set model.with.steps=300 --set model.with.eval_every=100 --set model.with.checkpoint_every=100 \
        --set evaluation.resources.device=cuda >"$res/pipeline.log" 2>&1
    echo "pipeline exit $?" >>"$res/pipeline.log"
    # Serving the deployed model from the GPU: a generation, and NVML's GPU gauges.
    if ((deadline - SECONDS > 30)); then
        "$bin/orchestrate-cuda" serve deploy --pipeline pipelines/full.yaml --device cuda --port 8090 \
            >"$res/serve.log" 2>&1 &
        pid=$!
        for _ in $(seq 60); do curl -sf http://127.0.0.1:8090/health >/dev/null && break; sleep 1; done
        {
            curl -s http://127.0.0.1:8090/info
            echo
            curl -s -X POST http://127.0.0.1:8090/generate -H 'content-type: application/json' \
                -d '{"inputs": "The meaning of life is", "parameters": {"max_new_tokens": 30}}'
            echo
            curl -s http://127.0.0.1:8090/metrics | grep -E '^orchestrate_(gpu|generated)'
        } >>"$res/serve.log" 2>&1
        kill $pid
    fi
fi

python3 - "$res" "$peak" <<'PY' | tee "$res/gpu.md"
import json, sys, datetime, pathlib
res, peak = pathlib.Path(sys.argv[1]), float(sys.argv[2])
rows = lambda f: [json.loads(l) for l in (res / f).read_text().splitlines() if l.startswith("{")]
ours, torch = rows("ours.jsonl"), rows("torch.jsonl")
gpu = (res / "machine.txt").read_text().splitlines()[0]
print(f"GPU checks on {gpu} ({datetime.date.today()}), `bash bench/gpu.sh`. Training: batch 32, source 128, target 128, vocab 8000; MFU against {peak:.0f} TFLOP/s dense bf16.\n")
print("| model | engine | precision | run | warm-up s | step ms | tokens/s | MFU |\n|---|---|---|---|---:|---:|---:|---:|")
for o in ours:
    if o.get("kind") in ("generate", "cache_speedup"): continue
    if "error" in o:
        print(f"| {o.get('model', '')} | burn 0.21 cuda (ours) | | {o['run']} | | {o['error']} | | |"); continue
    ck = " + checkpointing" if o["checkpointing"] else ""
    print(f"| {o['model']} | burn 0.21 cuda (ours) | {o['precision']}{ck} | {o['run']} | {o['warmup_s']} | {o['step_ms']} | {o['tokens_per_s']:,} | {100 * o['model_tflops_per_s'] / peak:.1f}% |")
names = {"mini-8m": "mini", "seed-512": "spec512"}
# One FLOP count for both engines: ours per token (weights 6 per parameter, attention's
# products), applied to PyTorch's tokens/s for the same shape.
per_token = {o["model"]: o["model_tflops_per_s"] / o["tokens_per_s"] for o in ours if o.get("kind") == "train" and "error" not in o}
for t in torch:
    if t.get("kind") != "train" or "error" in t: continue
    model = names.get(t["model"], t["model"])
    prec = ("bf16 autocast" if t.get("amp") else "fp32") + (" compiled" if t.get("compile") else " eager")
    mfu = f"{100 * t['tokens_per_s'] * per_token[model] / peak:.1f}%" if model in per_token else ""
    print(f"| {model} | PyTorch {torch[0].get('torch', '')} | {prec} | | | {t['step_ms']} | {t['tokens_per_s']:,} | {mfu} |")
print("\nGeneration, `mini` shape, 32-token prompt, 50 new tokens (greedy):\n")
print("| engine | mode | batch | p50 ms | p95 / max ms | tokens/s |\n|---|---|---:|---:|---:|---:|")
for o in ours:
    if o.get("kind") == "generate":
        print(f"| {o['engine']} | {o['mode']} | {o['batch']} | {o['latency_ms_p50']} | {o['latency_ms_p95']} | {o['tokens_per_s']:,} |")
    if o.get("kind") == "cache_speedup":
        speed = o
for t in torch:
    if t.get("kind") == "generate" and t["model"] == "mini-8m":
        print(f"| PyTorch (bf16 autocast) | recompute prefix | {t['batch']} | {t['latency_ms_median']} | {t['latency_ms_max']} | {t['tokens_per_s']:,} |")
if "speed" in dir():
    print(f"\nKey/value cache against recomputing the prefix, batch 1: {speed['ratio_p50']}x (median of {speed['pairs']} pairs, slowest {speed['ratio_min']}x).")
errors = [t for t in torch if "error" in t] + [o for o in ours if o.get("run") == "generate" and "error" in o]
for e in errors:
    print(f"\nFailed: {e}")
PY
mkdir -p bench/results && cp "$res/gpu.md" bench/results/gpu.md
