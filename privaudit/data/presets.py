"""Dataset presets: turn a public chest-radiograph layout into the canonical manifest.

:func:`load_data` is the entry point. Given a manifest CSV or a dataset folder it picks a preset (or uses
the one named), maps the dataset's findings to the task's labels and finishes with
:func:`~privaudit.data.manifest.validate_manifest`, so every preset yields the same canonical
:class:`~privaudit.data.manifest.Manifest` (labels as float 0/1/NaN, patient-level splits checked).

Presets and what auto-detection looks for (checked in this order, first match wins):

=========  ==================================================================================================
manifest   a ``.csv`` file that is neither a CheXpert nor an NIH table, or a folder holding ``manifest.csv``
chexpert   a CheXpert CSV (header has ``Path, Sex, Age, Frontal/Lateral``), or a folder holding such a
           ``train.csv`` (plus optional ``valid.csv``)
nih        an NIH ChestX-ray14 table (header has ``Image Index, Finding Labels``), or a folder holding
           ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv`` (the v2020 file wins if both exist)
mimic      a folder holding ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (MIMIC-CXR-JPG)
msd        (task ``pdac``) a Medical Segmentation Decathlon folder with ``dataset.json`` and ``imagesTr/``, or
           its parent holding ``Task07_Pancreas/``; tumour-free controls come from ``controls=DIR``
=========  ==================================================================================================

Label mapping (task ``cxr``; see :data:`CHEXPERT_LABEL_MAP`, :data:`MIMIC_LABEL_MAP`, :data:`NIH_LABEL_MAP`):

=====================  ===============================  ============================================
task label             CheXpert / MIMIC-CXR finding(s)  NIH ChestX-ray14 finding(s)
=====================  ===============================  ============================================
cardiomegaly           Cardiomegaly                     Cardiomegaly
congestion             Edema                            Edema
pleural_effusion       Pleural Effusion                 Effusion
pneumonic_infiltrates  Pneumonia, Consolidation         Pneumonia, Consolidation, Infiltration
atelectasis            Atelectasis                      Atelectasis
=====================  ===============================  ============================================

Where a label has several source findings they combine as: 1 if any source is 1; 0 if every source is 0;
unknown (blank, masked out of loss and metrics) otherwise.

CheXpert and MIMIC-CXR-JPG labels come from the CheXpert labeler: 1 (positive), 0 (negative, the report says
the finding is absent), -1 (uncertain) or blank (the report does not mention the finding). How they become task
labels is a :class:`LabelPolicy` of three choices, options of the ``chexpert`` and ``mimic`` presets (refused by
the others):

* ``uncertain`` (what -1 becomes): ``"ignore"`` (default; U-Ignore of Irvin et al. 2019: unknown, masked out of
  the loss and the metrics), ``"zeros"`` (U-Zeros: 0) or ``"ones"`` (U-Ones: 1).
* ``blank`` (what a blank becomes): ``"unknown"`` (default) or ``"negative"`` (0).
* ``no_finding``: ``"negative"`` (default) makes a blank finding 0 on a row whose ``No Finding`` is 1, as
  torchxrayvision's ``CheX_Dataset`` and ``MIMIC_Dataset`` do (they set the pathologies of such rows to 0,
  then make -1 unknown); ``"ignore"`` leaves ``No Finding`` unread, so blank follows ``blank``. The labeler
  sets ``No Finding`` only when no pathology is positive or uncertain; should a row say ``No Finding`` = 1 and
  also 1 or -1 for a finding, the explicit value is kept (torchxrayvision would overwrite it with 0) and a
  warning counts such rows. With ``blank="unknown"`` and ``no_finding="negative"`` the ``No Finding`` column
  is required.

The defaults (U-Ignore, blank unknown unless ``No Finding`` is 1) read the labels as torchxrayvision does, a
widely used reading of these datasets. Each policy applies to every source finding
before findings are combined into a task label. A MIMIC image whose study has no row in the label file keeps
unknown labels whatever the policy: nothing about it was labelled. NIH labels are definite: a finding listed
in ``Finding Labels`` (pipe-separated, e.g. ``Cardiomegaly|Effusion``) is 1, every other finding is 0, and
``No Finding`` makes all of them 0.

Other documented choices:

* Views: ``views="frontal"`` (default) keeps frontal images only: CheXpert ``Frontal/Lateral == Frontal``,
  NIH and MIMIC ``View Position``/``ViewPosition`` in {PA, AP}. ``views="all"`` keeps every image. The
  manifest preset ignores ``views``: a canonical manifest lists exactly the images to use.
* Splits, always at patient level and seeded by ``seed``:
  CheXpert ``valid.csv`` rows are ``val`` (the official validation set, used for model selection);
  ``train.csv`` patients are then split 80/20 into ``train``/``test``. Without ``valid.csv`` (or given a
  single CheXpert CSV) patients are split 70/10/20 into train/val/test.
  NIH: if both ``train_val_list.txt`` and ``test_list.txt`` exist, images in the test list are ``test`` and
  the train_val patients are split 90/10 into ``train``/``val``; an image in neither list is an error.
  Otherwise patients are split 70/10/20.
  MIMIC: ``mimic-cxr-2.0.0-split.csv[.gz]`` maps train/validate/test to train/val/test; without it,
  patients are split 70/10/20.
* Attributes: CheXpert ``Sex`` Female/Male/Unknown -> F/M/blank, ``Age`` in years. NIH ``Patient Gender``
  M/F, ``Patient Age`` in years (older releases' ``058Y`` is read as 58). MIMIC takes ``gender`` and
  ``anchor_age`` from MIMIC-IV's ``patients.csv[.gz]`` placed in the folder; ``anchor_age`` is the age in
  the patient's anchor year, an approximation of the age at imaging. Without ``patients.csv`` sex and age
  are absent (a warning says so). No dataset records comorbidity: that column is absent.
* Images: CheXpert ``Path`` starts with the dataset folder's name (``CheXpert-v1.0-small/train/...``);
  when the folder holding ``train.csv`` has no sub-folder of that name, that first component is dropped so
  paths resolve relative to the folder. NIH images are found anywhere below the folder (``images/`` or the
  Kaggle ``images_001/images/`` ... folders) with one directory walk. MIMIC images are
  ``files/p{first two digits of subject_id}/p{subject_id}/s{study_id}/{dicom_id}.jpg``; MIMIC images whose
  study has no row in the label file get unknown labels.
* Sample ids: CheXpert ``patient00001/study1/view1_frontal``; NIH the image name without its suffix;
  MIMIC ``dicom_id``.

Every problem with the input raises :class:`~privaudit.errors.DataError` with one line naming the file and
the column or value at fault.
"""

