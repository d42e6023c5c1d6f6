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
# Results: $RESULTS (default bench/results/gpu/) gets ours.jsonl, torch.jsonl, stderr.txt,
# pipeline.log, serve.log and gpu.md; bench/results/gpu-DATE-TIME.md is written from them (gpu.md keeps the sessions' history)
# (`python3 bench/gpu_report.py PEAK DIR...` merges the results of several calls).
#
# What runs: (1) cold: each of our checks (`mini` and `spec512` training in fp32 and bf16,
# generation with the key/value cache against recomputing the prefix) once, side by side,
# each compiling and autotuning into its own kernel cache: their warm-ups; (2) warm: each
# again, alone, from its cache (the warm-up a second run pays, which the train issue asks to
# be under 10 s, and the throughput), `mini` bf16 also with gradient checkpointing; (3) the
# PyTorch reference on the same GPU (fp32 eager, bf16 autocast, bf16 compiled unless
# TORCH_COMPILE=0; greedy generation for `mini`); beside them from the start, (4) `pipeline`:
# the whole pipeline (pipelines/full.yaml, the real corpus, `device: auto` picking the GPU for
# training, 300 steps) through `orchestrate run`, and (5) `quantized`: every quantized
# variant evaluated on the GPU and served from it (and from the CPU, to compare their
# tokens). A first version ran everything one at a time: a fresh machine spent 172 s on
# `mini`'s cold warm-up alone.
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
    # (A kernel cache an earlier call brought back, kernels.tgz, stays.)
    find "$bin" -mindepth 1 ! -name kernels.tgz -delete
    for b in examples/train_bench examples/generate_bench orchestrate; do
        strip -o "$bin/$(basename "$b")-cuda" "target/release/$b"
        xz -T2 -9 "$bin/$(basename "$b")-cuda"
    done
    cp ../shared/bench/torch_seq2seq_baseline.py bench/gpu_report.py "$bin/"
    # The corpus, as a folder named `fortunes` in the archive wherever it lies here.
    corpus=$(cd "${FORTUNES_DIR:-/usr/share/games/fortunes}" && pwd)
    tar -cJf "$bin/fortunes.tar.xz" -C "$corpus/.." --transform "s|^$(basename "$corpus")|fortunes|" "$(basename "$corpus")"
    du -sh "$bin"
    exit 0
fi

# shellcheck source=bench/gpu_lib.sh
source bench/gpu_lib.sh
unpack_bin "$bin"

budget=${1:-450}
peak=${2:-989}
deadline=$((SECONDS + budget))
res=${RESULTS:-bench/results/gpu}
mkdir -p "$res"
# ONLY: the checks to run (default all): mini-fp32 mini-bf16 spec512-fp32 spec512-bf16
# generate generate-cached torch-mini torch-spec512 profile pipeline quantized. TORCH_COMPILE=0 skips torch.compile (its
# compilation takes a minute or more per preset).
only=${ONLY:-mini-fp32 mini-bf16 spec512-fp32 spec512-bf16 generate torch-mini torch-spec512 profile pipeline quantized}
want() { [[ " $only " == *" $1 "* ]]; }
# Kernel caches: one per check, so the cold runs can go side by side; seeded from
# bench/bin/kernels.tgz (a cache an earlier call brought back) where there is one.
caches=${CACHES:-$(mktemp -d)}

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

# `check NAME STEPS`: the command line of a check (train_bench or generate_bench).
check() {
    case $1 in
    mini-fp32) echo "$bin/train_bench-cuda mini $2 --device cuda" ;;
    mini-bf16) echo "$bin/train_bench-cuda mini $2 --device cuda --bf16" ;;
    mini-bf16-ckpt) echo "$bin/train_bench-cuda mini $2 --device cuda --bf16 --checkpointing" ;;
    spec512-fp32) echo "$bin/train_bench-cuda spec512 $2 --device cuda" ;;
    spec512-bf16) echo "$bin/train_bench-cuda spec512 $2 --device cuda --bf16" ;;
    generate) echo "$bin/generate_bench-cuda $2 --device cuda" ;;
    # The cached batch-1 loop alone: a handful of kernel shapes, where recomputing the
    # prefix compiles one set per prefix length (50), more than one call has time for.
    generate-cached) echo "env ONLY_CACHED=1 $bin/generate_bench-cuda $2 --device cuda" ;;
    esac
}

# `ours LABEL CACHE LIMIT CHECK STEPS`: one run, its JSON lines tagged with LABEL.
ours() {
    local label=$1 cache=$2 limit=$3 out
    # shellcheck disable=SC2046 # the check's command line is split on purpose
    if out=$(within "$limit" env ORCHESTRATE_KERNEL_CACHE="$caches/$cache" $(check "$4" "$5") 2>>"$res/stderr.txt" | grep '^{'); then
        echo "$out" | sed "s/^{/{\"run\": \"$label\", /" >>"$res/ours.jsonl"
    else
        echo "{\"run\": \"$label\", \"check\": \"$4\", \"error\": \"exit $? (124: out of time)\"}" >>"$res/ours.jsonl"
    fi
}

torch_run() {
    local model=$1 limit=$2
    # The reference's own functions, so that torch.compile can be left out.
    within "$limit" env PYTHONUNBUFFERED=1 PYTHONPATH="$bin" python3 -c "
import json, torch_seq2seq_baseline as t
print(json.dumps(dict(torch=t.torch.__version__)))
for amp in (False, True):
    m = t.train_bench('$model', 32, 128, 128, 20, amp, False)
if '${TORCH_COMPILE:-1}' == '1':
    t.train_bench('$model', 32, 128, 128, 20, True, True)
if '$model' == 'mini-8m':
    for b in (1, 32):
        t.gen_bench(m, '$model', b, 32, 50, True)
" >>"$res/torch.jsonl" 2>>"$res/stderr.txt" ||
        echo "{\"error\": \"torch $model exit $?\"}" >>"$res/torch.jsonl"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    ls "${CUDA_PATH:-/usr/local/cuda}/include/cuda.h" && ldconfig -p | grep -m2 nvrtc
} >"$res/machine.txt" 2>&1
cat "$res/machine.txt"

