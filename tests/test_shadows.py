"""`privaudit attack`: shadow/reference models through the backend, resumable, scored into the run's audit."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY, invoke


@pytest.fixture(scope="module")
def run(tmp_path_factory, cohort) -> Path:
    out = tmp_path_factory.mktemp("atk") / "run"
    res = invoke("train", "cxr", *TINY[:-3], "--data", cohort, "--no-dp", "--quiet", "--out", out)
    assert res.exit_code == 0, res.stderr
    return out


def test_lira_and_rmia_are_added_to_the_run_audit_and_shadows_resume(run):
    res = invoke("attack", "lira", run, "--shadows", "4", "--n-boot", "20", "--quiet")
    assert res.exit_code == 0, res.stderr
    spec = json.loads((run / "shadows" / "shadow_0" / "spec.json").read_text())
    assert spec["config"]["backend"] == "opacus" and spec["included"]
    stats = pd.read_csv(run / "shadows" / "shadow_0" / "stats.csv", dtype={"sample_id": str})
    assert set(stats.loc[stats["in"] == 1, "sample_id"]) == set(spec["included"])
    preds = pd.read_csv(run / "predictions.csv", dtype={"sample_id": str})
    # inclusion is per patient: a patient's images are in or out together
    merged = stats.merge(preds[["sample_id", "patient_id"]], on="sample_id")
    assert (merged.groupby("patient_id")["in"].nunique() == 1).all()
    lira = json.loads((run / "audit.json").read_text())["models"]["run"]["privacy"]["attacks"]["lira"]
    assert 0 <= lira["auc"] <= 1 and lira["n_members"] > 0
    # the cohort has several images per patient: LiRA also scores patients, each image holding its patient's score
    scores = pd.read_csv(run / "attack_scores.csv", dtype={"sample_id": str}).merge(preds, on="sample_id")
    assert lira["unit"] == "patient" and (scores.groupby("patient_id")["lira@patient"].nunique(dropna=False) == 1).all()

    before = (run / "shadows" / "shadow_0" / "stats.csv").stat().st_mtime_ns
    res = invoke("attack", "rmia", run, "--references", "4", "--n-boot", "20")
    assert res.exit_code == 0, res.stderr
    assert "reusing 4" in res.output
    assert (run / "shadows" / "shadow_0" / "stats.csv").stat().st_mtime_ns == before  # not retrained
    attacks = json.loads((run / "audit.json").read_text())["models"]["run"]["privacy"]["attacks"]
    assert attacks["rmia"] is not None and attacks["lira"] is not None  # the earlier attack is kept


@pytest.mark.parametrize("args,needle", [
    (["--shadows", "0"], "at least 1"),
    ([], "--shadows K"),
])
def test_attack_bad_options(run, args, needle):
    res = invoke("attack", "lira", run, *args)
    assert res.exit_code == 2 and needle in res.stderr


def test_attack_needs_per_sample_losses(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("shadows"))
    df = pd.read_csv(copy / "predictions.csv").drop(columns=["loss"])
    df.to_csv(copy / "predictions.csv", index=False)
    res = invoke("attack", "lira", copy, "--shadows", "2")
    assert res.exit_code == 2 and "per-sample 'loss'" in res.stderr
    assert not (copy / "shadows").exists()


def test_jobs_train_shadows_in_parallel_processes(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("shadows", "attack_scores.csv"))
    res = invoke("attack", "lira", copy, "--shadows", "2", "--jobs", "2", "--offline", "--n-boot", "10", "--quiet")
    assert res.exit_code == 0, res.stderr
    assert all((copy / "shadows" / f"shadow_{i}" / "stats.csv").is_file() for i in range(2))
    attacks = json.loads((copy / "audit.json").read_text())["models"]["run"]["privacy"]["attacks"]
    assert attacks["lira_offline"] is not None


@pytest.mark.filterwarnings("ignore:site is set from each source:UserWarning")  # the msd preset's shortcut warning
def test_shadow_models_reload_a_preset_folder_with_the_runs_own_preset(tmp_path):
    """A run trained on an MSD folder (+ controls) has no manifest.csv: its shadows must read the same folder
    through the same preset, or their sample ids would not match the run's."""
    msd = tmp_path / "Task07_Pancreas"
    res = invoke("data", "synth", "pdac", "--out", msd, "--n", "40", "--image-size", "16", "--seed", "2",
                 "--layout", "msd", "--quiet")
    assert res.exit_code == 0, res.stderr
    run = tmp_path / "run"
    res = invoke("train", "pdac", "--data", msd, "--controls", msd / "controls", "--image-size", "16", "--epochs",
                 "1", "--width", "4", "--batch-size", "8", "--no-dp", "--quiet", "--out", run)
    assert res.exit_code == 0, res.stderr
    res = invoke("attack", "lira", run, "--shadows", "1", "--offline", "--n-boot", "10", "--quiet")
    assert res.exit_code == 0, res.stderr
    spec = json.loads((run / "shadows" / "shadow_0" / "spec.json").read_text())
    assert spec["data"]["controls"] == str((msd / "controls").absolute())
    scores = pd.read_csv(run / "attack_scores.csv", dtype={"sample_id": str})
    preds = pd.read_csv(run / "predictions.csv", dtype={"sample_id": str})
    assert set(scores["sample_id"]) == set(preds["sample_id"])
