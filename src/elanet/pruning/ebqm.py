"""Enhanced Beta Quantile Mapping (paper Algorithm 1, eq. 12-15) and the alternatives of Tables 4-6."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["ebqm", "map_scores", "check_ebqm_args", "MAPPINGS"]

MAPPINGS = ("beta", "gamma", "normal", "softmax", "sigmoid", "gqm", "eqm")


def check_ebqm_args(*, gamma: float, alpha: float, beta: float, tau: float | None = None) -> None:
    """Raise ``ValueError`` unless 0 < gamma <= 1, alpha > 0, beta > 0 and 0 <= tau <= 1."""
    if not 0.0 < gamma <= 1.0:  # NaN fails every comparison, so it is refused too
        raise ValueError(f"gamma (the quantile of candidate scores) must be in (0, 1], got {gamma}")
    if not (0 < alpha < math.inf and 0 < beta < math.inf):
        raise ValueError(f"alpha and beta (Beta shape parameters) must be finite and > 0, got alpha={alpha}, beta={beta}")
    if tau is not None and not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau (the pruning threshold on mapped values) must be in [0, 1], got {tau}")


def _candidates(a: np.ndarray, gamma: float) -> tuple[np.ndarray, str | None]:
    """Boolean mask of S_gamma, or an empty mask with the reason nothing can be pruned."""
    finite = np.isfinite(a)
    none = np.zeros_like(finite)
    if finite.sum() < 2:
        return none, "fewer than two finite scores: nothing pruned"
    cand = finite & (a <= np.quantile(a[finite], gamma))
    if cand.sum() < 2:
        return none, f"fewer than two scores at or below the {gamma:g}-quantile: nothing pruned"
    if a[cand].max() == a[cand].min():
        return none, "candidate scores are all equal (no spread to map): nothing pruned"
    return cand, None


def map_scores(
    scores: Sequence[float] | np.ndarray,
    *,
    mapping: str = "beta",
    gamma: float = 0.5,
    alpha: float = 5.0,
    beta: float = 1.0,
) -> tuple[np.ndarray, str | None]:
    """Quantile-map pair scores to [0, 1]; the block of a pair is pruned when its value is < tau.

    Steps 1-3 of EBQM (gamma-quantile candidates, min-max normalisation) are shared; step 4 uses
    ``mapping``: ``'beta'`` (EBQM, Beta(alpha, beta) CDF), ``'gamma'`` (Gamma(alpha, rate beta)
    CDF), ``'normal'`` (standard normal CDF of the z-scored values), ``'softmax'`` (softmax scaled
    by its maximum), ``'sigmoid'`` (``sigmoid(alpha * (x - 0.5))``), or the appendix-A quantile
    mappings ``'gqm'`` / ``'eqm'`` (empirical CDF -> inverse CDF of a Gamma / Exponential fitted to
    the candidates -> min-max). Non-candidates and non-finite scores map to 1 (never pruned).

    Returns:
        The mapped values in input order (float64) and a note when nothing could be mapped.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping {mapping!r}: use one of {', '.join(MAPPINGS)}")
    check_ebqm_args(gamma=gamma, alpha=alpha, beta=beta)
    a = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = np.ones_like(a)
    cand, note = _candidates(a, gamma)
    if note is not None:
        return out, note
    s = a[cand]
    x = (s - s.min()) / (s.max() - s.min())
    if mapping == "beta":
        y = stats.beta.cdf(x, alpha, beta)
    elif mapping == "gamma":
        y = stats.gamma.cdf(x, alpha, scale=1.0 / beta)
    elif mapping == "normal":
        y = stats.norm.cdf((x - x.mean()) / x.std())
    elif mapping == "softmax":
        e = np.exp(x - x.max())
        y = e / e.sum()
        y = y / y.max()
    elif mapping == "sigmoid":
        y = 1.0 / (1.0 + np.exp(-alpha * (x - 0.5)))
    else:
        p = (stats.rankdata(s) - 0.5) / len(s)  # empirical CDF, kept inside (0, 1)
        if mapping == "gqm":
            shape, loc, scale = stats.gamma.fit(s - s.min() + 1e-12, floc=0.0)
            y = stats.gamma.ppf(p, shape, loc=loc, scale=scale)
        else:
            y = stats.expon.ppf(p, scale=max(s.mean() - s.min(), 1e-12))
        y = (y - y.min()) / (y.max() - y.min())
    out[cand] = y
    return out, None


def ebqm(scores: Sequence[float] | np.ndarray, *, gamma: float = 0.5, alpha: float, beta: float) -> np.ndarray:
    """Enhanced Beta Quantile Mapping of the pair scores (paper Algorithm 1; SPEC §3.2).

    1. Q = the gamma-quantile of the scores (linear interpolation); 2. candidates S = {a <= Q};
    3. min-max normalise the candidates; 4. map them through the Beta(alpha, beta) CDF. Scores
    above Q map to 1. With fewer than two candidates or no spread, everything maps to 1 (nothing
    is pruned); a non-finite score maps to 1 with a warning.

    Returns:
        The mapped values, float64, in input order.
    """
    a = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(a).all():
        warnings.warn(f"{int((~np.isfinite(a)).sum())} non-finite redundancy score(s): their blocks are kept", RuntimeWarning, stacklevel=2)
    return map_scores(a, mapping="beta", gamma=gamma, alpha=alpha, beta=beta)[0]
