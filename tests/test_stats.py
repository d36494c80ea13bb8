"""privaudit.audit.stats against scikit-learn / scipy and naive loops over the same bootstrap resamples."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (accuracy_score, average_precision_score, brier_score_loss, confusion_matrix,
                             roc_auc_score, roc_curve)

from privaudit.audit.stats import (SampleMajorWeights, bca_interval, delong_test, ece, weighted_auroc_fast,
                                   weighted_average_precision, weighted_brier, weighted_ece, weighted_rates,
                                   weighted_sensitivity_at_specificity, youden_threshold)
from privaudit.audit.utility import counts_from_indices, draw_indices, percentile_ci, weighted_auroc


def make_data(n: int, seed: int, *, ties: bool = False, prevalence: float = 0.3):
    """Labels and probabilities; ``ties`` rounds the probabilities to one decimal (at most 11 distinct)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = 1 / (1 + np.exp(-(1.5 * y - 0.8 + rng.normal(0, 1, n))))
    return y, (np.round(p, 1) if ties else p)


def resamples(n: int, n_boot: int, seed: int):
    idx = draw_indices(n, n_boot, seed)
    return idx, counts_from_indices(idx, n)


def both_classes(y) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def assert_matches(fast: np.ndarray, expected: np.ndarray, atol: float = 1e-9) -> None:
    """Same nan pattern, and equal to ``atol`` elsewhere."""
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(expected))
    ok = ~np.isnan(expected)
    np.testing.assert_allclose(fast[ok], expected[ok], rtol=0, atol=atol)


# ---- naive references: one scikit-learn call per resample ----------------------------------------------------
def naive_ap(y, s):
    return average_precision_score(y, s) if both_classes(y) else np.nan


def naive_sens_at_spec(y, s, specificity):
    if not both_classes(y):
        return np.nan
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return tpr[1 - fpr >= specificity].max()


def naive_ece(y, p, n_bins):
    """The textbook loop: bin i is lo <= p < hi, the last bin also holds p == 1."""
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        in_bin = (p >= lo) & ((p < hi) if i < n_bins - 1 else (p <= hi))
        if in_bin.any():
            total += in_bin.mean() * abs(y[in_bin].mean() - p[in_bin].mean())
    return total


def naive_rates(y, p, threshold):
    called = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, called, labels=[0, 1]).ravel()
    return {"sensitivity": tp / (tp + fn) if tp + fn else np.nan,
            "specificity": tn / (tn + fp) if tn + fp else np.nan,
            "fpr": fp / (tn + fp) if tn + fp else np.nan,
            "accuracy": accuracy_score(y, called),
            "selection_rate": called.mean()}


# ---- weighted metrics vs the naive loop ----------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
def test_weighted_average_precision_equals_sklearn_per_resample(ties):
    y, s = make_data(80, 1, ties=ties)
    idx, w = resamples(80, 150, seed=2)
    expected = np.array([naive_ap(y[i], s[i]) for i in idx])
    assert_matches(weighted_average_precision(y, s, w), expected)


