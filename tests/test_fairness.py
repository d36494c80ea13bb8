"""Fairness metrics vs aif360 (point and bootstrap resample), Pearson's r vs scipy, Holm and the DP verdict."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from privaudit.audit.fairness import SELECTION_METRICS, gap_change_verdict, holm, pearson_r, selection_metrics
from privaudit.audit.utility import counts_from_indices, draw_indices

AIF_SKLEARN = {"statistical_parity_difference": "statistical_parity_difference",
               "disparate_impact": "disparate_impact_ratio",
               "equal_opportunity_difference": "equal_opportunity_difference",
               "average_odds_difference": "average_odds_difference"}


@pytest.fixture(scope="module")
def aif():
    """aif360's two metric APIs; TF_USE_LEGACY_KERAS is set first because aif360 imports TensorFlow if present."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import aif360.sklearn.metrics as skm
    from aif360.datasets import BinaryLabelDataset
    from aif360.metrics import ClassificationMetric

    return skm, BinaryLabelDataset, ClassificationMetric


def make_data(n=300, groups=("F", "M"), seed=0):
    rng = np.random.default_rng(seed)
    g = rng.choice(np.array(groups, dtype=object), n)
    shift = np.array([0.15 * groups.index(v) for v in g])
    y = (rng.random(n) < 0.3 + shift).astype(float)
    p = np.clip(0.5 * y + rng.normal(0.25 + shift, 0.25, n), 0, 1)
    return y, (p >= 0.5).astype(int), g


def aif_sklearn(skm, y, yhat, unpriv_mask) -> dict[str, float]:
    """aif360.sklearn.metrics with the samples in ``unpriv_mask`` unprivileged and all others privileged."""
    priv = ~np.asarray(unpriv_mask)
    return {ours: float(getattr(skm, fn)(pd.Series(y.astype(int)), yhat, prot_attr=priv, priv_group=True))
            for ours, fn in AIF_SKLEARN.items()}


def aif_classification_metric(BinaryLabelDataset, ClassificationMetric, y, yhat, groups, unpriv, privs):
    codes = {v: i for i, v in enumerate(sorted(set(groups)))}
    df = pd.DataFrame({"y": y.astype(float), "g": [float(codes[v]) for v in groups]})
    truth = BinaryLabelDataset(df=df, label_names=["y"], protected_attribute_names=["g"])
    pred = truth.copy()
    pred.labels = yhat.astype(float).reshape(-1, 1)
    m = ClassificationMetric(truth, pred, unprivileged_groups=[{"g": codes[unpriv]}],
                             privileged_groups=[{"g": codes[v]} for v in privs])
    return {"statistical_parity_difference": m.statistical_parity_difference(),
            "disparate_impact": m.disparate_impact(),
            "equal_opportunity_difference": m.equal_opportunity_difference(),
            "average_odds_difference": m.average_odds_difference()}


def assert_metrics_equal(entry, ref, key="estimate", row=None):
    for m in SELECTION_METRICS:
        got = entry[m][key] if row is None else entry[m]["boot"][row]
        assert np.isfinite(got) and got == pytest.approx(ref[m], abs=1e-12), m


def test_binary_attribute_matches_aif360(aif):
    skm, BLD, CM = aif
    y, yhat, g = make_data(seed=1)
    # unknown labels and groups are left out, so aif360 sees only the complete rows
    y[[0, 5]] = np.nan
    g[[1, 7]] = None
    keep = ~np.isnan(y) & np.array([v is not None for v in g])
    out = selection_metrics(y, yhat, g, "M", np.ones((2, len(y))))
    assert list(out) == ["F"]
    e = out["F"]
    assert (e["unprivileged"], e["privileged"]) == ("F", "M")
    assert e["n_unprivileged"] + e["n_privileged"] == keep.sum()
    assert e["n_pos_unprivileged"] == int(y[keep & (g == "F")].sum())
    yk, hk, gk = y[keep], yhat[keep], g[keep]
    assert_metrics_equal(e, aif_sklearn(skm, yk, hk, gk == "F"))
    assert_metrics_equal(e, aif_classification_metric(BLD, CM, yk, hk, gk, "F", ["M"]))
    assert e["statistical_parity_difference"]["estimate"] != 0  # a real gap, so the sign convention is tested
    for m in SELECTION_METRICS:  # W = ones reproduces the point estimate
        np.testing.assert_allclose(e[m]["boot"], e[m]["estimate"], rtol=0, atol=1e-15)
    # the other group as privileged flips the sign of the differences
    flipped = selection_metrics(y, yhat, g, "F", np.ones((1, len(y))))["M"]
    assert flipped["statistical_parity_difference"]["estimate"] == pytest.approx(
        -e["statistical_parity_difference"]["estimate"], abs=1e-15)


