"""Membership-inference attacks in the run's privacy unit: patients (issue 17).

Simulated prediction tables: patients with 1 to 6 images whose per-image scores share a patient effect
(correlated within the patient). With membership drawn independently of the scores the per-patient attack AUC is
about 0.5 and spreads as the Mann-Whitney null for the number of *patients*; with the members' patient effect
shifted the attack finds them. The engine's per-patient figures equal a naive loop over patients, LiRA and RMIA's
per-patient scores equal a naive loop over the shadows, and a CLI study's audit.json attacks count patients.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from privaudit.audit import run_audit
from privaudit.audit.attacks import create_attack
from privaudit.audit.privacy import attack_unit, unit_codes, unit_mean, unit_values
from privaudit.config import AuditConfig

CONFIG = AuditConfig(n_boot=200, attributes=("sex",))


def cohort(n_patients: int, *, seed: int, shift: float = 0.0, member_share: float = 0.5,
           balanced: bool = False) -> pd.DataFrame:
    """A prediction table with 1 to 6 images per patient. Per-image loss = 1 + patient effect N(0, 1) + image
    noise N(0, 0.5), lowered by ``shift`` for every image of a member patient. Membership (and sex) is drawn per
    patient, independently of the effects; ``balanced``: exactly half of the patients are members."""
    rng = np.random.default_rng(seed)
    k = rng.integers(1, 7, n_patients)
    member_p = (rng.permutation(n_patients) < n_patients // 2 if balanced
                else rng.random(n_patients) < member_share)
    effect = rng.normal(0, 1, n_patients)
    n = int(k.sum())
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)],
                       "patient_id": np.repeat([f"p{i}" for i in range(n_patients)], k),
                       "split": np.repeat(np.where(member_p, "train", rng.choice(["val", "test"], n_patients)), k),
                       "member": np.repeat(member_p.astype(int), k),
                       "sex": np.repeat(rng.choice(["F", "M"], n_patients), k)})
    df["y_a"] = rng.integers(0, 2, n).astype(float)
    df["p_a"] = np.clip(rng.beta(2, 2, n), 0.01, 0.99)
    df["loss"] = 1.0 + np.repeat(effect - shift * member_p, k) + rng.normal(0, 0.5, n)
    return df


def naive_patient_scores(df: pd.DataFrame, column: str, sign: float = -1.0) -> pd.DataFrame:
    """One row per patient: its membership and the mean of ``sign * column`` over its images, by a plain loop."""
    rows = []
    for pid in dict.fromkeys(df["patient_id"]):
        mine = df[df["patient_id"] == pid]
        total = 0.0
        for v in mine[column]:
            total += sign * v
        rows.append({"patient_id": pid, "member": int(mine["member"].iloc[0]), "score": total / len(mine),
                     "sex": mine["sex"].mode().iloc[0]})
    return pd.DataFrame(rows)


# ---- the null: membership independent of the scores ----------------------------------------------------------
def test_null_per_patient_auc_is_one_half_and_spreads_as_the_patient_count_says():
    """400 simulated cohorts (80 patients, about 280 correlated images each): the per-patient AUC (the mean of
    each patient's image scores, ``unit_mean``) averages 0.5 within 3 standard errors, and its spread matches
    the Mann-Whitney null for the number of patients (within 15%). Images counted as independent would predict
    a spread about half as wide, which the same check rejects."""
    reps, aucs, n_images = 400, [], []
    for r in range(reps):
        df = cohort(80, seed=1000 + r)
        codes, uniq = unit_codes(df["patient_id"])
        s = unit_mean(-df["loss"].to_numpy(), codes, len(uniq))
        y = unit_mean(df["member"].to_numpy(), codes, len(uniq))
        aucs.append(roc_auc_score(y, s))
        n_images.append((len(df), int(df["member"].sum())))
    aucs = np.array(aucs)
    # the Mann-Whitney null sd for 40 member and 40 non-member patients (the expected split)
    sd_patients = np.sqrt((80 + 1) / (12 * 40 * 40))
    assert abs(aucs.mean() - 0.5) < 3 * aucs.std(ddof=1) / np.sqrt(reps), aucs.mean()
    assert abs(aucs.std(ddof=1) / sd_patients - 1) < 0.15, (aucs.std(ddof=1), sd_patients)
    m, m1 = np.mean(n_images, axis=0)
    sd_images = np.sqrt((m + 1) / (12 * m1 * (m - m1)))
    assert aucs.std(ddof=1) > 1.5 * sd_images


def test_null_engine_attacks_patients_and_their_intervals_hold_one_half():
    """Through the audit engine: 12 null cohorts of 150 patients. Every attack scores patients (n counts them),
    the loss attack's AUC averages 0.5 within 3 standard errors (the Mann-Whitney null sd for k and k patients,
    over sqrt(12)), and its patient-bootstrap 95% interval holds 0.5 in at least 10 of the 12."""
    aucs, covered, sds = [], 0, []
    for r in range(12):
        df = cohort(150, seed=50 + r)
        doc = run_audit({"m": df}, config=AuditConfig(n_boot=200, seed=r)).data
        attacks = doc["models"]["m"]["privacy"]["attacks"]
        patients = df.groupby("patient_id")["member"].first()
        k = int(min(patients.sum(), (patients == 0).sum()))
        for a in attacks.values():
            assert a["unit"] == "patient" and a["n_members"] == a["n_nonmembers"] == k
        loss = attacks["loss"]
        aucs.append(loss["auc"])
        sds.append(np.sqrt((2 * k + 1) / (12 * k * k)))
        covered += loss["auc_ci"]["ci_low"] <= 0.5 <= loss["auc_ci"]["ci_high"]
        assert loss["auc_ci"]["cluster"] is True
    assert abs(np.mean(aucs) - 0.5) < 3 * np.sqrt(np.mean(np.square(sds)) / len(aucs)), aucs
    assert covered >= 10, aucs


def test_a_known_member_shift_is_detected_per_patient():
    """Member patients' losses lowered by 1 (a patient's mean loss has an sd of about 1.1): the per-patient
    loss attack's AUC is near the closed form Phi(shift / sqrt(2 var)) and its interval excludes 0.5; the
    trained attack finds it too."""
    df = cohort(300, seed=7, shift=1.0)
    attacks = run_audit({"m": df}, config=CONFIG).data["models"]["m"]["privacy"]["attacks"]
    loss = attacks["loss"]
    assert loss["unit"] == "patient" and loss["auc_ci"]["ci_low"] > 0.6
    assert attacks["trained"]["auc_ci"]["ci_low"] > 0.55
    # the patient mean of k images has variance 1 + 0.25 / k; averaged over k = 1..6
    var = 1 + 0.25 * np.mean(1 / np.arange(1, 7))
    assert loss["auc"] == pytest.approx(norm.cdf(1.0 / np.sqrt(2 * var)), abs=0.06)


# ---- the aggregation rule against a naive loop ------------------------------------------------------------------
def test_engine_per_patient_figures_equal_a_naive_loop_over_patients():
    """With as many member as non-member patients every patient is attacked: the loss and confidence attacks'
    AUC, counts and by-sex counts equal a plain loop (mean of the patient's image scores, sklearn's AUC), and the
    trained attack is the cross-validated regression on the patients' mean features."""
    from privaudit.audit.privacy import loss_attack_scores, trained_attack_scores

    df = cohort(120, seed=3, shift=0.3, balanced=True)
    doc = run_audit({"m": df}, config=CONFIG).data
    attacks = doc["models"]["m"]["privacy"]["attacks"]
    naive = naive_patient_scores(df, "loss")
    assert attacks["loss"]["n_members"] == attacks["loss"]["n_nonmembers"] == 60
    assert attacks["loss"]["auc"] == pytest.approx(roc_auc_score(naive["member"], naive["score"]), abs=1e-12)
    df["conf"] = loss_attack_scores(df, ["a"])["confidence"]
    conf = naive_patient_scores(df, "conf", sign=1.0)
    assert attacks["confidence"]["auc"] == pytest.approx(roc_auc_score(conf["member"], conf["score"]), abs=1e-12)
    for sex in ("F", "M"):
        mine = naive[naive["sex"] == sex]
        got = attacks["loss"]["by_group"]["sex"][sex]
        assert (got["n_members"], got["n_nonmembers"]) == (int(mine["member"].sum()), int((mine["member"] == 0).sum()))
        assert got["auc"] == pytest.approx(roc_auc_score(mine["member"], mine["score"]), abs=1e-12)
    # the trained attack: members first, in the engine's draw order (sorted patient positions of first appearance)
    order = np.r_[np.flatnonzero(naive["member"] == 1), np.flatnonzero(naive["member"] == 0)]
    df["ent"] = loss_attack_scores(df, ["a"])["entropy"]
    feats = np.column_stack([naive["score"], conf["score"], naive_patient_scores(df, "ent", sign=1.0)["score"]])
    y = np.r_[np.ones(60), np.zeros(60)]
    trained = trained_attack_scores(feats[order], y, seed=CONFIG.seed)
    assert attacks["trained"]["auc"] == pytest.approx(roc_auc_score(y, trained), abs=1e-12)


