"""CheXpert-labeler label policies (U-Ignore / U-Zeros / U-Ones, blank, the No Finding rule) against labels
worked out by hand and against torchxrayvision's reading, and the audit's flag for labels with too few known
positives or negatives in the test split."""

from __future__ import annotations

import itertools
import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import invoke
from test_presets import CHEXPERT_FINDINGS, chexpert_row, make_chexpert, make_mimic, make_nih, nih_row

from privaudit.data.presets import CHEXPERT_LABEL_MAP, load_data
from privaudit.errors import ConfigError
from privaudit.tasks import create_task

TASK = create_task("cxr")
N = float("nan")
SOURCES = ("Cardiomegaly", "Edema", "Pleural Effusion", "Pneumonia", "Consolidation", "Atelectasis")

# One row per patient: (No Finding, Support Devices, Cardiomegaly, Edema, Pleural Effusion, Pneumonia,
# Consolidation, Atelectasis); None is a blank cell. Rows are consistent as the CheXpert labeler writes them:
# No Finding = 1 only where no finding is 1 or -1.
TABLE = [
    (1, None, None, None, None, None, None, None),    # 1: No Finding, everything blank
    (1, None, 0, None, None, None, None, None),       # 2: No Finding, one explicit negative
    (None, None, 1, -1, None, 0, None, 0),            # 3
    (None, None, None, 0, -1, -1, -1, 1),             # 4
    (None, None, -1, None, 1, -1, 0, -1),             # 5
    (None, None, None, None, None, None, None, None),  # 6: nothing mentioned, no No Finding
    (1, 1, None, 0, None, 0, 0, None),                # 7: No Finding with a support device
]

# Task labels by hand: cardiomegaly, congestion (Edema), pleural_effusion, pneumonic_infiltrates
# (Pneumonia or Consolidation: 1 if either is 1, 0 if both are 0, else unknown), atelectasis.
BY_HAND = {
    ("ignore", "unknown", "negative"): [   # the defaults, torchxrayvision's reading
        [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, N, N, N, 0], [N, 0, N, N, 1], [N, N, 1, N, N], [N, N, N, N, N],
        [0, 0, 0, 0, 0]],
    ("zeros", "unknown", "negative"): [
        [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, N, N, 0], [N, 0, 0, 0, 1], [0, N, 1, 0, 0], [N, N, N, N, N],
        [0, 0, 0, 0, 0]],
    ("ones", "unknown", "negative"): [
        [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, N, N, 0], [N, 0, 1, 1, 1], [1, N, 1, 1, 1], [N, N, N, N, N],
        [0, 0, 0, 0, 0]],
    ("ignore", "negative", "negative"): [
        [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, N, 0, 0, 0], [0, 0, N, N, 1], [N, 0, 1, N, N], [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0]],
    ("ignore", "unknown", "ignore"): [     # the No Finding rule off: blanks stay unknown everywhere
        [N, N, N, N, N], [0, N, N, N, N], [1, N, N, N, 0], [N, 0, N, N, 1], [N, N, 1, N, N], [N, N, N, N, N],
        [N, 0, N, 0, N]],
}


def _cells(row) -> dict:
    nf, sd, *findings = row
    cells = {"No Finding": nf, "Support Devices": sd, **dict(zip(SOURCES, findings))}
    return {k: float(v) for k, v in cells.items() if v is not None}


def chexpert_table(tmp_path, rows=TABLE):
    return make_chexpert(tmp_path, [chexpert_row(i + 1, **_cells(r)) for i, r in enumerate(rows)])


def matrix(manifest, ids) -> np.ndarray:
    frame = manifest.frame.set_index("sample_id")
    return frame.loc[list(ids), list(TASK.labels)].to_numpy(dtype=float)


def combine(values) -> float:
    """The documented rule for a label with several source findings."""
    if any(v == 1 for v in values):
        return 1.0
    return 0.0 if all(v == 0 for v in values) else N


def to_task_labels(findings: pd.DataFrame) -> np.ndarray:
    return np.array([[combine([row[f] for f in CHEXPERT_LABEL_MAP[lab]]) for lab in TASK.labels]
                     for _, row in findings.iterrows()], dtype=float)


def naive_policy(raw: pd.DataFrame, uncertain: str, blank: str, no_finding: str) -> np.ndarray:
    """The policies read one cell at a time, as the docstring states them."""
    out = pd.DataFrame(index=raw.index, columns=list(SOURCES), dtype=float)
    for i, row in raw.iterrows():
        healthy = row["No Finding"] == 1
        for f in SOURCES:
            v = row[f]
            if pd.isna(v):
                out.loc[i, f] = 0.0 if blank == "negative" or (no_finding == "negative" and healthy) else N
            elif v == -1:
                out.loc[i, f] = {"ignore": N, "zeros": 0.0, "ones": 1.0}[uncertain]
            else:
                out.loc[i, f] = float(v)
    return to_task_labels(out)


