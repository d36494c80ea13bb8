"""Tests for the synthetic chest-radiograph cohort (privaudit.data.synth_cxr)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.special import expit
from scipy.stats import mannwhitneyu

from privaudit.data.manifest import load_manifest
from privaudit.data.synth_cxr import (
    MANIFEST_COLUMNS,
    check_planted_effects,
    draw_anatomy,
    render_cxr,
    sample_cohort,
    synthesize_cxr,
)
from privaudit.errors import ConfigError
from privaudit.tasks import AGE_GROUPS, age_group, create_task

TASK = create_task("cxr")
LABELS = TASK.labels
SIZE = 32


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    """One small private cohort shared by the read-only tests; returns its folder."""
    out = tmp_path_factory.mktemp("cxr")
    synthesize_cxr(out, n=200, image_size=SIZE, seed=1)
    return out


@pytest.fixture(scope="module")
def frame(cohort_dir) -> pd.DataFrame:
    return pd.read_csv(cohort_dir / "manifest.csv", dtype={"sample_id": str, "patient_id": str})


@pytest.fixture(scope="module")
def record(cohort_dir) -> dict:
    return json.loads((cohort_dir / "cohort.json").read_text())


@pytest.fixture(scope="module")
def pixels(cohort_dir, frame) -> np.ndarray:
    return np.stack([np.asarray(Image.open(cohort_dir / p), dtype=float) for p in frame["path"]])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    calls = []
    a = synthesize_cxr(tmp_path / "a", n=60, image_size=SIZE, seed=3, progress=calls.append)
    synthesize_cxr(tmp_path / "b", n=60, image_size=SIZE, seed=3)
    synthesize_cxr(tmp_path / "c", n=60, image_size=SIZE, seed=4)
    assert a == tmp_path / "a" / "manifest.csv"
    assert calls == list(range(1, 61))
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len([k for k in files_a if k.endswith(".png")]) == 60
    assert files_a == files_b
    files_c = _files(tmp_path / "c")
    assert files_c["manifest.csv"] != files_a["manifest.csv"]
    # Sample ids coincide across seeds, so compare the images themselves.
    common = [k for k in files_a if k.endswith(".png") and k in files_c]
    assert common and all(files_a[k] != files_c[k] for k in common)


def test_writes_into_an_existing_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    synthesize_cxr(tmp_path, n=20, image_size=16, seed=0)
    assert (tmp_path / "keep.txt").read_text() == "x"
    assert (tmp_path / "cohort.json").is_file()


def test_manifest_loads_with_the_cxr_task(cohort_dir, frame):
    manifest = load_manifest(cohort_dir / "manifest.csv", task=TASK)
    assert len(manifest.frame) == 200
    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert frame["path"].str.fullmatch(r"images/.+\.png").all()
    values = manifest.frame[list(LABELS)].to_numpy()
    assert set(np.unique(values[~np.isnan(values)])) == {0.0, 1.0}
    # About 2% of label cells are blank (unknown): 1000 cells here.
    assert 3 <= np.isnan(values).sum() <= 50
    assert set(frame["sex"]) == {"F", "M"}
    assert set(frame["comorbidity"]) == {0, 1}
    with Image.open(manifest.image_paths()[0]) as im:
        assert im.mode == "L" and im.size == (SIZE, SIZE)


def test_sample_cohort_is_the_written_table(frame):
    drawn = sample_cohort(200, seed=1)
    written = frame.copy()
    for label in LABELS:
        written[label] = written[label].astype("Int64")
    pd.testing.assert_frame_equal(drawn.reset_index(drop=True), written, check_dtype=False)


def test_splits_are_patient_level_with_70_10_20_fractions(frame):
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    patients = frame.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert patients["train"] == pytest.approx(0.7, abs=0.01)
    assert patients["val"] == pytest.approx(0.1, abs=0.01)
    assert patients["test"] == pytest.approx(0.2, abs=0.01)


def _study_of(frame: pd.DataFrame) -> pd.Series:
    """The study a sample id names (``<patient>_s<study>_v<view>``), as '<patient>_s<study>'."""
    return frame["sample_id"].str.replace(r"_v\d+$", "", regex=True)


def test_sample_ids_name_patient_study_and_view(frame):
    parts = frame["sample_id"].str.extract(r"^(?P<patient>PRV\d+)_s(?P<study>\d+)_v(?P<view>\d+)$")
    assert parts.notna().all().all()
    assert (parts["patient"] == frame["patient_id"]).all()
    assert set(parts["view"].astype(int)) == {1, 2}
    # Studies are numbered 1, 2, ... within each patient, and views 1, 2 within each study.
    for _, rows in parts.astype({"study": int, "view": int}).groupby("patient"):
        assert sorted(set(rows["study"])) == list(range(1, rows["study"].max() + 1))
        for _, views in rows.groupby("study"):
            assert sorted(views["view"]) == list(range(1, len(views) + 1))


def test_images_of_a_patient_share_attributes_and_a_study_shares_age_and_labels(frame):
    per_patient = frame.groupby("patient_id").size()
    assert (per_patient > 1).sum() >= 20
    assert frame.groupby("patient_id")[["sex", "comorbidity", "split"]].nunique().max().max() == 1
    study = _study_of(frame)
    labels = frame[list(LABELS)].fillna(-1)
    assert (labels.groupby(study).nunique() == 1).all().all()   # the views of a study carry its report
    assert (frame.groupby(study)["age"].nunique() == 1).all()
    same_findings = []
    for _, rows in frame.assign(study=study).drop_duplicates("study").groupby("patient_id"):
        steps = np.diff(rows["age"].to_numpy())
        assert ((steps >= 0) & (steps <= 2)).all()
        known = rows[list(LABELS)].to_numpy(dtype=float)
        for prev, cur in zip(known, known[1:]):
            both = ~np.isnan(prev) & ~np.isnan(cur)
            same_findings.append(bool((prev[both] == cur[both]).all()))
    # A follow-up study repeats the findings with probability 0.8, and a fresh draw may coincide.
    assert 0.75 <= np.mean(same_findings) <= 0.97


def _images_per_patient_pmf(mean_extra: float, max_studies: int, p_second: float, k_max: int) -> np.ndarray:
    """P(k images) for k = 0..k_max under the documented model: studies = min(1 + Geometric, cap), each
    with a second view with probability p_second (so images | studies = studies + Binomial)."""
    from scipy.stats import binom, geom

    p = 1 / (1 + mean_extra)
    studies = np.arange(1, max_studies + 1)
    p_studies = geom.pmf(studies, p)   # scipy's geometric counts trials, so it starts at 1
    p_studies[-1] += geom.sf(max_studies, p)
    pmf = np.zeros(k_max + 1)
    for s, ps in zip(studies, p_studies):
        pmf[s:2 * s + 1] += ps * binom.pmf(np.arange(s + 1), s, p_second)
    return pmf


def test_images_per_patient_follow_the_documented_long_tailed_distribution(record):
    from scipy.stats import chisquare

    doc = record["population"]["images_per_patient"]
    assert "Geometric" in doc["studies"] and doc["max"] == 24
    big = sample_cohort(6000, seed=4)
    counts = big.groupby("patient_id", sort=False).size().to_numpy()[:-1]   # the last patient is cut to fit n
    pmf = _images_per_patient_pmf(1.4, 12, 0.25, 24)
    assert doc["expected_mean"] == pytest.approx(float((np.arange(25) * pmf).sum()), abs=1e-3)
    assert 2.8 < doc["expected_mean"] < 3.2
    # About 3 images per patient, median 2, a few with 10 or more.
    assert counts.mean() == pytest.approx(3.0, abs=0.15)
    assert np.median(counts) == 2
    assert 0.01 < (counts >= 10).mean() < 0.05 and counts.max() >= 12
    # The whole histogram: 1..9 images, and 10 or more pooled.
    observed = np.array([(counts == k).sum() for k in range(1, 10)] + [(counts >= 10).sum()])
    expected = np.append(pmf[1:10], pmf[10:].sum()) * len(counts)
    assert chisquare(observed, expected).pvalue > 0.001


def test_cohort_json_reports_the_images_per_patient_drawn(frame, record):
    realised = record["realised"]["images_per_patient"]
    counts = frame.groupby("patient_id").size()
    assert realised["mean"] == pytest.approx(counts.mean(), abs=1e-4)
    assert realised["median"] == counts.median() and realised["max"] == counts.max()
    assert realised["n_patients_with_10_or_more"] == int((counts >= 10).sum())
    assert {int(k): v for k, v in realised["histogram"].items()} == counts.value_counts().to_dict()
    assert sum(realised["histogram"].values()) == record["realised"]["n_patients"]
    assert 2.0 < realised["mean"] < 4.0 and realised["max"] >= 6


def test_a_patient_keeps_the_anatomy_and_a_study_changes_it_a_little():
    """With positioning and exposure fixed, a second study of the same patient differs far less than another
    patient does: the anatomy is the patient's, and a study only shifts inspiration and heart size."""
    row, truth = {"age": 40, "sex": "M", "comorbidity": 0}, np.zeros(len(LABELS), dtype=int)
    same, other = [], []
    for seed in range(6):
        anatomy = draw_anatomy(np.random.default_rng(100 + seed))
        stranger = draw_anatomy(np.random.default_rng(200 + seed))

        def draw(who, study):
            return render_cxr(row, truth, np.random.default_rng(seed), SIZE, anatomy=who,
                              study=np.random.default_rng([seed, study]))[0].astype(float)

        first = draw(anatomy, 1)
        same.append(np.abs(first - draw(anatomy, 2)).mean())
        other.append(np.abs(first - draw(stranger, 1)).mean())
    assert 0 < np.mean(same) < 0.5 * np.mean(other), (same, other)


