"""Bootstrap-vectorised classification metrics, DeLong's test for paired AUROCs, and BCa intervals.

Every ``weighted_*`` function follows :func:`privaudit.audit.utility.weighted_auroc`: ``weights`` is a
``(B, n)`` matrix whose row ``b`` says how many times each of the ``n`` samples was drawn in resample ``b``
(:func:`~privaudit.audit.utility.counts_from_indices`), and the metric of row ``b`` equals the scikit-learn
metric on the multiset ``y[idx_b], score[idx_b]``. A row on which a metric is undefined (no positives where
the metric needs them, no negatives where it needs them, zero total weight) gives ``nan``: these functions
never raise on a degenerate resample. They do raise ``ValueError`` on malformed input (labels other than 0/1,
non-finite scores, probabilities outside [0, 1], mismatched shapes), before any resample is looked at.

Rank-based metrics sort the scores once and reuse that order for every row; threshold metrics reduce to
matrix products ``W @ M``. Row blocks keep the temporaries near ``_BLOCK_BYTES``.

:func:`weighted_auroc_fast` with :class:`SampleMajorWeights` gives exactly the values of ``weighted_auroc``
for integer counts, an order of magnitude faster on large test sets (see ``benchmarks/bootstrap_auroc.py``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtr, ndtri
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_curve

from privaudit.audit.utility import _BLOCK_BYTES

# float32 sums of non-negative integers are exact while every partial sum stays below 2**24.
_FLOAT32_EXACT = 2**24


# ---- input handling ------------------------------------------------------------------------------------------
def _labels_scores(y_true, y_score, *, probabilities: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(boolean positives, float scores) after checking shapes, 0/1 labels and finite scores."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and the scores must be 1-d of the same length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if probabilities and ((s < 0).any() or (s > 1).any()):
        raise ValueError("probabilities must lie in [0, 1]")
    return y == 1, s


def _weight_matrix(weights, n: int) -> np.ndarray:
    w = np.atleast_2d(np.asarray(weights))
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"weights must have shape (B, {n}), got {np.shape(weights)}")
    return w


def _row_blocks(n_rows: int, n_cols: int, n_temporaries: int):
    """``(start, stop)`` of row blocks whose ``n_temporaries`` float64 copies fit in ``_BLOCK_BYTES``."""
    rows = max(1, _BLOCK_BYTES // max(1, 8 * n_cols * n_temporaries))
    for b0 in range(0, n_rows, rows):
        yield b0, min(n_rows, b0 + rows)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den > 0``, ``nan`` elsewhere (no warnings)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=float), np.asarray(den, dtype=float))
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _descending_runs(pos: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order by decreasing score, the positives in that order, and the first index of each run of tied scores."""
    order = np.argsort(-s, kind="mergesort")
    sd = s[order]
    starts = np.flatnonzero(np.r_[True, sd[1:] != sd[:-1]])
    return order, pos[order], starts


