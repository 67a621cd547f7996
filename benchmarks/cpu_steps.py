"""Training-step CPU time of variants in both layouts, interleaved, on one thread: for a loaded machine.

    python benchmarks/cpu_steps.py 3 32 resnet110:nchw resnet110:cl resnet110_mrla_b:cl resnet110_ela:cl@0.5

Arguments: timed rounds, batch size, then MODEL:LAYOUT[@PRUNED_FRACTION] (LAYOUT: nchw or cl; the
fraction gives an ELA model an evenly spread mask, as `elanet bench` does). One warm-up round. Each
step is timed with time.thread_time(): with one intra-op thread, forward, backward (the CPU autograd
engine runs on the calling thread) and the SGD step all run on this thread, so time the scheduler
gives to other processes is not counted. Prints the median, min and max in ms.
"""
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import elanet
from elanet.bench import spread_mask

torch.set_num_threads(1)
rounds, batch = int(sys.argv[1]), int(sys.argv[2])
runs = {}
for spec in sys.argv[3:]:
    name, _, rest = spec.partition(":")
    layout, _, fraction = rest.partition("@")
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    torch.manual_seed(0)
    model = elanet.create_model(name, drop_path=0.2).train().to(memory_format=fmt)
    if fraction:
        elanet.set_mask(model, spread_mask(model, float(fraction)))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g)
    runs[spec] = (model, opt, x, y)

times = {s: [] for s in runs}
order = list(runs)
for r in range(rounds + 1):
    random.shuffle(order)
    for s in order:
        model, opt, x, y = runs[s]
        t = time.thread_time()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if r:
            times[s].append(time.thread_time() - t)
for s, v in times.items():
    print(f"{s:32s} median {1e3 * statistics.median(v):7.1f}  min {1e3 * min(v):7.1f}  max {1e3 * max(v):7.1f}")
