"""The study layer and the public Python API: in-process calls with typed results, the README's example as
written, task defaults in the library, exact data reloads for attacks on sweep runs, and import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import invoke

TINY_API = dict(n_samples=60, image_size=32, epochs=1, width=4, batch_size=4, physical_batch_size=32, n_boot=50)


@pytest.fixture(scope="module")
def api_study(tmp_path_factory, monkeypatch_module=None):
    """The issue's example, run as written (from a fresh working directory)."""
    import os

    import privaudit

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("api"))
    try:
        study = privaudit.train_and_audit("cxr", out="runs/s", n_samples=600, image_size=32, epochs=1, width=8)
        table = study.to_frame()
        df = pd.read_csv("runs/s/private/predictions.csv")
        res = privaudit.audit({"mine": df}, attributes=["sex"], n_boot=200)
        yield Path("runs/s").absolute(), study, table, res
    finally:
        os.chdir(cwd)


def test_readme_example_runs_as_written_and_returns_typed_results(api_study):
    import privaudit
    from privaudit.audit.results import AuditReport

    path, study, table, res = api_study
    assert isinstance(study, privaudit.StudyDir) and set(study.runs) == {"private", "non_private"}
    assert isinstance(res, AuditReport) and list(res.models) == ["mine"]
    assert set(res.data["models"]["mine"]["fairness"]) >= {"sex"}
    assert "age_group" not in res.data["models"]["mine"]["fairness"]  # only the attribute asked for
    doc = json.loads((path / "audit.json").read_text())
    # every section of the audit has rows: utility, fairness, privacy (accountant, attacks), comparison verdicts
    assert {"utility", "fairness", "privacy", "comparison"} <= set(table["section"])
    eps = table[(table.model == "private") & (table.metric == "accountant.epsilon")]["estimate"]
    assert eps.iloc[0] == pytest.approx(doc["models"]["private"]["privacy"]["accountant"]["epsilon"])
    macro = table[(table.model == "non_private") & (table.metric == "auroc") & (table.label == "macro")].iloc[0]
    want = doc["models"]["non_private"]["utility"]["macro_auroc"]
    assert (macro.estimate, macro.ci_low, macro.ci_high) == pytest.approx((want["estimate"], want["ci_low"],
                                                                         want["ci_high"]))
    assert (table["section"].eq("comparison") & table["answer"].isin(["yes", "no", "inconclusive"])).any()
    assert table["path"].str.startswith(("models.", "comparisons.", "study.")).all()
    # the in-memory audit of a DataFrame writes nothing, and its rows are its own figures
    mine = res.to_frame()
    au = mine[(mine.metric == "auroc") & (mine.label == "macro") & mine.group.isna()].iloc[0]
    assert au.estimate == pytest.approx(res.models["mine"]["utility"]["macro_auroc"]["estimate"])


def test_study_provenance_is_passed_in_and_each_file_written_once(api_study):
    import privaudit

    path, study, _, _ = api_study
    doc = privaudit.load_audit(path).data
    assert doc["study"]["task"] == "cxr" and doc["study"]["data"]["manifest_sha256"]
    assert set(doc["study"]["configs"]) == {"private", "non_private"}
    # no sys.argv from pytest leaks into the provenance of an API call
    assert "pytest" not in json.dumps(doc["study"].get("command"))
    single = json.loads((path / "private" / "audit.json").read_text())
    assert list(single["models"]) == ["private"] and single["comparisons"] == {}
    # the run's own audit is the study's figures for that model, not a second computation that could differ
    assert single["models"]["private"]["utility"] == doc["models"]["private"]["utility"]
    cfg = json.loads((path / "private" / "config.json").read_text())
    assert cfg["data"]["manifest_sha256"] == doc["study"]["data"]["manifest_sha256"]


