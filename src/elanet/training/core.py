"""The training core: one loop for classification, detection and studies.

How a task uses this
--------------------
A task supplies its data, model, step and evaluation; :func:`fit` does everything else -- the run folder
and its lock, ``config.yaml``, the learning-rate schedule, AMP, the staged ELA pruning schedule
(record attention in a window, accumulate KL, decide at the window's end, re-wrap DDP), per-rank random
streams, atomic checksummed checkpoints, SIGINT/SIGTERM/SIGUSR1 stops, exact resume, ``metrics.csv``,
TensorBoard, ``pruning.json`` and ``summary.json``::

    class MyTask:
        columns = ("train_loss", "test_loss", "test_ap")  # its metrics.csv columns (between lr and epoch_s)
        best = ("ap",)  # evaluate() keys kept for the best epoch (summary best_ap); the first is maximised

        def setup(self, cfg, ctx: Context) -> Parts:  # runs after torch.manual_seed(cfg.seed)
            self.data = ...
            model = build(...).to(ctx.device)
            return Parts(model, torch.optim.SGD(model.parameters(), lr=cfg.lr), self.data.train)

        def train_step(self, net, batch) -> tuple[Tensor, Tensor]:
            images, targets = batch
            loss = net(images, targets)  # forward + loss; the core runs backward and the optimiser
            return loss, torch.stack([loss.detach() * len(images), ...]).double()  # per-batch sums

        def evaluate(self, model) -> dict[str, float]: ...  # summed over ranks, e.g. {"loss": .., "ap": ..}
        def row(self, train: list[float], test: dict[str, float]) -> list[float]: ...  # values of `columns`
        def checkpoint_meta(self) -> dict: ...  # what rebuilding the model needs (plain data)
        def finish(self, model, ctx) -> None: ...  # optional, rank 0, end of run (figures)
        def summary_extra(self) -> dict: ...  # optional, every rank, end of run: more summary.json fields
        def describe(self, values: dict[str, float]) -> str: ...  # optional, the epoch line's middle
        def describe_best(self, summary: dict) -> str: ...  # optional, the final line's start
        command = "train"  # optional: the `elanet ...` subcommand the stop message tells the user to resume with

    summary = fit(MyTask(), cfg)  # cfg: a RunConfig (or subclass) that validated

``train`` batches come from a loader with ``set_epoch(epoch)``, ``len()`` and iteration; its shuffling and
augmentation must be functions of (seed, epoch, rank, index), like the loaders of :mod:`elanet.data`, and
all other randomness of a step (DropPath) comes from the core's per-rank stream (:class:`StepRNG`).

Resume guarantee: a run stopped at any step (signal, crash, SIGKILL) and resumed with ``resume=RUN`` on
the same number of processes, the same device type and the same software writes the same metrics.csv
rows (but ``epoch_s``), pruning.json and weights as a run that was never stopped. It restarts from the
last checkpoint (written at every epoch end and on a signal), so a crash costs the steps since then.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..attention import MRLABase, record_attention
from ..pruning import PruningSchedule, ela_blocks, format_round, get_mask
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig, save_yaml
from .layout import run_memory_format
from .distributed import DistInfo, all_reduce_sum, cleanup_distributed, setup_distributed
from .rng import StepRNG
from .run_dir import RunFolder, write_json
from .signals import StopSignals

__all__ = ["Context", "Parts", "Task", "fit", "lr_at", "autocast"]


@dataclass
class Context:
    """What a task may use: the config, this process's rank, its device, the run folder and the log."""

    cfg: RunConfig
    info: DistInfo
    device: torch.device
    run: Path
    log: Callable[[str], None]