from __future__ import annotations

import json
import os
import re
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from privaudit.data.manifest import Manifest, assign_patient_splits, load_manifest, read_csv, validate_manifest
from privaudit.errors import ConfigError, DataError, unknown_name
from privaudit.tasks import TaskSpec

# ---------------------------------------------------------------------------------------------------------
# Label mappings: task label -> the dataset findings it is built from.

CHEXPERT_LABEL_MAP: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "congestion": ("Edema",),
    "pleural_effusion": ("Pleural Effusion",),
    "pneumonic_infiltrates": ("Pneumonia", "Consolidation"),
    "atelectasis": ("Atelectasis",),
}

# MIMIC-CXR-JPG's labels come from the CheXpert labeler, with the same finding names and values.
MIMIC_LABEL_MAP: dict[str, tuple[str, ...]] = CHEXPERT_LABEL_MAP

NIH_LABEL_MAP: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly",),
    "congestion": ("Edema",),
    "pleural_effusion": ("Effusion",),
    "pneumonic_infiltrates": ("Pneumonia", "Consolidation", "Infiltration"),
    "atelectasis": ("Atelectasis",),
}

# Every name allowed in NIH's ``Finding Labels``; anything else is a typo or a different dataset.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "No Finding", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)

# Columns whose presence identifies a CheXpert or an NIH table.
CHEXPERT_SIGNATURE = frozenset({"Path", "Sex", "Age", "Frontal/Lateral"})
NIH_SIGNATURE = frozenset({"Image Index", "Finding Labels"})

NIH_TABLES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_LABELS = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
MIMIC_PATIENTS = "patients.csv"

VIEWS = ("frontal", "all")
FRONTAL_POSITIONS = ("PA", "AP")

# How CheXpert-labeler values (1, 0, -1, blank) become task labels: see the module docstring.
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")   # U-Ignore, U-Zeros, U-Ones (Irvin et al. 2019)
BLANK_POLICIES = ("unknown", "negative")
NO_FINDING_POLICIES = ("negative", "ignore")
NO_FINDING = "No Finding"
LABEL_POLICY_OPTIONS = ("uncertain", "blank", "no_finding")


@dataclass(frozen=True)
class LabelPolicy:
    """How the chexpert and mimic presets read CheXpert-labeler values; the defaults read them as
    torchxrayvision does (uncertain unknown, blank unknown unless ``No Finding`` is 1)."""

    uncertain: str = "ignore"
    blank: str = "unknown"
    no_finding: str = "negative"

    def __post_init__(self):
        for name in LABEL_POLICY_OPTIONS:
            check_policy(name, getattr(self, name))

    @classmethod
    def of(cls, uncertain: str | None = None, blank: str | None = None, no_finding: str | None = None):
        """The policy with the given choices over the defaults (None: the default)."""
        given = {"uncertain": uncertain, "blank": blank, "no_finding": no_finding}
        return cls(**{k: v for k, v in given.items() if v is not None})

    def to_dict(self) -> dict:
        return {"uncertain": self.uncertain, "blank": self.blank, "no_finding": self.no_finding}

    @property
    def reads_no_finding(self) -> bool:
        return self.blank == "unknown" and self.no_finding == "negative"


def check_policy(name: str, value) -> str:
    """``value`` if it is one of the choices of label policy ``name``, else a ConfigError naming them."""
    allowed = {"uncertain": UNCERTAIN_POLICIES, "blank": BLANK_POLICIES, "no_finding": NO_FINDING_POLICIES}[name]
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}")
    return value


CHEXPERT_TEST_FRACTION = 0.2   # of train.csv patients, when valid.csv provides val
NIH_VAL_FRACTION = 0.1         # of train_val_list.txt patients

_CHEXPERT_HINT = "CheXpert CSVs have Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 finding columns"
_NIH_HINT = "the NIH table has Image Index, Finding Labels, Patient ID, Patient Age, Patient Gender, View Position"
_MIMIC_HINT = "see the MIMIC-CXR-JPG file layout on PhysioNet"
_MIMIC_LABELS_HINT = "the MIMIC-CXR-JPG label file has subject_id, study_id and the 14 CheXpert finding columns"


# ---------------------------------------------------------------------------------------------------------
# Registry


class PresetLoader(Protocol):
    def __call__(
        self,
        path: Path,
        *,
        task: TaskSpec,
        labels: tuple[str, ...] | None,
        views: str,
        seed: int,
        check_files: bool,
    ) -> Manifest: ...


@dataclass(frozen=True)
class Preset:
    """A named dataset layout: how to load it and how to recognise it."""

    name: str
    load: PresetLoader
    detect: Callable[[Path], bool] | None = None   # None: used only when named explicitly
    looks_for: str = ""                             # shown when auto-detection finds nothing
    options: tuple[str, ...] = ()                   # extra keyword options its loader takes (controls, ...)


_PRESETS: dict[str, Preset] = {}


def register_preset(
    name: str, fn: PresetLoader, *, detect: Callable[[Path], bool] | None = None, looks_for: str = "",
    options: tuple[str, ...] = (),
) -> Preset:
    """Register (or replace) a preset; ``detect`` makes it take part in auto-detection, in registration order."""
    preset = Preset(name=name, load=fn, detect=detect, looks_for=looks_for, options=tuple(options))
    _PRESETS[name] = preset
    return preset


