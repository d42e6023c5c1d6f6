#!/usr/bin/env bash
# The train issue's GPU table in one call of a lent GPU machine: training tokens/s, model
# FLOPs utilisation and warm-up for both presets, fp32 and bf16, beside PyTorch eager fp32
# and bf16 autocast on the same GPU; and, in the same rounds, `mini` fp32 with burn-fusion
# off (`--no-fusion`: every operation its own kernel, none of burn-fusion's host work) and
# with layer norm, attention's softmax, dropout and the loss as burn composes them (`--burn-steps`,
# against the default's single steps of `fused::gpu`), and `mini` bf16 with each parameter
# cast by autodiff (`--cast-each`, against the default's one cast by FlatAdamW), and `mini`
# fp32 with FlatAdamW's vectors laid end to end by burn's cat (`--burn-cat`, a kernel per
# piece, against `end_to_end`'s one kernel): the open questions about where a step's time
# goes. (`--run-ahead` and `--system-alloc`, run here on 2026-11-27, were
# settled then: bench/results/gpu.md.)
#
#   cargo build --release --locked -p orchestrate-model --features cuda --example train_bench
#   mkdir -p bench/bin && cp ../shared/bench/torch_seq2seq_baseline.py bench/bin/ &&
#     strip -o /tmp/tb target/release/examples/train_bench && xz -1 -c /tmp/tb > bench/bin/train_bench-cuda.xz
#   bash bench/gpu_table.sh [SECONDS] [PEAK_TFLOPS]   # on the GPU machine, bench/bin carried
#
# Phase 1 compiles and autotunes each of the four (preset, precision) pairs and the four
# `mini` variants side by side,
# each into its own kernel cache (untimed: a fresh machine spends about three minutes on
# `mini` alone; their first-step times are the cold warm-ups, inflated by running together).
# Phase 2 runs every check again from those caches, one at a time, in alternating rounds
# until the deadline (default 540 s from the start), PyTorch once per round; a warm run's
# first step is the warm-up a second run pays. Between the phases, a profiled `mini` fp32
# step gives the GPU's kernel time by kernel (kernels.md, bench/kernel_time.py). Results in
# $OUT (default bench/results/gpu-table): table.jsonl, table.md (bench/gpu_table.py),
# kernels.md, machine.txt,
# stderr.txt, and each kernel cache as k-NAME.tgz (unpack into /tmp/k/NAME to seed a later
# call; k-*.tgz in bench/bin are unpacked there first). Runs cut off by the deadline are
# written as skipped, not lost. On 2026-11-27 the first call took 438 s on a fresh H100.
set -u
cd "$(dirname "$0")/.."
budget=${1:-540}
peak=${2:-989}
deadline=$((SECONDS + budget))
OUT=${OUT:-bench/results/gpu-table}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
bin=bench/bin
# shellcheck source=bench/gpu_lib.sh
source bench/gpu_lib.sh
unpack_bin "$bin"
log=$OUT/table.jsonl
: >"$log"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    lscpu | sed -n 's/^Model name: *//p'
    echo "$(nproc) CPU threads"
} >"$OUT/machine.txt" 2>&1
# One kernel cache per (preset, precision), named as the run that fills it.
caches="mini-fp32 spec512-fp32 mini-bf16 spec512-bf16 no-fusion burn-steps bf16-cast-each burn-cat"
for c in $caches; do
    mkdir -p "/tmp/k/$c"
    [ -f "$bin/k-$c.tgz" ] && tar -xzf "$bin/k-$c.tgz" -C "/tmp/k/$c"
done

# tag KEY=VALUE...: adds the fields to every JSON line on stdin.
tag() {
    python3 -c '
import json, sys
extra = dict(a.split("=", 1) for a in sys.argv[1:])
for line in sys.stdin:
    if line.startswith("{"):
        d = json.loads(line)
        d.update(extra)
        print(json.dumps(d), flush=True)
' "$@"
}

