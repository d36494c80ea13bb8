"""Empirical epsilon bounds against direct scipy computations, brute-force searches and simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from privaudit.audit.empirical import (clopper_pearson, flag_accountants, one_run_audit, one_run_lower_bound,
                                       one_run_p_value, repeated_trials_lower_bound, soundness)

CASES = [(100, 80, 0.0, None), (500, 300, 0.0, None), (50, 50, 0.0, None), (200, 150, 1e-4, 500),
         (60, 50, 1e-3, 100)]


def reference_p_values(r, v, eps, delta, m):
    """Theorem 3.1 of Steinke et al. (2023) written from cdf differences: f(v) + 2 m delta max_i (f(v-i) - f(v))/i."""
    q = np.exp(eps) / (1 + np.exp(eps))
    f_v = binom.sf(v - 1, r, q)
    alpha = np.zeros_like(q)
    for i in range(1, v + 1):
        alpha = np.maximum(alpha, (binom.cdf(v - 1, r, q) - binom.cdf(v - i - 1, r, q)) / i)
    return np.minimum(f_v + 2 * (m or 0) * delta * alpha, 1.0)


def test_p_value_without_delta_is_the_binomial_tail():
    for r, v, eps in [(10, 7, 0.3), (100, 80, 1.0), (1000, 520, 0.05), (40, 0, 2.0), (25, 25, 4.0)]:
        q = math.exp(eps) / (1 + math.exp(eps))
        assert one_run_p_value(r, v, eps) == pytest.approx(binom.sf(v - 1, r, q), rel=1e-12, abs=1e-300)


def test_p_value_delta_term_matches_the_theorem():
    # one canary, one guess: q + 2 delta (1 - q), by hand
    q = math.exp(0.7) / (1 + math.exp(0.7))
    assert one_run_p_value(1, 1, 0.7, 0.01, 1) == pytest.approx(q + 2 * 0.01 * (1 - q), rel=1e-12)
    eps = np.linspace(0, 6, 13)
    for r, v, delta, m in CASES:
        ours = [one_run_p_value(r, v, e, delta, m) for e in eps]
        np.testing.assert_allclose(ours, reference_p_values(r, v, eps, delta, m), rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match="needs m"):
        one_run_p_value(10, 5, 1.0, 1e-5)


def test_p_value_increases_with_epsilon():
    # a larger epsilon allows more correct guesses, so the chance of v or more grows
    eps = np.linspace(0, 8, 161)
    for r, v, delta, m in CASES:
        p = np.array([one_run_p_value(r, v, e, delta, m) for e in eps])
        assert np.all(np.diff(p) >= -1e-12)
        assert p[-1] > p[0]


def test_lower_bound_inverts_the_p_value():
    for r, v, delta, m in CASES:
        for confidence in (0.95, 0.99):
            eps = one_run_lower_bound(r, v, delta=delta, m=m, confidence=confidence)
            assert eps > 0
            assert one_run_p_value(r, v, eps, delta, m) == pytest.approx(1 - confidence, abs=1e-6)
    assert one_run_lower_bound(100, 50) == 0.0  # chance-level guessing
    assert one_run_lower_bound(100, 80, delta=0.01, m=1000) == 0.0  # 2 m delta = 20 swamps the evidence


def test_lower_bound_equals_a_brute_force_grid_search():
    grid = np.arange(0, 10, 1e-3)
    for r, v, delta, m in CASES:
        below = grid[reference_p_values(r, v, grid, delta, m) < 0.05]
        brute = below.max() if below.size else 0.0
        eps = one_run_lower_bound(r, v, delta=delta, m=m, confidence=0.95)
        assert brute <= eps < brute + 1e-3


def test_split_half_bound_is_calibrated_when_scores_carry_no_signal():
    zero = []
    for rep in range(200):
        rng = np.random.default_rng(rep)
        included = rng.random(1000) < 0.5
        res = one_run_audit(rng.normal(size=1000), included, seed=rep)
        zero.append(res["estimate"] == 0.0)
    # a valid 95% bound is positive in at most 5% of the repetitions (in expectation)
    assert np.mean(zero) >= 0.95


def test_perfect_attack_gives_a_large_bound_and_breaks_a_small_epsilon():
    rng = np.random.default_rng(7)
    included = rng.random(1000) < 0.5
    scores = included + 0.01 * rng.normal(size=1000)
    for delta in (0.0, 1e-5):
        res = one_run_audit(scores, included, delta=delta, seed=3)
        assert res["estimate"] > 2
        assert res["m"] == 500 and res["r"] == res["k_plus"] + res["k_minus"] and res["v"] <= res["r"]
        assert res["estimate"] == one_run_lower_bound(res["r"], res["v"], delta=delta, m=res["m"],
                                                      confidence=res["confidence"])
        low = soundness(0.5, res["r"], res["v"], delta, res["m"])
        assert low["violated"] and low["p_value"] < 1e-3
        assert not soundness(10.0, res["r"], res["v"], delta, res["m"])["violated"]


def test_clopper_pearson_matches_scipy_binomtest():
    for k, n in [(0, 20), (3, 20), (17, 40), (40, 40), (123, 1000)]:
        for confidence in (0.9, 0.95, 0.99):
            ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
            assert clopper_pearson(k, n, confidence) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-12)


def test_repeated_trials_bound():
    assert repeated_trials_lower_bound(50, 50, 50, 50, delta=1e-5)["estimate"] == 0.0
    weak = repeated_trials_lower_bound(80, 20, 20, 80, delta=1e-5)
    strong = repeated_trials_lower_bound(99, 1, 1, 99, delta=1e-5)
    assert 0 < weak["estimate"] < strong["estimate"]
    lo, hi = strong["tpr_low"], strong["fpr_high"]
    assert (lo, hi) == (clopper_pearson(99, 100, 0.95)[0], clopper_pearson(1, 100, 0.95)[1])
    assert strong["estimate"] == pytest.approx(max(math.log((lo - 1e-5) / hi), math.log((1 - hi - 1e-5) / (1 - lo))))
    # one-sided: an attack that ranks members as non-members gets no credit
    assert repeated_trials_lower_bound(1, 99, 99, 1, delta=1e-5)["estimate"] == 0.0


def test_flag_accountants():
    checks = {"rdp": 1.2, "prv": 1.0, "gdp": 0.9, "dp_accounting_rdp": None, "dp_accounting_pld": 1.01}
    flags = flag_accountants(checks, used="gdp")
    assert len(flags) == 1 and "gdp" in flags[0] and "reported epsilon" in flags[0]
    assert flag_accountants(checks, used="rdp", tolerance={"gdp": 0.2}) == []
    assert flag_accountants({**checks, "gdp": 0.995}, used="rdp") == []  # within GDP's 2%
    low_rdp = flag_accountants({**checks, "gdp": None, "dp_accounting_rdp": 0.98}, used="rdp")
    assert len(low_rdp) == 1 and "dp_accounting_rdp" in low_rdp[0] and "reported" not in low_rdp[0]
    split = flag_accountants({"prv": 1.0, "dp_accounting_pld": 1.1, "rdp": 1.2}, used="rdp")
    assert len(split) == 1 and "disagree" in split[0]
    assert "no tight accountant" in flag_accountants({"rdp": 1.2, "prv": None}, used="rdp")[0]


def test_repeated_trials_threshold_is_chosen_on_held_out_non_members():
    """The counted false-positive rate is unbiased for the threshold's true FPR when the threshold comes from other
    non-members; chosen on the counted non-members it is capped at the target and biased low (which inflates
    epsilon). Null attack, standard normal scores (true FPR of threshold t: 1 - Phi(t)), 2,000 repetitions."""
    from scipy.stats import norm

    from privaudit.audit.privacy import repeated_trials_bound, threshold_at_fpr

    rng = np.random.default_rng(3)
    held, same = [], []
    for r in range(2000):
        members, non = rng.standard_normal(400), rng.standard_normal(400)
        res = repeated_trials_bound(members, non, delta=1e-5, fpr=0.02, seed=r)
        order = np.random.default_rng(r).permutation(400)
        counted = non[order[200:]]
        fp = int((counted >= res["threshold"]).sum())
        assert res["threshold"] == threshold_at_fpr(non[order[:200]], 0.02)
        assert res["fpr_high"] == clopper_pearson(fp, 200, 0.95)[1]
        held.append(fp / 200 - norm.sf(res["threshold"]))
        t_same = threshold_at_fpr(non, 0.02)
        same.append(np.mean(non >= t_same) - norm.sf(t_same))
    held, same = np.array(held), np.array(same)
    assert abs(held.mean()) < 3 * held.std() / np.sqrt(len(held))
    assert same.mean() < -5 * same.std() / np.sqrt(len(same))
    assert repeated_trials_bound(np.zeros(10), np.zeros(150), delta=0.0) is None  # 75 < 1/0.01 to choose on