@dataclass
class Parts:
    """What :meth:`Task.setup` builds. ``ddp_kwargs`` go to ``DistributedDataParallel``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: Any  # a loader: set_epoch(epoch), len(), iteration over batches
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """See the module docstring."""

    columns: Sequence[str]
    best: Sequence[str]

    def setup(self, cfg: RunConfig, ctx: Context) -> Parts: ...
    def train_step(self, net: nn.Module, batch: Any) -> tuple[Tensor, Tensor]: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def row(self, train: list[float], test: dict[str, float]) -> list[float]: ...
    def checkpoint_meta(self) -> dict[str, Any]: ...


def lr_at(cfg: RunConfig, epoch: int, frac: float = 0.0) -> float:
    """Learning rate during 1-based ``epoch`` (``frac`` of it done): the config's schedule (:meth:`RunConfig.lr_at`)."""
    return cfg.lr_at(epoch, frac)


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in ``bf16`` / ``fp16``; a no-op for ``none``."""
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def fit(
    task: Task,
    cfg: RunConfig,
    *,
    resume: str | os.PathLike | None = None,
    on_step: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``task`` as ``cfg`` says, in a new run folder (``cfg.out``) or continuing ``resume``.

    Args:
        task: the task (see the module docstring).
        cfg: the validated configuration (on resume: the run's ``config.yaml`` with runtime changes).
        resume: a run folder to continue from its ``last.pt`` (a folder without one starts from epoch 1).
        on_step: called as ``on_step(epoch, step)`` after every optimiser step (a hook for tests/tools).
        log: where the epoch lines and pruning tables go (rank 0 only).

    Returns:
        The summary (also ``summary.json``); ``interrupted`` is True after a stop signal.
    """
    info, device = setup_distributed(cfg.device)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA GPU (on the CPU it runs ~10x slower): use --amp bf16 or none")
    log = log or (lambda s: print(s, flush=True))
    folder = None
    try:
        folder = _open_folder(cfg, info, resume)
        return _fit(task, cfg, info, device, folder, resume is not None, on_step, log if info.main else (lambda s: None))
    finally:
        if folder is not None:
            folder.release()
        cleanup_distributed()


