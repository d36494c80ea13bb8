"""`privaudit sweep`: one model per (epsilon, seed), audited as one study; local pool and Ray; resume; bad input."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke

# 160 images so that the test split holds both classes of every label; 30 resamples keep the audits quick.
TINY = ["--n-samples", "160", "--image-size", "32", "--epochs", "1", "--width", "4", "--batch-size", "16",
        "--n-boot", "30", "--quiet"]


def _strict_json(path: Path) -> dict:
    def refuse(const):
        raise AssertionError(f"{path} holds {const}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its modification time (to show that nothing finished was touched)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """The issue's small sweep (epsilons 1, 8, inf; 2 seeds) on the local process pool."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    res = invoke("sweep", "cxr", "--epsilons", "1,8,inf", "--seeds", "2", "--jobs", "2", *TINY, "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    return out


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("cmd,needle", [("sweep", "--epsilons"), ("sweep", "--ray-address"),
                                        ("attack", "--executor")])
def test_help_shows_the_sweep_and_executor_options(cmd, needle):
    res = invoke(cmd, "--help")
    assert res.exit_code == 0 and "Example" in res.output and needle in res.output


# ---- parsing and bad input -------------------------------------------------------------------------------------
def test_parse_epsilons_orders_labels_and_kinds():
    from privaudit.study.sweep import parse_epsilons, run_name

    pts = parse_epsilons(" 1, 3.0,8 ,inf,clip,0.5")
    assert [p.label for p in pts] == ["1", "3", "8", "inf", "clip", "0.5"]
    assert [p.kind for p in pts] == ["dp", "dp", "dp", "non_private", "clip_only", "dp"]
    assert pts[1].epsilon == 3.0 and pts[3].epsilon is None
    assert run_name(pts[0], 2) == "eps=1/seed=2"


