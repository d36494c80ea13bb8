"""Hostile inputs against the library (issue 14): the audit must not leak what it audits, destroy what it is
given, or run code it was sent. One test per class; each asserts the outcome (the file that must survive is
intact, the identifier is absent, the mode is unchanged, the payload did not run).

The same checks through the command line are in ``test_hostile_cli.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from privaudit import _fs
from privaudit._fs import (atomic_write_bytes, clean_stale_partials, is_privaudit_dir, private_mkdir, staged_dir,
                           write_json, write_marker)
from privaudit.audit import AuditReport, run_audit
from privaudit.audit._cells import MIN_CELL, identifier_like, suppress_table
from privaudit.config import AuditConfig
from privaudit.errors import ConfigError, DataError, OutputExistsError
from privaudit.reports import render_html, write_report
from test_audit_engine import make_predictions

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and mode: what must survive, exactly."""
    return {str(p.relative_to(folder)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _data_folder(root: Path) -> Path:
    data = root / "data"
    (data / "images").mkdir(parents=True)
    (data / "manifest.csv").write_text("sample_id,path,split,patient_id\ns1,images/s1.png,train,p1\n")
    (data / "images" / "s1.png").write_bytes(b"\x89PNG not really")
    return data


@pytest.fixture
def no_figures(monkeypatch):
    """Skip drawing the figures (seconds per report) in tests about templates and files, not figures."""
    from collections import defaultdict

    from privaudit.reports import figures

    monkeypatch.setattr(figures, "figures", lambda doc: defaultdict(dict))
    # the report draws each figure set when a template reads it, through figures.BUILDERS
    monkeypatch.setattr(figures, "BUILDERS", defaultdict(lambda: lambda doc: defaultdict(dict)))


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ---- leaks ---------------------------------------------------------------------------------------------------
def test_identifier_columns_are_never_grouped_and_never_published(tmp_path):
    """Record numbers, file paths and near-unique codes, whether unknown, attr_-prefixed or named: no group,
    a warning that names the column and not a value, and no id, path or identifier anywhere in the outputs."""
    df = make_predictions(n=400, seed=2, patients="pairs")
    n = len(df)
    df["mrn"] = [f"MRN-{70000 + i}" for i in range(n)]                      # unknown column: not an attribute
    df["attr_file"] = [f"/secure/pacs/scan_{i:05d}.dcm" for i in range(n)]  # attr_ but one value per image
    df["ward"] = [f"WARD-{i % 4}" for i in range(n)]                         # a real (named) attribute
    df["accession"] = [f"ACC{i // 2 % 130:03d}" for i in range(n)]          # 130 > 50 distinct values
    df["code"] = [f"K{i // 2:03d}" if i < 60 else None for i in range(n)]    # one value per known patient
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=20, attributes=("sex", "accession", "code", "ward")))
    rep.validate()
    assert set(rep.models["m"]["fairness"]) == {"sex", "ward", "pearson_r"}
    for col in ("accession", "code"):
        [w] = [w for w in rep.warnings if f"'{col}'" in w]
        assert "identifier" in w and not re.search(r"ACC\d|K\d{3}", w)
    default = run_audit({"m": df}, config=AuditConfig(n_boot=20))
    assert set(default.models["m"]["fairness"]) == {"sex", "age_group", "pearson_r"}  # mrn, ward: not defaults
    assert any("'attr_file'" in w and "identifier" in w for w in default.warnings)

    for r in (rep, default):
        r.to_json(tmp_path / "audit.json")
        text = (tmp_path / "audit.json").read_text()
        html = render_html(r)
        for out in (text, html):
            assert not re.search(r"MRN-\d|/secure/pacs|scan_\d|ACC\d{3}|\bK\d{3}\b", out)
            for sid, pid in zip(df["sample_id"], df["patient_id"]):
                assert f'"{sid}"' not in out and f">{sid}<" not in out and f'"{pid}"' not in out
        assert "/secure" not in json.dumps(r.data["study"])
    for col in ("patient_id", "sample_id"):
        with pytest.raises(DataError, match="identifier or bookkeeping column"):
            run_audit({"m": df}, config=AuditConfig(n_boot=10, attributes=(col,)))
    only = run_audit({"m": df}, config=AuditConfig(n_boot=10, attributes=("mrn",)))  # nothing left to group
    assert set(only.models["m"]["fairness"]) == {"pearson_r"} and "MRN-7" not in render_html(only)


