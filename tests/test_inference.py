"""Inference that holds up: intervals over seeds, many tests, and the size of a parity-gap change.

Each claim is checked by a simulation whose answer is known (at least 1,000 repetitions, vectorised) or
against a closed form / scipy. Monte Carlo tolerances are stated next to each assertion.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from privaudit.audit import stats
from privaudit.audit.fairness import gap_change_verdict, holm
from privaudit.audit.utility import paired_p_value

REPS = 1000


# ---- simulated AUROCs with a real patient bootstrap --------------------------------------------------------------
def _auroc_boot(rng, scores: np.ndarray, n_pos: int, n_boot: int, *, groups: int = 1, chunk: int = 100):
    """AUROC of each (rep, group, model) and of each patient-bootstrap resample.

    ``scores`` ``(R, M, n)``: the n patients form ``groups`` consecutive equal blocks, each with its ``n_pos``
    positives first. Each rep draws ``n_boot`` resamples of its n patients with replacement (counts, shared by
    every model and group of the rep). AUROC under weights is ``sum_ij w_i w_j [s_i > s_j] / (sum w_pos sum
    w_neg)`` over positives i and negatives j of a group (continuous scores: no ties). Returns ``(R, G, M)``
    and ``(R, G, M, B)``.
    """
    r_all, m_all, n = scores.shape
    size = n // groups
    est = np.empty((r_all, groups, m_all))
    boots = np.empty((r_all, groups, m_all, n_boot))
    for r0 in range(0, r_all, chunk):
        r = min(chunk, r_all - r0)
        idx = rng.integers(0, n, (r, n_boot, n))
        flat = (idx + n * np.arange(r * n_boot).reshape(r, n_boot, 1)).ravel()
        w = np.bincount(flat, minlength=r * n_boot * n).reshape(r, n_boot, n).astype(np.float32)
        for g in range(groups):
            s = scores[r0:r0 + r, :, g * size:(g + 1) * size]
            wg = w[..., g * size:(g + 1) * size]
            c = (s[..., :n_pos, None] > s[..., None, n_pos:]).astype(np.float32)  # (r, M, P, N)
            est[r0:r0 + r, g] = c.mean(axis=(-1, -2))
            wp, wn = wg[..., :n_pos], wg[..., n_pos:]
            num = np.einsum("rmbj,rbj->rmb", np.matmul(wp[:, None], c), wn)
            boots[r0:r0 + r, g] = num / (wp.sum(-1) * wn.sum(-1))[:, None, :]
    return est, boots


def _seeded_aurocs(rng, n_seeds: int, *, reps=REPS, n_boot=100, n_pos=40, n_neg=80, delta=1.2, sd_train=0.5,
                   sd_model=0.7, settings=1, setting_shift=0.0):
    """Per-seed AUROCs of ``settings`` settings scored on one shared test set per rep.

    Score of patient i under seed k of setting j: ``(delta - j * setting_shift + a_k + b_jk) y_i + x_i + eta_ijk``
    with ``x_i`` shared by every model (correlated test noise), ``a_k ~ N(0, sd_train^2)`` the seed's effect shared
    by the settings (same --seed, same initialisation), ``b_jk ~ N(0, (sd_train/2)^2)`` and
    ``eta ~ N(0, sd_model^2)`` model-specific. Population AUROC of a model with separation ``d``:
    ``Phi(d / sqrt(2 (1 + sd_model^2)))``; over seeds its mean is
    ``Phi(d0 / sqrt(2 (1 + sd_model^2) + var(a + b)))``, the truth each interval must cover.
    """
    n = n_pos + n_neg
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    x = rng.standard_normal((reps, 1, n))
    a = rng.normal(0, sd_train, (reps, 1, n_seeds, 1))
    b = rng.normal(0, sd_train / 2, (reps, settings, n_seeds, 1))
    shift = delta - setting_shift * np.arange(settings)[None, :, None, None]
    sc = (shift + a + b) * y + x[:, None] + rng.normal(0, sd_model, (reps, settings, n_seeds, n))
    est, boots = _auroc_boot(rng, sc.reshape(reps, settings * n_seeds, n), n_pos, n_boot)
    est, boots = est[:, 0], boots[:, 0]
    k2 = 2 * (1 + sd_model**2) + sd_train**2 + (sd_train / 2) ** 2
    truth = sps.norm.cdf((delta - setting_shift * np.arange(settings)) / np.sqrt(k2))
    return truth, est.reshape(reps, settings, n_seeds), boots.reshape(reps, settings, n_seeds, -1)


@pytest.mark.parametrize("n_seeds", [3, 10])
def test_two_level_interval_covers_the_mean_over_seeds(n_seeds):
    """Per-seed AUROCs vary about twice as much as the test-set noise: the two-level 95% interval covers the mean
    over seeds in 93-97% of 1,000 repetitions (Monte Carlo SE 0.7 points); the percentile interval of the
    seed-mean over test patients only (the old aggregates' CI) falls clearly below."""
    rng = np.random.default_rng(100 + n_seeds)
    truth, est, boots = _seeded_aurocs(rng, n_seeds)
    truth = float(truth[0])
    hits, test_only = [], []
    for r in range(REPS):
        res = stats.seed_mean_interval(est[r, 0], boots[r, 0])
        assert res["covers_training_randomness"] and res["warning"] is None and res["n_seeds"] == n_seeds
        hits.append(res["ci_low"] <= truth <= res["ci_high"])
        lo, hi = np.quantile(boots[r, 0].mean(axis=0), [0.025, 0.975])
        test_only.append(lo <= truth <= hi)
    sd_seeds = float(np.mean(est[:, 0].std(axis=1, ddof=1)))
    sd_test = float(np.mean(boots[:, 0].std(axis=2)))
    assert sd_seeds > 1.5 * sd_test  # the regime the claim is about
    assert 0.93 <= np.mean(hits) <= 0.97, np.mean(hits)
    assert np.mean(test_only) <= 0.88, np.mean(test_only)


def test_paired_difference_between_settings_covers_and_pairing_pays():
    """Two settings run with the same 3 seeds: the paired interval of their difference covers in 93-97% of 1,000
    repetitions and is narrower than the unpaired (Welch) one, which covers too (it ignores the shared seed
    effect, so it is conservative)."""
    rng = np.random.default_rng(7)
    truth, est, boots = _seeded_aurocs(rng, 3, settings=2, setting_shift=0.3, sd_train=0.6)
    diff = float(truth[0] - truth[1])
    paired, unpaired, width_p, width_u, p_small = [], [], [], [], []
    for r in range(REPS):
        a = stats.seed_difference(est[r, 0], est[r, 1], boots[r, 0], boots[r, 1])
        u = stats.seed_difference(est[r, 0], est[r, 1], boots[r, 0], boots[r, 1], paired=False)
        paired.append(a["ci_low"] <= diff <= a["ci_high"])
        unpaired.append(u["ci_low"] <= diff <= u["ci_high"])
        width_p.append(a["ci_high"] - a["ci_low"])
        width_u.append(u["ci_high"] - u["ci_low"])
        p_small.append(a["p_value"] <= 0.05)
        assert 0 < a["p_value"] <= 1
    assert 0.93 <= np.mean(paired) <= 0.97, np.mean(paired)
    assert np.mean(unpaired) >= 0.93
    assert np.median(width_p) < 0.9 * np.median(width_u)


def test_seed_mean_interval_reduces_to_student_t_and_flags_one_seed():
    rng = np.random.default_rng(3)
    x = rng.normal(0.8, 0.03, 5)
    res = stats.seed_mean_interval(x, ci=0.9)  # no replicates: no shared test noise, Student's t over seeds
    ref = sps.t.interval(0.9, 4, loc=x.mean(), scale=sps.sem(x))
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(ref, abs=1e-9)
    assert res["test_noise_included"] is False and res["covers_training_randomness"]
    reps = rng.normal(0.8, 0.02, 400)
    one = stats.seed_mean_interval([0.8], reps[None, :])
    assert one["covers_training_randomness"] is False and "training randomness" in one["warning"]
    assert (one["ci_low"], one["ci_high"]) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))
    a, b = rng.normal(0.8, 0.03, 6), rng.normal(0.78, 0.03, 6)
    d = stats.seed_difference(a, b)
    assert d["p_value"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)
    w = stats.seed_difference(a, b, paired=False)
    assert w["p_value"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    # identical seeds and a single replicate-free seed: nothing measures the noise
    assert stats.seed_difference([0.8], [0.7])["ci_low"] is None
    nan_seed = stats.seed_mean_interval([0.8, np.nan, 0.82], np.ones((3, 10)))
    assert nan_seed["n_seeds"] == 2


def test_shared_test_noise_is_what_the_seed_level_interval_misses():
    """All test noise is common to the seeds (the same patients, the same error): the seeds agree exactly, the
    between-seed variance is 0 and only the shared bootstrap covariance gives the interval its width."""
    reps = np.random.default_rng(4).normal(0, 0.02, 500)
    res = stats.seed_mean_interval([0.7, 0.7, 0.7], 0.7 + np.tile(reps, (3, 1)))
    assert res["var_between"] == pytest.approx(0.0, abs=1e-15)
    assert res["se"] == pytest.approx(reps.std(ddof=1), rel=1e-9)
    assert res["ci_high"] - res["ci_low"] == pytest.approx(2 * 1.959964 * reps.std(ddof=1), rel=1e-5)


def test_pivot_matches_monte_carlo_and_its_limits():
    rng = np.random.default_rng(5)
    n = 2_000_000
    for b, c, k in [(1.0, 0.0, 2), (0.3, 0.7, 2), (0.5, 0.5, 9), (0.0, 1.0, 2)]:
        piv = stats._Pivot(b, c, k)
        z = rng.standard_normal(n) * np.sqrt(b * k / rng.chisquare(k, n) + c)
        for x in (0.5, 2.0, 5.0):
            mc = (z > x).mean()
            assert np.exp(piv.log_sf(x)) == pytest.approx(mc, abs=4 * np.sqrt(mc * (1 - mc) / n) + 1e-6)
        assert float(piv.quantile(0.975)) == pytest.approx(np.quantile(z, 0.975), rel=0.01)
    assert float(stats._Pivot(1.0, 0.0, 3).quantile(0.975)) == pytest.approx(sps.t.ppf(0.975, 3), rel=1e-9)
    assert float(stats._Pivot(0.0, 4.0, 3).quantile(0.975)) == pytest.approx(2 * sps.norm.ppf(0.975), rel=1e-9)
    far = stats._Pivot(0.0, 1.0, np.inf).two_sided_p(60.0)  # the normal tail underflows in linear space
    assert 0 < far < 1e-300


def test_trend_over_settings_covers_its_slope_with_three_seeds():
    """Macro AUROC over 4 epsilons with 3 paired seeds each, seed effects shared across settings and test noise
    shared by every model: the two-level slope interval covers the true slope in 93-97% of 1,000 repetitions,
    and with no trend the trend test rejects at most alpha + 2 MC SE."""
    rng = np.random.default_rng(6)
    x = np.log([0.5, 1.0, 4.0, 8.0])
    j, s, n_boot = len(x), 3, 200
    hits, null_rejects = [], []
    for slope in (0.02, 0.0):
        mu = 0.75 + slope * (x - x.mean())
        for _ in range(REPS):
            seed_effect = rng.normal(0, 0.03, (1, s))                 # same init in every setting
            setting_seed = rng.normal(0, 0.02, (j, s))
            shared = rng.normal(0, 0.01)                              # the test set's own luck, common to all
            own = rng.normal(0, 0.008, (j, s))
            est = mu[:, None] + seed_effect + setting_seed + shared + own
            boots = est[..., None] + rng.normal(0, 0.01, (1, 1, n_boot)) + rng.normal(0, 0.008, (j, s, n_boot))
            res = stats.seed_trend(x, list(est), list(boots), n_draws=200)
            if slope:
                hits.append(res["slope_ci_low"] <= slope <= res["slope_ci_high"])
            else:
                null_rejects.append(res["p_value"] <= 0.05)
    assert 0.93 <= np.mean(hits) <= 0.97, np.mean(hits)
    assert np.mean(null_rejects) <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / REPS)