def torchxrayvision_rule(raw: pd.DataFrame) -> np.ndarray:
    """torchxrayvision's CheX_Dataset: on rows with No Finding = 1 every pathology except Support Devices is set
    to 0, then -1 becomes NaN (blank cells are NaN already, as pandas reads them)."""
    csv = raw.copy()
    healthy = csv["No Finding"] == 1
    for pathology in CHEXPERT_FINDINGS:
        if pathology not in ("No Finding", "Support Devices"):
            csv.loc[healthy, pathology] = 0
    labels = csv[list(SOURCES)].to_numpy(dtype=float, copy=True)
    labels[labels == -1] = np.nan
    return to_task_labels(pd.DataFrame(labels, columns=list(SOURCES)))


def assert_matrix(got, want, msg: str = "") -> None:
    np.testing.assert_array_equal(np.asarray(got, dtype=float), np.asarray(want, dtype=float), err_msg=msg)


# ---- CheXpert ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", list(BY_HAND))
def test_each_chexpert_policy_gives_the_labels_worked_out_by_hand(tmp_path, policy):
    folder = chexpert_table(tmp_path)
    uncertain, blank, no_finding = policy
    m = load_data(folder, task=TASK, uncertain=uncertain, blank=blank, no_finding=no_finding)
    ids = [f"patient{i + 1:05d}/study1/view1_frontal" for i in range(len(TABLE))]
    got = matrix(m, ids)
    for i, want in enumerate(BY_HAND[policy]):  # row by row, so a failure names the row
        assert_matrix(got[i], want, f"row {i + 1} of the table")


def test_defaults_are_u_ignore_blank_unknown_and_the_no_finding_rule(tmp_path):
    folder = chexpert_table(tmp_path)
    ids = [f"patient{i + 1:05d}/study1/view1_frontal" for i in range(len(TABLE))]
    assert_matrix(matrix(load_data(folder, task=TASK), ids), BY_HAND[("ignore", "unknown", "negative")])


def test_every_policy_matches_a_cell_by_cell_reading(tmp_path):
    folder = chexpert_table(tmp_path)
    raw = pd.read_csv(folder / "train.csv")
    ids = [f"patient{i + 1:05d}/study1/view1_frontal" for i in range(len(TABLE))]
    for policy in itertools.product(("ignore", "zeros", "ones"), ("unknown", "negative"), ("negative", "ignore")):
        m = load_data(folder, task=TASK, **dict(zip(("uncertain", "blank", "no_finding"), policy)))
        assert_matrix(matrix(m, ids), naive_policy(raw, *policy))


def test_the_default_policy_reads_chexpert_as_torchxrayvision_does(tmp_path):
    folder = chexpert_table(tmp_path)
    raw = pd.read_csv(folder / "train.csv")
    ids = [f"patient{i + 1:05d}/study1/view1_frontal" for i in range(len(TABLE))]
    assert_matrix(matrix(load_data(folder, task=TASK), ids), torchxrayvision_rule(raw))


def test_a_no_finding_row_that_contradicts_a_finding_keeps_the_finding_and_warns(tmp_path):
    # Not something the labeler writes; torchxrayvision would make the 1 a 0. privaudit keeps it and says so.
    folder = chexpert_table(tmp_path, TABLE + [(1, None, 1, None, None, None, None, None)])
    with pytest.warns(UserWarning, match=r"1 row\(s\) say 'No Finding' = 1 and also 1 or -1 .*\(first at row 9\)"):
        m = load_data(folder, task=TASK)
    assert_matrix(matrix(m, ["patient00008/study1/view1_frontal"])[0], [1, 0, 0, 0, 0])


def test_no_finding_column_is_required_by_the_rule_only(tmp_path):
    rows = [chexpert_row(1, Cardiomegaly=1.0), chexpert_row(2, Cardiomegaly=0.0)]
    folder = tmp_path / "c"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "train.csv", index=False)   # no No Finding column at all
    from privaudit.errors import DataError

    with pytest.raises(DataError, match=r"missing required column 'No Finding'.*no_finding='ignore'"):
        load_data(folder, task=TASK, labels=("cardiomegaly",), check_files=False)
    m = load_data(folder, task=TASK, labels=("cardiomegaly",), check_files=False, no_finding="ignore")
    assert m.frame["cardiomegaly"].tolist() == [1.0, 0.0]
    m = load_data(folder, task=TASK, labels=("cardiomegaly",), check_files=False, blank="negative")
    assert m.frame["cardiomegaly"].tolist() == [1.0, 0.0]


