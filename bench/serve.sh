#!/usr/bin/env bash
# Load test of `orchestrate serve` with the `mini` model on CPU, loopback only, bounded in
# time and requests: 1, 32 and 128 closed-loop clients asking for 50 new tokens each. The
# levels alternate in ROUNDS rounds (each level SECONDS_PER_LEVEL / ROUNDS at a time), so a
# slow spell of a shared machine lands on every level rather than on one.
# Writes bench/results/serve.md. No peer server runs here (TGI and vLLM need a GPU or
# images this machine cannot fetch), so the comparison is with one client.
#
#   bash bench/serve.sh [SECONDS_PER_LEVEL] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
rounds=${2:-3}
cargo build --release --locked -q
cargo build --release --locked -q -p orchestrate-serve --example load
export ORCHESTRATE_CACHE_DIR=$(pwd)/bench/.cache
corpus=$(cd "${FORTUNES_DIR:-/usr/share/games/fortunes}" 2>/dev/null && pwd) || corpus=
[ -n "$corpus" ] && [ -d "$corpus/ru" ] || { echo "no corpus at ${FORTUNES_DIR:-/usr/share/games/fortunes}: apt-get install fortunes fortunes-ru, or python3 datasets/fortunes.py and FORTUNES_DIR=$(pwd)/datasets/fortunes" >&2; exit 1; }
export FORTUNES_DIR=$corpus
target/release/orchestrate run bench/pipelines/serve-mini.yaml --no-serve --quiet >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/orchestrate serve deploy --pipeline bench/pipelines/serve-mini.yaml --port "$port" 2>bench/.serve.log &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
up=
for _ in $(seq 150); do
    if curl -fs "http://127.0.0.1:$port/health" >/dev/null 2>&1; then up=1; break; fi
    kill -0 $server 2>/dev/null || break
    sleep 0.2
done
[ -n "$up" ] || { echo "the server did not start:" >&2; cat bench/.serve.log >&2; exit 1; }
# The served model's parameter count, from its card: `serve` has just fetched the deployment
# into the local cache (the newest card there).
params=$(ls -t "$ORCHESTRATE_CACHE_DIR"/artifacts/*/files/model/model.json | head -1 | xargs python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["parameters"])')
results=()
for round in $(seq "$rounds"); do
    for clients in 1 32 128; do
        results+=("$(target/release/examples/load "http://127.0.0.1:$port" "$clients" "$((secs / rounds))" 50 20000)")
    done
done
kill -TERM $server 2>/dev/null || true; wait $server || true
python3 - "$params" "${results[@]}" <<'PY' | tee bench/results/serve.md
import json, sys, datetime, subprocess
params = int(sys.argv[1])
rows = [json.loads(a) for a in sys.argv[2:]]
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
print(f"`orchestrate serve`, `mini` ({params / 1e6:.1f}M parameters, fp32), POST /generate with 50 new tokens, closed-loop clients on loopback ({datetime.date.today()}, {cpu}, {cores} cores, CPU)\n")
print("| clients | seconds | requests | errors | req/s | tokens/s | p50 ms | p95 ms | p99 ms | tokens/s vs 1 client |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
levels = sorted({r["clients"] for r in rows})
def total(c, key):
    return sum(r[key] for r in rows if r["clients"] == c)
def tokens(c):
    return sum(r["tokens_per_s"] * r["seconds"] for r in rows if r["clients"] == c)
def median(c, key):
    v = sorted(r[key] for r in rows if r["clients"] == c)
    return v[len(v) // 2]
base = tokens(levels[0]) / total(levels[0], "seconds")
for c in levels:
    secs = total(c, "seconds")
    print(f"| {c} | {secs:.1f} | {total(c, 'requests')} | {total(c, 'errors')} | {total(c, 'requests') / secs:.1f} | {tokens(c) / secs:.0f} | {median(c, 'latency_ms_p50'):.0f} | {median(c, 'latency_ms_p95'):.0f} | {median(c, 'latency_ms_p99'):.0f} | {tokens(c) / secs / base:.1f}x |")
ones = [r for r in rows if r["clients"] == 1]
for c in levels[1:]:
    per_round = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(ones, [r for r in rows if r["clients"] == c])]
    print(f"\n{c} clients vs 1, round by round: " + ", ".join(f"{x:.1f}x" for x in per_round), end="")
print(f"\n\nLevels alternate in {len(ones)} rounds; latencies are the median of the rounds' percentiles.")
PY
