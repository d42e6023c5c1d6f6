#!/usr/bin/env bash
# Ingest throughput and peak memory, orchestrate beside a Python + pyarrow script doing the
# same parse and write (bench/ingest_pyarrow.py), on the real Debian fortune corpus and on a
# generated corpus of N records (default 2,000,000).
#
#   bash bench/ingest.sh [N]        # needs fortunes fortunes-ru, python3; makes bench/.venv
#
# Writes bench/results/ingest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
n=${1:-2000000}
PY=${PY:-}
if [ -z "$PY" ]; then
    [ -x bench/.venv/bin/python ] || python3 -m venv bench/.venv
    bench/.venv/bin/python -c 'import pyarrow' 2>/dev/null || bench/.venv/bin/pip install -q pyarrow
    PY=$root/bench/.venv/bin/python
fi
# Only the ingest stage is measured, so only it is built: without burn (the `model` feature) a
# clean release build takes minutes, not most of an hour. Its own target folder keeps the
# full build in target/release (bench/train.sh, bench/serve.sh) as it is.
cargo build --release --locked -q --no-default-features --features corpus --target-dir target/bench-ingest
bin=$root/target/bench-ingest/release/orchestrate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
en=$(cd "${FORTUNES_DIR:-/usr/share/games/fortunes}" 2>/dev/null && pwd) || en=
[ -n "$en" ] && [ -d "$en/ru" ] || { echo "no corpus at ${FORTUNES_DIR:-/usr/share/games/fortunes}: apt-get install fortunes fortunes-ru, or python3 datasets/fortunes.py and FORTUNES_DIR=$root/datasets/fortunes" >&2; exit 1; }
ru=$en/ru

pipeline() { # name, sources yaml
    cat > "$work/$1.yaml" <<YAML
name: bench-$1
storage: file://store-$1
stages:
  corpus:
    kind: ingest
    with: { sources: [$2], split: { val: 0.02, test: 0.02 } }
YAML
}
pipeline real "{ path: $en, lang: en }, { path: $ru, lang: ru }"
$PY bench/gen_corpus.py "$n" "$work/generated.txt"
pipeline generated "{ path: $work/generated.txt, lang: en }"

measure() { $PY bench/measure.py "$@"; }
bytes_real=$(cat $(find $en $ru -maxdepth 1 -type f ! -name '*.dat') | wc -c)
bytes_gen=$(stat -c %s "$work/generated.txt")
declare -A res
# Every measured run of ours writes into a store of its own (named by the shell's pid,
# which `exec` hands to orchestrate): into a filled one it would find its blobs already
# there and skip writing them, where the peer writes its Parquet files every time.
# The real corpus takes a tenth of a second: 10 runs a side, where one scheduler hiccup
# would otherwise move a median of 3 by a third.
declare -A repeat=([real]=10 [generated]=3)
for corpus in real generated; do
    "$bin" run "$work/$corpus.yaml" -q >/dev/null   # warm the page cache
    res[$corpus-orch]=$(measure "${repeat[$corpus]}" bash -c 'exec "$0" run "$1" -q --force-all --store "file://$2/store-run-$$"' "$bin" "$work/$corpus.yaml" "$work")
done
res[real-py]=$(measure "${repeat[real]}" $PY bench/ingest_pyarrow.py "$work/py-real" "$en:en" "$ru:ru")
res[generated-py]=$(measure "${repeat[generated]}" $PY bench/ingest_pyarrow.py "$work/py-gen" "$work/generated.txt:en")

mkdir -p bench/results
$PY - "$bytes_real" "$bytes_gen" "$n" \
    "${res[real-orch]}" "${res[real-py]}" "${res[generated-orch]}" "${res[generated-py]}" <<'PY' | tee bench/results/ingest.md
import json, sys, datetime, subprocess
b_real, b_gen, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = [json.loads(x) for x in sys.argv[4:]]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
print(f"Ingest ({datetime.date.today()}, {cpu}, {cores} cores)\n")
print("| corpus | tool | median wall | throughput | peak RSS | speed-up |")
print("|---|---|---|---|---|---|")
for name, size, orch, py in [("Debian fortunes (real)", b_real, r[0], r[1]), (f"generated, {n:,} records", b_gen, r[2], r[3])]:
    for tool, x in [("orchestrate ingest", orch), ("Python + pyarrow", py)]:
        mbps = size / 1e6 / x["median_s"]
        speed = f"{py['median_s'] / orch['median_s']:.1f}x" if x is orch else ""
        print(f"| {name} ({size/1e6:.1f} MB) | {tool} | {x['median_s']:.2f} s | {mbps:.1f} MB/s | {x['peak_rss_mb']:.0f} MB | {speed} |")
PY
