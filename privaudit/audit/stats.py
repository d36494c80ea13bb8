"""Bootstrap-vectorised classification metrics, DeLong's test for paired AUROCs, and BCa intervals.

Every ``weighted_*`` function follows :func:`privaudit.audit.utility.weighted_auroc`: ``weights`` is a
``(B, n)`` matrix whose row ``b`` says how many times each of the ``n`` samples was drawn in resample ``b``
(:func:`~privaudit.audit.utility.counts_from_indices`), and the metric of row ``b`` equals the scikit-learn
metric on the multiset ``y[idx_b], score[idx_b]``. A row on which a metric is undefined (no positives where
the metric needs them, no negatives where it needs them, zero total weight) gives ``nan``: these functions
never raise on a degenerate resample. They do raise ``ValueError`` on malformed input (labels other than 0/1,
non-finite scores, probabilities outside [0, 1], mismatched shapes), before any resample is looked at.

The module also holds the inference over seeds and over many tests: :func:`seed_mean_interval`,
:func:`seed_difference`, :func:`seed_gap_change` (with :func:`gap_change_tests`, vectorised),
:func:`minimum_detectable_change` and :func:`seed_trend`, described in the comments above them (two-level
intervals covering training randomness and test patients; the bias-corrected squared gap; the
intersection-union test of a widened gap).

Rank-based metrics sort the scores once and reuse that order for every row; threshold metrics reduce to
matrix products ``W @ M``. Row blocks keep the temporaries near ``_BLOCK_BYTES``.

:func:`weighted_auroc_fast` with :class:`SampleMajorWeights` gives exactly the values of ``weighted_auroc``
for integer counts, an order of magnitude faster on large test sets (see ``benchmarks/bootstrap_auroc.py``).
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse as sp
from scipy.special import log_ndtr, logsumexp, ndtr, ndtri, owens_t, stdtr, stdtrit
from scipy.stats import chi2, norm, rankdata
from sklearn.metrics import roc_curve


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


# Row blocks of the weighted metrics keep their temporaries near this many bytes (utility.py uses it too).
_BLOCK_BYTES = 256 * 2**20


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

    ``z = (AUC1 - AUC2) / se`` and ``p = 2 (1 - Phi(|z|))``, computed as ``exp(log 2 + log Phi(-|z|))``
    (``scipy.stats.norm.logsf``) so that it never underflows to 0: ``log_p_value`` keeps the exact value, and
    ``p_value`` is floored at the smallest normal float (2.2e-308). With ``se = 0``, ``p = 1`` when the AUROCs
    are equal; when they differ, the normal approximation is degenerate (no spread to compare the difference
    with) and ``z``, ``p_value`` are ``inf`` and ``nan``, never 0. ``se``, ``z`` and ``p_value`` are ``nan``
    with fewer than two positives or negatives (fewer than two clusters holding each class, when clustered),
    everything is ``nan`` when a class is absent. Returns ``auc1, auc2, difference, se, z, p_value,
    log_p_value``.
    """
    pos, s1 = _labels_scores(y_true, score1)
    _, s2 = _labels_scores(y_true, score2)
    m, n = int(pos.sum()), int((~pos).sum())
    nan = float("nan")
    if m == 0 or n == 0:
        return {"auc1": nan, "auc2": nan, "difference": nan, "se": nan, "z": nan, "p_value": nan,
                "log_p_value": nan}
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
        se = z = p = log_p = nan
    elif var > 0:
        se = float(np.sqrt(var))
        z = diff / se
        log_p = float(min(0.0, np.log(2.0) + norm.logsf(abs(z))))
        p = float(max(np.exp(log_p), np.finfo(float).tiny))
    else:
        se = 0.0
        z = 0.0 if diff == 0 else float(np.copysign(np.inf, diff))
        p, log_p = (1.0, 0.0) if diff == 0 else (nan, nan)
    return {"auc1": auc1, "auc2": auc2, "difference": diff, "se": se, "z": z, "p_value": p, "log_p_value": log_p}


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

    @classmethod
    def from_blocks(cls, blocks) -> "SampleMajorWeights":
        """Wrap blocks already in the ``(n, b)`` layout (e.g. :func:`privaudit.audit.utility.draw_counts`), without
        a copy. They must be float32 holding non-negative integers with every resample's sum below 2**24, or
        float64."""
        blocks = list(blocks)
        if not blocks or len({b.shape[0] for b in blocks}) != 1 or any(b.ndim != 2 for b in blocks):
            raise ValueError("blocks must be a non-empty list of (n, b) arrays with one n")
        dtypes = {b.dtype for b in blocks}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"blocks must all be float32 or all float64, got {sorted(map(str, dtypes))}")
        self = cls.__new__(cls)
        self.blocks = [np.ascontiguousarray(b) for b in blocks]
        self.n, self.n_boot = blocks[0].shape[0], sum(b.shape[1] for b in blocks)
        self.dtype = next(iter(dtypes))
        return self


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
    # rows rise with the score within each class and every negative row precedes every positive one, so the
    # stable order by row is the negatives in score order, then the positives: a partition, not a sort
    cls = pos[order]
    by_row = np.r_[np.flatnonzero(~cls), np.flatnonzero(cls)]
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


