"""The library functions behind the CLI: train a run, audit runs and prediction files, train-and-audit a study.

Each function writes its output through :func:`privaudit._fs.staged_dir`, so an error leaves nothing behind
and never touches an existing output unless ``force`` is set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from privaudit._fs import private_mkdir, read_json, staged_dir, write_json
from privaudit.config import AuditConfig, TrainConfig
from privaudit.errors import ConfigError, DataError
from privaudit.tasks import create_task

PUBLIC_COHORT_DOC = "synthetic 'public' chest radiographs, a separate cohort from the private one"


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

    def cohort_size(self, task: str) -> int:
        return int(self.n_samples) if self.n_samples is not None else int(create_task(task).default("n_samples"))


def _command() -> str:
    return " ".join(shlex.quote(a) for a in ["privaudit", *sys.argv[1:]]) if sys.argv else "privaudit"


def load_data(spec: DataSpec, task: str):
    from privaudit.data.presets import load_data as _load

    return _load(Path(spec.path), task=create_task(task), preset=spec.preset, labels=spec.labels, views=spec.views,
                 seed=spec.seed, controls=spec.controls, label_from=spec.label_from)


def synthesize(task: str, out: Path, *, n: int, image_size: int, seed: int, public: bool = False,
               layout: str = "manifest", console=None, quiet: bool = False) -> Path:
    """Write the task's synthetic cohort into ``out``: radiographs for cxr, NIfTI CT volumes for pdac
    (``layout="msd"``: the Decathlon folder layout plus a controls folder)."""
    from rich.progress import Progress

    if task not in ("cxr", "pdac"):
        raise ConfigError(f"no synthetic cohort for task {task!r} yet; give --data")
    if layout != "manifest" and task != "pdac":
        raise ConfigError(f"--layout {layout} exists for task pdac only; {task} cohorts use the manifest layout")
    if public and task != "cxr":
        raise ConfigError(f"--public (a pretraining cohort) exists for task cxr only")

    private_mkdir(out)
    what = "public" if public else "synthetic"
    with Progress(console=console, disable=quiet) as prog:
        t = prog.add_task(f"writing {what} cohort", total=n)
        if task == "pdac":
            from privaudit.data.synth_ct import synthesize_ct

            return synthesize_ct(out, n=n, image_size=image_size, seed=seed, layout=layout,
                                 progress=lambda k: prog.update(t, completed=k))
        from privaudit.data.synth_cxr import synthesize_cxr

        return synthesize_cxr(out, n=n, image_size=image_size, seed=seed, public=public,
                              progress=lambda k: prog.update(t, completed=k))


def _train_into(manifest, config: TrainConfig, out: Path, *, data_info: dict, console, quiet) -> dict:
    from privaudit.backends import create_backend

    backend = create_backend(config.backend)
    private_mkdir(out)
    write_json(out / "config.json", {"train": config.to_dict(), "data": data_info, "command": _command()})
    return backend.train(manifest, config, out, console=console, quiet=quiet)


def train(config: TrainConfig, data: DataSpec, out: Path, *, force: bool = False, console=None,
          quiet: bool = False) -> dict:
    """Train one model into run directory ``out`` (model/, train.json, predictions.csv, config.json)."""
    from privaudit.backends import create_backend

    create_task(config.task)
    create_backend(config.backend)  # fail on an unknown backend before any work
    with staged_dir(out, force=force) as tmp:
        manifest, data_info = _prepare_data(config, data, tmp, console=console, quiet=quiet)
        return _train_into(manifest, config, tmp, data_info=data_info, console=console, quiet=quiet)


def _prepare_data(config: TrainConfig, data: DataSpec, workdir: Path, *, console, quiet):
    task = create_task(config.task)
    if data.path is None:
        n = data.cohort_size(config.task)
        manifest_path = synthesize(config.task, workdir / "data", n=n,
                                   image_size=config.image_size or task.input_size, seed=data.seed,
                                   console=console, quiet=quiet)
        spec = dataclasses.replace(data, path=manifest_path, preset="manifest")
        info = {"manifest": "data/manifest.csv", "synthetic": True, "n_samples": n, "seed": data.seed}
    else:
        spec = data
        info = {"manifest": str(Path(data.path).absolute()), "synthetic": False, "preset": data.preset,
                "views": data.views}
        if data.controls is not None:
            info["controls"] = str(Path(data.controls).absolute())
        if data.label_from is not None:
            info["label_from"] = data.label_from
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = load_data(spec, config.task)
    for w in caught:  # shown as usual, and kept so that the audit lists them too
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if caught:
        info["warnings"] = [str(w.message) for w in caught]
    info["n_images"] = len(manifest.frame)
    # The hash of the canonical manifest table (what was trained on, whatever the preset), for provenance.
    info["manifest_sha256"] = hashlib.sha256(manifest.frame.to_csv(index=False).encode()).hexdigest()
    return manifest, info


def audit_run_dirs(run_dirs: dict[str, Path], *, config: AuditConfig, reference: str | None = None):
    """Audit run directories (each with predictions.csv and train.json) as one study."""
    from privaudit.audit import run_audit
    from privaudit.predictions import read_predictions

    from privaudit.data.manifest import read_csv

    preds, runs, canaries, scores, task = {}, {}, {}, {}, None
    for name, d in run_dirs.items():
        d = Path(d)
        if not (d / "predictions.csv").is_file():
            raise DataError(f"{d}: no predictions.csv, so this is not a run directory; give a folder written by "
                            "'privaudit train', or use --predictions FILE")
        preds[name] = read_predictions(d / "predictions.csv")
        if (d / "train.json").is_file():
            runs[name] = read_json(d / "train.json")
            task = task or runs[name].get("task")
        if (d / "canaries.csv").is_file():
            canaries[name] = read_csv(d / "canaries.csv")
        if (d / "attack_scores.csv").is_file():
            scores[name] = read_csv(d / "attack_scores.csv", dtype={"sample_id": str})
    report = run_audit(preds, runs=runs, reference=reference, config=config, task=task, canaries=canaries,
                       attack_scores=scores)
    # Provenance from the runs' config.json: the data they were trained on, their settings, the command.
    configs = {name: read_json(Path(d) / "config.json") for name, d in run_dirs.items()
               if (Path(d) / "config.json").is_file()}
    if configs:
        first = next(iter(configs.values()))
        study = report.data["study"]
        for k, v in (first.get("data") or {}).items():
            if k != "n_images":
                study["data"].setdefault(k, v)
        # What the data loader warned about (e.g. a source that is a shortcut to the label) belongs in the audit.
        report.data["warnings"].extend(f"data: {w}" for w in (first.get("data") or {}).get("warnings", [])
                                       if f"data: {w}" not in report.data["warnings"])
        if first.get("command"):
            study.setdefault("command", first["command"])
        study["configs"] = {name: c.get("train") for name, c in configs.items() if c.get("train")}
    return report


def audit_run(run_dir: Path, *, config: AuditConfig) -> Path:
    """Write ``audit.json`` and ``report.html`` into a run directory, or a study directory (whose run
    directories are audited together, compared against ``non_private`` when it is there)."""
    from privaudit.reports import write_report

    run_dir = Path(run_dir)
    if (run_dir / "sweep.json").is_file():  # an epsilon sweep: its runs sit two levels down (eps=<e>/seed=<s>)
        from privaudit.sweep import audit_sweep

        audit_sweep(run_dir, config=config)
        return run_dir / "audit.json"
    if (run_dir / "predictions.csv").is_file():
        name = run_dir.absolute().name
        if (run_dir / "config.json").is_file():  # a sweep's run keeps its study name, eps=<e>/seed=<s>
            name = (read_json(run_dir / "config.json").get("sweep") or {}).get("run") or name
        report = audit_run_dirs({name: run_dir}, config=config)
    else:
        runs = {d.name: d for d in sorted(run_dir.iterdir()) if d.is_dir() and (d / "predictions.csv").is_file()}
        if (run_dir / "audit.json").is_file():  # a study keeps its own models (not e.g. its pretraining run)
            earlier = set(read_json(run_dir / "audit.json").get("models", {}))
            runs = {k: v for k, v in runs.items() if k in earlier} or runs
        if not runs:
            raise DataError(f"{run_dir}: no predictions.csv here or in its sub-folders; give a run or study "
                            "directory written by privaudit, or use --predictions FILE")
        report = audit_run_dirs(runs, config=config, reference="non_private" if "non_private" in runs else None)
    report.to_json(run_dir / "audit.json")
    write_report(run_dir / "audit.json")
    return run_dir / "audit.json"


def audit_predictions(files: list[Path], names: list[str] | None, out: Path, *, config: AuditConfig,
                      reference: str | None = None, force: bool = False) -> Path:
    """Audit prediction files (from privaudit or elsewhere) into ``out/audit.json`` and ``out/report.html``."""
    from privaudit.audit import run_audit
    from privaudit.predictions import read_predictions
    from privaudit.reports import write_report

    names = list(names or [])
    if names and len(names) != len(files):
        raise ConfigError(f"{len(names)} --name value(s) for {len(files)} --predictions file(s); give one per file")
    names = names or [Path(f).stem for f in files]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names {names} repeat; give distinct names with --name")
    preds = {name: read_predictions(Path(f)) for name, f in zip(names, files)}
    report = run_audit(preds, reference=reference, config=config)
    with staged_dir(out, force=force) as tmp:
        report.to_json(tmp / "audit.json")
        write_report(tmp / "audit.json")
    return Path(out) / "audit.json"


def audit_checkpoint(checkpoint: Path, data: DataSpec, out: Path, *, task: str, arch: str, backend: str | None,
                     image_size: int | None, trust: bool, config: AuditConfig, force: bool = False) -> Path:
    """Predict with a checkpoint trained elsewhere, then audit it: writes a run directory at ``out``.

    ``backend=None`` picks it from the file name: ``.keras`` files go to the tf backend, others to opacus.
    """
    from privaudit.audit import run_audit
    from privaudit.backends import create_backend
    from privaudit.predictions import write_predictions
    from privaudit.reports import write_report

    if data.path is None:
        raise ConfigError("--checkpoint needs --data MANIFEST: the samples to score the model on")
    backend = backend or ("tf" if Path(checkpoint).suffix == ".keras" else "opacus")
    be = create_backend(backend)
    manifest = load_data(data, task)
    with staged_dir(out, force=force) as tmp:
        preds, info = be.predict_checkpoint(Path(checkpoint), manifest, task=task, arch=arch, image_size=image_size,
                                            trust=trust)
        write_predictions(preds, tmp / "predictions.csv")
        write_json(tmp / "config.json", {"checkpoint": info, "data": {"manifest": str(data.path)},
                                         "command": _command()})
        run = {"backend": backend, "architecture": info.get("architecture"), "task": task, "seed": None, "dp": False}
        report = run_audit({"model": preds}, runs={"model": run}, config=config, task=task,
                           data={"manifest": str(data.path)})
        report.data["warnings"].append("model trained elsewhere: privaudit cannot see how it was trained, so no "
                                       "DP guarantee is reported for it")
        report.to_json(tmp / "audit.json")
        write_report(tmp / "audit.json")
    return Path(out) / "audit.json"


def train_and_audit(config: TrainConfig, data: DataSpec, out: Path, *, baseline: bool = True,
                    pretrain: bool = False, pretrain_epochs: int = 3, audit: AuditConfig | None = None,
                    force: bool = False, console=None, quiet: bool = False, pdf: bool = False,
                    model_card: Path | None = None) -> dict:
    """Train the private model (and the non-private baseline), audit both, and write the study directory."""
    from privaudit.backends import create_backend
    from privaudit.reports import write_report

    from privaudit.reports.render import load_model_card

    task = create_task(config.task)
    create_backend(config.backend)
    card = load_model_card(model_card)  # a bad card fails before any training
    audit = audit or AuditConfig(seed=config.seed)
    with staged_dir(out, force=force) as tmp:
        manifest, data_info = _prepare_data(config, data, tmp, console=console, quiet=quiet)
        if pretrain:
            if config.task != "cxr":
                raise ConfigError("--pretrain needs a synthetic public cohort, which exists for cxr only")
            # The public cohort: half the private one, but at least as large as a small private cohort (up to
            # 1,000 images), so that pretraining has something to learn from.
            size = data.cohort_size(config.task)
            pub_manifest_path = synthesize(config.task, tmp / "public_data", n=max(size // 2, min(1000, size)),
                                           image_size=config.image_size or task.input_size, seed=data.seed + 10_000,
                                           public=True, console=console, quiet=quiet)
            pub = load_data(DataSpec(path=pub_manifest_path, preset="manifest", seed=data.seed), config.task)
            pre_cfg = dataclasses.replace(config, dp=dataclasses.replace(config.dp, enabled=False),
                                          epochs=pretrain_epochs, init=None, canaries=0)
            if not quiet and console is not None:
                console.print("[bold]pretraining[/] without privacy on the public cohort")
            _train_into(pub, pre_cfg, tmp / "pretrain", data_info={"manifest": "public_data/manifest.csv",
                                                                  "synthetic": True, "public": True},
                        console=console, quiet=quiet)
            # the backend's weights file as its model.json names it: weights.pt (opacus) or model.keras (tf)
            pre_weights = "pretrain/model/" + read_json(tmp / "pretrain" / "model" / "model.json")["weights"]
            config = dataclasses.replace(config, init=str(tmp / pre_weights))
            data_info["pretraining"] = {"description": PUBLIC_COHORT_DOC, "manifest": "public_data/manifest.csv",
                                        "epochs": pretrain_epochs, "dp": False}
        runs = {}
        if config.dp.enabled:
            if not quiet and console is not None:
                console.print("[bold]training[/] the private model (DP-SGD)")
            runs["private"] = _train_into(manifest, config, tmp / "private", data_info=data_info, console=console,
                                          quiet=quiet)
        if baseline or not config.dp.enabled:
            if not quiet and console is not None:
                console.print("[bold]training[/] the non-private baseline")
            np_cfg = dataclasses.replace(config, dp=dataclasses.replace(config.dp, enabled=False))
            runs["non_private"] = _train_into(manifest, np_cfg, tmp / "non_private", data_info=data_info,
                                              console=console, quiet=quiet)
        if pretrain:
            # Keep the init path valid after the staged folder is renamed into place.
            for name in runs:
                runs[name]["init"]["path"] = pre_weights
                write_json(tmp / name / "train.json", runs[name])
                cfg_json = read_json(tmp / name / "config.json")
                cfg_json["train"]["init"] = pre_weights
                write_json(tmp / name / "config.json", cfg_json)
        for name in runs:  # each run directory also carries its own single-model audit
            single = audit_run_dirs({name: tmp / name}, config=audit)
            single.to_json(tmp / name / "audit.json")
        report = audit_run_dirs({name: tmp / name for name in runs}, config=audit,
                                reference="non_private" if "non_private" in runs and len(runs) > 1 else None)
        report.data["study"]["task"] = config.task
        report.data["study"]["data"].update({k: v for k, v in data_info.items() if k != "n_images"})
        report.data["study"]["command"] = _command()
        if card:
            report.data["study"]["model_card"] = card  # kept, so that later re-renders show it too
        report.to_json(tmp / "audit.json")
        write_report(tmp / "audit.json", fmt="both" if pdf else "html")
    return report.data


def headline_rows(doc: dict) -> pd.DataFrame:
    """Per-label AUROC of each model and the paired differences, for the closing table."""
    rows = []
    labels = doc["study"]["labels"]
    for lab in labels + ["macro"]:
        row = {"label": lab}
        for name, m in doc["models"].items():
            u = m["utility"]["macro_auroc"] if lab == "macro" else m["utility"]["labels"][lab]["auroc"]
            row[name] = u
        for cname, c in doc["comparisons"].items():
            row[cname] = c["macro_auroc_difference"] if lab == "macro" else c["labels"][lab]["auroc_difference"]
        rows.append(row)
    return pd.DataFrame(rows)
