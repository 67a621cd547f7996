"""Step-time ratio of two variants of a bench JSON, per depth: median, fastest, and per round.

    python benchmarks/ratio.py bench.json "ELA 50%" DIA        # ELA at 50 % pruned vs DIA (issue 8 target: < 1)
    python benchmarks/ratio.py bench.json plain torchvision    # our plain ResNet vs torchvision's (target: <= 1.02)

The per-round ratios pair the two variants' steps of the same round (bench interleaves the variants
within a round), so load that comes and goes hits both sides of each pair alike. "A faster in k of n
rounds" comes with the one-sided sign test's p-value: the chance of k or more such rounds if neither
variant were faster (each round a fair coin). It is the check that a lead is more than noise.
"""
import json
import math
import statistics
import sys

report = json.load(open(sys.argv[1]))
a_label, b_label = sys.argv[2], sys.argv[3]
keys = sorted({(r["depth"], r.get("memory_format", "contiguous")) for r in report["results"]})
for depth, layout in keys:
    same = [r for r in report["results"] if r["depth"] == depth and r.get("memory_format", "contiguous") == layout]
    a = next((r for r in same if r["variant"] == a_label), None)
    b = next((r for r in same if r["variant"] == b_label), None)
    if a is None or b is None:
        continue
    rounds = [x / y for x, y in zip(a["step_times_s"], b["step_times_s"])]
    k, n = sum(r < 1 for r in rounds), len(rounds)
    p = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    print(f"depth {depth}, {layout}: {a_label} / {b_label}: median {a['median_step_s'] / b['median_step_s']:.3f} "
          f"({1e3 * a['median_step_s']:.0f} / {1e3 * b['median_step_s']:.0f} ms), fastest {a['min_step_s'] / b['min_step_s']:.3f}, "
          f"per round median {statistics.median(rounds):.3f} [{min(rounds):.3f}, {max(rounds):.3f}]; "
          f"{a_label} faster in {k} of {n} rounds (sign test p = {p:.2g})")