def test_report_and_load_audit_and_nothing_printed(api_study, tmp_path, capsys):
    import privaudit

    path, *_ = api_study
    capsys.readouterr()
    written = privaudit.report(path, fmt="html", out=tmp_path / "r.html")
    assert written == [tmp_path / "r.html"] and "<html" in (tmp_path / "r.html").read_text()[:500].lower()
    res = privaudit.audit(path / "private", n_boot=20)
    assert list(res.models) == ["private"]
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_train_sweep_and_attack_in_process(tmp_path, capsys):
    import privaudit

    run = privaudit.train("cxr", out=tmp_path / "run", epsilon=3, n_samples=60, image_size=32, epochs=1, width=4,
                          batch_size=4, seed=1)
    assert isinstance(run, privaudit.RunDir)
    info = run.train_info()
    assert info["dp"] and info["target_epsilon"] == 3 and info["seed"] == 1
    res = privaudit.attack("rmia", run, references=1, n_boot=20)
    assert "rmia" in res.models[run.name]["privacy"]["attacks"]
    sw = privaudit.sweep("cxr", epsilons=[8, "inf"], seeds=1, out=tmp_path / "sweep", **TINY_API)
    assert isinstance(sw, privaudit.StudyDir) and sw.is_sweep()
    agg = sw.audit.data["study"]["aggregates"]
    assert set(agg) == {"8", "inf"} and agg["inf"]["kind"] == "non_private"
    assert (sw.to_frame()["section"] == "aggregates").any()
    assert capsys.readouterr().out == ""


def test_progress_callback_gets_the_steps(tmp_path):
    import privaudit

    seen = []
    privaudit.train_and_audit("cxr", out=tmp_path / "s", dp=False, progress=seen.append, **TINY_API)
    assert any("non-private" in s for s in seen) and any("audit" in s for s in seen)


def test_task_defaults_live_in_the_library():
    from privaudit.config import TrainConfig
    from privaudit.errors import ConfigError
    from privaudit.tasks import create_task

    pdac = TrainConfig.for_task("pdac")
    spec = create_task("pdac")
    assert (pdac.epochs, pdac.batch_size, pdac.width, pdac.lr) == tuple(spec.default(k) for k in
                                                                         ("epochs", "batch_size", "width", "lr"))
    assert pdac.physical_batch_size is None and pdac.dp.epsilon == 8.0   # automatic: resolved by the plan
    assert TrainConfig.for_task("pdac", epochs=2).epochs == 2
    nm = TrainConfig.for_task("cxr", noise_multiplier=1.0)
    assert nm.dp.noise_multiplier == 1.0 and nm.dp.epsilon is None
    assert TrainConfig.for_task("cxr", dp=False).dp.enabled is False
    with pytest.raises(ConfigError, match="epochs must be at least 1"):  # parameters, not flags
        TrainConfig.for_task("cxr", epochs=0)
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        TrainConfig.for_task("cxr", epoch=3)


def test_cli_names_flags_where_the_library_names_parameters(tmp_path):
    res = invoke("train", "cxr", "--epochs", "0", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "--epochs must be at least 1" in res.stderr
    assert not (tmp_path / "x").exists()


def test_registries_for_attacks_and_executors():
    from privaudit.audit.attacks import create_attack, list_attacks
    from privaudit.errors import RegistryError
    from privaudit.study.executors import list_executors

    assert {"loss", "lira", "rmia"} <= set(list_attacks()) and set(list_attacks(trained=True)) == {"lira", "rmia"}
    with pytest.raises(RegistryError, match="valid attacks"):
        create_attack("shadowy")
    assert {"local", "ray"} <= set(list_executors())
    # the registered loss attack is what the audit engine scores
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"y_a": rng.integers(0, 2, 50).astype(float), "p_a": rng.random(50), "loss": rng.random(50)})
    assert np.array_equal(create_attack("loss").score(df, ["a"])["loss"], -df["loss"].to_numpy())


@pytest.mark.parametrize("module", ["privaudit", "privaudit.audit", "privaudit.reports", "privaudit.study",
                                    "privaudit.study.api", "privaudit.audit.attacks"])
def test_importing_the_api_imports_no_framework(module):
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; "
            "print(','.join(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"importing {module} imported {res.stdout.strip()}"


def test_audit_package_stays_a_package_and_is_callable():
    import privaudit
    import privaudit.audit.engine

    assert callable(privaudit.audit) and privaudit.audit.run_audit is privaudit.audit.engine.run_audit
    from privaudit.audit import run_audit  # noqa: F401


