"""Odd and oversized input through the command line, as a user runs it: a separate process, and every case
either succeeds or exits 2 with exactly one line on stderr and no traceback.

The library-level cases (and how each hostile file is made) are in test_hostile_robust.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_audit_engine import make_predictions
from test_hostile_robust import png_declaring

ROOT = Path(__file__).parents[1]
NOISE = ("inFairness", "oneDNN", "cpu_feature_guard", "absl::InitializeLog", "No module named", "To enable the "
         "following instructions")


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "privaudit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def no_noise(res: subprocess.CompletedProcess) -> None:
    for noise in NOISE:
        assert noise not in res.stderr + res.stdout, (noise, res.stderr[-3000:])


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory) -> Path:
    """A study directory with an audit.json (one DP model called eps3, one non-private) written by the library."""
    from privaudit.audit import run_audit
    from privaudit.config import AuditConfig

    run = {"dp": True, "epsilon": 3.0, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1.0,
           "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0, "poisson_sampling": True,
           "backend": "opacus", "architecture": "resnet9-gn", "seed": 0}
    df = make_predictions(n=300, seed=2)
    df["site"] = ["[/x]" if i % 2 else "[/y]" for i in range(len(df))]   # closing tags: rich cannot parse them
    out = tmp_path_factory.mktemp("study")
    run_audit({"eps3": df, "non_private": df}, runs={"eps3": run}, config=AuditConfig(n_boot=20)).to_json(
        out / "audit.json")
    return out


@pytest.fixture(scope="module")
def preds(tmp_path_factory) -> Path:
    df = make_predictions(n=300, seed=3)
    df["site"] = [["$\\foo$", "_x", "a^b", "[/x]"][i % 4] for i in range(len(df))]
    f = tmp_path_factory.mktemp("preds") / "preds.csv"
    df.to_csv(f, index=False)
    return f


# ---- files of the wrong kind or shape -------------------------------------------------------------------------
def test_policy_naming_a_folder(audit_dir, tmp_path):
    one_line_error(cli("check", audit_dir, "--policy", tmp_path), str(tmp_path), "folder")


@pytest.mark.parametrize("text, needle", [
    ("policy = [1, 2]\n", "must be a table"),
    ("[policy]\nmodels = {a = 1}\nmin_auroc = 0.5\n", "'models' must be a list"),
    ("[policy]\nmax_parity_gap_by_attribute = 'sex'\n", "table of attribute"),
])
def test_policy_of_the_wrong_shape(audit_dir, tmp_path, text, needle):
    f = tmp_path / "p.toml"
    f.write_text(text)
    one_line_error(cli("check", audit_dir, "--policy", f), needle)


def test_valid_json_that_is_not_an_audit(tmp_path):
    doc = {"schema_version": 1, "study": {}, "models": {"m": {"run": 3}}, "comparisons": {}, "warnings": []}
    f = tmp_path / "audit.json"
    f.write_text(json.dumps(doc))
    policy = tmp_path / "p.toml"
    policy.write_text("[policy]\nmin_auroc = 0.5\n")
    for args in (("check", f, "--policy", policy), ("report", f)):
        one_line_error(cli(*args), str(f), "not a valid audit.json", "at $.")
    assert not (tmp_path / "report.html").exists()


def test_model_card_that_is_not_utf8(audit_dir, tmp_path):
    card = tmp_path / "card.toml"
    card.write_bytes('description = "caf\xe9"\n'.encode("latin-1"))
    one_line_error(cli("report", audit_dir, "--model-card", card, "--out", tmp_path / "r.html"), str(card), "UTF-8")
    assert not (tmp_path / "r.html").exists()


# ---- oversized options ----------------------------------------------------------------------------------------
def test_absurd_numeric_options_are_refused_up_front(preds, tmp_path):
    one_line_error(cli("audit", "--predictions", preds, "--out", tmp_path / "a", "--n-boot", "10000000"),
                   "--n-boot 10000000 is above the limit")
    one_line_error(cli("train", "cxr", "--image-size", "100000", "--out", tmp_path / "t"), "--image-size 100000")
    one_line_error(cli("data", "synth", "cxr", "--n", "100000000", "--out", tmp_path / "s"), "above the limit")
    assert not any(p.name in ("a", "t", "s") for p in tmp_path.iterdir())


# ---- images ---------------------------------------------------------------------------------------------------
def test_data_cache_refuses_a_bomb_and_absurd_sizes(cohort, tmp_path):
    folder = tmp_path / "cohort"
    shutil.copytree(cohort.parent, folder)
    shutil.rmtree(folder / ".privaudit-cache", ignore_errors=True)
    one_line_error(cli("data", "cache", folder / "manifest.csv", "--image-size", "100000"), "--image-size 100000")
    victim = sorted((folder / "images").glob("*.png"))[4]
    png_declaring(victim, 9000, 8000)
    one_line_error(cli("data", "cache", folder / "manifest.csv", "--image-size", "16", "--jobs", "2"),
                   victim.name, "MAX_IMAGE_PIXELS")
    assert not (folder / ".privaudit-cache").exists()


# ---- names from data ------------------------------------------------------------------------------------------
def test_mathtext_and_markup_group_names_audit_and_render_without_noise(preds, tmp_path):
    """A full `privaudit audit --predictions` with groups called $\\foo$, _x, a^b and [/x]: it succeeds, the
    report draws them, and the output holds no third-party import lines."""
    res = cli("audit", "--predictions", preds, "--out", tmp_path / "a", "--n-boot", "20")
    assert res.returncode == 0, res.stderr[-3000:]
    no_noise(res)
    html = (tmp_path / "a" / "report.html").read_text()
    assert "$\\foo$" in html and "a^b" in html and "[/x]" in html


def test_the_example_policy_checks_a_single_run_named_eps3(audit_dir, tmp_path):
    single = tmp_path / "eps3"
    single.mkdir()
    doc = json.loads((audit_dir / "audit.json").read_text())
    doc["models"] = {"eps3": doc["models"]["eps3"]}
    doc["models"]["eps3"]["fairness"].pop("site")   # its markup names are the case above
    doc["comparisons"] = {}
    (single / "audit.json").write_text(json.dumps(doc))
    res = cli("check", single, "--policy", ROOT / "examples" / "policy.toml")
    assert res.returncode in (0, 1), res.stderr   # checked (pass or fail), not refused
    assert "eps3" in res.stdout and "Traceback" not in res.stderr


def test_a_model_name_in_rich_markup(preds, tmp_path):
    res = cli("audit", "--predictions", preds, "--name", "[/x]", "--out", tmp_path / "a", "--n-boot", "20")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "[/x]" in res.stdout


def test_check_prints_group_names_in_rich_markup(audit_dir, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[policy]\nmax_parity_gap = 0.5\n")
    res = cli("check", audit_dir, "--policy", policy)
    assert res.returncode in (0, 1) and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "[/x]" in res.stdout or "[/y]" in res.stdout


def test_out_below_a_regular_file(preds, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(cli("audit", "--predictions", preds, "--out", blocker / "a", "--n-boot", "20"), str(blocker))
    one_line_error(cli("data", "synth", "cxr", "--n", "40", "--image-size", "16", "--out", blocker / "s"),
                   str(blocker))


# ---- the wiring of issue 15 in the CLI, in-process (fast) -----------------------------------------------------
def refused_in_process(res, *needles: str) -> str:
    """exit 2 and one line on stderr that holds every needle (CliRunner keeps stdout and stderr apart)."""
    lines = [line for line in (res.stderr or "").splitlines() if line.strip()]
    assert res.exit_code == 2, (res.exit_code, res.output[-2000:], res.stderr[-2000:], res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_counts_of_models_and_samples_are_refused_before_any_work(tmp_path):
    from conftest import invoke

    run = tmp_path / "run"
    run.mkdir()
    line = refused_in_process(invoke("attack", "lira", run, "--shadows", "5000"), "--shadows 5000 is above the limit 1024")
    assert "MAX_SHADOWS" in line
    refused_in_process(invoke("attack", "rmia", run, "--references", "2000"), "--references 2000 is above the limit")
    refused_in_process(invoke("attack", "lira", run, "--shadows", "4", "--jobs", "5000"), "--jobs 5000 is above")
    assert list(run.iterdir()) == []   # no shadows/ folder, no lock
    many = ",".join(str(e) for e in range(1, 102))
    refused_in_process(invoke("sweep", "cxr", "--epsilons", many, "--out", tmp_path / "s"), "--epsilons 101 is above")
    refused_in_process(invoke("sweep", "cxr", "--seeds", "5000", "--out", tmp_path / "s"), "--seeds 5000 is above")
    refused_in_process(invoke("sweep", "cxr", "--jobs", "5000", "--out", tmp_path / "s"), "--jobs 5000 is above")
    refused_in_process(invoke("train", "cxr", "--n-samples", "2000000", "--out", tmp_path / "t"),
                       "--n-samples 2000000 is above the limit 1000000")
    refused_in_process(invoke("data", "synth", "pdac", "--image-size", "300", "--out", tmp_path / "c"),
                       "--image-size 300 is above the limit 256", "MAX_VOLUME_SIZE")
    refused_in_process(invoke("train", "cxr", "--max-grad-norm", "inf", "--out", tmp_path / "t"),
                       "--max-grad-norm must be a finite number")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_python_api_refuses_the_same_counts(tmp_path):
    import privaudit
    from privaudit.errors import ConfigError

    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"^shadows 5000 is above the limit 1024"):
        privaudit.attack("lira", tmp_path / "run", shadows=5000)
    with pytest.raises(ConfigError, match=r"^seeds 5000 is above"):
        privaudit.sweep("cxr", seeds=5000, out=tmp_path / "s")
    with pytest.raises(ConfigError, match=r"^n_samples 2000000 is above"):
        privaudit.train("cxr", n_samples=2_000_000, out=tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_out_below_a_regular_file_for_every_writer(tmp_path):
    from conftest import invoke

    blocker = tmp_path / "file"
    blocker.write_text("mine")
    refused_in_process(invoke("sweep", "cxr", "--out", blocker / "s"), str(blocker), "is a file, not a folder")
    refused_in_process(invoke("train", "cxr", "--n-samples", "60", "--out", blocker / "t"), str(blocker))
    refused_in_process(invoke("train-and-audit", "cxr", "--n-samples", "60", "--out", blocker / "deeper" / "t"),
                       str(blocker))
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_out_path_in_rich_markup_is_printed_as_typed(tmp_path):
    from conftest import invoke

    out = tmp_path / "[/x][bold]"
    res = invoke("data", "synth", "cxr", "--n", "40", "--image-size", "16", "--out", out, "--quiet")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert "[/x][bold]" in res.stdout and (out / "manifest.csv").is_file()


def test_check_exits_2_not_1_when_something_unexpected_breaks(audit_dir, tmp_path, monkeypatch):
    """An uncaught exception would exit 1, which CI reads as "the policy failed"."""
    from conftest import invoke
    from privaudit.reports import policy

    def broken(*args, **kwargs):
        raise TypeError("unsupported operand type(s) for -: 'str' and\nfloat")

    monkeypatch.setattr(policy, "evaluate", broken)
    p = tmp_path / "p.toml"
    p.write_text("[policy]\nmin_auroc = 0.5\n")
    line = refused_in_process(invoke("check", audit_dir, "--policy", p), "internal error (TypeError: unsupported",
                              "PRIVAUDIT_DEBUG=1")
    assert "float" not in line   # one line: the message's first line only
    monkeypatch.setenv("PRIVAUDIT_DEBUG", "1")
    res = invoke("check", audit_dir, "--policy", p)
    assert isinstance(res.exception, TypeError)


def test_data_cache_verify(cohort, tmp_path):
    import numpy as np

    from conftest import invoke

    folder = tmp_path / "cohort"
    shutil.copytree(cohort.parent, folder)
    shutil.rmtree(folder / ".privaudit-cache", ignore_errors=True)
    manifest = folder / "manifest.csv"
    refused_in_process(invoke("data", "cache", manifest, "--image-size", "16", "--verify"), "no image cache at 16 px")
    assert invoke("data", "cache", manifest, "--image-size", "16", "--jobs", "1", "--quiet").exit_code == 0
    res = invoke("data", "cache", manifest, "--image-size", "16", "--verify", "--jobs", "1", "--quiet")
    assert res.exit_code == 0 and "all 60 images match" in res.stdout, (res.stdout, res.stderr)
    refused_in_process(invoke("data", "cache", manifest, "--image-size", "16", "--verify", "--force"),
                       "--verify or --force, not both")
    # a cache whose pixels no longer match its files (copied from elsewhere), with every size and time as recorded
    (npy,) = (folder / ".privaudit-cache").glob("*/images.npy")
    arr = np.load(npy, mmap_mode="r+")
    arr[7] = 1.0 - arr[7]
    arr.flush()
    del arr
    res = invoke("data", "cache", manifest, "--image-size", "16", "--verify", "--jobs", "1", "--quiet")
    assert res.exit_code == 1, (res.stdout, res.stderr)
    assert "1 image(s) differ from their files" in res.stdout and "rebuild it with --force" in res.stdout


def test_quiet_process_drops_optional_dependency_notices_only(monkeypatch, caplog):
    import logging

    from privaudit import _quiet

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv(_quiet.SHOW_ENV, raising=False)
    root = logging.getLogger()
    before = list(root.filters)
    try:
        _quiet.quiet_process()
        _quiet.quiet_process()   # idempotent: one filter
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
        assert len(root.filters) == len(before) + 1
        with caplog.at_level(logging.WARNING):
            logging.warning("No module named 'inFairness': SenSeI and SenSR will be unavailable.")
            logging.warning("something else a package says")
        assert [r.getMessage() for r in caplog.records] == ["something else a package says"]
    finally:
        root.filters[:] = before
