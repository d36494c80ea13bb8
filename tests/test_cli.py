"""The CLI: --help everywhere, the end-to-end study, and every bad input giving one line and exit code 2."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, invoke

COMMANDS = [["train-and-audit"], ["train"], ["sweep"], ["audit"], ["report"], ["accountant"], ["attack"], ["check"], ["data"],
            ["data", "synth"], ["data", "cache"], []]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "privaudit")
def test_help_works_for_every_command(cmd):
    res = invoke(*cmd, "--help")
    assert res.exit_code == 0
    assert "Usage" in res.output
    if cmd and cmd != ["data"]:
        assert "Example" in res.output


def test_version():
    from privaudit import __version__

    res = invoke("--version")
    assert res.exit_code == 0 and __version__ in res.output


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "privaudit", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "train-and-audit" in res.stdout


def test_study_writes_every_file_in_the_contract(study: Path):
    for rel in ["audit.json", "report.html", "private/model/weights.pt", "private/model/model.json",
                "private/train.json", "private/predictions.csv", "private/config.json", "private/audit.json",
                "non_private/train.json", "non_private/predictions.csv", "non_private/model/model.json"]:
        assert (study / rel).is_file(), rel
    # run directories hold patient-level data: owner only
    for d in (study, study / "private", study / "non_private"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((study / "private" / "predictions.csv").stat().st_mode) == 0o600
    assert not list(study.parent.glob(".*partial*")), "staging folder left behind"


def test_study_audit_json_has_the_contract_paths_and_validates(study: Path):
    from privaudit.audit import AuditReport

    doc = json.loads((study / "audit.json").read_text())
    report = AuditReport(doc)
    report.validate()
    assert doc["schema_version"] == 3
    assert set(doc["models"]) == {"private", "non_private"}
    labels = doc["study"]["labels"]
    assert len(labels) == 5
    for name, m in doc["models"].items():
        for lab in labels:
            a = m["utility"]["labels"][lab]["auroc"]
            assert set(a) >= {"estimate", "ci_low", "ci_high", "n_boot", "ci_method"}
            if a["estimate"] is not None:
                assert a["ci_low"] <= a["ci_high"]
        assert m["utility"]["macro_auroc"]["n_boot"] > 0
    priv = doc["models"]["private"]
    assert priv["run"]["dp"] is True
    acc = priv["privacy"]["accountant"]
    for key in ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "max_grad_norm"):
        assert acc[key] is not None, key
    assert doc["models"]["non_private"]["privacy"]["accountant"] is None
    assert doc["models"]["non_private"]["run"]["dp"] is False
    comp = doc["comparisons"]["private vs non_private"]
    assert set(comp["labels"]) == set(labels)
    assert set(comp["macro_auroc_difference"]) >= {"estimate", "ci_low", "ci_high"}
    text = (study / "audit.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_study_epsilon_is_recomputed_from_train_json(study: Path):
    from opacus.accountants import create_accountant

    tj = json.loads((study / "private" / "train.json").read_text())
    assert tj["dp"] and tj["poisson_sampling"] and tj["accountant"] == "prv"
    acc = create_accountant(tj["accountant"])
    acc.history = [(tj["noise_multiplier"], tj["sample_rate"], tj["steps"])]
    assert acc.get_epsilon(delta=tj["delta"]) == pytest.approx(tj["epsilon"], rel=1e-6)
    assert tj["epsilon"] <= 8.0 * 1.01  # the target epsilon, not exceeded
    assert tj["privacy_unit"] == "patient" and tj["delta"] < 1 / tj["n_units"]   # delta from training patients


def test_predictions_follow_the_schema(study: Path):
    from privaudit.predictions import read_predictions

    tj = json.loads((study / "private" / "train.json").read_text())
    df = read_predictions(study / "private" / "predictions.csv")
    labels = json.loads((study / "private" / "model" / "model.json").read_text())["labels"]
    for lab in labels:
        assert df[f"p_{lab}"].between(0, 1).all()
        assert set(df[f"y_{lab}"].dropna().unique()) <= {0.0, 1.0}
    assert {"sample_id", "split", "member", "loss", "sex", "age", "patient_id"} <= set(df.columns)
    assert (df["member"] == (df["split"] == "train").astype(int)).all()
    assert int(df["member"].sum()) == tj["n_train"]
    assert (df["loss"] >= 0).all()
    manifest = pd.read_csv(study / "data" / "manifest.csv", dtype={"sample_id": str})
    assert set(df["sample_id"]) == set(manifest["sample_id"])


def test_report_is_rendered_from_audit_json(study: Path):
    html = (study / "report.html").read_text()
    for heading in ("Summary", "Privacy guarantee", "Utility", "Fairness", "Warnings", "Provenance"):
        assert heading in html
    res = invoke("report", study, "--out", study / "again.html")
    assert res.exit_code == 0
    assert (study / "again.html").read_text().count("<table") == html.count("<table")


def test_audit_run_dir_and_prediction_files(study: Path, tmp_path: Path):
    res = invoke("audit", study / "private", "--n-boot", "50")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "pf"
    res = invoke("audit", "--predictions", study / "private" / "predictions.csv", "--predictions",
                 study / "non_private" / "predictions.csv", "--name", "dp", "--name", "base", "--reference", "base",
                 "--n-boot", "50", "--out", out)
    assert res.exit_code == 0, res.stderr
    doc = json.loads((out / "audit.json").read_text())
    assert set(doc["models"]) == {"dp", "base"} and "dp vs base" in doc["comparisons"]


# ---- bad input: one line, exit 2, nothing written ------------------------------------------------------------
def _one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in res.output + res.stderr
    assert len(err.splitlines()) == 1 or all(not ln.startswith("  File") for ln in err.splitlines()), err
    for needle in needles:
        assert needle in " ".join(err.split()), (needle, err)
    return err


def _write_manifest(cohort: Path, tmp_path: Path, mutate) -> Path:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(cohort.parent, folder)
    df = pd.read_csv(folder / "manifest.csv", dtype=str)
    df = mutate(df, folder)
    df.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def _train(tmp_path, *args):
    out = tmp_path / "out"
    res = invoke("train", "cxr", *TINY[:-3], "--quiet", "--out", out, *args)
    return res, out


@pytest.mark.parametrize("case,mutate,needles", [
    ("missing column", lambda df, f: df.drop(columns=["patient_id"]), ["patient_id", "manifest.csv"]),
    ("bad label", lambda df, f: df.assign(cardiomegaly=df["cardiomegaly"].where(df.index != 3, "2")),
     ["cardiomegaly", "'2'", "0, 1 or blank"]),
    ("patient in two splits", lambda df, f: df.assign(
        patient_id=df["patient_id"].where(df.index != df.index[df["split"] == "test"][0],
                                          df.loc[df["split"] == "train", "patient_id"].iloc[0])),
     ["appears in splits", "patient level"]),
    ("corrupt image", lambda df, f: (f.joinpath(df["path"].iloc[0]).write_bytes(b"not a png"), df)[1],
     ["not a readable image"]),
    ("missing image", lambda df, f: df.assign(path=df["path"].where(df.index != 0, "images/nope.png")),
     ["does not exist", "nope.png"]),
])
def test_bad_manifest(cohort, tmp_path, case, mutate, needles):
    manifest = _write_manifest(cohort, tmp_path, mutate)
    res, out = _train(tmp_path, "--data", manifest)
    _one_line_error(res, *needles)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial*"))


def test_missing_manifest(tmp_path):
    res, out = _train(tmp_path, "--data", tmp_path / "nope.csv")
    _one_line_error(res, "nope.csv")
    assert not out.exists()


def test_unreadable_manifest(tmp_path):
    bad = tmp_path / "manifest.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage\x00\n\x81")
    res, out = _train(tmp_path, "--data", bad)
    _one_line_error(res, "manifest.csv")
    assert not out.exists()


@pytest.mark.parametrize("args,needles", [
    (["--backend", "keras"], ["unknown backend 'keras'", "opacus"]),
    (["--arch", "vgg"], ["unknown architecture 'vgg'", "resnet9-gn"]),
    (["--epsilon", "0"], ["--epsilon", "positive"]),
    (["--epsilon", "-1"], ["--epsilon", "positive"]),
    (["--delta", "0.5"], ["--delta", "1/N"]),
    (["--batch-size", "5000"], ["--batch-size", "larger than the training set"]),
    (["--arch", "resnet9-bn"], ["BatchNorm", "GroupNorm"]),
])
def test_bad_options(cohort, tmp_path, args, needles):
    res, out = _train(tmp_path, "--data", cohort, *args)
    _one_line_error(res, *needles)
    assert not out.exists()


def test_unknown_task(tmp_path):
    res = invoke("train-and-audit", "mri", "--out", tmp_path / "x")
    _one_line_error(res, "unknown task 'mri'", "cxr")
    assert not (tmp_path / "x").exists()


def test_out_holding_a_run_is_refused_unless_force(study: Path, cohort, tmp_path):
    before = (study / "audit.json").read_bytes()
    res = invoke("train-and-audit", "cxr", *TINY, "--out", study)
    _one_line_error(res, "already holds a run", "--force")
    assert (study / "audit.json").read_bytes() == before
    out = tmp_path / "run"
    assert invoke("train", "cxr", *TINY[:-3], "--data", cohort, "--no-dp", "--out", out).exit_code == 0
    old = (out / "train.json").read_bytes()
    res = invoke("train", "cxr", *TINY[:-3], "--data", cohort, "--no-dp", "--seed", "1", "--out", out, "--force")
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "train.json").read_text())["seed"] == 1 and (out / "train.json").read_bytes() != old


def test_audit_of_a_study_directory_compares_its_runs(study: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    (copy / "audit.json").unlink()
    res = invoke("audit", copy, "--n-boot", "50")
    assert res.exit_code == 0, res.stderr
    doc = json.loads((copy / "audit.json").read_text())
    assert set(doc["models"]) >= {"private", "non_private"} and "private vs non_private" in doc["comparisons"]
    res = invoke("audit", copy / "data", "--n-boot", "10")
    _one_line_error(res, "no predictions.csv")


def test_accountant_command_matches_opacus_both_ways():
    from opacus.accountants import create_accountant

    res = invoke("accountant", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "1000",
                 "--delta", "1e-5")
    assert res.exit_code == 0, res.stderr
    acc = create_accountant("rdp")
    acc.history = [(1.0, 0.01, 1000)]
    assert f"{acc.get_epsilon(1e-5):.4f}" in res.output
    res = invoke("accountant", "--epsilon", "3", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5")
    assert res.exit_code == 0 and "noise multiplier" in res.output
    _one_line_error(invoke("accountant", "--sample-rate", "0.01", "--steps", "10", "--delta", "1e-5"), "exactly one")


def test_pretraining_on_the_public_cohort_is_recorded(tmp_path):
    out = tmp_path / "pre"
    res = invoke("train-and-audit", "cxr", *TINY, "--pretrain", "--no-baseline", "--out", out)
    assert res.exit_code == 0, res.stderr
    tj = json.loads((out / "private" / "train.json").read_text())
    assert tj["init"]["path"] == "pretrain/model/weights.pt" and (out / tj["init"]["path"]).is_file()
    assert json.loads((out / "private" / "config.json").read_text())["train"]["init"] == tj["init"]["path"]
    # shadow models of a pretrained run start from the same weights
    res = invoke("attack", "lira", out / "private", "--shadows", "2", "--n-boot", "10", "--quiet")
    assert res.exit_code == 0, res.stderr
    assert json.loads((out / "private" / "shadows" / "shadow_0" / "spec.json").read_text())["config"]["init"] == str(
        (out / "pretrain" / "model" / "weights.pt").absolute())
    public = pd.read_csv(out / "public_data" / "manifest.csv", dtype=str)
    private = pd.read_csv(out / "data" / "manifest.csv", dtype=str)
    assert not set(public["patient_id"]) & set(private["patient_id"])  # a separate cohort
    doc = json.loads((out / "audit.json").read_text())
    assert doc["study"]["data"]["pretraining"]["dp"] is False
    assert set(doc["models"]) == {"private"} and "pretrained without privacy" in (out / "report.html").read_text()


def test_canaries_give_a_one_run_empirical_epsilon_below_the_accountant(tmp_path):
    from privaudit.audit.empirical import one_run_lower_bound

    out = tmp_path / "can"
    res = invoke("train-and-audit", "cxr", *TINY, "--canaries", "80", "--epsilon", "4", "--physical-batch-size", "16",
                 "--out", out)
    assert res.exit_code == 0, res.stderr
    tj = json.loads((out / "private" / "train.json").read_text())
    canaries = pd.read_csv(out / "private" / "canaries.csv")
    assert len(canaries) == tj["canaries"]["m"] == 80
    assert canaries["included"].sum() == tj["canaries"]["n_included"]
    # included canaries are training samples, so the accounting counts them (canary patients, of 1 to 4 images)
    assert tj["canaries"]["unit"] == "patient" and canaries["n_images"].sum() == tj["canaries"]["n_images"]
    assert tj["n_train"] == (int(pd.read_csv(out / "private" / "predictions.csv")["member"].sum())
                             + tj["canaries"]["n_included_images"])
    doc = json.loads((out / "audit.json").read_text())
    priv = doc["models"]["private"]["privacy"]
    emp = priv["empirical_epsilon"]
    assert emp["method"] == "steinke2023-one-run" and emp["m"] == 40  # the evaluation half
    assert 0 <= emp["estimate"] <= priv["accountant"]["epsilon"]
    assert emp["estimate"] == pytest.approx(one_run_lower_bound(emp["r"], emp["v"], delta=emp["delta"], m=emp["m"],
                                                                confidence=emp["confidence"]), abs=1e-6)
    assert priv["soundness"]["violated"] is False
    assert doc["models"]["non_private"]["privacy"]["soundness"] is None
    assert doc["models"]["non_private"]["privacy"]["empirical_epsilon"]["estimate"] >= 0
    # a canary table that does not match what the audit needs is refused, and the audit is left as it was
    before = (out / "private" / "audit.json").read_bytes()
    pd.read_csv(out / "private" / "canaries.csv").drop(columns=["loss"]).to_csv(out / "private" / "canaries.csv")
    _one_line_error(invoke("audit", out / "private", "--n-boot", "10"), "canary table", "loss")
    assert (out / "private" / "audit.json").read_bytes() == before


def test_check_gates_on_a_policy(study: Path, tmp_path: Path):
    lenient = tmp_path / "ok.toml"
    lenient.write_text("[policy]\nmodels = ['private']\nmin_auroc = 0.0\nmax_epsilon = 100\n")
    res = invoke("check", study, "--policy", lenient)
    assert res.exit_code == 0, res.output
    strict = tmp_path / "strict.toml"
    strict.write_text("[policy]\nmin_auroc = 0.999\nmax_epsilon = 0.1\n")
    res = invoke("check", study, "--policy", strict)
    assert res.exit_code == 1 and "fail" in res.output
    example = Path(__file__).parents[1] / "examples" / "policy.toml"
    assert invoke("check", study, "--policy", example).exit_code in (0, 1)  # the shipped example parses
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nmin_aucroc = 0.8\n")
    _one_line_error(invoke("check", study, "--policy", bad), "unknown policy key 'min_aucroc'")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[policy]\nmax_epsilon = 'ten'\n")
    _one_line_error(invoke("check", study, "--policy", wrong), "max_epsilon", "float")
