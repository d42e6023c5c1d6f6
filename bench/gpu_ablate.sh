#!/usr/bin/env bash
# Which of the GPU training path's choices pay, measured on one GPU in one call: `mini`
# fp32 training throughput (batch 32, 128 + 128) with every choice on, with each turned
# off alone (ORCHESTRATE_GPU_PATH, see stages/model/src/gpu_path.rs), with all off and the
# bench waiting on every step (the way of 2026-11-26, when this model made 187,499
# tokens/s on an H100 against 130,206 a day later), with glibc's allocator instead of
# orchestrate-alloc (new since then), and PyTorch fp32 eager between rounds.
# Variants alternate, ROUNDS rounds, so that a drifting machine shows as spread, not bias.
#
#   cargo build --release --locked -p orchestrate-model --features cuda --example train_bench
#   mkdir -p bench/bin && cp ../shared/bench/torch_seq2seq_baseline.py bench/bin/ &&
#     strip -o /tmp/tb target/release/examples/train_bench && xz -1 -c /tmp/tb > bench/bin/train_bench-cuda.xz
#   bash bench/gpu_ablate.sh [ROUNDS]   # on the GPU machine, bench/bin carried; results in $OUT
#
# The first run compiles and autotunes every kernel (about three minutes on an H100); its
# cache goes back in $OUT/kernels.tgz (put it in bench/bin for the next call).
set -u
rounds=${1:-2}
OUT=${OUT:-bench/results/gpu-ablate}
mkdir -p "$OUT"
bin=bench/bin
# shellcheck source=bench/gpu_lib.sh
source bench/gpu_lib.sh
unpack_bin "$bin"
export ORCHESTRATE_KERNEL_CACHE=/tmp/k
mkdir -p /tmp/k
[ -f $bin/kernels.tgz ] && tar -xzf $bin/kernels.tgz -C /tmp/k --strip-components=1
log=$OUT/ablate.jsonl
: >"$log"
ours() { # NAME OFF [FLAGS...]
    local name=$1 off=$2
    shift 2
    ORCHESTRATE_GPU_PATH=$off timeout 300 $bin/train_bench-cuda mini 30 --device cuda "$@" |
        python3 -c "import json, sys; d = json.loads(sys.stdin.read()); d['variant'] = '$name'; print(json.dumps(d))" >>"$log" ||
        echo "{\"variant\": \"$name\", \"failed\": true}" >>"$log"
}
# Compile and autotune first, untimed, so that no variant pays for it in the table.
ORCHESTRATE_GPU_PATH=copies,broadcast timeout 400 $bin/train_bench-cuda mini 3 --device cuda >"$OUT/cold.json"
for r in $(seq "$rounds"); do
    ours all ""
    ours no-copies copies
    ours no-broadcast broadcast
    ours no-master master
    ours none copies,broadcast,master
    ours all-sync "" --sync-each-step
    ours none-sync copies,broadcast,master --sync-each-step
    ours all-system-alloc "" --system-alloc
    (cd $bin && timeout 120 python3 -c "
import json, torch_seq2seq_baseline as t
print(json.dumps(dict(torch=t.torch.__version__)))
t.train_bench('mini-8m', 32, 128, 128, 30, False, False)
") >>"$log" 2>>"$OUT/torch.err"
done
tar -czf "$OUT/kernels.tgz" -C /tmp k
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt"
python3 - "$log" <<'PY' | tee "$OUT/ablate.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# PyTorch's lines are the timed ones without a variant.
torch = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and "variant" not in r]
by = {}
for r in rows:
    if "variant" in r:
        by.setdefault(r["variant"], []).append(r)
ref = statistics.median(torch) if torch else None
print("| variant | tokens/s (each round) | median | vs PyTorch fp32 eager | host CPU ms / step |")
print("|---|---|---:|---:|---:|")
for name, runs in by.items():
    ok = [r for r in runs if "tokens_per_s" in r]
    each = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in ok) or "failed"
    med = statistics.median(r["tokens_per_s"] for r in ok) if ok else None
    host = statistics.median(r["host_cpu_ms_per_step"] or 0 for r in ok) if ok else None
    ratio = f"{med / ref:.2f}x" if med and ref else ""
    print(f"| {name} | {each} | {med or 0:,.0f} | {ratio} | {host or 0:.0f} |")
if torch:
    print(f"| PyTorch fp32 eager | {', '.join(f'{t:,.0f}' for t in torch)} | {ref:,.0f} | 1.00x | |")
PY
