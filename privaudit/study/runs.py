"""Train, audit and train-and-audit: the library functions behind the CLI and the Python API.

Each function stages its output through :func:`privaudit._fs.staged_dir`, so an error leaves nothing behind and
an existing output is untouched unless ``force`` is set. Every contract file is written once: ``config.json``
before training, ``train.json`` and ``predictions.csv`` by the backend, ``audit.json`` and the report from one
audit of all the models, with the provenance passed in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from privaudit._fs import output_lock, read_json, staged_dir, write_marker
from privaudit.config import AuditConfig, TrainConfig
from privaudit.errors import ConfigError, DataError
from privaudit.study.data import PUBLIC_COHORT_DOC, DataSpec, PreparedData, prepare_data, synthesize
from privaudit.study.dirs import AUDIT, CONFIG, NON_PRIVATE, SWEEP, RunDir, StudyDir
from privaudit.tasks import create_task


def say(console, quiet: bool, text: str) -> None:
    """A study-level progress line (a rich Console, or any callable that takes the text)."""
    if quiet or console is None:
        return
    if callable(getattr(console, "print", None)):
        console.print(text, markup=False)   # the text may quote names from data: never parsed as markup
    elif callable(console):
        console(text)


def _console_of(console):
    """What the backends get for their progress bars: a rich Console, else nothing (bars off)."""
    return console if callable(getattr(console, "print", None)) else None


def relative_init(config: TrainConfig, root: Path) -> str | None:
    """The init path as config.json records it: relative to ``root`` (a study's own pretraining weights, so that
    the path stays valid after the staged folder is renamed), else as given."""
    if not config.init:
        return None
    init = Path(config.init).absolute()
    try:
        return str(init.relative_to(Path(root).absolute()))
    except ValueError:
        return str(init)


def train_run(data: PreparedData, config: TrainConfig, out: Path, *, command: str | None, root: Path | None = None,
              console=None, quiet: bool = True, **extra) -> dict:
    """Train one model into the (staged) run directory ``out``: config.json first, then the backend writes
    model/, train.json and predictions.csv. Returns train.json's content."""
    from privaudit._fs import private_mkdir
    from privaudit.backends import create_backend

    backend = create_backend(config.backend)
    private_mkdir(out)
    train = config.to_dict()
    train["init"] = relative_init(config, root or Path(out).parent)
    RunDir(out).write_config(train, data.info, command=command, **extra)
    write_marker(out, "run")
    return backend.train(data.manifest, config, Path(out), console=_console_of(console), quiet=quiet)


def train(config: TrainConfig, data: DataSpec, out: Path, *, force: bool = False, command: str | None = None,
          console=None, quiet: bool = True) -> RunDir | None:
    """Train one model into run directory ``out`` (config.json, model/, train.json, predictions.csv). Under
    torchrun only rank 0 writes a run directory; the other ranks get None."""
    from privaudit.backends import create_backend

    create_task(config.task)
    create_backend(config.backend)  # fail on an unknown backend before any work
    with staged_dir(out, force=force, kind="run", inputs=_inputs(data, config)) as tmp:
        prepared = prepare_data(config.task, data, tmp, image_size=config.image_size, console=_console_of(console),
                                quiet=quiet)
        info = train_run(prepared, config, tmp, command=command, root=tmp, console=console, quiet=quiet)
    return None if info.get("written") is False else RunDir(Path(out))


def _inputs(data: DataSpec, config: TrainConfig | None = None, *more) -> tuple:
    """Every path a command reads: an output may neither be nor contain one of them (staged_dir refuses)."""
    paths = [data.path, data.controls, config.init if config is not None else None, *more]
    return tuple(Path(p) for p in paths if p)


# ---- auditing -------------------------------------------------------------------------------------------------
def _data_provenance(configs: dict[str, dict]) -> tuple[dict, list[str]]:
    """The data block and the loader's warnings, from the runs' config.json (they share one data set)."""
    first = next(iter(configs.values()), {}) if configs else {}
    data = {k: v for k, v in (first.get("data") or {}).items() if k not in ("n_images", "warnings")}
    warns = [f"data: {w}" for w in (first.get("data") or {}).get("warnings", [])]
    return data, warns


