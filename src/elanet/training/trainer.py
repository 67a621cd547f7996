"""Staged ELA training (paper §3.4, §4): one function, top to bottom.

Each epoch: train (recording attention and accumulating KL scores inside a measurement window),
close the window with an EBQM round when it ends, evaluate, log a metrics row, checkpoint
atomically. Ctrl-C stops after the current step with a resumable checkpoint.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..attention import MRLABase, record_attention
from ..data import build_data
from ..models import create_model
from ..pruning import PruningSchedule, ela_blocks, format_round, get_mask
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, save_yaml
from .distributed import DistInfo, all_reduce_sum, cleanup_distributed, setup_distributed

__all__ = ["train", "evaluate", "lr_at", "METRICS"]

METRICS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_top1", "test_top5", "epoch_s", "active_blocks"]


def lr_at(cfg: TrainConfig, epoch: int, frac: float = 0.0) -> float:
    """Learning rate during 1-based ``epoch`` (``frac`` of it done): linear warm-up, then x lr_decay per milestone passed."""
    if epoch <= cfg.warmup_epochs:
        return cfg.lr * (epoch - 1 + frac) / cfg.warmup_epochs if cfg.warmup_epochs else cfg.lr
    return cfg.lr * cfg.lr_decay ** sum(epoch > m for m in cfg.milestones)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, amp: str = "none") -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over ``loader``, summed across processes."""
    was_training = model.training
    model.eval()
    sums = None
    for x, y in loader:
        with _autocast(x.device, amp):
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


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _new_run_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    """Rank 0 picks (and checks) the run folder; every rank gets its answer, or its error."""
    run, error = None, None
    if info.main:
        if cfg.out:
            run = Path(cfg.out)
            if run.exists() and (not run.is_dir() or any(run.iterdir())):
                error = f"run folder {run} already exists and is not empty: continue it with --resume {run} or choose another --out"
        else:
            base = run = Path("runs") / f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
            k = 1
            while run.exists():
                k, run = k + 1, Path(f"{base}-{k}")
    if info.enabled:
        shared = [str(run), error]
        torch.distributed.broadcast_object_list(shared, src=0)
        run, error = Path(shared[0]), shared[1]
    if error:
        raise ValueError(error)
    return Path(run)


class _StopFlag:
    """First Ctrl-C asks for a clean stop after the current step; the second aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step and saving a resumable checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


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
        resume: a run folder to continue from its ``last.pt`` (same mask, schedule position and RNG).
        on_step: called as ``on_step(epoch, step)`` after every optimiser step (a hook for tests/tools).
        log: where the epoch lines and pruning tables go (rank 0 only).
    """
    info, device = setup_distributed(cfg.device)
    log = log or (lambda s: print(s, flush=True))
    try:
        return _train(cfg, info, device, resume, on_step, log if info.main else (lambda s: None))
    finally:
        cleanup_distributed()