def test_trend_r_and_single_seed():
    x = np.log([0.5, 1, 2, 4, 8])
    est = [[0.60, 0.61], [0.65, 0.66], [0.70, 0.69], [0.75, 0.74], [0.80, 0.81]]
    res = stats.seed_trend(x, est)
    assert res["r"] == pytest.approx(np.corrcoef(x, np.mean(est, axis=1))[0, 1])
    assert res["r_ci_low"] <= res["r"] <= res["r_ci_high"] and res["covers_training_randomness"]
    one = stats.seed_trend(x, [[e[0]] for e in est], [np.full((1, 50), e[0]) + np.linspace(-0.01, 0.01, 50)
                                                      for e in est])
    assert one["covers_training_randomness"] is False and one["warning"]


# ---- the size of a gap change --------------------------------------------------------------------------------------
def test_squared_gap_change_is_unbiased_when_both_gaps_are_zero():
    """Two groups with the same AUROC under both models (true gaps 0), the private model much noisier (AUROC 0.6
    against 0.9): over 2,000 repetitions the mean reported change is 0 within 3 Monte Carlo SEs, while the plug-in
    change in |gap| (the old measure) is biased upward by more than 5 SEs. The "widened" test stays at level."""
    rng = np.random.default_rng(8)
    reps, n_pos, n_neg, n_boot = 2000, 40, 80, 200
    n = 2 * (n_pos + n_neg)
    y = np.tile(np.r_[np.ones(n_pos), np.zeros(n_neg)], 2)
    x = rng.standard_normal((reps, 1, n))
    strength = np.array([0.5, 2.0])[None, :, None]  # private, reference: the same in both groups
    sc = strength * y + x + rng.normal(0, 0.5, (reps, 2, n))
    aucs, boots = _auroc_boot(rng, sc, n_pos, n_boot, groups=2)
    gap, gap_boot = aucs[:, 0] - aucs[:, 1], boots[:, 0] - boots[:, 1]   # (R, model), (R, model, B)
    changes, plug_in, rejects = [], [], []
    for r in range(reps):
        res = stats.seed_gap_change(gap[r, :1], gap[r, 1:], gap_boot[r, :1], gap_boot[r, 1:])
        changes.append(res["estimate"])
        plug_in.append(res["abs_gap_change"])
        rejects.append(res["p_value"] <= 0.05)
    assert gap_boot[:, 0].std(axis=-1).mean() > 1.5 * gap_boot[:, 1].std(axis=-1).mean()  # noisier private
    changes, plug_in = np.array(changes), np.array(plug_in)
    assert abs(changes.mean()) <= 3 * changes.std(ddof=1) / np.sqrt(reps), (changes.mean(), changes.std())
    assert plug_in.mean() > 5 * plug_in.std(ddof=1) / np.sqrt(reps)
    assert np.mean(rejects) <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / reps)


