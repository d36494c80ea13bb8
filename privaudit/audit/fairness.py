"""Group fairness of hard predictions, correlations, and the verdict on whether DP amplifies unfairness.

The verdict (:func:`gap_change_verdict`) takes parity-gap changes from
:func:`privaudit.audit.stats.seed_gap_change` (one seed or several) and applies Holm's correction to their
intersection-union tests.

Selection metrics follow aif360's convention, *unprivileged minus privileged* (and unprivileged over
privileged for the ratio), with the formulas of ``aif360.metrics.ClassificationMetric`` and
``aif360.sklearn.metrics``:

* statistical parity difference  ``SPD = P(yhat=1 | unpriv) - P(yhat=1 | priv)``
* disparate impact               ``DI  = P(yhat=1 | unpriv) / P(yhat=1 | priv)``
* equal opportunity difference   ``EOD = TPR_unpriv - TPR_priv``
* average odds difference        ``AOD = ((FPR_unpriv - FPR_priv) + (TPR_unpriv - TPR_priv)) / 2``

They are computed like the AUROC in :mod:`privaudit.audit.utility`: every bootstrap resample is a row of
``W`` (shape ``(B, n)``, how often each sample was drawn), so one matrix product gives the weighted confusion
counts of every group in every resample, and a metric that is undefined in a resample (an empty group, a
group without positives) is ``nan`` there instead of an exception. This module needs numpy and scipy only;
aif360 is the reference it is tested against, not a dependency at run time.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

SELECTION_METRICS = ("statistical_parity_difference", "disparate_impact", "equal_opportunity_difference",
                     "average_odds_difference")
REST = "rest"  # the privileged side of a one-vs-rest comparison

# Per-group weighted counts, in the column order of the count matrix.
_N, _SEL, _POS, _TP = range(4)


def _known(groups: np.ndarray) -> np.ndarray:
    """Mask of samples whose group is known (not ``None`` and not a float ``nan``)."""
    if groups.dtype.kind == "f":
        return ~np.isnan(groups)
    if groups.dtype.kind == "O":
        return np.array([g is not None and not (isinstance(g, float) and np.isnan(g)) for g in groups], dtype=bool)
    return np.ones(len(groups), dtype=bool)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, ``nan`` where ``den`` is 0."""
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _rates(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selection rate, TPR and FPR from counts ``c[..., (n, selected, positives, true positives)]``."""
    n, sel, pos, tp = c[..., _N], c[..., _SEL], c[..., _POS], c[..., _TP]
    return _divide(sel, n), _divide(tp, pos), _divide(sel - tp, n - pos)


def _metrics(cu: np.ndarray, cp: np.ndarray) -> dict[str, np.ndarray]:
    """The four selection metrics from the unprivileged (``cu``) and privileged (``cp``) counts."""
    sr_u, tpr_u, fpr_u = _rates(cu)
    sr_p, tpr_p, fpr_p = _rates(cp)
    return {
        "statistical_parity_difference": sr_u - sr_p,
        "disparate_impact": _divide(sr_u, sr_p),
        "equal_opportunity_difference": tpr_u - tpr_p,
        "average_odds_difference": ((fpr_u - fpr_p) + (tpr_u - tpr_p)) / 2,
    }


def selection_metrics(y: np.ndarray, yhat: np.ndarray, groups: np.ndarray, privileged: object | None,
                      W: np.ndarray) -> dict[object, dict]:
    """SPD, DI, EOD and AOD of hard predictions, at the point and in every bootstrap resample.

    ``y`` are the binary labels (``nan`` = unknown), ``yhat`` the hard predictions ``(p >= threshold)``,
    ``groups`` the attribute value of each sample (``None``/``nan`` = unknown) and ``W`` the ``(B, n)``
    resample counts (:attr:`~privaudit.audit.utility.Resampler.weights`). Samples with an unknown label or
    group are left out of every metric, so the four metrics describe the same samples.

    Comparisons (aif360's convention, unprivileged minus privileged):

    * exactly two groups present and ``privileged`` one of them: one comparison, the other group as
      unprivileged against ``privileged``;
    * otherwise (more than two groups, or no ``privileged`` given): each group as unprivileged against all
      the other groups together, reported with ``"privileged": "rest"``.

    Returns ``{unprivileged group: entry}`` (empty when fewer than two groups are present), where ``entry``
    holds ``"unprivileged"``, ``"privileged"`` (a group or ``"rest"``), the point counts ``n_unprivileged``,
    ``n_privileged``, ``n_pos_unprivileged``, ``n_pos_privileged``, ``selection_rates`` (``unprivileged`` and
    ``privileged``, each ``{"estimate", "boot"}``), and for each name in :data:`SELECTION_METRICS` a dict
    ``{"estimate": float, "boot": (B,) array}``: the estimate uses every
    sample once (``W`` = ones), ``boot[b]`` uses the weights ``W[b]``. A metric is ``nan`` where it is
    undefined: a side without samples (SPD, DI, EOD, AOD), a privileged selection rate of 0 (DI), a side
    without positives (EOD, AOD) or without negatives (AOD).
    """
    y = np.asarray(y, dtype=float)
    yhat = np.asarray(yhat)
    groups = np.asarray(groups)
    W = np.atleast_2d(np.asarray(W, dtype=float))
    n = len(y)
    if yhat.shape != (n,) or groups.shape != (n,) or W.shape[1] != n:
        raise ValueError(f"y, yhat and groups must be 1-D of one length and W (B, n); got {y.shape}, "
                         f"{yhat.shape}, {groups.shape}, {W.shape}")
    if not np.isin(y[~np.isnan(y)], (0.0, 1.0)).all():
        raise ValueError("y must hold 0, 1 or nan")
    if not np.isin(yhat, (0, 1)).all():
        raise ValueError("yhat must hold 0 or 1 (hard predictions, e.g. p >= threshold)")
    keep = _known(groups) & ~np.isnan(y)
    present = sorted(set(groups[keep].tolist()))
    if len(present) < 2:
        return {}
    pos = keep & (y == 1)
    sel = keep & (yhat == 1)
    # (n, 4 G) indicators: for each group, membership, selected, positive, true positive
    M = np.empty((n, 4, len(present)))
    for k, g in enumerate(present):
        member = keep & (groups == g)
        M[:, _N, k], M[:, _SEL, k], M[:, _POS, k], M[:, _TP, k] = member, member & sel, member & pos, member & pos & sel
    M = M.reshape(n, -1)
    point = M.sum(axis=0).reshape(4, -1).T      # (G, 4)
    boot = (W @ M).reshape(-1, 4, len(present)).transpose(0, 2, 1)  # (B, G, 4)

    one_vs_rest = not (len(present) == 2 and privileged in present)
    out = {}
    for k, g in enumerate(present):
        if one_vs_rest:
            pu, pp = point[k], point.sum(axis=0) - point[k]
            bu, bp = boot[:, k], boot.sum(axis=1) - boot[:, k]
        elif g == privileged:
            continue
        else:
            pu, pp, bu, bp = point[k], point[1 - k], boot[:, k], boot[:, 1 - k]
        est, bs = _metrics(pu, pp), _metrics(bu, bp)
        out[g] = {"unprivileged": g, "privileged": REST if one_vs_rest else privileged,
                  "n_unprivileged": int(pu[_N]), "n_privileged": int(pp[_N]),
                  "n_pos_unprivileged": int(pu[_POS]), "n_pos_privileged": int(pp[_POS]),
                  **{m: {"estimate": float(est[m]), "boot": bs[m]} for m in SELECTION_METRICS},
                  # the two selection rates behind DI, for a macro DI over labels (macro_disparate_impact)
                  "selection_rates": {"unprivileged": {"estimate": float(_rates(pu)[0]), "boot": _rates(bu)[0]},
                                      "privileged": {"estimate": float(_rates(pp)[0]), "boot": _rates(bp)[0]}}}
    return out


def macro_disparate_impact(rate_unprivileged, rate_privileged) -> np.ndarray:
    """Disparate impact over labels: the ratio of the mean selection rates, ``mean_l SR_u,l / mean_l SR_p,l``.

    ``rate_*``: selection rates per label, ``(L,)`` (gives a 0-d array) or ``(L, B)`` (bootstrap resamples in the
    columns; gives ``(B,)``). The mean of
    the per-label ratios is not used: a ratio is unbounded above, so one label with a tiny privileged rate would
    dominate it, and it is not invariant to swapping the groups. The ratio of means is the disparate impact of
    the pooled decisions when every label has the same number of samples. ``nan`` where a rate is ``nan`` (a
    macro over a subset of labels would change meaning) or the mean privileged rate is 0.
    """
    u = np.atleast_1d(np.asarray(rate_unprivileged, dtype=float))
    p = np.atleast_1d(np.asarray(rate_privileged, dtype=float))
    if u.shape != p.shape:
        raise ValueError(f"selection rates of both groups need one shape, got {u.shape} and {p.shape}")
    return _divide(u.mean(axis=0), p.mean(axis=0))


def pearson_r(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *,
              confidence: float = 0.95) -> dict:
    """Pearson's r with its two-sided p-value and Fisher-z CI (``scipy.stats.pearsonr``).

    Pairs where either value is not finite are dropped first. Returns ``{"r", "p_value", "ci_low",
    "ci_high", "n", "reason"}``; when r is undefined or unreliable (fewer than 4 pairs, where the Fisher-z
    standard error ``1/sqrt(n - 3)`` is undefined, or a constant or nearly constant input, where scipy
    warns) the four statistics are ``None`` and ``reason`` says why, for the caller to report as a
    warning; otherwise ``reason`` is ``None``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of one length; got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(ok.sum())
    out = {"r": None, "p_value": None, "ci_low": None, "ci_high": None, "n": n, "reason": None}
    if n < 4:
        out["reason"] = f"only {n} complete pairs (Pearson's r and its CI need at least 4)"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("error", stats.ConstantInputWarning)
        warnings.simplefilter("error", stats.NearConstantInputWarning)
        try:
            res = stats.pearsonr(x, y)
        except (stats.ConstantInputWarning, stats.NearConstantInputWarning) as w:
            out["reason"] = f"Pearson's r is undefined or unreliable: {w}"
            return out
    ci = res.confidence_interval(confidence_level=confidence)
    out.update(r=float(res.statistic), p_value=float(res.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
    return out


def weighted_pearson_r(x, y, W) -> np.ndarray:
    """Pearson's r of each bootstrap resample: ``(B,)`` for counts ``W`` ``(B, n)`` (``nan`` where undefined).

    Row b is r of the multiset the counts describe (the pairs repeated ``W[b, i]`` times): from the weighted
    moments ``S = W @ [1, x, y, x^2, y^2, xy]``, ``r = (S_xy S_1 - S_x S_y) / sqrt((S_xx S_1 - S_x^2)
    (S_yy S_1 - S_y^2))``, after centring x and y on their means (which leaves r unchanged and keeps the
    differences exact). Pairs where either value is not finite are dropped first.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    W = np.atleast_2d(np.asarray(W, dtype=float))
    if x.shape != y.shape or x.ndim != 1 or W.shape[1] != len(x):
        raise ValueError(f"x and y must be 1-D of one length n and W (B, n); got {x.shape}, {y.shape}, {W.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    if not ok.any():
        return np.full(W.shape[0], np.nan)
    x, y, W = x[ok] - x[ok].mean(), y[ok] - y[ok].mean(), W[:, ok]
    s1, sx, sy, sxx, syy, sxy = (W @ np.column_stack([np.ones_like(x), x, y, x * x, y * y, x * y])).T
    vx, vy = sxx * s1 - sx**2, syy * s1 - sy**2
    den = np.sqrt(np.clip(vx, 0, None) * np.clip(vy, 0, None))
    scale = np.sqrt(np.mean(x * x) * np.mean(y * y)) * s1**2  # 'zero' variance is relative to the data's scale
    return _divide(sxy * s1 - sx * sy, np.where(den > 1e-12 * scale, den, 0.0))


def pearson_r_bootstrap(x, y, W, *, confidence: float = 0.95) -> dict:
    """Percentile bootstrap interval of Pearson's r from the study's resamples ``W`` (patients resampled when
    the study clusters them, so images of one patient move together). Returns ``{"ci_low", "ci_high",
    "n_boot_used"}``: resamples where r is undefined are left out and counted."""
    r = weighted_pearson_r(x, y, W)
    r = r[np.isfinite(r)]
    if len(r) < 2:
        return {"ci_low": None, "ci_high": None, "n_boot_used": int(len(r))}
    lo, hi = np.quantile(r, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"ci_low": float(lo), "ci_high": float(hi), "n_boot_used": int(len(r))}


def holm(p_values: Sequence[float | None] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), ``nan`` for a missing p-value.

    With the ``m`` finite p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted value of ``p_(i)`` is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where the adjusted value is ``<= alpha`` is Holm's
    procedure at level ``alpha``. Missing values (``None``/``nan``) are not tests and do not count in ``m``.
    """
    p = np.array([np.nan if v is None else v for v in p_values], dtype=float)
    finite = ~np.isnan(p)
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    idx = np.flatnonzero(finite)
    order = idx[np.argsort(p[idx], kind="mergesort")]
    m = len(order)
    adjusted = np.full(len(p), np.nan)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


SINGLE_RUNS_WARNING = ("comparisons of single training runs: the intervals and the verdict cover the sampling of "
                       "test patients only, not training randomness (another seed gives another model); train "
                       "two or more seeds per setting to cover it")
P_VALUE_RULE = ("normal approximation with bootstrap standard errors (Student's t with Satterthwaite df over seeds), "
                "so that Holm over m tests can reach alpha/m whatever the number of resamples")


def gap_change_verdict(changes: Sequence[dict], *, margin: float = 0.02, alpha: float = 0.05,
                       names: Sequence[str] | None = None, adjusted_p: Sequence[float | None] | None = None,
                       family_size: int | None = None, n_boot: int | None = None, power: float = 0.8) -> dict:
    """Does DP amplify unfairness? ``"yes"``, ``"no"`` or ``"inconclusive"`` from parity-gap changes.

    ``changes``: one :func:`privaudit.audit.stats.seed_gap_change` result per gap (label and group), ``names``
    their labels. ``adjusted_p``: Holm-adjusted p-values over a larger family (all attributes, labels and
    groups of a comparison) of size ``family_size``, aligned with ``changes``; by default Holm is applied
    to these changes alone.

    * ``"yes"`` if some gap widened (``|gamma_private| > |gamma_reference|``, the intersection-union test of
      ``seed_gap_change``, which has level alpha whatever the two gaps and their noise) with Holm-adjusted
      p ``<= alpha``;
    * otherwise ``"no"`` if every change in |gap| is shown within ``+-margin`` (``equivalence_bound < margin``);
    * otherwise ``"inconclusive"``.

    **Resolution rule.** The p-values come from the normal approximation with bootstrap standard errors
    (:data:`P_VALUE_RULE`), never from counting resamples: a resampling p-value cannot go below 1/(B+1), and Holm
    over m tests needs alpha/m, so with B resamples "yes" would be out of reach once m > alpha (B+1) (50 at
    B = 1000, while 7 groups x 5 labels is already 35). When m > alpha (B+1) (``resolution_limited``) the
    verdict warns that the resamples cannot check the far tail that the answer may rest on, and says how many
    resamples would (``ceil(m / alpha)``).

    ``minimum_detectable_change``: per change, the smallest |gap| that a private model would need, starting from
    a reference gap of 0, for the test to find it with ``power`` at Holm's strictest level ``alpha / m``
    (:func:`~privaudit.audit.stats.minimum_detectable_change`), and the smallest and largest over the changes.

    Returns ``answer, margin, alpha, p_value_adjusted, reason, p_value_method, resolution_limited,
    minimum_detectable_change, covers_training_randomness, warnings`` (sentences for the study's warnings).
    """
    from privaudit.audit.stats import minimum_detectable_change

    k = len(changes)
    names = [f"change {i}" for i in range(k)] if names is None else list(names)
    if len(names) != k or (adjusted_p is not None and len(adjusted_p) != k):
        raise ValueError("changes, names and adjusted_p must have one length")
    if not margin > 0 or not 0 < alpha < 0.5:
        raise ValueError(f"need margin > 0 and 0 < alpha < 0.5; got margin={margin}, alpha={alpha}")
    raw = [c.get("p_value") for c in changes]
    adj = holm(raw) if adjusted_p is None else np.array([np.nan if v is None else v for v in adjusted_p], float)
    m = int(family_size if family_size is not None else np.sum(~np.isnan(np.array(
        [np.nan if v is None else v for v in raw], dtype=float))))
    level = alpha / max(m, 1)
    mdc = []
    for c in changes:
        dfs = [d for d in ((c.get("difference") or {}).get("df"), (c.get("sum") or {}).get("df")) if d is not None]
        se_u, se_w = (c.get("difference") or {}).get("se"), (c.get("sum") or {}).get("se")
        mdc.append(None if se_u is None or se_w is None else minimum_detectable_change(
            se_u, se_w, alpha=level, power=power, rho=c.get("rho") or 0.0, df=min(dfs) if dfs else np.inf))
    finite_mdc = [v for v in mdc if v is not None]
    covers = bool(k) and all(c.get("covers_training_randomness") for c in changes)
    limited = n_boot is not None and m > alpha * (n_boot + 1)
    out = {"answer": "inconclusive", "margin": margin, "alpha": alpha,
           "p_value_adjusted": [None if np.isnan(a) else float(a) for a in adj], "reason": "",
           "p_value_method": P_VALUE_RULE, "family_size": m, "resolution_limited": bool(limited),
           "minimum_detectable_change": {"power": power, "alpha_holm": level, "by_change": mdc,
                                         "smallest": min(finite_mdc) if finite_mdc else None,
                                         "largest": max(finite_mdc) if finite_mdc else None},
           "covers_training_randomness": covers, "warnings": []}
    if limited:
        out["warnings"].append(
            f"{m} tests in the family: Holm's first threshold alpha/m = {level:.2g} is below 1/(B+1) = "
            f"{1 / (n_boot + 1):.2g}, the smallest p-value that {n_boot} resamples can show, so the verdict's "
            f"p-values come from the normal approximation and the resamples cannot check the tail they rest on; "
            f"use at least {int(np.ceil(m / alpha))} resamples (n_boot) to check them by resampling")
    if k and not covers:
        out["warnings"].append(SINGLE_RUNS_WARNING)
    if k == 0:
        out["reason"] = "there are no parity-gap changes to judge."
        return out
    est = np.array([np.nan if c.get("estimate") is None else c["estimate"] for c in changes], dtype=float)
    significant = adj <= alpha  # False where nan
    if significant.any():
        cand = np.flatnonzero(significant)
        i = cand[np.lexsort((-np.nan_to_num(est[cand], nan=-np.inf), adj[cand]))[0]]
        c = changes[i]
        out["answer"] = "yes"
        out["reason"] = (f"{int(significant.sum())} of {k} parity gaps widened significantly (Holm over {m}, "
                         f"alpha={alpha}), led by {names[i]}: |gap| {abs(c['gap_reference']):.4f} -> "
                         f"{abs(c['gap_private']):.4f} (squared-gap change {c['estimate']:+.2e}, adjusted "
                         f"p={adj[i]:.3g}).")
        return out
    bound = np.array([np.nan if c.get("equivalence_bound") is None else c["equivalence_bound"] for c in changes])
    undefined = np.flatnonzero(np.isnan(bound))
    if len(undefined):
        out["reason"] = (f"no gap widened significantly, but {names[undefined[0]]} has no interval, so "
                         f"equivalence within ±{margin} cannot be shown for every change.")
        return out
    i = int(np.argmax(bound))
    mdc_note = (f" The smallest widening these tests detect with {power:.0%} power is about "
                f"{out['minimum_detectable_change']['smallest']:.3f}." if finite_mdc else "")
    if bound[i] < margin:
        out["answer"] = "no"
        out["reason"] = (f"all {k} changes in |gap| are within ±{margin} (two one-sided tests, alpha={alpha}); the "
                         f"least certain is {names[i]}, within ±{bound[i]:.4f}.")
    else:
        out["reason"] = (f"no gap widened significantly (Holm over {m}, alpha={alpha}), but the change in |gap| of "
                         f"{names[i]} is only shown within ±{bound[i]:.4f}, not ±{margin}.{mdc_note}")
    return out