def create_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise unknown_name("preset", name, _PRESETS) from None


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def detect_preset(path: Path) -> str:
    """Name of the first registered preset that recognises ``path``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; give the path to a manifest.csv or a dataset folder")
    for preset in _PRESETS.values():
        if preset.detect is not None and preset.detect(path):
            return preset.name
    wanted = "; ".join(f"{p.name}: {p.looks_for}" for p in _PRESETS.values() if p.detect is not None)
    raise DataError(
        f"{path}: no known dataset layout found (looked for {wanted}); name a preset or write a manifest.csv"
    )


def load_data(
    path: Path,
    *,
    task: TaskSpec,
    preset: str | None = None,
    labels: tuple[str, ...] | None = None,
    views: str = "frontal",
    seed: int = 0,
    check_files: bool = True,
    controls: Path | None = None,
    label_from: str | None = None,
    uncertain: str | None = None,
    blank: str | None = None,
    no_finding: str | None = None,
) -> Manifest:
    """Load a manifest CSV or a dataset folder as a validated :class:`Manifest` (see the module docstring).

    ``controls`` and ``label_from`` are options of the presets that take them (``msd``), the label policies
    ``uncertain``, ``blank`` and ``no_finding`` options of ``chexpert`` and ``mimic`` (None: the
    :class:`LabelPolicy` default); given to another preset they are refused rather than ignored.
    """
    path = Path(path)
    name = preset if preset is not None else detect_preset(path)
    chosen = create_preset(name)
    given = {"controls": controls, "label_from": label_from, "uncertain": uncertain, "blank": blank,
             "no_finding": no_finding}
    extra = {k: v for k, v in given.items() if v is not None}
    for option in extra:
        if option not in chosen.options:
            takers = [p.name for p in _PRESETS.values() if option in p.options] or ["no"]
            raise ConfigError(f"--{option.replace('_', '-')} applies to the {' and '.join(takers)} "
                              f"preset{'s' if len(takers) > 1 else ''}, but {path} is read with preset {name!r}; "
                              "drop the option or name the preset with --preset")
    return chosen.load(path, task=task, labels=labels, views=views, seed=seed, check_files=check_files, **extra)


def label_policy(path: Path, preset: str | None = None, **given) -> LabelPolicy | None:
    """The label policy a load of ``path`` applies (the ``given`` choices over the defaults) when its preset
    reads CheXpert-labeler values, else None. Detects the preset when it is not named."""
    name = preset if preset is not None else detect_preset(Path(path))
    if not set(LABEL_POLICY_OPTIONS) <= set(create_preset(name).options):
        return None
    return LabelPolicy.of(**{k: given.get(k) for k in LABEL_POLICY_OPTIONS})


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by the presets


def _csv_header(path: Path) -> set[str]:
    """Column names of a CSV, or an empty set if it is missing or unreadable (detection must not raise)."""
    try:
        return set(pd.read_csv(path, nrows=0).columns)
    except (ValueError, OSError, UnicodeDecodeError):
        return set()


def _find_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or its gzipped twin, whichever exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _bad_value(source: Path, column: str, values: pd.Series, bad: pd.Series, expected: str) -> DataError:
    # Frames keep read_csv's 0-based index until the message is built, so index + 2 is the line in the file.
    i = int(np.flatnonzero(bad.to_numpy())[0])
    value, row = str(values.iloc[i]), values.index[i] + 2
    return DataError(f"{source}: column {column!r} holds {value!r} (row {row}); {expected}")


def _require(frame: pd.DataFrame, columns, source: Path, hint: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing required column {missing[0]!r}; {hint}")


def _blank(values: pd.Series) -> pd.Series:
    return values.isna() | (values.astype("string").str.strip() == "")


def _recode(values: pd.Series, mapping: Mapping[str, str | None], column: str, source: Path) -> pd.Series:
    """Map a coded column through ``mapping``; blank stays blank, any other value is an error naming it."""
    text = values.astype("string").str.strip()
    blank = _blank(values)
    bad = ~blank & ~text.isin(list(mapping))
    if bad.any():
        raise _bad_value(source, column, values, bad, f"expected {', '.join(mapping)} or blank")
    return text.map(dict(mapping)).where(~blank).astype(object)


def _keep_views(frame: pd.DataFrame, column: str, frontal: tuple[str, ...], views: str, source: Path) -> pd.DataFrame:
    """Keep frontal images (``views="frontal"``) or all of them (``views="all"``)."""
    if views not in VIEWS:
        raise ConfigError(f"views {views!r} is not one of {', '.join(VIEWS)}")
    if views == "all":
        return frame
    _require(frame, [column], source, "it tells frontal from lateral views; or pass views='all' to keep every image")
    kept = frame[frame[column].astype("string").str.strip().isin(frontal)]
    if kept.empty:
        seen = ", ".join(sorted(frame[column].dropna().astype(str).unique())[:5]) or "nothing"
        raise DataError(
            f"{source}: no frontal images left (column {column!r} holds {seen}; frontal is {', '.join(frontal)}); "
            "pass views='all' to keep every image"
        )
    return kept


def _resolve_labels(
    task: TaskSpec, labels: tuple[str, ...] | None, mapping: Mapping[str, tuple[str, ...]], preset: str
) -> tuple[str, ...]:
    """The labels to produce: the requested subset of the task's labels, each of which the preset maps."""
    labels = tuple(labels) if labels else task.labels
    for label in labels:
        if label not in task.labels:
            raise DataError(f"unknown label {label!r} for task {task.name!r}; valid labels: {', '.join(task.labels)}")
        if label not in mapping:
            raise DataError(
                f"preset {preset!r} has no mapping for label {label!r} of task {task.name!r}; "
                f"it maps {', '.join(mapping)}; pick those with --labels"
            )
    return labels


def _combine(sources: list[pd.Series]) -> pd.Series:
    """1 if any source finding is 1; 0 if every source is 0; unknown (NaN) otherwise."""
    stacked = pd.concat(sources, axis=1)
    out = pd.Series(np.nan, index=stacked.index)
    out[(stacked == 0).all(axis=1)] = 0.0
    out[(stacked == 1).any(axis=1)] = 1.0
    return out


def _map_findings(
    findings: Mapping[str, pd.Series], mapping: Mapping[str, tuple[str, ...]], labels: tuple[str, ...]
) -> pd.DataFrame:
    return pd.DataFrame({label: _combine([findings[f] for f in mapping[label]]) for label in labels})