def test_identifier_rule():
    units = np.array([f"p{i}" for i in range(100)], dtype=object)
    assert identifier_like(np.array([f"v{i % 51}" for i in range(100)], dtype=object), units)  # > 50 values
    assert not identifier_like(np.array([f"v{i % 50}" for i in range(100)], dtype=object), units)
    few = np.array([f"v{i}" if i < 6 else None for i in range(100)], dtype=object)  # 6 values, 6 known patients
    assert identifier_like(few, units)
    assert not identifier_like(np.array(["F", "M"] * 50, dtype=object), units)


def test_small_cells_are_suppressed_everywhere_groups_appear(tmp_path):
    """A group of 3 patients: no count and no metric in the fairness groups, parity, aif360 metrics, the
    composition, the attacks by group or the warnings; with min_cell=3 it is shown again."""
    assert AuditConfig().min_cell == MIN_CELL == 10
    df = make_predictions(n=400, seed=3, patients="pairs")
    df.loc[df.index[:6], "sex"] = "X"   # rows 0-5: patients p0, p1, p2
    df.loc[df.index[:6], "split"] = ["test", "test", "train", "train", "test", "test"]
    df.loc[df.index[:6], "member"] = [0, 0, 1, 1, 0, 0]
    rep = run_audit({"a": df, "b": df.copy()}, reference="b", config=AuditConfig(n_boot=30))
    rep.validate()
    mark = {"n": None, "suppressed": True}
    doc = json.loads(rep.to_json())
    assert doc["schema_version"] == 3 and doc["study"]["min_cell"] == 10
    assert doc["study"]["data"]["composition"]["sex"]["groups"]["X"] == mark
    for name in ("a", "b"):
        fair = doc["models"][name]["fairness"]["sex"]
        for lab in ("a", "b", "macro"):
            assert fair[lab]["groups"]["X"] == mark and fair[lab]["performance_parity"]["X"] == mark
            for metric in ("statistical_parity_difference", "disparate_impact", "equal_opportunity_difference",
                           "average_odds_difference"):
                assert fair[lab][metric]["X"] == mark
                assert all(v["privileged"] == "rest" for g, v in fair[lab][metric].items() if g != "X")
            assert set(fair[lab]["groups"]) == {"F", "M", "X"} and fair[lab]["groups"]["F"]["auroc"]["estimate"]
        assert doc["models"][name]["privacy"]["attacks"]["loss"]["by_group"]["sex"].get("X", mark) == mark
    for w in doc["warnings"]:
        if re.search(r"\bX\b", w):
            assert set(re.findall(r"\d+", w)) <= {"10"}, w  # no count of X
    # the comparison of the two models judges F and M only
    assert "sex=X" not in json.dumps(doc["comparisons"])
    html = render_html(AuditReport(doc))
    assert html.count("suppressed") >= 4
    shown = run_audit({"a": df}, config=AuditConfig(n_boot=30, min_cell=2))
    assert shown.models["a"]["fairness"]["sex"]["macro"]["groups"]["X"]["n"] == 4
    with pytest.raises(ConfigError, match="min_cell"):
        AuditConfig(min_cell=0)


def test_split_counts_under_min_cell_are_hidden_with_a_complement():
    rows, cells = suppress_table({"A": [40, 4, 30], "B": [8, 0, 1], "C": [50, 12, 3]}, 10)
    assert rows == {"B"}                              # 9 patients in all
    assert cells == {("A", 1), ("A", 2), ("C", 2), ("C", 1)}  # 4 + 30 >= 10; 3 alone < 10, so 12 goes too
    rows, cells = suppress_table({"A": [40, 4, 30], "B": [8, 0, 1], "C": [50, 12, 30]}, 10, whole_rows=True)
    assert rows == {"A", "B"} and not cells


