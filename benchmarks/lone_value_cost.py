"""What the blocks ELA never prunes cost an exported model at batch 1, part by part, in one process.

    PYTHONPATH=src python benchmarks/lone_value_cost.py [--depth 56 --rounds 60 --threads 2]

A fully pruned ELA model keeps the first block of every stage (SPEC §3); exported, each of them is
``x + ReLU(conv_v'(x))`` (``elanet.export.LoneValue``: a depthwise 3x3 with the BN folded in). Issue
10 allows a fully pruned export 5 % of plain over plain. This script times the plain model beside
copies of the exported ELA 100 % model whose lone blocks compute less and less:

- ``as exported``: ``elanet.export.LoneValue`` run eagerly, ``x + ReLU(conv_v'(x))`` in one pass of
  the native kernel (``elanet_dw_forward`` with ``lone``) where it is built;
- ``ATen ops``: the same as the three operators the exported graph holds (conv, ReLU, add);
- ``prepacked``: the same through oneDNN's fused conv + ReLU with the weight reordered once
  (``torch.ops.mkldnn._convolution_pointwise``; not exportable to ONNX), plus the add;
- ``conv only``: ``conv_v'(x)`` computed and dropped, the block returns ``x``;
- ``tiny conv``: a depthwise 3x3 on a ``[1, 8, 4, 4]`` tensor, dropped: what one oneDNN call costs
  whatever its size, the floor of any exported form that keeps the convolution as one operator;
- ``add + relu``: ``x + ReLU(x)``, no convolution;
- ``nothing``: the block returns ``x`` (the plain model with extra Python calls).

Every round runs every model 64 times at batch 1, channels-last, in a shuffled order. Printed per
model: the median time per forward, its median excess over plain with the interquartile range of
the per-round excess, and the allowance.
"""
import argparse
import copy
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from elanet import create_model
from elanet.bench import spread_mask
from elanet.export import LoneValue, inference_model
from elanet.pruning import set_mask
from elanet.runtime import keep_freed_memory

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--depth", type=int, default=56)
p.add_argument("--rounds", type=int, default=60)
p.add_argument("--reps", type=int, default=64, help="forwards per sample")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.set_num_threads(args.threads)
keep_freed_memory()  # as elanet bench runs
torch.manual_seed(0)
cl = torch.channels_last

plain = create_model(f"resnet{args.depth}").eval().to(memory_format=cl)
ela = create_model(f"resnet{args.depth}_ela").eval()
set_mask(ela, spread_mask(ela, 1.0))
ela = inference_model(ela).to(memory_format=cl)
lone = [m for m in ela.modules() if isinstance(m, LoneValue)]
print(f"resnet{args.depth}_ela 100 % pruned, exported: {len(lone)} lone blocks, "
      f"value convs {[tuple(m.conv_v.weight.shape) for m in lone]}")


class Part(nn.Module):
    """A lone block computing only part of its work; it attaches where LoneValue does."""

    position, takes_state = "output", True

    def __init__(self, conv: nn.Conv2d, what: str) -> None:
        super().__init__()
        self.conv, self.what = conv, what
        self.tiny = torch.randn(1, 8, 4, 4).contiguous(memory_format=cl)
        self.tiny_w = torch.randn(8, 1, 3, 3)

    def forward(self, x, identity, memory):
        if self.what == "ATen ops":
            return x + F.relu(self.conv(x), inplace=True)
        if self.what == "prepacked":
            c = self.conv
            if not hasattr(self, "packed"):  # once, at the first call's input shape
                self.packed = torch.ops.mkldnn._reorder_convolution_weight(c.weight.detach(), [1, 1], [1, 1], [1, 1], c.groups,
                                                                           list(x.shape))
            return x + torch.ops.mkldnn._convolution_pointwise(x, self.packed, c.bias, [1, 1], [1, 1], [1, 1], c.groups, "relu",
                                                               [], "")
        if self.what == "conv only":
            self.conv(x)
        elif self.what == "tiny conv":
            F.conv2d(self.tiny, self.tiny_w, padding=1, groups=8)
        elif self.what == "add + relu":
            return x + F.relu(x)
        return x


models = {"plain": plain, "as exported": ela}
parts = ("prepacked",) if torch.backends.mkldnn.is_available() else ()
for what in ("ATen ops", *parts, "conv only", "tiny conv", "add + relu", "nothing"):
    m = copy.deepcopy(ela)
    for block in m.modules():
        if isinstance(getattr(block, "attn", None), LoneValue):
            block.attn = Part(block.attn.conv_v, what)
    models[what] = m

x = torch.randn(1, 3, 32, 32).contiguous(memory_format=cl)
times = {k: [] for k in models}
order = list(models)
with torch.inference_mode():
    for m in models.values():  # warm-up
        for _ in range(8):
            m(x)
    for r in range(args.rounds):
        random.shuffle(order)
        for k in order:
            t = time.perf_counter()
            for _ in range(args.reps):
                models[k](x)
            times[k].append((time.perf_counter() - t) / args.reps * 1e3)

base = statistics.median(times["plain"])
print(f"\n{args.rounds} rounds x {args.reps} forwards, batch 1, channels-last, {args.threads} threads")
print(f"allowance (issue 10, f = 1): 5 % of plain = {0.05 * base:.3f} ms\n")
print("| lone blocks compute | ms / forward | + ms over plain, median [q25, q75] of the rounds |")
print("|---|---:|---|")
for k, ts in times.items():
    excess = sorted(t - p for t, p in zip(ts, times["plain"]))
    q = statistics.quantiles(excess, n=4) if len(excess) > 1 else [excess[0]] * 3
    print(f"| {k} | {statistics.median(ts):.3f} | {statistics.median(excess):+.3f} [{q[0]:+.3f}, {q[2]:+.3f}] |")