def test_heavy_ties_with_two_score_values():
    """Two distinct scores: AP and sensitivity at specificity hinge on how a tied run is counted."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = np.where(rng.random(50) < 0.5 + 0.3 * (y - 0.5), 0.7, 0.2)
    idx, w = resamples(50, 120, seed=4)
    assert_matches(weighted_average_precision(y, s, w), np.array([naive_ap(y[i], s[i]) for i in idx]))
    for spec in (0.3, 0.6, 1.0):
        expected = np.array([naive_sens_at_spec(y[i], s[i], spec) for i in idx])
        assert_matches(weighted_sensitivity_at_specificity(y, s, w, spec), expected)


@pytest.mark.parametrize("y", [np.array([1, 0, 0, 0, 0, 0]), np.array([0, 1, 1, 1, 1, 1])])
def test_resamples_with_one_class_give_nan(y):
    s = np.array([0.9, 0.1, 0.4, 0.4, 0.6, 0.2])
    idx, w = resamples(6, 150, seed=5)
    one_class = np.array([not both_classes(y[i]) for i in idx])
    assert one_class.any() and not one_class.all()
    for fast, ref in [(weighted_average_precision(y, s, w), naive_ap),
                      (weighted_sensitivity_at_specificity(y, s, w, 0.8), lambda a, b: naive_sens_at_spec(a, b, 0.8)),
                      (weighted_auroc_fast(y, s, w), lambda a, b: roc_auc_score(a, b) if both_classes(a) else np.nan)]:
        np.testing.assert_array_equal(np.isnan(fast), one_class)
        assert_matches(fast, np.array([ref(y[i], s[i]) for i in idx]))
    # calibration and accuracy stay defined with one class; sensitivity needs a positive
    assert not np.isnan(weighted_brier(y, s, w)).any()
    assert not np.isnan(weighted_ece(y, s, w)).any()
    rates = weighted_rates(y, s, 0.5, w)
    assert not np.isnan(rates["accuracy"]).any()
    no_pos = np.array([y[i].sum() == 0 for i in idx])
    np.testing.assert_array_equal(np.isnan(rates["sensitivity"]), no_pos)


def test_empty_rows_and_empty_input_give_nan():
    y, p = make_data(10, 6)
    w = np.zeros((3, 10))
    for out in (weighted_average_precision(y, p, w), weighted_brier(y, p, w), weighted_ece(y, p, w),
                weighted_sensitivity_at_specificity(y, p, w), *weighted_rates(y, p, 0.5, w).values()):
        assert out.shape == (3,) and np.isnan(out).all()
    empty = np.zeros((2, 0))
    assert np.isnan(weighted_average_precision([], [], empty)).all()
    assert np.isnan(weighted_sensitivity_at_specificity([], [], empty)).all()
    assert np.isnan(weighted_ece([], [], empty)).all() and np.isnan(ece([], []))


@pytest.mark.parametrize("specificity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_weighted_sensitivity_at_specificity_equals_roc_curve_per_resample(specificity, ties):
    y, s = make_data(70, 7, ties=ties)
    idx, w = resamples(70, 120, seed=8)
    expected = np.array([naive_sens_at_spec(y[i], s[i], specificity) for i in idx])
    assert_matches(weighted_sensitivity_at_specificity(y, s, w, specificity), expected)


def test_sensitivity_at_specificity_small_example():
    # negatives 0.1 0.2 0.3 0.4 0.5; positives 0.35 0.45 0.6. Specificity >= 0.8 allows t = 0.45 (FP = 1): TPR 2/3.
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.35, 0.45, 0.6])
    out = weighted_sensitivity_at_specificity(y, s, np.ones((1, 8)), 0.8)
    assert out[0] == pytest.approx(2 / 3, abs=1e-15)
    assert weighted_sensitivity_at_specificity(y, s, np.ones((1, 8)), 1.0)[0] == pytest.approx(1 / 3, abs=1e-15)


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_brier_equals_sklearn_per_resample(ties):
    y, p = make_data(60, 9, ties=ties)
    idx, w = resamples(60, 100, seed=10)
    expected = np.array([brier_score_loss(y[i], p[i]) for i in idx])
    assert_matches(weighted_brier(y, p, w), expected)


def test_ece_equals_the_naive_loop_including_bin_edges():
    rng = np.random.default_rng(11)
    p = np.r_[np.arange(11) / 10, rng.random(89)]  # every edge 0, 0.1, ..., 1 appears
    y = (rng.random(100) < p).astype(int)
    for n_bins in (1, 5, 10, 15):
        assert ece(y, p, n_bins) == pytest.approx(naive_ece(y, p, n_bins), abs=1e-12)
    # hand-computed: bins [0, .5) and [.5, 1]; |1 - .25| and |0 - .75| each on half the samples
    assert ece([1, 0], [0.25, 0.75], 2) == pytest.approx(0.75, abs=1e-15)
    assert ece([1, 1], [1.0, 1.0], 10) == 0.0  # p = 1 lands in the last, closed bin


@pytest.mark.parametrize("n_bins", [10, 7])
def test_weighted_ece_equals_the_naive_loop_per_resample(n_bins):
    y, p = make_data(90, 12, ties=True)  # probabilities k/10 sit on the bin edges
    idx, w = resamples(90, 120, seed=13)
    expected = np.array([naive_ece(y[i], p[i], n_bins) for i in idx])
    assert_matches(weighted_ece(y, p, w, n_bins), expected)
    np.testing.assert_allclose(weighted_ece(y, p, w[:5], n_bins),
                               [ece(y[i], p[i], n_bins) for i in idx[:5]], atol=1e-12)


def test_youden_threshold_maximises_j_over_the_distinct_scores():
    for seed, ties in [(14, False), (15, True)]:
        y, p = make_data(120, seed, ties=ties)
        cand = np.unique(p)
        j = np.array([np.mean(p[y == 1] >= t) - np.mean(p[y == 0] >= t) for t in cand])
        best = cand[np.flatnonzero(j == j.max()).max()]  # ties in J: the highest threshold
        t = youden_threshold(y, p)
        assert t == best
        rates = weighted_rates(y, p, t, np.ones((1, 120)))
        assert rates["sensitivity"][0] - rates["fpr"][0] == pytest.approx(j.max(), abs=1e-12)
    assert np.isnan(youden_threshold([1, 1, 1], [0.2, 0.5, 0.9]))


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_rates_equal_sklearn_per_resample(ties):
    y, p = make_data(60, 16, ties=ties)
    idx, w = resamples(60, 100, seed=17)
    t = youden_threshold(y, p)
    fast = weighted_rates(y, p, t, w)
    naive = [naive_rates(y[i], p[i], t) for i in idx]
    for key in ("sensitivity", "specificity", "accuracy", "selection_rate", "fpr"):
        assert_matches(fast[key], np.array([r[key] for r in naive]))
    assert all(np.isnan(v).all() for v in weighted_rates(y, p, float("nan"), w).values())


def test_weighted_metrics_do_not_depend_on_sample_order():
    y, p = make_data(100, 18, ties=True)
    _, w = resamples(100, 60, seed=19)
    perm = np.random.default_rng(20).permutation(100)
    for fn in (weighted_average_precision, weighted_brier, weighted_ece, weighted_sensitivity_at_specificity,
               weighted_auroc_fast):
        assert_matches(fn(y[perm], p[perm], w[:, perm]), fn(y, p, w), atol=1e-12)
    a, b = weighted_rates(y[perm], p[perm], 0.5, w[:, perm]), weighted_rates(y, p, 0.5, w)
    for key in a:
        assert_matches(a[key], b[key], atol=1e-12)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="only 0 and 1"):
        weighted_brier([0, 2], [0.1, 0.2], np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        weighted_ece([0, 1], [0.1, 1.2], np.ones((1, 2)))
    with pytest.raises(ValueError, match="shape"):
        weighted_average_precision([0, 1], [0.1, 0.2], np.ones((1, 3)))
    with pytest.raises(ValueError, match="finite"):
        delong_test([0, 1], [0.1, np.nan], [0.1, 0.2])
    with pytest.raises(ValueError, match="specificity"):
        weighted_sensitivity_at_specificity([0, 1], [0.1, 0.2], np.ones((1, 2)), 1.5)


# ---- DeLong ----------------------------------------------------------------------------------------------------
def psi_matrix(s, y):
    """psi(X_i, Y_j) for every positive i (rows) and negative j (columns)."""
    x, v = s[y == 1][:, None], s[y == 0][None, :]
    return (x > v) + 0.5 * (x == v)


def naive_obuchowski_variance(y, s1, s2, clusters):
    """Var(AUC1 - AUC2) = var_1 + var_2 - 2 cov_12 with Obuchowski's (1997) S10, S01, S11, looping over clusters."""
    comps = []
    for s in (s1, s2):
        psi = psi_matrix(s, y)
        auc = psi.mean()
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        cpos, cneg = clusters[y == 1], clusters[y == 0]
        x_comp, y_comp = [], []
        for c in np.unique(clusters):
            x_comp.append(v10[cpos == c].sum() - np.sum(cpos == c) * auc)
            y_comp.append(v01[cneg == c].sum() - np.sum(cneg == c) * auc)
        comps.append((np.array(x_comp), np.array(y_comp)))
    n_clusters = len(np.unique(clusters))
    i10, i01 = len(np.unique(clusters[y == 1])), len(np.unique(clusters[y == 0]))
    big_m, big_n = int((y == 1).sum()), int((y == 0).sum())

    def cov(r, t):
        (xr, yr), (xt, yt) = comps[r], comps[t]
        s10 = i10 / ((i10 - 1) * big_m) * np.sum(xr * xt)
        s01 = i01 / ((i01 - 1) * big_n) * np.sum(yr * yt)
        s11_rt = n_clusters / (n_clusters - 1) * np.sum(xr * yt)
        s11_tr = n_clusters / (n_clusters - 1) * np.sum(xt * yr)
        return s10 / big_m + s01 / big_n + (s11_rt + s11_tr) / (big_m * big_n)

    return cov(0, 0) + cov(1, 1) - 2 * cov(0, 1)


