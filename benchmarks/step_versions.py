"""Training steps of plain, MRLA-L and MRLA-B ResNet-56, interleaved, with whichever elanet is imported.

Compares implementations across commits without the bench module (older commits lack it):

    git worktree add /tmp/old 093215c
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/step_versions.py /tmp/before.json 8
    .venv/bin/python benchmarks/step_versions.py /tmp/after.json 8

Arguments: output JSON, timed rounds. CPU, 2 threads, batch 64, DropPath 0.2, one warm-up round.
"""
import json, statistics, sys, time
import torch, torch.nn.functional as F
import elanet
torch.set_num_threads(2)
names = ["resnet56", "resnet56_mrla_l", "resnet56_mrla_b"]
runs = {}
for n in names:
    torch.manual_seed(0)
    m = elanet.create_model(n, drop_path=0.2).train()
    runs[n] = (m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4))
g = torch.Generator().manual_seed(0)
x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
times = {n: [] for n in names}
for r in range(int(sys.argv[2]) + 1):
    for n in names:
        m, opt = runs[n]
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True); F.cross_entropy(m(x), y).backward(); opt.step()
        if r: times[n].append(time.perf_counter() - t)
out = {n: {"median_step_s": statistics.median(v), "min_step_s": min(v), "step_times_s": v} for n, v in times.items()}
json.dump({"elanet": elanet.__file__, "results": out}, open(sys.argv[1], "w"), indent=1)
for n, v in out.items(): print(n, round(v["median_step_s"], 3), round(v["min_step_s"], 3))