# ---- training randomness: intervals over seeds -----------------------------------------------------------------
# A setting trained with S seeds gives S models, all scored on the SAME test patients. Model k's figure is
#
#     x_k = mu + a_k + e_k
#
# with a_k the training randomness (independent over seeds; two settings run with the same --seed share the
# initialisation, so their a_k may be correlated) and e_k the test-set error, whose covariance over (k, l) the
# patient bootstrap estimates (every model is resampled with the same rows). The patients are shared, so e_k and
# e_l are correlated: e_k = c + d_k holds a part c common to every seed. Then
#
#     Var(mean_k x_k) = Var(a)/S + (1/S^2) sum_{k,l} Cov(e_k, e_l),
#
# while the between-seed sample variance s^2 has expectation Var(a) + (1/S) sum_k Var(e_k)
# - 1/(S(S-1)) sum_{k != l} Cov(e_k, e_l): the common part cancels out of s^2, which is why the seed-level
# interval alone misses it. Together,
#
#     Var(mean) = E[s^2] / S + C,      C = 1/(S(S-1)) sum_{k != l} Cov(e_k, e_l),
#
# the seed-level term (training randomness plus the seed-specific test noise) plus the test-set covariance
# shared between different seeds, the mean off-diagonal bootstrap covariance of the seeds' figures. For several
# figures (two settings; a private and a non-private gap) the same holds entry by entry:
# Cov(mean_i, mean_j) = s_ij / S + C_ij, with s_ij the between-seed covariance of seed-paired figures and C_ij
# the mean bootstrap covariance over the pairs of *different* runs (k != l when the seeds are paired; every pair
# when they are not, and then s_ij = 0 for i != j). C is projected onto the positive semi-definite matrices
# (negative eigenvalues, estimation noise, set to 0), which can only widen.
#
# The interval. For a combination of means with seed-level variance b = s^2/S (k = S - 1 df) and shared part
# c (estimated from many patients, treated as known), the interval is the generalized pivotal (fiducial)
# interval of Weerahandi (1993, JASA 88:899-905), i.e. mean +- Q with Q the (1+ci)/2 quantile of
#
#     Z * sqrt(b k / chi2_k + c),        Z ~ N(0, 1), chi2_k independent,
#
# computed by quadrature over chi2_k (:class:`_Pivot`). It is Student's t when c = 0 and the normal interval
# when b = 0. The plug-in alternative, t with Satterthwaite's df, is liberal with 3 seeds (about 92% for 95%
# when the seeds dominate: a small s^2 also inflates its df), and a percentile bootstrap over (seed, patient)
# covers about 75%; tests/test_inference.py checks 93-97% at 3 and 10 seeds. p-values use the same pivot.
# Satterthwaite's df is still reported (``df``) and used where an approximate t is enough (the minimum
# detectable change). With one seed there is no s^2: the interval covers the test patients only, and the
# result says so (``covers_training_randomness: false`` and a ``warning``).

NO_TRAINING_RANDOMNESS = ("one seed per setting: the interval covers the sampling of test patients only, not "
                          "training randomness (another seed gives another model); train two or more seeds to "
                          "cover it")
TWO_LEVEL_METHOD = ("generalized pivot over seeds (seed-level variance, S-1 df) + test-set covariance shared "
                    "across seeds (patient bootstrap)")
TEST_ONLY_METHOD = "patient bootstrap (test patients only)"
_GRID = 512        # quadrature points over log chi2_k
_TAIL = 1e-15      # chi2_k is integrated between its 1e-15 and 1 - 1e-15 quantiles


def _t_quantile(q: float, df: float) -> float:
    return float(ndtri(q)) if not np.isfinite(df) else float(stdtrit(df, q))


