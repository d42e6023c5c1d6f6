#!/usr/bin/env bash
# No-op run and plan of a fully cached six-stage pipeline, orchestrate beside DVC, same run.
#
#   bash bench/noop.sh            # uses bench/.venv (created with dvc on first use)
#   DVC=/path/to/dvc bash bench/noop.sh
#
# Prints a Markdown table and writes it to bench/results/noop.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)"; exit 1; }
if [ -z "${DVC:-}" ]; then
    [ -x bench/.venv/bin/dvc ] || { python3 -m venv bench/.venv && bench/.venv/bin/pip install -q dvc; }
    DVC=$root/bench/.venv/bin/dvc
fi
cargo build --release --locked -q
bin=$root/target/release/orchestrate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# orchestrate: the same six stages as ../shared/bench/dvc-noop, as shell stages.
mkdir -p "$work/orch" && cd "$work/orch"
echo '{}' > in.txt
cat > p.yaml <<'YAML'
name: noop
storage: file://store
params: { lr: 0.001 }
stages:
  ingest:    { kind: shell, deps: [in.txt], with: { run: "cat $PIPELINE_DIR/in.txt > corpus.txt", outputs: [corpus.txt] } }
  tokenizer: { kind: shell, inputs: [ingest], with: { run: "cat $INPUT_INGEST/corpus.txt > tok.txt", outputs: [tok.txt] } }
  train:     { kind: shell, inputs: [tokenizer], with: { run: "cat $INPUT_TOKENIZER/tok.txt > model.txt; echo ${params.lr} >> model.txt", outputs: [model.txt] } }
  quantize:  { kind: shell, inputs: [train], with: { run: "cat $INPUT_TRAIN/model.txt > q.txt", outputs: [q.txt] } }
  evaluate:  { kind: shell, inputs: [quantize], with: { run: "cat $INPUT_QUANTIZE/q.txt > eval.json", outputs: [eval.json] } }
  deploy:    { kind: shell, inputs: [evaluate], with: { run: "cat $INPUT_EVALUATE/eval.json > deploy.txt", outputs: [deploy.txt] } }
YAML
"$bin" run p.yaml -q >/dev/null

# DVC on a copy of the shared pipeline.
cp -r "$root/../shared/bench/dvc-noop" "$work/dvc" && chmod -R u+w "$work/dvc" && cd "$work/dvc"
git init -q && "$DVC" init -q && echo '{}' > in.txt && "$DVC" repro -q >/dev/null 2>&1

cd "$work"
hyperfine -N --warmup 3 --runs 30 --export-json run.json \
    -n "orchestrate run" "$bin run orch/p.yaml -q" \
    -n "dvc repro" "sh -c 'cd dvc && $DVC repro -q'" >/dev/null
hyperfine -N --warmup 3 --runs 30 --export-json plan.json \
    -n "orchestrate plan" "$bin plan orch/p.yaml" \
    -n "dvc status" "sh -c 'cd dvc && $DVC status -q'" >/dev/null

mkdir -p "$root/bench/results"
python3 - "$root/bench/results/noop.md" <<'PY'
import json, platform, subprocess, sys, datetime
def load(f):
    return {r["command"]: r for r in json.load(open(f))["results"]}
run, plan = load("run.json"), load("plan.json")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
lines = [f"No-op on a fully cached six-stage pipeline ({datetime.date.today()}, {cpu}, {cores} cores)", "",
         "| command | mean | median | min | ratio (peer / orchestrate, median) |", "|---|---|---|---|---|"]
for ours, peer, table in [("orchestrate run", "dvc repro", run), ("orchestrate plan", "dvc status", plan)]:
    o, p = table[ours], table[peer]
    for name, r in [(ours, o), (peer, p)]:
        ratio = f"{p['median'] / o['median']:.0f}x" if name == ours else ""
        lines.append(f"| `{name}` | {r['mean']*1e3:.1f} ms | {r['median']*1e3:.1f} ms | {r['min']*1e3:.1f} ms | {ratio} |")
text = "\n".join(lines) + "\n"
open(sys.argv[1], "w").write(text)
print(text)
PY
