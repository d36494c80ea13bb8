"""The audit engine's inference end to end: a 100-test family, blank patient ids, DeLong's p in log space, macro
disparate impact, the age-error r with a patient bootstrap, and how many resamples each parity interval used."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from privaudit.audit import run_audit, stats
from privaudit.audit.fairness import pearson_r_bootstrap, weighted_pearson_r
from privaudit.audit.stats import delong_test
from privaudit.audit.utility import Resampler
from privaudit.config import AuditConfig
from privaudit.predictions import BLANK_PATIENT_PREFIX, validate_predictions

N_LABELS, N_SITES = 10, 10


def _family_frames(*, planted: bool, n_per_site: int = 240, seed: int = 0):
    """Two models on 10 labels x 10 sites: 100 performance-parity gaps per model (each site against the rest).

    Both models have the same signal at every site; the private one is a different model (its own noise).
    ``planted``: at site s3, label l4, the private model's scores are pure noise (AUROC 0.5), widening that gap.
    """
    rng = np.random.default_rng(seed)
    n = n_per_site * N_SITES
    site = np.repeat([f"s{k}" for k in range(N_SITES)], n_per_site)
    split = np.where(rng.random(n) < 0.2, "val", "test")
    base = pd.DataFrame({"sample_id": [f"x{i}" for i in range(n)], "split": split, "site": site,
                         "patient_id": [f"p{i}" for i in range(n)]})
    private = base.copy()
    for j in range(N_LABELS):
        y = rng.integers(0, 2, n)
        latent = 1.6 * (y - 0.5)
        base[f"y_l{j}"] = private[f"y_l{j}"] = y
        base[f"p_l{j}"] = 1 / (1 + np.exp(-(latent + rng.normal(0, 1, n))))
        p = 1 / (1 + np.exp(-(latent + rng.normal(0, 1, n))))
        if planted and j == 4:
            hit = site == "s3"
            p[hit] = rng.random(int(hit.sum()))
        private[f"p_l{j}"] = p
    return {"private": private, "non_private": base}


@pytest.mark.parametrize("planted", [True, False])
def test_family_of_100_gaps_finds_the_planted_widening_and_only_it(planted):
    rep = run_audit(_family_frames(planted=planted), config=AuditConfig(n_boot=120))
    comp = rep.data["comparisons"]["private vs non_private"]
    verdict = comp["fairness_verdict"]["site"]
    assert verdict["family_size"] == N_LABELS * N_SITES
    assert verdict["resolution_limited"]  # 100 tests > 0.05 (120 + 1): the warning says so
    assert any("100 tests in the family" in w for w in rep.warnings)
    assert any("single training runs" in w for w in rep.warnings)
    if planted:
        assert verdict["answer"] == "yes"
        assert "site=s3 (l4)" in verdict["reason"].split("led by")[1]
        row = comp["fairness"]["site"]["l4"]["parity_gap_change"]["s3"]
        assert row["p_value"] < 0.05 / 100 and row["estimate"] > 0 and row["minimum_detectable_change"] > 0
    else:
        assert verdict["answer"] != "yes"
    mdc = verdict["minimum_detectable_change"]
    assert mdc["alpha_holm"] == pytest.approx(0.05 / 100) and 0 < mdc["smallest"] <= mdc["largest"] < 0.5
    rep.validate()


def _small(n=300, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "split": "test", "y_a": y,
                       "p_a": 1 / (1 + np.exp(-(2 * (y - 0.5) + rng.normal(0, 1, n)))),
                       "sex": rng.choice(["F", "M"], n), "age": rng.integers(20, 90, n).astype(float)})
    return df


def test_blank_patient_ids_are_each_their_own_patient_with_a_warning():
    df = _small()
    df["patient_id"] = [f"p{i // 2}" for i in range(len(df))]
    df.loc[:99, "patient_id"] = np.nan      # read from CSV, blanks arrive as NaN ...
    df.loc[100:119, "patient_id"] = "  "    # ... or as whitespace
    checked = validate_predictions(df, "t.csv")
    ids = checked["patient_id"]
    assert ids[:120].str.startswith(BLANK_PATIENT_PREFIX).all() and ids[:120].is_unique
    assert not (ids == "nan").any()
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=50))
    assert any("120 of 300 rows have a blank patient_id" in w for w in rep.warnings)
    units = rep.data["study"]["bootstrap"]["n_units"]
    assert units == 120 + (300 - 120) // 2  # 120 own units, the rest paired into patients
    # re-validating a validated table keeps them apart and does not warn twice over
    again = validate_predictions(checked, "t.csv")
    assert again["patient_id"].equals(checked["patient_id"])


def test_delong_p_value_never_underflows_to_zero():
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(3000), np.zeros(3000)].astype(int)
    good = y + rng.normal(0, 0.05, 6000)      # AUROC 1
    bad = rng.random(6000)                    # AUROC 0.5: z near 60, p near 1e-800
    res = delong_test(y, good, bad)
    assert res["p_value"] > 0 and res["log_p_value"] < np.log(1e-300)
    from scipy.stats import norm

    assert res["log_p_value"] == pytest.approx(np.log(2) + norm.logsf(abs(res["z"])), rel=1e-12)
    # a zero standard error with different AUROCs: degenerate, so nan, not 0
    y4 = np.array([0, 0, 1, 1])
    assert np.isnan(delong_test(y4, [0.1, 0.2, 0.8, 0.9], [0.9, 0.8, 0.2, 0.1])["p_value"])
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(6000)], "split": "test", "y_a": y, "p_a": 0.0})
    a = df.assign(p_a=1 / (1 + np.exp(-good * 8 + 4)))
    b = df.assign(p_a=bad)
    comp = run_audit({"a": a, "b": b}, reference="b", config=AuditConfig(n_boot=20)).data["comparisons"]["a vs b"]
    lab = comp["labels"]["a"]
    assert lab["delong_p_value"] > 0 and lab["delong_log10_p_value"] < -300


def test_macro_disparate_impact_is_the_ratio_of_mean_selection_rates():
    rng = np.random.default_rng(3)
    n = 600
    sex = rng.choice(["F", "M"], n)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "split": "test", "sex": sex})
    for lab, bias in (("a", 0.3), ("b", -0.1)):
        y = rng.integers(0, 2, n)
        df[f"y_{lab}"] = y
        df[f"p_{lab}"] = np.clip(0.5 * y + 0.25 + bias * (sex == "F") + rng.normal(0, 0.1, n), 0, 1)
    doc = run_audit({"m": df}, config=AuditConfig(n_boot=50, threshold=0.5)).data
    per = doc["models"]["m"]["fairness"]["sex"]
    rates = {s: [np.mean(df.loc[df.sex == s, f"p_{lab}"] >= 0.5) for lab in "ab"] for s in ("F", "M")}
    expected = np.mean(rates["F"]) / np.mean(rates["M"])
    assert per["macro"]["disparate_impact"]["estimate"] == pytest.approx(expected, rel=1e-12)
    mean_of_ratios = np.mean([per[lab]["disparate_impact"]["estimate"] for lab in "ab"])
    assert mean_of_ratios != pytest.approx(expected, rel=1e-3)  # the old macro differs here
    # the other metrics stay means over labels
    spd = np.mean([per[lab]["statistical_parity_difference"]["estimate"] for lab in "ab"])
    assert per["macro"]["statistical_parity_difference"]["estimate"] == pytest.approx(spd)


def test_weighted_pearson_r_equals_the_naive_resample_loop():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=80), rng.normal(size=80)
    y = y + 0.5 * x
    x[3] = np.nan
    r = Resampler(80, n_boot=40, seed=1, clusters=np.repeat(np.arange(40), 2))
    fast = weighted_pearson_r(x, y, r.weights)
    ok = np.isfinite(x)
    for b, w in enumerate(r.weights):
        idx = np.repeat(np.flatnonzero(ok), w[ok].astype(int))
        assert fast[b] == pytest.approx(np.corrcoef(x[idx], y[idx])[0, 1], abs=1e-12)
    const = weighted_pearson_r(np.ones(5), np.arange(5.0), np.ones((2, 5)))
    assert np.isnan(const).all()
    ci = pearson_r_bootstrap(x, y, r.weights)
    assert ci["n_boot_used"] == 40 and ci["ci_low"] < np.corrcoef(x[ok], y[ok])[0, 1] < ci["ci_high"]


def test_age_error_r_gets_a_patient_bootstrap_and_parity_counts_its_resamples():
    """Patients with four images each, sharing their age and (nearly) their errors: the per-image Fisher interval
    is too narrow; the patient bootstrap is wider. Each parity interval records how many resamples it used."""
    rng = np.random.default_rng(5)
    n_pat, per = 60, 4
    age = np.repeat(rng.integers(20, 90, n_pat), per).astype(float)
    y = rng.integers(0, 2, n_pat * per)
    err = np.repeat(rng.normal(0, 0.15, n_pat), per) + 0.002 * (age - 50) + rng.normal(0, 0.01, n_pat * per)
    p = np.clip(np.where(y == 1, 1 - 0.3 - err, 0.3 + err), 0.001, 0.999)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n_pat * per)], "split": "test", "y_a": y, "p_a": p,
                       "age": age, "patient_id": np.repeat([f"p{k}" for k in range(n_pat)], per),
                       "sex": np.repeat(rng.choice(["F", "M"], n_pat), per)})
    doc = run_audit({"m": df}, config=AuditConfig(n_boot=400)).data
    block = doc["models"]["m"]["fairness"]["pearson_r"]["age"]["a"]
    boot = block["bootstrap"]
    assert boot["clustered"] is True and boot["n_boot_used"] == 400
    assert boot["ci_high"] - boot["ci_low"] > 1.3 * (block["ci_high"] - block["ci_low"])
    parity = doc["models"]["m"]["fairness"]["sex"]["a"]["performance_parity"]
    assert all(0 < v["n_boot_used"] <= 400 for v in parity.values())
    gaps = doc["models"]["m"]["fairness"]["sex"]["a"]["groups"]
    assert set(parity) == set(gaps)
    assert roc_auc_score(y, p) > 0.5  # the model is informative, so the gaps are defined


def _sweep_frames(seeds, settings=("8", "inf"), n=300):
    """An epsilon sweep in-process: per setting and seed one prediction table on the same 300 test patients.
    Each seed has its own signal strength (training randomness), so the seeds' AUROCs (about 0.70 to 0.92) vary far
    more than the test-set noise of one model (bootstrap SD about 0.02)."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, n)
    base = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "split": "test", "y_a": y,
                         "patient_id": [f"p{i}" for i in range(n)], "sex": rng.choice(["F", "M"], n)})
    frames, runs = {}, {}
    for setting in settings:
        for s in seeds:
            strength = {0: 1.0, 1: 2.0, 2: 3.0}[s] * (0.8 if setting != "inf" else 1.0)
            df = base.copy()
            df["p_a"] = 1 / (1 + np.exp(-(strength * (y - 0.5) + rng.normal(0, 1, n))))
            name = f"eps{setting}_seed{s}"
            frames[name] = df
            runs[name] = ({"dp": False, "seed": s} if setting == "inf"
                          else {"dp": True, "target_epsilon": float(setting), "seed": s, "epsilon": float(setting),
                                "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0, "sample_rate": 0.01,
                                "steps": 100, "max_grad_norm": 1.0, "poisson_sampling": True})
    return frames, runs


