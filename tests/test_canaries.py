"""Canaries in the run's privacy unit: canary patients (1 to k images, included or excluded as a unit) under
patient-level DP, single images otherwise, and 3D canary volumes for the CT task on both backends.

Proof: an image-level run's canaries are unchanged (a reference recomputation); a canary patient's images are
all trained on or none, share one unit of the plan and are drawn together by the patient sampler (in a real
training run, every physical batch); canaries.csv holds one row per canary patient whose loss is the mean of
its images' losses under the saved model; the one-run bound's m counts canary patients and the soundness check
compares it with the patient-level epsilon; canary patients train and audit on the tf backend too (one CLI
run); 3D canaries train and audit on a tiny pdac run on the opacus and the tf backends (one CLI run each).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import invoke
from scipy import stats
from scipy.ndimage import gaussian_filter

from privaudit.audit.empirical import one_run_audit, unit_losses
from privaudit.backends._plan import CANARY_SEED_OFFSET, plan_training
from privaudit.backends._units import PatientSampler
from privaudit.config import DPConfig, TrainConfig, default_delta
from privaudit.data.canaries import MAX_IMAGES_PER_PATIENT, canary_table, make_canaries
from privaudit.data.manifest import load_manifest
from privaudit.tasks import create_task

CXR = create_task("cxr")
PDAC = create_task("pdac")


# ---- the canaries themselves -------------------------------------------------------------------------------------
def test_image_canaries_are_drawn_as_before_units():
    """Reference: the draws of the image-level canaries before canary patients existed (textures, labels,
    inclusion from one generator), recomputed here step by step."""
    got = make_canaries(30, size=16, n_labels=3, seed=11)
    rng = np.random.default_rng(11)
    noise = rng.random((30, 16, 16))
    ref = np.stack([gaussian_filter(a, sigma=1.0) for a in noise])
    ref = (ref - ref.min(axis=(1, 2), keepdims=True)) / (ref.max(axis=(1, 2), keepdims=True)
                                                         - ref.min(axis=(1, 2), keepdims=True))
    images, labels, included = got                      # the triple the backends unpack
    np.testing.assert_allclose(images[:, 0], ref, atol=1e-6)
    np.testing.assert_array_equal(labels, rng.integers(0, 2, (30, 3)))
    np.testing.assert_array_equal(included, rng.random(30) < 0.5)
    assert got.unit == "image" and got.m == 30 and (got.n_images == 1).all()


def test_canary_patients_have_1_to_k_images_and_one_inclusion_each():
    c = make_canaries(3000, size=16, n_labels=2, seed=5, unit="patient")
    n = c.n_images
    assert c.m == 3000 and n.min() == 1 and n.max() == MAX_IMAGES_PER_PATIENT and n.sum() == len(c.images)
    # the number of images is uniform on 1..k (chi-square), and inclusion is a fair coin per patient
    hist = np.bincount(n, minlength=MAX_IMAGES_PER_PATIENT + 1)[1:]
    assert stats.chisquare(hist).pvalue > 0.01
    assert stats.binomtest(int(c.unit_included.sum()), 3000, 0.5).pvalue > 0.01
    # a patient's images are adjacent, and all in or all out with it
    assert (np.diff(c.owner) >= 0).all() and np.array_equal(np.unique(c.owner), np.arange(3000))
    _, _, included = c
    for u in range(0, 3000, 97):
        assert set(included[c.owner == u]) == {bool(c.unit_included[u])}
    # inclusion is independent of the number of images: the included share is about 1/2 for every count
    for k in range(1, MAX_IMAGES_PER_PATIENT + 1):
        mine = c.unit_included[n == k]
        assert stats.binomtest(int(mine.sum()), len(mine), 0.5).pvalue > 0.001
    # every image is a texture of its own in [0, 1]
    flat = c.images.reshape(len(c.images), -1)
    assert flat.min() == 0 and flat.max() == 1 and len(np.unique(flat[:200], axis=0)) == 200
    assert make_canaries(20, size=16, n_labels=2, seed=5, unit="patient", max_images=2).n_images.max() <= 2


def test_3d_canaries_are_smoothed_volumes_of_the_task_shape():
    c = make_canaries(6, size=16, n_labels=1, seed=0, spatial_dims=3)
    assert c.images.shape == (6, 1, 16, 16, 16) and c.images.dtype == np.float32 and c.labels.shape == (6, 1)
    v = c.images[:, 0]
    assert np.allclose(v.min(axis=(1, 2, 3)), 0) and np.allclose(v.max(axis=(1, 2, 3)), 1)
    # smoothed in all three axes: neighbouring voxels correlate strongly (raw uniform noise: about 0)
    for axis in (1, 2, 3):
        a, b = np.moveaxis(v, axis, 0)[:-1].ravel(), np.moveaxis(v, axis, 0)[1:].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.6
    assert "3D" in c.kind


def test_unit_losses_is_the_mean_per_unit():
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(50), rng.integers(1, 5, 50))
    losses = rng.random(len(owner))
    ref = pd.Series(losses).groupby(owner).mean().to_numpy()
    np.testing.assert_allclose(unit_losses(losses, owner, 50), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="at least one item"):
        unit_losses(losses, owner, 51)       # unit 50 has no image
    c = make_canaries(4, size=16, n_labels=1, seed=0, unit="patient")
    table = canary_table(c, np.arange(len(c.images), dtype=float))
    assert list(table.columns) == ["canary_id", "included", "loss", "n_images", "unit"]
    assert table["canary_id"].str.startswith("cpatient").all() and (table["unit"] == "patient").all()


# ---- in the plan and the sampler ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    """A 60-image synthetic CXR cohort at 16x16 (about 3 images per patient); returns its manifest.csv."""
    from privaudit.data.synth_cxr import synthesize_cxr

    return synthesize_cxr(tmp_path_factory.mktemp("canary-cohort"), n=60, image_size=16, seed=3)


def _config(**kw):
    dp = DPConfig(epsilon=None, noise_multiplier=1.0, accountant="rdp")
    return TrainConfig(**{"width": 4, "image_size": 16, "batch_size": 4, "physical_batch_size": 16, "epochs": 1,
                          "canaries": 24, "dp": dp, **kw})


def test_canary_patients_join_the_plan_as_whole_patients(multi):
    manifest = load_manifest(multi, task=CXR)
    plan = plan_training(manifest, _config(), CXR, 16)
    c = plan.canaries
    train = manifest.frame[plan.train_mask]
    n_real, n_patients = len(train), train["patient_id"].nunique()
    assert plan.privacy_unit == "patient" and c.unit == "patient" and c.n_images.max() > 1
    # the accounting counts patients: the real ones and the included canary patients; n_train counts images
    assert plan.n_units == n_patients + int(c.unit_included.sum())
    assert plan.n_train == n_real + int(c.included.sum())
    assert plan.dp.delta == default_delta(plan.n_units) and plan.sample_rate == 4 / plan.n_units
    # the backends lay out the kept rows, then the included canaries' images (images[included], in order)
    canary_units = plan.units[n_real:]
    assert len(canary_units) == int(c.included.sum())
    assert not set(canary_units) & set(plan.units[:n_real])
    inc_owner = c.owner[c.included]
    for u in np.flatnonzero(c.unit_included):        # one unit per included canary patient, all its images
        assert len(set(canary_units[inc_owner == u])) == 1
        assert (inc_owner == u).sum() == c.n_images[u]
    assert len(set(canary_units)) == int(c.unit_included.sum())
    # image-level: the canaries stay single images, each its own unit
    image = plan_training(manifest, _config(privacy_unit="image"), CXR, 16)
    assert image.canaries.unit == "image" and image.canaries.m == 24 and (image.canaries.n_images == 1).all()
    assert image.n_units == image.n_train == n_real + int(image.canaries.included.sum())
    # a run without DP takes the unit a DP run would: canary patients here
    assert plan_training(manifest, _config(dp=DPConfig(enabled=False)), CXR, 16).canaries.unit == "patient"
    # the run's cap on images per patient caps the canary patients too
    capped = plan_training(manifest, _config(max_images_per_patient=2), CXR, 16)
    assert capped.canaries.n_images.max() == 2


def test_the_patient_sampler_draws_a_canary_patient_whole_or_not_at_all(multi):
    manifest = load_manifest(multi, task=CXR)
    plan = plan_training(manifest, _config(), CXR, 16)
    n_real = int(plan.train_mask.sum())
    sampler = PatientSampler(plan.units, plan.n_units, plan.sample_rate, steps=2000, physical=16, seed=0)
    canary_unit_ids = np.unique(plan.units[n_real:])
    drawn = np.zeros(len(canary_unit_ids))
    for _ in range(2000):
        chosen = sampler.draw()
        items = np.concatenate([b.items for b in sampler.pack(chosen)])
        for j, u in enumerate(canary_unit_ids):
            mine = np.flatnonzero(plan.units == u)
            got = np.isin(mine, items)
            assert got.all() or not got.any()        # all its images or none
            drawn[j] += got.all()
    # each included canary patient is drawn at the patient rate q, as a patient of its own (chi-square)
    q = plan.sample_rate
    chi2 = float((((drawn - 2000 * q) ** 2) / (2000 * q * (1 - q))).sum())
    assert stats.chi2.sf(chi2, df=len(drawn)) > 0.01


def test_training_keeps_canary_patients_whole_and_scores_them_by_their_mean_loss(multi, tmp_path, monkeypatch):
    import torch

    from privaudit.backends import _units, create_backend
    from privaudit.backends.opacus_backend import _predict
    from privaudit.backends.torch_models import create_model

    seen = []
    pack = _units.PatientSampler.pack

    def spy(self, chosen):
        batches = pack(self, chosen)
        seen.extend(batches)
        return batches

    monkeypatch.setattr(_units.PatientSampler, "pack", spy)
    manifest = load_manifest(multi, task=CXR)
    cfg = _config()
    plan = plan_training(manifest, cfg, CXR, 16)
    tj = create_backend("opacus").train(manifest, cfg, tmp_path / "run", quiet=True)
    c, n_real = plan.canaries, int(plan.train_mask.sum())
    assert tj["privacy_unit"] == "patient" and tj["n_units"] == plan.n_units and tj["n_train"] == plan.n_train
    block = tj["canaries"]
    assert block["unit"] == "patient" and block["m"] == 24 and block["n_included"] == int(c.unit_included.sum())
    assert block["n_images"] == len(c.images) and block["n_included_images"] == int(c.included.sum())
    assert block["seed"] == cfg.seed + CANARY_SEED_OFFSET
    # every physical batch of the real run holds each canary patient's images all together, or none of them
    assert seen and sum(len(b.items) for b in seen) > 0
    inc_owner = c.owner[c.included]
    hits = 0
    for b in seen:
        rows = b.items[b.items >= n_real] - n_real
        for u in np.unique(inc_owner[rows]):
            assert np.isin(np.flatnonzero(inc_owner == u), rows).all()
            hits += 1
    assert hits > 0
    # canaries.csv: one row per canary patient, its loss the mean of its images' losses under the saved model
    table = pd.read_csv(tmp_path / "run" / "canaries.csv")
    assert len(table) == 24 and table["n_images"].tolist() == c.n_images.tolist()
    assert table["included"].tolist() == c.unit_included.astype(int).tolist()
    model = create_model("resnet9-gn", in_channels=1, num_classes=len(manifest.labels), width=4, spatial_dims=2)
    model.load_state_dict(torch.load(tmp_path / "run" / "model" / "weights.pt", weights_only=True))
    _, per_image = _predict(model, c.images, c.labels, torch.device("cpu"))
    ref = pd.Series(per_image).groupby(c.owner).mean().to_numpy()
    np.testing.assert_allclose(table["loss"].to_numpy(), ref, rtol=1e-5)


# ---- the audit -------------------------------------------------------------------------------------------------
def _patient_run(eps=8.0):
    return {"dp": True, "epsilon": eps, "delta": 1e-5, "n_train": 900, "privacy_unit": "patient"}


def test_one_run_bound_counts_canary_patients_and_checks_the_patient_epsilon():
    from privaudit.audit.engine import _empirical

    c = make_canaries(200, size=16, n_labels=1, seed=2, unit="patient")
    rng = np.random.default_rng(1)
    # memorised: an included patient's images have low loss (noisy per image), an excluded one's high
    per_image = np.where(c.included, 0.2, 1.0) + rng.normal(0, 0.4, len(c.images))
    table = canary_table(c, per_image)
    block, warns = {"soundness": None}, []
    _empirical(block, table, _patient_run(), "m", warns, seed=0)
    emp = block["empirical_epsilon"]
    assert emp["unit"] == "patient" and emp["n_images"] == len(c.images) == int(c.n_images.sum()) > 200
    assert emp["m"] == 100              # the evaluation half of 200 canary PATIENTS (not of the images)
    ref = one_run_audit(-unit_losses(per_image, c.owner, 200), c.unit_included, delta=1e-5, seed=0)
    assert emp["estimate"] == ref["estimate"] > 0.5 and (emp["r"], emp["v"]) == (ref["r"], ref["v"])
    # the soundness check compares with the patient-level epsilon: too good for epsilon 0.5, fine for 8
    assert block["soundness"]["unit"] == "patient" and block["soundness"]["violated"] is False
    low = {"soundness": None}
    _empirical(low, table, _patient_run(0.5), "m", warns, seed=0)
    assert low["soundness"]["violated"] is True and any("SOUNDNESS VIOLATION" in w for w in warns)
    # canary patients against an image-level epsilon: no soundness check, a warning
    img, warns = {"soundness": None}, []
    _empirical(img, table, {**_patient_run(0.5), "privacy_unit": "image"}, "m", warns, seed=0)
    assert img["soundness"] is None and any("several images each" in w for w in warns)
    # a table from before units (no unit column) is read as single images
    old, warns = {"soundness": None}, []
    _empirical(old, table[["canary_id", "included", "loss"]], _patient_run(), "m", warns, seed=0)
    assert old["empirical_epsilon"]["unit"] == "image" and old["empirical_epsilon"]["m"] == 100


# ---- CLI: canary patients, and 3D canaries on both backends --------------------------------------------------------
PDAC_TINY = ["--n-samples", "60", "--image-size", "16", "--epochs", "1", "--width", "4", "--batch-size", "8",
             "--n-boot", "50", "--quiet", "--no-baseline", "--canaries", "30", "--noise-multiplier", "1.0"]


@pytest.fixture(autouse=True)
def _volume_cache(tmp_path_factory, monkeypatch):
    from privaudit.data import volumes

    monkeypatch.setenv(volumes.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "volume-cache"))


def _audited(out: Path) -> tuple[dict, dict, pd.DataFrame]:
    doc = json.loads((out / "audit.json").read_text())
    return doc, json.loads((out / "private" / "train.json").read_text()), pd.read_csv(out / "private" / "canaries.csv")


def test_cli_pdac_canary_patients_on_opacus(tmp_path):
    """3D canary patients: pdac with --privacy-unit patient on the opacus backend trains and audits."""
    out = tmp_path / "study"
    res = invoke("train-and-audit", "pdac", "--backend", "opacus", *PDAC_TINY, "--privacy-unit", "patient",
                 "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    doc, tj, table = _audited(out)
    assert tj["privacy_unit"] == "patient" and tj["canaries"]["unit"] == "patient"
    assert tj["canaries"]["spatial_dims"] == 3 and "3D" in tj["canaries"]["kind"]
    assert len(table) == 30 and table["n_images"].between(1, MAX_IMAGES_PER_PATIENT).all()
    assert table["n_images"].sum() == tj["canaries"]["n_images"] > 30
    n_members = int(pd.read_csv(out / "private" / "predictions.csv")["member"].sum())
    assert tj["n_train"] == n_members + tj["canaries"]["n_included_images"]
    assert tj["n_units"] == n_members + tj["canaries"]["n_included"]     # one scan per pdac patient
    priv = doc["models"]["private"]["privacy"]
    assert priv["empirical_epsilon"]["unit"] == "patient" and priv["empirical_epsilon"]["m"] == 15
    assert 0 <= priv["empirical_epsilon"]["estimate"] <= priv["accountant"]["epsilon"]
    assert priv["soundness"]["violated"] is False and priv["soundness"]["unit"] == "patient"
    assert "15 canary patients, each scored by the mean loss of its images" in (out / "report.html").read_text()


def test_cli_cxr_canary_patients_on_tf(multi, tmp_path, monkeypatch):
    """Canary patients on the tf backend: train-and-audit with --privacy-unit patient gives canary patients, drawn
    whole by the patient sampler (every physical batch of the tf.data pipeline), counted as patients, scored by
    the mean loss of their images under the saved Keras model, and audited per patient (m counts them)."""
    pytest.importorskip("tensorflow")
    from privaudit.backends import _units
    from privaudit.backends.tf_backend import _prepare, load_keras_model, predict_arrays

    seen = []
    pack = _units.PatientSampler.pack

    def spy(self, chosen):
        batches = pack(self, chosen)
        seen.extend(batches)
        return batches

    monkeypatch.setattr(_units.PatientSampler, "pack", spy)
    out = tmp_path / "study"
    res = invoke("train-and-audit", "cxr", "--backend", "tf", "--data", multi, "--image-size", "16", "--width", "4",
                 "--epochs", "1", "--batch-size", "4", "--noise-multiplier", "1.0", "--privacy-unit", "patient",
                 "--canaries", "30", "--no-baseline", "--n-boot", "50", "--quiet", "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    doc, tj, table = _audited(out)
    manifest = load_manifest(multi, task=CXR)
    cfg = _config(backend="tf", canaries=30, physical_batch_size=None)
    plan = plan_training(manifest, cfg, CXR, 16)   # the same plan the run made: the same canaries
    c, n_real = plan.canaries, int(plan.train_mask.sum())
    assert tj["backend"] == "tf" and tj["privacy_unit"] == "patient" and tj["n_units"] == plan.n_units
    block = tj["canaries"]
    assert block["unit"] == "patient" and block["m"] == 30 and block["n_included"] == int(c.unit_included.sum())
    assert block["n_images"] == len(c.images) > 30 and block["n_included_images"] == int(c.included.sum())
    n_patients = manifest.frame.loc[plan.train_mask, "patient_id"].nunique()
    assert tj["n_units"] == n_patients + block["n_included"] and tj["n_train"] == n_real + block["n_included_images"]
    # every physical batch holds each included canary patient's images all together, or none of them
    inc_owner, hits = c.owner[c.included], 0
    for b in seen:
        rows = b.items[b.items >= n_real] - n_real
        for u in np.unique(inc_owner[rows]):
            assert np.isin(np.flatnonzero(inc_owner == u), rows).all()
            hits += 1
    assert hits > 0
    # canaries.csv: one row per canary patient, its loss the mean of its images' losses under the saved model
    assert len(table) == 30 and table["n_images"].tolist() == c.n_images.tolist()
    assert table["included"].tolist() == c.unit_included.astype(int).tolist() and (table["unit"] == "patient").all()
    model = load_keras_model(out / "private" / "model" / "model.keras")
    _, per_image = predict_arrays(model, _prepare(c.images), c.labels)
    ref = pd.Series(per_image).groupby(c.owner).mean().to_numpy()
    np.testing.assert_allclose(table["loss"].to_numpy(), ref, rtol=1e-4)
    # the audit: per canary patient, against the patient-level epsilon
    priv = doc["models"]["private"]["privacy"]
    emp = priv["empirical_epsilon"]
    assert emp["unit"] == "patient" and emp["fdp"]["m"] == 30 and emp["m"] == 15   # Steinke's: the held-out half
    assert emp["n_images"] == block["n_images"]
    assert 0 <= emp["estimate"] <= priv["accountant"]["epsilon"]
    assert priv["soundness"]["violated"] is False and priv["soundness"]["unit"] == "patient"


def test_cli_pdac_canary_volumes_on_tf(tmp_path):
    """3D canaries on the tf backend (one scan per pdac patient, so the unit left unset is the image)."""
    pytest.importorskip("tensorflow")
    out = tmp_path / "study"
    res = invoke("train-and-audit", "pdac", "--backend", "tf", *PDAC_TINY, "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    doc, tj, table = _audited(out)
    assert tj["backend"] == "tf" and tj["canaries"]["unit"] == "image" and tj["canaries"]["spatial_dims"] == 3
    assert len(table) == 30 and (table["n_images"] == 1).all() and table["loss"].notna().all()
    n_members = int(pd.read_csv(out / "private" / "predictions.csv")["member"].sum())
    assert tj["n_train"] == n_members + int(table["included"].sum())
    priv = doc["models"]["private"]["privacy"]
    assert priv["empirical_epsilon"]["m"] == 15 and priv["soundness"]["violated"] is False


def test_too_many_canary_volumes_for_memory_is_a_config_error(multi):
    from privaudit.errors import ConfigError

    manifest = load_manifest(multi, task=CXR)
    with pytest.raises(ConfigError, match="use fewer canaries"):
        plan_training(manifest, _config(canaries=100_000), CXR, 256)   # 100k patients of up to 4 images at 256^2