def test_multivalued_attribute_is_one_vs_rest_and_matches_aif360(aif):
    skm, BLD, CM = aif
    levels = ("a", "b", "c")
    y, yhat, g = make_data(n=400, groups=levels, seed=2)
    out = selection_metrics(y, yhat, g, "a", np.ones((1, len(y))))  # privileged is ignored with 3 groups
    assert list(out) == list(levels)
    for v in levels:
        e = out[v]
        assert (e["unprivileged"], e["privileged"]) == (v, "rest")
        assert (e["n_unprivileged"], e["n_privileged"]) == ((g == v).sum(), (g != v).sum())
        assert_metrics_equal(e, aif_sklearn(skm, y, yhat, g == v))
        assert_metrics_equal(e, aif_classification_metric(BLD, CM, y, yhat, g, v, [w for w in levels if w != v]))


@pytest.mark.parametrize("levels", [("F", "M"), ("a", "b", "c")])
def test_bootstrap_rows_match_aif360_on_the_resample(aif, levels):
    skm = aif[0]
    y, yhat, g = make_data(n=250, groups=levels, seed=3)
    idx = draw_indices(len(y), 4, seed=11)
    W = counts_from_indices(idx, len(y))
    out = selection_metrics(y, yhat, g, levels[-1], W)
    for b in (0, 3):
        yb, hb, gb = y[idx[b]], yhat[idx[b]], g[idx[b]]
        for v, e in out.items():
            unpriv = gb == v
            if e["privileged"] != "rest":
                keep = unpriv | (gb == e["privileged"])
                yb, hb, gb, unpriv = yb[keep], hb[keep], gb[keep], unpriv[keep]
            assert_metrics_equal(e, aif_sklearn(skm, yb, hb, unpriv), row=b)
        assert not np.allclose(out[levels[0]]["statistical_parity_difference"]["boot"][b],
                               out[levels[0]]["statistical_parity_difference"]["estimate"])


def test_undefined_metrics_are_nan_not_errors():
    # group "b": no positives (TPR undefined); group "a": no negatives (FPR undefined)
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=float)
    yhat = np.array([1, 0, 1, 1, 1, 0, 0, 0])
    g = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    W = np.array([np.ones(8),                  # the point
                  [0, 0, 0, 0, 2, 2, 2, 2],    # "a" is empty
                  [3, 1, 0, 0, 0, 0, 0, 4]])   # privileged "b" selects nobody: DI undefined
    e = selection_metrics(y, yhat, g, "b", W)["a"]
    est = {m: e[m]["estimate"] for m in SELECTION_METRICS}
    assert est["statistical_parity_difference"] == pytest.approx(0.75 - 0.25)
    assert est["disparate_impact"] == pytest.approx(3.0)
    assert np.isnan(est["equal_opportunity_difference"]) and np.isnan(est["average_odds_difference"])
    for m in SELECTION_METRICS:
        np.testing.assert_array_equal(np.isnan(e[m]["boot"][:2]), [m in ("equal_opportunity_difference",
                                                                      "average_odds_difference"), True])
    assert e["statistical_parity_difference"]["boot"][2] == pytest.approx(3 / 4)
    assert np.isnan(e["disparate_impact"]["boot"][2])
    # fewer than two groups with a known label: nothing to compare
    assert selection_metrics(y, yhat, np.array(["a"] * 8, dtype=object), "a", W) == {}
    assert selection_metrics(np.where(g == "b", np.nan, y), yhat, g, "b", W) == {}


