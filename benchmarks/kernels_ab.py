"""Native CPU kernels on against off: the same models' training steps, side by side in one process.

    python benchmarks/kernels_ab.py --threads 2 --batch-size 64 --rounds 8 resnet110_mrla_b resnet110_mrla_l resnet110_ela@0.5

Each round runs one SGD step of every model with elanet's native kernels (kernels/epilogue.c) and
one without (the PyTorch operators), in that order, so both see the same machine state. MODEL@F
gives an ELA model an evenly spread mask with a fraction F of its prunable blocks pruned. Prints the
median step time of each and the median, min and max of the per-round on/off ratio.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import elanet
import elanet.kernels as kernels
from elanet.bench import spread_mask
from elanet.runtime import keep_freed_memory

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("models", nargs="+", help="registered model names, MODEL or MODEL@PRUNED_FRACTION")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--rounds", type=int, default=8, help="timed rounds, after one warm-up round")
args = parser.parse_args()

keep_freed_memory()
torch.set_num_threads(args.threads)
lib = kernels.epilogue_lib()
if lib is None:
    raise SystemExit(f"the native kernels are unavailable here: {kernels.build_error()}")

steps = {}
for spec in args.models:
    name, _, fraction = spec.partition("@")
    model = elanet.create_model(name, drop_path=0.2).train().to(memory_format=torch.channels_last)
    if fraction:
        elanet.set_mask(model, spread_mask(model, float(fraction)))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)
    info = elanet.model_info(name)
    x = torch.randn(args.batch_size, *info["input_size"]).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, info["num_classes"], (args.batch_size,))

    def step(model=model, opt=opt, x=x, y=y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    steps[spec] = step

times = {(spec, mode): [] for spec in steps for mode in ("on", "off")}
for r in range(args.rounds + 1):
    for spec, step in steps.items():
        for mode in ("on", "off"):
            kernels._lib = lib if mode == "on" else None  # off: every fused path falls back to PyTorch operators
            t0 = time.perf_counter()
            step()
            if r:
                times[(spec, mode)].append(time.perf_counter() - t0)
    print(f"round {r}/{args.rounds} {'(warm-up) ' if r == 0 else ''}done", flush=True)
kernels._lib = lib

print(f"\n{args.threads} threads, batch {args.batch_size}, channels-last, {args.rounds} rounds")
print(f"{'model':26s} {'on ms':>8s} {'off ms':>8s}  on/off median [min, max]")
for spec in steps:
    on, off = times[(spec, "on")], times[(spec, "off")]
    ratios = [a / b for a, b in zip(on, off)]
    print(f"{spec:26s} {1e3 * statistics.median(on):8.0f} {1e3 * statistics.median(off):8.0f}  "
          f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]")