def _source_findings(mapping: Mapping[str, tuple[str, ...]], labels: tuple[str, ...]) -> list[str]:
    """The dataset findings the chosen labels need, in first-use order (only these are required)."""
    return list(dict.fromkeys(f for label in labels for f in mapping[label]))


def _chexpert_labels(
    frame: pd.DataFrame, mapping: Mapping[str, tuple[str, ...]], labels: tuple[str, ...], source: Path, hint: str,
    policy: LabelPolicy,
) -> pd.DataFrame:
    """Task labels from CheXpert-labeler columns (CheXpert and MIMIC-CXR) under ``policy``: 1 and 0 kept,
    -1 by ``policy.uncertain``, blank by ``policy.blank`` and, on rows with ``No Finding`` = 1, ``no_finding``."""
    columns = _source_findings(mapping, labels)
    read_nf = policy.reads_no_finding
    _require(frame, columns + ([NO_FINDING] if read_nf else []), source,
             hint + (f"; or pass no_finding='ignore' to read a table without {NO_FINDING!r}" if read_nf else ""))
    values: dict[str, pd.Series] = {}
    for column in columns + ([NO_FINDING] if read_nf else []):
        raw = frame[column]
        num = pd.to_numeric(raw, errors="coerce")
        bad = ~_blank(raw) & ~num.isin([1, 0, -1])
        if bad.any():
            raise _bad_value(source, column, raw, bad, "CheXpert labels are 1, 0, -1 (uncertain) or blank")
        values[column] = num.where(~_blank(raw))   # 1, 0, -1 or NaN (blank)
    healthy = values[NO_FINDING].eq(1) if read_nf else pd.Series(False, index=frame.index)
    uncertain = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[policy.uncertain]
    findings: dict[str, pd.Series] = {}
    for column in columns:
        num = values[column]
        out = num.where(num.isin([0, 1]))
        out[num.eq(-1)] = uncertain
        blank = num.isna()
        if policy.blank == "negative":
            out[blank] = 0.0
        else:
            out[blank & healthy] = 0.0   # torchxrayvision's rule: No Finding = 1 makes the pathologies 0
        findings[column] = out
    if read_nf:
        contradicted = healthy & pd.concat([values[c].isin([1, -1]) for c in columns], axis=1).any(axis=1)
        if contradicted.any():
            row = int(frame.index[contradicted.to_numpy()][0]) + 2
            warnings.warn(
                f"{source}: {int(contradicted.sum())} row(s) say {NO_FINDING!r} = 1 and also 1 or -1 for one of "
                f"{', '.join(columns)} (first at row {row}); their explicit values are kept (torchxrayvision would "
                "make them 0)", UserWarning, stacklevel=4)
    return _map_findings(findings, mapping, labels)


def _split_two_ways(frame: pd.DataFrame, *, seed: int, first_fraction: float, second: str) -> pd.Series:
    """Seeded patient-level split: ``first_fraction`` of patients to train, the rest to ``second``."""
    # assign_patient_splits sends every patient past train+val to 'test', so a zero val fraction gives two parts.
    parts = assign_patient_splits(frame, seed=seed, fractions=(first_fraction, 0.0, 1.0 - first_fraction))
    return parts.map({"train": "train", "test": second})


# ---------------------------------------------------------------------------------------------------------
# manifest


def _detect_manifest(path: Path) -> bool:
    if path.is_dir():
        return (path / "manifest.csv").is_file()
    header = _csv_header(path)
    return path.suffix.lower() == ".csv" and not CHEXPERT_SIGNATURE <= header and not NIH_SIGNATURE <= header


def _load_manifest_preset(
    path: Path, *, task: TaskSpec, labels: tuple[str, ...] | None, views: str, seed: int, check_files: bool
) -> Manifest:
    """The canonical manifest CSV (or ``folder/manifest.csv``); ``views`` does not apply."""
    path = Path(path)
    file = path / "manifest.csv" if path.is_dir() else path
    return load_manifest(file, task=task, labels=labels, seed=seed, check_files=check_files)


# ---------------------------------------------------------------------------------------------------------
# CheXpert

# Group "patient" is the patient folder; group "sample" is the path from it on without the file suffix.
_CHEXPERT_PATH = re.compile(r"(?:^|/)(?P<sample>(?P<patient>patient\d+)/.*?)(?:\.[A-Za-z0-9]+)?$")
_CHEXPERT_PATIENT = re.compile(r"patient\d+")


def _detect_chexpert(path: Path) -> bool:
    table = path / "train.csv" if path.is_dir() else path
    return CHEXPERT_SIGNATURE <= _csv_header(table)


def _chexpert_paths(paths: pd.Series, folder: Path) -> pd.Series:
    """Make ``Path`` relative to ``folder``: drop the leading dataset-folder name unless it is a sub-folder here.

    A path that already starts at the patient folder is kept as it is.
    """
    first = paths.str.split("/", n=1).str[0]
    # One stat per distinct first component (normally one), not one per row.
    keep = {n: (folder / n).is_dir() or _CHEXPERT_PATIENT.fullmatch(n) is not None for n in first.unique()}
    stripped = paths.str.split("/", n=1).str[1]
    return paths.where(first.map(keep), stripped)


def _read_chexpert_csv(table: Path, folder: Path, *, labels: tuple[str, ...], views: str,
                       policy: LabelPolicy) -> pd.DataFrame:
    """One CheXpert CSV as manifest rows (without split), paths relative to ``folder``."""
    frame = read_csv(table, dtype={"Path": str, "Sex": str, "Frontal/Lateral": str})
    _require(frame, ["Path"], table, _CHEXPERT_HINT)
    frame = _keep_views(frame, "Frontal/Lateral", ("Frontal",), views, table)
    parts = frame["Path"].astype("string").str.strip().str.extract(_CHEXPERT_PATH)
    bad = parts["patient"].isna()
    if bad.any():
        raise _bad_value(
            table, "Path", frame["Path"], bad,
            "expected a path with a patientNNNNN folder, like "
            "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
        )
    out = pd.DataFrame(
        {
            "sample_id": parts["sample"],
            "path": _chexpert_paths(frame["Path"].str.strip(), folder),
            "patient_id": parts["patient"],
        },
        index=frame.index,
    )
    if "Sex" in frame.columns:
        out["sex"] = _recode(frame["Sex"], {"Female": "F", "Male": "M", "Unknown": None}, "Sex", table)
    if "Age" in frame.columns:
        out["age"] = frame["Age"]
    return out.join(_chexpert_labels(frame, CHEXPERT_LABEL_MAP, labels, table, _CHEXPERT_HINT, policy))


