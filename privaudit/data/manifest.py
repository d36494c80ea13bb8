"""The canonical manifest: one row per image or volume.

Required columns: ``sample_id``, ``path`` (relative to the manifest's folder), ``split``
(``train``/``val``/``test``) and ``patient_id``; one 0/1 column per task label, where an empty cell means
unknown (masked out of loss and metrics); sensitive attributes ``sex`` (``F``/``M``), ``age`` (years) and any
others the task names. Splits are at patient level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from privaudit.errors import DataError
from privaudit.tasks import TaskSpec

REQUIRED_COLUMNS = ("sample_id", "path", "split", "patient_id")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the table plus the folder its relative paths start from."""

    frame: pd.DataFrame   # canonical columns; labels as float (0.0, 1.0 or NaN)
    root: Path            # folder that ``path`` is relative to
    source: Path          # the manifest file (or the preset folder it came from)
    labels: tuple[str, ...]
    # "given" when patient_id names real patients; "derived" when a preset invented one per case or file (MSD),
    # so that two scans of one person may count as two patients. Training records it (train.json patient_ids).
    patient_ids: str = "given"

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]

    def image_paths(self, frame: pd.DataFrame | None = None) -> list[Path]:
        frame = self.frame if frame is None else frame
        return [self.root / p for p in frame["path"]]


def _label_column(values: pd.Series, column: str, source: Path) -> pd.Series:
    """Parse a label column: 0/1 (any numeric spelling) or blank; anything else is an error."""
    raw = values.copy()
    num = pd.to_numeric(raw, errors="coerce")
    blank = raw.isna() | (raw.astype(str).str.strip() == "")
    bad = (~blank) & ~num.isin([0, 1])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: column {column!r} holds {str(raw.iloc[i])!r} (row {i + 2}); labels must be 0, 1 or blank for unknown"
        )
    return num.where(~blank).astype(float)


def check_patient_level_splits(frame: pd.DataFrame, source: Path) -> None:
    n_splits = frame.groupby("patient_id")["split"].nunique()
    leaked = n_splits[n_splits > 1]
    if len(leaked):
        pid = leaked.index[0]
        splits = sorted(frame.loc[frame["patient_id"] == pid, "split"].unique())
        raise DataError(
            f"{source}: patient {pid!r} appears in splits {', '.join(splits)} ({len(leaked)} patient(s) in all); "
            "splits must be at patient level: give each patient one split, or leave 'split' empty to have one made"
        )


def splits_from_order(order: np.ndarray, fractions=(0.7, 0.1, 0.2)) -> np.ndarray:
    """Split names for items 0..n-1 given a random ``order`` of them: the first ``fractions[0]`` of the order
    train, the next ``fractions[1]`` val, the rest test (counts rounded)."""
    n = len(order)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    split = np.empty(n, dtype=object)
    split[order[:n_train]] = "train"
    split[order[n_train:n_train + n_val]] = "val"
    split[order[n_train + n_val:]] = "test"
    return split


def assign_patient_splits(frame: pd.DataFrame, *, seed: int, fractions=(0.7, 0.1, 0.2)) -> pd.Series:
    """Assign train/val/test at patient level with a seeded permutation of patients."""
    patients = np.array(sorted(frame["patient_id"].astype(str).unique()))
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    which = dict(zip(patients, splits_from_order(np.arange(len(patients)), fractions)))
    return frame["patient_id"].astype(str).map(which)