# ---- MIMIC-CXR-JPG ----------------------------------------------------------------------------------------------
MIMIC_STUDIES = [("10000032", "50414267"), ("10000764", "57375967"), ("11000001", "51000001")]
MIMIC_ROWS = [TABLE[2], TABLE[4], TABLE[0]]   # a mixed study, another, a No Finding study
MIMIC_IMAGE_OF = {"50414267": "d1", "57375967": "d3", "51000001": "d4"}


def _mimic_labels():
    return [{"subject_id": s, "study_id": st, **_cells(r)} for (s, st), r in zip(MIMIC_STUDIES, MIMIC_ROWS)]


def test_mimic_policies_by_hand_and_as_torchxrayvision_reads_them(tmp_path):
    folder = make_mimic(tmp_path, labels=_mimic_labels())
    ids = [MIMIC_IMAGE_OF[st] for _, st in MIMIC_STUDIES]
    for policy, want in BY_HAND.items():
        m = load_data(folder, task=TASK, **dict(zip(("uncertain", "blank", "no_finding"), policy)))
        assert_matrix(matrix(m, ids), [want[2], want[4], want[0]])
        assert_matrix(matrix(m, ["d5"]), [[N] * 5])   # a study without a label row: unknown under every policy
    raw = pd.read_csv(folder / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert_matrix(matrix(load_data(folder, task=TASK), ids), torchxrayvision_rule(raw))


# ---- options: refused where they do not apply, recorded where they do -------------------------------------------
def test_nih_and_manifest_refuse_the_policies_and_keep_their_labels(tmp_path, cohort):
    nih = make_nih(tmp_path, [nih_row("00000001_000.png", "Cardiomegaly", 1), nih_row("00000002_000.png",
                                                                                      "No Finding", 2)])
    with pytest.raises(ConfigError, match=r"^--uncertain applies to the chexpert and mimic presets, but .* 'nih'"):
        load_data(nih, task=TASK, uncertain="zeros")
    with pytest.raises(ConfigError, match=r"^--no-finding applies to the chexpert and mimic presets, .* 'manifest'"):
        load_data(cohort, task=TASK, no_finding="ignore")
    m = load_data(nih, task=TASK)
    assert_matrix(matrix(m, ["00000001_000", "00000002_000"]), [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])


def test_bad_policy_values_and_synthetic_data_are_refused_in_the_api():
    from privaudit.study.data import DataSpec

    with pytest.raises(ConfigError, match=r"^uncertain 'maybe' is not one of ignore, zeros, ones$"):
        DataSpec(path="x", uncertain="maybe")
    with pytest.raises(ConfigError, match=r"^blank 'zero' is not one of unknown, negative$"):
        DataSpec(path="x", blank="zero")
    with pytest.raises(ConfigError, match=r"^uncertain is a label policy of the chexpert and mimic presets"):
        DataSpec(uncertain="ones")


def test_sweep_identity_and_recorded_data_write_the_defaults_out(tmp_path):
    from privaudit.config import TrainConfig
    from privaudit.study.data import DataSpec, prepare_data, reload_data, spec_from_info
    from privaudit.study.sweep import _identity

    folder = chexpert_table(tmp_path)
    base = TrainConfig.for_task("cxr")
    ident = _identity(base, DataSpec(path=folder))["data"]
    assert (ident["uncertain"], ident["blank"], ident["no_finding"]) == ("ignore", "unknown", "negative")
    assert _identity(base, DataSpec(path=folder, uncertain="ignore")) == _identity(base, DataSpec(path=folder))
    assert _identity(base, DataSpec(path=folder, uncertain="ones"))["data"]["uncertain"] == "ones"

    prepared = prepare_data("cxr", DataSpec(path=folder, uncertain="ones"), None)
    assert {k: prepared.info[k] for k in ("uncertain", "blank", "no_finding")} == {
        "uncertain": "ones", "blank": "unknown", "no_finding": "negative"}
    assert spec_from_info(prepared.info, tmp_path).uncertain == "ones"
    again = reload_data(prepared.info, tmp_path, "cxr")   # the same policies, so the same hash
    assert again.info["manifest_sha256"] == prepared.info["manifest_sha256"]
    other = prepare_data("cxr", DataSpec(path=folder), None)
    assert other.info["manifest_sha256"] != prepared.info["manifest_sha256"]   # the policy changes the labels


def _cli_chexpert(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    for p in range(1, 61):
        v = rng.choice([1.0, 0.0, -1.0, None], size=2)
        cells = {"Cardiomegaly": v[0], "Atelectasis": v[1]}
        rows.append(chexpert_row(p, **{k: x for k, x in cells.items() if x is not None}))
    return make_chexpert(tmp_path, rows)


def test_cli_train_records_the_policy_in_config_audit_and_report(tmp_path):
    folder = _cli_chexpert(tmp_path)
    run = tmp_path / "run"
    res = invoke("train", "cxr", "--data", folder, "--labels", "cardiomegaly,atelectasis", "--uncertain", "zeros",
                 "--no-dp", "--image-size", "16", "--epochs", "1", "--width", "4", "--batch-size", "16", "--quiet",
                 "--out", run)
    assert res.exit_code == 0, res.output + res.stderr
    data = json.loads((run / "config.json").read_text())["data"]
    assert (data["uncertain"], data["blank"], data["no_finding"]) == ("zeros", "unknown", "negative")
    res = invoke("audit", run, "--n-boot", "20")
    assert res.exit_code == 0, res.output + res.stderr
    audit = json.loads((run / "audit.json").read_text())
    assert {k: audit["study"]["data"][k] for k in ("uncertain", "blank", "no_finding")} == {
        "uncertain": "zeros", "blank": "unknown", "no_finding": "negative"}
    html = (run / "report.html").read_text()
    assert re.search(r"uncertain \(-1\) findings\s+are negative \(U-Zeros\);\s+blank \(not mentioned\) findings are "
                     r"unknown,\s+except on images whose No Finding is positive", html)


@pytest.mark.parametrize("args, message", [
    (("--uncertain", "maybe"), "error: --uncertain 'maybe' is not one of ignore, zeros, ones"),
    (("--no-finding", "zero"), "error: --no-finding 'zero' is not one of negative, ignore"),
    (("--blank", "negative", "--preset", "nih"), "error: --blank applies to the chexpert and mimic presets"),
])
def test_cli_refuses_bad_policy_values_with_one_line(tmp_path, args, message):
    folder = chexpert_table(tmp_path)
    out = tmp_path / "run"
    res = invoke("train", "cxr", "--data", folder, *args, "--no-dp", "--image-size", "16", "--epochs", "1", "--out",
                 out)
    assert res.exit_code == 2
    assert res.stderr.strip().startswith(message) and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_cli_data_cache_and_checkpoint_audit_take_the_options():
    from privaudit.cli import audit_cmd, cache_cmd, sweep_cmd, train_and_audit_cmd, train_cmd
    import inspect

    for cmd in (train_cmd, train_and_audit_cmd, sweep_cmd, audit_cmd, cache_cmd):
        assert {"uncertain", "blank", "no_finding"} <= set(inspect.signature(cmd).parameters), cmd.__name__


# ---- unreliable labels ------------------------------------------------------------------------------------------
def _predictions_with_few_negatives() -> pd.DataFrame:
    """cardiomegaly has plenty of both classes in test; atelectasis has 3 known negatives (40 positives, the rest
    unknown)."""
    rng = np.random.default_rng(0)
    n = 200
    split = np.array(["train"] * 80 + ["val"] * 20 + ["test"] * 100)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "split": split, "patient_id": [f"p{i}" for i in
                                                                                                 range(n)]})
    df["member"] = (split == "train").astype(int)
    y_card = rng.integers(0, 2, n).astype(float)
    y_atel = rng.integers(0, 2, n).astype(float)
    test = np.flatnonzero(split == "test")
    y_atel[test] = np.nan
    y_atel[test[:40]] = 1.0
    y_atel[test[40:43]] = 0.0
    for lab, y in (("cardiomegaly", y_card), ("atelectasis", y_atel)):
        df[f"y_{lab}"] = y
        df[f"p_{lab}"] = 1 / (1 + np.exp(-(2 * (np.nan_to_num(y, nan=0.5) - 0.5) + rng.normal(0, 1, n))))
    df["loss"] = rng.random(n)
    df["sex"] = rng.choice(["F", "M"], n)
    df["age"] = rng.integers(20, 90, n)
    return df