def test_gap_change_tests_cases():
    # private gap clearly wider than a reference gap of 0: u and w both positive
    wide = stats.gap_change_tests(0.08, 0.0, 1e-4, 1e-4, 0.0)
    assert wide["p_value"] < 1e-3 and wide["estimate"] == pytest.approx(0.0064)
    # the same gap with its sign flipped has not widened, whatever its size
    flip = stats.gap_change_tests(-0.08, 0.08, 1e-4, 1e-4, 0.0)
    assert flip["p_value"] > 0.5 and flip["estimate"] == pytest.approx(0.0)
    # a wide gap that narrowed is not a widening either, and the equivalence route through w shows |change| small
    narrowed = stats.gap_change_tests(0.05, 0.06, 1e-6, 1e-6, 0.0)
    assert narrowed["p_value"] > 0.5 and narrowed["equivalence_bound"] < 0.02
    # identical models: a change of exactly 0, shown within 0
    same = stats.seed_gap_change([0.03], [0.03], np.full((1, 20), 0.03), np.full((1, 20), 0.03))
    assert same["p_value"] == 1.0 and same["equivalence_bound"] == 0.0
    # a zero standard error with a non-zero change is degenerate, not conclusive
    assert np.isnan(stats.gap_change_tests(0.05, 0.0, 0.0, 0.0, 0.0)["p_value"])
    # vectorised over rows, equal to the scalar path
    g1, g0 = np.array([0.01, 0.05, -0.02]), np.array([0.0, 0.01, 0.03])
    vec = stats.gap_change_tests(g1, g0, 4e-4, 1e-4, 5e-5)
    for i in range(3):
        one = stats.gap_change_tests(g1[i], g0[i], 4e-4, 1e-4, 5e-5)
        assert float(one["p_value"]) == pytest.approx(vec["p_value"][i], rel=1e-9)