def test_unit_mean_and_unit_values_equal_loops():
    rng = np.random.default_rng(0)
    ids = rng.choice([f"p{i}" for i in range(30)], 200)
    v = rng.normal(size=(3, 200))
    v[0, :20] = np.nan  # non-finite values are left out of a unit's mean
    codes, uniq = unit_codes(ids)
    got = unit_mean(v, codes, len(uniq))
    for j, pid in enumerate(uniq):
        for i in range(3):
            vals = [x for x, p in zip(v[i], ids) if p == pid and np.isfinite(x)]
            assert (np.isnan(got[i, j]) if not vals else got[i, j] == pytest.approx(sum(vals) / len(vals)))
    groups = np.array([None, "a", "b", "a", "b", "b", None], dtype=object)
    vals, varying = unit_values(groups, np.array([0, 0, 1, 1, 1, 2, 2]), 3)
    assert vals.tolist() == ["a", "b", "b"] and varying == 1   # patient 1: b twice, a once


def _shadow_stats(df: pd.DataFrame, n_shadows: int, seed: int) -> list[pd.DataFrame]:
    """Fake shadow statistics: each shadow includes a random half of the patients (whole patients); the
    statistic rises by 1 for included images."""
    from privaudit.audit.privacy import logit_confidence, true_label_probability

    rng = np.random.default_rng(seed)
    patients = df["patient_id"].unique()
    base = logit_confidence(df, ["a"])
    out = []
    for _ in range(n_shadows):
        inside = set(patients[rng.random(len(patients)) < 0.5])
        inn = df["patient_id"].isin(inside).to_numpy().astype(int)
        stat = base + inn + rng.normal(0, 0.3, len(df))
        prob = true_label_probability(df, ["a"]) * np.exp(0.2 * inn + rng.normal(0, 0.1, len(df)))
        out.append(pd.DataFrame({"in": inn, "logit_confidence": stat, "true_prob": np.clip(prob, 1e-7, 1)},
                                index=df["sample_id"]))
    return out


