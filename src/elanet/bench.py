"""Training-step benchmark of plain, MRLA-L, MRLA-B, ELA and any other registered variant (paper §4.1, Figure 4).

Every variant is built once per memory layout (NCHW and channels-last by default), warmed up, then
timed in rounds: each round runs one training step (forward, backward, optimiser step) of every
variant in every layout, in a shuffled order, so that load from other processes spreads over all of
them alike. Reported per variant and layout: the median step time, the peak memory of one step and
the MACs of one forward pass, and which layout was faster. ``elanet bench`` is the command line.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import record_attention
from .export import export_model, inference_model, load_exported, share_onnxruntime_threads
from .models import create_model, list_models, list_variants, model_info
from .profile import profile
from .runtime import keep_freed_memory
from .pruning import PruningSchedule, ela_blocks, set_mask
from .training.core import autocast
from .training.layout import format_name, resolve_memory_format

__all__ = [
    "Variant", "FRACTIONS", "DEFAULT_VARIANTS", "spread_mask", "run_mask", "make_variants", "peak_memory", "run_benchmark",
    "format_table", "save_json", "SCHEMA", "INFER_SCHEMA", "make_infer_variants", "run_infer_benchmark",
    "infer_targets", "format_infer_table",
]

SCHEMA = "elanet-bench/2"
LAYOUTS = ("contiguous", "channels_last")
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
MEMORY_NOTE = (
    "peak bytes of tensors allocated during one training step (forward, backward, optimiser step) above "
    "those alive before it (parameters, optimiser state, the batch); gradients count, as the step starts "
    "from zero_grad(set_to_none=True). CPU: allocation events of torch.profiler(profile_memory=True); "
    "CUDA: torch.cuda.max_memory_allocated."
)


@dataclass
class Variant:
    """One model to benchmark.

    Attributes:
        model: registered model name, e.g. ``'resnet56_ela'``.
        depth: backbone depth (56 for ``'resnet56_ela'``).
        label: variant label shared across depths: ``'plain'``, ``'MRLA-L'``, ``'MRLA-B'``,
            ``'ELA 25%'`` (a fixed, evenly spread mask), ``'ELA 0% +KL'`` (records the attention and
            accumulates the KL scores every step, as in a measurement window) or ``'ELA run'``
            (the final mask of a training run).
        mask: ELA active flags, or None.
        pruned_fraction: pruned share of the prunable (not stage-first) ELA blocks; None without a mask.
        measure_kl: whether each step accumulates the KL scores.
    """

    model: str
    depth: int
    label: str
    mask: list[bool] | None = None
    pruned_fraction: float | None = None
    measure_kl: bool = False


def spread_mask(model: nn.Module, fraction: float) -> list[bool]:
    """An ELA mask pruning ``round(fraction * P)`` of the P prunable blocks, evenly spread.

    The first block of every stage is never pruned (SPEC §3); the others are taken at evenly
    spaced positions in forward order, so every stage loses about the same share.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"pruned fraction must be in [0, 1], got {fraction}")
    blocks = ela_blocks(model)
    if not blocks:
        raise ValueError("model has no ELA blocks: build it with an '_ela' name")
    candidates = [i for i, m in enumerate(blocks) if not m.first_in_stage]
    k = int(fraction * len(candidates) + 0.5)
    pruned = {candidates[int((j + 0.5) * len(candidates) / k)] for j in range(k)}
    return [i not in pruned for i in range(len(blocks))]


def run_mask(run_dir: str | Path) -> tuple[str, list[bool] | None]:
    """The model name and final ELA mask of a training run folder (its ``pruning.json``).

    The mask is the last round's; None (all blocks active) when the run has no rounds.
    """
    path = Path(run_dir) / "pruning.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the folder of a training run with ELA pruning")
    data = json.loads(path.read_text())
    if "model" not in data or not isinstance(data.get("rounds"), list):
        raise ValueError(f"{path} needs 'model' and a 'rounds' list")
    rounds = data["rounds"]
    return data["model"], ([bool(x) for x in rounds[-1]["mask"]] if rounds else None)