def test_schema_version_1_is_read_and_its_small_groups_are_hidden_in_the_report(tmp_path, no_figures):
    df = make_predictions(n=400, seed=4)
    df.loc[df.index[df["split"] == "test"][:4], "sex"] = "X"
    doc = json.loads(run_audit({"m": df}, config=AuditConfig(n_boot=10, min_cell=1)).to_json())
    doc["schema_version"] = 1
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(doc))
    back = AuditReport.from_json(path)
    back.validate()
    assert back.data["schema_version"] == 1
    [out] = write_report(path)
    html = out.read_text()
    assert "schema_version 1" in html and "suppressed" in html


def test_a_template_payload_does_not_run(tmp_path, no_figures):
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    rep.to_json(tmp_path / "audit.json")
    marker = tmp_path / "PWNED"
    payloads = [
        "{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}" % marker,
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ lipsum.__globals__['os'].system('touch %s') }}" % marker,
        "{% set x = doc.__class__.__init__.__globals__ %}{{ x }}",
    ]
    for i, payload in enumerate(payloads):
        tpl = tmp_path / f"tpl{i}"
        tpl.mkdir()
        (tpl / "report.html.j2").write_text(payload)
        with pytest.raises(DataError, match=r"--template .*(unsafe|SecurityError|UndefinedError)") as e:
            write_report(tmp_path / "audit.json", tmp_path / f"r{i}.html", template_dir=tpl)
        assert "\n" not in str(e.value)
        assert not marker.exists() and not (tmp_path / f"r{i}.html").exists()
    # a link inside the template folder to a file outside it is not read
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-KEY")
    tpl = tmp_path / "tpl_link"
    tpl.mkdir()
    (tpl / "leak.j2").symlink_to(secret)
    (tpl / "report.html.j2").write_text('{% include "leak.j2" %}')
    with pytest.raises(DataError, match="outside the template folder"):
        write_report(tmp_path / "audit.json", tmp_path / "leak.html", template_dir=tpl)
    assert not (tmp_path / "leak.html").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # WeasyPrint's note about a missing HarfBuzz-Subset
def test_a_pdf_embeds_no_file_outside_the_template_folder(tmp_path, no_figures):
    try:
        import weasyprint  # noqa: F401
    except OSError as e:  # pragma: no cover - the Pango libraries are missing
        pytest.skip(f"WeasyPrint cannot load Pango here: {e}")
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    rep.to_json(tmp_path / "audit.json")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-KEY")
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "inside.txt").write_text("fine")
    (tpl / "outside.txt").symlink_to(secret)
    for ref in (secret.as_uri(), "file:///etc/passwd", "outside.txt", "../secret.txt", "http://127.0.0.1:9/x.png"):
        (tpl / "report.html.j2").write_text(
            f'<html><body><p>report</p><img src="{ref}"><a rel="attachment" href="{ref}">a</a></body></html>')
        with pytest.raises(DataError, match="does not embed") as e:
            write_report(tmp_path / "audit.json", tmp_path / "r.pdf", fmt="pdf", template_dir=tpl)
        assert ref.split("/")[-1] in str(e.value) and not (tmp_path / "r.pdf").exists()
    (tpl / "report.html.j2").write_text('<html><body><a rel="attachment" href="inside.txt">a</a></body></html>')
    [pdf] = write_report(tmp_path / "audit.json", tmp_path / "r.pdf", fmt="pdf", template_dir=tpl)
    assert b"TOP-SECRET" not in pdf.read_bytes()


# ---- destruction ---------------------------------------------------------------------------------------------
def test_force_replaces_only_a_folder_privaudit_wrote(tmp_path):
    data = _data_folder(tmp_path)
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("years of work")
    (other / "train.json").write_text('{"note": "not a run"}')  # a file name alone does not make a run
    before = {p: _tree(p) for p in (data, other)}
    for folder in (data, other):
        with pytest.raises(OutputExistsError, match="privaudit did not write") as e:
            with staged_dir(folder, force=True) as tmp:
                (tmp / "x").write_text("new")
        assert "\n" not in str(e.value)
        assert _tree(folder) == before[folder] and not _leftovers(tmp_path, folder.name)
    assert not is_privaudit_dir(data) and "manifest.csv" not in _fs.RUN_MARKERS

    run = tmp_path / "run"
    with staged_dir(run, kind="run") as tmp:
        (tmp / "old.txt").write_text("old")
    assert is_privaudit_dir(run) == "run"
    with staged_dir(run, force=True, kind="run") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(run)) == [".privaudit", "new.txt"] and not _leftovers(tmp_path, "run")