@pytest.mark.parametrize("n_shadows", [6, 16])
def test_patient_lira_equals_a_naive_loop_over_shadows(n_shadows):
    """LiRA on patients: the target's and every shadow's statistic averaged over the patient's images, Gaussians
    fitted per patient to the in and out shadows (16 shadows: per-patient sds; 6: one pooled sd), the
    log-likelihood ratio; every image holds its patient's score."""
    from privaudit.audit.privacy import logit_confidence

    df = cohort(25, seed=11)
    stats = _shadow_stats(df, n_shadows, seed=1)
    got = create_attack("lira").score(df, ["a"], stats, units=df["patient_id"].to_numpy())["lira"]
    target = logit_confidence(df, ["a"])
    pids = list(dict.fromkeys(df["patient_id"]))
    per = {}  # patient -> (target mean, [(in?, shadow mean)])
    for pid in pids:
        rows = np.flatnonzero(df["patient_id"].to_numpy() == pid)
        per[pid] = (target[rows].mean(), [(bool(s["in"].to_numpy()[rows][0]),
                                           s["logit_confidence"].to_numpy()[rows].mean()) for s in stats])
    if n_shadows < 16:  # the pooled within-patient sd of each side
        sds = {}
        for side in (True, False):
            ss = dof = 0.0
            for _, sh in per.values():
                xs = [x for i, x in sh if i == side]
                if len(xs) >= 2:
                    ss += sum((x - np.mean(xs)) ** 2 for x in xs)
                    dof += len(xs) - 1
            sds[side] = np.sqrt(ss / dof)
    for pid in pids:
        t, sh = per[pid]
        xin, xout = [x for i, x in sh if i], [x for i, x in sh if not i]
        expect = np.nan
        if len(xin) >= (1 if n_shadows < 16 else 2) and len(xout) >= (1 if n_shadows < 16 else 2):
            sd_in = sds[True] if n_shadows < 16 else np.std(xin, ddof=1)
            sd_out = sds[False] if n_shadows < 16 else np.std(xout, ddof=1)
            expect = norm.logpdf(t, np.mean(xin), sd_in) - norm.logpdf(t, np.mean(xout), sd_out)
        mine = got[df["patient_id"].to_numpy() == pid]
        assert np.allclose(mine, expect, equal_nan=True, rtol=1e-9, atol=1e-9), pid