def _load_chexpert(
    path: Path, *, task: TaskSpec, labels: tuple[str, ...] | None, views: str, seed: int, check_files: bool,
    uncertain: str | None = None, blank: str | None = None, no_finding: str | None = None,
) -> Manifest:
    """CheXpert: a folder with ``train.csv`` (+ optional ``valid.csv``), or one CheXpert CSV file."""
    path = Path(path)
    policy = LabelPolicy.of(uncertain, blank, no_finding)
    labels = _resolve_labels(task, labels, CHEXPERT_LABEL_MAP, "chexpert")
    folder = path if path.is_dir() else path.parent
    table = path / "train.csv" if path.is_dir() else path
    frame = _read_chexpert_csv(table, folder, labels=labels, views=views, policy=policy)
    valid = folder / "valid.csv"
    if path.is_dir() and valid.is_file():
        frame["split"] = _split_two_ways(frame, seed=seed, first_fraction=1 - CHEXPERT_TEST_FRACTION, second="test")
        val = _read_chexpert_csv(valid, folder, labels=labels, views=views, policy=policy).assign(split="val")
        frame = pd.concat([frame, val], ignore_index=True)
    # Without valid.csv the split column is absent and validate_manifest makes seeded patient-level splits.
    return validate_manifest(
        frame, task=task, source=path, root=folder, labels=labels, seed=seed, check_files=check_files
    )


# ---------------------------------------------------------------------------------------------------------
# NIH ChestX-ray14


def _nih_table(folder: Path) -> Path | None:
    return next((folder / n for n in NIH_TABLES if (folder / n).is_file()), None)


def _detect_nih(path: Path) -> bool:
    if path.is_dir():
        return _nih_table(path) is not None
    return NIH_SIGNATURE <= _csv_header(path)


