"""Dataset presets: layout detection, label mapping, views, splits, attribute joins and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from privaudit.data import presets
from privaudit.data.images import read_image
from privaudit.data.presets import create_preset, detect_preset, list_presets, load_data, register_preset
from privaudit.errors import ConfigError, DataError, RegistryError
from privaudit.tasks import create_task

TASK = create_task("cxr")
NAN = float("nan")

CHEXPERT_FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CHEXPERT_FINDINGS
NIH_COLUMNS = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]",
)


def write_image(path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(path)


def write_dicom(path, photometric: str) -> np.ndarray:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = (np.arange(64, dtype=np.uint16) * 100).reshape(8, 8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return pixels


def write_csv(path, rows: list[dict], columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)


def chexpert_row(patient: int, study: int = 1, view: int = 1, frontal: bool = True, part: str = "train", **findings):
    kind = "frontal" if frontal else "lateral"
    row = {
        "Path": f"CheXpert-v1.0-small/{part}/patient{patient:05d}/study{study}/view{view}_{kind}.jpg",
        "Sex": "Female" if patient % 2 else "Male",
        "Age": 40 + patient,
        "Frontal/Lateral": "Frontal" if frontal else "Lateral",
        "AP/PA": "AP" if frontal else "",
    }
    row.update(findings)
    return row


def make_chexpert(root, train: list[dict], valid: list[dict] | None = None, images: bool = True):
    """A CheXpert-v1.0-small folder: train.csv (+ valid.csv) and a JPEG per row."""
    folder = root / "CheXpert-v1.0-small"
    write_csv(folder / "train.csv", train, CHEXPERT_COLUMNS)
    if valid is not None:
        write_csv(folder / "valid.csv", valid, CHEXPERT_COLUMNS)
    if images:
        for row in train + (valid or []):
            write_image(root / row["Path"])
    return folder


def nih_row(index: str, findings: str, patient: int, age="58", view: str = "PA", sex: str = "M"):
    return {
        "Image Index": index, "Finding Labels": findings, "Follow-up #": 0, "Patient ID": patient,
        "Patient Age": age, "Patient Gender": sex, "View Position": view,
        "OriginalImage[Width": 8, "Height]": 8, "OriginalImagePixelSpacing[x": 0.143, "y]": 0.143,
    }


def make_nih(root, rows: list[dict], table: str = "Data_Entry_2017.csv"):
    """NIH ChestX-ray14 in the Kaggle layout: images spread over images_00N/images/ folders."""
    folder = root / "nih"
    write_csv(folder / table, rows, NIH_COLUMNS)
    for i, row in enumerate(rows):
        write_image(folder / f"images_{i % 2 + 1:03d}" / "images" / row["Image Index"])
    return folder


MIMIC_IMAGES = [
    # dicom_id, subject_id, study_id, ViewPosition, split
    ("d1", "10000032", "50414267", "PA", "train"),
    ("d2", "10000032", "50414267", "LATERAL", "train"),
    ("d3", "10000764", "57375967", "AP", "validate"),
    ("d4", "11000001", "51000001", "PA", "test"),
    ("d5", "11000001", "52000002", "AP", "test"),  # study without a label row
]


def make_mimic(root, *, patients: bool = True, labels: list[dict] | None = None):
    folder = root / "mimic-cxr-jpg"
    folder.mkdir(parents=True)
    meta = pd.DataFrame(
        [
            {"dicom_id": d, "subject_id": s, "study_id": st, "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
             "ViewPosition": v, "Rows": 8, "Columns": 8}
            for d, s, st, v, _ in MIMIC_IMAGES
        ]
    )
    meta.to_csv(folder / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    if labels is None:
        labels = [
            {"subject_id": "10000032", "study_id": "50414267", "Cardiomegaly": 1.0, "Edema": -1.0, "Pneumonia": 0.0,
             "Consolidation": 0.0, "Pleural Effusion": 0.0, "Atelectasis": None},
            {"subject_id": "10000764", "study_id": "57375967", "Cardiomegaly": 0.0, "Pneumonia": -1.0,
             "Consolidation": 1.0, "Pleural Effusion": 1.0, "Atelectasis": 1.0},
            {"subject_id": "11000001", "study_id": "51000001", "No Finding": 1.0},
        ]
    write_csv(folder / "mimic-cxr-2.0.0-chexpert.csv.gz", labels, ("subject_id", "study_id") + CHEXPERT_FINDINGS)
    split = pd.DataFrame(
        [{"dicom_id": d, "study_id": st, "subject_id": s, "split": sp} for d, s, st, _, sp in MIMIC_IMAGES]
    )
    split.to_csv(folder / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    if patients:
        pd.DataFrame(
            {"subject_id": ["10000032", "10000764", "11000001"], "gender": ["F", "M", "F"], "anchor_age": [52, 86, 30],
             "anchor_year": [2180, 2132, 2150], "anchor_year_group": ["2014 - 2016"] * 3, "dod": [None] * 3}
        ).to_csv(folder / "patients.csv.gz", index=False)
    for d, s, st, _, _ in MIMIC_IMAGES:
        write_image(folder / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg")
    return folder


def labels_of(manifest, sample_id: str) -> list[float]:
    row = manifest.frame.set_index("sample_id").loc[sample_id]
    return [float(row[label]) for label in manifest.labels]


def assert_same(got: list[float], want: list[float]) -> None:
    np.testing.assert_array_equal(np.array(got, dtype=float), np.array(want, dtype=float))


def assert_patient_level(manifest) -> None:
    assert (manifest.frame.groupby("patient_id")["split"].nunique() == 1).all()


# --------------------------------------------------------------------------------------------------- registry


def test_registry_lists_and_rejects_unknown_names():
    assert list_presets() == ["chexpert", "manifest", "mimic", "msd", "nih"]
    assert create_preset("nih").name == "nih"
    with pytest.raises(RegistryError, match="unknown preset 'chexpret'.*Did you mean 'chexpert'"):
        create_preset("chexpret")


def test_registered_preset_is_used_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))
    calls = []

    def loader(path, *, task, labels, views, seed, check_files):
        calls.append((path, views, seed))
        return "loaded"

    register_preset("custom", loader)
    assert load_data(tmp_path, task=TASK, preset="custom", views="all", seed=3) == "loaded"
    assert calls == [(tmp_path, "all", 3)]
    assert "custom" in list_presets()


# --------------------------------------------------------------------------------------------------- detection


def test_detects_each_layout(tmp_path):
    chexpert = make_chexpert(tmp_path / "cx", [chexpert_row(1, Cardiomegaly=1)], images=False)
    nih = make_nih(tmp_path / "n", [nih_row("00000001_000.png", "No Finding", 1)])
    v2020 = tmp_path / "n2020"
    write_csv(v2020 / "Data_Entry_2017_v2020.csv", [nih_row("00000001_000.png", "No Finding", 1)], NIH_COLUMNS)
    mimic = make_mimic(tmp_path / "m")
    canonical = tmp_path / "own"
    own_row = {"sample_id": "a", "path": "a.png", "patient_id": "p"}
    write_csv(canonical / "manifest.csv", [own_row], own_row)

    assert detect_preset(chexpert) == "chexpert"
    assert detect_preset(chexpert / "train.csv") == "chexpert"
    assert detect_preset(nih) == "nih"
    assert detect_preset(nih / "Data_Entry_2017.csv") == "nih"
    assert detect_preset(v2020) == "nih"
    assert detect_preset(mimic) == "mimic"
    assert detect_preset(canonical) == "manifest"
    assert detect_preset(canonical / "manifest.csv") == "manifest"


def test_undetectable_folder_names_it_and_what_each_preset_wants(tmp_path):
    (tmp_path / "train.csv").write_text("a,b\n1,2\n")  # a train.csv that is not CheXpert's
    with pytest.raises(DataError) as err:
        load_data(tmp_path, task=TASK)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for wanted in ("manifest.csv", "train.csv", "Data_Entry_2017.csv", "mimic-cxr-2.0.0-metadata.csv"):
        assert wanted in msg


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_data(tmp_path / "nowhere", task=TASK)


# --------------------------------------------------------------------------------------------------- manifest + images


def test_manifest_preset_reads_png_jpeg_and_dicom(tmp_path):
    write_image(tmp_path / "img" / "a.png", 0)
    write_image(tmp_path / "img" / "b.jpg", 255)
    pixels = write_dicom(tmp_path / "img" / "c.dcm", "MONOCHROME2")
    write_dicom(tmp_path / "img" / "d.dcm", "MONOCHROME1")
    rows = [
        {"sample_id": s, "path": f"img/{s}.{ext}", "patient_id": f"p{i}", "split": "train", "cardiomegaly": i % 2}
        for i, (s, ext) in enumerate([("a", "png"), ("b", "jpg"), ("c", "dcm"), ("d", "dcm")])
    ]
    write_csv(tmp_path / "manifest.csv", rows, ("sample_id", "path", "patient_id", "split", "cardiomegaly"))

    m = load_data(tmp_path, task=TASK, labels=("cardiomegaly",))
    assert m.labels == ("cardiomegaly",)
    images = {sid: read_image(p) for sid, p in zip(m.frame["sample_id"], m.image_paths())}
    assert images["a"].max() == 0.0 and images["b"].min() == 1.0
    want = pixels / pixels.max()
    np.testing.assert_allclose(images["c"], want, atol=1e-6)
    np.testing.assert_allclose(images["d"], 1.0 - want, atol=1e-6)  # MONOCHROME1: bright is low
    assert images["c"].shape == (8, 8)


# --------------------------------------------------------------------------------------------------- CheXpert


def test_chexpert_label_mapping_and_attributes(tmp_path):
    train = [
        chexpert_row(1, Cardiomegaly=1.0, Edema=-1.0, Pneumonia=0.0, Consolidation=0.0, Atelectasis=0.0),
        chexpert_row(2, Pneumonia=-1.0, Consolidation=1.0, Edema=0.0, **{"Pleural Effusion": 1.0}),
        chexpert_row(3, Pneumonia=0.0, **{"No Finding": 1.0}),  # No Finding = 1: blank findings are negative
        chexpert_row(4, Pneumonia=0.0, Consolidation=-1.0, Cardiomegaly=0.0),
    ]
    train[3]["Sex"] = "Unknown"
    folder = make_chexpert(tmp_path, train)
    m = load_data(folder, task=TASK)

    assert m.labels == TASK.labels
    # cardiomegaly, congestion, pleural_effusion, pneumonic_infiltrates, atelectasis
    assert_same(labels_of(m, "patient00001/study1/view1_frontal"), [1, NAN, NAN, 0, 0])
    assert_same(labels_of(m, "patient00002/study1/view1_frontal"), [NAN, 0, 1, 1, NAN])
    assert_same(labels_of(m, "patient00003/study1/view1_frontal"), [0, 0, 0, 0, 0])
    assert_same(labels_of(m, "patient00004/study1/view1_frontal"), [0, NAN, NAN, NAN, NAN])
    # With the No Finding rule off, blank findings stay unknown there.
    off = load_data(folder, task=TASK, no_finding="ignore")
    assert_same(labels_of(off, "patient00003/study1/view1_frontal"), [NAN, NAN, NAN, NAN, NAN])
    frame = m.frame.set_index("sample_id")
    assert frame.loc["patient00001/study1/view1_frontal", "patient_id"] == "patient00001"
    assert frame["sex"].tolist()[:3] == ["F", "M", "F"] and pd.isna(frame["sex"].iloc[3])
    assert frame["age"].tolist() == [41, 42, 43, 44]
    assert "comorbidity" not in m.frame.columns
    # The dataset-folder prefix is dropped so that paths resolve inside the folder given.
    assert m.frame["path"].iloc[0] == "train/patient00001/study1/view1_frontal.jpg"
    assert all(p.is_file() for p in m.image_paths())


def test_chexpert_paths_already_relative_to_the_folder_are_kept(tmp_path):
    row = chexpert_row(1, Cardiomegaly=1.0)
    row["Path"] = "train/patient00001/study1/view1_frontal.jpg"
    write_csv(tmp_path / "train.csv", [row], CHEXPERT_COLUMNS)
    write_image(tmp_path / row["Path"])
    m = load_data(tmp_path, task=TASK, labels=("cardiomegaly",))
    assert m.frame["path"].tolist() == [row["Path"]]


def test_chexpert_frontal_filter_and_views_all(tmp_path):
    train = [chexpert_row(1, Cardiomegaly=1.0), chexpert_row(1, view=2, frontal=False, Cardiomegaly=1.0)]
    folder = make_chexpert(tmp_path, train)
    frontal = load_data(folder, task=TASK, labels=("cardiomegaly",))
    everything = load_data(folder, task=TASK, labels=("cardiomegaly",), views="all")
    assert frontal.frame["sample_id"].tolist() == ["patient00001/study1/view1_frontal"]
    assert sorted(everything.frame["sample_id"]) == [
        "patient00001/study1/view1_frontal", "patient00001/study1/view2_lateral"
    ]
    with pytest.raises(ConfigError, match="views 'side'"):
        load_data(folder, task=TASK, views="side")


def test_chexpert_no_frontal_images_left(tmp_path):
    folder = make_chexpert(tmp_path, [chexpert_row(1, frontal=False, Cardiomegaly=1.0)])
    with pytest.raises(DataError) as err:
        load_data(folder, task=TASK)
    msg = str(err.value)
    assert "train.csv" in msg and "'Frontal/Lateral'" in msg and "Lateral" in msg and "views='all'" in msg


def test_chexpert_splits_are_seeded_patient_level_and_valid_is_val(tmp_path):
    train = [chexpert_row(p, study=s, Cardiomegaly=1.0) for p in range(1, 31) for s in (1, 2)]
    valid = [chexpert_row(p, part="valid", Cardiomegaly=0.0) for p in (64541, 64542)]
    folder = make_chexpert(tmp_path, train, valid, images=False)
    a = load_data(folder, task=TASK, seed=7, check_files=False)
    b = load_data(folder, task=TASK, seed=7, check_files=False)
    c = load_data(folder, task=TASK, seed=8, check_files=False)

    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert not a.frame["split"].equals(c.frame["split"])
    assert_patient_level(a)
    assert_patient_level(c)
    by_patient = a.frame.groupby("patient_id")["split"].first()
    assert set(by_patient[["patient64541", "patient64542"]]) == {"val"}
    train_patients = by_patient.drop(["patient64541", "patient64542"])
    assert set(train_patients) == {"train", "test"}
    assert (train_patients == "test").sum() == 6  # 20% of 30 patients


def test_chexpert_without_valid_gets_train_val_test(tmp_path):
    folder = make_chexpert(tmp_path, [chexpert_row(p, Cardiomegaly=1.0) for p in range(1, 21)], images=False)
    m = load_data(folder, task=TASK, labels=("cardiomegaly",), check_files=False)
    assert m.frame["split"].value_counts().to_dict() == {"train": 14, "test": 4, "val": 2}


def test_chexpert_patient_in_train_and_valid_is_a_leak(tmp_path):
    folder = make_chexpert(
        tmp_path,
        [chexpert_row(1, Cardiomegaly=1.0)],
        [chexpert_row(1, study=2, part="valid", Cardiomegaly=1.0)],
        images=False,
    )
    with pytest.raises(DataError, match="patient 'patient00001' appears in splits"):
        load_data(folder, task=TASK, labels=("cardiomegaly",), check_files=False)


def test_chexpert_label_subset_requires_only_its_columns(tmp_path):
    columns = [c for c in CHEXPERT_COLUMNS if c != "Edema"]
    write_csv(tmp_path / "train.csv", [chexpert_row(1, Cardiomegaly=1.0, Atelectasis=0.0)], columns)
    m = load_data(tmp_path, task=TASK, labels=("cardiomegaly", "atelectasis"), check_files=False)
    assert m.labels == ("cardiomegaly", "atelectasis")
    assert [c for c in m.frame.columns if c in TASK.labels] == ["cardiomegaly", "atelectasis"]
    assert_same(labels_of(m, "patient00001/study1/view1_frontal"), [1, 0])
    with pytest.raises(DataError, match=r"train\.csv: missing required column 'Edema'"):
        load_data(tmp_path, task=TASK, check_files=False)


def test_unknown_label_is_rejected(tmp_path):
    folder = make_chexpert(tmp_path, [chexpert_row(1, Cardiomegaly=1.0)], images=False)
    with pytest.raises(DataError, match="unknown label 'edema' for task 'cxr'"):
        load_data(folder, task=TASK, labels=("edema",), check_files=False)


def test_chexpert_missing_path_column(tmp_path):
    columns = [c for c in CHEXPERT_COLUMNS if c != "Path"]
    row = chexpert_row(1, Cardiomegaly=1.0)
    write_csv(tmp_path / "train.csv", [row], columns)
    with pytest.raises(DataError) as err:
        load_data(tmp_path / "train.csv", task=TASK, preset="chexpert")
    msg = str(err.value)
    assert "train.csv" in msg and "missing required column 'Path'" in msg and "\n" not in msg


def test_chexpert_label_value_out_of_range(tmp_path):
    rows = [chexpert_row(1, Cardiomegaly=1.0), chexpert_row(2, Cardiomegaly=2.0)]
    folder = make_chexpert(tmp_path, rows, images=False)
    with pytest.raises(DataError) as err:
        load_data(folder, task=TASK, check_files=False)
    msg = str(err.value)
    assert "train.csv" in msg and "'Cardiomegaly'" in msg and "'2.0'" in msg and "row 3" in msg and "-1" in msg


def test_chexpert_path_without_patient_folder(tmp_path):
    row = chexpert_row(1, Cardiomegaly=1.0)
    row["Path"] = "CheXpert-v1.0-small/train/someone/study1/view1_frontal.jpg"
    write_csv(tmp_path / "train.csv", [row], CHEXPERT_COLUMNS)
    with pytest.raises(DataError, match=r"train\.csv: column 'Path' holds '.*someone.*' \(row 2\).*patientNNNNN"):
        load_data(tmp_path, task=TASK, check_files=False)


def test_chexpert_unknown_sex_value(tmp_path):
    row = chexpert_row(1, Cardiomegaly=1.0)
    row["Sex"] = "X"
    write_csv(tmp_path / "train.csv", [row], CHEXPERT_COLUMNS)
    with pytest.raises(DataError, match=r"train\.csv: column 'Sex' holds 'X' \(row 2\); expected Female, Male"):
        load_data(tmp_path, task=TASK, check_files=False)


def test_chexpert_missing_image_names_the_file(tmp_path):
    folder = make_chexpert(tmp_path, [chexpert_row(1, Cardiomegaly=1.0)], images=False)
    with pytest.raises(DataError, match="view1_frontal.jpg does not exist"):
        load_data(folder, task=TASK)


# --------------------------------------------------------------------------------------------------- NIH


NIH_ROWS = [
    nih_row("00000001_000.png", "Cardiomegaly|Effusion", 1, age="058Y"),
    nih_row("00000001_001.png", "No Finding", 1, age="58"),
    nih_row("00000002_000.png", "Infiltration", 2, sex="F", view="AP"),
    nih_row("00000003_000.png", "Edema | Atelectasis", 3),
    nih_row("00000004_000.png", "Mass|Nodule", 4, sex="F"),
    nih_row("00000005_000.png", "Consolidation", 5),
]


def test_nih_label_mapping_images_and_attributes(tmp_path):
    folder = make_nih(tmp_path, NIH_ROWS)
    m = load_data(folder, task=TASK)
    # cardiomegaly, congestion, pleural_effusion, pneumonic_infiltrates, atelectasis
    assert_same(labels_of(m, "00000001_000"), [1, 0, 1, 0, 0])
    assert_same(labels_of(m, "00000001_001"), [0, 0, 0, 0, 0])
    assert_same(labels_of(m, "00000002_000"), [0, 0, 0, 1, 0])
    assert_same(labels_of(m, "00000003_000"), [0, 1, 0, 0, 1])
    assert_same(labels_of(m, "00000004_000"), [0, 0, 0, 0, 0])
    assert_same(labels_of(m, "00000005_000"), [0, 0, 0, 1, 0])
    frame = m.frame.set_index("sample_id")
    assert frame.loc["00000001_000", "age"] == 58 and frame.loc["00000002_000", "sex"] == "F"
    assert frame.loc["00000001_000", "patient_id"] == "1"
    # Images were found in both Kaggle sub-folders.
    assert {p.split("/")[0] for p in m.frame["path"]} == {"images_001", "images_002"}
    assert all(p.is_file() for p in m.image_paths())
    assert_patient_level(m)


def test_nih_official_split_lists(tmp_path):
    folder = make_nih(tmp_path, NIH_ROWS)
    test_names = ["00000004_000.png", "00000005_000.png"]
    (folder / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (folder / "train_val_list.txt").write_text("\n".join(r["Image Index"] for r in NIH_ROWS[:4]) + "\n")
    m = load_data(folder, task=TASK, seed=1)
    split = m.frame.set_index("sample_id")["split"]
    assert split[["00000004_000", "00000005_000"]].tolist() == ["test", "test"]
    assert set(split.drop(["00000004_000", "00000005_000"])) <= {"train", "val"}
    assert_patient_level(m)

    (folder / "train_val_list.txt").write_text("\n".join(r["Image Index"] for r in NIH_ROWS[:3]) + "\n")
    unlisted = r"Data_Entry_2017\.csv: column 'Image Index' holds '00000003_000\.png'.*train_val_list\.txt"
    with pytest.raises(DataError, match=unlisted):
        load_data(folder, task=TASK)


def test_nih_seeded_splits_without_lists(tmp_path):
    rows = [nih_row(f"{p:08d}_{k:03d}.png", "No Finding", p) for p in range(1, 21) for k in range(2)]
    write_csv(tmp_path / "Data_Entry_2017.csv", rows, NIH_COLUMNS)
    a = load_data(tmp_path, task=TASK, seed=5, check_files=False)
    b = load_data(tmp_path, task=TASK, seed=5, check_files=False)
    assert a.frame["split"].tolist() == b.frame["split"].tolist()
    assert set(a.frame["split"]) == {"train", "val", "test"}
    assert_patient_level(a)
    # Images that are nowhere below the folder default to images/<name>.
    assert a.frame["path"].iloc[0] == "images/00000001_000.png"


def test_nih_lateral_views_are_dropped_unless_all(tmp_path):
    rows = [nih_row("00000001_000.png", "No Finding", 1), nih_row("00000002_000.png", "No Finding", 2, view="LL")]
    write_csv(tmp_path / "Data_Entry_2017.csv", rows, NIH_COLUMNS)
    frontal = load_data(tmp_path, task=TASK, check_files=False)
    everything = load_data(tmp_path, task=TASK, check_files=False, views="all")
    assert frontal.frame["sample_id"].tolist() == ["00000001_000"]
    assert len(everything.frame) == 2


def test_nih_unknown_finding_is_named(tmp_path):
    folder = make_nih(tmp_path, [NIH_ROWS[0], nih_row("00000009_000.png", "Effusion|Cardiomegally", 9)])
    with pytest.raises(DataError) as err:
        load_data(folder, task=TASK)
    msg = str(err.value)
    assert "Data_Entry_2017.csv" in msg and "'Finding Labels'" in msg and "'Cardiomegally'" in msg and "row 3" in msg
    assert "Cardiomegaly" in msg.split("valid findings:")[1] and "\n" not in msg


def test_nih_bad_age(tmp_path):
    write_csv(tmp_path / "Data_Entry_2017.csv", [nih_row("00000001_000.png", "No Finding", 1, age="old")], NIH_COLUMNS)
    with pytest.raises(DataError, match=r"column 'Patient Age' holds 'old' \(row 2\)"):
        load_data(tmp_path, task=TASK, check_files=False)


# --------------------------------------------------------------------------------------------------- MIMIC


def test_mimic_joins_labels_splits_and_patients(tmp_path):
    folder = make_mimic(tmp_path)
    m = load_data(folder, task=TASK)
    frame = m.frame.set_index("sample_id")
    assert sorted(frame.index) == ["d1", "d3", "d4", "d5"]  # d2 is LATERAL
    assert frame["split"].to_dict() == {"d1": "train", "d3": "val", "d4": "test", "d5": "test"}
    assert frame.loc["d1", "path"] == "files/p10/p10000032/s50414267/d1.jpg"
    assert all(p.is_file() for p in m.image_paths())
    # cardiomegaly, congestion, pleural_effusion, pneumonic_infiltrates, atelectasis
    assert_same(labels_of(m, "d1"), [1, NAN, 0, 0, NAN])
    assert_same(labels_of(m, "d3"), [0, NAN, 1, 1, 1])
    assert_same(labels_of(m, "d4"), [0] * 5)  # No Finding = 1 makes blank findings negative
    assert_same(labels_of(m, "d5"), [NAN] * 5)  # study missing from the label file
    assert frame.loc["d1", "sex"] == "F" and frame.loc["d3", "sex"] == "M"
    assert frame.loc["d1", "age"] == 52 and frame.loc["d3", "age"] == 86
    assert frame.loc["d1", "patient_id"] == "10000032"

    everything = load_data(folder, task=TASK, views="all")
    assert "d2" in set(everything.frame["sample_id"])


def test_mimic_without_patients_warns_and_has_no_sex_or_age(tmp_path):
    folder = make_mimic(tmp_path, patients=False)
    with pytest.warns(UserWarning, match="patients.csv"):
        m = load_data(folder, task=TASK, labels=("cardiomegaly",))
    assert "sex" not in m.frame.columns and "age" not in m.frame.columns
    assert m.frame.set_index("sample_id").loc["d1", "cardiomegaly"] == 1.0


def test_mimic_missing_label_file(tmp_path):
    folder = make_mimic(tmp_path)
    (folder / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    with pytest.raises(DataError, match=r"mimic-cxr-jpg: missing mimic-cxr-2\.0\.0-chexpert\.csv"):
        load_data(folder, task=TASK)


def test_mimic_label_value_out_of_range(tmp_path):
    bad = [{"subject_id": "10000032", "study_id": "50414267", "Cardiomegaly": "yes"}]
    folder = make_mimic(tmp_path, labels=bad)
    with pytest.raises(DataError) as err:
        load_data(folder, task=TASK, labels=("cardiomegaly",))
    msg = str(err.value)
    assert "mimic-cxr-2.0.0-chexpert.csv.gz" in msg and "'Cardiomegaly'" in msg and "'yes'" in msg


def test_mimic_bad_split_value(tmp_path):
    folder = make_mimic(tmp_path)
    split = pd.read_csv(folder / "mimic-cxr-2.0.0-split.csv.gz")
    split.loc[0, "split"] = "holdout"
    split.to_csv(folder / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    with pytest.raises(DataError, match=r"split\.csv\.gz: column 'split' holds 'holdout' \(row 2\); expected train"):
        load_data(folder, task=TASK)