@pytest.mark.parametrize("kind,files", [
    ("run", {"train.json": '{"dp": true}', "predictions.csv": "sample_id\n"}),
    ("study", {"audit.json": '{"schema_version": 1, "models": {}}'}),
    ("sweep", {"sweep.json": '{"kind": "privaudit epsilon sweep"}'}),
    ("cache", {"cache.json": '{"kind": "privaudit image cache"}'}),
    ("cohort", {"cohort.json": '{"generator": "privaudit.data.synth_cxr"}', "manifest.csv": "x\n"}),
    (None, {"manifest.csv": "x\n", "audit.json": '{"schema_version": "1"}', "predictions.csv": "x\n"}),
])
def test_folders_written_by_older_versions_are_recognised(tmp_path, kind, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert is_privaudit_dir(tmp_path) == kind


def test_an_output_holding_the_input_home_cwd_or_root_is_refused(tmp_path, monkeypatch):
    data = _data_folder(tmp_path / "project")
    study = tmp_path / "project"
    write_marker(study, "study")  # even a folder privaudit wrote
    before = _tree(study)
    cases = [(study, {"inputs": [data / "manifest.csv"]}, "input"),
             (data, {"inputs": [data]}, "input"),
             (tmp_path / "link", {"inputs": [data]}, "input")]
    (tmp_path / "link").symlink_to(study)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    cases += [(home, {}, "home folder"), (tmp_path, {}, "home folder"), (Path("/"), {}, "root")]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cases += [(Path("."), {}, "working directory"), (work, {}, "working directory")]
    for out, kw, what in cases:
        with pytest.raises(ConfigError, match=what) as e:
            with staged_dir(out, force=True, **kw):
                pytest.fail("staging started")
        assert "\n" not in str(e.value) and str(out.absolute()) in str(e.value)
    assert _tree(study) == before and not list(tmp_path.glob(".*.lock"))


def test_report_out_never_overwrites_a_file_it_did_not_write(tmp_path, no_figures):
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    rep.to_json(tmp_path / "audit.json")
    mine = tmp_path / "notes.html"
    mine.write_text("my own notes")
    mine.chmod(0o640)
    with pytest.raises(OutputExistsError, match="--force") as e:
        write_report(tmp_path / "audit.json", mine)
    assert "\n" not in str(e.value)
    assert mine.read_text() == "my own notes" and stat.S_IMODE(mine.stat().st_mode) == 0o640
    with pytest.raises(ConfigError, match="audit.json the report is rendered from"):
        write_report(tmp_path / "audit.json", tmp_path / "audit.json", force=True)
    assert json.loads((tmp_path / "audit.json").read_text())["schema_version"] == 3
    write_report(tmp_path / "audit.json", mine, force=True)
    assert mine.read_text().startswith("<!DOCTYPE html>") and stat.S_IMODE(mine.stat().st_mode) == 0o640
    # re-rendering beside its own audit.json overwrites, with or without --out
    for out in (None, tmp_path / "report.html"):
        assert write_report(tmp_path / "audit.json", out) == [tmp_path / "report.html"]


def test_planted_symlinks_do_not_redirect_writes(tmp_path, no_figures):
    """A run folder someone sends you, with links at every name privaudit used to write through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "received_run"
    run.mkdir()
    for name in ("audit.json.tmp", ".audit.json.tmp", ".report.html.tmp", "report.html.tmp", "stats.csv.tmp",
                 "attack_scores.csv.tmp", "predictions.csv", "config.json.tmp", "report.html", "manifest.csv.tmp"):
        (run / name).symlink_to(victim)
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    rep.to_json(run / "audit.json")
    write_report(run / "audit.json")
    write_json(run / "config.json", {"a": 1})
    atomic_write_bytes(run / "stats.csv", b"x")
    from privaudit.predictions import write_predictions
    write_predictions(make_predictions(n=20), run / "predictions.csv")
    assert victim.read_text() == "precious"
    assert not (run / "predictions.csv").is_symlink() and stat.S_IMODE((run / "predictions.csv").stat().st_mode) == 0o600
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    # a link at the lock file's name is refused, not followed
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        with staged_dir(tmp_path / "out"):
            pass
    assert victim.read_text() == "precious" and not (tmp_path / "out").exists()
    # and an output that is itself a link is refused
    (tmp_path / "linked").symlink_to(run)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        with staged_dir(tmp_path / "linked", force=True):
            pass


_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from privaudit._fs import install_signal_handlers, staged_dir
    install_signal_handlers()
    out, tag, hold = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    with staged_dir(out, kind="run") as tmp:
        (tmp / "who.txt").write_text(tag)
        (out.parent / f"{tag}.ready").write_text("1")
        t0 = time.time()  # hold the staging until the test says so (or for at most `hold` seconds)
        while not (out.parent / f"{tag}.release").exists() and time.time() - t0 < hold:
            time.sleep(0.05)
    print("done", tag)
""")


