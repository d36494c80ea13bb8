"""Run, study and sweep directories as typed objects: they own the file names of the run-directory contract
(ARCHITECTURE.md), write each file once and atomically, and read the files back typed.

A run directory holds ``config.json``, ``model/``, ``train.json``, ``predictions.csv`` (and ``canaries.csv``,
``attack_scores.csv``, ``shadows/`` when used), ``audit.json`` and ``report.html``. A study directory holds one
run directory per model, the study's ``audit.json`` and its report; a sweep directory adds ``sweep.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from privaudit._fs import read_json, write_json
from privaudit.errors import DataError

CONFIG = "config.json"
TRAIN = "train.json"
PREDICTIONS = "predictions.csv"
AUDIT = "audit.json"
REPORT_HTML = "report.html"
REPORT_PDF = "report.pdf"
MODEL_DIR = "model"
MODEL_JSON = "model/model.json"
CANARIES = "canaries.csv"
ATTACK_SCORES = "attack_scores.csv"
SHADOWS = "shadows"
SWEEP = "sweep.json"
DATA_DIR = "data"
NON_PRIVATE = "inf"   # a sweep's setting without privacy: its runs are eps=inf/seed=<s>


def _write_once(path: Path, obj) -> None:
    if path.exists():  # a programming error, not the user's: every contract file has one writer
        raise RuntimeError(f"{path} was already written; each run-directory file is written once")
    write_json(path, obj)


@dataclass(frozen=True)
class _Folder:
    """A folder of privaudit's outputs: a path-like object whose files are named by the contract."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass(frozen=True)
class RunDir(_Folder):
    """One training run (or one audited model) on disk."""

    @property
    def name(self) -> str:
        """The model's name in a study: a sweep run keeps its ``eps=<e>/seed=<s>``, others their folder name."""
        sweep = (self.config().get("sweep") or {}) if self.file(CONFIG).is_file() else {}
        return sweep.get("run") or self.path.absolute().name

    def is_run(self) -> bool:
        return self.file(PREDICTIONS).is_file()

    def is_complete(self) -> bool:
        """Every file that a finished (trained and audited) run writes."""
        return all(self.file(f).is_file() for f in (CONFIG, TRAIN, PREDICTIONS, AUDIT, MODEL_JSON))

    # ---- writing (each once) ----
    def write_config(self, train: dict, data: dict, *, command: str | None, **extra) -> None:
        """``config.json``: the resolved training configuration, the data block that reloads exactly this data,
        the command, and extras (a sweep run's ``sweep`` block, a checkpoint's description)."""
        doc = {"train": train, "data": data, "command": command, **extra}
        _write_once(self.file(CONFIG), {k: v for k, v in doc.items() if v is not None})

    # ---- reading ----
    def _json(self, name: str, *, required: bool = True):
        path = self.file(name)
        if not path.is_file():
            if required:
                raise DataError(f"{self.path}: no {name}; give a run directory written by 'privaudit train'")
            return None
        try:
            return read_json(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable ({type(e).__name__}); the run directory is damaged") from None

    def config(self) -> dict:
        return self._json(CONFIG)

    def train_info(self) -> dict | None:
        """``train.json`` (None for a model trained elsewhere)."""
        return self._json(TRAIN, required=False)

    def model_info(self) -> dict | None:
        return self._json(MODEL_JSON, required=False)

    def predictions(self) -> pd.DataFrame:
        from privaudit.predictions import read_predictions

        if not self.is_run():
            raise DataError(f"{self.path}: no {PREDICTIONS}, so this is not a run directory; give a folder written "
                            "by 'privaudit train', or audit a prediction file")
        return read_predictions(self.file(PREDICTIONS))

    def canaries(self) -> pd.DataFrame | None:
        from privaudit.data.manifest import read_csv

        return read_csv(self.file(CANARIES)) if self.file(CANARIES).is_file() else None

    def attack_scores(self) -> pd.DataFrame | None:
        from privaudit.data.manifest import read_csv

        path = self.file(ATTACK_SCORES)
        return read_csv(path, dtype={"sample_id": str}) if path.is_file() else None

    def audit(self):
        """The run's ``audit.json`` as an :class:`~privaudit.audit.results.AuditReport`."""
        from privaudit.audit.results import AuditReport

        return AuditReport.from_json(self.file(AUDIT))

    def to_frame(self) -> pd.DataFrame:
        return self.audit().to_frame()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


@dataclass(frozen=True)
class StudyDir(_Folder):
    """A study (``train-and-audit``) or sweep directory: run directories audited together as one study."""

    def is_sweep(self) -> bool:
        return self.file(SWEEP).is_file()

    @property
    def runs(self) -> dict[str, RunDir]:
        """The study's models by name: a sweep's ``eps=<e>/seed=<s>`` runs, or the run folders its audit names
        (never, say, a pretraining run that the study did not audit)."""
        if self.is_sweep():
            return {n: RunDir(self.path / n) for n in read_json(self.file(SWEEP))["runs"]}
        runs = {d.name: RunDir(d) for d in sorted(self.path.iterdir()) if d.is_dir() and (d / PREDICTIONS).is_file()}
        if self.file(AUDIT).is_file():
            earlier = set(read_json(self.file(AUDIT)).get("models", {}))
            runs = {k: v for k, v in runs.items() if k in earlier} or runs
        return runs

    @property
    def audit(self):
        """The study's ``audit.json`` as an :class:`~privaudit.audit.results.AuditReport`."""
        from privaudit.audit.results import AuditReport

        return AuditReport.from_json(self.file(AUDIT))

    def to_frame(self) -> pd.DataFrame:
        """Every estimate of the study's audit, one row each (see ``AuditReport.to_frame``)."""
        return self.audit.to_frame()

    def to_json(self) -> str:
        return self.audit.to_json()

    @property
    def report(self) -> Path:
        return self.file(REPORT_HTML)

    def __repr__(self) -> str:
        return f"StudyDir({str(self.path)!r}, runs={list(self.runs)})"
