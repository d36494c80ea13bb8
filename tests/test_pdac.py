"""Task pdac: NIfTI loading through MONAI with its cache, the msd preset, the 3D model under Opacus, the CLI
end to end on tiny volumes, and the bad inputs of the issue (one line, exit 2, nothing half-written)."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import invoke
from privaudit.data import volumes
from privaudit.data.presets import SOURCE_SHORTCUT_WARNING, detect_preset, load_data
from privaudit.data.synth_ct import ras_affine, synthesize_ct, to_storage, write_nifti
from privaudit.errors import ConfigError, DataError
from privaudit.tasks import create_task

SIZE = 16
TASK = create_task("pdac")
TINY = ["--image-size", str(SIZE), "--epochs", "1", "--width", "4", "--batch-size", "8", "--n-boot", "50", "--quiet"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test caches volumes in its session's own folder, never in the user's cache."""
    monkeypatch.setenv(volumes.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "volume-cache"))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pdac") / "cohort"
    synthesize_ct(out, n=40, image_size=SIZE, seed=2)
    return out


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("msd") / "Task07_Pancreas"
    synthesize_ct(out, n=40, image_size=SIZE, seed=3, layout="msd")
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line_exit_2(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    err = res.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]


# ---------------------------------------------------------------------------------------------------------
# Loading volumes