def _on_rank0(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0; every rank raises its ``ValueError`` / ``OSError`` as a ``ValueError``."""
    result, error = None, None
    if info.main:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = e
    if info.enabled:
        shared = [None if error is None else str(error)]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None and error is None:
            raise ValueError(shared[0])
    if error is not None:
        raise error
    return result


def _open_folder(cfg: RunConfig, info: DistInfo, resume) -> RunFolder:
    """Rank 0 checks (new run) or reopens and locks (resume) the run folder; every rank gets its path."""
    def open_() -> RunFolder:
        return RunFolder.reopen(resume) if resume is not None else RunFolder.plan(cfg.out or _auto_name(cfg))

    folder = _on_rank0(info, open_)
    if info.enabled:
        shared = [None if folder is None else str(folder.path)]
        dist.broadcast_object_list(shared, src=0)
        if folder is None:
            folder = RunFolder(Path(shared[0]))  # rank 0 holds the lock
    return folder


def _auto_name(cfg: RunConfig) -> Path:
    base = run = Path("runs") / f"{cfg.model}-{getattr(cfg, 'dataset', 'run')}-{time.strftime('%Y%m%d-%H%M%S')}"
    k = 1
    while run.exists():
        k, run = k + 1, Path(f"{base}-{k}")
    return run


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (all ranks must call)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


_LOCAL = ("pairs", "sum", "count")  # the schedule's per-rank window sums; the rest of its state is global


def _fit(task: Task, cfg: RunConfig, info: DistInfo, device: torch.device, folder: RunFolder, resuming: bool,
         on_step, log) -> dict[str, Any]:
    t_start = time.time()
    run = folder.path
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt = None
    if resuming and (run / "last.pt").is_file():
        ckpt = load_checkpoint(run / "last.pt", map_location=device, prefer="last")
        if "ranks" not in ckpt:
            raise ValueError(f"{run / 'last.pt'} was written by an older elanet and cannot be resumed: start a new run")
    ctx = Context(cfg, info, device, run, log)
    torch.manual_seed(cfg.seed)
    parts = task.setup(cfg, ctx)
    model, optimizer, loader = parts.model, parts.optimizer, parts.train
    model = model.to(memory_format=run_memory_format(cfg, device))  # the task lays its inputs out alike
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    n_ela = len(ela_blocks(model))
    schedule = None
    if n_ela and cfg.windows:
        schedule = PruningSchedule(cfg.windows, gamma=cfg.gamma, alpha=cfg.alpha, beta=cfg.beta, tau=cfg.tau,
                                   strategy=cfg.strategy, mapping=cfg.mapping, threshold=cfg.threshold,
                                   fixed_count=cfg.fixed_count, reduce_fn=all_reduce_sum)
    n_attn = sum(isinstance(m, MRLABase) for m in model.modules())
    rng = StepRNG(device)
    key = task.best[0]

    start_epoch, skip, partial, best = 1, 0, None, {key: float("-inf"), "epoch": 0}
    if ckpt is not None:
        if ckpt["model_name"] != cfg.model:
            raise ValueError(f"checkpoint holds {ckpt['model_name']} but the run config says {cfg.model}: resume with the run's own folder")
        model.load_state_dict(ckpt["model"])  # weights and the ELA mask
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        best = ckpt["best"]
        start_epoch, skip = ckpt["epoch"] + 1, ckpt["step"]
        mine = _rank_state(ckpt["ranks"], info, mid_epoch=skip > 0, run=run)
        if schedule is not None and ckpt["pruning"] is not None:
            schedule.load_state_dict({**ckpt["pruning"], **mine["window"]}, device=device)
        if skip:
            rng.load_state_dict(mine["rng"])
            partial = torch.tensor(mine["sums"], dtype=torch.float64, device=device)
        if start_epoch > cfg.epochs:
            log(f"run {run} already finished {cfg.epochs} epochs; nothing to do")
    elif resuming:
        log(f"{run} has no checkpoint yet: starting it from epoch 1")
    if not resuming:
        _on_rank0(info, folder.create)  # only now, with data and model built, is anything written
    columns = ["epoch", "lr", *task.columns, "epoch_s", "active_blocks"]
    pruning_path = run / "pruning.json"
    writer = None
    if info.main:
        save_yaml(cfg, run / "config.yaml")  # on resume: with the runtime changes (e.g. more epochs)
        folder.start_metrics(columns, keep_until=ckpt["epoch"] if ckpt is not None else (0 if resuming else None))
        if schedule is not None and ckpt is not None:
            write_json(pruning_path, {"model": cfg.model, "rounds": schedule.rounds})  # drop rounds after the checkpoint
        elif resuming:
            pruning_path.unlink(missing_ok=True)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on resume, drop events of epochs after the checkpoint (a crash between log and checkpoint)
                writer = SummaryWriter(str(run / "tb"), purge_step=start_epoch if ckpt is not None else None)
            except ImportError:
                writer = None
        log(f"run folder {run} | {cfg.model} | {device} x{info.world_size}"
            + (f" | resuming after epoch {start_epoch - 1}" + (f", step {skip}" if skip else "") if ckpt else ""))

    def wrap() -> nn.Module:
        # Rebuilt after every pruning round: parameters of pruned blocks no longer require grad, so the
        # new DDP reducer does not wait for gradients that will never come.
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **parts.ddp_kwargs) if info.enabled else model
        # torch.compile guards on every block's `active` flag: the first step after a pruning round recompiles
        return torch.compile(net) if getattr(cfg, "compile", False) else net

    def checkpoint(epoch: int, step: int, sums: Tensor | None) -> dict[str, Any] | None:
        """Every rank's own state gathered; the whole checkpoint on rank 0 (None elsewhere)."""
        window = {k: v for k, v in schedule.state_dict().items() if k in _LOCAL} if schedule is not None else {}
        mine = {"rng": rng.state_dict() if step else None, "sums": None if sums is None else sums.tolist(), "window": window}
        ranks = _gather(mine, info)
        if not info.main:
            return None
        return {
            "model_name": cfg.model, **task.checkpoint_meta(), "config": cfg.to_dict(), "epoch": epoch, "step": step,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "pruning": schedule.state_dict() if schedule is not None else None, "ranks": ranks,
            "best": best, "mask": get_mask(model) if n_ela else [],
        }

    if getattr(cfg, "compile", False):  # one compilation per mask and recording state: more than dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    net = wrap()
    interactive = info.main and sys.stderr.isatty()
    last_saved = start_epoch - 1 if ckpt is not None else 0
    with StopSignals() as stop:
        for epoch in range(start_epoch, cfg.epochs + 1):
            loader.set_epoch(epoch)
            if not skip:
                rng.seed(cfg.seed + 1000003 * epoch + info.rank)  # each rank's stream is a function of the epoch
            measuring = schedule is not None and schedule.measuring(epoch)
            model.train()
            sums = partial if skip else None
            n_steps = len(loader)
            bar = tqdm(total=n_steps, initial=skip, desc=f"epoch {epoch}/{cfg.epochs}" + (" [measuring]" if measuring else ""),
                       leave=False, disable=not interactive, dynamic_ncols=True)
            t0 = time.time()
            for step, batch in _skip(loader, skip):
                lr = cfg.lr_at(epoch, step / n_steps, iteration=(epoch - 1) * n_steps + step)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                with rng.active():
                    with (record_attention(model) if measuring else nullcontext()) as rec, autocast(device, cfg.amp):
                        loss, stats = task.train_step(net, batch)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                if measuring:
                    schedule.accumulate(rec)
                stats = stats.detach().double()
                sums = stats if sums is None else sums + stats
                bar.update()
                if interactive and step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}")
                if on_step is not None:
                    on_step(epoch, step + 1)
                if info.enabled:  # every rank must stop at the same step
                    stop.requested = all_reduce_sum(torch.tensor([float(stop.requested)], device=device)).item() > 0
                if stop.requested:
                    bar.close()
                    state = checkpoint(epoch - 1, step + 1, sums)
                    if info.main:
                        save_checkpoint(run / "last.pt", state)
                    log(f"stopped at epoch {epoch}, step {step + 1}/{n_steps}: resume with `elanet {getattr(task, 'command', 'train')} --resume {run}`")
                    return {"run_dir": str(run), "interrupted": True, "epoch": epoch, "step": step + 1,
                            "signal": stop.signum}
            bar.close()
            epoch_s = time.time() - t0
            skip = 0
            if sums is None:
                raise ValueError(f"epoch {epoch} had no training batches: check the dataset and the batch size")
            train = all_reduce_sum(sums.clone()).tolist()
            where = (f"{run / 'last.pt'} holds epoch {last_saved}, the last finite one" if last_saved
                     else "no checkpoint was written")
            if not all(math.isfinite(v) for v in train):
                raise ValueError(f"training diverged in epoch {epoch} (the training loss is not finite): "
                                 f"lower --lr or raise --warmup-epochs; {where}")

            report = schedule.end_epoch(epoch, model) if schedule is not None else None
            if report is not None:
                net = wrap()
                log(format_round(report))
                if info.main:
                    write_json(pruning_path, {"model": cfg.model, "rounds": schedule.rounds})
                    if cfg.plots:
                        _plot(lambda: _viz().draw_pruning(schedule.rounds, run), log)

            if info.enabled:  # BN statistics drift per rank after the last step: evaluate and save rank 0's
                for b in model.buffers():
                    dist.broadcast(b, src=0)
            test = task.evaluate(model)
            bad = [k for k, v in test.items() if not math.isfinite(v)]
            if bad:
                raise ValueError(f"training diverged in epoch {epoch} (test {bad[0]} {test[bad[0]]}): lower --lr or "
                                 f"raise --warmup-epochs; {where}")
            active = sum(m.active for m in model.modules() if isinstance(m, MRLABase))
            row = [epoch, lr, *task.row(train, test), epoch_s, active]
            if test[key] > best[key]:
                best = {**{k: test[k] for k in task.best}, "epoch": epoch}
            state = checkpoint(epoch, 0, None)
            if info.main:
                folder.append_metrics(row)
                if writer is not None:
                    for k, v in zip(columns[1:], row[1:]):
                        writer.add_scalar(k, v, epoch)
                    writer.flush()
                if best["epoch"] == epoch:  # best first: a crash between the writes never leaves best.pt stale
                    save_checkpoint(run / "best.pt", state)
                save_checkpoint(run / "last.pt", state)
            last_saved = epoch
            values = dict(zip(columns, row))
            middle = task.describe(values) if hasattr(task, "describe") else " ".join(f"{k} {values[k]:.4g}" for k in task.columns)
            log(f"epoch {epoch:>3}/{cfg.epochs} lr {lr:.4g} | {middle} | {epoch_s:.1f}s"
                + (f" | active {active}/{n_attn}" if n_attn else ""))

    if info.main and schedule is not None and not pruning_path.exists():
        write_json(pruning_path, {"model": cfg.model, "rounds": schedule.rounds})
    if info.main and hasattr(task, "finish"):
        task.finish(model, ctx)
    if writer is not None:
        writer.close()
    active = sum(m.active for m in model.modules() if isinstance(m, MRLABase))
    extra = task.summary_extra() if hasattr(task, "summary_extra") else {}  # every rank calls it
    summary = {"run_dir": str(run), "interrupted": False, **{f"best_{k}": best.get(k) for k in task.best},
               "best_epoch": best["epoch"], "active_blocks": active, "attention_blocks": n_attn,
               "mask": get_mask(model) if n_ela else [], **extra, "total_s": time.time() - t_start}
    if info.main:
        write_json(run / "summary.json", summary)
    best_text = task.describe_best(summary) if hasattr(task, "describe_best") else f"best {key} {best.get(key)} (epoch {best['epoch']})"
    log(f"done: {best_text} | active attention blocks {active}/{n_attn} | total {summary['total_s']:.1f}s | {run}")
    return summary