# ---- many tests ---------------------------------------------------------------------------------------------------
def _family(rng, reps: int, planted: float | None, n_boot: int = 200):
    """Gap estimates of a 100-test family and their bootstrap covariance, per repetition.

    Rows 0-33: both true gaps 0, the private estimate twice as noisy; rows 34-66: the same gap 0.03 in both
    models; rows 67-99: the gap flips sign, |0.03| in both. With ``planted``, row 0's private gap is ``planted``.
    Gap SEs 0.01 (reference) and 0.02 (private), correlation 0.3; the covariance is estimated from
    ``n_boot`` replicates, as the bootstrap would.
    """
    m = 100
    g0 = np.r_[np.zeros(34), np.full(33, 0.03), np.full(33, -0.03)]
    g1 = np.r_[np.zeros(34), np.full(33, 0.03), np.full(33, 0.03)]
    sd1 = np.full(m, 0.02)
    if planted is not None:
        g1[0], sd1[0] = planted, 0.012
    sd0, rho = 0.01, 0.3

    z0, z1 = rng.standard_normal((reps, m)), rng.standard_normal((reps, m))
    est0, est1 = g0 + sd0 * z0, g1 + sd1 * (rho * z0 + np.sqrt(1 - rho**2) * z1)
    # the sample covariance of n_boot normal replicates, drawn by Bartlett's decomposition of the Wishart law
    a11 = np.sqrt(rng.chisquare(n_boot - 1, (reps, m)))
    a22 = np.sqrt(rng.chisquare(n_boot - 2, (reps, m)))
    a21 = rng.standard_normal((reps, m))
    l11, l21, l22 = sd0, rho * sd1, np.sqrt(1 - rho**2) * sd1          # Cholesky factor of the true covariance
    c0, c1 = l11 * a11, l21 * a11 + l22 * a21                           # rows of L A, A lower-triangular
    d1 = l22 * a22
    v00, v10, v11 = c0**2 / (n_boot - 1), c0 * c1 / (n_boot - 1), (c1**2 + d1**2) / (n_boot - 1)
    return est1, est0, v11, v00, v10


