"""One attention module at stage-1 size, native kernels on against off, interleaved in one process.

    python benchmarks/kernels_module.py --threads 2 --module mrla_l

Times the forward and the backward of one MRLA-L module (or one MRLA-B module's first retrieval
with ``--module mrla_b``) on ``[64, 64, 32, 32]`` channels-last inputs with DropPath 0.2, switching
the kernels on and off every call; prints the median of each over ``--rounds`` rounds.
"""
import argparse
import statistics
import time

import torch

import elanet.kernels as kernels
from elanet.attention import MRLABase, MRLALight
from elanet.attention.aggregate import LayerMemory
from elanet.runtime import keep_freed_memory

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--module", choices=["mrla_l", "mrla_b"], default="mrla_l")
parser.add_argument("--rounds", type=int, default=7)
args = parser.parse_args()

keep_freed_memory()
torch.set_num_threads(args.threads)
lib = kernels.epilogue_lib()
if lib is None:
    raise SystemExit(f"the native kernels are unavailable here: {kernels.build_error()}")

b, c, h = 64, 64, 32
cl = lambda: torch.randn(b, c, h, h).contiguous(memory_format=torch.channels_last)  # noqa: E731
x, identity, upstream = cl().requires_grad_(), cl().requires_grad_(), cl()
if args.module == "mrla_l":
    attn = MRLALight(c, head_dim=32, drop_path=0.2).train()
    run = lambda: attn(x, identity)  # noqa: E731
else:
    attn = MRLABase(c, head_dim=32, drop_path=0.2).train()
    run = lambda: attn(x, identity, LayerMemory(capacity=4))  # noqa: E731

times = {(mode, part): [] for mode in ("on", "off") for part in ("forward", "backward")}
for r in range(args.rounds + 1):
    for mode in ("on", "off"):
        kernels._lib = lib if mode == "on" else None
        t0 = time.perf_counter()
        out = run()
        t1 = time.perf_counter()
        out.backward(upstream)
        t2 = time.perf_counter()
        if r:
            times[(mode, "forward")].append(t1 - t0)
            times[(mode, "backward")].append(t2 - t1)
kernels._lib = lib
for (mode, part), ts in times.items():
    print(f"{args.module} {mode:3s} {part:8s} {1e3 * statistics.median(ts):7.2f} ms")
