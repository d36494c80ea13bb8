"""Who is exposed: membership-inference risk by group, with intervals, and the verdicts built on it.

Per group, an attack's risk is read three ways (Carlini et al. 2022 argue for the low-FPR regime):

* the group's **FPR at the global threshold** (the attacker's 1%-FPR threshold over all non-members). A group
  whose non-members also score high is flagged more often whatever its members do; its TPR at the global
  threshold alone would make it look more exposed than it is;
* the **TPR at the group's own 1% FPR**: the threshold set on the group's non-members, so the group's own
  score level cancels out (null below 100 non-members in the group, where 1% FPR cannot be resolved);
* the **AUC** of the attack within the group, which no threshold can bias.

Rates carry Clopper-Pearson (exact binomial) intervals (:func:`clopper_pearson`, the closed form that
``scipy.stats.binomtest(...).proportion_ci(method="exact")`` computes), over the attacked samples and given
the threshold; AUCs carry patient-bootstrap intervals (the engine's resamples, shared by every model).

The **attack-AUC gap** of a group (:func:`auc_gaps`) is the group's attack AUC minus the size-weighted mean
attack AUC of the other groups, as the performance-parity gap of fairness is for the model's AUROC. Two
verdicts use it:

* :func:`exposure_verdict` (one model): is some group more (or less) exposed than the others? Two-sided
  tests of each gap (normal approximation with the bootstrap standard error), Holm over the model's
  attributes, attacks and groups; "no" when every gap is shown within the margin.
* :func:`privacy_gap_verdict` (private against the reference): does DP narrow or widen the gap in attack
  success between groups? Each gap's change is measured and tested as the fairness verdict does
  (:func:`privaudit.audit.stats.seed_gap_change`: the bias-corrected squared-gap change and the
  intersection-union test of ``|gamma_1| > |gamma_0|``), here in both directions (widened, and narrowed:
  the same test with the models' roles swapped), two-sided by Bonferroni over the two directions, with
  Holm across attributes, attacks and groups (the multiplicity rule of
  :func:`privaudit.audit.fairness.gap_change_verdict`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import ndtri
from scipy.stats import beta, norm

from privaudit.audit.fairness import P_VALUE_RULE, holm

RISK_FPR = 0.01     # the FPR at which the per-group TPRs are read
CP_METHOD = "clopper-pearson"
SINGLE_RUNS = ("privacy gap: a comparison of single training runs covers the sampling of patients only, not "
               "training randomness (another seed gives another model and other members' losses)")


def clopper_pearson(k, n, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) interval for a binomial proportion, vectorised over ``k`` and ``n``.

    ``lo = Beta(a/2; k, n - k + 1)`` (0 when k = 0) and ``hi = Beta(1 - a/2; k + 1, n - k)`` (1 when k = n),
    ``a = 1 - confidence``; nan where ``n == 0``. It covers the true proportion with probability at least
    ``confidence`` for every proportion and n (conservative: more, at small n).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    k, n = np.broadcast_arrays(np.asarray(k, dtype=float), np.asarray(n, dtype=float))
    if ((k < 0) | (k > n)).any():
        raise ValueError("need 0 <= k <= n")
    a = 1 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, beta.ppf(a / 2, np.maximum(k, 1), n - k + 1), 0.0)
        hi = np.where(k < n, beta.ppf(1 - a / 2, k + 1, np.maximum(n - k, 1)), 1.0)
    empty = n == 0
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def rate(k: int, n: int, *, confidence: float = 0.95) -> dict | None:
    """``k / n`` with its Clopper-Pearson interval and ``n``; None when ``n == 0``."""
    if n == 0:
        return None
    lo, hi = clopper_pearson(k, n, confidence=confidence)
    return {"estimate": float(k / n), "ci_low": float(lo), "ci_high": float(hi), "n": int(n),
            "ci_method": CP_METHOD}


def own_threshold(nonmember_scores: np.ndarray, target: float) -> float | None:
    """The lowest threshold whose FPR (score >= threshold) on these non-members is at most ``target``;
    None when there are fewer than ``1 / target`` of them (the FPR cannot be resolved that finely)."""
    s = np.sort(np.asarray(nonmember_scores, dtype=float))[::-1]
    if len(s) == 0 or target < 1.0 / len(s) - 1e-12:
        return None
    k = int(np.floor(target * len(s) + 1e-9))  # at most k non-members may be above the threshold
    return float(np.nextafter(s[k], np.inf)) if k < len(s) else float(s[-1])


def group_risk(member_scores, nonmember_scores, *, global_threshold: float | None, fpr: float = RISK_FPR,
               confidence: float = 0.95) -> dict:
    """One group's threshold risk: FPR and TPR at the global threshold, and TPR at the group's own ``fpr``
    (with the FPR that its own threshold reaches), each a :func:`rate` block or None when unmeasurable."""
    gm = np.asarray(member_scores, dtype=float)
    gn = np.asarray(nonmember_scores, dtype=float)
    out = {"fpr_at_global_threshold": None, "tpr_at_global_threshold": None,
           "tpr_at_own_fpr": {str(fpr): None}}
    if global_threshold is not None:
        out["fpr_at_global_threshold"] = rate(int((gn >= global_threshold).sum()), len(gn), confidence=confidence)
        out["tpr_at_global_threshold"] = rate(int((gm >= global_threshold).sum()), len(gm), confidence=confidence)
    own = own_threshold(gn, fpr)
    if own is not None and len(gm):
        block = rate(int((gm >= own).sum()), len(gm), confidence=confidence)
        block["fpr"] = float(np.mean(gn >= own))  # at most ``fpr``; ties can keep it below
        out["tpr_at_own_fpr"][str(fpr)] = block
    return out


def auc_gaps(groups: dict[str, tuple[float, np.ndarray, int]]) -> dict[str, tuple[float, np.ndarray]]:
    """Each group's attack-AUC gap: its AUC minus the mean AUC of the other groups weighted by their sizes,
    on the point estimate and on every resample. ``groups``: ``{group: (auc, resampled aucs (B,), n)}`` of
    the groups shown (suppressed ones left out); groups with a non-finite AUC are not in anyone's reference and
    get no gap."""
    ok = {g: v for g, v in groups.items() if v[0] is not None and np.isfinite(v[0])}
    out = {}
    for g, (point, boots, _) in ok.items():
        others = [h for h in ok if h != g]
        if not others:
            continue
        w = np.array([ok[h][2] for h in others], dtype=float)
        ref_point = float(np.average([ok[h][0] for h in others], weights=w))
        ref_boot = np.average(np.vstack([ok[h][1] for h in others]), axis=0, weights=w)
        out[g] = (float(point) - ref_point, np.asarray(boots, dtype=float) - ref_boot)
    return out


def normal_test(point: float, boots: np.ndarray, *, alpha: float = 0.05) -> dict:
    """Two-sided test of a gap = 0 with the bootstrap standard error (normal approximation), and the
    equivalence bound: the smallest margin within which the gap is shown at ``alpha`` (two one-sided tests,
    ``|gap| + z_{1-alpha} se``). p-value and bound are None when the standard error is not finite or is 0."""
    b = np.asarray(boots, dtype=float)
    b = b[np.isfinite(b)]
    se = float(np.std(b, ddof=1)) if len(b) >= 2 else float("nan")
    if not (np.isfinite(point) and np.isfinite(se) and se > 0):
        return {"se": se if np.isfinite(se) else None, "p_value": None, "equivalence_bound": None,
                "n_boot_used": int(len(b))}
    return {"se": se, "p_value": float(min(1.0, 2 * norm.sf(abs(point) / se))),
            "equivalence_bound": float(abs(point) + ndtri(1 - alpha) * se), "n_boot_used": int(len(b))}


def exposure_verdict(gaps: Sequence[dict], *, names: Sequence[str], margin: float = 0.02, alpha: float = 0.05,
                     adjusted_p: Sequence[float | None] | None = None, family_size: int | None = None) -> dict:
    """Is some group more (or less) exposed to membership inference than the others, in one model?

    ``gaps``: per (attack, group), ``{"estimate", "ci_low", "ci_high"}`` of the attack-AUC gap with the
    :func:`normal_test` fields (``p_value``, ``equivalence_bound``); ``adjusted_p``: their Holm-adjusted
    p-values over the model's whole family (by default Holm over these alone).

    * ``"yes"``: some gap differs from 0 (Holm-adjusted p <= alpha); the reason names the largest such gap
      and whether its group is more or less exposed;
    * ``"no"``: every gap is shown within ``+-margin`` attack AUC;
    * ``"inconclusive"`` otherwise.
    """
    k = len(gaps)
    names = list(names)
    if len(names) != k or (adjusted_p is not None and len(adjusted_p) != k):
        raise ValueError("gaps, names and adjusted_p must have one length")
    raw = [g.get("p_value") for g in gaps]
    adj = holm(raw) if adjusted_p is None else np.array([np.nan if v is None else v for v in adjusted_p], float)
    m = int(family_size if family_size is not None else np.sum(~np.isnan(holm(raw))))
    out = {"answer": "inconclusive", "reason": "", "margin": margin, "alpha": alpha,
           "p_value_adjusted": [None if np.isnan(a) else float(a) for a in adj], "family_size": m,
           "p_value_method": "normal approximation with the bootstrap standard error, two-sided",
           "most_exposed": None}
    if k == 0:
        out["reason"] = "no group's attack AUC could be compared with the others'."
        return out
    est = np.array([np.nan if g.get("estimate") is None else g["estimate"] for g in gaps], dtype=float)
    significant = adj <= alpha
    finite = np.flatnonzero(np.isfinite(est))
    if len(finite):
        i = int(finite[np.argmax(est[finite])])
        out["most_exposed"] = {"name": names[i], **{key: gaps[i].get(key) for key in ("estimate", "ci_low", "ci_high")}}
    if significant.any():
        cand = np.flatnonzero(significant)
        i = int(cand[np.argmax(np.abs(np.nan_to_num(est[cand])))])
        how = "more" if est[i] > 0 else "less"
        out["answer"] = "yes"
        out["reason"] = (f"{int(significant.sum())} of {k} attack-AUC gaps differ from 0 (Holm over {m}, "
                         f"alpha={alpha}); the largest: {names[i]} is {how} exposed than the others, attack AUC "
                         f"{est[i]:+.3f} against theirs (adjusted p={adj[i]:.3g}).")
        return out
    bound = np.array([np.nan if g.get("equivalence_bound") is None else g["equivalence_bound"] for g in gaps])
    if np.isnan(bound).any():
        j = int(np.flatnonzero(np.isnan(bound))[0])
        out["reason"] = f"no gap differs significantly, but {names[j]} has no interval, so equality cannot be shown."
        return out
    j = int(np.argmax(bound))
    if bound[j] < margin:
        out["answer"] = "no"
        out["reason"] = (f"all {k} attack-AUC gaps are within ±{margin} (two one-sided tests, alpha={alpha}); the "
                         f"least certain is {names[j]}, within ±{bound[j]:.4f}.")
    else:
        out["reason"] = (f"no gap differs significantly (Holm over {m}, alpha={alpha}), but the gap of {names[j]} is "
                         f"only shown within ±{bound[j]:.4f}, not ±{margin}.")
    return out


def privacy_gap_change(gap_private: float, gap_reference: float, boots_private, boots_reference, *,
                       ci: float = 0.95, alpha: float = 0.05) -> dict:
    """Change of one attack-AUC gap from the reference model to the private one, tested both ways.

    The size (``estimate``, ``ci_low``, ``ci_high``: the bias-corrected squared-gap change, in AUC^2), the
    widened test and the equivalence bound are those of :func:`privaudit.audit.stats.seed_gap_change` (one
    seed per side; the replicates must come from the same resamples). ``p_value_narrowed`` is the same
    intersection-union test with the models' roles swapped (``|gamma_0| > |gamma_1|``); ``p_value`` is the
    two-sided ``min(1, 2 min(widened, narrowed))`` and ``direction`` the side of the smaller one.
    """
    from privaudit.audit.stats import seed_gap_change

    b1 = np.asarray(boots_private, dtype=float)[None, :]
    b0 = np.asarray(boots_reference, dtype=float)[None, :]
    wide = seed_gap_change([gap_private], [gap_reference], b1, b0, ci=ci, alpha=alpha)
    narrow = seed_gap_change([gap_reference], [gap_private], b0, b1, ci=ci, alpha=alpha)
    pw, pn = wide["p_value"], narrow["p_value"]
    out = dict(wide)
    out["p_value_widened"], out["p_value_narrowed"] = pw, pn
    out["p_value"] = None if pw is None or pn is None else float(min(1.0, 2 * min(pw, pn)))
    est = wide["estimate"]
    if out["p_value"] is None:
        out["direction"] = None
    elif pw != pn:
        out["direction"] = "widened" if pw < pn else "narrowed"
    else:  # equal p-values (both 1): the sign of the estimate, if any
        out["direction"] = None if not est else ("widened" if est > 0 else "narrowed")
    return out


def privacy_gap_verdict(changes: Sequence[dict], *, names: Sequence[str], margin: float = 0.02,
                        alpha: float = 0.05, adjusted_p: Sequence[float | None] | None = None,
                        family_size: int | None = None, n_boot: int | None = None, power: float = 0.8) -> dict:
    """Does DP narrow or widen the gap in attack success between groups? ``"yes"``, ``"no"`` or
    ``"inconclusive"`` from :func:`privacy_gap_change` results, with the rule of the fairness verdict.

    * ``"yes"`` when some gap changed (two-sided p, Holm-adjusted over the family of ``family_size``,
      ``<= alpha``); ``direction`` says ``"narrowed"``, ``"widened"`` or ``"both"`` (different gaps each way);
    * otherwise ``"no"`` when every change in |gap| is shown within ``+-margin`` (``equivalence_bound``);
    * otherwise ``"inconclusive"``, with the minimum detectable change: per change, the smallest gap that,
      opened from 0 or closed to 0, the two-sided test finds with ``power`` at Holm's strictest level
      (:func:`privaudit.audit.stats.minimum_detectable_change` at ``alpha / (2 m)``, the larger of the two
      directions).

    The p-values come from the normal approximation with bootstrap standard errors, so that Holm over m tests
    can reach alpha/m whatever the number of resamples; ``resolution_limited`` and a warning when the
    resamples alone could not check them (``2 m > alpha (B + 1)``).
    """
    from privaudit.audit.stats import minimum_detectable_change

    k = len(changes)
    names = list(names)
    if len(names) != k or (adjusted_p is not None and len(adjusted_p) != k):
        raise ValueError("changes, names and adjusted_p must have one length")
    if not margin > 0 or not 0 < alpha < 0.5:
        raise ValueError(f"need margin > 0 and 0 < alpha < 0.5; got margin={margin}, alpha={alpha}")
    raw = [c.get("p_value") for c in changes]
    adj = holm(raw) if adjusted_p is None else np.array([np.nan if v is None else v for v in adjusted_p], float)
    m = int(family_size if family_size is not None else np.sum(~np.isnan(holm(raw))))
    level = alpha / (2 * max(m, 1))
    mdc = []
    for c in changes:
        se_u, se_w = (c.get("difference") or {}).get("se"), (c.get("sum") or {}).get("se")
        if se_u is None or se_w is None:
            mdc.append(None)
            continue
        rho = c.get("rho") or 0.0
        both = [minimum_detectable_change(se_u, se_w, alpha=level, power=power, rho=r) for r in (rho, -rho)]
        mdc.append(None if None in both else float(max(both)))
    finite_mdc = [v for v in mdc if v is not None]
    limited = n_boot is not None and 2 * m > alpha * (n_boot + 1)
    covers = bool(k) and all(c.get("covers_training_randomness") for c in changes)
    out = {"answer": "inconclusive", "direction": None, "reason": "", "margin": margin, "alpha": alpha,
           "p_value_adjusted": [None if np.isnan(a) else float(a) for a in adj], "family_size": m,
           "p_value_method": P_VALUE_RULE + "; two-sided: twice the smaller of the widened and narrowed p-values",
           "resolution_limited": bool(limited),
           "minimum_detectable_change": {"power": power, "alpha_holm": level, "by_change": mdc,
                                         "smallest": min(finite_mdc) if finite_mdc else None,
                                         "largest": max(finite_mdc) if finite_mdc else None},
           "covers_training_randomness": covers, "warnings": []}
    if limited:
        out["warnings"].append(
            f"privacy gap: {m} two-sided tests in the family: Holm's first threshold alpha/(2m) = {level:.2g} is "
            f"below 1/(B+1) = {1 / (n_boot + 1):.2g}, so the resamples cannot check the tail the p-values rest on; "
            f"use at least {int(np.ceil(2 * m / alpha))} resamples (n_boot) to check them by resampling")
    if k and not covers:
        out["warnings"].append(SINGLE_RUNS)
    if k == 0:
        out["reason"] = "there are no attack-AUC gaps measured in both models to compare."
        return out
    significant = adj <= alpha
    if significant.any():
        cand = np.flatnonzero(significant)
        i = int(cand[np.argmin(adj[cand])])
        dirs = {changes[j]["direction"] for j in cand}
        out["answer"] = "yes"
        out["direction"] = dirs.pop() if len(dirs) == 1 else "both"
        c = changes[i]
        out["reason"] = (f"{int(significant.sum())} of {k} attack-AUC gaps changed significantly (Holm over {m}, "
                         f"alpha={alpha}), led by {names[i]}: |gap| {abs(c['gap_reference']):.4f} without DP -> "
                         f"{abs(c['gap_private']):.4f} with DP ({c['direction']}; adjusted p={adj[i]:.3g}).")
        return out
    bound = np.array([np.nan if c.get("equivalence_bound") is None else c["equivalence_bound"] for c in changes])
    if np.isnan(bound).any():
        j = int(np.flatnonzero(np.isnan(bound))[0])
        out["reason"] = (f"no gap changed significantly, but {names[j]} has no interval, so equivalence within "
                         f"±{margin} cannot be shown for every change.")
        return out
    j = int(np.argmax(bound))
    if bound[j] < margin:
        out["answer"] = "no"
        out["reason"] = (f"all {k} changes in |gap| are within ±{margin} attack AUC (two one-sided tests, "
                         f"alpha={alpha}); the least certain is {names[j]}, within ±{bound[j]:.4f}.")
    else:
        note = (f" The smallest change these tests detect with {power:.0%} power is about "
                f"{out['minimum_detectable_change']['smallest']:.3f}." if finite_mdc else "")
        out["reason"] = (f"no gap changed significantly (Holm over {m}, alpha={alpha}), but the change in |gap| of "
                         f"{names[j]} is only shown within ±{bound[j]:.4f}, not ±{margin}.{note}")
    return out
