"""Eval forward (batch 1 by default) of the exported ELA before and after the inference forms, in thread CPU time.

    PYTHONPATH=src python benchmarks/infer_forms.py --depth 56 --rounds 10 --out infer_forms56.json

"strip+fold" is the exported model as it was (pruned attention removed, a lone block's BN folded:
``fold_attention_bn(strip_pruned(m))``); "inference" is what ``elanet export`` writes now
(``inference_model(m)``: lone blocks as ``x + ReLU(conv_v'(x))``, the others with the fused query /
key conv). Plain and MRLA-B give the issue's limit: overhead <= (1 - f) x overhead(MRLA-B) + 5 % of plain.
Every round runs every model (64 images per sample: 64 forwards at batch 1) in a shuffled order; times are this thread's
CPU time per forward, so other processes' load inflates them less than wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from elanet import create_model
from elanet.bench import spread_mask
from elanet.export import fold_attention_bn, inference_model, strip_pruned
from elanet.pruning import set_mask

p = argparse.ArgumentParser()
p.add_argument("--depth", type=int, default=56)
p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 1.0])
p.add_argument("--rounds", type=int, default=10)
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--out", default="infer_forms.json")
args = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)

models = {"plain": create_model(f"resnet{args.depth}").eval(), "MRLA-B": create_model(f"resnet{args.depth}_mrla_b").eval()}
for f in args.fractions:
    ela = create_model(f"resnet{args.depth}_ela").eval()
    set_mask(ela, spread_mask(ela, f))
    models[f"ELA {100 * f:g}% strip+fold"] = fold_attention_bn(strip_pruned(ela))
    models[f"ELA {100 * f:g}% inference"] = inference_model(ela)

x, reps = torch.randn(args.batch_size, 3, 32, 32), max(1, 64 // args.batch_size)
times = {k: [] for k in models}
order, rng, load = list(models), random.Random(0), [os.getloadavg()[0]]
with torch.inference_mode():
    for r in range(args.rounds + 1):  # the first round warms up
        rng.shuffle(order)
        for k in order:
            t = time.thread_time()
            for _ in range(reps):
                models[k](x)
            if r:
                times[k].append((time.thread_time() - t) / reps)
        load.append(os.getloadavg()[0])

med = {k: statistics.median(v) for k, v in times.items()}
plain, base = med["plain"], med["MRLA-B"]
rows = []
for k, v in times.items():
    f = next((f for f in args.fractions if k.startswith(f"ELA {100 * f:g}% ")), None)
    limit = None if f is None else (1 - f) * (base - plain) + 0.05 * plain
    rows.append({"variant": k, "pruned_fraction": f, "median_ms": 1e3 * med[k], "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v),
                 "overhead_ms": 1e3 * (med[k] - plain), "limit_ms": None if limit is None else 1e3 * limit,
                 "met": None if limit is None else med[k] - plain <= limit})
    r = rows[-1]
    print(f"{k:<24} {r['median_ms']:7.2f} ms ({r['min_ms']:.2f}-{r['max_ms']:.2f})  +{r['overhead_ms']:6.2f}"
          + ("" if limit is None else f"  limit +{r['limit_ms']:.2f}  {'met' if r['met'] else 'missed'}"))
print(f"1-minute load average {min(load):.1f}-{max(load):.1f}")
with open(args.out, "w") as fh:
    json.dump({"settings": vars(args), "torch": torch.__version__, "loadavg_1min": load, "results": rows}, fh, indent=1)
