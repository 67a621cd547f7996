"""The training core serves any task: a task that is not classification gets the run folder, pruning
schedule, checkpoints and metrics from :func:`elanet.training.fit`."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elanet.data.memory import MemoryLoader
from elanet.models import create_model
from elanet.training import Parts, fit, load_checkpoint
from elanet.training.config import RunConfig


@dataclass
class ToyConfig(RunConfig):
    """A task's own config: the core's fields plus its own."""

    n: int = 64


class Regression:
    """Predict the mean pixel of random 8x8 images with an ELA ResNet-20 (one output)."""

    columns = ("train_mse", "test_mse")
    best = ("neg_mse",)

    def setup(self, cfg, ctx):
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randint(0, 17, (cfg.n, 1, 8, 8), generator=g, dtype=torch.uint8)
        self.train = MemoryLoader(x, torch.zeros(cfg.n, dtype=torch.int64), batch_size=16, mean=[8 / 16], std=[0.3],
                                  scale=16.0, train=True, seed=cfg.seed)
        self.test = MemoryLoader(x[:32], torch.zeros(32, dtype=torch.int64), batch_size=16, mean=[8 / 16], std=[0.3], scale=16.0)
        model = create_model(cfg.model, num_classes=1, in_chans=1, drop_path=0.2)
        return Parts(model, torch.optim.SGD(model.parameters(), lr=cfg.lr), self.train)

    def train_step(self, net, batch):
        x, _ = batch
        loss = F.mse_loss(net(x)[:, 0], x.mean((1, 2, 3)))
        return loss, torch.stack([loss.detach() * len(x), loss.new_tensor(len(x))])

    @torch.no_grad()
    def evaluate(self, model):
        model.eval()
        errs = [F.mse_loss(model(x)[:, 0], x.mean((1, 2, 3)), reduction="sum") for x, _ in self.test]
        model.train()
        mse = float(sum(errs)) / 32
        return {"mse": mse, "neg_mse": -mse}

    def row(self, train, test):
        return [train[0] / train[1], test["mse"]]

    def checkpoint_meta(self):
        return {"task": "toy-regression"}


def test_a_new_task_gets_run_folder_schedule_and_checkpoints(tmp_path):
    cfg = ToyConfig(out=str(tmp_path / "toy"), epochs=2, lr=0.005, warmup_epochs=0, milestones=[], windows=[[1, 1]],
                    plots=False, tensorboard=False)
    cfg.validate()
    summary = fit(Regression(), cfg, log=lambda s: None)
    run = tmp_path / "toy"
    with open(run / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "lr", "train_mse", "test_mse", "epoch_s", "active_blocks"] and len(rows) == 3
    best_epoch = min((1, 2), key=lambda e: float(rows[e][3]))
    assert summary["best_epoch"] == best_epoch
    assert abs(summary["best_neg_mse"] + float(rows[best_epoch][3])) <= 1e-5 * abs(summary["best_neg_mse"])  # csv: 6 digits
    rounds = json.loads((run / "pruning.json").read_text())["rounds"]
    assert len(rounds) == 1 and summary["active_blocks"] == sum(rounds[0]["mask"]) < 6
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["task"] == "toy-regression" and ckpt["config"]["n"] == 64 and ckpt["epoch"] == 2
    assert [int(r[-1]) for r in rows[1:]] == [summary["active_blocks"]] * 2
