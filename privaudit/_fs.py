"""File-system helpers: owner-only run directories, staged (all-or-nothing) outputs, safe JSON."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from privaudit.errors import OutputExistsError

# Files whose presence means "a run or a study lives here".
RUN_MARKERS = ("train.json", "audit.json", "predictions.csv", "manifest.csv")


def holds_run(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def check_out_dir(out: Path, *, force: bool) -> None:
    """Refuse an ``--out`` that already holds something unless ``force`` is set."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "a run" if holds_run(out) else "files"
        raise OutputExistsError(f"--out {out} already holds {what}; choose a new directory or pass --force to replace it")


@contextlib.contextmanager
def staged_dir(out: Path, *, force: bool = False):
    """Yield a private temporary directory beside ``out``; move it to ``out`` only on success.

    On any error the temporary directory is removed, so no half-written run is left behind, and an
    existing ``out`` is untouched. With ``force`` an existing ``out`` is replaced only at the very end.
    """
    out = Path(out).absolute()
    check_out_dir(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o700)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def private_mkdir(path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def to_jsonable(obj):
    """Convert numpy scalars/arrays and non-finite floats (to None) for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(obj), f, indent=2, allow_nan=False, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
