"""Tests for the synthetic CT cohort (privaudit.data.synth_ct): determinism, NIfTI headers, planted design."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from privaudit.data.synth_ct import (MANIFEST_COLUMNS, PLANTED_EFFECTS, SITES, prevalence_probability, ras_affine,
                                     sample_cohort, site_grid, synthesize_ct)
from privaudit.errors import ConfigError

SIZE = 16
SITE = {s.name: s for s in SITES}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ct")
    synthesize_ct(out, n=24, image_size=SIZE, seed=5)
    return out


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("msd")
    synthesize_ct(out, n=24, image_size=SIZE, seed=6, layout="msd")
    return out


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    calls = []
    a = synthesize_ct(tmp_path / "a", n=12, image_size=SIZE, seed=3, progress=calls.append)
    synthesize_ct(tmp_path / "b", n=12, image_size=SIZE, seed=3)
    synthesize_ct(tmp_path / "c", n=12, image_size=SIZE, seed=4)
    assert a == tmp_path / "a" / "manifest.csv"
    assert calls == list(range(1, 13))
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len([k for k in fa if k.endswith(".nii.gz")]) == 12
    assert fa == fb
    assert fa["images/CT0000.nii.gz"] != fc["images/CT0000.nii.gz"]
    # the manifest table is exactly sample_cohort's
    written = pd.read_csv(a, dtype={"sample_id": str, "patient_id": str})
    pd.testing.assert_frame_equal(written, sample_cohort(12, seed=3), check_dtype=False)


def test_nifti_headers_read_back_with_affine_spacing_and_units(cohort):
    frame = pd.read_csv(cohort / "manifest.csv")
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    for row in frame.itertuples():
        img = nib.load(str(cohort / row.path))
        site = SITE[row.site]
        spacing = site_grid(site, SIZE)
        assert img.shape == (SIZE,) * 3
        assert img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.header.get_zooms(), spacing, rtol=1e-5)
        assert img.header.get_xyzt_units()[0] == "mm"
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.affine[:3, :3], ras_affine(spacing, SIZE, site.voxel_order)[:3, :3], atol=1e-4)
        assert nib.aff2axcodes(img.affine) == tuple(site.voxel_order)
        hu = np.asarray(img.dataobj)
        assert hu.min() < -800 and hu.max() > 250  # air and bone present, in Hounsfield units


def test_voxel_order_differs_by_site_but_anatomy_agrees_in_world_space(cohort):
    """The liver (right of the patient, +x in RAS) is found on the same side whatever order a site stores."""
    frame = pd.read_csv(cohort / "manifest.csv")
    seen = set()
    for row in frame.itertuples():
        img = nib.as_closest_canonical(nib.load(str(cohort / row.path)))
        hu = img.get_fdata()
        upper = hu[:, :, SIZE // 2:]
        soft = (upper > 70) & (upper < 160)
        x = np.arange(SIZE)[:, None, None] * np.ones_like(upper)
        right_fraction = soft[x >= SIZE / 2].mean() / max(soft[x < SIZE / 2].mean(), 1e-9)
        assert right_fraction > 1.0, (row.sample_id, row.site)
        seen.add(SITE[row.site].voxel_order)
    assert seen == {"RAS", "LPS"}


def test_cohort_json_documents_the_planted_effects_and_matches_the_manifest(cohort):
    record = json.loads((cohort / "cohort.json").read_text())
    frame = pd.read_csv(cohort / "manifest.csv")
    assert record["task"] == "pdac" and record["parameters"] == {"n": 24, "image_size": SIZE, "seed": 5,
                                                                  "layout": "manifest"}
    names = {e["name"] for e in record["planted_effects"]}
    assert {"site_shortcut", "age_fatty_pancreas", "female_small_tumours"} <= names
    shortcut = next(e for e in record["planted_effects"] if e["name"] == "site_shortcut")
    assert shortcut["attribute"] == "site"
    assert shortcut["parameters"]["A"]["p_given_pdac"] == SITE["A"].p_given_pdac
    realised = record["realised"]
    assert realised["n"] == len(frame) and realised["n_pdac"] == int(frame["pdac"].sum())
    for name, stats in realised["by_site"].items():
        assert stats["n"] == int((frame["site"] == name).sum())
        assert stats["n_pdac"] == int(frame.loc[frame["site"] == name, "pdac"].sum())


def test_planted_design_shows_in_a_large_table():
    """Without volumes: prevalence follows the site shortcut (A > C > B) and rises with age."""
    frame = sample_cohort(4000, seed=0)
    prev = frame.groupby("site")["pdac"].mean()
    assert prev["A"] > prev["C"] + 0.15 > prev["B"] + 0.3
    # P(site | label) as designed, within sampling error
    for s in SITES:
        p_pos = (frame.loc[frame["pdac"] == 1, "site"] == s.name).mean()
        assert abs(p_pos - s.p_given_pdac) < 0.04
    old, young = frame[frame["age"] >= 70], frame[frame["age"] < 50]
    assert old["pdac"].mean() > young["pdac"].mean() + 0.2
    expected = prevalence_probability(frame["age"], frame["sex"] == "M").mean()
    assert abs(frame["pdac"].mean() - expected) < 0.03
    assert set(frame["split"]) == {"train", "val", "test"}
    assert frame["patient_id"].is_unique


def test_msd_layout_has_dataset_json_label_maps_and_controls(msd):
    dataset = json.loads((msd / "dataset.json").read_text())
    truth = pd.read_csv(msd / "cohort.csv")
    assert dataset["labels"]["2"] == "cancer" and dataset["modality"] == {"0": "CT"}
    assert dataset["numTraining"] == len(dataset["training"]) == int(truth["pdac"].sum())
    controls = sorted((msd / "controls").glob("*.nii.gz"))
    assert len(controls) == int((truth["pdac"] == 0).sum()) > 0
    assert not list((msd / "labelsTr").glob("PANCREAS_*"))  # controls carry no label maps
    for entry in dataset["training"]:
        image, label = nib.load(str(msd / entry["image"])), nib.load(str(msd / entry["label"]))
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, label.affine)
        lab = np.asarray(label.dataobj)
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2} and 2 in lab
    for folder in (msd, msd / "controls"):
        demo = pd.read_csv(folder / "demographics.csv")
        assert list(demo.columns) == ["image", "sex", "age"]
        assert all((folder / p).is_file() for p in demo["image"])


def test_tumour_is_hypodense_against_the_pancreas(msd):
    """Where the label map says tumour, the image is darker than the pancreas around it (for clear tumours)."""
    dataset = json.loads((msd / "dataset.json").read_text())
    gaps = []
    for entry in dataset["training"]:
        hu = np.asarray(nib.load(str(msd / entry["image"])).dataobj, dtype=float)
        lab = np.asarray(nib.load(str(msd / entry["label"])).dataobj)
        if (lab == 1).sum() >= 3 and (lab == 2).sum() >= 3:
            gaps.append(np.median(hu[lab == 1]) - np.median(hu[lab == 2]))
    # at 16^3 the pancreas voxels are partly fat, so the gap is smaller than the 100-130 HU drawn
    assert len(gaps) >= 5 and np.median(gaps) > 15 and np.mean(np.asarray(gaps) > 0) > 0.8


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 5}, "too small"),
    ({"image_size": 8}, "too small"),
    ({"seed": -1}, "seed"),
    ({"layout": "bids"}, "unknown layout"),
])
def test_bad_arguments_raise_config_errors(tmp_path, kwargs, match):
    args = {"n": 12, "image_size": SIZE, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        synthesize_ct(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_planted_effects_name_audit_attributes():
    assert {e["attribute"] for e in PLANTED_EFFECTS} == {"site", "age_group", "sex"}