def test_load_volumes_gives_unit_cubes_and_the_cache_skips_decoding(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv(volumes.CACHE_ENV, str(tmp_path / "cache"))
    paths = [cohort / p for p in pd.read_csv(cohort / "manifest.csv")["path"][:6]]
    seen = []
    x = volumes.load_volumes(paths, SIZE, progress=seen.append)
    assert x.shape == (6, 1, SIZE, SIZE, SIZE) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
    assert seen == list(range(1, 7))
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert len(list((tmp_path / "cache" / "volumes").glob("*.npy"))) == 6

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(volumes, "read_volume", no_decoding)
    np.testing.assert_array_equal(volumes.load_volumes(paths, SIZE), x)
    # other preprocessing parameters are another cache entry, so they decode again
    with pytest.raises(AssertionError, match="decoded"):
        volumes.load_volumes(paths[:1], SIZE, window=(-100.0, 240.0))


def test_cache_follows_file_content_and_survives_a_damaged_entry(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv(volumes.CACHE_ENV, str(tmp_path / "cache"))
    files = pd.read_csv(cohort / "manifest.csv")["path"][:2]
    work = tmp_path / "v.nii.gz"
    shutil.copy(cohort / files[0], work)
    first = volumes.load_volumes([work], SIZE)
    shutil.copy(cohort / files[1], work)  # same path, new content
    second = volumes.load_volumes([work], SIZE)
    np.testing.assert_allclose(second, volumes.load_volumes([cohort / files[1]], SIZE, cache=False))
    assert not np.array_equal(first, second)
    for entry in (tmp_path / "cache" / "volumes").glob("*.npy"):
        entry.write_bytes(b"not an array")
    np.testing.assert_array_equal(volumes.load_volumes([work], SIZE), second)


def test_voxel_order_and_spacing_do_not_change_what_the_model_sees(tmp_path):
    """One RAS volume stored as RAS and as LPS (flipped axes, negative affine) loads to the same cube; a finer
    grid of the same anatomy loads to nearly the same cube (resampling to the target spacing)."""
    rng = np.random.default_rng(0)
    size = 20
    ras = np.full((size,) * 3, -1000.0)
    ras[4:16, 5:15, 3:17] = 40.0
    ras[10:15, 6:10, 8:14] = 180.0   # an asymmetric bright block: right, posterior
    ras += rng.normal(0, 5, ras.shape)
    spacing = (12.0, 12.0, 12.0)
    for order in ("RAS", "LPS"):
        write_nifti(tmp_path / f"{order}.nii.gz", to_storage(ras, order), ras_affine(spacing, size, order),
                    dtype=np.int16)
    fine = np.repeat(np.repeat(np.repeat(ras, 2, 0), 2, 1), 2, 2)
    write_nifti(tmp_path / "fine.nii", fine, ras_affine((6.0, 6.0, 6.0), 2 * size, "RAS"), dtype=np.int16)
    a, b, c = volumes.load_volumes([tmp_path / "RAS.nii.gz", tmp_path / "LPS.nii.gz", tmp_path / "fine.nii"], SIZE,
                                   cache=False)
    assert nib.aff2axcodes(nib.load(str(tmp_path / "LPS.nii.gz")).affine) == ("L", "P", "S")
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - c).mean() < 0.05
    # the bright block stays on the right (+x, the high index of the first axis after RAS orientation)
    assert a[0, SIZE // 2:].max() > 0.9 and a[0, : SIZE // 4].max() < 0.8


def test_ct_window_maps_hu_to_unit_range(tmp_path):
    vol = np.full((SIZE,) * 3, -1000.0)
    vol[2:14, 2:14, 2:14] = 25.0     # the window's middle: (25 + 150) / 350 = 0.5
    vol[6:10, 6:10, 6:10] = 900.0    # above the window: 1
    write_nifti(tmp_path / "w.nii.gz", vol, ras_affine((14.0, 14.0, 14.0), SIZE, "RAS"), dtype=np.int16)
    x = volumes.load_volumes([tmp_path / "w.nii.gz"], SIZE, cache=False)[0, 0]
    assert x.max() == pytest.approx(1.0, abs=1e-3)
    assert np.isclose(x, 0.5, atol=0.02).sum() > 100
    assert x.min() == pytest.approx(0.0, abs=1e-6)


def _write_bad(kind: str, folder: Path, good: Path) -> Path:
    if kind == "png":
        from PIL import Image

        path = folder / "slice.png"
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    elif kind == "not_nifti":
        path = folder / "scan.nii.gz"
        path.write_bytes(gzip.compress(b"this is a text file, not a volume" * 20))
    elif kind == "truncated":
        path = folder / "scan.nii.gz"
        path.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    elif kind == "flat":
        path = folder / "flat.nii.gz"
        write_nifti(path, np.zeros((16, 16, 1)), np.eye(4), dtype=np.int16)
    else:  # a directory suffix that is not NIfTI
        path = folder / "scan.mha"
        path.write_bytes(b"\0" * 64)
    return path


@pytest.mark.parametrize("kind, match", [
    ("png", "a 2D image"), ("not_nifti", "not a readable NIfTI"), ("truncated", "truncated or corrupt"),
    ("flat", "a 2D image of shape 16x16x1"), ("other", "not a NIfTI volume"),
])
def test_bad_volume_files_raise_one_line_naming_the_file(kind, match, cohort, tmp_path):
    good = cohort / pd.read_csv(cohort / "manifest.csv")["path"][0]
    bad = _write_bad(kind, tmp_path, good)
    with pytest.raises(DataError, match=match) as info:
        volumes.load_volumes([good, bad], SIZE, cache=False)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# The msd preset


def test_msd_preset_reads_a_decathlon_folder_with_controls(msd):
    assert detect_preset(msd) == "msd"
    assert detect_preset(msd.parent) == "msd"   # the parent holding Task07_Pancreas
    with pytest.warns(UserWarning, match="shortcut") as caught:
        manifest = load_data(msd.parent, task=TASK, controls=msd / "controls", seed=0)
    assert any(SOURCE_SHORTCUT_WARNING in str(w.message) for w in caught)
    frame = manifest.frame
    dataset = json.loads((msd / "dataset.json").read_text())
    truth = pd.read_csv(msd / "cohort.csv")
    assert len(frame) == len(truth)
    tumours = frame[frame["site"] == "msd"]
    assert len(tumours) == len(dataset["training"]) and (tumours["pdac"] == 1).all()
    assert (frame.loc[frame["site"] == "controls", "pdac"] == 0).all()
    assert set(frame["split"]) == {"train", "val", "test"}
    # demographics joined by file: the synthetic truth agrees
    merged = frame.assign(file=[Path(p).name for p in frame["path"]]).merge(
        truth.assign(file=[Path(p).name for p in truth["path"]]), on="file", suffixes=("", "_truth"))
    assert len(merged) == len(frame)
    assert (merged["sex"] == merged["sex_truth"]).all() and (merged["age"] == merged["age_truth"]).all()
    assert all(p.is_file() for p in manifest.image_paths())


def test_msd_labels_come_from_the_tumour_class_of_the_label_maps(msd, tmp_path):
    folder = _copy(msd, tmp_path / "Task07_Pancreas")
    first = json.loads((folder / "dataset.json").read_text())["training"][0]["label"]
    lab = nib.load(str(folder / first))
    data = np.asarray(lab.dataobj).copy()
    data[data == 2] = 1   # a map without the tumour class
    write_nifti(folder / first, data, lab.affine, dtype=np.uint8)
    with pytest.raises(DataError, match="no voxel of tumour class 2") as info:
        load_data(folder, task=TASK, controls=folder / "controls")
    assert first.lstrip("./") in str(info.value)
    with pytest.warns(UserWarning, match="shortcut"):   # --label-from dataset trusts the archive
        manifest = load_data(folder, task=TASK, controls=folder / "controls", label_from="dataset")
    assert manifest.frame.loc[manifest.frame["site"] == "msd", "pdac"].eq(1).all()
    # a dataset.json that calls the tumour class by another number is followed
    ds = json.loads((folder / "dataset.json").read_text())
    ds["labels"] = {"0": "background", "1": "pancreas"}
    (folder / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(DataError, match="names no tumour class"):
        load_data(folder, task=TASK, controls=folder / "controls")


def test_msd_preset_reads_an_nnunet_style_dataset_json(msd, tmp_path):
    """nnU-Net v2 writes {"cancer": 2} and no 'training' list: cases are paired by file name."""
    folder = _copy(msd, tmp_path / "Dataset007_Pancreas")
    ds = json.loads((folder / "dataset.json").read_text())
    n_cases = len(ds.pop("training"))
    ds["labels"] = {"background": 0, "pancreas": 1, "cancer": 2}
    (folder / "dataset.json").write_text(json.dumps(ds))
    for image in (folder / "imagesTr").glob("*.nii.gz"):
        image.rename(image.with_name(image.name.replace(".nii.gz", "_0000.nii.gz")))
    demo = pd.read_csv(folder / "demographics.csv")
    demo["image"] = demo["image"].str.replace(".nii.gz", "_0000.nii.gz", regex=False)
    demo.to_csv(folder / "demographics.csv", index=False)
    with pytest.warns(UserWarning, match="shortcut"):
        manifest = load_data(folder, task=TASK, controls=folder / "controls")
    tumours = manifest.frame[manifest.frame["site"] == "msd"]
    assert len(tumours) == n_cases and tumours["path"].str.endswith("_0000.nii.gz").all()


def test_msd_without_controls_is_one_class_and_refused(msd):
    with pytest.raises(DataError, match="one class.*--controls"):
        load_data(msd, task=TASK)


def test_msd_without_demographics_warns_and_still_loads(msd, tmp_path):
    folder = _copy(msd, tmp_path / "Task07_Pancreas")
    (folder / "demographics.csv").unlink()
    (folder / "controls" / "demographics.csv").unlink()
    with pytest.warns(UserWarning) as caught:
        manifest = load_data(folder, task=TASK, controls=folder / "controls")
    assert any("no demographics.csv" in str(w.message) for w in caught)
    assert "sex" not in manifest.frame.columns and "site" in manifest.frame.columns


def test_msd_bad_folders(msd, tmp_path):
    folder = _copy(msd, tmp_path / "Task07_Pancreas")
    (folder / "dataset.json").unlink()
    with pytest.raises(DataError, match="no dataset.json"):
        load_data(folder, task=TASK, controls=folder / "controls")
    folder = _copy(msd, tmp_path / "mismatch")
    label = json.loads((folder / "dataset.json").read_text())["training"][1]["label"]
    write_nifti(folder / label, np.zeros((SIZE, SIZE, SIZE - 2)), np.eye(4), dtype=np.uint8)
    with pytest.raises(DataError, match="does not match its image") as info:
        load_data(folder, task=TASK, controls=folder / "controls")
    assert label.lstrip("./") in str(info.value)


def test_msd_options_are_refused_by_other_presets(cohort):
    with pytest.raises(ConfigError, match="--controls applies to the msd preset"):
        load_data(cohort, task=TASK, controls=cohort)


# ---------------------------------------------------------------------------------------------------------
# The 3D model under Opacus


def test_cnn3d_passes_opacus_validator_and_one_dp_step_runs():
    import torch
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    from privaudit.backends.torch_models import create_model

    torch.manual_seed(0)
    model = create_model("cnn3d-gn", in_channels=1, num_classes=1, width=4, spatial_dims=3)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not [m for m in model.modules() if getattr(m, "inplace", False)]
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    for edge in (16, 32):
        assert model(torch.zeros(2, 1, edge, edge, edge)).shape == (2, 1)
    x, y = torch.randn(8, 1, SIZE, SIZE, SIZE), torch.randint(0, 2, (8, 1)).float()
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    engine = PrivacyEngine(accountant="prv")
    private, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                     noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    xb, yb = x[:3], y[:3]   # a fixed batch: per-sample gradients against one-sample backward passes
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(private(xb), yb).backward()
    per_sample = [p.grad_sample.detach().clone() for p in private.parameters()]
    assert all(g.shape[0] == 3 for g in per_sample)
    for i in range(3):
        reference.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(reference(xb[i:i + 1]), yb[i:i + 1]).backward()
        for g, p in zip(per_sample, reference.parameters()):
            np.testing.assert_allclose(g[i].numpy(), p.grad.numpy(), rtol=1e-3, atol=1e-5)
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, private.parameters()))
    assert engine.get_epsilon(1e-3) > 0


# ---------------------------------------------------------------------------------------------------------
# CLI end to end


def test_train_and_audit_pdac_end_to_end_writes_the_contract(tmp_path):
    import jsonschema

    out = tmp_path / "study"
    res = invoke("train-and-audit", "pdac", "--backend", "opacus", "--n-samples", "60", *TINY, "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    for f in ("audit.json", "report.html", "data/manifest.csv", "data/cohort.json"):
        assert (out / f).is_file(), f
    for run in ("private", "non_private"):
        for f in ("config.json", "train.json", "predictions.csv", "audit.json", "model/model.json",
                  "model/weights.pt"):
            assert (out / run / f).is_file(), (run, f)
        model = json.loads((out / run / "model" / "model.json").read_text())
        assert model["architecture"] == "cnn3d-gn" and model["input_shape"] == [1, SIZE, SIZE, SIZE]
        train = json.loads((out / run / "train.json").read_text())
        assert train["task"] == "pdac" and train["peak_memory"]["cpu_rss_peak_mb"] > 50
        preds = pd.read_csv(out / run / "predictions.csv")
        assert {"y_pdac", "p_pdac", "site", "sex", "age"} <= set(preds.columns)
    doc = json.loads((out / "audit.json").read_text())
    schema = json.loads((Path(__import__("privaudit").__file__).parent / "audit" / "audit.schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert doc["study"]["task"] == "pdac" and doc["study"]["labels"] == ["pdac"]
    assert doc["models"]["private"]["privacy"]["accountant"]["epsilon"] > 0
    # 60 scans: every site has fewer than 10 test patients, so its fairness rows are suppressed (min_cell) and
    # the attribute is skipped with a warning; the cohort composition still shows each site
    assert "site" in doc["study"]["attributes"] and "site" not in doc["models"]["non_private"]["fairness"]
    assert any(w.startswith("site: group(s)") and "suppressed" in w for w in doc["warnings"])
    assert set(doc["study"]["data"]["composition"]["site"]["groups"]) == {"A", "B", "C"}


def test_synth_msd_then_train_and_audit_through_the_preset(tmp_path):
    data = tmp_path / "msd"
    res = invoke("data", "synth", "pdac", "--out", data, "--n", "40", "--image-size", SIZE, "--seed", "1",
                 "--layout", "msd", "--quiet")
    assert res.exit_code == 0, res.output + (res.stderr or "")
    assert (data / "dataset.json").is_file() and (data / "controls").is_dir()
    out = tmp_path / "study"
    with pytest.warns(UserWarning, match="shortcut"):
        res = invoke("train-and-audit", "pdac", "--data", data, "--controls", data / "controls", "--no-baseline",
                     *TINY, "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    doc = json.loads((out / "audit.json").read_text())
    assert any("shortcut" in w for w in doc["warnings"])
    assert set(doc["study"]["data"]["composition"]["site"]["groups"]) <= {"msd", "controls"}


@pytest.mark.parametrize("case", ["png", "truncated", "not_nifti", "msd_no_dataset", "no_tumour_class",
                                  "shape_mismatch", "one_class", "layout_for_cxr"])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, cohort, msd, tmp_path):
    out = tmp_path / "study"
    args = ["train-and-audit", "pdac", *TINY, "--out", out]
    if case in ("png", "truncated", "not_nifti"):
        data = _copy(cohort, tmp_path / "data")
        frame = pd.read_csv(data / "manifest.csv")
        bad = _write_bad(case, data / "images", data / frame["path"][0])
        frame.loc[0, "path"] = str(bad.relative_to(data))
        frame.to_csv(data / "manifest.csv", index=False)
        res = invoke(*args, "--data", data)
        assert str(bad) in _one_line_exit_2(res)
    elif case == "layout_for_cxr":
        res = invoke("data", "synth", "cxr", "--out", out, "--n", "20", "--image-size", "16", "--layout", "msd")
        assert "pdac only" in _one_line_exit_2(res)
    else:
        data = _copy(msd, tmp_path / "Task07_Pancreas")
        training = json.loads((data / "dataset.json").read_text())["training"]
        extra = ["--controls", data / "controls"]
        if case == "msd_no_dataset":
            (data / "dataset.json").unlink()
            expect = "no dataset.json"
        elif case == "no_tumour_class":
            lab = nib.load(str(data / training[0]["label"]))
            write_nifti(data / training[0]["label"], np.minimum(np.asarray(lab.dataobj), 1), lab.affine,
                        dtype=np.uint8)
            expect = training[0]["label"].lstrip("./")
            extra += ["--label-from", "segmentation"]
        elif case == "shape_mismatch":
            write_nifti(data / training[0]["label"], np.zeros((SIZE, SIZE, 4)), np.eye(4), dtype=np.uint8)
            expect = training[0]["label"].lstrip("./")
        else:
            extra = []
            expect = "one class"
        res = invoke(*args, "--data", data, *extra)
        assert expect in _one_line_exit_2(res)
    _nothing_written(out)