def audit_runs(runs: dict[str, RunDir], *, config: AuditConfig, reference: str | None = None,
               provenance: dict | None = None, is_sweep: bool = False):
    """Audit run directories as one study (one call of the audit engine), with their provenance passed in."""
    from privaudit.audit import run_audit

    preds, trains, canaries, scores, task = {}, {}, {}, {}, None
    configs = {}
    for name, run in runs.items():
        preds[name] = run.predictions()
        info = run.train_info()
        if info is not None:
            trains[name] = info
            task = task or info.get("task")
        if (c := run.canaries()) is not None:
            canaries[name] = c
        if (s := run.attack_scores()) is not None:
            scores[name] = s
        if run.file(CONFIG).is_file():
            configs[name] = run.config()
    data, warns = _data_provenance(configs)
    first = next(iter(configs.values()), {})
    prov = {"command": first.get("command"),
            "configs": {n: c.get("train") for n, c in configs.items() if c.get("train")} or None}
    prov.update(provenance or {})
    return run_audit(preds, runs=trains, reference=reference, config=config, task=prov.pop("task", None) or task,
                     canaries=canaries, attack_scores=scores, data=data, provenance=prov, warnings=warns,
                     is_sweep=is_sweep)


def single_model(report, name: str):
    """The audit of one model of a study, as its run directory keeps it: the study's figures for that model
    (the same test samples and resamples give the same numbers), without comparisons or study-wide analyses."""
    from privaudit.audit.results import AuditReport

    doc = dict(report.data)
    doc["study"] = {k: v for k, v in doc["study"].items() if k not in ("aggregates", "trade_offs", "sweep",
                                                                       "model_card")}
    doc["models"] = {name: report.data["models"][name]}
    doc["comparisons"] = {}
    return AuditReport(doc)


def write_audit(report, folder: Path, *, fmt: str = "html") -> Path:
    """Write ``audit.json`` and the report rendered from it into ``folder``."""
    from privaudit.reports import write_report

    report.to_json(Path(folder) / AUDIT)
    write_report(Path(folder) / AUDIT, fmt=fmt)
    return Path(folder) / AUDIT