@pytest.mark.parametrize("ties", [False, True])
def test_delong_variance_equals_the_direct_structural_components(ties):
    y, s1 = make_data(90, 21, ties=ties, prevalence=0.35)
    rng = np.random.default_rng(22)
    s2 = np.clip(s1 + rng.normal(0, 0.15, 90), 0, 1)
    s2 = np.round(s2, 1) if ties else s2
    v10 = np.array([psi_matrix(s, y).mean(axis=1) for s in (s1, s2)])
    v01 = np.array([psi_matrix(s, y).mean(axis=0) for s in (s1, s2)])
    s10, s01 = np.cov(v10), np.cov(v01)
    cov = s10 / (y == 1).sum() + s01 / (y == 0).sum()
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    res = delong_test(y, s1, s2)
    assert res["auc1"] == pytest.approx(roc_auc_score(y, s1), abs=1e-12)
    assert res["auc2"] == pytest.approx(roc_auc_score(y, s2), abs=1e-12)
    assert res["se"] ** 2 == pytest.approx(var, rel=1e-10)
    assert res["z"] == pytest.approx(res["difference"] / np.sqrt(var), rel=1e-9)
    assert res["p_value"] == pytest.approx(2 * stats.norm.sf(abs(res["z"])), rel=1e-12)


def test_clustered_delong_reduces_to_delong_with_one_sample_per_cluster():
    y, s1 = make_data(80, 23)
    s2 = np.clip(s1 + np.random.default_rng(24).normal(0, 0.2, 80), 0, 1)
    plain = delong_test(y, s1, s2)
    single = delong_test(y, s1, s2, clusters=[f"patient{i}" for i in range(80)])
    for key in ("auc1", "auc2", "difference", "se", "z", "p_value"):
        assert single[key] == pytest.approx(plain[key], rel=1e-12)


