# What bench/gpu.sh and bench/gpu_quick.sh share on the GPU machine (sourced, not run).

# unpack_bin DIR: unpacks what `bench/gpu.sh --build` packed into DIR (each `NAME-cuda.xz`
# beside itself as `NAME-cuda`; the corpus, fortunes.tar.xz, into DIR/fortunes) with
# Python's lzma and tarfile, so the GPU machine needs no xz, then installs the corpus where
# pipelines/full.yaml reads it.
unpack_bin() {
    python3 - "$1" <<'PY'
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
    if [ -d "$1/fortunes" ]; then
        mkdir -p /usr/share/games && rm -rf /usr/share/games/fortunes &&
            cp -r "$1/fortunes" /usr/share/games/fortunes
    fi
}

# gpu_pipeline ORCHESTRATE CACHE STORE [WRAPPER...]: the product itself, the real corpus
# through every stage (pipelines/full.yaml) with training on the GPU (`device: auto`, 300
# steps) and evaluation on the CPU, its kernels cached in CACHE, artifacts in STORE; run
# under WRAPPER (a time limit) where one is given. Output on stdout, exit status as the run's.
gpu_pipeline() {
    local orchestrate=$1 cache=$2 store=$3
    shift 3
    "$@" env ORCHESTRATE_KERNEL_CACHE="$cache" "$orchestrate" run pipelines/full.yaml \
        --no-serve --store "$store" \
        --set model.with.steps=300 --set model.with.eval_every=100 \
        --set model.with.checkpoint_every=100 --set evaluation.resources.device=cpu
}
