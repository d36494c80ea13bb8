"""One data-preparation path for train, train-and-audit, sweeps and attacks.

:func:`prepare_data` turns a :class:`DataSpec` into the loaded manifest and the ``data`` block that
``config.json`` records. That block holds everything needed to reload exactly the same data (the path, the
preset and all its options, the labels and views) and the SHA-256 of the canonical manifest table;
:func:`reload_data` rebuilds the data from it and refuses data whose hash differs, so shadow models can never
train on other samples than the run they attack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from privaudit._fs import private_mkdir, write_marker
from privaudit.errors import ConfigError, DataError
from privaudit.study.dirs import DATA_DIR
from privaudit.tasks import create_task

PUBLIC_COHORT_DOC = "synthetic 'public' chest radiographs, a separate cohort from the private one"
# How the chexpert and mimic presets read labels before the policies were options (and recorded)
LEGACY_LABEL_POLICY = {"uncertain": "ignore", "blank": "unknown", "no_finding": "ignore"}


@dataclass(frozen=True)
class DataSpec:
    """Where the data come from: a manifest or preset folder, or (``path=None``) a fresh synthetic cohort."""

    path: Path | None = None
    preset: str | None = None
    labels: tuple[str, ...] | None = None
    views: str = "frontal"
    n_samples: int | None = None   # synthetic cohort size; None: the task's default (cxr 3000, pdac 400)
    seed: int = 0
    controls: Path | None = None   # msd preset: folder of tumour-free control volumes
    label_from: str | None = None  # msd preset: segmentation (default) or dataset
    uncertain: str | None = None   # chexpert/mimic presets: ignore (default), zeros or ones (what -1 becomes)
    blank: str | None = None       # chexpert/mimic presets: unknown (default) or negative (what blank becomes)
    no_finding: str | None = None  # chexpert/mimic presets: negative (default: No Finding = 1 zeroes blanks) or ignore

    def __post_init__(self):
        if self.n_samples is not None:
            from privaudit.limits import check_limit

            check_limit("n_samples", self.n_samples)
        for name, value in self.label_policies().items():
            if value is not None:
                from privaudit.data.presets import check_policy

                check_policy(name, value)
                if self.path is None:
                    raise ConfigError(f"{name} is a label policy of the chexpert and mimic presets, and the synthetic "
                                      "cohort's labels are definite; drop it, or give data")
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
        if self.controls is not None:
            object.__setattr__(self, "controls", Path(self.controls))
        if isinstance(self.labels, str):
            object.__setattr__(self, "labels", tuple(x.strip() for x in self.labels.split(",") if x.strip()))
        elif self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))

    def cohort_size(self, task: str) -> int:
        return int(self.n_samples) if self.n_samples is not None else int(create_task(task).default("n_samples"))

    def options(self) -> dict:
        """The loader options that decide which samples and labels are read (recorded, and used to reload)."""
        return {"preset": self.preset, "labels": list(self.labels) if self.labels else None, "views": self.views,
                "controls": str(Path(self.controls).absolute()) if self.controls else None,
                "label_from": self.label_from, "uncertain": self.uncertain, "blank": self.blank,
                "no_finding": self.no_finding}

    def label_policies(self) -> dict:
        """The label policies given (None: the preset's default)."""
        return {"uncertain": self.uncertain, "blank": self.blank, "no_finding": self.no_finding}

    def with_label_policy(self) -> "DataSpec":
        """This spec with every label policy its preset applies written out (defaults included), so that what is
        recorded and compared does not depend on defaults; unchanged for data whose preset has no policies
        (a manifest, NIH, MSD, a synthetic cohort)."""
        from privaudit.data.presets import label_policy

        if self.path is None:
            return self
        policy = label_policy(Path(self.path), self.preset, **self.label_policies())
        return dataclasses.replace(self, **policy.to_dict()) if policy is not None else self


@dataclass(frozen=True)
class PreparedData:
    """Loaded data: the canonical manifest, the spec that reloads it, and ``config.json``'s data block."""

    manifest: object   # privaudit.data.manifest.Manifest
    spec: DataSpec
    info: dict


def manifest_sha256(manifest) -> str:
    """The hash of the canonical manifest table: what was trained on, whatever the preset."""
    return hashlib.sha256(manifest.frame.to_csv(index=False).encode()).hexdigest()


def load_manifest(spec: DataSpec, task: str, *, record: list[str] | None = None):
    """Load ``spec`` through its preset; the loader's warnings are shown as usual and, with ``record``, kept."""
    from privaudit.data.presets import load_data

    if spec.path is None:
        raise ConfigError("data: no path to load; give a manifest.csv or a dataset folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = load_data(Path(spec.path), task=create_task(task), preset=spec.preset, labels=spec.labels,
                             views=spec.views, seed=spec.seed, controls=spec.controls, label_from=spec.label_from,
                             **spec.label_policies())
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if record is not None:
        record.extend(str(w.message) for w in caught)
    return manifest


def synthesize(task: str, out: Path, *, n: int, image_size: int, seed: int, public: bool = False,
               layout: str = "manifest", console=None, quiet: bool = True) -> Path:
    """Write the task's synthetic cohort into ``out``: radiographs for cxr, NIfTI CT volumes for pdac
    (``layout="msd"``: the Decathlon folder layout plus a controls folder). Returns the manifest path."""
    from rich.progress import Progress

    if task not in ("cxr", "pdac"):
        raise ConfigError(f"no synthetic cohort for task {task!r} yet; give data")
    if layout not in ("manifest", "msd"):
        raise ConfigError(f"layout {layout!r} is not one of manifest, msd")
    if layout != "manifest" and task != "pdac":
        raise ConfigError(f"layout {layout} exists for task pdac only; {task} cohorts use the manifest layout")
    if public and task != "cxr":
        raise ConfigError("public (a pretraining cohort) exists for task cxr only")
    from privaudit.limits import check_limit

    check_limit("n", n)   # before anything is written (the synthesizers check again)
    check_limit("image_size", image_size, const="MAX_VOLUME_SIZE" if task == "pdac" else "MAX_IMAGE_SIZE")
    private_mkdir(out)
    write_marker(out, "cohort")
    with Progress(console=console, disable=quiet or console is None) as prog:
        t = prog.add_task(f"writing {'public' if public else 'synthetic'} cohort", total=n)
        if task == "pdac":
            from privaudit.data.synth_ct import synthesize_ct

            return synthesize_ct(out, n=n, image_size=image_size, seed=seed, layout=layout,
                                 progress=lambda k: prog.update(t, completed=k))
        from privaudit.data.synth_cxr import synthesize_cxr

        return synthesize_cxr(out, n=n, image_size=image_size, seed=seed, public=public,
                              progress=lambda k: prog.update(t, completed=k))


def prepare_data(task: str, data: DataSpec, workdir: Path | None, *, image_size: int | None = None,
                 console=None, quiet: bool = True) -> PreparedData:
    """Load the data for ``task``: the given manifest or dataset folder, or a synthetic cohort written into
    ``workdir/data`` (reused when a resumed sweep already wrote it). The data block records the manifest path
    relative to ``workdir`` for a synthetic cohort, else absolute, with every loader option and the hash."""
    spec_task = create_task(task)
    if data.path is None:
        if workdir is None:
            raise ConfigError("data: give a manifest.csv or a dataset folder (a synthetic cohort needs an output "
                              "folder to live in)")
        n = data.cohort_size(task)
        manifest_path = Path(workdir) / DATA_DIR / "manifest.csv"
        if not manifest_path.is_file():
            manifest_path = synthesize(task, Path(workdir) / DATA_DIR, n=n, image_size=image_size or spec_task.input_size,
                                       seed=data.seed, console=console, quiet=quiet)
        spec = dataclasses.replace(data, path=manifest_path.absolute(), preset="manifest")
        info = {"manifest": f"{DATA_DIR}/manifest.csv", "synthetic": True, "n_samples": n, "seed": data.seed}
    else:
        spec = dataclasses.replace(data, path=Path(data.path).absolute()).with_label_policy()
        info = {"manifest": str(spec.path), "synthetic": False}
    info.update({k: v for k, v in spec.options().items() if v is not None})
    info.setdefault("seed", data.seed)
    caught: list[str] = []
    manifest = load_manifest(spec, task, record=caught)
    if caught:
        info["warnings"] = caught
    info["n_images"] = len(manifest.frame)
    info["manifest_sha256"] = manifest_sha256(manifest)
    return PreparedData(manifest, spec, info)


def resolve_manifest(info: dict, run_dir: Path) -> Path:
    """The data path of a recorded data block: absolute, or relative to the run directory or a folder above it
    (a study keeps its synthetic cohort beside its runs, a sweep two levels up)."""
    rel = Path((info or {}).get("manifest") or "")
    if not str(rel) or str(rel) == ".":
        raise DataError(f"{run_dir}: config.json records no data; was this run trained by privaudit?")
    places = [rel] if rel.is_absolute() else [run_dir / rel, *[p / rel for p in list(Path(run_dir).parents)[:2]]]
    for cand in places:
        if cand.exists():
            return cand
    raise DataError(f"{run_dir}: cannot find the run's data ({rel}); it was trained on it, and shadow models and "
                    "re-audits need the same data")


def spec_from_info(info: dict, run_dir: Path) -> DataSpec:
    """The DataSpec that reloads the data a run recorded in its config.json."""
    synthetic = bool(info.get("synthetic"))
    spec = DataSpec(path=resolve_manifest(info, Path(run_dir)).absolute(),
                    preset="manifest" if synthetic else info.get("preset"),
                    labels=tuple(info["labels"]) if info.get("labels") else None,
                    views=info.get("views") or "frontal", seed=int(info.get("seed") or 0),
                    controls=Path(info["controls"]) if info.get("controls") else None,
                    label_from=info.get("label_from"), uncertain=info.get("uncertain"), blank=info.get("blank"),
                    no_finding=info.get("no_finding"))
    if not synthetic and not any(k in info for k in LEGACY_LABEL_POLICY):
        # recorded before the label policies existed: the chexpert and mimic presets then read -1 and blank as
        # unknown and left No Finding unread
        from privaudit.data.presets import label_policy

        if label_policy(spec.path, spec.preset) is not None:
            spec = dataclasses.replace(spec, **LEGACY_LABEL_POLICY)
    return spec


def reload_data(info: dict, run_dir: Path, task: str, *, labels=None) -> PreparedData:
    """Reload exactly the data a run was trained on, and check it: a different manifest hash is refused (the
    files or the loader changed since), because attacks on other data would measure nothing."""
    spec = spec_from_info(info, run_dir)
    if labels is not None and spec.labels is None:
        spec = dataclasses.replace(spec, labels=tuple(labels))
    with warnings.catch_warnings():  # the run's own training already showed the loader's warnings
        warnings.simplefilter("ignore")
        manifest = load_manifest(spec, task)
    digest = manifest_sha256(manifest)
    want = info.get("manifest_sha256")
    if want and digest != want:
        raise DataError(f"{run_dir}: the data at {spec.path} no longer match what the run was trained on (manifest "
                        f"hash {digest[:12]} vs {want[:12]}); restore the data, or train the run again")
    return PreparedData(manifest, spec, {**info, "manifest_sha256": digest})


ProgressArg = bool | Callable[[str], None] | None
