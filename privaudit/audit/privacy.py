"""Empirical privacy: membership-inference attack metrics on numpy arrays.

An attack gives every sample a score, higher meaning "more likely a member". From the scores of members and
non-members we report the ROC AUC, the advantage max |TPR - FPR| (Yeom et al. 2018), and the TPR at low FPR
(Carlini et al. 2022), which is what matters for privacy: an attack that confidently identifies a few members
is a privacy failure even when its AUC is near 0.5.

**The unit attacked.** Attacks report in the run's privacy unit (:func:`attack_unit`). Under the patient unit
they score *patients*: each image's statistic is computed as before and a patient's score is the **mean** of its
images' scores (:func:`unit_mean`; LiRA and RMIA average the per-image statistic and fit their tests to that
mean, see :func:`privaudit.audit.attacks.LiraAttack`). Members are training patients, non-members held-out
patients, ``n_members`` / ``n_nonmembers`` count patients, and a patient's group is its attribute (the most
frequent value over its images, :func:`unit_values`). Why the mean and not the sum: a sum grows with the number of
images, so patients with many images would be flagged (members and non-members alike) for that alone, and the
sum of per-image log-likelihood ratios is a likelihood ratio only if a patient's images were independent, which
they are not (one body, one set of labels, often one scanner); the mean keeps every patient on one scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from privaudit.audit.utility import auroc

FPR_POINTS = (0.001, 0.01, 0.1)
UNITS = ("patient", "image")
PATIENT_SUFFIX = "@patient"   # attack_scores.csv: a column scored per patient (each image holds its patient's score)
ROC_POINTS = 200  # thinned ROC kept for the report's log-log plot


def roc_curve_points(member_scores: np.ndarray, nonmember_scores: np.ndarray):
    """(fpr, tpr, thresholds) at every distinct score, predicting "member" when score >= threshold."""
    s = np.r_[member_scores, nonmember_scores]
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # last index of each run of tied scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(1 - y)[last]
    tpr = np.r_[0.0, tp / max(1, len(member_scores))]
    fpr = np.r_[0.0, fp / max(1, len(nonmember_scores))]
    return fpr, tpr, np.r_[np.inf, s[last]]


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float, n_nonmembers: int) -> float | None:
    """Largest TPR with FPR <= target; ``None`` when the target is below 1/(number of non-members)."""
    if n_nonmembers == 0 or target < 1.0 / n_nonmembers:
        return None
    return float(tpr[fpr <= target + 1e-12].max())


def threshold_at_fpr(nonmember_scores: np.ndarray, target: float) -> float:
    """The lowest threshold whose FPR (score >= threshold) stays at or below ``target``."""
    s = np.sort(nonmember_scores)[::-1]
    k = int(np.floor(target * len(s)))  # at most k non-members may be above the threshold
    return float(np.nextafter(s[k], np.inf)) if k < len(s) else float(s[-1])


def attack_metrics(member_scores, nonmember_scores, *, groups: dict[str, np.ndarray] | None = None,
                   member_mask: np.ndarray | None = None, confidence: float = 0.95) -> tuple[dict, list[str]]:
    """AUC, advantage, TPR at FPR 0.1%/1%/10% (null where unmeasurable), the thinned ROC, and per-group risk.

    ``groups`` maps attribute -> group label per sample over the concatenation members + non-members.
    ``rates_at_fpr`` gives the TPR and FPR at each FPR point's threshold with Clopper-Pearson intervals, and
    each group gets :func:`privaudit.audit.exposure.group_risk` (its FPR and TPR at the global 1%-FPR
    threshold, its TPR at its own 1% FPR) besides its AUC.
    """
    from privaudit.audit.exposure import group_risk, own_threshold, rate

    m = np.asarray(member_scores, dtype=float)
    nm = np.asarray(nonmember_scores, dtype=float)
    warnings: list[str] = []
    fpr, tpr, _ = roc_curve_points(m, nm)
    out = {
        "auc": auroc(np.r_[np.ones(len(m)), np.zeros(len(nm))], np.r_[m, nm]),
        "advantage": float(np.max(np.abs(tpr - fpr))),
        "tpr_at_fpr": {},
        "n_members": int(len(m)),
        "n_nonmembers": int(len(nm)),
    }
    for target in FPR_POINTS:
        val = tpr_at_fpr(fpr, tpr, target, len(nm))
        out["tpr_at_fpr"][str(target)] = val
        if val is None:
            warnings.append(f"TPR at FPR {target:g} is not measurable with {len(nm)} non-members "
                            f"(needs at least {int(np.ceil(1 / target))})")
    out["rates_at_fpr"] = {}
    for target in FPR_POINTS:
        t = own_threshold(nm, target)
        out["rates_at_fpr"][str(target)] = None if t is None else {
            "tpr": rate(int((m >= t).sum()), len(m), confidence=confidence),
            "fpr": rate(int((nm >= t).sum()), len(nm), confidence=confidence)}
    # Thin on a log-spaced FPR grid, so the low-FPR end that a log-log plot shows keeps its detail.
    grid = np.r_[0.0, np.logspace(np.log10(1.0 / max(len(nm), 1)), 0, ROC_POINTS)]
    keep = np.unique(np.r_[0, np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, len(fpr) - 1), len(fpr) - 1])
    out["roc"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}
    if groups:
        thr = threshold_at_fpr(nm, 0.01) if len(nm) >= 100 else None
        is_member = np.r_[np.ones(len(m), bool), np.zeros(len(nm), bool)]
        scores = np.r_[m, nm]
        by_group = {}
        for attr, labels in groups.items():
            labels = np.asarray(labels, dtype=object)
            res = {}
            for g in sorted({x for x in labels if x is not None and not (isinstance(x, float) and np.isnan(x))}):
                sel = labels == g
                gm, gn = scores[sel & is_member], scores[sel & ~is_member]
                auc_g = auroc(np.r_[np.ones(len(gm)), np.zeros(len(gn))], np.r_[gm, gn]) if len(gm) and len(gn) else None
                res[str(g)] = {
                    "auc": None if auc_g is None or not np.isfinite(auc_g) else auc_g,
                    # the attacker's global 1%-FPR threshold applied to this group's members
                    "tpr_at_fpr": {"0.01": float(np.mean(gm >= thr)) if thr is not None and len(gm) else None},
                    "n": int(sel.sum()), "n_members": int(len(gm)), "n_nonmembers": int(len(gn)),
                    **group_risk(gm, gn, global_threshold=thr, confidence=confidence),
                }
            by_group[attr] = res
        out["by_group"] = by_group
    return out, warnings


def repeated_trials_bound(member_scores, nonmember_scores, *, delta: float, fpr: float = 0.01, seed: int = 0,
                          threshold_share: float = 0.5) -> dict | None:
    """Jagielski et al. (2020)'s epsilon lower bound from the attack's TPR and FPR at its ``fpr`` threshold,
    with Clopper-Pearson intervals. It is valid only when members and non-members come from independent
    repeated trainings; from a single training run it is indicative, not a proof.

    The threshold is chosen on held-out non-members: a random ``threshold_share`` of them (``seed``) sets the
    threshold with FPR at most ``fpr`` (:func:`threshold_at_fpr`), and the false positives are counted on the
    other non-members only. Choosing it on the non-members whose false positives are counted caps their FPR at
    ``fpr`` by construction (the count can never exceed it), which understates the FPR bound and biases epsilon
    upward. The true positives are counted on every member (the threshold does not depend on them). None when
    the threshold part holds fewer than ``1 / fpr`` non-members.
    """
    from privaudit.audit.empirical import repeated_trials_lower_bound

    if not 0 < threshold_share < 1:
        raise ValueError(f"threshold_share must lie in (0, 1), got {threshold_share}")
    m = np.asarray(member_scores, dtype=float)
    nm = np.asarray(nonmember_scores, dtype=float)
    order = np.random.default_rng(seed).permutation(len(nm))
    n_sel = int(round(threshold_share * len(nm)))
    select, count = nm[order[:n_sel]], nm[order[n_sel:]]
    if n_sel < 1.0 / fpr or len(count) == 0 or len(m) == 0:
        return None
    t = threshold_at_fpr(select, fpr)
    tp, fp = int((m >= t).sum()), int((count >= t).sum())
    res = repeated_trials_lower_bound(tp, len(m) - tp, fp, len(count) - fp, delta=delta)
    res.update({"valid_for": "independent repeated trainings only, not a single run",
                "threshold_selection": "held-out non-members", "threshold": float(t), "n_threshold_nonmembers": n_sel,
                "n_counted_nonmembers": int(len(count))})
    return res


def binary_entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def loss_attack_scores(df: pd.DataFrame, labels) -> dict[str, np.ndarray]:
    """Threshold-attack scores per sample (higher = member): loss (Yeom et al. 2018), confidence and entropy.

    ``loss``: the negated per-sample training loss. ``confidence``: the mean log-probability the model gives
    the true labels (known labels only), which the loss is up to its masking. ``entropy``: the negated mean
    binary entropy of the predictions (members tend to get confident predictions).
    """
    p = df[[f"p_{x}" for x in labels]].to_numpy(dtype=float)
    y = df[[f"y_{x}" for x in labels]].to_numpy(dtype=float)
    known = ~np.isnan(y)
    pc = np.clip(p, 1e-12, 1 - 1e-12)
    logp_true = np.where(y == 1, np.log(pc), np.log1p(-pc))
    n_known = np.maximum(known.sum(axis=1), 1)
    scores = {
        "confidence": np.where(known, logp_true, 0.0).sum(axis=1) / n_known,
        "entropy": -binary_entropy(p).mean(axis=1),
    }
    if "loss" in df.columns and df["loss"].notna().all():
        scores["loss"] = -df["loss"].to_numpy(dtype=float)
    return scores


def trained_attack_scores(features: np.ndarray, member: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """A trained attack, as TF-Privacy's library offers: logistic regression on per-sample features (loss,
    confidence, entropy), each sample scored by a model fitted on the other folds (stratified
    cross-validation), so no sample is scored by a model that saw its membership."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = int(min(folds, np.bincount(member.astype(int)).min()))
    if folds < 2:
        return np.full(len(member), np.nan)
    model = make_pipeline(StandardScaler(), LogisticRegression())
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, features, member, cv=cv, method="decision_function")


