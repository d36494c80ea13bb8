"""Membership-inference attack metrics, checked against scikit-learn and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from privaudit.audit.privacy import attack_metrics, roc_curve_points, threshold_at_fpr, tpr_at_fpr


def test_random_scores_give_auc_near_half_and_perfect_scores_give_one():
    rng = np.random.default_rng(0)
    res, _ = attack_metrics(rng.random(5000), rng.random(5000))
    assert abs(res["auc"] - 0.5) < 0.02  # sd of the AUC is about 0.006 here
    assert res["advantage"] < 0.05
    res, _ = attack_metrics(np.arange(100) + 1000.0, np.arange(100.0))
    assert res["auc"] == 1.0 and res["advantage"] == 1.0
    assert res["tpr_at_fpr"]["0.01"] == 1.0


def test_roc_matches_sklearn():
    rng = np.random.default_rng(1)
    m, n = np.round(rng.normal(0.5, 1, 300), 1), np.round(rng.normal(0, 1, 400), 1)
    fpr, tpr, thr = roc_curve_points(m, n)
    y = np.r_[np.ones(300), np.zeros(400)]
    f2, t2, _ = roc_curve(y, np.r_[m, n], drop_intermediate=False)
    assert np.allclose(fpr, f2) and np.allclose(tpr, t2)
    res, _ = attack_metrics(m, n)
    assert res["auc"] == pytest.approx(roc_auc_score(y, np.r_[m, n]))
    assert res["advantage"] == pytest.approx(np.max(t2 - f2))


def test_tpr_at_low_fpr_is_null_when_not_measurable():
    rng = np.random.default_rng(2)
    res, warns = attack_metrics(rng.random(500), rng.random(500))
    assert res["tpr_at_fpr"]["0.001"] is None and res["tpr_at_fpr"]["0.01"] is not None
    assert any("0.001" in w and "500 non-members" in w for w in warns)
    assert tpr_at_fpr(np.array([0, 1.0]), np.array([0, 1.0]), 0.01, 99) is None


def test_threshold_at_fpr_keeps_the_false_positive_rate():
    rng = np.random.default_rng(3)
    nm = rng.normal(size=1000)
    for target in (0.001, 0.01, 0.1):
        t = threshold_at_fpr(nm, target)
        assert np.mean(nm >= t) <= target
        assert np.mean(nm >= np.nextafter(t, -np.inf) - 1e-9) > target - 1e-3  # and is the lowest such threshold


def test_per_group_risk_finds_the_exposed_group():
    rng = np.random.default_rng(4)
    n = 2000
    sex = rng.choice(["F", "M"], 2 * n).astype(object)
    m = rng.normal(0, 1, n) + np.where(sex[:n] == "F", 2.0, 0.0)  # only women's membership leaks
    res, _ = attack_metrics(m, rng.normal(0, 1, n), groups={"sex": sex})
    g = res["by_group"]["sex"]
    assert g["F"]["auc"] > 0.8 and abs(g["M"]["auc"] - 0.5) < 0.05
    assert g["F"]["tpr_at_fpr"]["0.01"] > g["M"]["tpr_at_fpr"]["0.01"]
    assert g["F"]["n"] + g["M"]["n"] == 2 * n


def _slow_lira(t, shadow, inn, online):
    """The LiRA formula, one sample at a time with scipy's distributions."""
    from scipy.stats import norm

    out = np.empty(len(t))
    for i in range(len(t)):
        s_in, s_out = shadow[inn[:, i], i], shadow[~inn[:, i], i]
        mu_o, sd_o = s_out.mean(), max(s_out.std(ddof=1), 1e-6)
        if online:
            mu_i, sd_i = s_in.mean(), max(s_in.std(ddof=1), 1e-6)
            out[i] = norm.logpdf(t[i], mu_i, sd_i) - norm.logpdf(t[i], mu_o, sd_o)
        else:
            out[i] = norm.logcdf((t[i] - mu_o) / sd_o)
    return out


@pytest.mark.parametrize("online", [True, False])
def test_lira_equals_the_per_example_formula_on_gaussian_statistics(online):
    from privaudit.audit.privacy import lira_scores

    rng = np.random.default_rng(5)
    n, k = 60, 16
    inn = rng.random((k, n)) < 0.5
    inn[:4] = [True], [False], [True], [False]  # every sample has at least 2 in and 2 out shadows
    shadow = rng.normal(0, 1, (k, n)) + 1.5 * inn
    target = rng.normal(0, 1, n) + 1.5 * (np.arange(n) % 2)
    fast = lira_scores(target, shadow, inn, online=online)
    assert np.allclose(fast, _slow_lira(target, shadow, inn, online), atol=1e-9)
    members = np.arange(n) % 2 == 1
    assert fast[members].mean() > fast[~members].mean()


