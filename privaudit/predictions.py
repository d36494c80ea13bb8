"""The prediction table: the pivot between training and auditing (framework-free).

Columns: ``sample_id``, ``split``, ``member`` (1 if the sample was in the training set), ``y_<label>``
(0/1 or empty) and ``p_<label>`` (probability) per label, ``loss`` (per-sample training loss), and the
sensitive-attribute columns. privaudit also writes ``patient_id`` when it knows it, so that the audit can
resample patients rather than images; files from elsewhere may omit it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from privaudit.errors import DataError

ATTRIBUTE_COLUMNS = ("sex", "age", "comorbidity", "site", "race", "ethnicity")
# A blank patient_id becomes this prefix plus the row's sample_id: its own patient in the resampler, DeLong and
# the split check (all blanks as one string "nan" would form one giant cluster). The audit warns about them.
BLANK_PATIENT_PREFIX = "<blank patient_id> "
PRED_REQUIRED = ("sample_id", "split")


def build_predictions(frame: pd.DataFrame, labels, probs: np.ndarray, losses: np.ndarray) -> pd.DataFrame:
    """Assemble the prediction table from a canonical manifest frame and the model's outputs."""
    out = pd.DataFrame({
        "sample_id": frame["sample_id"].to_numpy(),
        "split": frame["split"].to_numpy(),
        "patient_id": frame["patient_id"].to_numpy(),
        "member": (frame["split"] == "train").astype(int).to_numpy(),
    })
    for j, lab in enumerate(labels):
        out[f"y_{lab}"] = pd.array(frame[lab].to_numpy(dtype=float), dtype="Int64") if lab in frame else pd.NA
        out[f"p_{lab}"] = probs[:, j].astype(float)
    out["loss"] = losses.astype(float)
    for col in frame.columns:
        if col in ATTRIBUTE_COLUMNS or col.startswith("attr_"):
            out[col] = frame[col].to_numpy()
    return out


def write_predictions(df: pd.DataFrame, path: Path) -> None:
    """Write the table atomically as a new owner-only file (patient-level data), never through a link."""
    from privaudit._fs import atomic_write_csv

    atomic_write_csv(Path(path), df, mode=0o600, index=False, float_format="%.8g")


def labels_of(df: pd.DataFrame) -> list[str]:
    """Labels present as both ``y_<label>`` and ``p_<label>``, in column order."""
    return [c[2:] for c in df.columns if c.startswith("p_") and f"y_{c[2:]}" in df.columns]


def validate_predictions(df: pd.DataFrame, source) -> pd.DataFrame:
    """Check a prediction table (possibly written by another tool) and return it in canonical dtypes."""
    if len(df) == 0:
        raise DataError(f"{source}: the prediction file has no rows")
    missing = [c for c in PRED_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing required column {missing[0]!r}; prediction files need sample_id, split, "
                        "y_<label> and p_<label> columns")
    labels = labels_of(df)
    if not labels:
        p_only = [c for c in df.columns if c.startswith("p_")]
        what = f"column {p_only[0]!r} has no matching 'y_{p_only[0][2:]}'" if p_only else "no p_<label> column"
        raise DataError(f"{source}: {what}; give each label a y_<label> (0/1/blank) and a p_<label> (probability) column")
    df = df.copy()
    df["sample_id"] = df["sample_id"].astype(str)
    if df["sample_id"].duplicated().any():
        raise DataError(f"{source}: sample_id {df.loc[df['sample_id'].duplicated(), 'sample_id'].iloc[0]!r} "
                        "appears twice; sample ids must be unique")
    # other tools write "valid" or "validation" for the validation split
    df["split"] = df["split"].astype(str).str.strip().str.lower().replace({"valid": "val", "validation": "val"})
    bad_split = ~df["split"].isin(["train", "val", "test"])
    if bad_split.any():
        raise DataError(f"{source}: column 'split' holds {df.loc[bad_split, 'split'].iloc[0]!r}; use train, val or test")
    for lab in labels:
        p = pd.to_numeric(df[f"p_{lab}"], errors="coerce")
        bad = p.isna() | (p < 0) | (p > 1)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{source}: column 'p_{lab}' holds {df[f'p_{lab}'].iloc[i]!r} (row {i + 2}); "
                            "probabilities must be numbers in [0, 1] with no blanks or NaN")
        df[f"p_{lab}"] = p.astype(float)
        y = df[f"y_{lab}"]
        ynum = pd.to_numeric(y, errors="coerce")
        blank = y.isna() | (y.astype(str).str.strip() == "")
        bad = ~blank & ~ynum.isin([0, 1])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{source}: column 'y_{lab}' holds {y.iloc[i]!r} (row {i + 2}); labels must be 0, 1 or blank")
        df[f"y_{lab}"] = ynum.where(~blank).astype(float)
    if "member" in df.columns:
        m = pd.to_numeric(df["member"], errors="coerce")
        if (~m.isin([0, 1])).any():
            raise DataError(f"{source}: column 'member' must be 0 or 1 in every row")
        df["member"] = m.astype(int)
    if "loss" in df.columns:
        df["loss"] = pd.to_numeric(df["loss"], errors="coerce")
    if "patient_id" in df.columns:
        raw = df["patient_id"]
        blank = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
        df["patient_id"] = raw.astype(str)
        # a blank id is unknown, not one shared patient: each such row becomes its own resampling unit
        df.loc[blank, "patient_id"] = BLANK_PATIENT_PREFIX + df.loc[blank, "sample_id"]
    if "age" in df.columns:
        age = pd.to_numeric(df["age"], errors="coerce")
        bad = age.isna() & df["age"].notna()
        if bad.any():
            raise DataError(f"{source}: column 'age' holds {df.loc[bad, 'age'].iloc[0]!r}; ages must be numbers (years)")
        df["age"] = age
    return df


def blank_patient_ids(df: pd.DataFrame) -> int:
    """How many rows of a validated prediction table had a blank ``patient_id`` (0 without the column)."""
    if "patient_id" not in df.columns:
        return 0
    return int(df["patient_id"].astype(str).str.startswith(BLANK_PATIENT_PREFIX).sum())


def blank_patient_warning(n_blank: int, n_rows: int, source) -> str | None:
    """The warning for ``n_blank`` blank patient ids (None when there are none)."""
    if not n_blank:
        return None
    return (f"{source}: {n_blank} of {n_rows} rows have a blank patient_id; each is treated as its own patient "
            "(resampling, DeLong, the split check), which understates the CI width if they share patients; "
            "fill in patient_id")


def read_predictions(path: Path) -> pd.DataFrame:
    from privaudit.data.manifest import read_csv

    return validate_predictions(read_csv(path, dtype={"sample_id": str, "patient_id": str}), Path(path))
