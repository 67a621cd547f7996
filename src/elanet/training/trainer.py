"""Image classification on the training core (paper §4): the task's data, model, step, evaluation and metrics.

Everything else -- run folder, pruning schedule, checkpoints, resume, signals, DDP -- is
:func:`elanet.training.core.fit`.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import MRLABase
from ..data import build_data
from ..models import create_model
from .config import TrainConfig
from .core import Context, Parts, autocast, fit, lr_at
from .distributed import all_reduce_sum
from .layout import run_memory_format

__all__ = ["train", "evaluate", "lr_at", "METRICS", "Classification"]

METRICS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "epoch_s", "active_blocks"]


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, amp: str = "none") -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over ``loader``, summed across processes."""
    was_training = model.training
    model.eval()
    sums = None
    for x, y in loader:
        with autocast(x.device, amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y, reduction="sum")
        top5 = out.topk(min(5, out.shape[1]), dim=1).indices
        hit = top5 == y[:, None]
        batch = torch.stack([loss, hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=x.device)]).double()
        sums = batch if sums is None else sums + batch
    model.train(was_training)
    if sums is None:
        raise ValueError("the evaluation set is empty: check the dataset's val/test split")
    loss, c1, c5, n = all_reduce_sum(sums).tolist()
    return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "n": int(n)}


class Classification:
    """Cross-entropy training of a registered model on one of :data:`elanet.data.DATASETS`."""

    columns = METRICS[2:7]
    best = ("top1", "top5")

    def setup(self, cfg: TrainConfig, ctx: Context) -> Parts:
        self.cfg = cfg
        self.memory_format = run_memory_format(cfg, ctx.device)  # the core lays the model out alike
        self.data = data = build_data(
            cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
            device=ctx.device, workers=cfg.workers, download=cfg.download, rank=ctx.info.rank,
            world_size=ctx.info.world_size, seed=cfg.seed, image_size=cfg.image_size)
        model = create_model(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans,
                             drop_path=cfg.drop_path).to(ctx.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return Parts(model, optimizer, data.train)

    def train_step(self, net: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        x = x.contiguous(memory_format=self.memory_format)
        out = net(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=self.cfg.label_smoothing)
        d = loss.detach()
        return loss, torch.stack([d * len(y), (out.argmax(1) == y).sum().to(d.dtype), d.new_tensor(len(y))])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate(model, self.data.test, amp=self.cfg.amp)

    def row(self, train: list[float], test: dict[str, float]) -> list[float]:
        loss, correct, n = train
        return [loss / n, 100.0 * correct / n, test["loss"], test["top1"], test["top5"]]

    def describe(self, v: dict[str, float]) -> str:
        return (f"train loss {v['train_loss']:.4f} acc {v['train_acc']:.2f}% | test loss {v['test_loss']:.4f} "
                f"top1 {v['test_top1']:.2f}% top5 {v['test_top5']:.2f}%")

    def describe_best(self, summary: dict[str, Any]) -> str:
        return f"best top-1 {summary['best_top1']:.2f}% (epoch {summary['best_epoch']})"

    def checkpoint_meta(self) -> dict[str, Any]:
        d = self.data
        return {"num_classes": d.num_classes, "in_chans": d.in_chans, "image_size": d.image_size,
                "dataset": self.cfg.dataset, "mean": list(d.mean), "std": list(d.std), "classes": list(d.classes)}

    def summary_extra(self) -> dict[str, Any]:
        """ImageFolder runs: how many distinct files could not be decoded and were left out (all ranks)."""
        loaders = [ld for ld in (self.data.train, self.data.test) if hasattr(ld, "skipped")]
        if not loaders:
            return {}
        paths = set().union(*(ld.skipped for ld in loaders))
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            every: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, sorted(paths))
            paths = set().union(*every)
        return {"skipped_images": len(paths)}

    def finish(self, model: nn.Module, ctx: Context) -> None:
        if self.cfg.plots and any(isinstance(m, MRLABase) for m in model.modules()):
            from .core import _plot, _viz

            images = self.data.sample_images(32)[0]
            _plot(lambda: _viz().draw_attention(model, images, ctx.run), ctx.log)


def train(
    cfg: TrainConfig,
    *,
    resume: str | os.PathLike | None = None,
    on_step: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` with the ELA pruning schedule; returns the run summary.

    Args:
        cfg: the validated configuration (from :func:`resolve_config`, or the run's own config on resume).
        resume: a run folder to continue from its ``last.pt`` (same mask, schedule position and random streams).
        on_step: called as ``on_step(epoch, step)`` after every optimiser step (a hook for tests/tools).
        log: where the epoch lines and pruning tables go (rank 0 only).
    """
    return fit(Classification(), cfg, resume=resume, on_step=on_step, log=log)