@functools.lru_cache(maxsize=64)
def _chi2_grid(k: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``x`` and log weights of ``chi2_k``: a trapezoid rule on ``log x`` between the 1e-15 quantiles, so
    that the small values of chi2, which make the pivot's far tail, are integrated as finely as the bulk."""
    v = np.linspace(np.log(chi2.ppf(_TAIL, k)), np.log(chi2.isf(_TAIL, k)), _GRID)
    x = np.exp(v)
    logw = chi2.logpdf(x, k) + v
    logw[[0, -1]] -= np.log(2.0)
    return x, logw - logsumexp(logw)


class _Pivot:
    """The law of ``Z sqrt(b k / chi2_k + c)`` (see the comment above :data:`NO_TRAINING_RANDOMNESS`): the error
    of a mean over seeds whose seed-level variance ``b`` has ``k`` df and whose shared test-set variance is ``c``.
    Arguments broadcast (arrays of combinations at once); ``k`` infinite or ``b = 0``: normal; ``c = 0``: t."""

    def __init__(self, b, c, k):
        self.b, self.c, self.k = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (b, c, k)))
        self.se = np.sqrt(np.clip(self.b + self.c, 0.0, None))

    def log_sf(self, x) -> np.ndarray:
        """``log P(pivot > x)``; ``x`` broadcasts with the pivot's parameters."""
        x, b, c, k = np.broadcast_arrays(np.asarray(x, dtype=float), self.b, self.c, self.k)
        out = np.empty(x.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(b + c > 0, x / np.sqrt(b + c), np.where(x < 0, -np.inf, np.where(x > 0, np.inf, 0.0)))
            normal = ~(np.isfinite(k) & (b > 0))
            out[normal] = log_ndtr(-z[normal])
            pure_t = ~normal & (c <= 0)
            if pure_t.any():  # t tails are polynomial: stdtr does not underflow where it matters
                out[pure_t] = np.log(stdtr(k[pure_t], -x[pure_t] / np.sqrt(b[pure_t])))
        mixed = ~normal & ~pure_t
        for kk in np.unique(k[mixed]):
            sel = mixed & (k == kk)
            nodes, logw = _chi2_grid(float(kk))
            sd = np.sqrt(b[sel][:, None] * kk / nodes[None, :] + c[sel][:, None])
            terms = logw[None, :] + log_ndtr(-x[sel][:, None] / sd)
            top = terms.max(axis=1, keepdims=True)
            out[sel] = (top + np.log(np.exp(terms - top).sum(axis=1, keepdims=True)))[:, 0]
        return out

    def quantile(self, q: float) -> np.ndarray:
        """The ``q`` quantile (``q > 1/2``): closed form for the normal and t laws; for the mixture brentq (one
        pivot) or bisection (an array), to 1e-10 of the standard error."""
        from scipy.optimize import brentq

        normal = ~(np.isfinite(self.k) & (self.b > 0))
        pure_t = ~normal & (self.c <= 0)
        out = np.where(normal, ndtri(q) * self.se, 0.0)
        if pure_t.any():
            out = np.where(pure_t, stdtrit(np.where(pure_t, self.k, 1.0), q) * np.sqrt(self.b), out)
        mixed = ~normal & ~pure_t
        if not mixed.any():
            return out
        target = np.log1p(-q)
        sub = _Pivot(self.b[mixed], self.c[mixed], self.k[mixed])
        lo = np.zeros(sub.se.shape)
        hi = 1.01 * stdtrit(sub.k, q) * sub.se  # a first guess: the t_k quantile at the same se
        for _ in range(60):  # widen until it brackets the quantile
            short = sub.log_sf(hi) > target
            if not short.any():
                break
            hi = np.where(short, 2 * hi, hi)
        if sub.se.size == 1:
            root = brentq(lambda v: float(sub.log_sf(v)[0]) - target, 0.0, float(hi[0]), xtol=1e-10 * float(sub.se[0]))
            out[mixed] = root
            return out
        for _ in range(60):
            mid = (lo + hi) / 2
            above = sub.log_sf(mid) > target
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
            if np.all(hi - lo <= 1e-10 * sub.se):
                break
        out[mixed] = (lo + hi) / 2
        return out

    def two_sided_p(self, x) -> np.ndarray:
        """``P(|pivot| >= |x|)`` in log space, floored at the smallest normal float (never 0); ``nan`` for a
        non-zero ``x`` with no spread at all (a degenerate test, not a conclusive one)."""
        x = np.asarray(x, dtype=float)
        p = np.minimum(1.0, np.maximum(np.exp(np.log(2.0) + self.log_sf(np.abs(x))), np.finfo(float).tiny))
        return np.where((self.se == 0) & (x != 0), np.nan, p)


def _runs(estimates, boots, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-seed estimates ``(S,)`` and their bootstrap replicates ``(S, B)`` (or None), checked."""
    est = np.asarray(estimates, dtype=float)
    if est.ndim != 1:
        raise ValueError(f"{what}: the per-seed estimates must be 1-d, got shape {est.shape}")
    if boots is None:
        return est, None
    b = np.asarray(boots, dtype=float)
    if b.ndim == 1 and len(est) == 1:
        b = b[None, :]
    if b.ndim != 2 or b.shape[0] != len(est):
        raise ValueError(f"{what}: the replicates must have shape (seeds, resamples) = ({len(est)}, B), got {b.shape}")
    return est, b


class _TwoLevel:
    """Means of ``p`` figures over their seeds with their covariance ``V = between + shared`` (see above).

    ``estimates[i]`` holds figure i per seed and ``boots[i]`` its patient-bootstrap replicates (all figures
    resampled with the same rows), or ``boots`` None (no shared part: a seed-level interval only). ``paired``:
    seed k of every figure is one --seed, so the between-seed covariance is estimated jointly (needs the same
    number of seeds everywhere); seeds with a non-finite estimate are then dropped from every figure. Resamples
    in which any replicate is not finite are left out of the covariance (``n_boot_used``). A figure with one
    seed has no between-seed term: its same-run bootstrap variance goes into ``shared`` instead, and the result
    covers the test patients only.
    """

    def __init__(self, estimates, boots=None, *, paired: bool = True):
        runs = [_runs(e, None if boots is None else boots[i], f"figure {i}") for i, e in enumerate(estimates)]
        if paired and len({len(e) for e, _ in runs}) > 1:
            raise ValueError("paired figures need the same number of seeds; pass paired=False otherwise")
        if paired:
            keep = [np.logical_and.reduce([np.isfinite(e) for e, _ in runs])] * len(runs)
        else:
            keep = [np.isfinite(e) for e, _ in runs]
        runs = [(e[k], None if b is None else b[k]) for (e, b), k in zip(runs, keep)]
        self.paired = paired
        self.n_seeds = np.array([len(e) for e, _ in runs], dtype=int)
        p = len(runs)
        self.mean = np.array([e.mean() if len(e) else np.nan for e, _ in runs])
        between = np.zeros((p, p))
        if paired and p and self.n_seeds[0] >= 2:
            between = np.atleast_2d(np.cov(np.vstack([e for e, _ in runs]), ddof=1)) / self.n_seeds[0]
        elif not paired:
            for i, (e, _) in enumerate(runs):
                between[i, i] = e.var(ddof=1) / len(e) if len(e) >= 2 else 0.0
        self.between = between
        self.has_boots = boots is not None
        self.n_boot_used = None
        shared = np.zeros((p, p))
        if boots is not None and p and self.n_seeds.min() > 0:
            z = np.vstack([b for _, b in runs])
            ok = np.isfinite(z).all(axis=0)
            self.n_boot_used = int(ok.sum())
            if self.n_boot_used < 2:
                shared = np.full((p, p), np.nan)
            else:
                cov = np.atleast_2d(np.cov(z[:, ok], ddof=1))
                at = np.r_[0, np.cumsum(self.n_seeds)]
                for i in range(p):
                    for j in range(p):
                        block = cov[at[i]:at[i + 1], at[j]:at[j + 1]]
                        si, sj = self.n_seeds[i], self.n_seeds[j]
                        if si >= 2 and (i == j or paired):  # same-seed pairs are in the between-seed term
                            shared[i, j] = (block.sum() - np.trace(block)) / (si * sj - si)
                        else:
                            shared[i, j] = block.sum() / (si * sj)
                vals, vecs = np.linalg.eigh((shared + shared.T) / 2)
                shared = (vecs * np.clip(vals, 0.0, None)) @ vecs.T
        self.shared = shared
        self.V = between + shared
        self.covers_training_randomness = bool(p and self.n_seeds.min() >= 2)

    def combine(self, a) -> tuple[float, _Pivot, float]:
        """The linear combination ``a @ means``: estimate, its :class:`_Pivot`, and Satterthwaite's df."""
        a = np.asarray(a, dtype=float)
        est = float(a @ self.mean)
        b, c = float(a @ self.between @ a), float(a @ self.shared @ a)
        b = 0.0 if b <= 1e-12 * (b + c) else b  # rounding noise of identical seeds, not a variance
        if self.paired:
            s = int(self.n_seeds[0]) if len(self.n_seeds) else 0
            k = float(s - 1) if s >= 2 and b > 0 else np.inf
            den = b**2 / k if np.isfinite(k) else 0.0
        else:  # Welch: the between terms of the figures, each with its own S_i - 1 df
            terms = [(a[i] ** 2 * self.between[i, i], s - 1) for i, s in enumerate(self.n_seeds) if s >= 2]
            den = float(sum(t**2 / d for t, d in terms))
            k = b**2 / den if den > 0 else np.inf
        df = (b + c) ** 2 / den if den > 0 else np.inf
        return est, _Pivot(b, c, k), float(df)

    def describe(self) -> dict:
        one = self.paired or len(self.n_seeds) == 1
        return {"n_seeds": int(self.n_seeds[0]) if one else [int(s) for s in self.n_seeds],
                "n_boot_used": self.n_boot_used,
                "covers_training_randomness": self.covers_training_randomness,
                "method": TWO_LEVEL_METHOD if self.covers_training_randomness else TEST_ONLY_METHOD,
                "warning": None if self.covers_training_randomness else NO_TRAINING_RANDOMNESS}


def _opt(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _finite_df(df: float) -> float | None:
    return float(df) if np.isfinite(df) else None


def seed_mean_interval(estimates, boots=None, *, ci: float = 0.95) -> dict:
    """Mean of one figure over a setting's seeds, with an interval that covers training randomness and test patients.

    ``estimates``: the figure per seed ``(S,)`` (e.g. each seed's macro AUROC); ``boots``: each seed's patient-
    bootstrap replicates ``(S, B)``, all seeds resampled with the same rows (the study's shared resampler), or
    None. With ``S >= 2``: ``V = s^2/S + C`` and the generalized pivotal interval (see the comment above
    :data:`NO_TRAINING_RANDOMNESS`; s^2 the between-seed variance, C the test-set covariance shared between
    different seeds). Without ``boots``, ``C = 0``: Student's t over seeds, which misses the shared test-set
    noise (``test_noise_included: false``). With one seed: the percentile interval of its replicates, and
    ``covers_training_randomness: false`` with a ``warning``.

    Returns ``estimate, ci_low, ci_high, se, df (Satterthwaite), sd_between, var_between (s^2/S),
    var_shared_test (C), test_noise_included, n_seeds, n_boot_used, covers_training_randomness, method,
    warning``; ``None`` where undefined.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    est, b = _runs(estimates, boots, "seed_mean_interval")
    ok = np.isfinite(est)
    tl = _TwoLevel([est[ok]], None if b is None else [b[ok]])
    s = int(tl.n_seeds[0])
    out = {"estimate": _opt(tl.mean[0]), "ci_low": None, "ci_high": None, "se": None, "df": None,
           "sd_between": _opt(np.sqrt(tl.between[0, 0] * s)) if s >= 2 else None,
           "var_between": _opt(tl.between[0, 0]) if s >= 2 else None,
           "var_shared_test": _opt(tl.shared[0, 0]) if b is not None and s >= 2 else None,
           "test_noise_included": b is not None, **tl.describe()}
    if s == 1 and b is not None:
        reps = b[ok][0]
        reps = reps[np.isfinite(reps)]
        if len(reps) >= 2:
            lo, hi = np.quantile(reps, [(1 - ci) / 2, (1 + ci) / 2])
            out.update(ci_low=float(lo), ci_high=float(hi), se=float(reps.std(ddof=1)), n_boot_used=len(reps))
    elif s >= 2:
        e, pivot, df = tl.combine([1.0])
        if np.isfinite(pivot.se):
            q = float(pivot.quantile((1 + ci) / 2))
            out.update(ci_low=e - q, ci_high=e + q, se=float(pivot.se), df=_finite_df(df))
    return out


def seed_difference(estimates_a, estimates_b, boots_a=None, boots_b=None, *, ci: float = 0.95,
                    paired: bool = True) -> dict:
    """Mean over seeds of setting A minus setting B, with a two-level interval and a two-sided p-value.

    ``paired``: seed k of A and seed k of B share their --seed (same initialisation), so the difference is
    taken per seed, ``D_k = A_k - B_k``, and its variance is ``s_D^2/S + C_D`` (between-seed variance of the
    ``D_k``, and the shared test-set covariance of their replicates ``A*_k - B*_k``): pairing removes the
    seed effect the two settings share. Unpaired (other seeds, or other numbers of seeds): Welch's form,
    ``V = s_A^2/S_A + s_B^2/S_B + C_A + C_B - 2 C_AB`` with ``C_AB`` the mean bootstrap covariance over all
    (A, B) pairs (the patients are shared across settings too), and the pivot's df from Welch-Satterthwaite over
    the two seed-level terms. ``p_value``: ``P(|pivot| >= |mean|)``, in log space, never 0.

    Returns ``estimate, ci_low, ci_high, se, df, p_value, paired, n_seeds, n_boot_used,
    covers_training_randomness, method, warning``.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    a, ba = _runs(estimates_a, boots_a, "seed_difference (A)")
    b, bb = _runs(estimates_b, boots_b, "seed_difference (B)")
    if (ba is None) != (bb is None):
        raise ValueError("seed_difference: give the replicates of both settings or of neither")
    if paired and len(a) != len(b):
        raise ValueError(f"seed_difference: paired seeds need as many seeds in A as in B, got {len(a)} and {len(b)}")
    tl = _TwoLevel([a, b], None if ba is None else [ba, bb], paired=paired)
    est, pivot, df = tl.combine([1.0, -1.0])
    out = {"estimate": _opt(est), "ci_low": None, "ci_high": None, "se": _opt(pivot.se), "df": _finite_df(df),
           "p_value": None, "paired": paired, **tl.describe()}
    if not np.isfinite(est) or not np.isfinite(pivot.se) or (not tl.covers_training_randomness and ba is None):
        return out  # one seed and no replicates: nothing measures the noise
    q = float(pivot.quantile((1 + ci) / 2))
    out.update(ci_low=est - q, ci_high=est + q, p_value=_opt(pivot.two_sided_p(est)))
    return out


# ---- the size of a parity-gap change, and whether it widened ---------------------------------------------------
# gamma_1 and gamma_0 are the true gaps of the private and the reference (non-private) setting, g_1 and g_0
# their estimates: means over seeds (one seed: the single model's gap), with two-level covariance V.
#
# Size. E|g| grows with the noise of g, so |g_1| - |g_0| is biased upward when gamma_1 = gamma_0 = 0 and the
# private model is noisier. The squared gap is unbiased once its variance is taken off: E[g^2] = gamma^2 + V,
# so (g_1^2 - V_11) - (g_0^2 - V_00) is an unbiased estimate of gamma_1^2 - gamma_0^2 (in AUROC^2 units;
# positive when the private gap is the larger in absolute value, whatever the signs). Its interval is the
# normal one with the variance of a difference of squared normals (Var(X^2) = 4 mu^2 s^2 + 2 s^4 and
# Cov(X^2, Y^2) = 4 mu_x mu_y c + 2 c^2, mu^2 estimated by max(g^2 - V, 0)) and Satterthwaite's t: approximate,
# and skewed near 0. It describes the size; the decision uses the test below.
#
# Test. |gamma_1| > |gamma_0| exactly when u = gamma_1 - gamma_0 and w = gamma_1 + gamma_0 are non-zero and of
# the same sign. The "widened" test is an intersection-union test: reject |gamma_1| <= |gamma_0| when u and w
# are both significantly positive, or both significantly negative, each one-sided test at alpha/2:
#
#     p = min(1, 2 min(max(p_u+, p_w+), max(p_u-, p_w-))),
#
# one-sided p-values from the pivot of u and of w (one seed: normal with bootstrap standard errors). Under any
# null point (u <= 0 <= w, or w <= 0 <= u), the test rejects only if the u test or the w test rejects against
# its own true value, each with probability <= alpha/2, so it has level alpha whatever the two gaps and their
# noise: conservative, yet it keeps its power where the reference gap is about 0 (no sign to orient by). The
# p-value is continuous, so Holm over m tests can reach alpha/m whatever the number of resamples (the rule on
# resolution is in :func:`privaudit.audit.fairness.gap_change_verdict`).
#
# Equivalence. ||gamma_1| - |gamma_0|| = min(|u|, |w|) (an identity for real numbers), so the change in |gap|
# lies within +-margin when |u| < margin or |w| < margin. Each is shown by two one-sided tests at alpha/2 (the
# 1 - alpha interval of u, or of w, within +-margin), a level-alpha test of "the change reaches the margin" by
# Bonferroni over the two routes. ``equivalence_bound`` is the smallest margin it shows.

GAP_CHANGE_MEASURE = "bias-corrected squared gap: (g1^2 - var g1) - (g0^2 - var g0), AUROC^2"


def gap_change_tests(gap_private, gap_reference, var_private, var_reference, cov, *, between=None, k=np.inf,
                     ci: float = 0.95, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """The size, the "widened" test and the equivalence bound of :func:`seed_gap_change`, vectorised.

    Arrays broadcast: the two gap estimates (means over seeds), the entries of their covariance matrix ``V``
    (two-level; one seed: bootstrap), ``between``: the seed-level part of ``V`` as ``(var_private,
    var_reference, cov)`` (None: all of ``V`` is test-set noise) with ``k`` df. Returns arrays ``estimate,
    ci_low, ci_high, p_value, equivalence_bound, rho, se_difference, se_sum, df_difference, df_sum`` (formulas
    in the comment above :data:`GAP_CHANGE_MEASURE`). ``p_value`` is ``nan`` where a zero standard error
    meets a non-zero u or w.
    """
    g1, g0, v11, v00, v10, kk = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (
        gap_private, gap_reference, var_private, var_reference, cov, k)))
    b11, b00, b10 = (np.zeros_like(g1),) * 3 if between is None else np.broadcast_arrays(
        *(np.asarray(a, dtype=float) for a in between), g1)[:3]
    u, w = g1 - g0, g1 + g0
    pivots, dfs = [], []
    for sign in (-1.0, 1.0):
        var = np.clip(v11 + v00 + 2 * sign * v10, 0.0, None)
        b = np.clip(b11 + b00 + 2 * sign * b10, 0.0, None)
        b = np.where(b <= 1e-12 * var, 0.0, b)  # rounding noise of identical seeds, not a variance
        pivots.append(_Pivot(b, np.clip(var - b, 0.0, None), np.where(b > 0, kk, np.inf)))
        with np.errstate(divide="ignore", invalid="ignore"):
            dfs.append(np.where((b > 0) & np.isfinite(kk), var**2 / (b**2 / kk), np.inf))
    pu, pw = pivots
    est = (g1**2 - v11) - (g0**2 - v00)
    a1, a0, a10 = np.clip(g1**2 - v11, 0.0, None), np.clip(g0**2 - v00, 0.0, None), g1 * g0 - v10
    sd = np.sqrt(np.clip(4 * a1 * v11 + 2 * v11**2 + 4 * a0 * v00 + 2 * v00**2 - 8 * a10 * v10 - 4 * v10**2,
                         0.0, None))
    df = np.minimum(*dfs)
    q = np.where(np.isfinite(df), stdtrit(np.where(np.isfinite(df), df, 1.0), (1 + ci) / 2), ndtri((1 + ci) / 2))
    up = np.maximum(pu.log_sf(u), pw.log_sf(w))        # u and w > 0: gamma_1 > |gamma_0|
    down = np.maximum(pu.log_sf(-u), pw.log_sf(-w))    # u and w < 0: gamma_1 < -|gamma_0|
    p = np.minimum(1.0, np.maximum(np.exp(np.log(2.0) + np.minimum(up, down)), np.finfo(float).tiny))
    degenerate = ((pu.se == 0) & (u != 0)) | ((pw.se == 0) & (w != 0))
    bound = np.minimum(np.abs(u) + pu.quantile(1 - alpha / 2), np.abs(w) + pw.quantile(1 - alpha / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where((pu.se > 0) & (pw.se > 0), np.clip((v11 - v00) / (pu.se * pw.se), -1, 1), np.nan)
    return {"estimate": est, "ci_low": est - q * sd, "ci_high": est + q * sd,
            "p_value": np.where(degenerate, np.nan, p), "equivalence_bound": bound, "rho": rho,
            "se_difference": pu.se, "se_sum": pw.se, "df_difference": dfs[0], "df_sum": dfs[1]}


def seed_gap_change(gap_private, gap_reference, boots_private=None, boots_reference=None, *, ci: float = 0.95,
                    alpha: float = 0.05, paired: bool = True) -> dict:
    """Change of one performance-parity gap from the reference setting to the private one, over seeds.

    ``gap_private`` / ``gap_reference``: the gap per seed ``(S,)`` (one seed: arrays of length 1); ``boots_*``:
    the gaps' patient-bootstrap replicates ``(S, B)``, every model resampled with the same rows; ``paired``:
    seed k of both settings shares its --seed. The measure, the test and the equivalence are described in the
    comment above :data:`GAP_CHANGE_MEASURE` and computed by :func:`gap_change_tests`.

    Returns ``estimate``, ``ci_low``, ``ci_high`` (the bias-corrected squared-gap change), ``measure``,
    ``p_value`` (intersection-union test of ``|gamma_1| > |gamma_0|``), ``abs_gap_change`` (the plug-in
    ``|g_1| - |g_0|``, biased upward near 0: for reading only), ``gap_private``, ``gap_reference``,
    ``difference`` and ``sum`` (``estimate``, ``se``, ``df`` of u and w), ``rho`` (correlation of the u and w
    estimates), ``equivalence_bound`` (at ``alpha``), ``n_seeds``, ``n_boot_used``,
    ``covers_training_randomness``, ``method``, ``warning``.
    """
    if not 0 < ci < 1 or not 0 < alpha < 0.5:
        raise ValueError(f"need 0 < ci < 1 and 0 < alpha < 0.5, got ci={ci}, alpha={alpha}")
    g1, b1 = _runs(gap_private, boots_private, "seed_gap_change (private)")
    g0, b0 = _runs(gap_reference, boots_reference, "seed_gap_change (reference)")
    if (b1 is None) != (b0 is None):
        raise ValueError("seed_gap_change: give the replicates of both gaps or of neither")
    tl = _TwoLevel([g1, g0], None if b1 is None else [b1, b0], paired=paired)
    m1, m0 = tl.mean
    (v11, v10), (_, v00) = tl.V
    (b11, b10), (_, b00) = tl.between
    if paired:
        k = float(tl.n_seeds[0] - 1) if tl.n_seeds[0] >= 2 else np.inf
    else:  # Welch over the two seed-level terms
        terms = [(tl.between[i, i], s - 1) for i, s in enumerate(tl.n_seeds) if s >= 2]
        den = sum(t**2 / d for t, d in terms)
        k = (b11 + b00) ** 2 / den if den > 0 else np.inf
    out = {"estimate": None, "ci_low": None, "ci_high": None, "measure": GAP_CHANGE_MEASURE, "p_value": None,
           "abs_gap_change": _opt(abs(m1) - abs(m0)), "gap_private": _opt(m1), "gap_reference": _opt(m0),
           "difference": {"estimate": _opt(m1 - m0), "se": None, "df": None},
           "sum": {"estimate": _opt(m1 + m0), "se": None, "df": None},
           "rho": None, "equivalence_bound": None, **tl.describe()}
    if not (np.isfinite(m1) and np.isfinite(m0) and np.isfinite(tl.V).all()):
        return out
    r = {key: float(v) for key, v in gap_change_tests(m1, m0, v11, v00, v10, between=(b11, b00, b10), k=k, ci=ci,
                                                      alpha=alpha).items()}
    out.update({key: _opt(r[key]) for key in ("estimate", "ci_low", "ci_high", "p_value", "rho",
                                               "equivalence_bound")})
    out["difference"].update(se=r["se_difference"], df=_finite_df(r["df_difference"]))
    out["sum"].update(se=r["se_sum"], df=_finite_df(r["df_sum"]))
    return out


def _bvn_upper(a: float, b: float, rho: float) -> float:
    """``P(X > a, Y > b)`` for standard bivariate normal ``(X, Y)`` with correlation ``rho``.

    Owen's (1956, Ann. Math. Stat. 27:1075-1090) closed form through his T function (``scipy.special.owens_t``),
    with ``h = -a``, ``k = -b``::

        P(X <= h, Y <= k) = Phi(h)/2 + Phi(k)/2 - T(h, a_h) - T(k, a_k) - beta,
        a_h = (k - rho h) / (h sqrt(1 - rho^2)),  a_k = (h - rho k) / (k sqrt(1 - rho^2)),
        beta = 0 if h k > 0 or (h k = 0 and h + k >= 0), else 1/2;

    a zero ``h`` (or ``k``) uses ``T(0, +-inf) = +-1/4`` by continuity, and ``h = k = 0`` Sheppard's
    ``1/4 + arcsin(rho) / (2 pi)``. Infinite ``a`` or ``b`` and ``rho = +-1`` in closed form.
    """
    if a == -np.inf or b == -np.inf:
        return float(ndtr(-(b if a == -np.inf else a)))
    if a == np.inf or b == np.inf:
        return 0.0
    if rho >= 1 - 1e-12:
        return float(ndtr(-max(a, b)))
    if rho <= -1 + 1e-12:
        return float(max(0.0, ndtr(-b) - ndtr(a)))
    h, k = -float(a), -float(b)
    if h == 0 and k == 0:  # Sheppard's quadrant probability
        return float(0.25 + np.arcsin(rho) / (2 * np.pi))
    r = np.sqrt(1 - rho**2)

    def t_term(x, y):  # T(x, (y - rho x) / (x r)); at x = 0 (y != 0) the limit T(0, +-inf) = +-1/4
        if x == 0:
            return 0.25 * np.sign(y)
        return float(owens_t(x, (y - rho * x) / (x * r)))

    beta = 0.0 if h * k > 0 or (h * k == 0 and h + k >= 0) else 0.5
    cdf = 0.5 * ndtr(h) + 0.5 * ndtr(k) - t_term(h, k) - t_term(k, h) - beta
    return float(min(1.0, max(0.0, cdf)))


def minimum_detectable_change(se_difference: float, se_sum: float, *, alpha: float, power: float = 0.8,
                              rho: float = 0.0, df: float = np.inf) -> float | None:
    """Smallest parity gap ``delta`` that the "widened" test of :func:`seed_gap_change` finds with ``power``.

    Computed where it is hardest, a reference gap of 0 (with a non-zero reference gap the sum w is far from 0
    and only u limits the power): then u = w = delta, and the test rejects at level ``alpha`` (pass the
    Holm-adjusted level, ``alpha / m`` for a family of m) when both ``u / se_u`` and ``w / se_w`` exceed
    ``c = t_{df, 1 - alpha/2}``. With the estimates bivariate normal (correlation ``rho``)::

        power(delta) = P(Z_u > k - delta / se_u, Z_w > k - delta / se_w),   k = c + t_{df, power} - z_power

    (``k = c`` for ``df = inf``; ``t_{df, power} - z_power`` is the usual allowance for a t test's few degrees
    of freedom, exact for one test; pass Satterthwaite's df). ``delta`` solves ``power(delta) = power``
    (brentq). None when a standard error is not finite; 0 when both are 0.
    """
    from scipy.optimize import brentq

    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"need 0 < alpha < 1 and 0 < power < 1, got alpha={alpha}, power={power}")
    if se_difference is None or se_sum is None or not (np.isfinite(se_difference) and np.isfinite(se_sum)) \
            or min(se_difference, se_sum) < 0:
        return None
    if se_difference == 0 and se_sum == 0:
        return 0.0
    k = _t_quantile(1 - alpha / 2, df) + (_t_quantile(power, df) - float(norm.ppf(power)))
    rho = float(np.clip(0.0 if rho is None or not np.isfinite(rho) else rho, -1, 1))

    def shifted(delta, se):  # a zero standard error detects any delta > 0 for sure
        return k - delta / se if se > 0 else (-np.inf if delta > 0 else np.inf)

    def gap(delta):
        return _bvn_upper(shifted(delta, se_difference), shifted(delta, se_sum), rho) - power

    if gap(0.0) >= 0:
        return 0.0
    top = max(se_difference, se_sum)
    hi = (k + float(norm.ppf(1 - (1 - power) / 2))) * top  # each margin >= (1 + power)/2, so joint >= power
    return float(brentq(gap, 0.0, max(hi, 1e-12), xtol=1e-10 * top))


# ---- trade-off over settings, with seeds -----------------------------------------------------------------------
def seed_trend(x, estimates, boots=None, *, ci: float = 0.95, paired: bool = True, n_draws: int = 4000,
               seed: int = 0) -> dict:
    """Trend of a figure across settings (e.g. macro AUROC against log epsilon), covering seeds and test patients.

    ``x``: each setting's position ``(J,)`` (log epsilon); ``estimates[j]``: the figure per seed of setting j;
    ``boots[j]``: their patient-bootstrap replicates ``(S_j, B)``, every model resampled with the same rows;
    ``paired``: seed k is the same --seed in every setting (every setting then needs the same seeds).

    The setting means ``m`` get the two-level covariance ``V`` of :class:`_TwoLevel` (between-seed covariance
    over S, plus the test-set covariance shared between different runs, across settings too: every model is
    scored on the same patients). The inference is on the least-squares slope of ``m`` on ``x``,
    ``slope = c @ m`` with ``c = (x - mean x) / sum (x - mean x)^2``, through the generalized pivot of that
    combination (interval and two-sided p-value: the trend test). ``r`` is Pearson's r of ``(x, m)`` (one point
    per setting, the seeds averaged), with an approximate percentile interval from ``n_draws`` parametric draws
    ``m* = m + sqrt(k / chi2_k) L_b z + L_c z'`` (``L_b``, ``L_c`` square roots of the between-seed and the shared
    parts of ``V``, ``k = S - 1``; ``seed`` fixes the draws). With one seed per setting the result covers the
    test patients only (``covers_training_randomness: false``).

    Returns ``r, r_ci_low, r_ci_high, slope, slope_ci_low, slope_ci_high, slope_se, df, p_value, n_settings,
    n_seeds, n_boot_used, covers_training_randomness, method, warning``.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or len(estimates) != len(x) or (boots is not None and len(boots) != len(x)):
        raise ValueError(f"seed_trend: x, estimates and boots need one entry per setting, got {len(x)}, "
                         f"{len(estimates)}, {None if boots is None else len(boots)}")
    tl = _TwoLevel(list(estimates), None if boots is None else list(boots), paired=paired)
    ok = np.isfinite(x) & np.isfinite(tl.mean)
    out = {"r": None, "r_ci_low": None, "r_ci_high": None, "slope": None, "slope_ci_low": None,
           "slope_ci_high": None, "slope_se": None, "df": None, "p_value": None, "n_settings": int(ok.sum()),
           **tl.describe()}
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return out
    xc = np.where(ok, x - x[ok].mean(), 0.0)
    slope, pivot, df = tl.combine(xc / float(xc @ xc))
    if np.isfinite(pivot.se):
        q = float(pivot.quantile((1 + ci) / 2))
        out.update(slope=slope, slope_se=float(pivot.se), df=_finite_df(df), slope_ci_low=slope - q,
                   slope_ci_high=slope + q, p_value=_opt(pivot.two_sided_p(slope)))
    m = tl.mean[ok]
    if ok.sum() < 3 or np.ptp(m) == 0 or not np.isfinite(tl.V).all():
        return out
    out["r"] = float(np.corrcoef(x[ok], m)[0, 1])
    idx = np.flatnonzero(ok)

    def root(cov):
        vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
        return vecs * np.sqrt(np.clip(vals, 0.0, None))

    rng = np.random.default_rng(seed)
    draws = m + rng.standard_normal((n_draws, len(m))) @ root(tl.shared[np.ix_(idx, idx)]).T
    s = int(tl.n_seeds.min())
    if s >= 2:
        scale = np.sqrt((s - 1) / rng.chisquare(s - 1, n_draws))[:, None]
        draws = draws + scale * (rng.standard_normal((n_draws, len(m))) @ root(tl.between[np.ix_(idx, idx)]).T)
    xd = x[ok] - x[ok].mean()
    dm = draws - draws.mean(axis=1, keepdims=True)
    den = np.sqrt((dm**2).sum(axis=1) * (xd @ xd))
    r = np.divide(dm @ xd, den, out=np.full(n_draws, np.nan), where=den > 0)
    r = r[np.isfinite(r)]
    if len(r) >= 2:
        out["r_ci_low"], out["r_ci_high"] = (float(v) for v in np.quantile(r, [(1 - ci) / 2, (1 + ci) / 2]))
    return out