def validate_manifest(
    frame: pd.DataFrame,
    *,
    task: TaskSpec,
    source: Path,
    root: Path,
    labels: tuple[str, ...] | None = None,
    seed: int = 0,
    check_files: bool = True,
) -> Manifest:
    """Check a manifest table against the contract and return it in canonical form."""
    source = Path(source)
    if len(frame) == 0:
        raise DataError(f"{source}: the manifest has no rows; it needs one row per image")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if "split" in missing:
        missing.remove("split")
        frame = frame.assign(split=np.nan)
    if missing:
        raise DataError(
            f"{source}: missing required column {missing[0]!r}; a manifest needs {', '.join(REQUIRED_COLUMNS)} "
            "plus one 0/1 column per label"
        )
    labels = tuple(labels) if labels else task.labels
    unknown = [x for x in labels if x not in task.labels]
    if unknown:
        raise DataError(f"unknown label {unknown[0]!r} for task {task.name!r}; valid labels: {', '.join(task.labels)}")
    absent = [x for x in labels if x not in frame.columns]
    if len(absent) == len(labels):
        raise DataError(
            f"{source}: none of the task's label columns is present (expected {', '.join(labels)}); "
            "add them or pick the ones you have with --labels"
        )
    if absent:
        raise DataError(f"{source}: missing label column {absent[0]!r}; add it (blank = unknown) or drop it with --labels")
    out = frame.copy()
    for col in ("sample_id", "path", "patient_id"):
        if out[col].isna().any() or (out[col].astype(str).str.strip() == "").any():
            i = int(np.flatnonzero((out[col].isna() | (out[col].astype(str).str.strip() == "")).to_numpy())[0])
            raise DataError(f"{source}: column {col!r} is empty in row {i + 2}; every row needs a {col}")
        out[col] = out[col].astype(str)
    if out["sample_id"].duplicated().any():
        dup = out.loc[out["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise DataError(f"{source}: sample_id {dup!r} appears more than once; sample ids must be unique")
    for lab in labels:
        out[lab] = _label_column(out[lab], lab, source)
    split = out["split"].astype("string").str.strip().str.lower()
    if split.isna().all() or (split == "").all():
        out["split"] = assign_patient_splits(out, seed=seed)
    else:
        bad = split.isna() | ~split.isin(SPLITS)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{source}: column 'split' holds {str(out['split'].iloc[i])!r} (row {i + 2}); use train, val or test"
            )
        out["split"] = split.astype(str)
    check_patient_level_splits(out, source)
    if not (out["split"] == "train").any():
        raise DataError(f"{source}: no row has split 'train'; at least one training image is needed")
    if "sex" in out.columns:
        sex = out["sex"].astype("string").str.strip().str.upper()
        sex = sex.replace({"FEMALE": "F", "MALE": "M"})
        bad = sex.notna() & (sex != "") & ~sex.isin(["F", "M"])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{source}: column 'sex' holds {str(out['sex'].iloc[i])!r} (row {i + 2}); use F, M or blank")
        out["sex"] = sex.where(sex.isin(["F", "M"])).astype(object)
    if "age" in out.columns:
        age = pd.to_numeric(out["age"], errors="coerce")
        bad = age.isna() & out["age"].notna() & (out["age"].astype(str).str.strip() != "")
        if bad.any() or (age < 0).any():
            i = int(np.flatnonzero((bad | (age < 0)).to_numpy())[0])
            raise DataError(f"{source}: column 'age' holds {str(out['age'].iloc[i])!r} (row {i + 2}); ages are years >= 0")
        out["age"] = age.astype(float)
    root = Path(root)
    if check_files:
        paths = [root / p for p in out["path"]]
        missing_files = [p for p in paths if not p.is_file()]
        if missing_files:
            raise DataError(
                f"{source}: image {missing_files[0]} does not exist ({len(missing_files)} missing); "
                "paths are relative to the manifest's folder"
            )
    out = out.reset_index(drop=True)
    return Manifest(frame=out, root=root, source=source, labels=labels)


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """Read a CSV with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; give the path to a manifest.csv or a dataset folder")
    if path.is_dir():
        raise DataError(f"{path} is a folder where a CSV file was expected")
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; a manifest needs a header row and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a readable CSV ({first}); check the file") from None


def load_manifest(path: Path, *, task: TaskSpec, labels=None, seed: int = 0, check_files: bool = True) -> Manifest:
    path = Path(path)
    frame = read_csv(path, dtype=str)  # parse each column ourselves, so errors quote the cell as written
    return validate_manifest(
        frame, task=task, source=path, root=path.parent, labels=labels, seed=seed, check_files=check_files
    )
