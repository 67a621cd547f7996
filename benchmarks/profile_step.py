"""Where one training step of a variant spends its time: torch.profiler's operator table.

    python benchmarks/profile_step.py resnet56_mrla_b
    python benchmarks/profile_step.py resnet56_ela --pruned 1.0 --threads 1 --steps 3

This is how the retrieval of MRLA-B was found to dominate its overhead (a stack of every earlier
value per block, then per-value gradient copies) before it moved to one buffer per stage.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import elanet
from elanet.bench import spread_mask

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", help="a registered model name, e.g. resnet56_mrla_b")
parser.add_argument("--pruned", type=float, default=0.0, help="pruned fraction of an ELA model (evenly spread mask)")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
parser.add_argument("--drop-path", type=float, default=0.2)
parser.add_argument("--rows", type=int, default=25)
args = parser.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
info = elanet.model_info(args.model)
model = elanet.create_model(args.model, drop_path=args.drop_path).train()
if info["variant"] == "ela":
    elanet.set_mask(model, spread_mask(model, args.pruned))
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)
x = torch.randn(args.batch_size, *info["input_size"])
y = torch.randint(0, info["num_classes"], (args.batch_size,))


def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


step()
step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
        step()
print(f"{args.model}, pruned {args.pruned:g}, batch {args.batch_size}, {args.threads} threads, {args.steps} steps")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
