"""Utility metrics and a vectorised (optionally patient-clustered) bootstrap for AUROC.

Every resample is a row of weights over the samples (how often each sample was drawn). AUROC under weights
is computed from one sort of the scores: for each distinct score, the weighted count of negatives below it
(plus half the ties), summed over positives. One sort serves every resample, every label subset and every
group, so the paired comparisons use exactly the same resamples for both models.
"""

from __future__ import annotations

import numpy as np

from privaudit import limits
from privaudit.errors import ConfigError

# Keep a (resamples x samples) float64 block below this many bytes.
_BLOCK_BYTES = 256 * 2**20


def auroc(y_true, y_score) -> float:
    """AUROC (ties count one half), ``nan`` when only one class is present, as sklearn warns and returns."""
    y = np.asarray(y_true, dtype=float)
    w = np.ones((1, len(y)))
    return float(weighted_auroc(y, np.asarray(y_score, dtype=float), w)[0])


def weighted_auroc(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC for each row of ``weights`` (shape ``(B, n)``); ``nan`` where a row lacks a class.

    Equivalent to ``roc_auc_score`` on the multiset of samples that the weights describe.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=float)
    weights = np.atleast_2d(weights)
    order = np.argsort(y_score, kind="mergesort")
    s = y_score[order]
    pos = (y_true[order] == 1)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each run of tied scores
    out = np.empty(weights.shape[0])
    rows = max(1, _BLOCK_BYTES // max(1, 8 * len(s)))
    for b0 in range(0, weights.shape[0], rows):
        w = weights[b0:b0 + rows][:, order].astype(float, copy=False)
        wp = np.where(pos, w, 0.0)
        wn = w - wp
        if len(starts) < len(s):  # ties present: collapse each tied run into one bin
            wp = np.add.reduceat(wp, starts, axis=1)
            wn = np.add.reduceat(wn, starts, axis=1)
        neg_below = np.cumsum(wn, axis=1) - wn
        num = np.einsum("bu,bu->b", wp, neg_below + 0.5 * wn)
        den = wp.sum(axis=1) * wn.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b0:b0 + rows] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def draw_indices(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    """Resample indices ``(n_boot, n_units)``, drawn with replacement from one seeded generator."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_units, size=(n_boot, n_units))


def counts_from_indices(indices: np.ndarray, n_units: int) -> np.ndarray:
    """How often each unit appears in each resample: ``(B, n_units)`` counts."""
    out = np.empty((indices.shape[0], n_units))
    for b, row in enumerate(indices):  # one bincount per row beats one over the flattened (B * n) offsets
        out[b] = np.bincount(row, minlength=n_units)
    return out


class Resampler:
    """The study's bootstrap: one set of resamples over the test samples, shared by every metric and model.

    With ``cluster`` and repeated patient ids, patients are resampled and each image takes its patient's count.
    """

    def __init__(self, n: int, *, n_boot: int, seed: int, clusters=None, cluster: bool = True):
        limits.check_limit("n_boot", n_boot)
        if n_boot * n > limits.MAX_BOOTSTRAP_CELLS:   # the weights below are an (n_boot, n) float64 matrix
            raise ConfigError(f"n_boot {n_boot} resamples of {n} test samples need {n_boot * n:.2g} bootstrap "
                              f"weights, above the limit {limits.MAX_BOOTSTRAP_CELLS:.2g}; give n_boot at most "
                              f"{max(1, limits.MAX_BOOTSTRAP_CELLS // max(n, 1))}")
        self.n = n
        self.n_boot = n_boot
        self.seed = seed
        codes = None
        if cluster and clusters is not None:
            uniq, codes = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
            if len(uniq) == n:
                codes = None  # every patient has one image: a cluster bootstrap is the plain bootstrap
        self.clustered = codes is not None
        self.codes = codes
        self.n_units = len(np.unique(codes)) if codes is not None else n
        self.indices = draw_indices(self.n_units, n_boot, seed)
        unit_counts = counts_from_indices(self.indices, self.n_units)
        self.weights = unit_counts[:, codes] if codes is not None else unit_counts

    def describe(self) -> dict:
        return {"n_boot": self.n_boot, "cluster": self.clustered, "seed": self.seed, "n_units": self.n_units}


def percentile_ci(samples: np.ndarray, ci: float) -> tuple[float | None, float | None, int]:
    """Percentile interval over the finite resamples; returns (low, high, number of finite resamples)."""
    finite = samples[np.isfinite(samples)]
    if len(finite) < 2:
        return None, None, len(finite)
    a = (1 - ci) / 2
    lo, hi = np.quantile(finite, [a, 1 - a])
    return float(lo), float(hi), len(finite)


def paired_p_value(diffs: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value for a paired difference: (1 + 2 min(#d<=0, #d>=0)) / (B + 1), at most 1."""
    d = diffs[np.isfinite(diffs)]
    if len(d) == 0:
        return None
    k = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return float(min(1.0, (1 + 2 * k) / (len(d) + 1)))
