"""The audit engine against reference implementations: scikit-learn, fairlearn, and the naive bootstrap loop."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from privaudit.audit import AuditReport, run_audit
from privaudit.audit.utility import (Resampler, auroc, counts_from_indices, draw_indices, paired_p_value,
                                     percentile_ci, weighted_auroc)
from privaudit.config import AuditConfig
from privaudit.errors import DataError

LABELS = ("a", "b")


def make_predictions(n=400, seed=0, shift=1.0, patients=None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M"], n)
    age = rng.integers(18, 95, n)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "split": rng.choice(["train", "val", "test"], n,
                                                                                        p=[0.5, 0.1, 0.4])})
    df["member"] = (df["split"] == "train").astype(int)
    df["patient_id"] = [f"p{i // 2}" for i in range(n)] if patients == "pairs" else df["sample_id"]
    for j, lab in enumerate(LABELS):
        y = rng.integers(0, 2, n)
        # the signal is weaker for men, so group AUROCs differ
        strength = shift * np.where(sex == "F", 1.0, 0.4) * (1 + j)
        df[f"y_{lab}"] = y
        df[f"p_{lab}"] = 1 / (1 + np.exp(-(strength * (y - 0.5) + rng.normal(0, 1, n))))
    df.loc[3, "y_a"] = np.nan  # an unknown label is masked
    df["loss"] = rng.random(n)
    df["sex"], df["age"] = sex, age
    return df


def test_auroc_equals_sklearn_including_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 200)
        s = np.round(rng.random(200) + 0.5 * y, 1)  # heavy ties
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc(np.ones(10), np.arange(10)))


def test_weighted_bootstrap_equals_the_naive_loop_on_the_same_indices():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 2)
    idx = draw_indices(300, 50, seed=7)
    fast = weighted_auroc(y, s, counts_from_indices(idx, 300))
    naive = np.array([roc_auc_score(y[i], s[i]) for i in idx])
    assert np.max(np.abs(fast - naive)) < 1e-9


def test_resampler_clusters_patients():
    patients = np.repeat(np.arange(50), 2)  # two images per patient
    r = Resampler(100, n_boot=200, seed=0, clusters=patients)
    assert r.clustered and r.n_units == 50
    w = r.weights
    assert np.array_equal(w[:, 0::2], w[:, 1::2])  # both images of a patient always move together
    assert np.all(w.sum(axis=1) == 100)
    assert not Resampler(100, n_boot=5, seed=0, clusters=np.arange(100)).clustered


def test_percentile_ci_agrees_with_scipy_bootstrap():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    s = rng.random(400) + 0.5 * y
    r = Resampler(400, n_boot=4000, seed=11)
    lo, hi, _ = percentile_ci(weighted_auroc(y, s, r.weights), 0.95)
    ref = bootstrap((y, s), lambda a, b: roc_auc_score(a, b), paired=True, vectorized=False, n_resamples=2000,
                    method="percentile", random_state=5).confidence_interval
    # Monte Carlo error of each 2.5% quantile is about 0.004 here (4000 and 2000 resamples)
    assert lo == pytest.approx(ref.low, abs=0.015) and hi == pytest.approx(ref.high, abs=0.015)


def test_paired_p_value_formula():
    assert paired_p_value(np.array([1.0, 2.0, 3.0])) == pytest.approx(1 / 4)  # never 0
    assert paired_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(3 / 5)
    assert paired_p_value(np.zeros(9)) == 1.0
    assert paired_p_value(np.array([np.nan])) is None


def test_percentile_ci_coverage_on_a_known_auroc():
    """Scores N(0,1) vs N(d,1) have AUROC Phi(d / sqrt 2); the 95% CI should cover it at about the nominal rate."""
    from scipy.stats import binom, norm

    d, reps, cover = 1.0, 60, 0
    truth = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(4)
    for k in range(reps):
        y = np.r_[np.zeros(150), np.ones(150)]
        s = np.r_[rng.normal(0, 1, 150), rng.normal(d, 1, 150)]
        lo, hi, _ = percentile_ci(weighted_auroc(y, s, Resampler(300, n_boot=400, seed=k).weights), 0.95)
        cover += lo <= truth <= hi
    # a correct method falls below this count less than 1 run in 1,000 (binomial lower limit, rate 0.93)
    assert cover >= binom.ppf(0.001, reps, 0.93)


def test_run_audit_matches_sklearn_and_fairlearn():
    from fairlearn.metrics import MetricFrame

    df = make_predictions()
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=200))
    rep.validate()
    test = df[df["split"] == "test"]
    for lab in LABELS:
        known = test[f"y_{lab}"].notna()
        res = rep.models["m"]["utility"]["labels"][lab]
        assert res["auroc"]["estimate"] == pytest.approx(roc_auc_score(test.loc[known, f"y_{lab}"],
                                                                       test.loc[known, f"p_{lab}"]))
        assert res["n"] == known.sum() and res["n_pos"] == test.loc[known, f"y_{lab}"].sum()
        mf = MetricFrame(metrics=roc_auc_score, y_true=test.loc[known, f"y_{lab}"], y_pred=test.loc[known, f"p_{lab}"],
                         sensitive_features=test.loc[known, "sex"])
        groups = rep.models["m"]["fairness"]["sex"][lab]["groups"]
        for g in ("F", "M"):
            assert groups[g]["auroc"]["estimate"] == pytest.approx(mf.by_group[g])
        pp = rep.models["m"]["fairness"]["sex"][lab]["performance_parity"]
        assert pp["F"]["estimate"] == pytest.approx(mf.by_group["F"] - mf.by_group["M"])  # two groups: F minus M
        assert pp["F"]["ci_low"] < pp["F"]["estimate"] < pp["F"]["ci_high"]
    macro = rep.models["m"]["utility"]["macro_auroc"]["estimate"]
    assert macro == pytest.approx(np.mean([rep.models["m"]["utility"]["labels"][x]["auroc"]["estimate"] for x in LABELS]))
    assert "age_group" in rep.models["m"]["fairness"]


def test_performance_parity_with_several_groups_is_n_weighted():
    df = make_predictions(n=1200, seed=5)
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=50))
    fa = rep.models["m"]["fairness"]["age_group"]["a"]
    aucs = {g: v["auroc"]["estimate"] for g, v in fa["groups"].items()}
    ns = {g: v["n"] for g, v in fa["groups"].items()}
    g = "81+"
    others = [h for h in aucs if h != g]
    expected = aucs[g] - np.average([aucs[h] for h in others], weights=[ns[h] for h in others])
    assert fa["performance_parity"][g]["estimate"] == pytest.approx(expected)


def test_paired_comparison_uses_the_same_resamples():
    a = make_predictions(seed=0, shift=2.0)
    b = a.copy()
    b[[f"p_{x}" for x in LABELS]] = make_predictions(seed=0, shift=0.5)[[f"p_{x}" for x in LABELS]]
    rep = run_audit({"strong": a, "weak": b}, reference="weak", config=AuditConfig(n_boot=300))
    c = rep.data["comparisons"]["strong vs weak"]
    ua = rep.models["strong"]["utility"]["macro_auroc"]["estimate"]
    ub = rep.models["weak"]["utility"]["macro_auroc"]["estimate"]
    assert c["macro_auroc_difference"]["estimate"] == pytest.approx(ua - ub)
    assert c["macro_auroc_difference"]["ci_low"] > 0 and c["p_value"] < 0.01
    # identical models: the paired difference is exactly zero in every resample
    same = run_audit({"x": a, "y": a.copy()}, reference="y", config=AuditConfig(n_boot=100))
    d = same.data["comparisons"]["x vs y"]["macro_auroc_difference"]
    assert d["ci_low"] == d["ci_high"] == 0.0


def test_json_roundtrip_and_tidy_frame(tmp_path):
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=50))
    rep.to_json(tmp_path / "audit.json")
    back = AuditReport.from_json(tmp_path / "audit.json")
    assert back.data == json.loads(rep.to_json())
    frame = back.to_frame()
    assert {"model", "metric", "label", "group", "estimate", "ci_low", "ci_high"} <= set(frame.columns)
    assert ((frame["metric"] == "auroc") & (frame["label"] == "macro") & frame["group"].isna()).sum() == 1
    newer = tmp_path / "new.json"
    newer.write_text('{"schema_version": 99}')
    with pytest.raises(DataError, match="newer"):
        AuditReport.from_json(newer)
    (tmp_path / "trunc.json").write_text('{"schema_version": 1, "stu')
    with pytest.raises(DataError, match="not valid JSON"):
        AuditReport.from_json(tmp_path / "trunc.json")


def test_single_class_group_gives_null_and_a_warning_not_a_crash():
    df = make_predictions()
    test_m = (df["split"] == "test") & (df["sex"] == "M")
    df.loc[test_m, "y_b"] = 1
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=50))
    grp = rep.models["m"]["fairness"]["sex"]["b"]["groups"]["M"]["auroc"]
    assert grp["estimate"] is None and grp["ci_low"] is None
    assert any("sex=M" in w and "one class" in w for w in rep.warnings)
    assert "NaN" not in rep.to_json()


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.drop(columns=["p_a", "p_b"]), "p_<label>"),
    (lambda d: d.assign(p_a=d["p_a"].where(d.index != 5, 1.5)), "p_a"),
    (lambda d: d.assign(p_a=d["p_a"].where(d.index != 5, np.nan)), "NaN"),
    (lambda d: d.assign(y_b=d["y_b"].astype(object).where(d.index != 2, "yes")), "y_b"),
    (lambda d: d.assign(age=d["age"].astype(object).where(d.index != 2, "old")), "age"),
    (lambda d: d.iloc[0:0], "no rows"),
    (lambda d: d.assign(split="train"), "no rows with split 'test'"),
])
def test_bad_prediction_tables(mutate, needle):
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace("<", "<")):
        run_audit({"m": mutate(make_predictions())}, config=AuditConfig(n_boot=10))


def test_mismatched_models_are_refused():
    a, b = make_predictions(seed=0), make_predictions(seed=0)
    b.loc[b["split"] == "test", "sample_id"] = b.loc[b["split"] == "test", "sample_id"] + "x"
    with pytest.raises(DataError, match="same test samples"):
        run_audit({"a": a, "b": b}, config=AuditConfig(n_boot=10))


def test_no_members_gives_null_attacks_with_a_warning():
    df = make_predictions()
    df["member"] = 0
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=10))
    assert rep.models["m"]["privacy"]["attacks"] is None
    assert any("attacks are null" in w and "0 members" in w for w in rep.warnings)
    rep.validate()
    full = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    loss = full.models["m"]["privacy"]["attacks"]["loss"]
    assert loss["n_members"] == loss["n_nonmembers"] > 0  # balanced
    assert set(loss["tpr_at_fpr"]) == {"0.001", "0.01", "0.1"}


def _aif360():
    import os
    import warnings

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import aif360.sklearn.metrics as m
    return m


def test_selection_metrics_in_the_audit_equal_aif360_at_the_youden_threshold():
    m = _aif360()
    df = make_predictions(n=1500, seed=8)
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=50))
    u = rep.models["m"]["utility"]["labels"]["a"]
    thr = u["youden"]["threshold"]
    assert u["youden"]["threshold_source"] == "val"
    test = df[(df["split"] == "test") & df["y_a"].notna()]
    y = pd.Series(test["y_a"].astype(int).to_numpy(), index=pd.Index(test["sex"].to_numpy(), name="sex"))
    yhat = (test["p_a"].to_numpy() >= thr).astype(int)
    fa = rep.models["m"]["fairness"]["sex"]["a"]
    assert fa["statistical_parity_difference"]["privileged"] == "M"
    assert fa["statistical_parity_difference"]["estimate"] == pytest.approx(
        m.statistical_parity_difference(y, yhat, prot_attr="sex", priv_group="M", pos_label=1))
    assert fa["disparate_impact"]["estimate"] == pytest.approx(
        m.disparate_impact_ratio(y, yhat, prot_attr="sex", priv_group="M", pos_label=1))
    assert fa["equal_opportunity_difference"]["estimate"] == pytest.approx(
        m.equal_opportunity_difference(y, yhat, prot_attr="sex", priv_group="M", pos_label=1))
    assert fa["average_odds_difference"]["estimate"] == pytest.approx(
        m.average_odds_difference(y, yhat, prot_attr="sex", priv_group="M", pos_label=1))
    # sensitivity at the threshold equals the confusion matrix computed directly
    assert u["youden"]["sensitivity"]["estimate"] == pytest.approx(yhat[y.to_numpy() == 1].mean())


def test_threshold_on_test_without_val_warns_and_fixed_threshold_is_used():
    df = make_predictions()
    df.loc[df["split"] == "val", "split"] = "train"
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=20))
    assert rep.models["m"]["utility"]["labels"]["a"]["youden"]["threshold_source"] == "test"
    assert any("optimistic" in w for w in rep.warnings)
    fixed = run_audit({"m": df}, config=AuditConfig(n_boot=20, threshold=0.5))
    assert fixed.models["m"]["utility"]["labels"]["a"]["youden"]["threshold"] == 0.5


def test_intersectional_attributes_and_unknown_attribute():
    df = make_predictions(n=2000, seed=9)
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=20, attributes=("sex*age_group",)))
    groups = rep.models["m"]["fairness"]["sex*age_group"]["a"]["groups"]
    assert "F|81+" in groups and set(rep.models["m"]["fairness"]) == {"sex*age_group", "pearson_r"}
    with pytest.raises(DataError, match="attribute 'site' is not in the prediction file"):
        run_audit({"m": df}, config=AuditConfig(n_boot=5, attributes=("site",)))


def test_bca_interval_is_reported_and_close_to_percentile():
    df = make_predictions(n=600, seed=10)
    pct = run_audit({"m": df}, config=AuditConfig(n_boot=400)).models["m"]["utility"]["labels"]["a"]["auroc"]
    bca = run_audit({"m": df}, config=AuditConfig(n_boot=400, ci_method="bca")).models["m"]["utility"]["labels"]["a"]["auroc"]
    assert bca["ci_method"] == "bca" and pct["ci_method"] == "percentile"
    assert bca["ci_low"] < bca["estimate"] < bca["ci_high"]
    assert abs(bca["ci_low"] - pct["ci_low"]) < 0.03 and abs(bca["ci_high"] - pct["ci_high"]) < 0.03


def test_dp_amplification_verdict_finds_a_planted_widening():
    """A 'private' model that loses all signal for men only widens the sex gap: the answer must be yes;
    an identical copy must not be yes."""
    base = make_predictions(n=3000, seed=11, shift=2.0)
    worse = base.copy()
    rng = np.random.default_rng(0)
    men = worse["sex"] == "M"
    for lab in LABELS:
        worse.loc[men, f"p_{lab}"] = rng.random(int(men.sum()))
    rep = run_audit({"private": worse, "non_private": base}, config=AuditConfig(n_boot=300))
    comp = rep.data["comparisons"]["private vs non_private"]
    assert comp["fairness_verdict"]["sex"]["answer"] == "yes"
    assert comp["labels"]["a"]["delong_p_value"] < 0.01
    same = run_audit({"private": base.copy(), "non_private": base}, config=AuditConfig(n_boot=100))
    v = same.data["comparisons"]["private vs non_private"]["fairness_verdict"]["sex"]
    assert v["answer"] == "no"  # identical models: every change is exactly 0


def test_trade_offs_correlate_log_epsilon_across_dp_models():
    from scipy.stats import pearsonr

    base = make_predictions(n=800, seed=12, shift=2.0)
    rng = np.random.default_rng(1)
    preds, runs = {}, {}
    for k, eps in enumerate([0.5, 1.0, 2.0, 4.0, 8.0]):
        df = base.copy()
        noise = 2.0 / eps  # less privacy, less noise: AUROC rises with log(epsilon)
        for lab in LABELS:
            df[f"p_{lab}"] = 1 / (1 + np.exp(-(np.log(df[f"p_{lab}"] / (1 - df[f"p_{lab}"]))
                                               + rng.normal(0, noise, len(df)))))
        preds[f"eps={eps}"] = df
        runs[f"eps={eps}"] = {"dp": True, "epsilon": eps, "delta": 1e-5, "accountant": "rdp",
                              "noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0,
                              "poisson_sampling": True}
    rep = run_audit(preds, runs=runs, config=AuditConfig(n_boot=20))
    t = rep.data["study"]["trade_offs"]
    macro = [rep.models[n]["utility"]["macro_auroc"]["estimate"] for n in t["models"]]
    expected = pearsonr(np.log([0.5, 1, 2, 4, 8]), macro)
    assert t["macro_auroc"]["r"] == pytest.approx(expected.statistic) and t["macro_auroc"]["r"] > 0.8
    assert t["macro_auroc"]["n"] == 5
    assert "F" in t["performance_parity"]["sex"]["macro"]
    rep.validate()
    few = run_audit({k: preds[k] for k in list(preds)[:3]}, runs=runs, config=AuditConfig(n_boot=10))
    assert few.data["study"]["trade_offs"]["macro_auroc"]["r"] is None
    assert any("log(epsilon) vs macro AUROC" in w for w in few.warnings)


def test_bad_prediction_file_from_the_cli(tmp_path):
    from conftest import invoke

    df = make_predictions()
    df.loc[4, "p_a"] = 1.7
    f = tmp_path / "preds.csv"
    df.to_csv(f, index=False)
    res = invoke("audit", "--predictions", f, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "p_a" in res.stderr and "[0, 1]" in res.stderr
    assert not (tmp_path / "out").exists()


def test_audit_finds_the_effects_planted_in_the_synthetic_cohort(tmp_path):
    """Train a small model on the synthetic cohort, audit it, and check the directions cohort.json promises:
    the oldest patients' findings are hardest (lowest AUROC, negative parity gap), and women's effusions too."""
    import json

    import torch

    from privaudit.backends import create_backend
    from privaudit.config import DPConfig, TrainConfig
    from privaudit.data.manifest import load_manifest
    from privaudit.data.synth_cxr import synthesize_cxr
    from privaudit.predictions import read_predictions
    from privaudit.tasks import create_task

    torch.set_num_threads(1)
    manifest_path = synthesize_cxr(tmp_path / "c", n=1500, image_size=32, seed=2)
    planted = {e["name"]: e for e in json.loads((tmp_path / "c" / "cohort.json").read_text())["planted_effects"]}
    cfg = TrainConfig(width=8, image_size=32, batch_size=32, physical_batch_size=32, epochs=6, lr=3e-3,
                      dp=DPConfig(enabled=False))
    create_backend("opacus").train(load_manifest(manifest_path, task=create_task("cxr")), cfg, tmp_path / "m",
                                   quiet=True)
    rep = run_audit({"m": read_predictions(tmp_path / "m" / "predictions.csv")}, config=AuditConfig(n_boot=200))
    fair = rep.models["m"]["fairness"]

    oldest = planted["age_image_quality"]["expected_lower_auroc"]
    ages = {g: v["auroc"]["estimate"] for g, v in fair["age_group"]["macro"]["groups"].items()
            if not v.get("suppressed") and v["auroc"]["estimate"] is not None}
    assert min(ages, key=ages.get) == oldest
    assert fair["age_group"]["macro"]["performance_parity"][oldest]["ci_high"] < 0

    female = planted["female_effusion_subtlety"]["expected_lower_auroc"]
    eff = {g: v["auroc"]["estimate"] for g, v in fair["sex"]["pleural_effusion"]["groups"].items()}
    assert eff[female] < eff["M" if female == "F" else "F"]


def test_accountant_cross_checks_and_one_sided_flags():
    from opacus.accountants import create_accountant

    run = {"dp": True, "epsilon": None, "delta": 2e-4, "accountant": "prv", "noise_multiplier": 0.577,
           "sample_rate": 0.0303, "steps": 165, "max_grad_norm": 1.0, "poisson_sampling": True}
    acc = create_accountant("prv")
    acc.history = [(0.577, 0.0303, 165)]
    run["epsilon"] = acc.get_epsilon(2e-4)
    rep = run_audit({"m": make_predictions()}, runs={"m": run}, config=AuditConfig(n_boot=10))
    block = rep.models["m"]["privacy"]["accountant"]
    checks = block["cross_checks"]
    assert checks["prv"] == pytest.approx(run["epsilon"], rel=1e-6)
    assert checks["dp_accounting_pld"] == pytest.approx(checks["prv"], rel=0.02)
    assert checks["rdp"] > checks["prv"] and checks["dp_accounting_rdp"] == pytest.approx(checks["rdp"], rel=0.01)
    # GDP (a CLT approximation) comes out below the tight accountants here and is flagged; RDP above is not
    assert checks["gdp"] < checks["prv"]
    assert any(f.startswith("accountant gdp") for f in block["flags"])
    assert not any("rdp" in f for f in block["flags"])
    rep.validate()


def test_a_minimal_file_from_another_tool_is_audited_with_warnings():
    """Only test rows, one label with an unknown cell, no member/patient_id/loss columns, 'validation' split
    naming, and attribute values privaudit does not use: audited, with warnings, and no Python warning."""
    import warnings

    rng = np.random.default_rng(0)
    n = 400
    df = pd.DataFrame({"sample_id": np.arange(n), "split": ["validation"] * 100 + ["test"] * 300,
                       "y_effusion": rng.integers(0, 2, n).astype(float), "sex": rng.choice(["female", "male"], n),
                       "age": rng.integers(20, 90, n), "race": rng.choice(["A", "B", "C"], n)})
    df["p_effusion"] = np.clip(0.3 * df["y_effusion"] + 0.7 * rng.random(n), 0, 1)
    df.loc[150, "y_effusion"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = run_audit({"theirs": df}, config=AuditConfig(n_boot=50))
    m = rep.models["theirs"]
    assert m["utility"]["labels"]["effusion"]["n"] == 299
    assert m["utility"]["labels"]["effusion"]["youden"]["threshold_source"] == "val"
    assert m["privacy"]["attacks"] is None and any("no 'member' column" in w for w in rep.warnings)
    assert set(m["fairness"]) == {"sex", "age_group", "race", "pearson_r"}
    assert m["fairness"]["sex"]["effusion"]["statistical_parity_difference"]["privileged"] == "male"
    assert m["fairness"]["pearson_r"]["age"]["macro"]["n"] == 299
    rep.validate()
