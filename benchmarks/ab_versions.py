"""A/B of two elanet versions in one process: training steps of the same models, interleaved per round.

    cp -r OLD_CHECKOUT/src/elanet /tmp/pkg/elanet_old
    PYTHONPATH=src:/tmp/pkg python benchmarks/ab_versions.py elanet_old resnet56_mrla_b resnet56 --rounds 6
    PYTHONPATH=src:/tmp/pkg python benchmarks/ab_versions.py elanet_old resnet110_mrla_l resnet110 --channels-last --cpu-time
    PYTHONPATH=src:/tmp/pkg python benchmarks/ab_versions.py elanet_old resnet110_ela@0.5 --channels-last --threads 2 --batch-size 64

``NAME@F`` is an ELA model with a fraction F of its prunable blocks pruned (the bench's evenly spread mask).

The old copy imports itself relatively, so it loads under another name beside the current ``elanet``.
Both builds get the same seed, batch and optimiser; each round runs every (version, model) once in a
shuffled order. Prints per model: median step of each version, their ratio and the per-round ratios.
"""
import argparse
import importlib
import random
import statistics
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("old", help="importable name of the other elanet copy, e.g. elanet_old")
p.add_argument("models", nargs="+")
p.add_argument("--rounds", type=int, default=6)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--channels-last", action="store_true", help="models and batch in channels-last")
p.add_argument("--cpu-time", action="store_true", help="time.thread_time() instead of wall time (loaded machine, 1 thread)")
args = p.parse_args()
fmt = torch.channels_last if args.channels_last else torch.contiguous_format
clock = time.thread_time if args.cpu_time else time.perf_counter
torch.set_num_threads(args.threads)
versions = {"new": importlib.import_module("elanet"), "old": importlib.import_module(args.old)}
runs = {}
for v, lib in versions.items():
    for name in args.models:
        torch.manual_seed(0)
        model, _, fraction = name.partition("@")
        m = lib.create_model(model, drop_path=0.2).train().to(memory_format=fmt)
        if fraction:
            lib.set_mask(m, importlib.import_module(f"{lib.__name__}.bench").spread_mask(m, float(fraction)))
        runs[v, name] = (m, torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4))
g = torch.Generator().manual_seed(0)
x, y = torch.randn(args.batch_size, 3, 32, 32, generator=g).contiguous(memory_format=fmt), torch.randint(0, 10, (args.batch_size,), generator=g)
times = {k: [] for k in runs}
order, rng = list(runs), random.Random(0)
for r in range(args.rounds + 1):
    rng.shuffle(order)
    for k in order:
        m, opt = runs[k]
        t = clock()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        if r:
            times[k].append(clock() - t)
for name in args.models:
    new, old = times["new", name], times["old", name]
    per_round = [a / b for a, b in zip(new, old)]
    print(f"{name}: new {statistics.median(new):.3f} s, old {statistics.median(old):.3f} s, new/old {statistics.median(new) / statistics.median(old):.3f}; "
          f"per round median {statistics.median(per_round):.3f} [{min(per_round):.3f}, {max(per_round):.3f}]")