def test_patient_rmia_equals_a_naive_loop():
    """RMIA on patients: Pr(patient | model) the geometric mean of its images' true-label probabilities, Pr(patient)
    from the references that left it out, and the share of non-member patients z with ratio(x) / ratio(z) > 1."""
    from privaudit.audit.privacy import true_label_probability

    df = cohort(30, seed=12)
    stats = _shadow_stats(df, 6, seed=2)
    got = create_attack("rmia").score(df, ["a"], stats, units=df["patient_id"].to_numpy())["rmia"]
    target = true_label_probability(df, ["a"])
    pids = list(dict.fromkeys(df["patient_id"]))
    ratio, member, a = {}, {}, 0.3
    for pid in pids:
        rows = np.flatnonzero(df["patient_id"].to_numpy() == pid)
        refs = [np.exp(np.mean(np.log(s["true_prob"].to_numpy()[rows]))) for s in stats
                if s["in"].to_numpy()[rows][0] == 0]
        member[pid] = int(df["member"].to_numpy()[rows][0])
        geo = np.exp(np.mean(np.log(target[rows])))
        ratio[pid] = geo / (0.5 * ((1 + a) * np.mean(refs) + (1 - a))) if refs else np.nan
    pop = [ratio[p] for p in pids if member[p] == 0 and np.isfinite(ratio[p])]
    for pid in pids:
        expect = np.nan if np.isnan(ratio[pid]) else np.mean([ratio[pid] / z > 1 for z in pop])
        mine = got[df["patient_id"].to_numpy() == pid]
        assert np.allclose(mine, expect, equal_nan=True), pid


