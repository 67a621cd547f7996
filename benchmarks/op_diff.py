"""Where one variant's training step spends more time than another's: per-operator wall time, side by side.

    python benchmarks/op_diff.py resnet110_dia resnet110_ela@0.5 --threads 2 --batch-size 64

Every aten call of a training step (forward, backward, SGD step) is timed with a TorchDispatchMode
(wall time around the call, so the threads the op uses are included; about 0.04 ms per call, 15-25 % of a step, and no
profiler). Rows group calls by operator and first-argument shape, averaged over --steps steps after
two warm-up steps, and are sorted by how much more time the second model spends there. MODEL@F
gives an ELA model an evenly spread mask with a fraction F of its prunable blocks pruned.
"""
import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import elanet
from elanet.bench import spread_mask
from elanet.runtime import keep_freed_memory

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("models", nargs=2, help="two registered model names, MODEL or MODEL@PRUNED_FRACTION")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
parser.add_argument("--rows", type=int, default=30)
args = parser.parse_args()
torch.set_num_threads(args.threads)
keep_freed_memory()  # as `elanet train` and `elanet bench` run
fmt = getattr(torch, args.layout if args.layout == "channels_last" else "contiguous_format")


class OpTimes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ms, self.calls = defaultdict(float), defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        a = args[0] if args else None
        a = a[0] if isinstance(a, (list, tuple)) and a else a
        key = (str(func).removeprefix("aten.").removesuffix(".default"), tuple(a.shape) if isinstance(a, torch.Tensor) else ())
        self.ms[key] += 1e3 * (time.perf_counter() - t)
        self.calls[key] += 1
        return out


per_model = []
for spec in args.models:
    name, _, fraction = spec.partition("@")
    torch.manual_seed(0)
    model = elanet.create_model(name, drop_path=0.2).train().to(memory_format=fmt)
    if fraction:
        elanet.set_mask(model, spread_mask(model, float(fraction)))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)
    info = elanet.model_info(name)
    x = torch.randn(args.batch_size, *info["input_size"]).contiguous(memory_format=fmt)
    y = torch.randint(0, info["num_classes"], (args.batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step(), step()
    times = OpTimes()
    with times:
        for _ in range(args.steps):
            step()
    per_model.append(({k: v / args.steps for k, v in times.ms.items()}, {k: c / args.steps for k, c in times.calls.items()}))
    print(f"{spec}: {sum(times.ms.values()) / args.steps:.0f} ms of aten calls per step")

(a_ms, a_n), (b_ms, b_n) = per_model
keys = sorted(set(a_ms) | set(b_ms), key=lambda k: a_ms.get(k, 0) - b_ms.get(k, 0))
print(f"\n{'+ms':>8} {'ms A':>8} {'calls':>6} {'ms B':>8} {'calls':>6}  operator, first input shape   (A = {args.models[0]}, B = {args.models[1]})")
for k in keys[: args.rows]:
    print(f"{b_ms.get(k, 0) - a_ms.get(k, 0):8.1f} {a_ms.get(k, 0):8.1f} {a_n.get(k, 0):6.0f} {b_ms.get(k, 0):8.1f} {b_n.get(k, 0):6.0f}  {k[0]} {list(k[1])}")
print(f"{sum(b_ms.values()) - sum(a_ms.values()):8.1f} in all")