def _depth(name: str) -> int:
    return int(model_info(name)["backbone"].removeprefix("resnet"))


def _info(name: str) -> dict[str, Any]:
    """``model_info``, also for ``'torchvision:resnetN'`` (the family and input of elanet's resnetN)."""
    return model_info(name.split(":", 1)[1] if name.startswith(f"{TORCHVISION}:") else name)


def _build(name: str, *, num_classes: int, drop_path: float) -> nn.Module:
    if name.startswith(f"{TORCHVISION}:"):
        import torchvision

        return getattr(torchvision.models, name.split(":", 1)[1])(num_classes=num_classes)
    return create_model(name, num_classes=num_classes, drop_path=drop_path)


def _ela_variant(model: nn.Module, name: str, label: str, mask: list[bool], measure_kl: bool = False) -> Variant:
    set_mask(model, mask)  # checks the mask against the model
    prunable = [on for on, m in zip(mask, ela_blocks(model)) if not m.first_in_stage]
    fraction = prunable.count(False) / len(prunable) if prunable else 0.0
    return Variant(name, _depth(name), label, list(mask), fraction, measure_kl)


DEFAULT_VARIANTS = ("plain", "mrla_l", "mrla_b", "ela", "dia")
TORCHVISION = "torchvision"  # the reference implementation of a plain ImageNet ResNet


def _variant_names() -> list[str]:
    return ["plain"] + [v[1:] for v in list_variants() if v] + [TORCHVISION]


def make_variants(
    depths: Sequence[int],
    *,
    variants: Sequence[str] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    measure_kl: bool = True,
    run_dir: str | Path | None = None,
) -> list[Variant]:
    """The variants to time at every depth, then the run's mask.

    Args:
        depths: backbone depths, e.g. ``(56, 110)`` (CIFAR) or ``(50,)`` (ImageNet).
        variants: variant names (``'plain'``, ``'mrla_l'``, ``'dia'``, ``'se'``, ...; ``'ela'`` expands
            into one entry per pruned fraction; ``'torchvision'`` times ``torchvision.models.resnetN``).
            Default: plain, MRLA-L, MRLA-B, ELA and DIA, each where the depth has it.
        fractions: pruned fractions of the fixed ELA masks.
        measure_kl: with ELA, add ``'ELA 0% +KL'``, which accumulates the KL scores every step.
        run_dir: a training run folder; adds ``'ELA run'`` with its final mask (and its depth).
    """
    explicit = variants is not None
    names = list(dict.fromkeys(variants if explicit else DEFAULT_VARIANTS))
    unknown = [n for n in names if n not in _variant_names()]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}: use any of {', '.join(_variant_names())}")
    depths = list(dict.fromkeys(int(d) for d in depths))
    run = run_mask(run_dir) if run_dir is not None else None
    if run is not None:
        if run[0] not in list_models() or not run[0].endswith("_ela"):
            raise ValueError(f"the run trained {run[0]!r}, not an ELA model: its mask cannot be benchmarked")
        if _depth(run[0]) not in depths:
            depths.append(_depth(run[0]))
    labels = list_variants()
    out = []
    for d in depths:
        backbone = f"resnet{d}"
        if backbone not in list_models():
            raise ValueError(f"no ResNet-{d}: use depths of {', '.join(m for m in list_models() if '_' not in m)}")
        for n in names:
            if n == TORCHVISION:
                if model_info(backbone)["family"] != "imagenet":
                    if explicit:
                        raise ValueError(f"torchvision has no CIFAR ResNet-{d}: compare it at depths 18, 34, 50 or 101")
                    continue
                out.append(Variant(f"{TORCHVISION}:{backbone}", d, "torchvision"))
                continue
            name = backbone if n == "plain" else f"{backbone}_{n}"
            if name not in list_models():
                if explicit:
                    model_info(name)  # raises: the variant has no model at this depth
                continue
            if n != "ela":
                out.append(Variant(name, d, "plain" if n == "plain" else labels[f"_{n}"]))
                continue
            ela = create_model(name)
            for f in fractions:
                out.append(_ela_variant(ela, name, f"ELA {100 * f:g}%", spread_mask(ela, f)))
            if measure_kl:
                out.append(_ela_variant(ela, name, "ELA 0% +KL", spread_mask(ela, 0.0), measure_kl=True))
        name = f"{backbone}_ela"
        if run is not None and run[0] == name:
            ela = create_model(name)
            out.append(_ela_variant(ela, name, "ELA run", run[1] if run[1] is not None else spread_mask(ela, 0.0)))
    return out