# ---- attacks on sweep runs reload exactly the training data ---------------------------------------------------
def _shadow_reload_matches(run_dir: Path) -> None:
    from privaudit.study.data import reload_data
    from privaudit.study.dirs import RunDir

    run = RunDir(run_dir)
    cfg = run.config()
    again = reload_data(cfg["data"], run.path, cfg["train"]["task"])
    assert again.info["manifest_sha256"] == cfg["data"]["manifest_sha256"]
    stats = pd.read_csv(run.path / "shadows" / "shadow_0" / "stats.csv", dtype={"sample_id": str})
    preds = run.predictions()
    assert sorted(stats["sample_id"]) == sorted(preds["sample_id"].astype(str))
    return again


def test_attack_on_a_sweep_run_trained_from_msd_with_controls(tmp_path):
    from privaudit.data.synth_ct import synthesize_ct

    folder = tmp_path / "Task07_Pancreas"
    synthesize_ct(folder, n=40, image_size=16, seed=3, layout="msd")
    out = tmp_path / "sweep"
    with pytest.warns(UserWarning, match="site is set from each source"):  # the source is a shortcut: said so
        res = invoke("sweep", "pdac", "--data", folder, "--controls", folder / "controls", "--epsilons", "inf",
                     "--seeds", "1", "--image-size", "16", "--epochs", "1", "--width", "4", "--batch-size", "8",
                     "--n-boot", "20", "--quiet", "--out", out)
    assert res.exit_code == 0, res.output + res.stderr
    res = invoke("attack", "lira", out / "eps=inf" / "seed=0", "--shadows", "1", "--n-boot", "20", "--quiet")
    assert res.exit_code == 0, res.output + res.stderr  # main: "cohort has one class" (controls were dropped)
    again = _shadow_reload_matches(out / "eps=inf" / "seed=0")
    assert set(again.manifest.frame["site"]) == {"msd", "controls"}


def test_attack_on_a_sweep_run_trained_from_chexpert_with_all_views(tmp_path):
    from test_presets import chexpert_row, make_chexpert

    rng = np.random.default_rng(0)
    rows = []
    for p in range(1, 61):
        y = float(rng.integers(0, 2))
        rows += [chexpert_row(p, Cardiomegaly=y), chexpert_row(p, view=2, frontal=False, Cardiomegaly=y)]
    folder = make_chexpert(tmp_path, rows)
    out = tmp_path / "sweep"
    res = invoke("sweep", "cxr", "--data", folder, "--views", "all", "--labels", "cardiomegaly", "--epsilons", "inf",
                 "--seeds", "1", "--image-size", "16", "--epochs", "1", "--width", "4", "--batch-size", "16",
                 "--n-boot", "20", "--quiet", "--out", out)
    assert res.exit_code == 0, res.output + res.stderr
    res = invoke("attack", "lira", out / "eps=inf" / "seed=0", "--shadows", "1", "--n-boot", "20", "--quiet")
    assert res.exit_code == 0, res.output + res.stderr
    again = _shadow_reload_matches(out / "eps=inf" / "seed=0")
    assert again.manifest.frame["sample_id"].str.contains("lateral").sum() == 60  # main reloaded frontal only


def test_changed_data_is_refused_by_the_reload(tmp_path, cohort):
    import shutil

    import privaudit
    from privaudit.errors import DataError
    from privaudit.study.data import reload_data

    data = tmp_path / "data"
    shutil.copytree(cohort.parent, data)
    run = privaudit.train("cxr", data=data / "manifest.csv", out=tmp_path / "run", dp=False, image_size=32, epochs=1,
                          width=4, batch_size=16)
    frame = pd.read_csv(data / "manifest.csv")
    frame.loc[0, "age"] = frame.loc[0, "age"] + 1
    frame.to_csv(data / "manifest.csv", index=False)
    with pytest.raises(DataError, match="no longer match"):
        reload_data(run.config()["data"], run.path, "cxr")


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parents[1] / "examples").glob("*.py")))
def test_examples_run(script, tmp_path):
    path = Path(__file__).parents[1] / "examples" / script
    res = subprocess.run([sys.executable, str(path), "--tiny"], capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
