"""Who is exposed: membership-inference risk by group, its intervals, and the privacy-gap verdict.

Planted prediction files: one group's members have lower losses than its non-members (a real membership
signal, flagged), or one group's scores are all shifted, members and non-members alike (no membership
signal: its FPR at the global threshold rises with its TPR, and nothing is flagged). The intervals are checked
by simulation against the truth.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, norm

from privaudit.audit import run_audit
from privaudit.audit.exposure import (auc_gaps, clopper_pearson, group_risk, own_threshold, privacy_gap_change,
                                      privacy_gap_verdict)
from privaudit.audit.privacy import attack_metrics, threshold_at_fpr
from privaudit.audit.utility import Resampler, percentile_ci
from privaudit.config import AuditConfig


def planted(n: int = 1000, *, seed: int, member_gap: dict, shift: dict, extra: dict | None = None) -> pd.DataFrame:
    """A prediction table (one label, probabilities unrelated to membership) whose per-sample loss is
    ``N(1, 0.5)``, lowered by ``member_gap[sex]`` for members of that sex and by ``shift[sex]`` for everyone of
    that sex. The same seed gives the same samples, splits and sexes; ``extra`` seeds only the noise."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)],
                       "split": rng.choice(["train", "val", "test"], n, p=[0.5, 0.2, 0.3])})
    df["patient_id"] = df["sample_id"]
    df["member"] = (df["split"] == "train").astype(int)
    df["sex"] = rng.choice(["F", "M"], n)
    df["y_a"] = rng.integers(0, 2, n).astype(float)
    df["p_a"] = 1 / (1 + np.exp(-(1.5 * (df["y_a"] - 0.5) + rng.normal(0, 1, n))))
    noise = np.random.default_rng(extra["seed"]).normal(0, 0.5, n) if extra else rng.normal(0, 0.5, n)
    loss = 1.0 + noise
    for sex, d in member_gap.items():
        loss -= d * ((df["sex"] == sex) & (df["member"] == 1)).to_numpy()
    for sex, d in shift.items():
        loss -= d * (df["sex"] == sex).to_numpy()
    df["loss"] = loss
    return df


CONFIG = AuditConfig(n_boot=200, attributes=("sex",))


# ---- intervals ----------------------------------------------------------------------------------------------
def test_clopper_pearson_is_scipys_exact_interval():
    for k, n in ((0, 10), (1, 10), (5, 10), (10, 10), (3, 500), (250, 500), (499, 500)):
        lo, hi = clopper_pearson(k, n)
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert lo == pytest.approx(ref.low, abs=1e-10) and hi == pytest.approx(ref.high, abs=1e-10)
    lo, hi = clopper_pearson([0, 2], [0, 4], confidence=0.9)
    assert np.isnan(lo[0]) and np.isnan(hi[0]) and 0 < lo[1] < 0.5 < hi[1] < 1
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)


def test_clopper_pearson_covers_at_least_its_rate_in_simulation():
    """20,000 binomial draws per (p, n): coverage >= 95% (less 3 Monte Carlo SEs), and equal to the exact
    coverage sum_k P(k) [p in CI(k)]."""
    from scipy.stats import binom

    rng = np.random.default_rng(0)
    reps = 20_000
    for n in (30, 200):
        lo_all, hi_all = clopper_pearson(np.arange(n + 1), n)  # the interval of every possible k
        for p in (0.01, 0.05, 0.3, 0.5):
            k = rng.binomial(n, p, reps)
            covered = (lo_all[k] <= p) & (p <= hi_all[k])
            exact = binom.pmf(np.arange(n + 1), n, p)[(lo_all <= p) & (p <= hi_all)].sum()
            se = np.sqrt(exact * (1 - exact) / reps)
            assert covered.mean() >= 0.95 - 3 * se, (n, p, covered.mean())
            assert abs(covered.mean() - exact) < 4 * se + 1e-9 and exact >= 0.95