def _skip(loader: Iterable, skip: int):
    """``enumerate(loader)`` from batch ``skip`` on; a loader with ``iter_from(skip)`` starts there directly."""
    if skip and hasattr(loader, "iter_from"):
        return enumerate(loader.iter_from(skip), start=skip)
    return ((i, b) for i, b in enumerate(loader) if i >= skip)


def _rank_state(ranks: list[dict[str, Any]], info: DistInfo, *, mid_epoch: bool, run: Path) -> dict[str, Any]:
    """This rank's saved state. With a different number of processes (allowed only at an epoch end) rank 0
    takes the sum of every saved rank's window sums, so each contribution still counts exactly once."""
    if len(ranks) == info.world_size:
        return ranks[info.rank]
    if mid_epoch:
        raise ValueError(f"{run / 'last.pt'} was saved mid-epoch by {len(ranks)} process(es): resume with the same "
                         f"number (torchrun --nproc_per_node={len(ranks)})" if len(ranks) > 1 else
                         f"{run / 'last.pt'} was saved mid-epoch by a single process: resume without torchrun")
    window = dict(ranks[0]["window"])
    if info.main and window.get("sum") is not None:
        for k in ("sum", "count"):
            window[k] = [sum(vals) for vals in zip(*(r["window"][k] for r in ranks))]
    elif not info.main:
        window = {"pairs": [], "sum": None, "count": None}
    return {"rng": None, "sums": None, "window": window}


def _viz():
    from .. import viz

    return viz


def _plot(draw: Callable[[], Any], log: Callable[[str], None]) -> None:
    """Draw a figure; a plotting failure is reported but never stops training."""
    try:
        draw()
    except Exception as e:  # noqa: BLE001 - pictures are a by-product of the run
        log(f"warning: could not draw a figure ({type(e).__name__}: {e})")
