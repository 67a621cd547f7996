"""CPU training-step speed-up of torch.compile (inductor) over eager, per variant, interleaved.

    PYTHONPATH=src python benchmarks/compile_speedup.py --depths 56 110 --variants plain mrla_b ela \
        --fraction 0.5 --batch-size 32 --steps 7 --out compile.json

Each variant is built twice from the same seed, eager and ``torch.compile``d; the first (warm-up)
rounds compile. Timed rounds then run one training step of every (variant, mode) pair in a shuffled
order, so load from other processes falls on all alike. Prints the median step times and the
speed-up (eager median / compiled median) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from elanet.bench import Variant, _ela_variant, _Runner, spread_mask
from elanet.models import create_model

p = argparse.ArgumentParser()
p.add_argument("--depths", type=int, nargs="+", default=[56, 110])
p.add_argument("--variants", nargs="+", default=["plain", "mrla_b", "ela"])
p.add_argument("--fraction", type=float, default=0.5, help="pruned fraction of the ELA variant")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--steps", type=int, default=7)
p.add_argument("--warmup", type=int, default=2, help="untimed rounds (the first compiles)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--timer", choices=["wall", "thread"], default="wall",
               help="step time: wall clock, or this thread's CPU time (robust to other processes' load; use with --threads 1)")
p.add_argument("--compile-threads", type=int, default=None, help="inductor compile workers (1: compile in-process)")
p.add_argument("--out", default="compile.json")
args = p.parse_args()
torch.set_num_threads(args.threads)
torch._dynamo.config.recompile_limit = 64
if args.compile_threads is not None:
    torch._inductor.config.compile_threads = args.compile_threads
clock = time.thread_time if args.timer == "thread" else time.perf_counter
load_start = os.getloadavg()

variants = []
for d in args.depths:
    for v in args.variants:
        if v == "ela":
            name = f"resnet{d}_ela"
            variants.append(_ela_variant(create_model(name), name, f"ELA {100 * args.fraction:g}%",
                                         spread_mask(create_model(name), args.fraction)))
        else:
            name = f"resnet{d}" + ("" if v == "plain" else f"_{v}")
            variants.append(Variant(name, d, {"plain": "plain", "mrla_b": "MRLA-B", "mrla_l": "MRLA-L"}[v]))

runners = {(i, mode): _Runner(v, num_classes=10, drop_path=0.2, device=torch.device("cpu"), seed=0, compile=mode == "compiled")
           for i, v in enumerate(variants) for mode in ("eager", "compiled")}
g = torch.Generator().manual_seed(0)
x, y = torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch_size,), generator=g)

times = {k: [] for k in runners}
compile_s = {}
order, rng, start = list(runners), random.Random(0), time.perf_counter()
for r in range(args.warmup + args.steps):
    rng.shuffle(order)
    for k in order:
        t, wall, cpu = clock(), time.perf_counter(), time.process_time()
        runners[k].step(x, y)
        dt = clock() - t
        if r == 0 and k[1] == "compiled":
            compile_s[k[0]] = (time.perf_counter() - wall, time.process_time() - cpu)
        if r >= args.warmup:
            times[k].append(dt)
    print(f"round {r + 1}/{args.warmup + args.steps} done after {time.perf_counter() - start:.0f} s "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)

rows = []
for i, v in enumerate(variants):
    eager, comp = statistics.median(times[(i, "eager")]), statistics.median(times[(i, "compiled")])
    rows.append({"model": v.model, "variant": v.label, "eager_median_s": eager, "compiled_median_s": comp,
                 "speedup": eager / comp, "eager_times_s": times[(i, "eager")], "compiled_times_s": times[(i, "compiled")],
                 "first_compiled_step_wall_s": compile_s[i][0], "first_compiled_step_cpu_s": compile_s[i][1]})
    print(f"{v.model:<16} {v.label:<8} eager {1e3 * eager:8.0f} ms  compiled {1e3 * comp:8.0f} ms  "
          f"speed-up {eager / comp:5.2f}x  (first compiled step {compile_s[i][0]:.0f} s wall, {compile_s[i][1]:.0f} s CPU)")
with open(args.out, "w") as f:
    json.dump({"settings": vars(args), "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "results": rows}, f, indent=1)
