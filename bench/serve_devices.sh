#!/usr/bin/env bash
# One model served from the GPU and from the CPU, the same greedy requests to each, their
# token ids and log-probabilities side by side: a quantized variant that loads but decodes
# wrongly on one device shows here (it did: `dynamic` on CUDA, before generic_projection).
#
#   bash bench/serve_devices.sh MODEL_DIR [ORCHESTRATE_BINARY] [OUT_DIR]
#
# Writes OUT_DIR/serve-DEVICE.jsonl (one answer per prompt) and prints a comparison.
set -uo pipefail
model=$1
bin=${2:-target/release/orchestrate}
out=${3:-bench/results/serve-devices}
mkdir -p "$out"
port=8120
for device in cuda cpu; do
    port=$((port + 1))
    : >"$out/serve-$device.jsonl"
    "$bin" serve "$model" --device "$device" --port "$port" >"$out/serve-$device.log" 2>&1 &
    pid=$!
    for _ in $(seq 240); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
        kill -0 "$pid" 2>/dev/null || break # it exited: its error is in the log
        sleep 0.5
    done
    for prompt in "The meaning of life is" "Жизнь — это" "A programmer walks into a bar"; do
        curl -s --max-time 120 -X POST "http://127.0.0.1:$port/generate" -H 'content-type: application/json' \
            -d "{\"inputs\": \"$prompt\", \"parameters\": {\"max_new_tokens\": 16, \"ignore_eos\": true, \"details\": true}}" \
            >>"$out/serve-$device.jsonl"
        echo >>"$out/serve-$device.jsonl"
    done
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def answers(device):
    rows = []
    for line in open(f"{out}/serve-{device}.jsonl"):
        try:
            tokens = json.loads(line)["details"]["tokens"]
            rows.append(([t["id"] for t in tokens], sum(t["logprob"] for t in tokens)))
        except (ValueError, KeyError, TypeError):
            rows.append(None)
    return rows
gpu, cpu = answers("cuda"), answers("cpu")
for i, (g, c) in enumerate(zip(gpu, cpu)):
    same = g is not None and c is not None and g[0] == c[0]
    print(f"prompt {i}: {'same tokens' if same else 'DIFFERENT'}; cuda {g}; cpu {c}")
PY