def test_each_image_comes_from_its_patients_anatomy_and_its_studys_stream(cohort_dir, frame, pixels):
    """Every image of the patient with the most images, drawn again from the documented streams: the
    patient's anatomy (seed, cohort 0, 2, patient), the study (seed, 0, 3, patient, study) and the image's own
    (seed, 0, 1, index)."""
    truth = frame[list(LABELS)].to_numpy(dtype=float)
    pid = frame["patient_id"].value_counts().index[0]
    rows = np.flatnonzero(frame["patient_id"] == pid)
    assert len(rows) >= 4
    p = int(pid[3:])
    anatomy = draw_anatomy(np.random.default_rng([1, 0, 2, p]))
    for i in rows:
        study = int(frame["sample_id"].iloc[i].split("_s")[1].split("_")[0]) - 1
        if np.isnan(truth[i]).any():
            continue   # a blanked label hides the finding drawn; the other images suffice
        image, _ = render_cxr(frame.iloc[i], truth[i].astype(int), np.random.default_rng([1, 0, 1, i]), SIZE,
                              anatomy=anatomy, study=np.random.default_rng([1, 0, 3, p, study]))
        np.testing.assert_array_equal(image, pixels[i])


def test_every_age_group_appears_and_comorbidity_rises_with_age(frame):
    assert frame["age"].between(18, 95).all()
    assert set(age_group(frame["age"])) == set(AGE_GROUPS)
    big = sample_cohort(3000, seed=2)
    groups = age_group(big["age"])
    oldest = big.loc[groups == "81+", "comorbidity"].mean()
    under_61 = big.loc[groups.isin(["0-30", "31-60"]), "comorbidity"].mean()
    assert oldest > under_61 + 0.1