def test_sweep_aggregates_cover_training_randomness_with_seeds():
    frames, runs = _sweep_frames([2, 0, 1])  # out of seed order: the aggregates sort by train.json's seed
    rep = run_audit(frames, runs=runs, is_sweep=True, config=AuditConfig(n_boot=200))
    agg = rep.data["study"]["aggregates"]
    assert agg["8"]["models"] == ["eps8_seed0", "eps8_seed1", "eps8_seed2"]
    macro = agg["8"]["macro_auroc"]
    assert macro["covers_training_randomness"] is True and macro["n_seeds"] == 3 and macro["warning"] is None
    assert macro["var_between"] > macro["var_shared_test"] > 0
    assert macro["ci_low"] < macro["mean"] < macro["ci_high"]
    # wider than any seed's test-patients-only interval (and so than that of the mean of the seeds' resamples)
    widest_single = max(m["utility"]["macro_auroc"]["ci_high"] - m["utility"]["macro_auroc"]["ci_low"]
                        for n, m in rep.data["models"].items() if n.startswith("eps8"))
    assert macro["ci_high"] - macro["ci_low"] > 2 * widest_single
    vs = agg["8"]["vs_reference"]
    assert vs["reference"] == "inf" and vs["paired"] is True
    assert vs["macro_auroc"]["covers_training_randomness"] and vs["macro_auroc"]["estimate"] < 0
    assert vs["macro_auroc"]["n_seeds"] == 3 or vs["macro_auroc"]["n_seeds"] == [3, 3]
    fair = agg["8"]["fairness_vs_reference"]
    assert fair["fairness_verdict"]["sex"]["covers_training_randomness"] is True
    row = fair["fairness"]["sex"]["a"]["parity_gap_change"]
    assert len(row) == 1 and next(iter(row.values()))["minimum_detectable_change"] is not None
    assert "inf" not in agg or "vs_reference" not in agg["inf"]
    assert not any(stats.NO_TRAINING_RANDOMNESS in w for w in rep.warnings)
    rep.validate()


def test_sweep_with_one_seed_says_it_covers_test_patients_only():
    frames, runs = _sweep_frames([0])
    rep = run_audit(frames, runs=runs, is_sweep=True, config=AuditConfig(n_boot=200))
    macro = rep.data["study"]["aggregates"]["8"]["macro_auroc"]
    assert macro["covers_training_randomness"] is False and macro["warning"] == stats.NO_TRAINING_RANDOMNESS
    assert macro["ci_low"] < macro["mean"] < macro["ci_high"]
    assert f"sweep: {stats.NO_TRAINING_RANDOMNESS}" in rep.warnings
    rep.validate()


def test_sweep_trend_over_settings_with_seeds():
    frames, runs = _sweep_frames([0, 1, 2], settings=("1", "8", "inf"))
    rep = run_audit(frames, runs=runs, is_sweep=True, config=AuditConfig(n_boot=100))
    trend = rep.data["study"]["trade_offs"]["trend"]
    assert trend["settings"] == ["1", "8"] and trend["paired"] is True
    t = trend["macro_auroc"]
    assert t["covers_training_randomness"] is True and t["slope"] is not None and t["slope_ci_low"] < t["slope_ci_high"]
    assert 0 < t["p_value"] <= 1
    rep.validate()