def test_a_label_with_three_known_negatives_is_flagged_warned_and_marked(tmp_path):
    import privaudit

    out = tmp_path / "audit"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = privaudit.audit({"model": _predictions_with_few_negatives()}, out=out, n_boot=50)
    doc = json.loads((out / "audit.json").read_text())   # written through the schema check
    util = doc["models"]["model"]["utility"]
    assert util["labels"]["atelectasis"]["unreliable"] == {"flag": True, "n_pos": 40, "n_neg": 3, "min": 10}
    assert util["labels"]["cardiomegaly"]["unreliable"]["flag"] is False
    assert util["labels"]["atelectasis"]["auroc"]["estimate"] is not None   # still computed
    assert util["macro_auroc"]["includes_unreliable"] == ["atelectasis"]
    without = util["macro_auroc"]["without_unreliable"]
    assert without["labels"] == ["cardiomegaly"]
    assert without["estimate"] == pytest.approx(util["labels"]["cardiomegaly"]["auroc"]["estimate"])
    assert util["macro_auroc"]["estimate"] == pytest.approx(np.mean(
        [util["labels"][lab]["auroc"]["estimate"] for lab in ("cardiomegaly", "atelectasis")]))
    warned = [w for w in doc["warnings"] if w.startswith("label atelectasis:")]
    assert len(warned) == 1 and "40 known positive(s) and 3 known negative(s), fewer than 10" in warned[0]
    assert not any(w.startswith("label cardiomegaly:") for w in doc["warnings"])
    # the tidy table has no rows for the flag's counts, and one for the macro without flagged labels
    frame = res.to_frame()
    assert not frame["path"].str.contains(r"\.unreliable\b").any()
    row = frame[frame["metric"] == "auroc.without_unreliable"]
    assert row["label"].tolist() == ["macro"] and row["estimate"].iloc[0] == pytest.approx(without["estimate"])

    html = (out / "report.html").read_text()
    utility = html[html.index('<section id="utility">'):html.index("</section>", html.index('<section id="utility">'))]
    row = utility[utility.index('<tr class="unreliable">'):]
    assert row[:row.index("</tr>")].count("atelectasis") == 1 and "unreliable" in row[:row.index("</tr>")]
    assert utility.count('<tr class="unreliable">') == 1
    assert "macro (includes unreliable atelectasis)" in utility
    assert re.search(r"atelectasis\s+\(40 known positives, 3 known negatives\)", utility)
    data = html[html.index('<section id="data">'):html.index("</section>", html.index('<section id="data">'))]
    assert data.count("unreliable") == 1