def test_engine_uses_stored_patient_scores_and_else_the_mean_of_image_scores():
    """attack_scores with a ``lira@patient`` column: the patient unit reads it; without it, the mean of the
    per-image ``lira`` scores; the image unit (train.json says image) reads the per-image column."""
    df = cohort(100, seed=5, balanced=True)
    rng = np.random.default_rng(0)
    per_image = rng.normal(size=len(df)) + 0.5 * df["member"].to_numpy()
    codes, uniq = unit_codes(df["patient_id"])
    per_patient = rng.normal(size=len(uniq))[codes]
    scores = pd.DataFrame({"sample_id": df["sample_id"], "lira": per_image, "lira@patient": per_patient})
    cfg = AuditConfig(n_boot=50)

    def lira_auc(table, runs=None):
        doc = run_audit({"m": df}, runs=runs, config=cfg, attack_scores={"m": table}).data
        return doc["models"]["m"]["privacy"]["attacks"]["lira"]

    y = unit_mean(df["member"].to_numpy(), codes, len(uniq))
    assert lira_auc(scores)["auc"] == pytest.approx(roc_auc_score(y, unit_mean(per_patient, codes, len(uniq))))
    assert lira_auc(scores[["sample_id", "lira"]])["auc"] == pytest.approx(
        roc_auc_score(y, unit_mean(per_image, codes, len(uniq))))
    img = lira_auc(scores, runs={"m": {"privacy_unit": "image", "dp": False}})
    assert img["unit"] == "image" and img["n_members"] == img["n_nonmembers"] == int(
        min(df["member"].sum(), (df["member"] == 0).sum()))


# ---- the unit: recorded, inherited, defaulted --------------------------------------------------------------------
def test_the_unit_comes_from_train_json_then_the_study_then_the_data():
    several = cohort(40, seed=1)
    single = several.drop_duplicates("patient_id")
    assert attack_unit("image", several) == ("image", "run")
    assert attack_unit(None, single, study_unit="patient") == ("patient", "study")
    assert attack_unit(None, several) == ("patient", "default")
    assert attack_unit(None, single) == ("image", "default")
    assert attack_unit(None, several.drop(columns="patient_id")) == ("image", "default")
    mixed = several.copy()
    row = mixed.index[mixed.groupby("patient_id")["sample_id"].transform("size") >= 2][0]
    mixed.loc[row, "member"] = 1 - mixed.loc[row, "member"]  # one image of a patient on the other side
    assert attack_unit(None, mixed) == ("image", "default")


def test_outside_predictions_say_which_unit_and_a_non_private_reference_follows_the_study():
    df = cohort(80, seed=2)
    doc = run_audit({"m": df}, config=AuditConfig(n_boot=50)).data
    assert any("no train.json records the privacy unit" in w and "score patients" in w for w in doc["warnings"])
    # a DP run at the patient unit and a non-private run (no unit): both attacked per patient, paired
    dp = {"privacy_unit": "patient", "dp": False}   # the unit is what matters here, not the accounting
    ref = df.copy()
    ref["loss"] = ref["loss"] - 0.5 * ref["member"]
    doc = run_audit({"private": df, "non_private": ref}, runs={"private": dp, "non_private": {"dp": False}},
                    config=AuditConfig(n_boot=50, attributes=("sex",))).data
    for name in ("private", "non_private"):
        assert doc["models"][name]["privacy"]["attacks"]["loss"]["unit"] == "patient"
    assert not any("not paired" in w for w in doc["warnings"])
    assert doc["comparisons"]["private vs non_private"]["privacy_gap"]  # paired resample by resample