def _prevalence_from(table: pd.DataFrame) -> dict[str, tuple[int, int]]:
    return {lab: (int((table[lab] == 1).sum()), int(table[lab].notna().sum())) for lab in LABELS}


def test_cohort_json_matches_the_manifest(frame, record):
    assert record["generator"] == "privaudit.data.synth_cxr" and record["generator_version"]
    assert record["parameters"] == {"n": 200, "image_size": SIZE, "seed": 1, "public": False}
    assert record["role"] == "private"
    realised = record["realised"]
    assert realised["n_images"] == len(frame)
    assert realised["n_patients"] == frame["patient_id"].nunique()
    tables = {"overall": (frame, realised["prevalence"])}
    for split in ("train", "val", "test"):
        tables[split] = (frame[frame["split"] == split], realised["splits"][split]["prevalence"])
    for name, (table, recorded) in tables.items():
        for label, (n_pos, n_known) in _prevalence_from(table).items():
            assert recorded[label]["n_positive"] == n_pos, (name, label)
            assert recorded[label]["n_known"] == n_known, (name, label)
            assert recorded[label]["prevalence"] == pytest.approx(n_pos / n_known, abs=1e-6)
    for split in ("train", "val", "test"):
        part = frame[frame["split"] == split]
        assert realised["splits"][split]["n_images"] == len(part)
        assert realised["splits"][split]["n_patients"] == part["patient_id"].nunique()


