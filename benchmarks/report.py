"""The Markdown tables of RESULTS.md from a bench JSON: the results, the speed targets, MRLA-B's growth.

    python benchmarks/report.py benchmarks/results.json

overhead(v) = step(v) - step(plain) at the same depth. Targets, per depth:
  1. ELA with a fraction f of its prunable blocks pruned: overhead <= (1 - f) * overhead(MRLA-B) + 5 % of plain
  2. ELA with nothing pruned (outside a measurement window) within 5 % of MRLA-B
  3. accumulating the KL scores every step ('ELA 0% +KL') adds <= 5 % to 'ELA 0%'
  4. MRLA-L faster than MRLA-B
Each is judged on the median step time (the reported figure) and, as a check against load from other
processes, on the fastest step. Then MRLA-B's overhead over plain and how it grows with depth.
"""
import json
import sys

report = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results.json"))
results = [r for r in report["results"] if r.get("best_layout", True)]  # each variant in its faster layout
depths = sorted({r["depth"] for r in results})
rows = []


def get(depth, label):
    return next((r for r in results if r["depth"] == depth and r["variant"] == label), None)


print("| model | variant | pruned | median step ms | fastest ms | x plain | x MRLA-B | overhead ms | peak MB | x MRLA-B | GMACs |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in results:
    plain, base = get(r["depth"], "plain"), get(r["depth"], "MRLA-B")
    t, mem = r["median_step_s"], r["peak_memory_bytes"]
    pruned = "-" if r["pruned_fraction"] is None else f"{100 * r['pruned_fraction']:.0f} %"
    vs_plain = f"{t / plain['median_step_s']:.2f} | " if plain else "- | "
    vs_base = f"{t / base['median_step_s']:.2f} | " if base else "- | "
    over = f"{1e3 * (t - plain['median_step_s']):+.0f} | " if plain else "- | "
    mem_base = f"{mem / base['peak_memory_bytes']:.2f} | " if base else "- | "
    print(f"| {r['model']} | {r['variant']} | {pruned} | {1e3 * t:.0f} | {1e3 * r['min_step_s']:.0f} | {vs_plain}{vs_base}{over}"
          f"{mem / 2**20:.0f} | {mem_base}{r['gmacs']:.4f} |")
print()


for stat, pick in (("median", lambda r: r["median_step_s"]), ("fastest", lambda r: min(r["step_times_s"]))):
    for d in depths:
        plain, base = get(d, "plain"), get(d, "MRLA-B")
        if plain is None or base is None:
            continue
        t_plain, over_b = pick(plain), pick(base) - pick(plain)
        for r in results:
            if r["depth"] != d or not r["variant"].startswith("ELA") or r["measure_kl"] or r["pruned_fraction"] in (None, 0.0):
                continue
            f = r["pruned_fraction"]
            bound = (1 - f) * over_b + 0.05 * t_plain
            got = pick(r) - t_plain
            rows.append((stat, d, f"{r['variant']} (f={f:.2f}): overhead <= (1-f)*overhead(MRLA-B) + 5% plain", f"{1e3 * got:.0f} ms", f"<= {1e3 * bound:.0f} ms", got <= bound))
        ela0, kl, light = get(d, "ELA 0%"), get(d, "ELA 0% +KL"), get(d, "MRLA-L")
        if ela0 is not None:
            rel = pick(ela0) / pick(base) - 1
            rows.append((stat, d, "ELA 0% within 5% of MRLA-B", f"{100 * rel:+.1f} %", "within ±5 %", abs(rel) <= 0.05))
        if ela0 is not None and kl is not None:
            rel = pick(kl) / pick(ela0) - 1
            rows.append((stat, d, "KL accumulation adds <= 5% to ELA 0%", f"{100 * rel:+.1f} %", "<= +5 %", rel <= 0.05))
        if light is not None:
            rel = pick(light) / pick(base) - 1
            rows.append((stat, d, "MRLA-L faster than MRLA-B", f"{100 * rel:+.1f} %", "< 0 %", rel < 0))

print("| step time | depth | target | measured | bound | met |")
print("|---|---|---|---|---|---|")
for stat, d, what, got, bound, ok in rows:
    print(f"| {stat} | {d} | {what} | {got} | {bound} | {'yes' if ok else '**no**'} |")

print("\nMRLA-B overhead over plain (median step):\n")
print("| depth | MRLA-B blocks | plain ms | MRLA-B ms | overhead ms | overhead / plain | overhead per block ms |")
print("|---|---|---|---|---|---|---|")
over = {}
for d in depths:
    plain, base = get(d, "plain"), get(d, "MRLA-B")
    if plain is None or base is None:
        continue
    blocks = get(d, "ELA 0%")["active_ela_blocks"] if get(d, "ELA 0%") else None
    over[d] = base["median_step_s"] - plain["median_step_s"]
    per = f"{1e3 * over[d] / blocks:.1f}" if blocks else "-"
    print(f"| {d} | {blocks or '-'} | {1e3 * plain['median_step_s']:.0f} | {1e3 * base['median_step_s']:.0f} | {1e3 * over[d]:.0f} | {over[d] / plain['median_step_s']:.2f} | {per} |")
if len(over) > 1:
    lo, hi = min(over), max(over)
    print(f"\nfrom ResNet-{lo} to ResNet-{hi}: overhead x{over[hi] / over[lo]:.2f} for x{(hi - 2) / (lo - 2):.2f} the blocks")