def _nih_image_index(folder: Path, names: set[str]) -> dict[str, str]:
    """Where each image lives below ``folder`` (relative path by file name), from a single directory walk."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()  # deterministic choice if a file name occurs twice
        for name in filenames:
            if name in names and name not in found:
                found[name] = Path(os.path.relpath(os.path.join(dirpath, name), folder)).as_posix()
    return found


def _nih_labels(values: pd.Series, labels: tuple[str, ...], source: Path) -> pd.DataFrame:
    """0/1 task labels from pipe-separated ``Finding Labels``."""
    blank = _blank(values)
    if blank.any():
        raise _bad_value(source, "Finding Labels", values, blank, "every image lists its findings or 'No Finding'")
    entries = values.astype(str).str.split("|").explode().str.strip()
    unknown = ~entries.isin(NIH_FINDINGS)
    if unknown.any():
        name = entries[unknown].iloc[0]
        row = entries.index[unknown.to_numpy()][0] + 2
        raise DataError(
            f"{source}: column 'Finding Labels' holds unknown finding {name!r} (row {row}); "
            f"valid findings: {', '.join(NIH_FINDINGS)}"
        )
    findings = {
        f: entries.eq(f).groupby(level=0).any().astype(float) for f in _source_findings(NIH_LABEL_MAP, labels)
    }
    return _map_findings(findings, NIH_LABEL_MAP, labels)


def _nih_age(values: pd.Series, source: Path) -> pd.Series:
    """Ages in years; older releases wrote them as e.g. ``058Y``."""
    text = values.astype("string").str.strip().str.upper()
    years = text.str.extract(r"^(\d+)Y?$")[0]
    bad = ~_blank(values) & years.isna()
    if bad.any():
        raise _bad_value(source, "Patient Age", values, bad, "expected whole years such as 58 or 058Y")
    return pd.to_numeric(years)


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _load_nih(
    path: Path, *, task: TaskSpec, labels: tuple[str, ...] | None, views: str, seed: int, check_files: bool
) -> Manifest:
    """NIH ChestX-ray14: ``Data_Entry_2017[_v2020].csv`` with images anywhere below its folder."""
    path = Path(path)
    labels = _resolve_labels(task, labels, NIH_LABEL_MAP, "nih")
    folder = path if path.is_dir() else path.parent
    table = _nih_table(folder) if path.is_dir() else path
    if table is None:
        raise DataError(f"{folder}: no {' or '.join(NIH_TABLES)}; put the NIH table in the folder")
    frame = read_csv(table, dtype={"Image Index": str, "Finding Labels": str, "Patient ID": str, "Patient Age": str})
    _require(frame, ["Image Index", "Finding Labels", "Patient ID"], table, _NIH_HINT)
    frame = _keep_views(frame, "View Position", FRONTAL_POSITIONS, views, table)
    names = frame["Image Index"].str.strip()
    where = _nih_image_index(folder, set(names))
    out = pd.DataFrame(
        {
            "sample_id": names.str.rsplit(".", n=1).str[0],
            # Unfound images keep the documented default location, so the missing-file error names it.
            "path": names.map(lambda n: where.get(n, f"images/{n}")),
            "patient_id": frame["Patient ID"].str.strip(),
        },
        index=frame.index,
    )
    if "Patient Gender" in frame.columns:
        out["sex"] = _recode(frame["Patient Gender"], {"F": "F", "M": "M"}, "Patient Gender", table)
    if "Patient Age" in frame.columns:
        out["age"] = _nih_age(frame["Patient Age"], table)
    out = out.join(_nih_labels(frame["Finding Labels"], labels, table))
    train_val, test = folder / "train_val_list.txt", folder / "test_list.txt"
    if train_val.is_file() and test.is_file():
        in_test, in_train_val = names.isin(_read_list(test)), names.isin(_read_list(train_val))
        unlisted = ~in_test & ~in_train_val
        pool = in_train_val & ~in_test  # the official lists are disjoint; should they overlap, test wins
        if unlisted.any():
            raise _bad_value(
                table, "Image Index", names, unlisted,
                f"it is in neither {train_val.name} nor {test.name}; "
                "add it to one, or remove both files to get seeded splits",
            )
        out["split"] = "test"
        out.loc[pool, "split"] = _split_two_ways(
            out[pool], seed=seed, first_fraction=1 - NIH_VAL_FRACTION, second="val"
        )
    return validate_manifest(
        out, task=task, source=path, root=folder, labels=labels, seed=seed, check_files=check_files
    )


# ---------------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG


def _detect_mimic(path: Path) -> bool:
    return path.is_dir() and _find_file(path, MIMIC_METADATA) is not None


def _mimic_file(folder: Path, name: str) -> Path:
    found = _find_file(folder, name)
    if found is None:
        raise DataError(
            f"{folder}: missing {name} (or {name}.gz); download it from MIMIC-CXR-JPG on PhysioNet into this folder"
        )
    return found


_MIMIC_IDS = {"dicom_id": str, "subject_id": str, "study_id": str}


def _load_mimic(
    path: Path, *, task: TaskSpec, labels: tuple[str, ...] | None, views: str, seed: int, check_files: bool,
    uncertain: str | None = None, blank: str | None = None, no_finding: str | None = None,
) -> Manifest:
    """MIMIC-CXR-JPG: metadata, CheXpert labels, official split and (optional) MIMIC-IV patients.csv."""
    path = Path(path)
    policy = LabelPolicy.of(uncertain, blank, no_finding)
    labels = _resolve_labels(task, labels, MIMIC_LABEL_MAP, "mimic")
    folder = path if path.is_dir() else path.parent
    meta_file = _mimic_file(folder, MIMIC_METADATA)
    meta = read_csv(meta_file, dtype={**_MIMIC_IDS, "ViewPosition": str})
    _require(meta, ["dicom_id", "subject_id", "study_id"], meta_file, _MIMIC_HINT)
    meta = _keep_views(meta, "ViewPosition", FRONTAL_POSITIONS, views, meta_file)

    label_file = _mimic_file(folder, MIMIC_LABELS)
    label_table = read_csv(label_file, dtype=_MIMIC_IDS)
    _require(label_table, ["subject_id", "study_id"], label_file, _MIMIC_LABELS_HINT)
    dup = label_table.duplicated(["subject_id", "study_id"])
    if dup.any():
        raise _bad_value(label_file, "study_id", label_table["study_id"], dup, "each study must have one row of labels")
    study_labels = pd.DataFrame(
        {"patient_id": label_table["subject_id"], "study_id": label_table["study_id"]}
    ).join(_chexpert_labels(label_table, MIMIC_LABEL_MAP, labels, label_file, _MIMIC_LABELS_HINT, policy))

    frame = pd.DataFrame(
        {
            "sample_id": meta["dicom_id"],
            "path": "files/p" + meta["subject_id"].str[:2] + "/p" + meta["subject_id"] + "/s" + meta["study_id"]
            + "/" + meta["dicom_id"] + ".jpg",
            "patient_id": meta["subject_id"],
            "study_id": meta["study_id"],
        }
    )
    # Left join: images whose study has no label row keep all labels unknown.
    frame = frame.merge(study_labels, how="left", on=["patient_id", "study_id"]).drop(columns="study_id")

    split_file = _find_file(folder, MIMIC_SPLIT)
    if split_file is not None:
        splits = read_csv(split_file, dtype=_MIMIC_IDS)
        _require(splits, ["dicom_id", "split"], split_file, _MIMIC_HINT)
        coded = _recode(splits["split"], {"train": "train", "validate": "val", "test": "test"}, "split", split_file)
        frame["split"] = frame["sample_id"].map(dict(zip(splits["dicom_id"], coded)))
        missing = frame["split"].isna()
        if missing.any():
            dicom_id = frame.loc[missing, "sample_id"].iloc[0]
            raise DataError(
                f"{split_file}: dicom_id {dicom_id!r} from {meta_file.name} has no split ({int(missing.sum())} "
                "image(s) in all); use the matching split file or remove it to get seeded splits"
            )

    patients_file = _find_file(folder, MIMIC_PATIENTS)
    if patients_file is None:
        warnings.warn(
            f"{folder}: no {MIMIC_PATIENTS}[.gz] from MIMIC-IV, so sex and age are absent and cannot be audited; "
            "copy MIMIC-IV's hosp/patients.csv.gz into this folder to add them",
            UserWarning,
            stacklevel=3,
        )
    else:
        patients = read_csv(patients_file, dtype={"subject_id": str, "gender": str})
        _require(patients, ["subject_id", "gender", "anchor_age"], patients_file, "MIMIC-IV's hosp/patients.csv")
        attrs = pd.DataFrame(
            {
                "patient_id": patients["subject_id"],
                "sex": _recode(patients["gender"], {"F": "F", "M": "M"}, "gender", patients_file),
                "age": patients["anchor_age"],  # age in the anchor year: an approximation of age at imaging
            }
        ).drop_duplicates("patient_id")
        frame = frame.merge(attrs, how="left", on="patient_id")
    return validate_manifest(
        frame, task=task, source=path, root=folder, labels=labels, seed=seed, check_files=check_files
    )


# ---------------------------------------------------------------------------------------------------------

register_preset(
    "manifest", _load_manifest_preset, detect=_detect_manifest,
    looks_for="a .csv file in the canonical format, or a folder with manifest.csv",
)
register_preset(
    "chexpert", _load_chexpert, detect=_detect_chexpert, options=LABEL_POLICY_OPTIONS,
    looks_for="a folder with train.csv (+ valid.csv) whose header has Path, Sex, Age, Frontal/Lateral",
)
register_preset(
    "nih", _load_nih, detect=_detect_nih, looks_for=f"a folder with {' or '.join(NIH_TABLES)}",
)
register_preset(
    "mimic", _load_mimic, detect=_detect_mimic, options=LABEL_POLICY_OPTIONS,
    looks_for=f"a folder with {MIMIC_METADATA}[.gz]",
)


# ---------------------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon (Task07_Pancreas) + tumour-free controls, for task pdac

MSD_DATASET = "dataset.json"
MSD_PANCREAS = "Task07_Pancreas"
MSD_DEFAULT_TUMOUR_CLASS = 2   # Task07_Pancreas: 0 background, 1 pancreas, 2 cancer
MSD_TUMOUR_NAMES = re.compile(r"cancer|tumou?r|mass|lesion|neoplasm|pdac", re.IGNORECASE)
MSD_LABEL_FROM = ("segmentation", "dataset")
DEMOGRAPHICS = "demographics.csv"
MSD_SITE, CONTROLS_SITE = "msd", "controls"
SOURCE_SHORTCUT_WARNING = (
    "site is set from each source (msd: tumour scans, controls: tumour-free scans), so the source is a shortcut "
    "to the label: a model can learn the scanner or archive instead of the pancreas. Read the audit's fairness "
    "by site with that in mind, and add controls from the tumour archive's own scanners where you can"
)


def _msd_folder(path: Path) -> Path | None:
    """The MSD task folder for ``path``: the folder itself, its dataset.json's folder, or its Task07_Pancreas."""
    path = Path(path)
    if path.is_file() and path.name == MSD_DATASET:
        return path.parent
    if not path.is_dir():
        return None
    if (path / MSD_DATASET).is_file() or (path / "imagesTr").is_dir():
        return path
    if (path / MSD_PANCREAS).is_dir():
        return path / MSD_PANCREAS
    return None


