"""Utility metrics and a vectorised (optionally patient-clustered) bootstrap for AUROC.

Every resample is a row of weights over the samples (how often each sample was drawn). AUROC under weights
is computed from one sort of the scores: for each distinct score, the weighted count of negatives below it
(plus half the ties), summed over positives. One sort serves every resample, every label subset and every
group, so the paired comparisons use exactly the same resamples for both models.
"""

from __future__ import annotations

import numpy as np

from privaudit import limits
from privaudit.audit.stats import _BLOCK_BYTES
from privaudit.errors import ConfigError

# Keep a (resamples x samples) float64 block below this many bytes.


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
    """Resample indices ``(n_boot, n_units)``, drawn with replacement from one seeded generator.

    The naive reference for :func:`draw_counts` (tests and benchmarks); the audit draws counts directly."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_units, size=(n_boot, n_units))


def counts_from_indices(indices: np.ndarray, n_units: int) -> np.ndarray:
    """How often each unit appears in each resample: ``(B, n_units)`` counts."""
    out = np.empty((indices.shape[0], n_units))
    for b, row in enumerate(indices):  # one bincount per row beats one over the flattened (B * n) offsets
        out[b] = np.bincount(row, minlength=n_units)
    return out


COUNT_BLOCK = 1024   # resamples per sample-major block (the layout of stats.SampleMajorWeights)
_COUNT_TILE = 64     # resamples counted at a time before their transposed copy into the block


def draw_counts(n_units: int, n_boot: int, seed: int, *, block: int = COUNT_BLOCK,
                workers: int = 1) -> list[np.ndarray]:
    """Bootstrap counts drawn directly in sample-major blocks: ``(n_units, b)`` arrays, ``b <= block``.

    Column j of block k is resample ``k * block + j``: ``n_units`` draws with replacement (a multinomial with
    equal probabilities, exactly the resample :func:`draw_indices` draws), counted per unit. Each block draws
    its indices from its own generator, ``SeedSequence(seed).spawn(n_blocks)[k]``, so any block can be redrawn
    alone; the indices are 32-bit and are counted ``_COUNT_TILE`` resamples at a time (``np.bincount`` per
    resample, then one transposed copy into the block), so neither the ``(B, n)`` index matrix nor a
    ``(B, n)`` float64 count matrix is ever built (the old set-up did both, then transposed). Blocks are
    float32 (integer sums exact below 2**24) or float64 from ``n_units >= 2**24``. ``workers > 1`` draws
    blocks in that many threads; the result does not depend on it.

    The resamples are not those of ``draw_indices(n_units, n_boot, seed)`` (another stream), but they have
    the same law; tests/test_resampling.py checks the law and the AUROC of each resample against
    ``roc_auc_score`` on the expanded indices.
    """
    if n_units < 1 or n_boot < 1 or block < 1:
        raise ValueError(f"need n_units, n_boot and block >= 1, got {n_units}, {n_boot}, {block}")
    dtype = np.float32 if n_units < 2**24 else np.float64
    index_type = np.int32 if n_units < 2**31 else np.int64
    starts = range(0, n_boot, block)

    def one(b0, child):
        rng = np.random.default_rng(child)
        width = min(block, n_boot - b0)
        counts = np.empty((n_units, width), dtype=dtype)
        for t0 in range(0, width, _COUNT_TILE):
            tile = min(_COUNT_TILE, width - t0)
            idx = rng.integers(0, n_units, size=(tile, n_units), dtype=index_type)
            rows = np.empty((tile, n_units), dtype=dtype)
            for j in range(tile):
                rows[j] = np.bincount(idx[j], minlength=n_units)
            counts[:, t0:t0 + tile] = rows.T
        return counts

    children = np.random.SeedSequence(seed).spawn(len(starts))
    if workers > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(workers, len(starts))) as pool:
            return list(pool.map(one, starts, children))
    return [one(b0, child) for b0, child in zip(starts, children)]


class Resampler:
    """The study's bootstrap: one set of resamples over the test samples, shared by every metric and model.

    With ``cluster`` and repeated patient ids, patients are resampled and each image takes its patient's count.
    The counts are drawn once, in sample-major blocks (:func:`draw_counts`); :meth:`sample_major` hands them to
    the fast AUROC without a copy (a gather by patient when clustered), and :attr:`weights`, the ``(B, n)``
    matrix the other metrics multiply with, is built from them on first use.
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
            codes = codes.ravel()
            if len(uniq) == n:
                codes = None  # every patient has one image: a cluster bootstrap is the plain bootstrap
        self.clustered = codes is not None
        self.codes = codes
        self.n_units = len(np.unique(codes)) if codes is not None else n
        self.unit_blocks = draw_counts(self.n_units, n_boot, seed)
        self._weights = None

    @property
    def weights(self) -> np.ndarray:
        """``(B, n)`` float64 counts: row b says how often each sample was drawn in resample b."""
        if self._weights is None:
            units = np.concatenate([blk.T for blk in self.unit_blocks]).astype(np.float64)
            self._weights = units[:, self.codes] if self.codes is not None else units
        return self._weights

    def sample_major(self):
        """The counts as :class:`privaudit.audit.stats.SampleMajorWeights` for ``weighted_auroc_fast``."""
        from privaudit.audit.stats import SampleMajorWeights

        blocks = self.unit_blocks if self.codes is None else [blk[self.codes] for blk in self.unit_blocks]
        return SampleMajorWeights.from_blocks(blocks)

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