def test_runs_and_sweeps_recorded_before_the_policies_reload_with_the_old_reading(tmp_path):
    from privaudit.config import TrainConfig
    from privaudit.study.data import DataSpec, prepare_data, reload_data
    from privaudit.study.sweep import SWEEP_FILE, SWEEP_KIND, _identity, check_sweep_dir

    folder = chexpert_table(tmp_path)
    old = prepare_data("cxr", DataSpec(path=folder, no_finding="ignore"), None)   # what the loader read before
    info = {k: v for k, v in old.info.items() if k not in ("uncertain", "blank", "no_finding")}
    again = reload_data(info, tmp_path, "cxr")
    assert again.info["manifest_sha256"] == old.info["manifest_sha256"]

    base = TrainConfig.for_task("cxr")
    identity = _identity(base, DataSpec(path=folder))
    for k in ("uncertain", "blank", "no_finding"):
        identity["data"].pop(k)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / SWEEP_FILE).write_text(json.dumps({"kind": SWEEP_KIND, "identity": identity}))
    with pytest.raises(ConfigError, match="trained with --no-finding ignore, not negative"):
        check_sweep_dir(out, base, DataSpec(path=folder))
    assert check_sweep_dir(out, base, DataSpec(path=folder, no_finding="ignore"))["kind"] == SWEEP_KIND


def test_cli_audit_of_a_run_refuses_a_policy_it_cannot_apply(tmp_path):
    res = invoke("audit", tmp_path, "--blank", "negative")
    assert res.exit_code == 2 and res.stderr.startswith("error: --blank applies to --checkpoint audits")


def test_api_takes_the_policies_as_data_options(tmp_path):
    import privaudit
    from privaudit.study.api import _data_spec, _split

    train_opts, data_opts, audit_opts = _split({"uncertain": "ones", "blank": "negative", "no_finding": "ignore",
                                               "epochs": 1, "n_boot": 10})
    assert train_opts == {"epochs": 1} and audit_opts == {"n_boot": 10}
    spec = _data_spec(tmp_path, data_opts, 0)
    assert spec.label_policies() == {"uncertain": "ones", "blank": "negative", "no_finding": "ignore"}
    with pytest.raises(ConfigError, match="^uncertain is a data option: it applies to a checkpoint audit"):
        privaudit.audit(tmp_path, uncertain="zeros")