def test_tpr_at_the_global_threshold_covers_the_true_tpr():
    """The threshold is set on non-members; members are scored against it, so given the threshold their count
    above it is binomial with the true TPR sf(t - mu). 2,000 attacks at once: the interval covers it >= 95%."""
    rng = np.random.default_rng(1)
    reps, n_m, n_nm, mu = 2000, 150, 400, 1.0
    nm = np.sort(rng.normal(0, 1, (reps, n_nm)), axis=1)[:, ::-1]
    t = np.nextafter(nm[:, int(0.01 * n_nm)], np.inf)  # threshold_at_fpr, row by row
    members = rng.normal(mu, 1, (reps, n_m))
    k = (members >= t[:, None]).sum(axis=1)
    lo, hi = clopper_pearson(k, n_m)
    truth = norm.sf(t - mu)
    coverage = np.mean((lo <= truth) & (truth <= hi))
    assert 0.945 <= coverage <= 0.995, coverage
    # the same threshold and interval as group_risk's, on one of the attacks
    assert t[0] == threshold_at_fpr(nm[0], 0.01)
    risk = group_risk(members[0], nm[0], global_threshold=float(t[0]))
    assert risk["tpr_at_global_threshold"]["ci_low"] == pytest.approx(lo[0])
    assert risk["tpr_at_global_threshold"]["estimate"] == pytest.approx(k[0] / n_m)


