"""Hostile inputs through the command line (issue 14), as a user meets them: ``python -m privaudit.cli ...`` in
a separate process. A refusal is exit code 2 with one line on stderr and no traceback; what must survive is
compared byte for byte and mode for mode.

The library-level versions of these checks are in ``test_hostile.py``. :class:`TestWiredWithIssue13` holds the
checks of options and wiring that arrive with issue 13 (``report --force``, ``--min-cell``, SIGTERM handled
by ``cli.main``, the data paths passed to ``staged_dir``); they are skipped until then.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_audit_engine import make_predictions

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ("data", "synth", "cxr", "--n", "40", "--image-size", "16", "--seed", "1", "--quiet")


def cli(*args, cwd: Path | None = None, env: dict | None = None, wait: bool = True):
    """Run ``python -m privaudit.cli ARGS`` in its own process; returns the CompletedProcess (or the Popen)."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "400"}
    cmd = [sys.executable, "-m", "privaudit.cli", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def refused(res, *needles: str) -> str:
    """Exit code 2, one line on stderr naming what is wrong, no traceback; returns the line."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, stat.S_IMODE(p.lstat().st_mode))
            for p in sorted([folder, *folder.rglob("*")])}


def data_folder(root: Path) -> Path:
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "manifest.csv").write_text("sample_id,path,split,patient_id\ns1,images/s1.png,train,p1\n")
    (data / "images" / "s1.png").write_bytes(b"\x89PNG not really")
    return data


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    """An audit.json (with report.html) of a prediction file from outside."""
    root = tmp_path_factory.mktemp("audited")
    make_predictions(n=300, seed=1).to_csv(root / "preds.csv", index=False)
    res = cli("audit", "--predictions", root / "preds.csv", "--out", root / "a", "--n-boot", "20")
    assert res.returncode == 0, res.stderr
    return root / "a" / "audit.json"


# ---- leaks ---------------------------------------------------------------------------------------------------
def test_identifiers_and_small_groups_stay_out_of_audit_json_and_the_report(tmp_path):
    df = make_predictions(n=400, seed=2, patients="pairs")
    df["mrn"] = [f"MRN-{70000 + i}" for i in range(len(df))]
    df["attr_path"] = [f"/secure/pacs/scan_{i:05d}.dcm" for i in range(len(df))]
    df["site"] = ["tiny-site" if i < 6 else "main-site" for i in range(len(df))]  # 3 patients
    df.to_csv(tmp_path / "preds.csv", index=False)
    res = cli("audit", "--predictions", tmp_path / "preds.csv", "--out", tmp_path / "a", "--n-boot", "20",
              "--attributes", "sex,site,mrn")
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert doc["schema_version"] == 3 and "mrn" not in doc["models"]["preds"]["fairness"]
    assert any("'mrn'" in w and "identifier" in w for w in doc["warnings"])
    assert doc["study"]["data"]["composition"]["site"]["groups"]["tiny-site"] == {"n": None, "suppressed": True}
    for text in ((tmp_path / "a" / "audit.json").read_text(), (tmp_path / "a" / "report.html").read_text()):
        assert not re.search(r"MRN-\d|/secure/pacs|scan_\d", text)
        for sid in df["sample_id"]:
            assert f'"{sid}"' not in text and f">{sid}<" not in text
    assert "MRN-7" not in res.stdout + res.stderr


def test_a_template_payload_does_not_run(audited, tmp_path):
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    marker = tmp_path / "PWNED"
    (tpl / "report.html.j2").write_text("{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}" % marker)
    refused(cli("report", audited, "--template", tpl, "--out", tmp_path / "r.html"), "--template", "unsafe")
    assert not marker.exists() and not (tmp_path / "r.html").exists()


def test_a_pdf_does_not_embed_local_files(audited, tmp_path):
    pytest.importorskip("weasyprint")
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-KEY")
    (tpl / "report.html.j2").write_text(f'<html><body><img src="{secret.as_uri()}">'
                                        f'<a rel="attachment" href="{secret.as_uri()}">x</a></body></html>')
    refused(cli("report", audited, "--template", tpl, "--format", "pdf", "--out", tmp_path / "r.pdf"),
            "secret.txt", "does not embed")
    assert not (tmp_path / "r.pdf").exists()


# ---- destruction ---------------------------------------------------------------------------------------------
def test_force_on_a_data_folder_or_an_unrelated_folder_is_refused(tmp_path):
    data = data_folder(tmp_path)
    other = tmp_path / "papers"
    other.mkdir()
    (other / "draft.tex").write_text("years of work")
    for folder in (data, other):
        before = tree(folder)
        refused(cli(*SYNTH, "--out", folder, "--force"), str(folder), "privaudit did not write")
        assert tree(folder) == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{folder.name}.")]


def test_an_output_that_is_the_input_the_working_directory_or_home_is_refused(tmp_path):
    cohort = tmp_path / "cohort"
    assert cli(*SYNTH, "--out", cohort).returncode == 0   # a folder privaudit wrote: --force alone would replace it
    before = tree(cohort)
    refused(cli(*SYNTH, "--out", ".", "--force", cwd=cohort), "working directory")
    refused(cli(*SYNTH, "--out", cohort, "--force", env={"HOME": str(cohort)}), "home folder")
    refused(cli("data", "cache", cohort, "--image-size", "16", "--out", cohort, "--force"), "input")
    assert tree(cohort) == before


def test_report_out_refuses_an_existing_file_and_keeps_its_mode(audited, tmp_path):
    mine = tmp_path / "mine.html"
    mine.write_text("my notes")
    mine.chmod(0o640)
    refused(cli("report", audited, "--out", mine), str(mine), "already exists")
    assert mine.read_text() == "my notes" and stat.S_IMODE(mine.stat().st_mode) == 0o640


def test_planted_symlinks_in_a_received_run_folder_redirect_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "received"
    run.mkdir()
    make_predictions(n=300, seed=4).to_csv(run / "predictions.csv", index=False)
    (run / "train.json").write_text(json.dumps({"dp": False, "backend": "opacus", "task": "cxr"}))
    for name in ("audit.json.tmp", ".audit.json.tmp", ".report.html.tmp", "report.html", "audit.json"):
        (run / name).symlink_to(victim)
    res = cli("audit", run, "--n-boot", "20")
    assert res.returncode == 0, res.stderr
    assert victim.read_text() == "precious"
    assert json.loads((run / "audit.json").read_text())["schema_version"] == 3
    assert not (run / "report.html").is_symlink()


def test_two_processes_on_one_out(tmp_path):
    """Two real processes write one --out: one wins, the other exits 2 with one line; nothing is replaced."""
    out = tmp_path / "out"
    first = cli("data", "synth", "cxr", "--n", "400", "--image-size", "32", "--seed", "1", "--quiet", "--out", out,
                wait=False)
    try:
        t0 = time.time()
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]:
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()
            time.sleep(0.05)
        second = cli(*SYNTH, "--out", out)
        line = refused(second, str(out))
        assert "being written by another privaudit process" in line or "privaudit wrote" in line
        assert first.wait(timeout=300) == 0, first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 401   # the first one's cohort, whole


def test_an_existing_out_folder_keeps_its_mode(tmp_path):
    given = tmp_path / "shared"
    given.mkdir()
    given.chmod(0o2770)
    assert cli(*SYNTH, "--out", given).returncode == 0
    assert stat.S_IMODE(given.stat().st_mode) == 0o2770 and (given / "manifest.csv").is_file()


# ---- wired with issue 13 -------------------------------------------------------------------------------------
class TestWiredWithIssue13:
    """Options and wiring that NOTES.md asks issue 13's CLI to add; unskip when it lands."""

    def test_report_force_replaces_a_file_and_keeps_its_mode(self, audited, tmp_path):
        mine = tmp_path / "mine.html"
        mine.write_text("my notes")
        mine.chmod(0o640)
        assert cli("report", audited, "--out", mine, "--force").returncode == 0
        assert mine.read_text().startswith("<!DOCTYPE html>") and stat.S_IMODE(mine.stat().st_mode) == 0o640

    def test_min_cell(self, tmp_path):
        df = make_predictions(n=400, seed=2)
        df.loc[df.index[df["split"] == "test"][:4], "sex"] = "X"
        df.to_csv(tmp_path / "preds.csv", index=False)
        res = cli("audit", "--predictions", tmp_path / "preds.csv", "--out", tmp_path / "a", "--n-boot", "20",
                  "--min-cell", "3")
        assert res.returncode == 0, res.stderr
        doc = json.loads((tmp_path / "a" / "audit.json").read_text())
        assert doc["study"]["min_cell"] == 3
        assert doc["models"]["preds"]["fairness"]["sex"]["macro"]["groups"]["X"]["n"] == 4
        refused(cli("audit", "--predictions", tmp_path / "preds.csv", "--out", tmp_path / "b", "--min-cell", "0"),
                "--min-cell")

    def test_sigterm_leaves_no_partial_folder(self, tmp_path):
        out = tmp_path / "out"
        # big enough that the synthesis is still running when the signal lands, even on a loaded machine
        proc = cli("data", "synth", "cxr", "--n", "20000", "--image-size", "64", "--quiet", "--out", out, wait=False)
        try:
            t0 = time.time()
            while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]:
                assert proc.poll() is None and time.time() - t0 < 120
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, (proc.returncode, err[-2000:])
        assert list(tmp_path.iterdir()) == []

    def test_train_out_holding_its_data_is_refused(self, tmp_path):
        cohort = tmp_path / "cohort"
        assert cli(*SYNTH, "--out", cohort).returncode == 0
        before = tree(cohort)
        refused(cli("train", "cxr", "--data", cohort / "manifest.csv", "--out", cohort, "--force", "--epochs", "1"),
                "input")
        assert tree(cohort) == before

    def test_audit_out_holding_its_predictions_is_refused(self, tmp_path):
        make_predictions(n=300, seed=1).to_csv(tmp_path / "preds.csv", index=False)
        study = tmp_path / "study"
        assert cli("audit", "--predictions", tmp_path / "preds.csv", "--out", study, "--n-boot", "10").returncode == 0
        (tmp_path / "preds.csv").rename(study / "preds.csv")
        before = tree(study)
        refused(cli("audit", "--predictions", study / "preds.csv", "--out", study, "--force", "--n-boot", "10"),
                "input")
        assert tree(study) == before