def _detect_msd(path: Path) -> bool:
    return _msd_folder(path) is not None


def _msd_tumour_class(dataset: dict, source: Path) -> int:
    names = dataset.get("labels")
    if names is None:
        return MSD_DEFAULT_TUMOUR_CLASS
    if not isinstance(names, dict):
        raise DataError(f"{source}: 'labels' must map class numbers to names, like "
                        '{"0": "background", "1": "pancreas", "2": "cancer"}')
    # MSD writes {"2": "cancer"}; nnU-Net v2 writes {"cancer": 2}: the class is whichever side is a number.
    found = [k for k, v in names.items() if MSD_TUMOUR_NAMES.search(str(v))]
    found += [v for k, v in names.items() if MSD_TUMOUR_NAMES.search(str(k)) and not isinstance(v, (dict, list))]
    if not found:
        listed = ", ".join(f"{k}: {v}" for k, v in names.items())
        raise DataError(f"{source}: 'labels' names no tumour class ({listed}); "
                        "the msd preset needs one called cancer, tumour, mass or lesion")
    try:
        return int(found[0])
    except ValueError:
        raise DataError(f"{source}: label class {found[0]!r} is not a number") from None


def _relative(folder: Path, entry, source: Path, key: str) -> str:
    if not isinstance(entry, str) or not entry.strip():
        raise DataError(f"{source}: a 'training' entry has no {key!r} path; each entry needs image and label")
    rel = entry.strip()
    return rel[2:] if rel.startswith("./") else rel


def _demographics(folder: Path, frame: pd.DataFrame, names: pd.Series) -> pd.DataFrame:
    """Join ``folder/demographics.csv`` (image, sex, age, optional patient_id) onto ``frame`` by image path
    (relative to ``folder``) or, failing that, by file name. Absent file: sex and age stay absent."""
    table = folder / DEMOGRAPHICS
    if not table.is_file():
        return frame
    demo = read_csv(table, dtype=str)
    _require(demo, ["image"], table, "it needs an image column (the file, relative to its folder) plus sex and/or age")
    demo["image"] = demo["image"].astype(str).str.strip().str.removeprefix("./")
    if demo["image"].duplicated().any():
        raise _bad_value(table, "image", demo["image"], demo["image"].duplicated(), "each image must have one row")
    by_path = demo.set_index("image")
    by_name = demo.assign(_name=demo["image"].map(lambda s: Path(s).name)).drop_duplicates("_name").set_index("_name")
    key = names.where(names.isin(by_path.index), names.map(lambda s: Path(s).name))
    table_rows = by_path.reindex(names.where(names.isin(by_path.index)))
    name_rows = by_name.reindex(key)
    out = frame.copy()
    for col in ("sex", "age", "patient_id"):
        if col in demo.columns:
            values = table_rows[col].to_numpy(dtype=object)
            fallback = name_rows[col].to_numpy(dtype=object)
            merged = np.where(pd.isna(values), fallback, values)
            if col == "sex":
                merged = _recode(pd.Series(merged, index=out.index), {"F": "F", "M": "M", "Female": "F", "Male": "M",
                                                                     "female": "F", "male": "M"}, "sex", table)
            if col == "patient_id":
                merged = np.where(pd.isna(merged), out["patient_id"].to_numpy(dtype=object), merged)
            out[col] = merged
    return out


def _control_volumes(controls: Path) -> list[Path]:
    """NIfTI volumes anywhere below ``controls``, except in hidden folders and label folders."""
    from privaudit.data.volumes import is_nifti

    found = []
    for dirpath, dirnames, filenames in os.walk(controls):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.lower().startswith("label"))
        found += [Path(dirpath) / f for f in sorted(filenames) if is_nifti(Path(f)) and not f.startswith(".")]
    return found


def _pairs_from_folders(folder: Path) -> list[dict]:
    """Image/label pairs from ``labelsTr/<case>.nii.gz`` and ``imagesTr/<case>_0000.nii.gz`` (or
    ``imagesTr/<case>.nii.gz``), for dataset.json files without a 'training' list."""
    from privaudit.data.volumes import is_nifti

    pairs = []
    for label in sorted((folder / "labelsTr").iterdir()):
        if label.name.startswith(".") or not is_nifti(label):
            continue
        case, suffix = label.name.split(".", 1)
        names = (f"{case}_0000.{suffix}", label.name)
        image = next((f"imagesTr/{n}" for n in names if (folder / "imagesTr" / n).is_file()), f"imagesTr/{label.name}")
        pairs.append({"image": image, "label": f"labelsTr/{label.name}"})
    return pairs