@pytest.mark.parametrize("args,needle", [
    (["--epsilons", ""], "--epsilons is empty"),
    (["--epsilons", " , "], "--epsilons is empty"),
    (["--epsilons", "0,8"], "must be above 0"),
    (["--epsilons", "-1"], "must be above 0"),
    (["--epsilons", "1,abc"], "'abc' is not a number"),
    (["--epsilons", "1,1.0"], "appears twice"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--executor", "local", "--ray-address", "127.0.0.1:1"], "--ray-address needs --executor ray"),
])
def test_bad_sweep_options_are_one_line_and_write_nothing(tmp_path, args, needle):
    out = tmp_path / "sw"
    res = invoke("sweep", "cxr", *TINY, *args, "--out", out)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_unknown_executor_and_jobs_with_ray():
    from privaudit.errors import ConfigError, RegistryError
    from privaudit.study.executors import create_executor

    with pytest.raises(RegistryError, match="valid executors are: local, ray"):
        create_executor("dask")
    with pytest.raises(ConfigError, match="jobs sizes the local process pool"):
        create_executor("ray", jobs=2)


def _fail_on_odd(x: int) -> int:
    from privaudit.errors import DataError

    if x % 2:
        raise DataError(f"odd {x}")
    return x * 10


def test_local_executor_runs_every_job_then_raises_the_first_failure():
    from privaudit.errors import DataError
    from privaudit.study.executors import LocalExecutor

    seen = []
    with pytest.raises(DataError, match="odd 1"):
        LocalExecutor(1).run(_fail_on_odd, [0, 1, 2, 3, 4], on_done=lambda i, r: seen.append((i, r)))
    assert seen == [(0, 0), (2, 20), (4, 40)]  # the jobs after a failure still ran


def _worker_env(_) -> tuple:
    import os

    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")


def test_local_pool_pins_each_worker_to_its_own_gpu(monkeypatch):
    import privaudit.study.executors as executors

    monkeypatch.setattr(executors, "local_gpu_count", lambda: 2)  # as on a machine with two GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")             # of which the user gave us 5 and 7
    pool = executors.LocalExecutor()
    assert pool.slots == 2 and pool.gpus == 2
    envs = pool.run(_worker_env, list(range(6)))
    by_pid = {pid: gpu for pid, gpu, _ in envs}
    assert set(by_pid.values()) <= {"5", "7"} and len(set(by_pid.values())) == len(by_pid)
    assert {threads for _, _, threads in envs} == {str(max(1, executors._cpu_count() // 2))}


# ---- the study ------------------------------------------------------------------------------------------------
def test_sweep_study_holds_one_model_per_run_with_aggregates_and_trade_offs(sweep_dir):
    from scipy.stats import pearsonr

    from privaudit.audit.results import AuditReport
    from privaudit.study.sweep import is_complete

    doc = _strict_json(sweep_dir / "audit.json")  # no Infinity or NaN anywhere
    AuditReport(doc).validate()
    names = [f"eps={e}/seed={s}" for e in ("1", "8", "inf") for s in (0, 1)]
    assert list(doc["models"]) == names
    assert all(is_complete(sweep_dir / n) for n in names) and (sweep_dir / "report.html").is_file()
    for n in names:  # each run directory keeps the run-directory contract, with its own single-model audit
        assert list(_strict_json(sweep_dir / n / "audit.json")["models"]) == [n]
    models = doc["models"]
    assert models["eps=inf/seed=0"]["run"]["dp"] is False and models["eps=inf/seed=0"]["privacy"]["accountant"] is None
    assert doc["study"]["sweep"]["executor"]["executor"] == "local"
    assert doc["study"]["sweep"]["executor"]["trained"] == 6

    # aggregates over seeds, next to the bootstrap CI of the mean
    agg = doc["study"]["aggregates"]
    assert list(agg) == ["1", "8", "inf"] and agg["inf"]["kind"] == "non_private"
    macro = {n: models[n]["utility"]["macro_auroc"]["estimate"] for n in names}
    one = [macro["eps=1/seed=0"], macro["eps=1/seed=1"]]
    assert agg["1"]["macro_auroc"]["mean"] == pytest.approx(np.mean(one))
    assert agg["1"]["macro_auroc"]["sd"] == pytest.approx(np.std(one, ddof=1))
    assert agg["1"]["macro_auroc"]["min"] == pytest.approx(min(one)) and agg["1"]["macro_auroc"]["n_seeds"] == 2
    assert agg["1"]["macro_auroc"]["ci_low"] <= agg["1"]["macro_auroc"]["ci_high"]
    eps1 = [models[f"eps=1/seed={s}"]["privacy"]["accountant"]["epsilon"] for s in (0, 1)]
    assert agg["1"]["epsilon"]["mean"] == pytest.approx(np.mean(eps1)) and agg["1"]["epsilon"]["mean"] <= 1.0 + 1e-6
    assert agg["inf"]["epsilon"]["mean"] is None and agg["inf"]["epsilon"]["n_seeds"] == 0
    for lab, a in agg["8"]["auroc"].items():
        vals = [models[f"eps=8/seed={s}"]["utility"]["labels"][lab]["auroc"]["estimate"] for s in (0, 1)]
        assert a["mean"] == pytest.approx(np.mean([v for v in vals if v is not None]))
    assert set(agg["1"]["max_parity_gap"]) <= set(doc["study"]["attributes"])

    # Pearson's r of log(epsilon) over the 4 DP models, recomputed with scipy; the inf runs stay out
    t = doc["study"]["trade_offs"]
    assert t["models"] == names[:4]
    x = np.log([models[n]["privacy"]["accountant"]["epsilon"] for n in t["models"]])
    expected = pearsonr(x, [macro[n] for n in t["models"]])
    assert t["macro_auroc"]["r"] == pytest.approx(expected.statistic)
    assert t["macro_auroc"]["p_value"] == pytest.approx(expected.pvalue) and t["macro_auroc"]["n"] == 4
    for attr, per_label in t["performance_parity"].items():
        for g, blk in per_label["macro"].items():
            ys = [((models[n]["fairness"][attr]["macro"]["performance_parity"].get(g)) or {}).get("estimate")
                  for n in t["models"]]
            if blk["r"] is not None:
                assert blk["r"] == pytest.approx(pearsonr(x, ys).statistic)
            else:
                assert sum(y is not None for y in ys) < 4 or len({round(y, 12) for y in ys}) == 1

    # label difficulty: AUROC drop (non-private minus DP, means over seeds) against the non-private AUROC
    ld = t["label_difficulty"]
    labels = doc["study"]["labels"]
    base = [np.mean([models[f"eps=inf/seed={s}"]["utility"]["labels"][lab]["auroc"]["estimate"] for s in (0, 1)])
            for lab in labels]
    dp1 = [np.mean([models[f"eps=1/seed={s}"]["utility"]["labels"][lab]["auroc"]["estimate"] for s in (0, 1)])
           for lab in labels]
    drop = np.array(base) - np.array(dp1)
    assert [ld["by_setting"]["1"]["auroc_drop"][lab] for lab in labels] == pytest.approx(list(drop))
    assert ld["by_setting"]["1"]["vs_non_private_auroc"]["r"] == pytest.approx(pearsonr(base, drop).statistic)
    prev = [doc["study"]["data"]["prevalence"][lab] for lab in labels]
    assert ld["by_setting"]["1"]["vs_prevalence"]["r"] == pytest.approx(pearsonr(prev, drop).statistic)
    assert any("5 labels" in w and "says little" in w for w in doc["warnings"])


def test_bad_sweep_directories_are_refused_and_nothing_finished_is_lost(sweep_dir, tmp_path):
    before = _snapshot(sweep_dir)
    cases = [
        (["sweep", "pdac", *TINY, "--out", sweep_dir], "holds a sweep of task 'cxr', not 'pdac'"),
        (["sweep", "cxr", *TINY, "--image-size", "48", "--out", sweep_dir], "--image-size 32, not 48"),
        (["sweep", "cxr", *TINY, "--executor", "ray", "--ray-address", f"127.0.0.1:{_free_port()}",
          "--out", sweep_dir], "does not answer"),
    ]
    for args, needle in cases:
        res = invoke(*args)
        assert res.exit_code == 2, res.output
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert _snapshot(sweep_dir) == before

    study = tmp_path / "study"  # a folder that holds a run but is not a sweep
    study.mkdir()
    (study / "train.json").write_text("{}")
    res = invoke("sweep", "cxr", *TINY, "--out", study)
    assert res.exit_code == 2 and "not a sweep" in res.stderr
    assert [p.name for p in study.iterdir()] == ["train.json"]


# ---- Ray: resume, clip-only, failures, shadow models ------------------------------------------------------------
def test_ray_resumes_a_sweep_and_adds_a_clip_only_baseline(sweep_dir, tmp_path, ray_local):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    shutil.rmtree(copy / "eps=8" / "seed=1")  # as if that run had failed
    stale = copy / "eps=8" / ".seed=1.partial-killed"  # as if a run had been killed mid-way
    stale.mkdir()
    kept = {n: (copy / n / "train.json").stat().st_mtime_ns for n in ("eps=1/seed=0", "eps=inf/seed=1")}

    res = invoke("sweep", "cxr", "--epsilons", "1,8,inf,clip", "--seeds", "2", "--executor", "ray", *TINY,
                 "--out", copy)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    doc = _strict_json(copy / "audit.json")
    ex = doc["study"]["sweep"]["executor"]
    assert ex["executor"] == "ray" and ex["trained"] == 3 and ex["reused"] == 5
    assert {n: (copy / n / "train.json").stat().st_mtime_ns for n in kept} == kept  # finished runs not redone
    assert not stale.exists() and (copy / "eps=8" / "seed=1" / "predictions.csv").is_file()
    assert len(doc["models"]) == 8

    clip = doc["models"]["eps=clip/seed=0"]
    tj = _strict_json(copy / "eps=clip" / "seed=0" / "train.json")
    assert tj["dp"] is False and tj["epsilon"] is None and tj["clip_only"] is True  # no epsilon claimed
    assert tj["noise_multiplier"] == 0.0 and tj["max_grad_norm"] == 1.0 and tj["steps"] > 0
    assert clip["privacy"]["accountant"] is None and clip["run"]["noise_multiplier"] == 0.0
    agg = doc["study"]["aggregates"]["clip"]
    assert agg["kind"] == "clip_only" and agg["epsilon"]["mean"] is None and agg["macro_auroc"]["n_seeds"] == 2
    t = doc["study"]["trade_offs"]
    assert not any("clip" in n or "inf" in n for n in t["models"]) and t["macro_auroc"]["n"] == 4
    assert "clip" in t["label_difficulty"]["by_setting"]


def test_ray_job_failure_is_one_line(tmp_path, ray_local):
    out = tmp_path / "sw"
    res = invoke("sweep", "cxr", "--epsilons", "1,inf", "--executor", "ray", *TINY, "--batch-size", "5000",
                 "--out", out)
    assert res.exit_code == 2, res.output
    assert "--batch-size 5000 is larger than the training set" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (out / "eps=1").exists() or not any((out / "eps=1").iterdir())


def test_ray_trains_shadow_models_of_a_sweep_run(sweep_dir, tmp_path, ray_local):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    run = copy / "eps=inf" / "seed=0"  # its data sits at ../../data, the sweep's cohort
    res = invoke("attack", "lira", run, "--shadows", "2", "--offline", "--executor", "ray", "--n-boot", "10",
                 "--quiet")
    assert res.exit_code == 0, res.stderr
    assert all((run / "shadows" / f"shadow_{i}" / "stats.csv").is_file() for i in range(2))
    attacks = _strict_json(run / "audit.json")["models"]["eps=inf/seed=0"]["privacy"]["attacks"]
    assert attacks["lira_offline"] is not None