def test_bootstrap_auc_interval_covers_roughly_its_rate_with_patients_resampled():
    """300 attacks on patients with two correlated images each: the patient bootstrap interval of the attack AUC
    covers the true AUC at about 95%; resampling images instead covers visibly less."""
    from privaudit.audit import stats

    rng = np.random.default_rng(2)
    reps, n_pat, mu, sd_p, sd_e = 300, 150, 0.6, 0.8, 0.6
    truth = norm.cdf(mu / np.sqrt(2 * (sd_p**2 + sd_e**2)))
    y = np.repeat(np.r_[np.ones(n_pat // 2), np.zeros(n_pat // 2)], 2)
    patients = np.repeat(np.arange(n_pat), 2)
    clustered = Resampler(len(y), n_boot=200, seed=0, clusters=patients).sample_major()
    images = Resampler(len(y), n_boot=200, seed=0).sample_major()
    hits = {"patients": 0, "images": 0}
    for _ in range(reps):
        s = mu * y + np.repeat(rng.normal(0, sd_p, n_pat), 2) + rng.normal(0, sd_e, len(y))
        for kind, w in (("patients", clustered), ("images", images)):
            lo, hi, _ = percentile_ci(stats.weighted_auroc_fast(y, s, w), 0.95)
            hits[kind] += lo <= truth <= hi
    assert 0.91 <= hits["patients"] / reps <= 0.99, hits
    assert hits["images"] / reps < hits["patients"] / reps - 0.05, hits


def test_rates_at_fpr_match_the_roc_and_own_threshold_matches_the_global_rule():
    rng = np.random.default_rng(3)
    m, nm = rng.normal(0.5, 1, 800), rng.normal(0, 1, 1200)
    res, _ = attack_metrics(m, nm)
    for target in ("0.001", "0.01", "0.1"):
        r = res["rates_at_fpr"][target]
        assert r["tpr"]["estimate"] == pytest.approx(res["tpr_at_fpr"][target])
        assert r["fpr"]["estimate"] <= float(target) + 1e-12 and r["fpr"]["n"] == 1200 and r["tpr"]["n"] == 800
        assert r["tpr"]["ci_low"] <= r["tpr"]["estimate"] <= r["tpr"]["ci_high"]
    assert own_threshold(nm, 0.01) == threshold_at_fpr(nm, 0.01)
    assert own_threshold(nm[:99], 0.01) is None  # 1% of 99 non-members cannot be resolved
    small, _ = attack_metrics(m[:50], nm[:500])
    assert small["rates_at_fpr"]["0.001"] is None and small["tpr_at_fpr"]["0.001"] is None


def test_auc_gap_is_the_group_minus_the_weighted_others():
    b = np.array([[0.6, 0.7], [0.5, 0.5], [0.8, 0.4]])
    gaps = auc_gaps({"a": (0.6, b[0], 10), "b": (0.5, b[1], 30), "c": (np.nan, b[2], 5)})
    assert set(gaps) == {"a", "b"}  # c has no AUC: no gap, and not in the others' reference
    assert gaps["a"][0] == pytest.approx(0.1) and np.allclose(gaps["a"][1], [0.1, 0.2])
    assert gaps["b"][0] == pytest.approx(-0.1)


# ---- planted files through the audit ------------------------------------------------------------------------
def test_a_group_with_a_real_membership_signal_is_flagged_and_dp_narrows_its_gap(tmp_path):
    exposed = planted(seed=10, member_gap={"F": 0.5}, shift={})
    private = planted(seed=10, member_gap={}, shift={}, extra={"seed": 11})
    rep = run_audit({"private": private, "non_private": exposed}, config=CONFIG)
    rep.to_json(tmp_path / "audit.json")  # validates against the schema
    loss = rep.models["non_private"]["privacy"]["attacks"]["loss"]
    f, m = loss["by_group"]["sex"]["F"], loss["by_group"]["sex"]["M"]
    assert f["auc_ci"]["ci_low"] > m["auc_ci"]["ci_high"]  # F is more exposed, beyond the intervals
    assert f["tpr_at_own_fpr"]["0.01"]["estimate"] > m["tpr_at_own_fpr"]["0.01"]["ci_high"]
    assert loss["auc_gap"]["sex"]["F"]["ci_low"] > 0 and loss["auc_gap"]["sex"]["F"]["p_value"] < 1e-6
    exposure = rep.models["non_private"]["privacy"]["exposure"]["sex"]
    assert exposure["answer"] == "yes" and "sex=F" in exposure["reason"] and "more exposed" in exposure["reason"]
    assert rep.models["private"]["privacy"]["exposure"]["sex"]["answer"] != "yes"
    comp = rep.data["comparisons"]["private vs non_private"]
    verdict = comp["privacy_gap_verdict"]["sex"]
    assert verdict["answer"] == "yes" and verdict["direction"] == "narrowed", verdict
    change = comp["privacy_gap"]["sex"]["loss"]["F"]
    assert change["direction"] == "narrowed" and change["estimate"] < 0 and change["ci_high"] < 0
    assert abs(change["gap_reference"]) > abs(change["gap_private"]) + 0.1
    # the fairness verdict sits beside it, untouched
    assert "fairness_verdict" in comp and set(comp["privacy_gap_verdict"]) == {"sex"}


def test_a_group_whose_non_members_also_score_high_is_not_flagged():
    """Everyone in F has lower losses (members and non-members alike): at the global threshold F's members
    are caught far more often than M's, but so are F's non-members, and at F's own 1% FPR or by AUC there is
    no difference. Neither the exposure nor the privacy-gap verdict says yes."""
    shifted = planted(seed=20, member_gap={"F": 0.25, "M": 0.25}, shift={"F": 1.0})
    private = planted(seed=20, member_gap={"F": 0.25, "M": 0.25}, shift={}, extra={"seed": 21})
    rep = run_audit({"private": private, "non_private": shifted}, config=CONFIG)
    loss = rep.models["non_private"]["privacy"]["attacks"]["loss"]
    f, m = loss["by_group"]["sex"]["F"], loss["by_group"]["sex"]["M"]
    # the old reading (TPR at the global threshold) makes F look exposed ...
    assert f["tpr_at_global_threshold"]["ci_low"] > m["tpr_at_global_threshold"]["ci_high"]
    assert f["tpr_at_fpr"]["0.01"] == f["tpr_at_global_threshold"]["estimate"]
    # ... because F's non-members cross that threshold too: F's FPR there is above the attacker's 1%, M's below
    assert f["fpr_at_global_threshold"]["estimate"] > 0.01 >= m["fpr_at_global_threshold"]["estimate"]
    # at each group's own 1% FPR, and by AUC, the two groups are alike
    own_f, own_m = f["tpr_at_own_fpr"]["0.01"], m["tpr_at_own_fpr"]["0.01"]
    assert own_f["ci_low"] <= own_m["ci_high"] and own_m["ci_low"] <= own_f["ci_high"]
    assert own_f["fpr"] <= 0.01 and own_m["fpr"] <= 0.01
    assert f["auc_ci"]["ci_low"] <= m["auc"] <= f["auc_ci"]["ci_high"]
    assert rep.models["non_private"]["privacy"]["exposure"]["sex"]["answer"] != "yes"
    verdict = rep.data["comparisons"]["private vs non_private"]["privacy_gap_verdict"]["sex"]
    assert verdict["answer"] != "yes", verdict


def test_the_privacy_gap_is_paired_across_models_by_sample_id():
    """Two copies of one model, the second with its rows shuffled: the attacks run on the same samples with the
    same resamples, so every gap change is exactly 0 and the verdict is "no"."""
    df = planted(seed=30, member_gap={"F": 0.3}, shift={})
    shuffled = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    rep = run_audit({"private": shuffled, "non_private": df}, config=CONFIG)
    comp = rep.data["comparisons"]["private vs non_private"]
    for attack, groups in comp["privacy_gap"]["sex"].items():
        for g, change in groups.items():
            assert change["estimate"] == 0 and change["equivalence_bound"] == 0, (attack, g)
    assert comp["privacy_gap_verdict"]["sex"]["answer"] == "no"
    a, b = (rep.models[n]["privacy"]["attacks"]["loss"] for n in ("private", "non_private"))
    assert a["auc_ci"] == b["auc_ci"] and a["by_group"] == b["by_group"]


def test_models_attacked_on_other_samples_are_not_compared():
    df = planted(seed=40, member_gap={}, shift={})
    other = df.copy()
    other["sample_id"] = other["sample_id"].where(other["member"] == 0, other["sample_id"] + "x")
    other = pd.concat([other[other["member"] == 1], df[df["member"] == 0]]).drop_duplicates("sample_id")
    rep = run_audit({"private": other, "non_private": df}, config=CONFIG)
    comp = rep.data["comparisons"]["private vs non_private"]
    assert comp["privacy_gap"] == {} and comp["privacy_gap_verdict"] == {}
    assert any("privacy-gap comparison is skipped" in w for w in rep.warnings)
    assert rep.models["private"]["privacy"]["attacks"]["loss"]["auc_ci"]["estimate"] is not None


def test_small_groups_are_suppressed_and_left_out_of_the_others_reference():
    df = planted(seed=50, member_gap={"F": 0.4}, shift={})
    rng = np.random.default_rng(0)
    df["site"] = rng.choice(["A", "B"], len(df))
    df.loc[df.index[:12], "site"] = "C"  # 12 patients, split over members and non-members: under 10 each
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=100, attributes=("sex", "site")))
    loss = rep.models["m"]["privacy"]["attacks"]["loss"]
    assert loss["by_group"]["site"]["C"] == {"n": None, "suppressed": True}
    assert loss["auc_gap"]["site"]["C"] == {"n": None, "suppressed": True}
    a, b = loss["by_group"]["site"]["A"], loss["by_group"]["site"]["B"]
    assert loss["auc_gap"]["site"]["A"]["estimate"] == pytest.approx(a["auc"] - b["auc"])
    assert "C" not in rep.models["m"]["privacy"]["exposure"]["site"]["reason"]


# ---- the verdict's rule -------------------------------------------------------------------------------------
def test_privacy_gap_verdict_answers_and_its_multiplicity():
    rng = np.random.default_rng(4)
    base = rng.normal(0, 0.01, 500)

    def change(g1, g0, noise=0.01):
        return privacy_gap_change(g1, g0, g1 + base, g0 + rng.normal(0, noise, 500) + base)

    wide = change(0.15, 0.0)
    assert wide["direction"] == "widened" and wide["p_value"] < 1e-6
    narrow = change(0.0, 0.15)
    assert narrow["direction"] == "narrowed" and narrow["p_value"] < 1e-6 and narrow["estimate"] < 0
    same = change(0.0, 0.0, noise=0.001)
    v = privacy_gap_verdict([same], names=["x"], margin=0.02)
    assert v["answer"] == "no"
    v = privacy_gap_verdict([wide, narrow], names=["w", "n"])
    assert v["answer"] == "yes" and v["direction"] == "both"
    v = privacy_gap_verdict([change(0.03, 0.0, noise=0.05)], names=["x"])
    assert v["answer"] == "inconclusive" and v["minimum_detectable_change"]["smallest"] > 0.03
    # Holm: the same change, alone or among 200 null tests
    mid = change(0.05, 0.0, noise=0.01)
    alone = privacy_gap_verdict([mid], names=["x"])
    crowd = privacy_gap_verdict([mid], names=["x"], adjusted_p=[min(1.0, mid["p_value"] * 200)], family_size=200,
                                n_boot=1000)
    assert crowd["p_value_adjusted"][0] >= alone["p_value_adjusted"][0]
    assert crowd["minimum_detectable_change"]["smallest"] > alone["minimum_detectable_change"]["smallest"]
    assert crowd["resolution_limited"] and any("resamples" in w for w in crowd["warnings"])
