"""The Markdown report of bench/gpu_table.sh: `python3 bench/gpu_table.py PEAK table.jsonl
machine.txt`. Ratios are per round (ours and PyTorch measured in the same round, minutes
apart on the same GPU), then the median over rounds."""
import json
import statistics
import sys

peak = float(sys.argv[1])
rows = [json.loads(line) for line in open(sys.argv[2]) if line.startswith("{")]
machine = open(sys.argv[3]).read().strip().splitlines()

TORCH_NAMES = {"mini-8m": "mini", "seed-512": "spec512"}
ours = [r for r in rows if r.get("engine") == "burn" and "tokens_per_s" in r]
for r in ours:
    # The 2026-11-27 calls named the warm `mini` fp32 run `all` (every GPU choice on).
    if r["variant"] == "all":
        r["variant"] = "mini-fp32"
torch = [r for r in rows if r.get("engine") == "torch" and r.get("kind") == "train" and "tokens_per_s" in r]
version = next((r["torch"] for r in rows if r.get("kind") == "version"), "?")
failed = [r for r in rows if "exit" in r or r.get("skipped")]


def med(xs):
    return statistics.median(xs) if xs else None


# FLOPs per token of each preset, from our runs (the same count for both engines: 6 per
# parameter per token plus attention's products; the model is the same shape).
flops_per_token = {r["model"]: r["model_tflops_per_s"] * 1e12 / r["tokens_per_s"] for r in ours}


def torch_runs(model, amp):
    return {r["round"]: r for r in torch if TORCH_NAMES.get(r["model"]) == model and r["amp"] == amp}


def ours_runs(variant):
    return {r["round"]: r for r in ours if r["variant"] == variant and r["round"] != "cold"}


def ratio(mine, ref):
    """Median over rounds of ours / PyTorch within a round."""
    per = [mine[k]["tokens_per_s"] / ref[k]["tokens_per_s"] for k in mine if k in ref]
    return f"{med(per):.2f}x" if per else ""


def mfu(model, tokens_per_s):
    f = flops_per_token.get(model)
    return f"{100 * f * tokens_per_s / 1e12 / peak:.1f}%" if f else ""


print(f"GPU: {machine[0] if machine else '?'}; host: {', '.join(machine[1:])}; PyTorch {version}.")
print(f"\nTraining, batch 32, source 128 + target 128, vocab 8000; tokens/s per round; MFU "
      f"against {peak:.0f} TFLOP/s (dense bf16), one FLOP count for both engines. Ratios: "
      "ours over PyTorch in the same round, median over rounds. Warm-up: the first step of a "
      "run whose kernels are cached (median); cold: the first step with an empty cache, the "
      "cold runs side by side (the four (preset, precision) pairs, the `mini` variants from their first calls on).\n")
print("| model | engine | precision | tokens/s (each round) | median | step ms | MFU | "
      "vs PyTorch fp32 eager | vs PyTorch bf16 eager | warm-up s | cold warm-up s |")
print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
for model in ("mini", "spec512"):
    ref32, ref16 = torch_runs(model, False), torch_runs(model, True)
    for precision in ("fp32", "bf16"):
        variant = f"{model}-{precision}"
        runs = ours_runs(variant)
        cold = next((r for r in ours if r["round"] == "cold" and r["variant"] == variant), None)
        tps = [r["tokens_per_s"] for r in runs.values()]
        m = med(tps)
        each = ", ".join(f"{t:,.0f}" for t in tps) or "no run"
        print(f"| {model} | burn 0.21 cuda (ours) | {precision} | {each} | {m or 0:,.0f} | "
              f"{med([r['step_ms'] for r in runs.values()]) or 0:.1f} | {mfu(model, m) if m else ''} | "
              f"{ratio(runs, ref32)} | {ratio(runs, ref16)} | "
              f"{med([r['warmup_s'] for r in runs.values()]) or 0:.2f} | "
              f"{cold['warmup_s'] if cold else 'did not finish'} |")
    for amp, ref in ((False, ref32), (True, ref16)):
        tps = [r["tokens_per_s"] for r in ref.values()]
        m = med(tps)
        each = ", ".join(f"{t:,.0f}" for t in tps) or "no run"
        print(f"| {model} | PyTorch {version} | {'bf16 autocast eager' if amp else 'fp32 eager'} | "
              f"{each} | {m or 0:,.0f} | {med([r['step_ms'] for r in ref.values()]) or 0:.1f} | "
              f"{mfu(model, m) if m else ''} | | | | |")

# The other `mini` runs: each variant the rounds ran beside the default (`mini-fp32`).
presets = {f"{m}-{p}" for m in ("mini", "spec512") for p in ("fp32", "bf16")}
variants = ["mini-fp32"] + [v for v in dict.fromkeys(r["variant"] for r in ours) if v not in presets]
print("\n`mini` fp32, the default (`mini-fp32`) and the variants run beside it in the same rounds "
      "(2026-11-27's first calls: the GPU path's choices turned off through a variable since "
      "removed, then `run-ahead`, the host not waiting for each step, and `system-alloc`, "
      "glibc's allocator; since the evening of 2026-11-27 `no-fusion`, burn-fusion off; since "
      "2026-11-28 `burn-steps`, layer norm, softmax, dropout and loss composed by burn; since "
      "2026-12-06 `bf16-cast-each`, bf16 with each parameter cast by autodiff rather than all "
      "at once by the optimiser, to set beside `mini-bf16` above, and `burn-cat`, FlatAdamW's "
      "vectors laid end to end by burn's cat, a kernel per piece, not `end_to_end`'s one):\n")
print("| variant | tokens/s (each round) | median | vs `mini-fp32` | vs PyTorch fp32 eager | "
      "host CPU ms / step |")
print("|---|---|---:|---:|---:|---:|")
ref32 = torch_runs("mini", False)
default = ours_runs("mini-fp32")
for variant in variants:
    runs = ours_runs(variant)
    tps = [r["tokens_per_s"] for r in runs.values()]
    host = med([r["host_cpu_ms_per_step"] or 0 for r in runs.values()])
    print(f"| {variant} | {', '.join(f'{t:,.0f}' for t in tps) or 'no run'} | {med(tps) or 0:,.0f} | "
          f"{ratio(runs, default) if variant != 'mini-fp32' else ''} | {ratio(runs, ref32)} | "
          f"{host or 0:.0f} |")
# Mixed precision's two ways, same rounds: FlatAdamW's one cast (`mini-bf16`, the default)
# against each parameter cast by autodiff (`bf16-cast-each`).
one_cast, each = ours_runs("mini-bf16"), ours_runs("bf16-cast-each")
if one_cast and each:
    print(f"\n`mini` bf16 with the parameters cast at once (the default) against each cast by "
          f"autodiff: {ratio(one_cast, each)} (median over rounds of their ratio).")
for r in failed:
    what = "skipped (deadline)" if r.get("skipped") else f"exit {r['exit']} (124: time limit)"
    print(f"\n- round {r['round']}, {r['variant']}: {what}")