# `quantized`: each variant of a model (fp32, int8, fp16, dynamic) evaluated and served on
# the GPU. The pipeline trains a short model on the CPU (the GPU's compile time is the
# `pipeline` check's subject, not this one's), quantizes it, evaluates every variant on
# CUDA (fewer records and timed runs than the default: kernels compile per shape), then each
# variant is served from the GPU and from the CPU by bench/serve_devices.sh (greedy
# generations with token ids and log-probabilities side by side, in quantized-VARIANT/).
quantized_check() {
    local store=file:///tmp/orchestrate-quantized
    ORCHESTRATE_KERNEL_CACHE="$caches/quantized" within 420 "$bin/orchestrate-cuda" run pipelines/full.yaml \
        --no-serve --store "$store" --set model.resources.device=cpu --set model.with.steps=60 --set model.with.warmup=10 \
        --set model.with.eval_every=30 --set model.with.checkpoint_every=60 \
        --set evaluation.resources.device=cuda --set evaluation.with.max_records=64 \
        --set evaluation.with.latency_runs=5 --set evaluation.with.prompts=4 \
        --set evaluation.with.gate.max_ppl_increase=1.0 >"$res/quantized.log" 2>&1
    echo "pipeline exit $?" >>"$res/quantized.log"
    for variant in model int8 fp16 dynamic; do
        ORCHESTRATE_KERNEL_CACHE="$caches/quantized" within 240 bash bench/serve_devices.sh \
            "$store#$variant" "$bin/orchestrate-cuda" "$res/quantized-$variant" >>"$res/quantized.log" 2>&1
    done
}

# `pipeline`: the real pipeline training on the GPU (bench/gpu_lib.sh's gpu_pipeline).
pipeline_check() {
    gpu_pipeline "$bin/orchestrate-cuda" "$caches/pipeline" file:///tmp/orchestrate-pipeline \
        within 600 >"$res/pipeline.log" 2>&1
    echo "pipeline exit $?" >>"$res/pipeline.log"
}

# The two pipeline checks start first and run beside the benches: most of their time is
# CPU work (stages on the CPU, NVRTC compiling kernels) on a machine with cores to spare.
# Each has its own kernel cache, seeded like the benches' (same model, same operations).
for c in pipeline quantized; do
    mkdir -p "$caches/$c"
    [ -f "$bin/kernels.tgz" ] && tar -xzf "$bin/kernels.tgz" -C "$caches/$c" --strip-components=1
done
background=()
if [ -d "$bin/fortunes" ]; then
    want quantized && { quantized_check & background+=($!); }
    want pipeline && { pipeline_check & background+=($!); }
fi

# Phase 1, cold: every selected check once, side by side, each compiling and autotuning its
# kernels into its own cache (on one check at a time this took 172 s for `mini` fp32).
# Their step times overlap each other's compilation: only the warm-up is read from here.
names=()
cold=()
for c in mini-fp32 mini-bf16 spec512-fp32 spec512-bf16 generate generate-cached; do
    want "$c" || continue
    names+=("$c")
    mkdir -p "$caches/$c"
    [ -f "$bin/kernels.tgz" ] && tar -xzf "$bin/kernels.tgz" -C "$caches/$c" --strip-components=1
    ours "$c-cold" "$c" "${COLD_LIMIT:-240}" "$c" 2 &
    cold+=($!)
done
# (Only the cold runs: a bare `wait` would also wait for the pipeline checks.)
for pid in "${cold[@]}"; do wait "$pid"; done
# The pipeline checks train and evaluate on the same GPU: phase 2's timings wait for them,
# or they would not be alone on it.
for pid in "${background[@]}"; do wait "$pid" 2>/dev/null; done
background=()

# Phase 2, quiet: each again from its now warm cache, alone on the GPU: the warm-up a second
# run pays, and the throughput.
for c in "${names[@]}"; do
    ours "$c-warm" "$c" 90 "$c" 20
    [ "$c" = mini-bf16 ] && ours mini-bf16-ckpt-warm "$c" 90 mini-bf16-ckpt 20
done
# Where a warm `mini` fp32 step's GPU time goes: CubeCL's own per-kernel timings (each
# kernel timed alone, so the step runs slower), beside the step's unprofiled wall time from phase 2.
if want profile && want mini-fp32; then
    within 120 env ORCHESTRATE_KERNEL_CACHE="$caches/mini-fp32" CUBECL_DEBUG_LOG="$caches/profile.log" \
        CUBECL_DEBUG_OPTION=profile $(check mini-fp32 4) >/dev/null 2>>"$res/stderr.txt"
    # Its format is CubeCL's own: keep the end of the log (the last tables written).
    tail -n 300 "$caches/profile.log" >"$res/profile.txt" 2>/dev/null
fi
want torch-mini && torch_run mini-8m 150
want torch-spec512 && torch_run seed-512 150

for pid in "${background[@]}"; do wait "$pid" 2>/dev/null; done

python3 bench/gpu_report.py "$peak" "$res" | tee "$res/gpu.md"
# A file of its own: bench/results/gpu.md holds the sessions' history, which the README cites.
mkdir -p bench/results && cp "$res/gpu.md" "bench/results/gpu-$(date +%F-%H%M).md"