def _yes(p: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Holm's "yes" per repetition (rows: repetitions)."""
    return np.array([np.nanmin(holm(row)) <= alpha for row in p])


def test_null_family_of_100_tests_keeps_alpha():
    """No gap widened anywhere (34 rows at 0 with a noisier private model, 33 equal gaps, 33 flipped signs): over
    2,000 repetitions the "yes" rate is at most alpha + 2 MC SEs. Without Holm the toy answer would be "yes"
    most of the time."""
    rng = np.random.default_rng(9)
    reps = 2000
    g1, g0, v11, v00, v10 = _family(rng, reps, planted=None)
    p = stats.gap_change_tests(g1, g0, v11, v00, v10)["p_value"]
    assert np.mean(_yes(p)) <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / reps)
    assert np.mean((p <= 0.05).any(axis=1)) > 0.5  # uncorrected: the test of the test can fail


def test_planted_widening_in_a_family_of_100_is_found():
    """One group's gap goes from 0 to 0.1 among 99 null rows: Holm over 100 finds it in at least 95% of 1,000
    repetitions and names it; the paired bootstrap p-value with 1,000 resamples could not (Holm needs
    p <= 0.05/100, its floor is 1/1001)."""
    rng = np.random.default_rng(10)
    g1, g0, v11, v00, v10 = _family(rng, REPS, planted=0.1)
    p = stats.gap_change_tests(g1, g0, v11, v00, v10)["p_value"]
    adjusted = np.array([holm(row) for row in p])
    found = adjusted[:, 0] <= 0.05
    assert found.mean() >= 0.95, found.mean()
    lead = adjusted.argmin(axis=1)
    assert np.all(lead[found] == 0) or np.mean(lead[found] == 0) > 0.99
    floor = paired_p_value(np.ones(1000))  # every resample on one side: the smallest bootstrap p
    assert floor == pytest.approx(1 / 1001) and holm([floor] + [0.5] * 99)[0] > 0.05


