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
python3 - "$bin" <<'PY'
import lzma, os, pathlib, shutil, sys, tarfile
bin = pathlib.Path(sys.argv[1])
for name in ("train_bench-cuda", "orchestrate-cuda"):
    with lzma.open(bin / (name + ".xz")) as src, open("/tmp/" + name, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod("/tmp/" + name, 0o755)
with tarfile.open(bin / "fortunes.tar.xz") as t:
    t.extractall("/usr/share/games")
PY
mkdir -p /tmp/k /tmp/kp
[ -f $bin/kernels.tgz ] && tar -xzf $bin/kernels.tgz -C /tmp/k --strip-components=1
[ -f $bin/kernels-pipeline.tgz ] && tar -xzf $bin/kernels-pipeline.tgz -C /tmp/kp --strip-components=1
for i in 1 2; do
    ORCHESTRATE_KERNEL_CACHE=/tmp/k timeout 60 /tmp/train_bench-cuda mini 30 --device cuda
    (cd $bin && timeout 60 python3 -c "
import json, torch_seq2seq_baseline as t
print(json.dumps(dict(torch=t.torch.__version__)))
for amp in (False, True):
    t.train_bench('mini-8m', 32, 128, 128, 30, amp, False)
")
done >"$OUT/bench.jsonl" 2>"$OUT/bench.err"
ORCHESTRATE_KERNEL_CACHE=/tmp/kp timeout 120 /tmp/orchestrate-cuda run pipelines/full.yaml --no-serve \
    --store file:///tmp/ps --set model.with.steps=300 --set model.with.eval_every=100 \
    --set model.with.checkpoint_every=100 --set evaluation.resources.device=cpu >"$OUT/pipeline.log" 2>&1
echo "pipeline exit $?" >>"$OUT/pipeline.log"
cat "$OUT/bench.jsonl"; grep -v "bytes$" "$OUT/pipeline.log" | grep -E "model|exit" | tail -15
