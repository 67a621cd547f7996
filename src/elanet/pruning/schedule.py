"""The staged pruning schedule (paper §3.4; SPEC §3.3): measurement windows, scores, decisions, mask."""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..attention import AttentionRecord
from .ebqm import MAPPINGS, check_ebqm_args, map_scores
from .kl import adjacent_kl
from .mask import get_mask, set_mask

__all__ = ["PruningSchedule", "PRESETS", "format_round"]

# Paper settings (SPEC §3.2-3.3): windows are 1-based inclusive epoch ranges.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar": dict(windows=[(1, 3), (45, 48), (91, 93)], alpha=5.0, beta=1.0, tau=0.3),
    "imagenet": dict(windows=[(1, 3), (51, 53)], alpha=2.0, beta=5.0, tau=0.25),
    "coco": dict(windows=[(1, 1), (7, 7)], alpha=2.0, beta=5.0, tau=0.2),
}
STRATEGIES = ("quantile", "threshold", "fixed")

ReduceFn = Callable[[Tensor], Tensor]


class PruningSchedule:
    """Accumulates KL redundancy scores in measurement windows and prunes ELA blocks at their ends.

    During a window every training step passes its :class:`AttentionRecord` to :meth:`accumulate`;
    the score of a pair of consecutive active blocks (l, l') of a stage is the mean KL divergence
    D(alpha_l || alpha_l') over samples, heads and steps, kept as float64 sum and count. At the end
    of the window (:meth:`end_epoch`) the scores are mapped (EBQM by default) and the later block of
    every pair whose mapped value is below ``tau`` is switched off. Pruning is cumulative.

    Args:
        windows: 1-based inclusive epoch ranges ``[(start, end), ...]``, increasing, not overlapping.
        gamma, alpha, beta: EBQM quantile and Beta shape parameters.
        tau: prune when the mapped value is below tau.
        strategy: ``'quantile'`` (EBQM or another ``mapping``), ``'threshold'`` (raw score below
            ``threshold``) or ``'fixed'`` (the ``fixed_count`` lowest scores).
        fixed_count: blocks the fixed strategy prunes per round, or one count per window (the
            paper's Table 4 matches them to what EBQM pruned in each round).
        mapping: step 4 of the quantile mapping (``'beta'`` is EBQM).
        eps: KL padding value.
        reduce_fn: sums a tensor across processes in place (e.g. ``dist.all_reduce``) before a decision.
    """

    def __init__(
        self,
        windows: Sequence[Sequence[int]],
        *,
        gamma: float = 0.5,
        alpha: float = 5.0,
        beta: float = 1.0,
        tau: float = 0.3,
        strategy: str = "quantile",
        mapping: str = "beta",
        threshold: float = 0.0,
        fixed_count: int | Sequence[int] = 1,
        eps: float = 1e-8,
        reduce_fn: ReduceFn | None = None,
    ) -> None:
        check_ebqm_args(gamma=gamma, alpha=alpha, beta=beta, tau=tau)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {mapping!r}: use one of {', '.join(MAPPINGS)}")
        counts = [fixed_count] if isinstance(fixed_count, int) else list(fixed_count)
        if any(not isinstance(k, int) or k < 0 for k in counts):
            raise ValueError(f"fixed_count must be an integer >= 0 or a list of them (one per window), got {fixed_count}")
        bad = [w for w in windows if len(w) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in w)]
        if bad:
            raise ValueError(f"pruning windows must be (start, end) pairs of whole epochs, got {bad[0]!r}")
        self.windows = [(int(s), int(e)) for s, e in windows]
        if not isinstance(fixed_count, int) and len(counts) != len(self.windows):
            raise ValueError(f"fixed_count lists {len(counts)} counts for {len(self.windows)} windows: give one per window")
        last = 0
        for s, e in self.windows:
            if not (1 <= s <= e) or s <= last:
                raise ValueError(f"pruning windows must be increasing, non-overlapping 1-based epoch ranges, got {self.windows}")
            last = e
        self.gamma, self.alpha, self.beta, self.tau = gamma, alpha, beta, tau
        self.strategy, self.mapping, self.threshold, self.fixed_count = strategy, mapping, threshold, fixed_count
        self.eps = eps
        self.reduce_fn = reduce_fn
        self.rounds: list[dict[str, Any]] = []
        self._pairs: list[tuple[int, int]] = []
        self._sum: Tensor | None = None
        self._count: Tensor | None = None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "PruningSchedule":
        """The paper's settings for ``'cifar'``, ``'imagenet'`` or ``'coco'``, with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown pruning preset {name!r}: use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def check_epochs(self, epochs: int) -> None:
        """Raise ``ValueError`` if a window ends after the last training epoch."""
        if self.windows and self.windows[-1][1] > epochs:
            raise ValueError(f"pruning window {self.windows[-1]} ends after the last epoch ({epochs}): shorten it or train longer")

    def measuring(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) lies in a measurement window."""
        return any(s <= epoch <= e for s, e in self.windows)

    @torch.no_grad()
    def accumulate(self, rec: AttentionRecord) -> None:
        """Add one step's divergences between consecutive active blocks of each stage."""
        pairs = [(rec.blocks[i], rec.blocks[i + 1], i) for i in range(len(rec.blocks) - 1) if rec.stages[i] == rec.stages[i + 1]]
        if not pairs:
            return
        vals = torch.stack([adjacent_kl(rec.weights[i], rec.weights[i + 1], self.eps, check=False).mean(1).sum(0)
                            for _, _, i in pairs])  # softmax outputs: no per-step check (a device sync)
        keys = [(a, b) for a, b, _ in pairs]
        if self._sum is None:
            self._pairs = keys
            self._sum = torch.zeros(len(keys), dtype=torch.float64, device=vals.device)
            self._count = torch.zeros(len(keys), dtype=torch.float64, device=vals.device)
        elif keys != self._pairs:
            raise RuntimeError("the active blocks changed inside a measurement window; change the mask only through the schedule")
        self._sum += vals.double()
        self._count += rec.weights[0].shape[0]

    def end_epoch(self, epoch: int, model: nn.Module) -> dict[str, Any] | None:
        """At the end of a window, decide and apply the new mask; returns the round's report or None."""
        if not any(e == epoch for _, e in self.windows):
            return None
        return self.decide(model, epoch=epoch)

    def scores(self) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The pairs and their window scores (sum / count), all-reduced first when ``reduce_fn`` is set."""
        if self._sum is None:
            return [], np.zeros(0)
        both = torch.stack([self._sum, self._count])
        if self.reduce_fn is not None:
            self.reduce_fn(both)
        s, c = both.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return list(self._pairs), s / c

    def decide(self, model: nn.Module, *, epoch: int = 0) -> dict[str, Any]:
        """Map the accumulated scores, prune, reset the accumulators and return the round's report."""
        pairs, scores = self.scores()
        mask = get_mask(model)
        note = None
        if not pairs:
            mapped, note = np.ones(0), "no scores were accumulated in this window: nothing pruned"
        elif self.strategy == "quantile":
            mapped, note = map_scores(scores, mapping=self.mapping, gamma=self.gamma, alpha=self.alpha, beta=self.beta)
        elif self.strategy == "threshold":
            mapped = np.where(np.isfinite(scores) & (scores < self.threshold), 0.0, 1.0)
        else:
            order = [i for i in np.argsort(scores, kind="stable") if np.isfinite(scores[i])][: self._count_now()]
            mapped = np.ones_like(scores)
            mapped[order] = 0.0
        if len(pairs) and not np.isfinite(scores).all():
            warnings.warn("non-finite redundancy score(s): those blocks are kept", RuntimeWarning, stacklevel=2)
        cut = self.tau if self.strategy == "quantile" else 0.5
        pruned = [later for (_, later), v in zip(pairs, mapped) if v < cut]
        for b in pruned:
            mask[b] = False
        set_mask(model, mask)
        report = {
            "round": len(self.rounds) + 1,
            "epoch": epoch,
            "pairs": [list(p) for p in pairs],
            "scores": [float(x) if math.isfinite(x) else None for x in scores],
            "mapped": [float(x) for x in mapped],
            "tau": self.tau if self.strategy == "quantile" else None,
            "pruned": pruned,
            "mask": list(mask),
            "note": note,
        }
        self.rounds.append(report)
        self._pairs, self._sum, self._count = [], None, None
        return report

    def _count_now(self) -> int:
        """Blocks the fixed strategy prunes in the round being decided."""
        if isinstance(self.fixed_count, int):
            return self.fixed_count
        return self.fixed_count[min(len(self.rounds), len(self.fixed_count) - 1)]

    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain Python data (loads with ``torch.load(weights_only=True)``)."""
        return {
            "windows": [list(w) for w in self.windows],
            "gamma": self.gamma, "alpha": self.alpha, "beta": self.beta, "tau": self.tau,
            "strategy": self.strategy, "mapping": self.mapping, "threshold": self.threshold,
            "fixed_count": self.fixed_count if isinstance(self.fixed_count, int) else list(self.fixed_count), "eps": self.eps,
            "rounds": copy.deepcopy(self.rounds),
            "pairs": [list(p) for p in self._pairs],
            "sum": None if self._sum is None else self._sum.cpu().tolist(),
            "count": None if self._count is None else self._count.cpu().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Restore a state from :meth:`state_dict` (settings, rounds and partial window sums)."""
        self.__init__(  # type: ignore[misc]
            state["windows"], gamma=state["gamma"], alpha=state["alpha"], beta=state["beta"], tau=state["tau"],
            strategy=state["strategy"], mapping=state["mapping"], threshold=state["threshold"],
            fixed_count=state["fixed_count"], eps=state["eps"], reduce_fn=self.reduce_fn,
        )
        self.rounds = copy.deepcopy(list(state["rounds"]))
        self._pairs = [tuple(p) for p in state["pairs"]]
        if state["sum"] is not None:
            self._sum = torch.tensor(state["sum"], dtype=torch.float64, device=device)
            self._count = torch.tensor(state["count"], dtype=torch.float64, device=device)


def format_round(report: dict[str, Any], model: nn.Module | None = None) -> str:
    """A round as a text table: pair, score, mapped value, kept / pruned."""
    lines = [f"pruning round {report['round']} (epoch {report['epoch']})"
             + (f", tau={report['tau']:g}" if report.get("tau") is not None else "")]
    if report.get("note"):
        lines.append(f"  {report['note']}")
    lines.append(f"  {'pair':>9} {'score':>12} {'mapped':>8}  decision")
    for (a, b), s, m in zip(report["pairs"], report["scores"], report["mapped"]):
        decision = "pruned" if b in report["pruned"] else "kept"
        score = "nan" if s is None else f"{s:.6f}"
        lines.append(f"  {a:>4}->{b:<4} {score:>12} {m:>8.4f}  {decision}")
    active = sum(report["mask"])
    lines.append(f"  active blocks: {active}/{len(report['mask'])}, pruned this round: {report['pruned'] or 'none'}")
    return "\n".join(lines)
