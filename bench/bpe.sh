#!/usr/bin/env bash
# BPE training time, the `bpe` stage beside Python `tokenizers` training the same vocabulary
# on the same text (the train split of the real corpus). Both use the same Rust engine, so
# this measures our overhead. Writes bench/results/bpe.md.
#
#   bash bench/bpe.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
runs=${1:-3}
PY=${PY:-}
if [ -z "$PY" ]; then
    [ -x bench/.venv/bin/python ] || python3 -m venv bench/.venv
    bench/.venv/bin/python -c 'import pyarrow, tokenizers' 2>/dev/null || bench/.venv/bin/pip install -q pyarrow tokenizers
    PY=$root/bench/.venv/bin/python
fi
cargo build --release --locked -q
bin=$root/target/release/orchestrate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
corpus=${FORTUNES_DIR:-/usr/share/games/fortunes}
[ -d "$corpus/ru" ] || { echo "no corpus at $corpus: apt-get install fortunes fortunes-ru, or python3 datasets/fortunes.py and FORTUNES_DIR=$root/datasets/fortunes" >&2; exit 1; }
export FORTUNES_DIR=$(cd "$corpus" && pwd)
sed "s|file://../artifacts|file://$work/store|" pipelines/full.yaml > "$work/p.yaml"
# Up to the tokenizer only: the rest of full.yaml trains for an hour and then serves.
"$bin" run "$work/p.yaml" -q --until tokenizer --no-serve >/dev/null
# The bpe stage materialised the corpus it read into the local cache beside the pipeline:
# the one artifact there with Parquet shards.
shards=$(ls -d "$work"/.orchestrate/artifacts/*/files/data)
[ "$(echo "$shards" | wc -l)" = 1 ] || { echo "expected one corpus in the local cache, found: $shards" >&2; exit 1; }
# Special tokens: pad bos eos unk, three languages, author:other, 64 authors (full.yaml).
specials=72
ours=(); theirs=()
for _ in $(seq "$runs"); do
    "$bin" run "$work/p.yaml" -q --until tokenizer --no-serve --force tokenizer >/dev/null
    rec=$(ls "$work"/store/runs/*.json | sort | tail -1)
    ours+=("$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); s=[s for s in r['stages'] if s['stage']=='tokenizer'][0]; print(s['metrics']['train_seconds'], s['duration_ms']/1000)" "$rec")")
    theirs+=("$($PY bench/bpe_tokenizers.py "$shards" 8000 2 "$specials")")
done
mkdir -p bench/results
python3 - "${ours[@]}" -- "${theirs[@]}" <<'PY' | tee bench/results/bpe.md
import statistics, sys, datetime, subprocess
args = sys.argv[1:]
sep = args.index("--")
ours = [a.split() for a in args[:sep]]
py = [float(x) for x in args[sep + 1:]]
train = statistics.median(float(o[0]) for o in ours)
stage = statistics.median(float(o[1]) for o in ours)
ref = statistics.median(py)
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
print(f"BPE training, vocab 8000, real corpus train split ({datetime.date.today()}, {cpu}, {cores} cores, median of {len(py)})\n")
print("| what | seconds | ratio to Python tokenizers |\n|---|---|---|")
print(f"| Python `tokenizers` train_from_iterator | {ref:.2f} | 1.00 |")
print(f"| `bpe` stage, training (streamed from Parquet) | {train:.2f} | {train / ref:.2f} |")
print(f"| `bpe` stage, whole (author scan, training, validation report, save) | {stage:.2f} | {stage / ref:.2f} |")
PY