def _holder(out: Path, tag: str, hold: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), tag, str(hold)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the process never got going"
        time.sleep(0.05)


def test_two_processes_on_one_out(tmp_path):
    """Two real processes stage the same output: the second fails at once with one line, the first's staging
    folder survives the second's clean-up, and the first's result is what is left."""
    out = tmp_path / "out"
    first = _holder(out, "first", 120.0)
    try:
        _wait_for(tmp_path / "first.ready", first)
        [partial] = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        second = _holder(out, "second", 0.0)
        t0 = time.time()
        _, err = second.communicate(timeout=60)
        assert second.returncode != 0 and time.time() - t0 < 30
        last = err.strip().splitlines()[-1]
        assert "OutputExistsError" in last and "being written by another privaudit process" in last
        assert clean_stale_partials(out) == 0 and partial.is_dir()  # a sweep's clean-up spares a live folder
        (tmp_path / "first.release").write_text("1")
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert (out / "who.txt").read_text() == "first" and not _leftovers(tmp_path, "out")
    third = _holder(out, "third", 0.0)   # later, without --force: refused, the first result intact
    _, err = third.communicate(timeout=60)
    assert third.returncode != 0 and "already holds a run or other output privaudit wrote" in err
    assert (out / "who.txt").read_text() == "first"


def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="already holds files"):
        with staged_dir(out) as tmp:
            (tmp / "mine").write_text("new")
            out.mkdir()
            (out / "theirs").write_text("someone else's")   # written by something that takes no lock
    assert os.listdir(out) == ["theirs"] and not _leftovers(tmp_path, "out")
    # renameat2's RENAME_NOREPLACE (or its fallback) refuses an existing target
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        _fs.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").is_dir()


def test_stale_staging_folders_of_a_killed_process_are_removed(tmp_path):
    stale = tmp_path / ".out.partial-abc123"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"half")
    aside = tmp_path / ".out.old-xyz"
    aside.mkdir()
    with staged_dir(tmp_path / "out") as tmp:
        assert not stale.exists() and not aside.exists()
        (tmp / "f").write_text("x")
    assert clean_stale_partials(tmp_path / "out") == 0


def test_existing_folders_keep_their_mode(tmp_path, monkeypatch):
    shared = tmp_path / "team_cache"
    shared.mkdir()
    shared.chmod(0o2775)
    private_mkdir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2775
    new = private_mkdir(tmp_path / "a" / "new")
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    from privaudit.data import volumes

    monkeypatch.setenv("PRIVAUDIT_CACHE_DIR", str(shared))
    assert volumes._private_dir(volumes.cache_dir()) == shared
    assert stat.S_IMODE(shared.stat().st_mode) == 0o2775
    # the user's own empty --out keeps the mode they gave it
    given = tmp_path / "given"
    given.mkdir()
    given.chmod(0o750)
    with staged_dir(given, kind="cohort") as tmp:
        (tmp / "manifest.csv").write_text("x\n")
    assert stat.S_IMODE(given.stat().st_mode) == 0o750 and (given / "manifest.csv").exists()


def test_sigterm_leaves_no_partial_folder(tmp_path):
    out = tmp_path / "out"
    proc = _holder(out, "victim", 60.0)
    try:
        _wait_for(tmp_path / "victim.ready", proc)
        assert _leftovers(tmp_path, "out")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert not out.exists() and not _leftovers(tmp_path, "out")
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())