def test_cohort_json_documents_labels_model_and_planted_effects(frame, record):
    assert set(record["labels"]) == set(LABELS) and all(record["labels"].values())
    assert list(record["prevalence_model"]["coefficients"]) == list(LABELS)
    effects = record["planted_effects"]
    assert len(effects) >= 2
    by_name = {e["name"]: e for e in effects}
    age = by_name["age_image_quality"]
    assert age["attribute"] == "age_group" and age["expected_lower_auroc"] == "81+"
    assert all(e["description"] and e["parameters"] and e["labels"] for e in effects)
    # Each effect names the audit gap that shows it: a task attribute, a label (or macro) and a group that the
    # cohort holds.
    groups = {"sex": set(frame["sex"]), "age_group": set(age_group(frame["age"])),
              "comorbidity": {str(c) for c in frame["comorbidity"]}}
    for effect in effects:
        spec = effect["audit"]
        assert spec["attribute"] == effect["attribute"] and spec["attribute"] in TASK.attributes
        assert spec["label"] in (*effect["labels"], "macro") and spec["label"] in (*LABELS, "macro")
        assert spec["group"] == effect["expected_lower_auroc"] and spec["group"] in groups[spec["attribute"]]
        assert spec["metric"] == "performance_parity" and spec["direction"] == "negative"
    # The realised sign strengths are recorded: fainter for 81+ than for 31-60 (averaged over labels, as a
    # 200-image cohort has few positives per label and group).
    strength = record["realised"]["mean_sign_strength_of_positives_by_age_group"]
    oldest, middle = (np.mean([strength[lab][group] for lab in LABELS]) for group in ("81+", "31-60"))
    assert 0 < oldest < middle


def _model_prevalence(table: pd.DataFrame, coefficients: dict) -> dict[str, float]:
    """Expected prevalence under the documented logistic model, enumerating all label combinations."""
    terms = {
        "age_per_decade": (table["age"].to_numpy(float) - 60) / 10,
        "male": (table["sex"] == "M").to_numpy(float),
        "comorbidity": table["comorbidity"].to_numpy(float),
    }
    expected = dict.fromkeys(LABELS, 0.0)
    for combo in range(2 ** len(LABELS)):
        bits = {lab: (combo >> j) & 1 for j, lab in enumerate(LABELS)}
        joint = np.ones(len(table))
        for lab in LABELS:
            coefs = coefficients[lab]
            z = coefs["intercept"] + sum(
                c * (terms[t] if t in terms else bits[t]) for t, c in coefs.items() if t != "intercept"
            )
            p = expit(z)
            joint *= p if bits[lab] else 1 - p
        for lab in LABELS:
            expected[lab] += bits[lab] * joint.mean()
    return expected


@pytest.mark.parametrize("public", [False, True])
def test_prevalence_follows_the_documented_model(record, public):
    big = sample_cohort(4000, seed=5, public=public)
    expected = _model_prevalence(big, record["prevalence_model"]["coefficients"])
    # Follow-ups repeat findings, so count patients rather than images for the binomial error.
    n_eff = big["patient_id"].nunique()
    for label in LABELS:
        realised = big[label].mean()
        p = expected[label]
        assert abs(realised - p) < 4 * np.sqrt(p * (1 - p) / n_eff), (label, realised, p)
    groups = age_group(big["age"])
    for label in ("cardiomegaly", "pleural_effusion"):   # rise with age
        assert big.loc[groups == "81+", label].mean() > big.loc[groups == "31-60", label].mean()
    # Congestion is correlated with cardiomegaly and effusion.
    known = big[list(LABELS)].dropna().astype(float)
    assert known["congestion"].corr(known["cardiomegaly"]) > 0.1
    assert known["congestion"].corr(known["pleural_effusion"]) > 0.1