def test_verdict_resolution_rule_and_training_randomness():
    rng = np.random.default_rng(11)
    rows = [stats.seed_gap_change([0.0], [0.0], rng.normal(0, 0.005, (1, 300)), rng.normal(0, 0.005, (1, 300)))
            for _ in range(3)]
    wide = stats.seed_gap_change([0.1], [0.0], rng.normal(0.1, 0.01, (1, 300)), rng.normal(0, 0.01, (1, 300)))
    v = gap_change_verdict(rows + [wide], names=list("abcd"), n_boot=300, family_size=100,
                           adjusted_p=holm([r["p_value"] for r in rows + [wide]] + [0.9] * 96)[:4])
    assert v["answer"] == "yes" and "d" in v["reason"]
    assert v["resolution_limited"] and any("resamples" in w for w in v["warnings"])  # 100 > 0.05 * 301
    assert v["covers_training_randomness"] is False and any("training randomness" in w for w in v["warnings"])
    no = gap_change_verdict(rows, n_boot=2000)
    assert no["answer"] == "no" and not no["resolution_limited"]
    mdc = no["minimum_detectable_change"]
    assert mdc["alpha_holm"] == pytest.approx(0.05 / 3) and 0 < mdc["smallest"] <= mdc["largest"]
    loose = gap_change_verdict(rows, margin=0.005)
    assert loose["answer"] == "inconclusive" and "not ±0.005" in loose["reason"]
    seeds = stats.seed_gap_change([0.0, 0.01, -0.01], [0.0, 0.0, 0.01], rng.normal(0, 0.005, (3, 200)),
                                  rng.normal(0, 0.005, (3, 200)))
    assert gap_change_verdict([seeds])["covers_training_randomness"] is True


def test_minimum_detectable_change_has_its_power():
    """At the reported minimum detectable change (reference gap 0, Holm level 0.05/35), the test rejects in 80%
    of 20,000 simulated repetitions (MC SE 0.3 points); with one standard error it is the textbook
    (z_{1-a/2} + z_{power}) se."""
    alpha, rng = 0.05 / 35, np.random.default_rng(12)
    se_u, se_w, rho = 0.012, 0.016, 0.4
    delta = stats.minimum_detectable_change(se_u, se_w, alpha=alpha, rho=rho)
    n = 20000
    z0, z1 = rng.standard_normal(n), rng.standard_normal(n)
    u = delta + se_u * z0
    w = delta + se_w * (rho * z0 + np.sqrt(1 - rho**2) * z1)
    crit = sps.norm.ppf(1 - alpha / 2)
    assert np.mean((u / se_u > crit) & (w / se_w > crit)) == pytest.approx(0.8, abs=0.012)
    single = stats.minimum_detectable_change(0.0, 0.01, alpha=0.05)
    assert single == pytest.approx((sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * 0.01, rel=1e-6)
    t_single = stats.minimum_detectable_change(0.0, 0.01, alpha=0.05, df=4)
    assert t_single == pytest.approx((sps.t.ppf(0.975, 4) + sps.t.ppf(0.8, 4)) * 0.01, rel=1e-6)
    assert stats.minimum_detectable_change(float("nan"), 0.01, alpha=0.05) is None


@pytest.mark.parametrize("a,b,rho", [(0.3, -0.5, 0.4), (1.5, 2.0, -0.7), (-1.0, 0.2, 0.95), (0.0, 0.0, 0.0)])
def test_bivariate_normal_upper_orthant_equals_scipy(a, b, rho):
    ref = sps.multivariate_normal([0, 0], [[1, rho], [rho, 1]]).cdf([-a, -b])
    assert stats._bvn_upper(a, b, rho) == pytest.approx(ref, abs=1e-6)