def _train(cfg, info: DistInfo, device: torch.device, resume, on_step, log) -> dict[str, Any]:
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = load_checkpoint(resume, map_location=device, prefer="last") if resume else None
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                      device=device, workers=cfg.workers, download=cfg.download, rank=info.rank,
                      world_size=info.world_size, seed=cfg.seed, image_size=cfg.image_size)
    model = create_model(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans, drop_path=cfg.drop_path).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    n_ela = len(ela_blocks(model))
    schedule = None
    if n_ela and cfg.windows:
        schedule = PruningSchedule(cfg.windows, gamma=cfg.gamma, alpha=cfg.alpha, beta=cfg.beta, tau=cfg.tau,
                                   strategy=cfg.strategy, mapping=cfg.mapping, threshold=cfg.threshold,
                                   fixed_count=cfg.fixed_count, reduce_fn=all_reduce_sum)
    n_attn = sum(isinstance(m, MRLABase) for m in model.modules())

    start_epoch, skip, partial, best = 1, 0, None, {"top1": -1.0, "epoch": 0}
    if ckpt is not None:
        run = Path(resume)
        if ckpt["model_name"] != cfg.model:
            raise ValueError(f"checkpoint holds {ckpt['model_name']} but the run config says {cfg.model}: resume with the run's own folder")
        model.load_state_dict(ckpt["model"])  # weights and the ELA mask
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if schedule is not None and ckpt["pruning"] is not None:
            schedule.load_state_dict(ckpt["pruning"], device=device)
        best = ckpt["best"]
        start_epoch, skip = ckpt["epoch"] + 1, ckpt["step"]
        if skip:
            partial = torch.tensor(ckpt["partial"], dtype=torch.float64, device=device)
        if start_epoch > cfg.epochs:
            log(f"run {run} already finished {cfg.epochs} epochs; nothing to do")
    else:
        run = _new_run_dir(cfg, info)
    metrics_path, pruning_path = run / "metrics.csv", run / "pruning.json"
    writer = None
    if info.main:
        run.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            save_yaml(cfg, run / "config.yaml")
            with open(metrics_path, "w", newline="") as f:
                csv.writer(f).writerow(METRICS)
        else:  # drop rows of epochs the checkpoint does not contain (crash between log and checkpoint)
            rows = list(csv.reader(open(metrics_path))) if metrics_path.exists() else [METRICS]
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= ckpt["epoch"]]
            with open(metrics_path, "w", newline="") as f:
                csv.writer(f).writerows(keep)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(run / "tb"))
            except ImportError:
                writer = None
        log(f"run folder {run} | {cfg.model} on {cfg.dataset} ({data.num_classes} classes) | {device} x{info.world_size}"
            + (f" | resuming after epoch {start_epoch - 1}" + (f", step {skip}" if skip else "") if ckpt else ""))

    def wrap() -> nn.Module:
        # Rebuilt after every pruning round: parameters of pruned blocks no longer require grad, so the
        # new DDP reducer does not wait for gradients that will never come.
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if info.enabled else model
        # torch.compile guards on every block's `active` flag: the first step after a pruning round recompiles
        return torch.compile(net) if cfg.compile else net

    def checkpoint(epoch: int, step: int, partial_sums) -> dict[str, Any]:
        return {
            "model_name": cfg.model, "num_classes": data.num_classes, "in_chans": data.in_chans,
            "image_size": data.image_size, "dataset": cfg.dataset, "mean": list(data.mean), "std": list(data.std),
            "classes": list(data.classes), "config": cfg.to_dict(), "epoch": epoch, "step": step,
            "partial": None if partial_sums is None else partial_sums.tolist(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "pruning": schedule.state_dict() if schedule is not None else None, "rng": _rng_state(),
            "best": best, "mask": get_mask(model) if n_ela else [],
        }

    if cfg.compile:  # one compilation per mask and recording state: more than dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    net = wrap()
    interactive = info.main and sys.stderr.isatty()
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs + 1):
            data.train.set_epoch(epoch)
            if skip and ckpt is not None:
                _set_rng_state(ckpt["rng"])
            else:
                torch.manual_seed(cfg.seed + 1000003 * epoch + info.rank)  # RNG is a function of the epoch: resumable
            measuring = schedule is not None and schedule.measuring(epoch)
            model.train()
            sums = partial if skip else torch.zeros(3, dtype=torch.float64, device=device)
            n_steps = len(data.train)
            bar = tqdm(total=n_steps, initial=skip, desc=f"epoch {epoch}/{cfg.epochs}" + (" [measuring]" if measuring else ""),
                       leave=False, disable=not interactive, dynamic_ncols=True)
            t0 = time.time()
            for step, (x, y) in enumerate(data.train):
                if step < skip:  # resuming mid-epoch: same batches, same augmentation RNG
                    continue
                lr = lr_at(cfg, epoch, step / n_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with (record_attention(model) if measuring else nullcontext()) as rec, _autocast(device, cfg.amp):
                    out = net(x)
                    loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if measuring:
                    schedule.accumulate(rec)
                sums[0] += loss.detach() * len(y)
                sums[1] += (out.argmax(1) == y).sum()
                sums[2] += len(y)
                bar.update()
                if interactive and step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}")
                if on_step is not None:
                    on_step(epoch, step + 1)
                if info.enabled:  # every rank must stop at the same step
                    stop.requested = all_reduce_sum(torch.tensor([float(stop.requested)], device=device)).item() > 0
                if stop.requested:
                    bar.close()
                    if info.main:
                        save_checkpoint(run / "last.pt", checkpoint(epoch - 1, step + 1, sums))
                    log(f"interrupted at epoch {epoch}, step {step + 1}/{n_steps}: resume with `elanet train --resume {run}`")
                    return {"run_dir": str(run), "interrupted": True, "epoch": epoch, "step": step + 1}
            bar.close()
            epoch_s = time.time() - t0
            skip = 0
            train_loss, train_correct, train_n = all_reduce_sum(sums.clone()).tolist()
            if not math.isfinite(train_loss):
                raise ValueError(f"training diverged in epoch {epoch} (loss {train_loss}): lower --lr or raise --warmup-epochs; "
                                 f"{run / 'last.pt'} holds the last finite epoch")

            report = schedule.end_epoch(epoch, model) if schedule is not None else None
            if report is not None:
                net = wrap()
                log(format_round(report))
                if info.main:
                    _write_json(pruning_path, {"model": cfg.model, "rounds": schedule.rounds})
                    if cfg.plots:
                        _plot(lambda: _viz().draw_pruning(schedule.rounds, run), log)

            if info.enabled:  # BN statistics drift per rank after the last step: evaluate and save rank 0's
                for b in model.buffers():
                    torch.distributed.broadcast(b, src=0)
            test = evaluate(model, data.test, amp=cfg.amp)
            active = sum(m.active for m in model.modules() if isinstance(m, MRLABase))
            row = [epoch, lr, train_loss / train_n, 100.0 * train_correct / train_n, test["loss"], test["top1"], test["top5"], epoch_s, active]
            if test["top1"] > best["top1"]:
                best = {"top1": test["top1"], "top5": test["top5"], "epoch": epoch}
            if info.main:
                with open(metrics_path, "a", newline="") as f:
                    csv.writer(f).writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
                if writer is not None:
                    for k, v in zip(METRICS[1:], row[1:]):
                        writer.add_scalar(k, v, epoch)
                    writer.flush()
                state = checkpoint(epoch, 0, None)
                save_checkpoint(run / "last.pt", state)
                if best["epoch"] == epoch:
                    save_checkpoint(run / "best.pt", state)
            log(f"epoch {epoch:>3}/{cfg.epochs} lr {lr:.4g} | train loss {row[2]:.4f} acc {row[3]:.2f}% | "
                f"test loss {test['loss']:.4f} top1 {test['top1']:.2f}% top5 {test['top5']:.2f}% | {epoch_s:.1f}s"
                + (f" | active {active}/{n_attn}" if n_attn else ""))

    if info.main and schedule is not None and not pruning_path.exists():
        _write_json(pruning_path, {"model": cfg.model, "rounds": schedule.rounds})
    if info.main and cfg.plots and n_attn:
        images = data.sample_images(32)[0]
        _plot(lambda: _viz().draw_attention(model, images, run), log)
    if writer is not None:
        writer.close()
    active = sum(m.active for m in model.modules() if isinstance(m, MRLABase))
    summary = {"run_dir": str(run), "interrupted": False, "best_top1": best["top1"], "best_top5": best.get("top5"),
               "best_epoch": best["epoch"], "active_blocks": active, "attention_blocks": n_attn,
               "mask": get_mask(model) if n_ela else [], "total_s": time.time() - t_start}
    if info.main:
        _write_json(run / "summary.json", summary)
    log(f"done: best top-1 {best['top1']:.2f}% (epoch {best['epoch']}) | active attention blocks {active}/{n_attn} | "
        f"total {summary['total_s']:.1f}s | {run}")
    return summary


def _viz():
    from .. import viz

    return viz


def _plot(draw: Callable[[], Any], log: Callable[[str], None]) -> None:
    """Draw a figure; a plotting failure is reported but never stops training."""
    try:
        draw()
    except Exception as e:  # noqa: BLE001 - pictures are a by-product of the run
        log(f"warning: could not draw a figure ({type(e).__name__}: {e})")