def test_clustered_delong_equals_obuchowski_loop():
    rng = np.random.default_rng(25)
    patients = np.repeat(np.arange(30), rng.integers(1, 5, 30))  # 1 to 4 images per patient
    n = len(patients)
    risk = rng.normal(0, 1, 30)[patients]
    y = (rng.random(n) < 1 / (1 + np.exp(-risk))).astype(int)
    s1 = risk + y + rng.normal(0, 1, n)
    s2 = np.round(risk + 0.8 * y + rng.normal(0, 1, n), 1)
    res = delong_test(y, s1, s2, clusters=patients)
    assert res["se"] ** 2 == pytest.approx(naive_obuchowski_variance(y, s1, s2, patients), rel=1e-10)
    assert res["se"] != pytest.approx(delong_test(y, s1, s2)["se"], rel=0.01)  # clustering matters here


def null_p_values(reps: int, seed: int, clustered: bool):
    """p-values of paired AUROC tests under H0: two scores = the same signal + independent noise of equal size.

    Clustered: 50 patients x 3 images with a patient-level label; each model's noise has a patient-level part,
    so a patient's images are correlated.
    """
    rng = np.random.default_rng(seed)
    out = {"clustered": [], "plain": []}
    for _ in range(reps):
        if clustered:
            patients = np.repeat(np.arange(50), 3)
            y = (rng.random(50) < 0.4).astype(int)[patients]
            signal = y + rng.normal(0, 1, 150)
            s1 = signal + rng.normal(0, 1, 50)[patients] + rng.normal(0, 0.3, 150)
            s2 = signal + rng.normal(0, 1, 50)[patients] + rng.normal(0, 0.3, 150)
            out["clustered"].append(delong_test(y, s1, s2, clusters=patients)["p_value"])
        else:
            y = (rng.random(150) < 0.4).astype(int)
            signal = y + rng.normal(0, 1, 150)
            s1, s2 = signal + rng.normal(0, 1, 150), signal + rng.normal(0, 1, 150)
        out["plain"].append(delong_test(y, s1, s2)["p_value"])
    return {k: np.array(v) for k, v in out.items()}