def test_mixed_patients_are_left_out_and_small_cells_count_patients():
    """A patient with member and non-member images is neither: it is left out with a warning. A group of 4
    member and 4 non-member patients with 5 images each (20 images on each side) is suppressed: fewer than 10
    patients; a group of 12 and 12 such patients is shown, with its counts in patients."""
    df = cohort(200, seed=4, balanced=True)
    first = df.loc[df.groupby("patient_id")["sample_id"].transform("size") >= 2, "patient_id"].iloc[0]
    rows = df.index[df["patient_id"] == first]
    df.loc[rows[0], "member"], df.loc[rows[1:], "member"] = 1, 0

    def group(sex, n):  # n member and n non-member patients of 5 images each
        ids = np.repeat([f"{sex}{i}" for i in range(2 * n)], 5)
        member = np.repeat(np.r_[np.ones(n, int), np.zeros(n, int)], 5)
        return pd.DataFrame({"sample_id": [f"{sex}-{i}" for i in range(len(ids))], "patient_id": ids,
                             "split": np.where(member == 1, "train", "test"), "member": member, "sex": sex,
                             "y_a": 1.0, "p_a": 0.5, "loss": 1.0 - 0.1 * member})

    df = pd.concat([df, group("X", 4), group("Y", 12)], ignore_index=True)
    doc = run_audit({"m": df}, runs={"m": {"privacy_unit": "patient", "dp": False}},
                    config=AuditConfig(n_boot=50, attributes=("sex",))).data
    loss = doc["models"]["m"]["privacy"]["attacks"]["loss"]
    assert any("1 patients with both member and non-member images are left out" in w for w in doc["warnings"])
    clean = df[df["patient_id"] != first].groupby("patient_id")["member"].first()
    k = int(min(clean.sum(), (clean == 0).sum()))
    assert loss["n_members"] == loss["n_nonmembers"] == k == len(clean) // 2  # all but one clean patient attacked
    assert loss["by_group"]["sex"]["X"] == {"n": None, "suppressed": True}
    y = loss["by_group"]["sex"]["Y"]  # patients (23 or 24 of them), not their 115 or 120 images
    assert y["n"] == y["n_members"] + y["n_nonmembers"] in (23, 24) and min(y["n_members"], y["n_nonmembers"]) >= 11
    assert y["auc"] == 1.0


def test_repeated_trials_bound_counts_patients():
    df = cohort(900, seed=9, shift=0.8)
    loss = run_audit({"m": df}, config=AuditConfig(n_boot=50)).data["models"]["m"]["privacy"]["attacks"]["loss"]
    bound = loss["epsilon_lower_bound_repeated_trials"]
    assert bound is not None and bound["unit"] == "patient"
    assert bound["n_threshold_nonmembers"] + bound["n_counted_nonmembers"] == loss["n_nonmembers"]


# ---- one CLI study ---------------------------------------------------------------------------------------------
def test_cli_study_attacks_score_and_count_patients(tmp_path, cohort):
    """A tiny train-and-audit study (patient-level DP by default, about 3 images per patient): every attack of
    both models says unit patient and counts patients: k training against k held-out patients."""
    from conftest import TINY, invoke

    out = tmp_path / "study"
    res = invoke("train-and-audit", "cxr", "--data", cohort, *TINY, "--physical-batch-size", "32", "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    doc = json.loads((out / "audit.json").read_text())
    assert doc["schema_version"] == 3
    preds = pd.read_csv(out / "private" / "predictions.csv", dtype={"sample_id": str, "patient_id": str})
    per = preds.groupby("patient_id")["member"].agg(["min", "max"])
    k = int(min((per["min"] == 1).sum(), (per["max"] == 0).sum()))
    assert 0 < k < min((preds["member"] == 1).sum(), (preds["member"] == 0).sum())  # fewer patients than images
    assert json.loads((out / "private" / "train.json").read_text())["privacy_unit"] == "patient"
    for name in ("private", "non_private"):
        attacks = doc["models"][name]["privacy"]["attacks"]
        assert {"loss", "confidence", "entropy", "trained"} <= set(attacks)
        for attack, a in attacks.items():
            assert a["unit"] == "patient", (name, attack)
            assert a["n_members"] == a["n_nonmembers"] == k, (name, attack)
    html = (out / "report.html").read_text()
    assert f"{k} / {k} patients" in html


def test_a_patient_unit_without_patient_ids_falls_back_to_images_and_says_so():
    df = cohort(60, seed=8).drop(columns="patient_id")
    doc = run_audit({"m": df}, runs={"m": {"privacy_unit": "patient", "dp": False}},
                    config=AuditConfig(n_boot=20)).data
    assert doc["models"]["m"]["privacy"]["attacks"]["loss"]["unit"] == "image"
    assert any("no patient_id column, so the membership-inference attacks score images" in w for w in doc["warnings"])
