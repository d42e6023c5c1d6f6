"""The Markdown report of bench/gpu.sh: `python3 bench/gpu_report.py PEAK_TFLOPS DIR...`.
Each DIR holds one call's machine.txt, ours.jsonl and torch.jsonl; several DIRs (calls on
fresh machines of the same kind) are merged, each row naming its call."""
import datetime
import json
import pathlib
import sys

peak = float(sys.argv[1])
dirs = [pathlib.Path(d) for d in sys.argv[2:]]


def rows(d, name):
    f = d / name
    if not f.exists():
        return []
    return [dict(json.loads(l), call=i) for l in f.read_text().splitlines() if l.startswith("{")]


ours, torch, machines = [], [], []
for i, d in enumerate(dirs, 1):
    ours += [dict(o, call=i) for o in rows(d, "ours.jsonl")]
    torch += [dict(t, call=i) for t in rows(d, "torch.jsonl")]
    machines.append((d / "machine.txt").read_text().splitlines()[0])
print(f"GPU checks (`bash bench/gpu.sh`), {datetime.date.today()}, in {len(dirs)} call(s) on: "
      + "; ".join(f"{i}: {m}" for i, m in enumerate(machines, 1)))
print(f"\nTraining: batch 32, source 128, target 128, vocab 8000. MFU against {peak:.0f} TFLOP/s "
      "(dense bf16), with one FLOP count for both engines (ours: 6 per parameter per token, "
      "plus attention's products). Cold: kernel cache empty (or seeded), several cold runs "
      "side by side in call 2, so only their warm-up is shown; warm: the same check again, "
      "alone, from its cache.\n")
print("| call | model | engine | precision | run | warm-up s | step ms | tokens/s | MFU |")
print("|---:|---|---|---|---|---:|---:|---:|---:|")
per_token = {}
for o in ours:
    if o.get("kind") == "train" and not o["run"].endswith("-cold"):
        per_token[o["model"]] = o["model_tflops_per_s"] / o["tokens_per_s"]
for o in ours:
    c = o["call"]
    if o.get("kind") in ("generate", "cache_speedup"):
        continue
    if "error" in o:
        print(f"| {c} | {o.get('check', o.get('model', ''))} | burn 0.21 cuda (ours) | | {o['run']} | | {o['error']} | | |")
        continue
    prec = o["precision"] + (" + checkpointing" if o["checkpointing"] else "")
    if o["run"].endswith("-cold") and c > 1:
        print(f"| {c} | {o['model']} | burn 0.21 cuda (ours) | {prec} | {o['run']} | {o['warmup_s']} | | | |")
        continue
    print(f"| {c} | {o['model']} | burn 0.21 cuda (ours) | {prec} | {o['run']} | {o['warmup_s']} | "
          f"{o['step_ms']} | {o['tokens_per_s']:,} | {100 * o['model_tflops_per_s'] / peak:.1f}% |")
names = {"mini-8m": "mini", "seed-512": "spec512"}
for t in torch:
    if t.get("kind") != "train" or "error" in t:
        continue
    model = names.get(t["model"], t["model"])
    version = next((v["torch"] for v in torch if "torch" in v and v["call"] == t["call"]), "")
    prec = ("bf16 autocast" if t.get("amp") else "fp32") + (" compiled" if t.get("compile") else " eager")
    mfu = f"{100 * t['tokens_per_s'] * per_token[model] / peak:.1f}%" if model in per_token else ""
    print(f"| {t['call']} | {model} | PyTorch {version} | {prec} | | | {t['step_ms']} | {t['tokens_per_s']:,} | {mfu} |")

gen = [o for o in ours if o.get("kind") == "generate" and not o.get("run", "").endswith("-cold")]
tgen = [t for t in torch if t.get("kind") == "generate" and t["model"] == "mini-8m"]
if gen or tgen:
    print("\nGeneration, `mini` shape, 32-token prompt, 50 new tokens (greedy):\n")
    print("| call | engine | mode | batch | p50 ms | p95 / max ms | tokens/s |\n|---:|---|---|---:|---:|---:|---:|")
    for o in gen:
        print(f"| {o['call']} | {o['engine']} | {o['mode']} | {o['batch']} | {o['latency_ms_p50']} | {o['latency_ms_p95']} | {o['tokens_per_s']:,} |")
    for t in tgen:
        print(f"| {t['call']} | PyTorch (bf16 autocast) | recompute prefix | {t['batch']} | {t['latency_ms_median']} | {t['latency_ms_max']} | {t['tokens_per_s']:,} |")
for o in ours:
    if o.get("kind") == "cache_speedup":
        print(f"\nKey/value cache against recomputing the prefix, batch 1 (call {o['call']}): "
              f"{o['ratio_p50']}x (median of {o['pairs']} pairs, slowest {o['ratio_min']}x).")
for e in [t for t in torch if "error" in t]:
    print(f"\nFailed (call {e['call']}): {e['error']}")
