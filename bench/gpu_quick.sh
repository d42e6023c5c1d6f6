#!/usr/bin/env bash
# A short GPU call (about two minutes on a warm kernel cache), for a machine lent with one:
# `mini` training throughput, ours and PyTorch's alternating (fp32 eager and bf16 autocast,
# the reference's own function), then the real pipeline training on the GPU.
#
#   bash bench/gpu.sh --build     # here; then copy a brought-back kernel cache of the
#                                 # pipeline to bench/bin/kernels-pipeline.tgz (optional)
#   bash bench/gpu_quick.sh       # there, with bench/bin carried; results in $OUT
set -u
OUT=${OUT:-bench/results/gpu-quick}
mkdir -p "$OUT"
bin=bench/bin
# shellcheck source=bench/gpu_lib.sh
source bench/gpu_lib.sh
unpack_bin "$bin"
mkdir -p /tmp/k /tmp/kp
[ -f $bin/kernels.tgz ] && tar -xzf $bin/kernels.tgz -C /tmp/k --strip-components=1
[ -f $bin/kernels-pipeline.tgz ] && tar -xzf $bin/kernels-pipeline.tgz -C /tmp/kp --strip-components=1
for i in 1 2; do
    ORCHESTRATE_KERNEL_CACHE=/tmp/k timeout 60 $bin/train_bench-cuda mini 30 --device cuda
    (cd $bin && timeout 60 python3 -c "
import json, torch_seq2seq_baseline as t
print(json.dumps(dict(torch=t.torch.__version__)))
for amp in (False, True):
    t.train_bench('mini-8m', 32, 128, 128, 30, amp, False)
")
done >"$OUT/bench.jsonl" 2>"$OUT/bench.err"
gpu_pipeline "$bin/orchestrate-cuda" /tmp/kp file:///tmp/ps timeout 120 >"$OUT/pipeline.log" 2>&1
echo "pipeline exit $?" >>"$OUT/pipeline.log"
cat "$OUT/bench.jsonl"; grep -v "bytes$" "$OUT/pipeline.log" | grep -E "model|exit" | tail -15