# ours ROUND VARIANT CACHE LIMIT ARGS...: one train_bench run, at most LIMIT seconds (less
# if the deadline is nearer; skipped under 15 s), its JSON line tagged and appended.
ours() {
    local round=$1 variant=$2 cache=$3 limit=$4 left=$((deadline - SECONDS))
    shift 4
    if ((left < 15)); then
        echo "{\"round\": \"$round\", \"variant\": \"$variant\", \"skipped\": true}" >>"$log"
        return
    fi
    ((limit > left)) && limit=$left
    local out rc
    out=$(ORCHESTRATE_KERNEL_CACHE=/tmp/k/$cache \
        timeout "$limit" $bin/train_bench-cuda "$@" --device cuda 2>>"$OUT/stderr.txt")
    rc=$?
    if [ $rc -eq 0 ] && [ -n "$out" ]; then
        echo "$out" | tag round="$round" variant="$variant" engine=burn >>"$log"
    else
        echo "{\"round\": \"$round\", \"variant\": \"$variant\", \"exit\": $rc}" >>"$log"
    fi
}

# Phase 1: cold, side by side.
ours cold mini-fp32 mini-fp32 270 mini 3 &
ours cold spec512-fp32 spec512-fp32 270 spec512 3 &
ours cold mini-bf16 mini-bf16 270 mini 3 --bf16 &
ours cold spec512-bf16 spec512-bf16 270 spec512 3 --bf16 &
ours cold no-fusion no-fusion 270 mini 3 --no-fusion &
ours cold burn-steps burn-steps 270 mini 3 --burn-steps &
ours cold bf16-cast-each bf16-cast-each 270 mini 3 --bf16 --cast-each &
ours cold burn-cat burn-cat 270 mini 3 --burn-cat &
wait

# From here on, the last 25 s of the budget are kept for packing the kernel caches.
deadline=$((deadline - 25))

# Where a warm `mini` fp32 step's GPU time goes, by kernel: CubeCL's profile log of runs 2
# and 5 steps long from the now warm cache (bench/kernel_time.py counts the last 3 steps).
# Each kernel is timed alone, so these steps run slower than unprofiled ones.
profiled() {
    local steps=$1 left=$((deadline - SECONDS))
    ((left < 20)) && return 1
    ORCHESTRATE_KERNEL_CACHE=/tmp/k/mini-fp32 CUBECL_DEBUG_LOG="/tmp/k/profile-$steps.log" \
        CUBECL_DEBUG_OPTION=profile timeout $((left < 60 ? left : 60)) \
        $bin/train_bench-cuda mini "$steps" --device cuda >/dev/null 2>>"$OUT/stderr.txt"
}
if profiled 2 && profiled 5; then
    python3 bench/kernel_time.py /tmp/k/profile-2.log /tmp/k/profile-5.log 2 5 \
        "GPU kernels per profiled \`mini\` fp32 step ($(head -n 1 "$OUT/machine.txt"))" \
        >"$OUT/kernels.md" 2>>"$OUT/stderr.txt"
fi

# Phase 2: warm, one at a time, alternating, 30 timed steps each.
for r in 1 2 3; do
    ((deadline - SECONDS < 60)) && break
    ours $r mini-fp32 mini-fp32 60 mini 30
    ours $r spec512-fp32 spec512-fp32 60 spec512 30
    ours $r mini-bf16 mini-bf16 60 mini 30 --bf16
    ours $r spec512-bf16 spec512-bf16 60 spec512 30 --bf16
    ours $r no-fusion no-fusion 60 mini 30 --no-fusion
    ours $r burn-steps burn-steps 60 mini 30 --burn-steps
    ours $r bf16-cast-each bf16-cast-each 60 mini 30 --bf16 --cast-each
    ours $r burn-cat burn-cat 60 mini 30 --burn-cat
    left=$((deadline - SECONDS))
    if ((left > 20)); then
        (cd $bin && timeout $((left < 120 ? left : 120)) python3 -c "
import json, torch_seq2seq_baseline as t
print(json.dumps(dict(kind='version', torch=t.torch.__version__)), flush=True)
for name in ('mini-8m', 'seed-512'):
    for amp in (False, True):
        t.train_bench(name, 32, 128, 128, 30, amp, False)
" 2>>"$OUT/stderr.txt") | tag round=$r engine=torch >>"$log"
    fi
done

for c in $caches; do
    tar -czf "$OUT/k-$c.tgz" -C "/tmp/k/$c" .
done
python3 bench/gpu_table.py "$peak" "$log" "$OUT/machine.txt" | tee "$OUT/table.md"