def test_pearson_r_matches_scipy_and_refuses_degenerate_input():
    rng = np.random.default_rng(4)
    age = rng.uniform(20, 90, 60)
    err = 0.002 * age + rng.normal(0, 0.1, 60)
    ref = stats.pearsonr(age, err)
    ci = ref.confidence_interval(0.9)
    out = pearson_r(np.r_[age, np.nan], np.r_[err, 1.0], confidence=0.9)  # the incomplete pair is dropped
    assert out == {"r": pytest.approx(ref.statistic, abs=1e-12), "p_value": pytest.approx(ref.pvalue, abs=1e-12),
                   "ci_low": pytest.approx(ci.low, abs=1e-12), "ci_high": pytest.approx(ci.high, abs=1e-12),
                   "n": 60, "reason": None}
    three = pearson_r([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert three["n"] == 3 and three["r"] is None and three["ci_low"] is None and "at least 4" in three["reason"]
    const = pearson_r([1.0, 2.0, 3.0, 4.0], [5.0] * 4)
    assert const["r"] is None and const["p_value"] is None and "constant" in const["reason"]


def test_holm_worked_example_and_properties():
    # sorted: 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)
    np.testing.assert_allclose(holm([0.6, 0.9]), [1.0, 1.0])                  # 1.2 capped at 1
    adj = holm([0.02, None, 0.02, np.nan])                                     # m = 2 tests
    np.testing.assert_allclose(adj[[0, 2]], [0.04, 0.04])
    assert np.isnan(adj[[1, 3]]).all()
    rng = np.random.default_rng(5)
    p = rng.random(50) ** 3
    a = holm(p)
    order = np.argsort(p)
    assert (np.diff(a[order]) >= 0).all() and (a >= p).all() and (a <= 1).all()
    assert a[order[0]] == pytest.approx(min(1.0, 50 * p[order[0]]))
    with pytest.raises(ValueError):
        holm([0.5, 1.5])


def _change(p, est=0.0, bound=0.01, se=0.01, g1=0.0, g0=0.0):
    """A gap-change row as stats.seed_gap_change gives it (only the fields the verdict reads)."""
    return {"p_value": p, "estimate": est, "equivalence_bound": bound, "gap_private": g1, "gap_reference": g0,
            "difference": {"se": se, "df": None}, "sum": {"se": se, "df": None}, "rho": 0.0,
            "covers_training_randomness": False}


def test_gap_change_verdict():
    names = ["A/F", "A/M", "B/F", "B/M"]
    yes = gap_change_verdict([_change(0.4), _change(0.001, 0.01, g1=0.12), _change(0.5), _change(0.9)],
                             names=names)
    assert yes["answer"] == "yes" and "A/M" in yes["reason"]
    assert yes["p_value_adjusted"] == pytest.approx([1.0, 0.004, 1.0, 1.0])
    no = gap_change_verdict([_change(0.6, bound=0.012), _change(0.4, bound=0.015), _change(0.8, bound=0.01),
                             _change(0.9, bound=0.019)], names=names)
    assert no["answer"] == "no" and "B/M" in no["reason"]  # B/M is the least certain
    wide = gap_change_verdict([_change(0.2, bound=0.11), _change(0.9)] + [_change(0.6)] * 2, names=names)
    assert wide["answer"] == "inconclusive" and "A/F" in wide["reason"]
    # significant before Holm (0.03 <= 0.05) but not after (3 x 0.03 = 0.09): not "yes"
    holm_matters = [_change(0.03, bound=0.05), _change(0.04, bound=0.05), _change(0.9)]
    assert gap_change_verdict(holm_matters)["answer"] == "inconclusive"
    undefined = gap_change_verdict([_change(0.9), _change(None, est=None, bound=None)], names=["A/F", "A/M"])
    assert undefined["answer"] == "inconclusive" and "A/M" in undefined["reason"]
    assert undefined["p_value_adjusted"] == [0.9, None]
    assert gap_change_verdict([])["reason"].startswith("there are no")
    with pytest.raises(ValueError):
        gap_change_verdict([_change(0.5)], margin=0)