def binomial_limits(reps: int, level: float = 0.05) -> tuple[int, int]:
    """Two-sided 99.9% limits of the number of rejections at ``level`` among ``reps`` null tests."""
    return int(stats.binom.ppf(0.0005, reps, level)), int(stats.binom.ppf(0.9995, reps, level))


def test_delong_p_values_are_uniform_under_the_null():
    p = null_p_values(200, seed=26, clustered=False)["plain"]
    lo, hi = binomial_limits(200)
    assert lo <= np.sum(p < 0.05) <= hi
    assert stats.kstest(p, "uniform").pvalue > 0.001


def test_clustered_delong_keeps_its_size_where_the_plain_test_does_not():
    p = null_p_values(200, seed=27, clustered=True)
    lo, hi = binomial_limits(200)
    assert lo <= np.sum(p["clustered"] < 0.05) <= hi
    assert stats.kstest(p["clustered"], "uniform").pvalue > 0.001
    assert np.sum(p["plain"] < 0.05) > hi  # ignoring the patients understates the variance


def test_delong_edge_cases_and_hanley_mcneil_example():
    # Hanley & McNeil (1982), Radiology 143:29-36, Table 1: 5-point CT ratings of 58 normal and 51 abnormal
    # patients; the published area is 0.893.
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    y = np.r_[np.zeros(58), np.ones(51)].astype(int)
    rating = np.r_[np.repeat(np.arange(1, 6), normal), np.repeat(np.arange(1, 6), abnormal)]
    same = delong_test(y, rating, rating)
    assert round(same["auc1"], 3) == 0.893
    assert (same["se"], same["z"], same["p_value"]) == (0.0, 0.0, 1.0)
    flipped = delong_test(y, rating, -rating)
    assert flipped["auc2"] == pytest.approx(1 - same["auc1"], abs=1e-12) and flipped["p_value"] < 1e-10
    one_class = delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert all(np.isnan(v) for v in one_class.values())
    one_positive = delong_test([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3], [0.2, 0.1, 0.9, 0.3])
    assert one_positive["auc1"] == 1.0 and np.isnan(one_positive["se"]) and np.isnan(one_positive["p_value"])


# ---- BCa -------------------------------------------------------------------------------------------------------
def test_bca_equals_scipy_on_scipys_own_resamples():
    x = np.random.default_rng(28).exponential(1.0, 40)  # skewed: z0 and a are both non-zero
    res = stats.bootstrap((x,), np.mean, method="BCa", n_resamples=2000, confidence_level=0.95,
                          rng=np.random.default_rng(29))
    jack = (x.sum() - x) / (len(x) - 1)
    lo, hi = bca_interval(x.mean(), res.bootstrap_distribution, jack, 0.95)
    assert lo == pytest.approx(res.confidence_interval.low, rel=1e-12)
    assert hi == pytest.approx(res.confidence_interval.high, rel=1e-12)
    plo, phi, _ = percentile_ci(res.bootstrap_distribution, 0.95)
    assert abs(lo - plo) > 1e-3 and abs(hi - phi) > 1e-3  # BCa moved the percentile interval