def _run_weights(weights: np.ndarray, order: np.ndarray, pos_sorted: np.ndarray,
                 starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight of each run of tied scores, per row: two ``(rows, runs)`` arrays."""
    w = np.take(weights, order, axis=1).astype(float, copy=False)
    wp = np.where(pos_sorted, w, 0.0)
    wn = w - wp
    if len(starts) < len(order):
        wp = np.add.reduceat(wp, starts, axis=1)
        wn = np.add.reduceat(wn, starts, axis=1)
    return wp, wn


# ---- ranking metrics -----------------------------------------------------------------------------------------
def _descending_counts(y_true, y_score, weights):
    """Yield ``(b0, b1, n_rows, wp, tp, fp)`` per block of resample rows: the positive weight of each run of
    tied scores in descending order, and the cumulative true- and false-positive weights scored at or above
    it. An empty input yields one ``(0, 0, n_rows, None, None, None)``."""
    pos, s = _labels_scores(y_true, y_score)
    w_all = _weight_matrix(weights, len(s))
    if len(s) == 0:
        yield 0, 0, w_all.shape[0], None, None, None
        return
    order, pos_sorted, starts = _descending_runs(pos, s)
    for b0, b1 in _row_blocks(w_all.shape[0], len(s), 6):
        wp, wn = _run_weights(w_all[b0:b1], order, pos_sorted, starts)
        yield b0, b1, w_all.shape[0], wp, np.cumsum(wp, axis=1), np.cumsum(wn, axis=1)


def weighted_average_precision(y_true, y_score, weights) -> np.ndarray:
    """Average precision of each resample (row of ``weights``): ``(B,)``, ``nan`` where a row lacks a class.

    With thresholds at the distinct scores ``t_1 > t_2 > ...`` (predicted positive: ``score >= t_k``),
    ``TP_k`` and ``FP_k`` the weights of the positives and negatives scored ``>= t_k``, ``P`` the total
    positive weight and ``p_k`` the positive weight scored exactly ``t_k``::

        AP = sum_k (R_k - R_{k-1}) * Prec_k = (1 / P) * sum_k p_k * TP_k / (TP_k + FP_k)

    which is ``sklearn.metrics.average_precision_score`` (the step-wise, non-interpolated AP) on the
    resampled multiset, ties included. scikit-learn returns 0 (with a warning) when there is no positive and
    1 when there is no negative; both are degenerate resamples here and give ``nan``, as for AUROC.
    """
    out = None
    for b0, b1, n_rows, wp, tp, fp in _descending_counts(y_true, y_score, weights):
        out = np.full(n_rows, np.nan) if out is None else out
        if wp is None:
            return out
        called = tp + fp
        precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
        n_pos, n_neg = tp[:, -1], called[:, -1] - tp[:, -1]
        ap = _ratio(np.einsum("bu,bu->b", wp, precision), n_pos)
        out[b0:b1] = np.where(n_neg > 0, ap, np.nan)
    return out


def weighted_sensitivity_at_specificity(y_true, y_score, weights, specificity: float = 0.9) -> np.ndarray:
    """Highest sensitivity whose specificity reaches ``specificity``, per resample: ``(B,)``.

    Thresholds ``t`` run over the distinct scores and ``+inf`` (predicted positive: ``score >= t``)::

        SensAtSpec = max { TPR(t) : 1 - FPR(t) >= specificity }

    where ``TPR(t) = TP(t) / P`` and ``FPR(t) = FP(t) / N`` on the resample; ``t = +inf`` (nothing called
    positive, TPR 0, specificity 1) keeps the set non-empty. This is
    ``max(tpr[1 - fpr >= specificity])`` over ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``
    of the resampled multiset. ``nan`` where a row has no positive or no negative weight.
    """
    if not 0.0 <= specificity <= 1.0:
        raise ValueError(f"specificity must lie in [0, 1], got {specificity}")
    out = None
    for b0, b1, n_rows, wp, tp, fp in _descending_counts(y_true, y_score, weights):
        out = np.full(n_rows, np.nan) if out is None else out
        if wp is None:
            return out
        n_pos, n_neg = tp[:, -1:], fp[:, -1:]
        fpr = np.divide(fp, n_neg, out=np.ones_like(fp), where=n_neg > 0)
        best = np.max(np.where(1.0 - fpr >= specificity, tp, 0.0), axis=1)
        out[b0:b1] = np.where(n_neg[:, 0] > 0, _ratio(best, n_pos[:, 0]), np.nan)
    return out


# ---- calibration ---------------------------------------------------------------------------------------------
def weighted_brier(y_true, y_prob, weights) -> np.ndarray:
    """Brier score ``sum_i w_i (y_i - p_i)^2 / sum_i w_i`` per resample: ``(B,)``; ``nan`` for zero total weight.

    Equals ``sklearn.metrics.brier_score_loss`` on the resample; it is defined with a single class present.
    Reference: Brier (1950), Monthly Weather Review 78(1):1-3.
    """
    pos, p = _labels_scores(y_true, y_prob, probabilities=True)
    w = _weight_matrix(weights, len(p))
    sums = w @ np.column_stack([(pos.astype(float) - p) ** 2, np.ones_like(p)])
    return _ratio(sums[:, 0], sums[:, 1])


def _calibration_bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each probability: bin ``i`` is ``[i/n_bins, (i+1)/n_bins)``, the last bin also holds 1."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    edges = np.arange(n_bins + 1) / n_bins
    return np.minimum(np.searchsorted(edges, p, side="right") - 1, n_bins - 1)


def ece(y_true, y_prob, n_bins: int = 10) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins on [0, 1]; ``nan`` for empty input.

    ``ECE = sum_i (n_i / n) * |mean(y in bin i) - mean(p in bin i)|`` over the non-empty bins, bin ``i`` being
    ``[i/n_bins, (i+1)/n_bins)`` and the last bin closed (Naeini, Cooper & Hauskrecht, AAAI 2015; Guo et al.,
    ICML 2017). Defined with a single class present.
    """
    pos, p = _labels_scores(y_true, y_prob, probabilities=True)
    if len(p) == 0:
        return float("nan")
    bins = _calibration_bins(p, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=pos.astype(float) - p, minlength=n_bins)  # n_i * (mean y - mean p) in bin i
    seen = count > 0
    return float(np.sum(count[seen] / len(p) * np.abs(gap[seen] / count[seen])))


def weighted_ece(y_true, y_prob, weights, n_bins: int = 10) -> np.ndarray:
    """:func:`ece` of each resample: ``(B,)``; ``nan`` for zero total weight.

    With ``W_i``, ``Y_i``, ``P_i`` the weight, weighted label sum and weighted probability sum of bin ``i``::

        ECE = sum_i (W_i / W) * |Y_i / W_i - P_i / W_i| = sum_i |Y_i - P_i| / W

    so the whole bootstrap is one product ``weights @ M`` with ``M[j, i] = (y_j - p_j) [bin(j) = i]``.
    """
    pos, p = _labels_scores(y_true, y_prob, probabilities=True)
    w = _weight_matrix(weights, len(p))
    bins = _calibration_bins(p, n_bins)
    m = np.zeros((len(p), n_bins + 1))
    m[np.arange(len(p)), bins] = pos.astype(float) - p
    m[:, n_bins] = 1.0
    sums = w @ m
    return _ratio(np.abs(sums[:, :n_bins]).sum(axis=1), sums[:, n_bins])


# ---- thresholded rates ---------------------------------------------------------------------------------------
def youden_threshold(y_true, y_prob) -> float:
    """Threshold maximising Youden's ``J = TPR - FPR`` (Youden 1950, Cancer 3:32-35); ``nan`` if a class is absent.

    Candidates are the finite thresholds of ``sklearn.metrics.roc_curve(drop_intermediate=False)`` (the
    distinct scores; the leading ``inf`` is dropped); predicted positive means ``p >= threshold``. Ties in
    ``J`` go to the highest threshold.
    """
    pos, p = _labels_scores(y_true, y_prob)
    if pos.all() or not pos.any():
        return float("nan")
    fpr, tpr, thresholds = roc_curve(pos.astype(int), p, drop_intermediate=False)
    j = tpr[1:] - fpr[1:]
    return float(thresholds[1:][np.argmax(j)])


def weighted_rates(y_true, y_prob, threshold: float, weights) -> dict[str, np.ndarray]:
    """Confusion-matrix rates at a fixed threshold (positive: ``p >= threshold``) per resample.

    Returns ``sensitivity = TP/P``, ``specificity = TN/N``, ``fpr = FP/N``, ``accuracy = (TP+TN)/W`` and
    ``selection_rate = (TP+FP)/W``, each ``(B,)``; a rate is ``nan`` where its denominator is 0 (no positive
    weight, no negative weight, zero total), and every rate is ``nan`` for a ``nan`` threshold (e.g. a
    :func:`youden_threshold` of one-class data).
    """
    pos, p = _labels_scores(y_true, y_prob)
    w = _weight_matrix(weights, len(p))
    if np.isnan(threshold):
        nan = np.full(w.shape[0], np.nan)
        return {k: nan.copy() for k in ("sensitivity", "specificity", "accuracy", "selection_rate", "fpr")}
    called = p >= threshold
    tp, n_pos, fp, n_neg = (w @ np.column_stack([pos & called, pos, ~pos & called, ~pos]).astype(float)).T
    total = n_pos + n_neg
    return {
        "sensitivity": _ratio(tp, n_pos),
        "specificity": _ratio(n_neg - fp, n_neg),
        "accuracy": _ratio(tp + n_neg - fp, total),
        "selection_rate": _ratio(tp + fp, total),
        "fpr": _ratio(fp, n_neg),
    }


# ---- DeLong's test -------------------------------------------------------------------------------------------
def _structural_components(scores: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values for each score row, by midranks (Sun & Xu 2014).

    For positive ``i`` and negative ``j`` with ``psi(x, y) = 1 [x > y] + 0.5 [x = y]``::

        V10_i = (1/n) sum_j psi(X_i, Y_j) = (Tz_i - Tx_i) / n
        V01_j = (1/m) sum_i psi(X_i, Y_j) = 1 - (Tz_j - Ty_j) / m

    with ``Tz``, ``Tx``, ``Ty`` the midranks among all samples, the positives and the negatives: the
    difference of midranks counts the other class below (ties one half). Returns ``(k, m)`` and ``(k, n)``.
    """
    m, n = int(pos.sum()), int((~pos).sum())
    tz = rankdata(scores, axis=1)
    v10 = (tz[:, pos] - rankdata(scores[:, pos], axis=1)) / n
    v01 = 1.0 - (tz[:, ~pos] - rankdata(scores[:, ~pos], axis=1)) / m
    return v10, v01


def _sample_variance(x: np.ndarray) -> float:
    """Unbiased variance (``ddof=1``); ``nan`` for fewer than two values."""
    return float(np.sum((x - x.mean()) ** 2) / (len(x) - 1)) if len(x) > 1 else float("nan")


def delong_test(y_true, score1, score2, clusters=None) -> dict[str, float]:
    """DeLong's test that two AUROCs on the same samples are equal (two-sided, normal approximation).

    Unclustered (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837-845), with the structural
    components ``V10``, ``V01`` of :func:`_structural_components` for both scores, ``m`` positives and ``n``
    negatives, and ``D10 = V10(score1) - V10(score2)``, ``D01 = V01(score1) - V01(score2)``::

        Var(AUC1 - AUC2) = s^2(D10) / m + s^2(D01) / n      (s^2: sample variance, ddof = 1)

    i.e. ``c' (S10/m + S01/n) c`` with ``c = (1, -1)`` and ``S10``, ``S01`` the 2x2 sample covariances of the
    components; computed in O(n log n) by midranks (Sun & Xu 2014, IEEE Signal Process. Lett. 21:1389-1393).

    Clustered (``clusters``: one id per sample, e.g. patient ids; Obuchowski 1997, Biometrics 53:567-578):
    cluster ``k`` has ``m_k`` positives and ``n_k`` negatives, ``M``/``N`` positives/negatives in all,
    ``I`` clusters, of which ``I10`` hold a positive and ``I01`` a negative, ``Delta = AUC1 - AUC2``,
    ``E10_k = sum_{positives in k} D10 - m_k Delta`` and ``E01_k = sum_{negatives in k} D01 - n_k Delta``::

        Var(AUC1 - AUC2) = I10/(I10-1) sum_k E10_k^2 / M^2 + I01/(I01-1) sum_k E01_k^2 / N^2
                           + 2 I/(I-1) sum_k E10_k E01_k / (M N)

    which is ``var_1 + var_2 - 2 cov_12`` of Obuchowski's ``S10/M + S01/N + 2 S11/(MN)`` estimator (the
    components there are ``V10(X_ik) = (1/N) sum_all-negatives psi``, the same as ours). When every cluster
    has one sample, ``I10 = M``, ``I01 = N``, every cross product is 0 and ``sum_k E10_k^2 = (M-1) s^2(D10)``:
    the clustered variance equals the unclustered one exactly.

    ``z = (AUC1 - AUC2) / se`` and ``p = 2 (1 - Phi(|z|))``. With ``se = 0``, ``p = 1`` when the AUROCs are
    equal and 0 otherwise. ``se``, ``z`` and ``p_value`` are ``nan`` with fewer than two positives or
    negatives (fewer than two clusters holding each class, when clustered), everything is ``nan`` when a class
    is absent. Returns ``auc1, auc2, difference, se, z, p_value``.
    """
    pos, s1 = _labels_scores(y_true, score1)
    _, s2 = _labels_scores(y_true, score2)
    m, n = int(pos.sum()), int((~pos).sum())
    nan = float("nan")
    if m == 0 or n == 0:
        return {"auc1": nan, "auc2": nan, "difference": nan, "se": nan, "z": nan, "p_value": nan}
    v10, v01 = _structural_components(np.vstack([s1, s2]), pos)
    auc1, auc2 = (float(a) for a in v10.mean(axis=1))
    diff = auc1 - auc2
    d10, d01 = v10[0] - v10[1], v01[0] - v01[1]
    if clusters is None:
        var = _sample_variance(d10) / m + _sample_variance(d01) / n
    else:
        ids = np.asarray(clusters)
        if ids.shape != pos.shape:
            raise ValueError(f"clusters must have one id per sample, got shape {ids.shape}")
        codes = np.unique(ids.astype(str), return_inverse=True)[1].ravel()
        k = int(codes.max()) + 1
        m_k = np.bincount(codes[pos], minlength=k)
        n_k = np.bincount(codes[~pos], minlength=k)
        e10 = np.bincount(codes[pos], weights=d10, minlength=k) - m_k * diff
        e01 = np.bincount(codes[~pos], weights=d01, minlength=k) - n_k * diff
        i10, i01 = int((m_k > 0).sum()), int((n_k > 0).sum())
        if i10 < 2 or i01 < 2:
            var = nan
        else:
            var = (i10 / (i10 - 1) * (e10 @ e10) / m**2 + i01 / (i01 - 1) * (e01 @ e01) / n**2
                   + 2 * k / (k - 1) * (e10 @ e01) / (m * n))
    if not var >= 0:  # nan, or a negative clustered estimate of a degenerate design
        se = z = p = nan
    elif var > 0:
        se = float(np.sqrt(var))
        z = diff / se
        p = float(2 * norm.sf(abs(z)))
    else:
        se = 0.0
        z = 0.0 if diff == 0 else float(np.copysign(np.inf, diff))
        p = 1.0 if diff == 0 else 0.0
    return {"auc1": auc1, "auc2": auc2, "difference": diff, "se": se, "z": z, "p_value": p}


# ---- BCa -----------------------------------------------------------------------------------------------------
def bca_interval(theta_hat: float, boots, jackknife, ci: float) -> tuple[float, float]:
    """Bias-corrected and accelerated bootstrap interval (Efron 1987, JASA 82:171-185; Efron & Tibshirani
    1993, *An Introduction to the Bootstrap*, sections 14.3 and 22).

    ``boots``: the statistic on each bootstrap resample (non-finite values are dropped, as for
    ``percentile_ci``); ``jackknife``: the statistic with each unit left out in turn (a sample, or a whole
    cluster when the bootstrap resamples clusters)::

        z0 = Phi^-1( (#{b < theta} + #{b <= theta}) / (2B) )
        a  = sum_i d_i^3 / (6 (sum_i d_i^2)^(3/2)),   d_i = mean(jackknife) - jackknife_i   (a = 0 if all d_i = 0)
        alpha_lo, alpha_hi = Phi( z0 + (z0 + z_q) / (1 - a (z0 + z_q)) )   for q = (1-ci)/2, (1+ci)/2

    and the interval is the linear-interpolation quantiles ``alpha_lo``, ``alpha_hi`` of the finite
    replicates; the same conventions as ``scipy.stats.bootstrap(method='BCa')``. ``(nan, nan)`` when
    undefined: fewer than two finite replicates, a non-finite ``theta_hat`` or jackknife value, every
    replicate on one side of ``theta_hat`` (``z0`` infinite), or ``1 - a (z0 + z_q) <= 0``.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    nan = (float("nan"), float("nan"))
    b = np.asarray(boots, dtype=float)
    b = b[np.isfinite(b)]
    jack = np.asarray(jackknife, dtype=float)
    if len(b) < 2 or not np.isfinite(theta_hat) or len(jack) == 0 or not np.isfinite(jack).all():
        return nan
    share = (np.count_nonzero(b < theta_hat) + np.count_nonzero(b <= theta_hat)) / (2 * len(b))
    if share <= 0.0 or share >= 1.0:
        return nan
    z0 = float(ndtri(share))
    d = jack.mean() - jack
    ss = float(np.sum(d**2))
    a = float(np.sum(d**3)) / (6 * ss**1.5) if ss > 0 else 0.0
    zq = z0 + ndtri(np.array([(1 - ci) / 2, (1 + ci) / 2]))
    denom = 1 - a * zq
    if (denom <= 0).any():
        return nan
    lo, hi = np.quantile(b, ndtr(z0 + zq / denom))
    return float(lo), float(hi)


# ---- fast AUROC ----------------------------------------------------------------------------------------------
def _exact_in_float32(w: np.ndarray) -> bool:
    """Whether every weight is a non-negative integer and every row sums below 2**24 (float32 sums exact)."""
    for b0, b1 in _row_blocks(w.shape[0], w.shape[1], 2):
        part = w[b0:b1]
        if (part < 0).any() or part.sum(axis=1).max() >= _FLOAT32_EXACT:
            return False
        if not np.issubdtype(part.dtype, np.integer) and not np.array_equal(part, np.trunc(part)):
            return False
    return True


class SampleMajorWeights:
    """Bootstrap weights ``(B, n)`` transposed once into contiguous ``(n, b)`` blocks for :func:`weighted_auroc_fast`.

    Each block holds ``block`` resamples (columns), so the sparse ``(rows, n) @ (n, b)`` product of
    ``weighted_auroc_fast`` reads every weight exactly once per score vector. The blocks are float32
    (``4 n B`` bytes in all) when every weight is a non-negative integer and every resample totals below
    2**24, so that float32 sums are exact, float64 otherwise. Build one per study and share it across models,
    labels and groups.
    """

    def __init__(self, weights: np.ndarray, block: int = 1024) -> None:
        w = np.atleast_2d(np.asarray(weights))
        if w.ndim != 2:
            raise ValueError(f"weights must be a (B, n) matrix, got shape {w.shape}")
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        self.n_boot, self.n = w.shape
        self.dtype = np.dtype(np.float32 if _exact_in_float32(w) else np.float64)
        self.blocks = [np.ascontiguousarray(w[b0:b0 + block].T, dtype=self.dtype)
                       for b0 in range(0, self.n_boot, block)]


def _class_blocks(pos: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows of the slot matrix of :func:`weighted_auroc_fast` for samples ``pos``/``s`` (already restricted).

    Scores are sorted and cut into tied groups; consecutive groups holding only negatives (or only positives)
    merge into one block, and a group holding both classes is a block of its own. Row 0 stays empty, rows
    ``1..Kn`` are the blocks with negatives and rows ``Kn+1..Kn+Kp`` the blocks with positives, in score
    order. Returns (order, row of each sorted sample, ``lo``: for each positive row the number of negative
    rows below it, ``tie``: for each positive row its block's negative row or -1, ``Kn``).
    """
    order = np.argsort(s, kind="stable")
    ss, cls = s[order], pos[order]
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    size = np.diff(np.r_[starts, len(ss)])
    n_pos = np.add.reduceat(cls.astype(np.int64), starts)
    kind = np.where(n_pos == 0, 0, np.where(n_pos == size, 1, 2))  # negatives only, positives only, both
    new = np.r_[True, (kind[1:] != kind[:-1]) | (kind[1:] == 2)]
    block = np.repeat(np.cumsum(new) - 1, size)  # block of each sorted sample
    kind = kind[new]
    has_neg, has_pos = kind != 1, kind != 0
    neg_row = np.cumsum(has_neg)  # row of a block's negatives (1-based; row 0 is the empty row)
    kn = int(neg_row[-1])
    pos_row = kn + np.cumsum(has_pos)
    row = np.where(cls, pos_row[block], neg_row[block])
    lo = (neg_row - has_neg)[has_pos]
    tie = np.where(kind == 2, neg_row, -1)[has_pos]
    return order, row, lo, tie, kn


def weighted_auroc_fast(y_true, y_score, weights: np.ndarray | SampleMajorWeights,
                        keep: np.ndarray | None = None) -> np.ndarray:
    """:func:`~privaudit.audit.utility.weighted_auroc` computed from sample-major weights: ``(B,)``.

    Same inputs and result (``y_true == 1`` is positive, anything else negative; ``nan`` where a row lacks
    a class), identical to the last bit for integer weights; ``keep`` (boolean, ``(n,)``) restricts the
    samples without copying the weights, i.e. ``weighted_auroc(y[keep], s[keep], W[:, keep])``. Pass one
    :class:`SampleMajorWeights` for many calls: a plain ``(B, n)`` matrix is transposed on every call.

    Method. Sorted by score, the samples fall into blocks: a maximal stretch of one class (any number of
    distinct scores), or one group of tied scores holding both classes (:func:`_class_blocks`). Every
    positive of a block beats the same negatives, so only block totals matter. One sparse product
    ``G = A @ W^T`` (``A[row(i), i] = 1``) gives the negative weight ``N_k`` and positive weight ``P_k`` of
    every block in every resample, reading each weight once. With ``L_k`` the negative weight in the blocks
    below ``k`` (a running sum over the negative rows)::

        AUROC = sum_k P_k (2 L_k + N_k [block k holds both classes]) / (2 P N)

    All sums are sums of integers, exact in float32 below 2**24 and in float64, so the quotient rounds
    exactly as ``weighted_auroc``'s. The running sum adds one row of ``G`` at a time, in place: numpy's
    ``cumsum`` along the first axis of a C-ordered array is several times slower.
    """
    sw = weights if isinstance(weights, SampleMajorWeights) else SampleMajorWeights(weights)
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=float)
    if y.shape != (sw.n,) or s.shape != (sw.n,):
        raise ValueError(f"y_true and y_score must have shape ({sw.n},), got {y.shape} and {s.shape}")
    if keep is not None and np.shape(keep) != (sw.n,):
        raise ValueError(f"keep must have shape ({sw.n},), got {np.shape(keep)}")
    idx = np.arange(sw.n) if keep is None else np.flatnonzero(np.asarray(keep, dtype=bool))
    pos = y[idx] == 1
    out = np.full(sw.n_boot, np.nan)
    if not pos.any() or pos.all():
        return out
    order, row, lo, tie, kn = _class_blocks(pos, s[idx])
    n_rows = kn + 1 + len(lo)
    by_row = np.argsort(row, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(row, minlength=n_rows))]
    a = sp.csr_array((np.ones(len(idx), dtype=sw.dtype), idx[order][by_row], indptr), shape=(n_rows, sw.n))
    mixed = tie >= 0
    b0 = 0
    for block in sw.blocks:
        g = a @ block
        p = g[kn + 1:]
        num2 = np.einsum("kb,kb->b", p[mixed], g[tie[mixed]], dtype=np.float64)
        for r in range(1, kn + 1):  # g[r] becomes the negative weight of rows <= r
            np.add(g[r - 1], g[r], out=g[r])
        num2 += 2.0 * np.einsum("kb,kb->b", p, g[lo], dtype=np.float64)
        den2 = 2.0 * p.sum(axis=0, dtype=np.float64) * g[kn].astype(np.float64)
        out[b0:b0 + block.shape[1]] = _ratio(num2, den2)
        b0 += block.shape[1]
    return out