def peak_memory(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensors allocated while ``step()`` runs, above those alive before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop and no-GPU lines are noise here
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append(e)
    if not events:
        return 0
    events.sort(key=lambda e: e.start_time_ns)
    # the allocator's running total may carry blocks from earlier sessions: measure from its start value
    start = events[0].extra_fields.total_allocated - events[0].extra_fields.alloc_size
    return max(e.extra_fields.total_allocated for e in events) - start


class _Runner:
    """A variant's model, optimiser and one training step on a fixed batch."""

    def __init__(self, v: Variant, *, num_classes: int, drop_path: float, device: torch.device, seed: int,
                 memory_format: torch.memory_format = torch.contiguous_format, amp: str = "none",
                 compile: bool = False) -> None:
        torch.manual_seed(seed)
        model = _build(v.model, num_classes=num_classes, drop_path=drop_path)
        self.model = model.to(device=device, memory_format=memory_format).train()
        self.memory_format, self.amp = memory_format, amp
        if v.mask is not None:
            set_mask(self.model, v.mask)
        self.net = torch.compile(self.model) if compile else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.schedule = PruningSchedule.preset("cifar") if v.measure_kl else None
        self.device = device

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            if self.schedule is not None:
                with record_attention(self.model) as rec:
                    loss = F.cross_entropy(self.net(x).float(), y)
                self.schedule.accumulate(rec)
            else:
                loss = F.cross_entropy(self.net(x).float(), y)
        loss.backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run_benchmark(
    variants: Sequence[Variant],
    *,
    batch_size: int = 64,
    steps: int = 10,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    drop_path: float = 0.2,
    seed: int = 0,
    memory_formats: Sequence[str] = LAYOUTS,
    amp: str = "none",
    compile: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time the training step of every variant, interleaved, and measure its memory and MACs.

    Args:
        variants: from :func:`make_variants`.
        batch_size: images per step.
        steps: timed rounds; every round runs each variant once, in a shuffled order.
        warmup: untimed rounds first.
        device: ``'cpu'`` or ``'cuda'``.
        image_size: side of the square input (default: the family's, 32 for CIFAR, 224 for ImageNet).
        drop_path: DropPath rate of the attention branch (the paper trains with 0.2).
        seed: seeds the models, the batch and the round order.
        memory_formats: layouts to time every variant in: ``'contiguous'`` (NCHW), ``'channels_last'``,
            ``'auto'`` (the device's default, :func:`elanet.training.default_memory_format`).
        amp: ``'none'``, or ``'bf16'`` / ``'fp16'`` autocast around forward and loss (as ``elanet train --amp``).
        compile: run each model through ``torch.compile`` (compiled during the warm-up rounds).
        log: called with a progress line after every round.

    Returns:
        The JSON-ready report: settings, machine, versions and one entry per variant.
    """
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, steps >= 1, warmup >= 0, got {batch_size}, {steps}, {warmup}")
    malloc_keeps_freed = keep_freed_memory()  # time steps as `elanet train` runs them (see elanet.runtime)
    device = torch.device(device)
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, got {amp!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available: use --device cpu")
    formats = list(dict.fromkeys(resolve_memory_format(f, device) for f in memory_formats))
    if not formats:
        raise ValueError("memory_formats is empty: pass contiguous, channels_last or auto")
    if compile:  # every variant is its own compilation: more than dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(variants))
    families = {_info(v.model)["family"] for v in variants}
    runners, inputs, cases = [], {}, []
    for v in variants:
        info = _info(v.model)
        size = (3, image_size, image_size) if image_size else info["input_size"]
        for fmt in formats:
            key = (info["family"], fmt)
            if key not in inputs:
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(batch_size, *size, generator=g)
                y = torch.randint(0, info["num_classes"], (batch_size,), generator=g)
                inputs[key] = (x.to(device).contiguous(memory_format=fmt), y.to(device), size)
            runners.append(_Runner(v, num_classes=info["num_classes"], drop_path=drop_path, device=device, seed=seed,
                                   memory_format=fmt, amp=amp, compile=compile))
            cases.append((v, key))

    times: list[list[float]] = [[] for _ in cases]
    cpu_times: list[list[float]] = [[] for _ in cases]
    order = list(range(len(cases)))
    rng = random.Random(seed)
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    start = time.perf_counter()
    for r in range(warmup + steps):
        rng.shuffle(order)
        for i in order:
            x, y, _ = inputs[cases[i][1]]
            t, c = time.perf_counter(), time.process_time()
            runners[i].step(x, y)
            if r >= warmup:
                times[i].append(time.perf_counter() - t)
                cpu_times[i].append(time.process_time() - c)
        if load:
            load.append(os.getloadavg()[0])
        if log is not None:
            kind = "warm-up" if r < warmup else "timed"
            log(f"round {r + 1}/{warmup + steps} ({kind}) done after {time.perf_counter() - start:.0f} s")

    results = []
    for (v, key), runner, ts, cs in zip(cases, runners, times, cpu_times):
        x, y, size = inputs[key]
        runner.opt.zero_grad(set_to_none=True)
        memory = peak_memory(lambda: runner.step(x, y), device)
        prof = profile(runner.model, size)
        blocks = ela_blocks(runner.model)
        results.append({
            "model": v.model,
            "depth": v.depth,
            "variant": v.label,
            "memory_format": format_name(key[1]),
            "pruned_fraction": v.pruned_fraction,
            "active_ela_blocks": sum(m.active for m in blocks) if v.mask is not None else None,
            "measure_kl": v.measure_kl,
            "median_step_s": statistics.median(ts),
            "min_step_s": min(ts),
            "step_times_s": ts,
            "median_cpu_s": statistics.median(cs),
            "cpu_times_s": cs,
            "peak_memory_bytes": int(memory),
            "gmacs": prof.gmacs,
            "mparams": prof.mparams,
        })
        if log is not None:
            log(f"measured memory and MACs of {v.model} {v.label} ({format_name(key[1])})")
    for r in results:  # the faster layout of each variant, by median step
        same = [o for o in results if o["model"] == r["model"] and o["variant"] == r["variant"]]
        r["best_layout"] = r is min(same, key=lambda o: o["median_step_s"])
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "batch_size": batch_size, "steps": steps, "warmup": warmup, "device": str(device),
            "threads": torch.get_num_threads(), "image_size": image_size, "drop_path": drop_path, "seed": seed,
            "families": sorted(families), "memory_formats": [format_name(f) for f in formats], "amp": amp, "compile": compile,
            "optimizer": "SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)",
            "memory": MEMORY_NOTE,
            "malloc_keeps_freed": malloc_keeps_freed,
        },
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "loadavg_1min": load,
        },
        "versions": _versions(),
        "results": results,
    }


def _versions() -> dict[str, str]:
    import numpy

    from . import __version__

    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__, "elanet": __version__}


def _reference(results: list[dict], r: dict, label: str) -> dict | None:
    """The entry of ``label`` at the depth of ``r``, in its faster layout."""
    same = [o for o in results if o["depth"] == r["depth"] and o["variant"] == label]
    return next((o for o in same if o.get("best_layout", True)), same[0] if same else None)


def format_table(report: dict[str, Any]) -> str:
    """The results as a text table: median step, ratios to plain and MRLA-B (each in its faster layout),
    memory, GMACs; ``*`` marks a variant's faster layout."""
    res = report["results"]
    head = (f"{'model':<16} {'variant':<11} {'layout':<8} {'pruned':>6} {'step ms':>8} {'xplain':>6} {'xMRLA-B':>7} {'+ms':>7} "
            f"{'peak MB':>8} {'xMRLA-B':>7} {'GMACs':>7}")
    lines = [head, "-" * len(head)]
    for r in res:
        plain, base = _reference(res, r, "plain"), _reference(res, r, "MRLA-B")
        t = r["median_step_s"]
        ratio = lambda ref, key: f"{r[key] / ref[key]:.2f}" if ref and ref[key] else "-"  # noqa: E731
        over = f"{1e3 * (t - plain['median_step_s']):+.0f}" if plain else "-"
        pruned = "-" if r["pruned_fraction"] is None else f"{100 * r['pruned_fraction']:.0f}%"
        layout = ("NHWC" if r.get("memory_format") == "channels_last" else "NCHW") + ("*" if r.get("best_layout") else "")
        lines.append(
            f"{r['model']:<16} {r['variant']:<11} {layout:<8} {pruned:>6} {1e3 * t:>8.0f} {ratio(plain, 'median_step_s'):>6} "
            f"{ratio(base, 'median_step_s'):>7} {over:>7} {r['peak_memory_bytes'] / 2**20:>8.0f} "
            f"{ratio(base, 'peak_memory_bytes'):>7} {r['gmacs']:>7.4f}"
        )
    return "\n".join(lines)


def save_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON (creating the folder) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


# --- inference: eval-mode forward of plain, MRLA-B and exported (stripped) ELA -------------------------------

INFER_SCHEMA = "elanet-bench-infer/1"
INFER_FRACTIONS = (0.0, 0.5, 1.0)
INFER_BATCHES = (1, 64)
RUNTIMES = ("torch", "onnxruntime")


def make_infer_variants(depths: Sequence[int], *, fractions: Sequence[float] = INFER_FRACTIONS) -> list[Variant]:
    """Plain, MRLA-B and exported ELA at each pruned fraction (evenly spread masks) for every depth."""
    variants = []
    for d in dict.fromkeys(int(d) for d in depths):
        if f"resnet{d}" not in list_models():
            raise ValueError(f"no ResNet-{d}: use depths of {', '.join(m for m in list_models() if '_' not in m)}")
        variants += [Variant(f"resnet{d}", d, "plain"), Variant(f"resnet{d}_mrla_b", d, "MRLA-B")]
        name = f"resnet{d}_ela"
        ela = create_model(name)
        for f in fractions:
            variants.append(_ela_variant(ela, name, f"ELA {100 * f:g}% exported", spread_mask(ela, f)))
    return variants


def _infer_model(v: Variant, *, num_classes: int, device: torch.device, seed: int) -> nn.Module:
    """The eval-mode model of a variant; an ELA variant as exported (:func:`elanet.export.inference_model`)."""
    torch.manual_seed(seed)
    model = create_model(v.model, num_classes=num_classes).eval()
    if v.mask is not None:
        set_mask(model, v.mask)
        model = inference_model(model)
    return model.to(device)


def infer_targets(results: list[dict]) -> list[dict]:
    """Issue target per exported ELA entry: overhead <= (1 - f) * overhead(MRLA-B) + 5 % of plain.

    Overheads are median forward times minus plain's at the same depth and batch size, every variant
    at its faster layout (entries without ``best_layout`` count as their variant's only layout).
    """
    results = [r for r in results if r.get("best_layout", True)]
    rows = []
    for r in results:
        if r["pruned_fraction"] is None:
            continue
        same = [o for o in results if o["depth"] == r["depth"] and o["batch_size"] == r["batch_size"]]
        plain = next(o["median_s"] for o in same if o["variant"] == "plain")
        base = next(o["median_s"] for o in same if o["variant"] == "MRLA-B")
        f = r["pruned_fraction"]
        limit = (1 - f) * (base - plain) + 0.05 * plain
        rows.append({"depth": r["depth"], "batch_size": r["batch_size"], "variant": r["variant"], "pruned_fraction": f,
                     "memory_format": r.get("memory_format", "contiguous"),
                     "overhead_s": r["median_s"] - plain, "limit_s": limit, "met": r["median_s"] - plain <= limit})
    return rows


def run_infer_benchmark(
    variants: Sequence[Variant],
    *,
    batch_sizes: Sequence[int] = INFER_BATCHES,
    steps: int = 10,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    seed: int = 0,
    compile: bool = False,
    memory_formats: Sequence[str] = LAYOUTS,
    runtime: str = "torch",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time eval-mode forward passes of every variant at every batch size and layout, interleaved.

    A timed sample runs ``max(1, 64 // batch)`` forwards (so batch 1 is not all timer noise) and
    records the time per forward. Rounds shuffle the variants as in :func:`run_benchmark`. Each
    entry's ``best_layout`` marks the faster layout of its variant at its batch size; the targets
    compare every variant at its faster layout, as the training benchmark does.

    ``runtime='onnxruntime'`` times the deployed form instead: every variant, plain and MRLA-B
    included, is written by :func:`elanet.export.export_model` as ONNX (into a temporary folder)
    and run by an onnxruntime CPU session; the sessions share one pool of ``torch.get_num_threads()``
    threads, for the rest of the process (:func:`elanet.export.share_onnxruntime_threads`).
    onnxruntime chooses its own layout, so ``memory_formats`` does not apply.
    """
    if steps < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and batch sizes >= 1, got {steps}, {warmup}, {list(batch_sizes)}")
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available: use --device cpu")
    onnx = runtime == "onnxruntime"
    if onnx and (device.type != "cpu" or compile):
        raise ValueError("--runtime onnxruntime times the exported ONNX files on the CPU: use --device cpu, without --compile")
    formats = list(dict.fromkeys(resolve_memory_format(f, device) for f in memory_formats))
    if onnx:
        formats = [torch.contiguous_format]  # the exported graph is the same for both layouts
    if not formats:
        raise ValueError("memory_formats is empty: pass contiguous, channels_last or auto")
    if compile:  # one compilation per model, layout and batch size
        n = 8 * len(variants) * len(formats) * len(batch_sizes)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, n)
    models, sources, sizes, cases = [], [], [], []  # cases: (variant index, layout) per model
    folder = tempfile.TemporaryDirectory(prefix="elanet-bench-") if onnx else None
    if onnx:
        share_onnxruntime_threads(torch.get_num_threads())
    for k, v in enumerate(variants):
        info = model_info(v.model)
        model = _infer_model(v, num_classes=info["num_classes"], device=device, seed=seed)
        size = (3, image_size, image_size) if image_size else tuple(info["input_size"])
        for fmt in formats:
            m = copy.deepcopy(model).to(memory_format=fmt)
            if onnx:
                if log is not None:
                    log(f"exporting {v.model} ({v.label}) to ONNX, {k + 1}/{len(variants)}")
                path = Path(folder.name) / f"{k}.onnx"
                export_model(m, path, input_size=size)
                models.append(load_exported(path)[0])
            else:
                models.append(torch.compile(m) if compile else m)
            sources.append(m)
            sizes.append(size)
            cases.append((k, fmt))
    if folder is not None:  # the sessions hold the graphs; the files are not needed any more
        folder.cleanup()
    jobs = [(i, b) for b in batch_sizes for i in range(len(models))]
    g = torch.Generator().manual_seed(seed)
    base = {(b, s): torch.randn(b, *s, generator=g) for b in batch_sizes for s in set(sizes)}
    inputs = {(b, s, f): x.to(device).contiguous(memory_format=f) for (b, s), x in base.items() for f in formats}
    times: dict[tuple[int, int], list[float]] = {j: [] for j in jobs}
    rng = random.Random(seed)
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    start = time.perf_counter()
    with torch.inference_mode():
        for r in range(warmup + steps):
            rng.shuffle(jobs)
            for i, b in jobs:
                x, reps = inputs[(b, sizes[i], cases[i][1])], max(1, 64 // b)
                t = time.perf_counter()
                for _ in range(reps):
                    models[i](x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if r >= warmup:
                    times[(i, b)].append((time.perf_counter() - t) / reps)
            if load:
                load.append(os.getloadavg()[0])
            if log is not None:
                log(f"round {r + 1}/{warmup + steps} ({'warm-up' if r < warmup else 'timed'}) done after {time.perf_counter() - start:.0f} s")
    results = []
    for b in batch_sizes:
        for i, (k, fmt) in enumerate(cases):
            v = variants[k]
            prof = profile(sources[i], sizes[i])
            ts = times[(i, b)]
            results.append({"model": v.model, "depth": v.depth, "variant": v.label, "pruned_fraction": v.pruned_fraction,
                            "batch_size": b, "memory_format": format_name(fmt), "median_s": statistics.median(ts),
                            "min_s": min(ts), "times_s": ts, "gmacs": prof.gmacs, "mparams": prof.mparams})
    for r in results:  # the faster layout of each variant at each batch size
        same = [o for o in results if (o["model"], o["variant"], o["batch_size"]) == (r["model"], r["variant"], r["batch_size"])]
        r["best_layout"] = r is min(same, key=lambda o: o["median_s"])
    return {
        "schema": INFER_SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"batch_sizes": list(batch_sizes), "steps": steps, "warmup": warmup, "device": str(device),
                     "threads": torch.get_num_threads(), "image_size": image_size, "seed": seed, "compile": compile,
                     "memory_formats": [format_name(f) for f in formats], "runtime": runtime,
                     "what": ("every variant written as ONNX by elanet.export.export_model and run by onnxruntime (CPU)"
                              if onnx else "eval-mode forward under torch.inference_mode") +
                             "; exported ELA = the model with pruned attention removed and attention BN folded into the "
                             "value conv (elanet.export.inference_model), as elanet export writes it" +
                             ("" if onnx else "; run eagerly, its inference forms use the native kernels where "
                                              "they are built (the exported graph has the ATen ops)")},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "loadavg_1min": load,
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
        "versions": _versions() | ({"onnxruntime": _onnxruntime_version()} if onnx else {}),
        "results": results,
        "targets": infer_targets(results),
    }


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def format_infer_table(report: dict[str, Any]) -> str:
    """Median forward time per batch, ratio to plain, overhead and the issue target per ELA row."""
    res = report["results"]
    targets = {(t["depth"], t["batch_size"], t["variant"], t.get("memory_format", "contiguous")): t for t in report["targets"]}
    head = (f"{'model':<16} {'variant':<18} {'layout':<6} {'batch':>5} {'fwd ms':>9} {'xplain':>6} {'+ms':>8} {'limit ms':>9} "
            f"{'target':>6} {'GMACs':>7} {'Mparams':>7}")
    lines = [head, "-" * len(head)]
    if report["settings"].get("runtime", "torch") != "torch":
        lines.insert(0, f"every variant exported to ONNX and run by {report['settings']['runtime']}")
    for r in res:
        plain = next(o for o in res if o["depth"] == r["depth"] and o["batch_size"] == r["batch_size"] and o["variant"] == "plain"
                     and o.get("best_layout", True))
        t = targets.get((r["depth"], r["batch_size"], r["variant"], r.get("memory_format", "contiguous"))) if r.get("best_layout", True) else None
        limit, met = (f"{1e3 * t['limit_s']:.2f}", "met" if t["met"] else "MISSED") if t else ("-", "-")
        layout = ("NHWC" if r.get("memory_format") == "channels_last" else "NCHW") + ("*" if r.get("best_layout") else "")
        lines.append(f"{r['model']:<16} {r['variant']:<18} {layout:<6} {r['batch_size']:>5} {1e3 * r['median_s']:>9.2f} "
                     f"{r['median_s'] / plain['median_s']:>6.2f} {1e3 * (r['median_s'] - plain['median_s']):>+8.2f} "
                     f"{limit:>9} {met:>6} {r['gmacs']:>7.4f} {r['mparams']:>7.3f}")
    return "\n".join(lines)