def test_bca_agrees_with_scipy_within_monte_carlo_error():
    x = np.random.default_rng(30).exponential(1.0, 40)
    boots = x[draw_indices(40, 4000, seed=31)].mean(axis=1)
    jack = (x.sum() - x) / (len(x) - 1)
    lo, hi = bca_interval(x.mean(), boots, jack, 0.9)
    ref = stats.bootstrap((x,), np.mean, method="BCa", n_resamples=4000, confidence_level=0.9,
                          rng=np.random.default_rng(32)).confidence_interval
    # Monte Carlo sd of a 5% quantile of 4000 replicates is about 0.005 here; allow ~5 sd of the difference
    assert abs(lo - ref.low) < 0.035 and abs(hi - ref.high) < 0.035


def test_bca_degenerate_cases():
    boots = np.linspace(-1, 1, 201)
    assert bca_interval(0.0, boots, np.ones(5), 0.9) == pytest.approx(percentile_ci(boots, 0.9)[:2], abs=1e-12)
    assert all(np.isnan(bca_interval(5.0, boots, np.arange(5.0), 0.9)))  # every replicate below theta
    assert all(np.isnan(bca_interval(0.0, np.array([0.1, np.nan]), np.arange(5.0), 0.9)))
    assert all(np.isnan(bca_interval(np.nan, boots, np.arange(5.0), 0.9)))


# ---- weighted_auroc_fast ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ties,prevalence", [(False, 0.3), (True, 0.3), (False, 0.8), (True, 0.7)])
def test_weighted_auroc_fast_equals_weighted_auroc_exactly(ties, prevalence):
    y, s = make_data(200, 33, ties=ties, prevalence=prevalence)
    _, w = resamples(200, 90, seed=34)
    ref = weighted_auroc(y, s, w)
    prepared = SampleMajorWeights(w, block=16)  # several blocks, the last one partial
    assert prepared.dtype == np.float32
    np.testing.assert_array_equal(weighted_auroc_fast(y, s, prepared), ref)
    np.testing.assert_array_equal(weighted_auroc_fast(y, s, w.astype(np.int64)), ref)


def test_weighted_auroc_fast_keep_and_fractional_weights():
    y, s = make_data(150, 35, ties=True)
    _, w = resamples(150, 40, seed=36)
    keep = np.random.default_rng(37).random(150) < 0.6
    y_nan = np.where(keep, y, np.nan)  # excluded samples may hold unknown labels
    np.testing.assert_array_equal(weighted_auroc_fast(y_nan, s, w, keep=keep),
                                  weighted_auroc(y[keep], s[keep], w[:, keep]))
    frac = w * np.random.default_rng(38).random(w.shape)
    prepared = SampleMajorWeights(frac)
    assert prepared.dtype == np.float64
    np.testing.assert_allclose(weighted_auroc_fast(y, s, prepared), weighted_auroc(y, s, frac), rtol=0, atol=1e-12)
    assert np.isnan(weighted_auroc_fast(y, s, w, keep=np.zeros(150, bool))).all()


def test_sample_major_weights_fall_back_to_float64_where_float32_would_round():
    y, s = np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.6])
    big = np.array([[2.0**24, 3, 1, 2], [1, 1, 1, 1]])  # a resample totalling above 2**24
    assert SampleMajorWeights(big).dtype == np.float64
    assert SampleMajorWeights(big[1:]).dtype == np.float32
    np.testing.assert_array_equal(weighted_auroc_fast(y, s, big), weighted_auroc(y, s, big))
    with pytest.raises(ValueError, match="keep"):
        weighted_auroc_fast(y, s, big, keep=np.ones(3, bool))