def audit_dir(path: Path, *, config: AuditConfig, command: str | None = None):
    """Audit a run, study or sweep directory in place: writes its ``audit.json`` and ``report.html``."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; give a run or study directory, or audit a prediction file")
    with output_lock(path):  # the same lock as a training into that folder: one writer at a time
        return _audit_dir(path, config=config, command=command)


def _audit_dir(path: Path, *, config: AuditConfig, command: str | None):
    if StudyDir(path).is_sweep():
        return audit_sweep(path, config=config, command=command)
    run = RunDir(path)
    if run.is_run():
        report = audit_runs({run.name: run}, config=config,
                            provenance={"command": command} if command else None)
    else:
        runs = StudyDir(path).runs
        if not runs:
            raise DataError(f"{path}: no predictions.csv here or in its sub-folders; give a run or study directory "
                            "written by privaudit, or audit a prediction file")
        report = audit_runs(runs, config=config, reference="non_private" if "non_private" in runs else None,
                            provenance={"command": command} if command else None)
    write_audit(report, path)
    return report


def audit_frames(predictions: dict[str, pd.DataFrame | Path | str], *, config: AuditConfig,
                 reference: str | None = None, out: Path | None = None, force: bool = False,
                 command: str | None = None):
    """Audit prediction tables (DataFrames or files in the predictions.csv schema, keyed by model name); with
    ``out``, write ``audit.json`` and ``report.html`` there."""
    from privaudit.audit import run_audit
    from privaudit.predictions import read_predictions

    if not predictions:
        raise ConfigError("predictions: give at least one prediction table or file")
    frames = {}
    for name, p in predictions.items():
        frames[str(name)] = p.copy() if isinstance(p, pd.DataFrame) else read_predictions(Path(p))
    report = run_audit(frames, reference=reference, config=config,
                       provenance={"command": command} if command else None)
    if out is not None:
        files = tuple(Path(p) for p in predictions.values() if not isinstance(p, pd.DataFrame))
        with staged_dir(out, force=force, kind="study", inputs=files) as tmp:
            write_audit(report, tmp)
    return report


def audit_checkpoint(checkpoint: Path, data: DataSpec, out: Path, *, task: str, arch: str, backend: str | None,
                     image_size: int | None, trust: bool, config: AuditConfig, force: bool = False,
                     command: str | None = None, preprocess=None):
    """Predict with a checkpoint trained elsewhere, then audit it: writes a run directory at ``out``.

    ``backend=None`` picks it from the file name: ``.keras`` files go to the tf backend, others to opacus.
    ``.onnx`` files and the weights of a library architecture (``arch`` = ``torchvision:<model>``,
    ``timm:<model>`` or ``monai:<model>``) go through :func:`privaudit.byom.audit_model`, with the
    preprocessing card ``preprocess`` (a TOML path, a dict or a PreprocessCard; None: privaudit's own).
    """
    from privaudit.audit import run_audit
    from privaudit.backends import create_backend
    from privaudit.predictions import write_predictions
    from privaudit.study.data import load_manifest

    if data.path is None:
        raise ConfigError("a checkpoint needs data (a manifest): the samples to score the model on")
    is_onnx, is_zoo = Path(checkpoint).suffix == ".onnx", ":" in (arch or "")
    if is_onnx or is_zoo:
        from privaudit.byom import audit_model
        from privaudit.preprocess import as_card

        card = as_card(preprocess)   # a bad card fails before any data is read
        if not is_onnx:
            from privaudit.backends.zoo import check_zoo_name

            if backend not in (None, "opacus"):
                raise ConfigError(f"backend {backend!r} does not load library architectures ({arch}); they load "
                                  "with PyTorch: leave out backend")
            check_zoo_name(arch, spatial_dims=create_task(task).spatial_dims)
        return audit_model(Path(checkpoint), load_manifest(data, task), task=task, arch=None if is_onnx else arch,
                           preprocess=card, image_size=image_size, config=config, out=out, force=force,
                           command=command)
    if preprocess is not None:
        raise ConfigError("preprocess (a preprocessing card) applies to .onnx files and library architectures "
                          "(torchvision:, timm:, monai:); privaudit's own architectures use its own preprocessing")
    backend = backend or ("tf" if Path(checkpoint).suffix == ".keras" else "opacus")
    be = create_backend(backend)
    data = data.with_label_policy()
    manifest = load_manifest(data, task)
    data_block = {"manifest": str(data.path), **{k: v for k, v in data.label_policies().items() if v is not None}}
    with staged_dir(out, force=force, kind="run", inputs=_inputs(data, None, checkpoint)) as tmp:
        preds, info = be.predict_checkpoint(Path(checkpoint), manifest, task=task, arch=arch, image_size=image_size,
                                            trust=trust)
        write_predictions(preds, tmp / "predictions.csv")
        RunDir(tmp).write_config(None, data_block, command=command, checkpoint=info)
        run = {"backend": backend, "architecture": info.get("architecture"), "task": task, "seed": None, "dp": False}
        report = run_audit({"model": preds}, runs={"model": run}, config=config, task=task,
                           data=dict(data_block), provenance={"command": command},
                           warnings=["model trained elsewhere: privaudit cannot see how it was trained, so no DP "
                                     "guarantee is reported for it"])
        write_audit(report, tmp)
    return report


def audit_sweep(out: Path, *, config: AuditConfig, executor_info: dict | None = None, command: str | None = None):
    """Audit the runs of the sweep at ``out`` as one study: writes ``audit.json`` and ``report.html``."""
    out = Path(out)
    sweep = read_json(out / SWEEP)
    missing = [name for name in sweep["runs"] if not RunDir(out / name).is_complete()]
    if missing:
        raise DataError(f"{out}: run {missing[0]} is not finished ({len(missing)} missing); run the same "
                        "'privaudit sweep' command again to train the missing runs")
    runs = StudyDir(out).runs
    reference = next((n for n in runs if n.startswith(f"eps={NON_PRIVATE}/")), None)
    report = audit_runs(runs, config=config, reference=reference, is_sweep=True, provenance={
        "task": sweep["identity"]["task"], "command": command or sweep.get("command"),
        "sweep": {"epsilons": sweep["epsilons"], "seeds": sweep["seeds"], "runs": list(runs),
                  **({"executor": executor_info} if executor_info else {})}})
    if (out / "data" / "manifest.csv").is_file():
        report.data["study"]["data"]["manifest"] = "data/manifest.csv"
    write_audit(report, out)
    return report


def verify(config: TrainConfig, data: DataSpec, out: Path, *, gradient_canaries: int = 1000,
           confidence: float = 0.99, canary_seed: int = 0, console=None, quiet: bool = True) -> dict:
    """``privaudit verify-dp``: train the pipeline once with gradient canaries (privaudit.backends.verify_dp) on
    the data as ``train`` prepares it, and write ``verify.json`` and ``verify_scores.csv`` into ``out``."""
    from privaudit._fs import private_mkdir
    from privaudit.backends.verify_dp import verify_dp

    create_task(config.task)
    if data.path is None:
        raise ConfigError("verify-dp needs data (a manifest or a dataset folder); make a synthetic cohort with "
                          "'privaudit data synth' first")
    prepared = prepare_data(config.task, data, None)
    from privaudit.backends.distributed import is_main_process

    if is_main_process():   # under torchrun only rank 0 writes
        private_mkdir(out)
    return verify_dp(prepared.manifest, config, Path(out), gradient_canaries=gradient_canaries,
                     confidence=confidence, seed=canary_seed,
                     progress=None if quiet else (lambda msg: say(console, quiet, msg)))


# ---- the main job ---------------------------------------------------------------------------------------------
def train_and_audit(config: TrainConfig, data: DataSpec, out: Path, *, baseline: bool = True,
                    pretrain: bool = False, pretrain_epochs: int = 3, audit: AuditConfig | None = None,
                    force: bool = False, pdf: bool = False, model_card: Path | dict | None = None,
                    command: str | None = None, console=None, quiet: bool = True) -> StudyDir:
    """Train the private model (and the non-private baseline), audit both as one study, and write the study
    directory: one run directory per model, the study's audit.json and report.html (and report.pdf)."""
    from privaudit.backends import create_backend
    from privaudit.reports.render import load_model_card

    task = create_task(config.task)
    create_backend(config.backend)
    card = model_card if isinstance(model_card, dict) else load_model_card(model_card)  # fails before training
    audit = audit or AuditConfig(seed=config.seed)
    if pretrain and config.task != "cxr":
        raise ConfigError("pretrain needs a synthetic public cohort, which exists for cxr only")
    bars = _console_of(console)
    with staged_dir(out, force=force, kind="study",
                    inputs=_inputs(data, config, *([model_card] if isinstance(model_card, (str, Path)) else []))) as tmp:
        prepared = prepare_data(config.task, data, tmp, image_size=config.image_size, console=bars, quiet=quiet)
        data_info = dict(prepared.info)
        if pretrain:
            # The public cohort: half the private one, but at least as large as a small private cohort (up to
            # 1,000 images), so that pretraining has something to learn from.
            size = data.cohort_size(config.task)
            pub_path = synthesize(config.task, tmp / "public_data", n=max(size // 2, min(1000, size)),
                                  image_size=config.image_size or task.input_size, seed=data.seed + 10_000,
                                  public=True, console=bars, quiet=quiet)
            pub = prepare_data(config.task, DataSpec(path=pub_path, preset="manifest", seed=data.seed), None)
            pub = dataclasses.replace(pub, info={**pub.info, "manifest": "public_data/manifest.csv",
                                                 "synthetic": True, "public": True})
            pre_cfg = dataclasses.replace(config, dp=dataclasses.replace(config.dp, enabled=False),
                                          epochs=pretrain_epochs, init=None, canaries=0)
            say(console, quiet, "pretraining without privacy on the public cohort")
            train_run(pub, pre_cfg, tmp / "pretrain", command=command, root=tmp, console=console, quiet=quiet)
            weights = RunDir(tmp / "pretrain").model_info()["weights"]
            config = dataclasses.replace(config, init=str(tmp / "pretrain" / "model" / weights))
            data_info["pretraining"] = {"description": PUBLIC_COHORT_DOC, "manifest": "public_data/manifest.csv",
                                        "epochs": pretrain_epochs, "dp": False}
        prepared = dataclasses.replace(prepared, info=data_info)
        names = []
        if config.dp.enabled:
            say(console, quiet, "training the private model (DP-SGD)")
            train_run(prepared, config, tmp / "private", command=command, root=tmp, console=console, quiet=quiet)
            names.append("private")
        if baseline or not config.dp.enabled:
            say(console, quiet, "training the non-private baseline")
            np_cfg = dataclasses.replace(config, dp=dataclasses.replace(config.dp, enabled=False))
            train_run(prepared, np_cfg, tmp / "non_private", command=command, root=tmp, console=console, quiet=quiet)
            names.append("non_private")
        say(console, quiet, "auditing")
        report = audit_runs({n: RunDir(tmp / n) for n in names}, config=audit,
                            reference="non_private" if "non_private" in names and len(names) > 1 else None,
                            provenance={"task": config.task, "command": command, "model_card": card or None})
        for name in names:  # each run directory keeps its own model's view of the one audit
            single_model(report, name).to_json(tmp / name / AUDIT)
        write_audit(report, tmp, fmt="both" if pdf else "html")
    return StudyDir(Path(out))


def headline_rows(doc: dict) -> pd.DataFrame:
    """Per-label AUROC of each model and the paired differences, for the closing table."""
    rows = []
    for lab in doc["study"]["labels"] + ["macro"]:
        row = {"label": lab}
        for name, m in doc["models"].items():
            row[name] = m["utility"]["macro_auroc"] if lab == "macro" else m["utility"]["labels"][lab]["auroc"]
        for cname, c in doc["comparisons"].items():
            row[cname] = c["macro_auroc_difference"] if lab == "macro" else c["labels"][lab]["auroc_difference"]
        rows.append(row)
    return pd.DataFrame(rows)
