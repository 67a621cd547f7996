"""elanet against the authors' code: training steps of the DLA repository's CIFAR models next to ours.

    git clone https://github.com/tunantu/Dynamic-Layer-Attention /path/to/dla   # pip install einops (their MRLA-B needs it)
    python benchmarks/vs_authors.py --dla-repo /path/to/dla [--depth 110 --batch-size 32 --rounds 12 --threads 2]

Users compare elanet with the code the papers ship. The DLA repository
(`image_classification/cifar/models/cifar/`) holds the authors' CIFAR DIA (`dia_resnet.py`),
MRLA-B (`mrla_base.py`) and MRLA-L (`mrla_light.py`); this script imports those files from the
given checkout (nothing of theirs is copied here) and times, in one process, interleaved in a
shuffled order every round:

- theirs: DIA, MRLA-B, MRLA-L;
- ours: plain, DIA, MRLA-B, MRLA-L, ELA with half of its prunable blocks pruned (evenly spread).

Every model is a bottleneck ResNet of the same depth on CIFAR-10 shape, trained one SGD step on a
fixed random batch (DropPath 0.2 on the attention branch where a model has one, as the paper trains),
in NCHW and in channels-last. The summary takes each model at its faster layout, as issue 13 does.
Their DIA creates its LSTM state with ``.cuda()``; on a CPU run that call is made a no-op for the
duration of the forward pass. Prints the table and ratios; ``--out FILE`` saves every step time as JSON.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from elanet.bench import spread_mask
from elanet.models import create_model
from elanet.pruning import set_mask
from elanet.runtime import keep_freed_memory

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--dla-repo", type=Path, required=True, help="a checkout of github.com/tunantu/Dynamic-Layer-Attention")
p.add_argument("--depth", type=int, default=110, help="bottleneck depth 9n+2 (56, 110, ...)")
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--rounds", type=int, default=12, help="timed rounds (one step of every model and layout each)")
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--out", type=Path, default=None)
args = p.parse_args()

src = args.dla_repo / "image_classification" / "cifar" / "models" / "cifar"
if not src.is_dir():
    sys.exit(f"{src} not found: pass --dla-repo the root of a Dynamic-Layer-Attention checkout")
if (args.depth - 2) % 9:
    sys.exit(f"--depth {args.depth} is not a bottleneck CIFAR depth (9n + 2): use 56 or 110")
torch.set_num_threads(args.threads)
malloc_keeps_freed = keep_freed_memory()  # as elanet bench and elanet train run


def authors(file: str, fn: str):
    spec = importlib.util.spec_from_file_location(f"dla_{file}", src / f"{file}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, fn)(depth=args.depth, num_classes=10, block_name="Bottleneck",
                               **({} if fn == "dia_resnet" else {"drop_path": 0.2}))


@contextlib.contextmanager
def cuda_calls_stay_on_cpu():
    """Their DIA moves its zero LSTM state with ``.cuda()``; on CPU keep it where it is."""
    if torch.cuda.is_available():
        yield
        return
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def ours(name: str, fraction: float | None = None):
    m = create_model(f"resnet{args.depth}{name}", num_classes=10, drop_path=0.2)
    if fraction is not None:
        set_mask(m, spread_mask(m, fraction))
    return m


builders = {
    ("authors", "DIA"): lambda: authors("dia_resnet", "dia_resnet"),
    ("authors", "MRLA-B"): lambda: authors("mrla_base", "mrla_base"),
    ("authors", "MRLA-L"): lambda: authors("mrla_light", "mrla_light"),
    ("elanet", "plain"): lambda: ours(""),
    ("elanet", "DIA"): lambda: ours("_dia"),
    ("elanet", "MRLA-B"): lambda: ours("_mrla_b"),
    ("elanet", "MRLA-L"): lambda: ours("_mrla_l"),
    ("elanet", "ELA 50%"): lambda: ours("_ela", 0.5),
}
layouts = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
g = torch.Generator().manual_seed(0)
x0 = torch.randn(args.batch_size, 3, 32, 32, generator=g)
y = torch.randint(0, 10, (args.batch_size,), generator=g)
cases = []
for (who, label), build in builders.items():
    for lname, fmt in layouts.items():
        torch.manual_seed(0)
        model = build().to(memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        params = sum(p.numel() for p in model.parameters())
        cases.append({"who": who, "variant": label, "layout": lname, "model": model, "opt": opt,
                      "x": x0.contiguous(memory_format=fmt), "params": params, "times": []})


def step(c):
    c["opt"].zero_grad(set_to_none=True)
    with cuda_calls_stay_on_cpu():
        loss = F.cross_entropy(c["model"](c["x"]), y)
    loss.backward()
    c["opt"].step()


order, rng = list(range(len(cases))), random.Random(0)
load = [os.getloadavg()[0]]
start = time.perf_counter()
for r in range(args.warmup + args.rounds):
    rng.shuffle(order)
    for i in order:
        t = time.perf_counter()
        step(cases[i])
        if r >= args.warmup:
            cases[i]["times"].append(time.perf_counter() - t)
    load.append(os.getloadavg()[0])
    print(f"round {r + 1}/{args.warmup + args.rounds} done after {time.perf_counter() - start:.0f} s", file=sys.stderr)

best = {}
print(f"\nResNet-{args.depth} (bottleneck, CIFAR-10 shape), batch {args.batch_size}, {args.threads} threads, "
      f"{args.rounds} timed rounds, 1-min load {min(load):.1f}-{max(load):.1f}, malloc keeps freed: {malloc_keeps_freed}\n")
print("| code | variant | layout | params | median ms | min-max ms |\n|---|---|---|---:|---:|---|")
for c in cases:
    med = statistics.median(c["times"])
    print(f"| {c['who']} | {c['variant']} | {c['layout']} | {c['params']:,d} | {1e3 * med:.0f} | "
          f"{1e3 * min(c['times']):.0f}-{1e3 * max(c['times']):.0f} |")
    key = (c["who"], c["variant"])
    if key not in best or med < statistics.median(best[key]["times"]):
        best[key] = c


def ratio(a, b):
    """Median ratio and per-round ratios (both steps of a round share its load) of two cases."""
    ca, cb = best[a], best[b]
    rounds = [p / q for p, q in zip(ca["times"], cb["times"])]
    return (statistics.median(ca["times"]) / statistics.median(cb["times"]), statistics.median(rounds),
            min(rounds), max(rounds), sum(q < 1 for q in rounds), len(rounds), ca["layout"], cb["layout"])


print("\n| comparison (each at its faster layout) | medians | per round, median [min, max] | first faster in |\n|---|---:|---|---:|")
pairs = [(("elanet", "DIA"), ("authors", "DIA")), (("elanet", "MRLA-B"), ("authors", "MRLA-B")),
         (("elanet", "MRLA-L"), ("authors", "MRLA-L")), (("elanet", "ELA 50%"), ("authors", "DIA")),
         (("elanet", "ELA 50%"), ("elanet", "DIA")), (("authors", "DIA"), ("elanet", "plain")),
         (("elanet", "DIA"), ("elanet", "plain")), (("elanet", "ELA 50%"), ("elanet", "plain"))]
summary = []
for a, b in pairs:
    med, rmed, lo, hi, k, n, la, lb = ratio(a, b)
    print(f"| {a[0]} {a[1]} ({la}) / {b[0]} {b[1]} ({lb}) | {med:.3f} | {rmed:.3f} [{lo:.3f}, {hi:.3f}] | {k} of {n} |")
    summary.append({"a": list(a), "b": list(b), "median_ratio": med, "round_ratio_median": rmed, "round_ratio_min": lo,
                    "round_ratio_max": hi, "a_faster_rounds": k, "rounds": n})
if args.out:
    args.out.write_text(json.dumps({
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "malloc_keeps_freed": malloc_keeps_freed, "drop_path": 0.2,
                     "optimizer": "SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)"},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "loadavg_1min": load,
                    "torch": torch.__version__},
        "results": [{k: c[k] for k in ("who", "variant", "layout", "params", "times")} for c in cases],
        "ratios": summary,
    }, indent=1) + "\n")