def test_lira_fixed_variance_and_too_few_shadows():
    from privaudit.audit.privacy import lira_scores

    rng = np.random.default_rng(6)
    inn = np.zeros((3, 10), bool)
    inn[0] = True
    scores = lira_scores(rng.normal(size=10), rng.normal(size=(3, 10)), inn, online=True)
    assert np.isnan(scores).all()  # one in-shadow per sample is too few for a Gaussian
    shadow = rng.normal(size=(8, 10))
    fixed = lira_scores(np.zeros(10), shadow, np.zeros((8, 10), bool), online=False, fixed_variance=True)
    sd = np.sqrt(shadow.var(axis=0, ddof=1).mean())  # equal shadow counts: the pooled variance is their mean
    from scipy.stats import norm

    assert np.allclose(fixed, norm.logcdf((0 - shadow.mean(axis=0)) / sd))


def test_lira_pools_variances_not_standard_deviations():
    """With unequal numbers of out-shadows the global sd is sqrt(sum SS_i / sum (k_i - 1)); over many draws its
    square is unbiased for the common variance, where the old mean of sds fell clearly short."""
    from privaudit.audit.privacy import lira_scores, pooled_sd

    rng = np.random.default_rng(7)
    k = np.array([2, 3, 5, 8, 2, 4])
    inn = np.ones((8, 6), bool)
    for i, ki in enumerate(k):
        inn[:ki, i] = False  # the first k_i shadows are out
    shadow = rng.normal(size=(8, 6)) * 2.0
    out = np.where(~inn, shadow, np.nan)
    ss = np.nansum((out - np.nanmean(out, axis=0)) ** 2, axis=0)
    expected = np.sqrt(ss.sum() / (k - 1).sum())
    assert pooled_sd(ss, k) == pytest.approx(expected)
    from scipy.stats import norm

    fixed = lira_scores(np.zeros(6), shadow, inn, online=False, fixed_variance=True)
    assert np.allclose(fixed, norm.logcdf(-np.nanmean(out, axis=0) / expected))
    draws = rng.normal(size=(4000, 8, 6)) * 2.0  # sigma^2 = 4
    mask = ~inn[None]
    mu = np.where(mask, draws, 0).sum(1) / k
    ss_all = np.where(mask, (draws - mu[:, None]) ** 2, 0).sum(1)
    pooled = np.array([pooled_sd(r, k) for r in ss_all])
    mean_sd = np.sqrt(ss_all / (k - 1)).mean(axis=1)
    se = (pooled**2).std() / np.sqrt(len(pooled))
    assert abs((pooled**2).mean() - 4.0) < 3 * se
    assert (mean_sd**2).mean() < 4.0 - 10 * se  # the old estimator: biased low


def test_rmia_equals_the_pairwise_definition():
    from privaudit.audit.privacy import rmia_scores

    rng = np.random.default_rng(7)
    n, p, k, a, gamma = 40, 70, 3, 0.3, 1.2
    tx, rx = rng.random(n), rng.random((k, n))
    tz, rz = rng.random(p), rng.random((k, p))
    fast = rmia_scores(tx, rx, tz, rz, gamma=gamma, a=a)
    pr = lambda refs: 0.5 * ((1 + a) * refs.mean(axis=0) + (1 - a))  # noqa: E731
    slow = np.array([np.mean([(tx[i] / pr(rx)[i]) / (tz[j] / pr(rz)[j]) > gamma for j in range(p)])
                     for i in range(n)])
    assert np.allclose(fast, slow)


def test_trained_attack_is_cross_validated_and_finds_the_signal():
    from privaudit.audit.privacy import trained_attack_scores

    rng = np.random.default_rng(8)
    member = np.r_[np.ones(500), np.zeros(500)]
    noise = rng.normal(size=(1000, 3))
    assert abs(roc_auc_score(member, trained_attack_scores(noise, member)) - 0.5) < 0.06  # nothing to find
    signal = noise + member[:, None] * np.array([1.0, 0.0, 0.5])
    assert roc_auc_score(member, trained_attack_scores(signal, member)) > 0.75


def test_accountants_agree_within_documented_tolerances_over_a_grid():
    """RDP is an upper bound above the tight PRV/PLD (typically 10-30%), PRV and PLD agree within 5%, and
    Opacus' and dp_accounting's RDP agree within 2%."""
    from privaudit.audit.accounting import cross_checks

    for sigma in (0.8, 1.5):
        for q in (0.01, 0.05):
            for steps in (100, 1000):
                c, warns = cross_checks(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
                assert not warns, warns
                tight = max(c["prv"], c["dp_accounting_pld"])
                assert c["prv"] == pytest.approx(c["dp_accounting_pld"], rel=0.05)
                assert c["rdp"] >= tight * 0.99 and c["dp_accounting_rdp"] >= tight * 0.99
                assert c["rdp"] == pytest.approx(c["dp_accounting_rdp"], rel=0.02)