def _load_msd(
    path: Path, *, task: TaskSpec, labels: tuple[str, ...] | None, views: str, seed: int, check_files: bool,
    controls: Path | None = None, label_from: str | None = None,
) -> Manifest:
    """MSD Task07_Pancreas (``dataset.json``, ``imagesTr/``, ``labelsTr/``) plus tumour-free ``controls``."""
    from privaudit.data.volumes import label_values, volume_shape

    path = Path(path)
    labels = _resolve_labels(task, labels, {"pdac": ("tumour class in labelsTr",)}, "msd")
    label_from = label_from or "segmentation"
    if label_from not in MSD_LABEL_FROM:
        raise ConfigError(f"--label-from {label_from!r} is not one of {', '.join(MSD_LABEL_FROM)}")
    folder = _msd_folder(path)
    if folder is None:
        raise DataError(f"{path}: not an MSD task folder (no dataset.json, imagesTr/ or {MSD_PANCREAS}/); give the "
                        f"{MSD_PANCREAS} folder or its parent")
    source = folder / MSD_DATASET
    if not source.is_file():
        raise DataError(f"{folder}: no {MSD_DATASET}; an MSD task folder holds dataset.json beside imagesTr/ and "
                        "labelsTr/ (restore it from the Decathlon archive)")
    try:
        dataset = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{source}: not readable JSON ({type(e).__name__}); restore it from the Decathlon "
                        "archive") from None
    if not isinstance(dataset, dict):
        raise DataError(f"{source}: expected a JSON object with 'training' and 'labels'; is this an MSD dataset.json?")
    training = dataset.get("training")
    if training is None and (folder / "labelsTr").is_dir():
        training = _pairs_from_folders(folder)   # nnU-Net v2 style: no list, cases found by file name
    if not isinstance(training, list) or not training:
        raise DataError(f"{source}: no 'training' list of image/label pairs and no labelsTr/ volumes; is this an "
                        "MSD dataset.json?")
    tumour = _msd_tumour_class(dataset, source)

    rows = []
    for entry in training:
        if not isinstance(entry, dict):
            raise DataError(f"{source}: 'training' entries must be objects with image and label paths")
        image = _relative(folder, entry.get("image"), source, "image")
        label = _relative(folder, entry.get("label"), source, "label")
        if check_files:
            for rel in (image, label):
                if not (folder / rel).is_file():
                    raise DataError(f"{source}: {folder / rel} does not exist; the dataset.json and the folders "
                                    "imagesTr/ and labelsTr/ must match")
            shape_i, shape_l = volume_shape(folder / image), volume_shape(folder / label)
            if shape_i != shape_l:
                raise DataError(f"{folder / label}: label map shape {'x'.join(map(str, shape_l))} does not match its "
                                f"image {folder / image} ({'x'.join(map(str, shape_i))}); pair each image with its "
                                "own segmentation")
            if label_from == "segmentation":
                found = label_values(folder / label)
                if tumour not in found:
                    raise DataError(f"{folder / label}: no voxel of tumour class {tumour} (the map holds "
                                    f"{', '.join(map(str, found))}), so --label-from segmentation cannot call it "
                                    "a tumour scan; fix the map, drop the case from dataset.json, or use "
                                    "--label-from dataset")
        case = Path(image).name.split(".")[0]
        rows.append({"sample_id": f"msd/{case}", "path": image, "patient_id": case, "pdac": 1.0, "site": MSD_SITE})
    frame = pd.DataFrame(rows)
    invented = [frame["patient_id"]]   # a case id is no patient id: demographics.csv may give the real ones
    frame = _demographics(folder, frame, frame["path"])

    parts = [frame]
    if controls is not None:
        controls = Path(controls)
        if not controls.is_dir():
            raise DataError(f"--controls {controls}: not a folder; give the folder of tumour-free NIfTI volumes")
        files = _control_volumes(controls)
        if not files:
            raise DataError(f"--controls {controls}: no .nii or .nii.gz volumes found; convert the control scans "
                            "to NIfTI (e.g. NIH Pancreas-CT with dcm2niix)")
        rel_to_controls = pd.Series([f.relative_to(controls).as_posix() for f in files])
        ctrl = pd.DataFrame({
            "sample_id": ["controls/" + r.split(".")[0] for r in rel_to_controls],
            "path": [os.path.relpath(f.absolute(), folder.absolute()) for f in files],
            "patient_id": ["controls/" + Path(r).name.split(".")[0] for r in rel_to_controls],
            "pdac": 0.0,
            "site": CONTROLS_SITE,
        })
        if check_files:
            for f in files:
                volume_shape(f)  # each control must be a 3D NIfTI volume
        invented.append(ctrl["patient_id"])
        parts.append(_demographics(controls, ctrl, rel_to_controls))
    out = pd.concat(parts, ignore_index=True)
    if out["pdac"].nunique() < 2:
        raise DataError(f"{folder}: every case is a tumour scan ({len(out)} MSD cases, each with a pancreatic mass), "
                        "so "
                        "the cohort has one class; add tumour-free scans with --controls DIR (e.g. NIH Pancreas-CT "
                        "converted to NIfTI)")
    present = [c for c in ("sex", "age") if c in out.columns]
    if len(present) < 2 or out[present].isna().any().any():
        warnings.warn(f"{folder}: no {DEMOGRAPHICS} with sex and age for every source, so those attributes are "
                      "absent or partly unknown and the audit cannot compare them; put one (image, sex, age) in "
                      "each source folder to add them", UserWarning, stacklevel=3)
    warnings.warn(SOURCE_SHORTCUT_WARNING, UserWarning, stacklevel=3)
    manifest = validate_manifest(out, task=task, source=source, root=folder, labels=labels, seed=seed,
                                 check_files=check_files)
    # MSD has no patient ids: a case (a control file) is its own patient unless demographics.csv gives its
    # patient_id. Training records "derived" and warns that one person's scans may count as several patients.
    derived = any((part["patient_id"].to_numpy() == ids.to_numpy()).any() for part, ids in zip(parts, invented))
    return dataclasses.replace(manifest, patient_ids="derived") if derived else manifest


register_preset(
    "msd", _load_msd, detect=_detect_msd, options=("controls", "label_from"),
    looks_for=f"an MSD folder with {MSD_DATASET} and imagesTr/, or its parent holding {MSD_PANCREAS}/",
)