def logit_confidence(df: pd.DataFrame, labels) -> np.ndarray:
    """LiRA's per-sample statistic: the logit-scaled confidence in the true labels, log(p / (1 - p)) of the
    probability given to each known label's true value, **summed over the sample's known labels** (a
    multi-label model is treated as one classifier of the label vector; per-label statistics would need a
    separate attack per label). Samples without a known label get nan."""
    p = np.clip(df[[f"p_{x}" for x in labels]].to_numpy(dtype=float), 1e-7, 1 - 1e-7)
    y = df[[f"y_{x}" for x in labels]].to_numpy(dtype=float)
    p_true = np.where(y == 1, p, 1 - p)
    known = ~np.isnan(y)
    stat = np.where(known, np.log(p_true) - np.log1p(-p_true), 0.0).sum(axis=1)
    return np.where(known.any(axis=1), stat, np.nan)


def _gauss_logpdf(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def pooled_sd(sum_squares, counts) -> float:
    """Pooled standard deviation ``sqrt(sum_i SS_i / sum_i (k_i - 1))`` over the samples with ``k_i >= 2``.

    ``SS_i`` is the sum of squared deviations of sample i's shadow statistics about their own mean, ``k_i`` their
    number: the pooled within-sample variance (each sample's variance weighted by its degrees of freedom), the
    unbiased estimate of a common variance. The mean of per-sample sds, used before, is biased low (Jensen:
    ``E[s] < sigma``, markedly with 2-4 shadows) and gives samples with few shadows full weight. ``nan`` when no
    sample has two statistics.
    """
    ss = np.asarray(sum_squares, dtype=float)
    k = np.asarray(counts)
    ok = k >= 2
    return float(np.sqrt(ss[ok].sum() / (k[ok] - 1).sum())) if ok.any() else float("nan")


def lira_scores(target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray, *, online: bool = True,
                fixed_variance: bool = False, min_models: int = 2) -> np.ndarray:
    """Likelihood-ratio attack scores (Carlini et al. 2022, "Membership Inference Attacks From First
    Principles"); higher = more likely a member.

    ``target`` (n,) is the target model's statistic per sample (:func:`logit_confidence`), ``shadow`` (K, n) the
    shadow models' statistics and ``shadow_in`` (K, n) whether each shadow trained on each sample. Per sample,
    Gaussians are fitted to the shadow statistics with the sample in (mu_in, sd_in) and out (mu_out, sd_out):

    * online: score = log N(t; mu_in, sd_in^2) - log N(t; mu_out, sd_out^2);
    * offline (out shadows only): score = log Phi((t - mu_out) / sd_out), the one-sided test that t is larger
      than the sample's out-distribution.

    With ``fixed_variance`` one global sd replaces the per-sample ones, which the paper recommends with few
    shadows: the pooled within-sample sd of :func:`pooled_sd` (variances pooled, not sds averaged). A sample
    with fewer than ``min_models`` in (online) or out shadows gets nan.
    """
    from scipy.stats import norm

    shadow = np.asarray(shadow, dtype=float)
    inn = np.asarray(shadow_in, dtype=bool)
    out = ~inn

    def moments(mask):
        k = mask.sum(axis=0)
        mu = np.where(k > 0, np.where(mask, shadow, 0.0).sum(axis=0) / np.maximum(k, 1), np.nan)
        ss = np.where(mask, (shadow - mu) ** 2, 0.0).sum(axis=0)  # sum of squares about each sample's mean
        sd = np.sqrt(ss / np.maximum(k - 1, 1))
        if fixed_variance:
            sd = np.full_like(sd, pooled_sd(ss, k))
        return mu, sd, k

    mu_out, sd_out, k_out = moments(out)
    sd_out = np.maximum(sd_out, 1e-6)
    if not online:
        score = norm.logcdf((target - mu_out) / sd_out)
        return np.where(k_out >= min_models, score, np.nan)
    mu_in, sd_in, k_in = moments(inn)
    sd_in = np.maximum(sd_in, 1e-6)
    score = _gauss_logpdf(target, mu_in, sd_in) - _gauss_logpdf(target, mu_out, sd_out)
    return np.where((k_in >= min_models) & (k_out >= min_models), score, np.nan)


def rmia_scores(target_prob: np.ndarray, ref_prob: np.ndarray, target_pop: np.ndarray, ref_pop: np.ndarray, *,
                gamma: float = 1.0, a: float = 0.3) -> np.ndarray:
    """Robust membership inference scores (Zarifzadeh et al. 2024, "Low-Cost High-Power Membership Inference
    Attacks"); higher = more likely a member.

    ``target_prob`` (n,) is Pr(x | theta) for each candidate x (the target model's probability of x's true
    labels), ``ref_prob`` (K, n) the same under K reference models that did **not** train on x (offline
    setting), and ``target_pop`` (P,), ``ref_pop`` (K, P) the same for a population set of non-members z.
    Pr(x) is the offline approximation Pr(x) = ((1 + a) mean_k Pr(x | theta_k) + (1 - a)) / 2, which corrects
    out-only references for the missing in-models. With ratio(x) = Pr(x | theta) / Pr(x),

        score(x) = fraction of population z with ratio(x) / ratio(z) > gamma.
    """
    def ratio(p, refs):
        return np.asarray(p, dtype=float) / (0.5 * ((1 + a) * np.mean(refs, axis=0) + (1 - a)))

    rx = ratio(target_prob, ref_prob)
    rz = np.sort(ratio(target_pop, ref_pop))
    # count of z with rz < rx / gamma, for every x at once
    return np.searchsorted(rz, rx / gamma, side="left") / len(rz)


def true_label_probability(df: pd.DataFrame, labels) -> np.ndarray:
    """Pr(x | theta) for RMIA: the product over known labels of the probability given to the true value."""
    p = np.clip(df[[f"p_{x}" for x in labels]].to_numpy(dtype=float), 1e-7, 1 - 1e-7)
    y = df[[f"y_{x}" for x in labels]].to_numpy(dtype=float)
    logp = np.where(np.isnan(y), 0.0, np.where(y == 1, np.log(p), np.log1p(-p)))
    return np.exp(logp.sum(axis=1))


# ---- the unit attacked: patients or images -------------------------------------------------------------------
def several_images(df: pd.DataFrame) -> bool:
    """Whether the table has patient ids and some patient has more than one row."""
    return "patient_id" in df.columns and bool(df["patient_id"].astype(str).duplicated().any())


def mixed_patients(df: pd.DataFrame) -> int:
    """How many patients have both member and non-member rows (0 without patient ids or membership)."""
    if "patient_id" not in df.columns or "member" not in df.columns:
        return 0
    per = df.groupby(df["patient_id"].astype(str))["member"].nunique()
    return int((per > 1).sum())


def attack_unit(recorded: str | None, df: pd.DataFrame, *, study_unit: str | None = None) -> tuple[str, str]:
    """The unit a model's attacks score, and where it comes from: ``(unit, source)``.

    * ``recorded`` (train.json's ``privacy_unit``, "patient" or "image"): that unit; source ``"run"``.
    * otherwise (a run trained without DP, or predictions from elsewhere) ``study_unit`` when given (the unit the
      study's DP runs share, so that a non-private reference is attacked like them and the attacks stay paired);
      source ``"study"``.
    * otherwise the patient when the table has patient ids, some patient has several rows and no patient has both
      member and non-member rows (a patient-level split); else the image. Source ``"default"``.
    """
    if recorded in UNITS:
        return recorded, "run"
    if study_unit in UNITS:
        return study_unit, "study"
    if several_images(df) and not mixed_patients(df):
        return "patient", "default"
    return "image", "default"


def unit_codes(ids) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, the distinct ids in order of first appearance)."""
    codes, uniq = pd.factorize(pd.Series(np.asarray(ids)).astype(str))
    return codes.astype(np.int64), np.asarray(uniq, dtype=object)


def unit_mean(values, codes: np.ndarray, n_units: int) -> np.ndarray:
    """Per unit, the mean of its rows' finite values (nan for a unit with none). ``values`` is (n_rows,) or
    (K, n_rows) (one row per model); rows with code -1 belong to no unit."""
    v = np.asarray(values, dtype=float)
    flat = v.ndim == 1
    v = np.atleast_2d(v)
    codes = np.asarray(codes)
    keep = codes >= 0
    v, codes = v[:, keep], codes[keep]
    ok = np.isfinite(v)
    out = np.empty((len(v), n_units))
    for i in range(len(v)):  # one bincount per model: K is small
        tot = np.bincount(codes, weights=np.where(ok[i], v[i], 0.0), minlength=n_units)
        cnt = np.bincount(codes, weights=ok[i].astype(float), minlength=n_units)
        out[i] = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    return out[0] if flat else out


def unit_values(values, codes: np.ndarray, n_units: int) -> tuple[np.ndarray, int]:
    """Per unit, its most frequent known value over its rows (ties: the first seen; None when it has none), and
    how many units have more than one distinct known value. ``values``: object array, None = unknown."""
    out = np.full(n_units, None, dtype=object)
    seen: list[dict] = [{} for _ in range(n_units)]
    for code, v in zip(np.asarray(codes), values):
        if code >= 0 and v is not None:
            seen[code][v] = seen[code].get(v, 0) + 1
    varying = 0
    for j, counts in enumerate(seen):
        if counts:
            out[j] = max(counts, key=counts.get)  # max keeps the first of equal counts: the first seen
            varying += len(counts) > 1
    return out, varying
