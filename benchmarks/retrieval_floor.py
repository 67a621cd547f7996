"""How far ELA's attention branch is from its memory-traffic floor: bytes it must move against the time it takes.

    python benchmarks/retrieval_floor.py [--model resnet110_ela --pruned 0.5 --batch-size 32 --threads 2]

Issue 13 asks, where a target is missed, for where the time goes and how far it is from the
retrieval's memory-traffic floor. This script measures the three things that answer it, in one process:

1. the machine's streaming bandwidth at the given threads: ``torch.add(a, b, out=c)`` and
   ``c.copy_(a)`` on 256 MiB float32 tensors (bytes read + written per second);
2. ``torch.profiler`` over training steps of the channels-last model: the time of the value
   convolution (``_ValuePool``), the retrieval with its fused BN + ReLU + DropPath + add epilogue
   (``_RetrieveNative``), and their backward passes;
3. the value-sized transfers each of those must make, counted per active block from the kernels
   (``attention/aggregate.py``, ``attention/depthwise.py``, ``kernels/``), for block t of the N active
   blocks of a stage:
   - value convolution: forward reads x, writes v (2); backward reads v's gradient, x and the
     output's gradient, writes x's gradient (4);
   - retrieval + epilogue: forward reads the t stored values, writes o, reads o and x, writes the
     output (t + 4); backward reads o and the output's gradient for BN's sums (2), then in one pass
     the t values, the gradient and o, the N - t later blocks' kept gradients, and writes its kept
     gradient and v's gradient (N + 4): N + 6 in all.
   The retrieval's part is the algorithm's own floor (SPEC §2, eq. 5): every stored value is read by
   each later block forward, and its gradient sums the gradients of every later block.

It prints the bytes, the time they take at the measured bandwidth, and the profiled time.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import elanet
from elanet.bench import spread_mask
from elanet.pruning import ela_blocks
from elanet.runtime import keep_freed_memory

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="resnet110_ela")
p.add_argument("--pruned", type=float, default=0.5, help="pruned fraction of the prunable blocks (evenly spread)")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--steps", type=int, default=3, help="profiled steps, after 2 warm-up steps")
args = p.parse_args()
torch.set_num_threads(args.threads)
keep_freed_memory()  # as elanet bench and elanet train run

# 1. streaming bandwidth
a, b, c = (torch.rand(64 * 2**20) for _ in range(3))  # 256 MiB each
bw = {}
for name, fn, nbytes in (("add (2 reads, 1 write)", lambda: torch.add(a, b, out=c), 3 * a.nbytes),
                         ("copy (1 read, 1 write)", lambda: c.copy_(a), 2 * a.nbytes)):
    fn()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    bw[name] = nbytes / statistics.median(ts) / 1e9
    print(f"bandwidth, {name}: {bw[name]:.1f} GB/s (median of 7, {args.threads} threads)")
gbs = max(bw.values())
del a, b, c

# 2. the profile
torch.manual_seed(0)
info = elanet.model_info(args.model)
model = elanet.create_model(args.model, drop_path=0.2).train().to(memory_format=torch.channels_last)
elanet.set_mask(model, spread_mask(model, args.pruned))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
x = torch.randn(args.batch_size, *info["input_size"]).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, info["num_classes"], (args.batch_size,))


def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


step()
step()
t0 = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
        step()
wall = (time.perf_counter() - t0) / args.steps
ms = {e.key: e.cpu_time_total / args.steps / 1e3 for e in prof.key_averages()}

# 3. the transfers, from the active blocks of each stage and their value sizes
shapes = {}


def keep_shape(i):
    def hook(module, inputs):
        shapes.setdefault(i, inputs[0].shape)
    return hook


hooks = [m.register_forward_pre_hook(keep_shape(i)) for i, m in enumerate(ela_blocks(model))]
with torch.no_grad():
    model.eval()(x[:1])
model.train()
for h in hooks:
    h.remove()
stages = {}
for i, m in enumerate(ela_blocks(model)):
    if m.active:
        stages.setdefault(m.stage_index, []).append(shapes[i][1:].numel() * args.batch_size * 4)  # bytes of one value
counts = {"value conv fwd": 0.0, "value conv bwd": 0.0, "retrieval + epilogue fwd": 0.0, "retrieval + epilogue bwd": 0.0}
for s, sizes in sorted(stages.items()):
    n, v = len(sizes), sizes[0]
    print(f"stage {s + 1}: {n} active blocks, a value is {v / 2**20:.0f} MiB")
    for t in range(1, n + 1):
        counts["value conv fwd"] += 2 * v
        counts["value conv bwd"] += 4 * v
        counts["retrieval + epilogue fwd"] += (t + 4) * v
        counts["retrieval + epilogue bwd"] += (n + 6) * v
ops = {"value conv fwd": "_ValuePool", "value conv bwd": "_ValuePoolBackward",
       "retrieval + epilogue fwd": "_RetrieveNative", "retrieval + epilogue bwd": "_RetrieveNativeBackward"}
print(f"\n{args.model}, {args.pruned:g} pruned, batch {args.batch_size}, {args.threads} threads, channels-last: "
      f"{1e3 * wall:.0f} ms per profiled step; floor at {gbs:.1f} GB/s\n")
print("| part | GB moved per step | floor ms | profiled ms | profiled / floor |\n|---|---:|---:|---:|---:|")
tot_f = tot_p = 0.0
for part, nbytes in counts.items():
    floor, got = nbytes / gbs / 1e6, ms.get(ops[part], float("nan"))
    tot_f, tot_p = tot_f + floor, tot_p + got
    print(f"| {part} (`{ops[part]}`) | {nbytes / 1e9:.2f} | {floor:.1f} | {got:.1f} | {got / floor:.2f} |")
print(f"| all four | {sum(counts.values()) / 1e9:.2f} | {tot_f:.1f} | {tot_p:.1f} | {tot_p / tot_f:.2f} |")