def test_public_cohort_is_a_different_younger_population(tmp_path):
    synthesize_cxr(tmp_path, n=30, image_size=16, seed=1, public=True)
    record = json.loads((tmp_path / "cohort.json").read_text())
    assert record["role"] == "public" and record["parameters"]["public"] is True
    public = sample_cohort(3000, seed=1, public=True)
    private = sample_cohort(3000, seed=1)
    assert public["patient_id"].str.startswith("PUB").all() and private["patient_id"].str.startswith("PRV").all()
    assert public["age"].mean() < private["age"].mean() - 3
    assert abs((public["sex"] == "M").mean() - 0.5) < abs((private["sex"] == "M").mean() - 0.5)


def _region(pixels: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    """Mean intensity per image of a box given in normalised coordinates (-1..1, y down)."""
    def index(v: float) -> int:
        return int((v + 1) / 2 * SIZE)
    return pixels[:, index(y0):index(y1), index(x0):index(x1)].mean(axis=(1, 2))


def _separation(values: np.ndarray, label: pd.Series) -> tuple[float, float]:
    """AUROC of ``values`` for the label and the one-sided Mann-Whitney p-value; rank-based, so a few
    extreme images cannot dominate."""
    positive = values[(label == 1).to_numpy()]
    negative = values[(label == 0).to_numpy()]
    test = mannwhitneyu(positive, negative, alternative="greater")
    return test.statistic / (len(positive) * len(negative)), test.pvalue


def test_lung_fields_are_darker_than_the_mediastinum(pixels):
    lungs = (_region(pixels, -0.55, -0.25, -0.45, -0.15) + _region(pixels, 0.25, 0.55, -0.45, -0.15)) / 2
    mediastinum = _region(pixels, -0.06, 0.06, -0.6, -0.35)
    assert (lungs < mediastinum - 20).mean() > 0.95
    # Not noise: neighbouring pixels are strongly correlated.
    flat = pixels - pixels.mean(axis=(1, 2), keepdims=True)
    assert np.corrcoef(flat[:, :, :-1].ravel(), flat[:, :, 1:].ravel())[0, 1] > 0.7


def test_cardiomegaly_widens_the_bright_heart_region(frame, pixels):
    lungs = (_region(pixels, -0.55, -0.25, -0.45, -0.15) + _region(pixels, 0.25, 0.55, -0.45, -0.15)) / 2
    mediastinum = _region(pixels, -0.06, 0.06, -0.6, -0.35)
    threshold = (lungs + mediastinum) / 2
    # Bright pixels per row across the chest at heart level.
    rows = pixels[:, int(1.05 / 2 * SIZE):int(1.35 / 2 * SIZE), int(0.4 / 2 * SIZE):int(1.7 / 2 * SIZE)]
    width = (rows > threshold[:, None, None]).sum(axis=2).mean(axis=1)
    label = frame["cardiomegaly"]
    assert width[label == 1].mean() > width[label == 0].mean() + 0.5
    auroc, p_value = _separation(width, label)
    assert auroc > 0.65 and p_value < 1e-4


def test_effusion_brightens_the_lung_bases(frame, pixels):
    lungs = (_region(pixels, -0.55, -0.25, -0.45, -0.15) + _region(pixels, 0.25, 0.55, -0.45, -0.15)) / 2
    mediastinum = _region(pixels, -0.06, 0.06, -0.6, -0.35)
    bases = (_region(pixels, -0.7, -0.35, 0.15, 0.4) + _region(pixels, 0.35, 0.7, 0.15, 0.4)) / 2
    relative = (bases - lungs) / (mediastinum - lungs)   # 0 = as dark as the lungs, 1 = as bright as soft tissue
    auroc, p_value = _separation(relative, frame["pleural_effusion"])
    assert auroc > 0.6 and p_value < 1e-2


# Where each finding's sign must appear and where it must not, as boxes (x0, x1, y0, y1) in normalised
# coordinates (x: -1 image left .. 1, y: -1 top .. 1); the heart lies right of centre, the lungs at |x| ~ 0.4.
UPPER_ZONES = [(-0.6, -0.2, -0.7, -0.4), (0.2, 0.6, -0.7, -0.4)]
SIGN_REGIONS = {
    "cardiomegaly": ([(-0.5, 0.6, 0.0, 0.5)], UPPER_ZONES),
    "congestion": ([(-0.45, -0.15, -0.3, 0.0), (0.15, 0.45, -0.3, 0.0)], UPPER_ZONES),   # bilateral, hilar
    "pleural_effusion": ([(-0.7, -0.3, 0.2, 0.5), (0.3, 0.7, 0.2, 0.5)], UPPER_ZONES + [(-0.45, 0.45, -0.25, 0.0)]),
    "pneumonic_infiltrates": ([(-0.6, -0.15, -0.5, 0.4), (0.15, 0.6, -0.5, 0.4)], [(-1.0, -0.9, -1.0, -0.5)]),
    "atelectasis": ([(-0.7, -0.1, 0.0, 0.5), (0.1, 0.7, 0.0, 0.5)], UPPER_ZONES),
}


@pytest.mark.parametrize("label", LABELS)
def test_each_finding_draws_its_sign_where_documented(label):
    """Same patients with and without one finding: the difference image is the sign alone."""
    j = LABELS.index(label)
    differences = []
    for seed in range(8):
        row = {"age": 40, "sex": "M", "comorbidity": 0}
        truth = np.zeros(len(LABELS), dtype=int)
        without, _ = render_cxr(row, truth, np.random.default_rng(seed), SIZE)
        truth[j] = 1
        with_finding, strength = render_cxr(row, truth, np.random.default_rng(seed), SIZE)
        assert set(strength) == {label}
        differences.append(with_finding.astype(float) - without)
    differences = np.stack(differences)
    assert differences.min() >= -2   # signs add density; -1 or -2 is rounding at the sign's edge
    assert np.median(differences.max(axis=(1, 2))) > 20
    there, elsewhere = SIGN_REGIONS[label]
    outside = max(_region(differences, *box).mean() for box in elsewhere)
    inside = [_region(differences, *box).mean() for box in there]
    assert min(inside) > 1.0 and min(inside) > 3 * outside, (inside, outside)
    if label == "congestion":   # bilateral: neither side more than twice the other
        assert max(inside) < 2 * min(inside), inside


def test_the_same_patient_is_harder_to_read_when_old():
    """The planted age effect, isolated: one patient and findings, drawn with the same random stream."""
    truth = np.ones(len(LABELS), dtype=int)
    images, strengths = {}, {}
    for age in (40, 88):
        row = {"age": age, "sex": "M", "comorbidity": 0}
        images[age], strengths[age] = render_cxr(row, truth, np.random.default_rng(7), 64)
    assert set(strengths[40]) == set(LABELS)
    for label in LABELS:
        assert strengths[88][label] < 0.8 * strengths[40][label]
    young, old = (images[a].astype(float) for a in (40, 88))
    assert old.std() < young.std()   # lower contrast
    # More pixel noise: larger differences between horizontal neighbours.
    assert np.abs(np.diff(old, axis=1)).mean() > 1.2 * np.abs(np.diff(young, axis=1)).mean()


# A simple observer per planted effect, on images drawn without training: one feature that a reader would look
# at, and its AUROC for the finding in the planted group and in the reference group (independent patients).
def _base_opacity(image: np.ndarray) -> float:
    """Lung bases' brightness relative to the upper lungs (0) and the mediastinum (1): effusion raises it."""
    one = image[None].astype(float)
    lungs = (_region(one, -0.55, -0.25, -0.45, -0.15) + _region(one, 0.25, 0.55, -0.45, -0.15)) / 2
    mediastinum = _region(one, -0.06, 0.06, -0.6, -0.35)
    bases = (_region(one, -0.7, -0.35, 0.15, 0.4) + _region(one, 0.35, 0.7, 0.15, 0.4)) / 2
    return float(((bases - lungs) / (mediastinum - lungs))[0])


def _thin_bright_structures(image: np.ndarray) -> float:
    """The brightest thin structures of the lower chest (white top-hat): plate-like atelectasis, or leads."""
    from scipy.ndimage import gaussian_filter

    image = image.astype(float)
    tophat = image - gaussian_filter(image, 2.0 * SIZE / 32)
    return float(np.sort(tophat[int(0.45 * SIZE):int(0.75 * SIZE)].ravel())[-8:].mean())


def _observer_auroc(label: str, row: dict, feature, n: int = 60) -> float:
    from sklearn.metrics import roc_auc_score

    j = LABELS.index(label)
    scores = []
    for present in (0, 1):
        truth = np.zeros(len(LABELS), dtype=int)
        truth[j] = present
        scores += [feature(render_cxr(row, truth, np.random.default_rng([present, seed]), SIZE)[0])
                   for seed in range(n)]
    return roc_auc_score([0] * n + [1] * n, scores)


# effect: (label, feature, planted group's row, reference row, minimum AUROC gap)
OBSERVERS = {
    "age_image_quality": ("pleural_effusion", _base_opacity, {"age": 88, "sex": "M", "comorbidity": 0},
                          {"age": 40, "sex": "M", "comorbidity": 0}, 0.1),
    "female_effusion_subtlety": ("pleural_effusion", _base_opacity, {"age": 40, "sex": "F", "comorbidity": 0},
                                 {"age": 40, "sex": "M", "comorbidity": 0}, 0.1),
    "comorbidity_devices": ("atelectasis", _thin_bright_structures, {"age": 40, "sex": "M", "comorbidity": 1},
                            {"age": 40, "sex": "M", "comorbidity": 0}, 0.1),
}


def test_every_planted_effect_has_an_observer_here():
    from privaudit.data.synth_cxr import PLANTED_EFFECTS

    assert set(OBSERVERS) == {e["name"] for e in PLANTED_EFFECTS}


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_a_simple_observer_finds_each_planted_effect_without_training(name, record):
    """Each planted effect makes its finding harder to see in its group: a one-feature observer's AUROC is
    lower there than in the reference group (the same age, sex or comorbidity otherwise), by a margin."""
    label, feature, planted, reference, margin = OBSERVERS[name]
    effect = {e["name"]: e for e in record["planted_effects"]}[name]
    assert label in effect["labels"] and effect["audit"]["direction"] == "negative"
    attribute = effect["audit"]["attribute"]
    group = {"age_group": lambda r: age_group([r["age"]])[0], "sex": lambda r: r["sex"],
             "comorbidity": lambda r: str(r["comorbidity"])}[attribute]
    assert group(planted) == effect["audit"]["group"] != group(reference)
    low, high = _observer_auroc(label, planted, feature), _observer_auroc(label, reference, feature)
    assert high > 0.6 and low < high - margin, (low, high)


def _fairness_block(estimate, low, high, *, attribute="sex", label="pleural_effusion", group="F") -> dict:
    return {attribute: {label: {"performance_parity": {group: {"estimate": estimate, "ci_low": low,
                                                               "ci_high": high}}}}}


@pytest.mark.parametrize(("gap", "shown"), [
    ((-0.08, -0.14, -0.02), True),      # planted direction, CI excludes zero
    ((-0.05, -0.11, 0.01), False),      # CI includes zero
    ((0.06, 0.02, 0.10), False),        # the opposite direction
    ((None, None, None), False),        # suppressed or undefined
])
def test_check_planted_effects_reads_the_gap_and_its_ci(gap, shown):
    effect = {"name": "female_effusion_subtlety", "audit": {"attribute": "sex", "label": "pleural_effusion",
                                                            "group": "F", "metric": "performance_parity",
                                                            "direction": "negative"}}
    (check,) = check_planted_effects(_fairness_block(*gap), [effect])
    assert check["shown"] is shown
    assert (check["estimate"], check["ci_low"], check["ci_high"]) == gap
    assert check["attribute"] == "sex" and check["group"] == "F"
    # An attribute the audit does not hold reads as not shown.
    (missing,) = check_planted_effects({}, [effect])
    assert missing["shown"] is False and missing["estimate"] is None


@pytest.mark.parametrize("kwargs", [{"n": 5}, {"image_size": 8}, {"seed": -1}])
def test_rejects_unusable_arguments(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        synthesize_cxr(tmp_path, **{"n": 20, **kwargs})
