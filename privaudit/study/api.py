"""The public Python API: ``privaudit.train``, ``audit``, ``train_and_audit``, ``sweep``, ``attack``, ``report``
and ``load_audit``.

Keyword arguments are named like the CLI options (``epsilon``, ``n_samples``, ``image_size``, ``epochs``,
``width``, ``attributes``, ``n_boot``, ``out``, ...), or take config objects (``TrainConfig``, ``AuditConfig``,
``DataSpec``). Nothing is printed unless asked (``progress=True`` shows progress bars and steps on stderr;
a callable receives each step's text), and nothing reads ``sys.argv``. Errors are
:class:`~privaudit.errors.PrivauditError` subclasses with a one-line message.

>>> import privaudit
>>> study = privaudit.train_and_audit("cxr", out="runs/s", n_samples=600, image_size=32, epochs=1, width=8)
>>> study.to_frame()                                   # every estimate of the audit, one row each
>>> res = privaudit.audit({"mine": df}, attributes=["sex"], n_boot=200)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from privaudit.config import AuditConfig, TrainConfig
from privaudit.errors import ConfigError
from privaudit.study.data import DataSpec
from privaudit.study.dirs import AUDIT, RunDir, StudyDir

Progress = bool | Callable[[str], None]
_DATA_OPTIONS = ("preset", "labels", "views", "n_samples", "controls", "label_from", "uncertain", "blank",
                 "no_finding")
_AUDIT_OPTIONS = {f.name for f in dataclasses.fields(AuditConfig)}


def _progress(progress: Progress):
    """(console, quiet) for the library functions: a stderr Console for True, the callable itself, or nothing."""
    if progress is True:
        from rich.console import Console

        return Console(stderr=True), False
    if callable(progress) or callable(getattr(progress, "print", None)):  # a callback, or a rich Console
        return progress, False
    return None, True


def _default_out(task: str, backend: str) -> Path:
    return Path("runs") / f"{task}-{backend}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _audit_config(audit: AuditConfig | None, options: dict, *, seed: int = 0) -> AuditConfig:
    """An AuditConfig from a given one and/or the audit's keyword options (n_boot, ci, attributes, ...)."""
    from privaudit.tasks import AGE_EDGES, parse_age_edges

    opts = {k: v for k, v in options.items() if v is not None}
    if "age_bins" in opts:
        bins = opts.pop("age_bins")
        opts["age_edges"] = parse_age_edges(bins) if isinstance(bins, str) else tuple([0, *bins])
    if isinstance(opts.get("attributes"), str):
        opts["attributes"] = tuple(a.strip() for a in opts["attributes"].split(",") if a.strip())
    elif opts.get("attributes") is not None:
        opts["attributes"] = tuple(opts["attributes"])
    unknown = sorted(set(opts) - _AUDIT_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown audit option {unknown[0]!r}; valid: {', '.join(sorted(_AUDIT_OPTIONS | {'age_bins'}))}")
    if audit is not None:
        return dataclasses.replace(audit, **opts) if opts else audit
    opts.setdefault("seed", seed)
    opts.setdefault("age_edges", AGE_EDGES)
    return AuditConfig(**opts)


def _split(options: dict) -> tuple[dict, dict, dict]:
    """Split keyword options into training, data and audit options."""
    data = {k: options.pop(k) for k in _DATA_OPTIONS if k in options}
    audit = {k: options.pop(k) for k in list(options) if k in _AUDIT_OPTIONS - {"seed"} or k == "age_bins"}
    return options, data, audit


def _train_config(task: str, config: TrainConfig | None, options: dict) -> TrainConfig:
    if config is not None:
        if options:
            dp_opts = {k: options.pop(k) for k in list(options) if k in ("epsilon", "delta", "noise_multiplier",
                                                                          "max_grad_norm", "accountant")}
            cfg = dataclasses.replace(config, **options)
            return dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, **dp_opts)) if dp_opts else cfg
        return config
    return TrainConfig.for_task(task, **options)


def _data_spec(data, opts: dict, seed: int) -> DataSpec:
    if isinstance(data, DataSpec):
        return dataclasses.replace(data, **{k: v for k, v in opts.items() if v is not None}) if opts else data
    return DataSpec(path=Path(data) if data is not None else None, seed=seed,
                    **{k: v for k, v in opts.items() if v is not None})


def train(task: str = "cxr", *, data=None, out=None, config: TrainConfig | None = None, force: bool = False,
          progress: Progress = False, command: str | None = None, **options) -> RunDir:
    """Train one model into a run directory and return it (:class:`~privaudit.study.dirs.RunDir`).

    ``data``: a manifest.csv, a dataset folder (CheXpert, NIH, MIMIC-CXR-JPG, MSD), a DataSpec, or None for a
    synthetic cohort of ``n_samples``. ``options``: the CLI's training options by name (``epsilon``, ``dp=False``,
    ``epochs``, ``batch_size``, ``image_size``, ``width``, ``clipping``, ``canaries``, ``seed``, ...) and the
    data options (``preset``, ``labels``, ``views``, ``n_samples``, ``controls``, ``label_from``, and the
    chexpert/mimic label policies ``uncertain`` = "ignore" | "zeros" | "ones", ``blank`` = "unknown" | "negative",
    ``no_finding`` = "negative" | "ignore").
    """
    from privaudit.study.runs import train as _train

    options, data_opts, _ = _split(dict(options))
    cfg = _train_config(task, config, options)
    console, quiet = _progress(progress)
    out = Path(out) if out is not None else _default_out(cfg.task, cfg.backend)
    return _train(cfg, _data_spec(data, data_opts, cfg.seed), out, force=force, command=command, console=console,
                  quiet=quiet)


def train_and_audit(task: str = "cxr", *, data=None, out=None, config: TrainConfig | None = None,
                    audit: AuditConfig | None = None, baseline: bool = True, pretrain: bool = False,
                    pdf: bool = False, model_card=None, force: bool = False, progress: Progress = False,
                    command: str | None = None, **options) -> StudyDir:
    """The main job: train the DP model and its non-private baseline, audit both as one study, write the study
    directory (``private/``, ``non_private/``, ``audit.json``, ``report.html``) and return it
    (:class:`~privaudit.study.dirs.StudyDir`: ``.audit``, ``.to_frame()``, ``.runs``).

    ``options`` are :func:`train`'s plus the audit's (``n_boot``, ``ci``, ``attributes``, ``threshold``, ...).
    """
    from privaudit.study.runs import train_and_audit as _taa

    options, data_opts, audit_opts = _split(dict(options))
    cfg = _train_config(task, config, options)
    console, quiet = _progress(progress)
    out = Path(out) if out is not None else _default_out(cfg.task, cfg.backend)
    return _taa(cfg, _data_spec(data, data_opts, cfg.seed), out, baseline=baseline, pretrain=pretrain,
                audit=_audit_config(audit, audit_opts, seed=cfg.seed), force=force, pdf=pdf, model_card=model_card,
                command=command, console=console, quiet=quiet)


def sweep(task: str = "cxr", *, epsilons="1,3,8,inf", seeds: int = 1, data=None, out=None,
          config: TrainConfig | None = None, audit: AuditConfig | None = None, executor: str = "local",
          ray_address: str | None = None, jobs: int | None = None, progress: Progress = False,
          command: str | None = None, **options) -> StudyDir:
    """The paper's trade-off study: one model per (epsilon, seed), audited as one study (resumable: an
    existing sweep at ``out`` trains only its missing runs). ``epsilons``: "1,3,8,inf,clip" or a list."""
    from privaudit.study.sweep import parse_epsilons, run_sweep

    if not isinstance(epsilons, str):
        epsilons = ",".join(str(e) for e in epsilons)
    options, data_opts, audit_opts = _split(dict(options))
    for key in ("epsilon", "noise_multiplier", "dp"):
        if key in options:
            raise ConfigError(f"{key} is set per run by epsilons in a sweep; leave it out")
    cfg = _train_config(task, config, options)
    console, quiet = _progress(progress)
    out = Path(out) if out is not None else _default_out(cfg.task, cfg.backend)
    return run_sweep(cfg, _data_spec(data, data_opts, cfg.seed), out, points=parse_epsilons(epsilons), seeds=seeds,
                     executor=executor, ray_address=ray_address, jobs=jobs,
                     audit=_audit_config(audit, audit_opts, seed=cfg.seed), command=command, console=console,
                     quiet=quiet)


def audit(source=None, *, out=None, reference: str | None = None, config: AuditConfig | None = None,
          checkpoint=None, data=None, task: str = "cxr", arch: str = "resnet9-gn", backend: str | None = None,
          image_size: int | None = None, trust_checkpoint: bool = False, preprocess=None, force: bool = False,
          command: str | None = None, **options):
    """Audit models and return the result (:class:`~privaudit.audit.results.AuditReport`: ``.to_frame()``,
    ``.to_json()``, ``.models``, ``.warnings``).

    ``source`` is a run, study or sweep directory (audited in place, as ``privaudit audit DIR``), or prediction
    tables keyed by model name (pandas DataFrames or paths in the predictions.csv schema; written to ``out``
    only when it is given), or a list of prediction files (named by their stems). ``checkpoint`` + ``data``
    audit weights trained elsewhere into the run directory ``out``: a state_dict or ``.safetensors`` of
    ``arch`` (privaudit's own, or ``torchvision:<model>``, ``timm:<model>``, ``monai:<model>``), an ``.onnx``
    file, TorchScript (``trust_checkpoint=True``) or a ``.keras`` file; ``preprocess`` (a TOML path, a dict or a
    PreprocessCard) says how an ONNX or library model reads its inputs and which output is which label.
    ``options``: ``n_boot``, ``ci``, ``seed``, ``attributes``, ``age_bins``, ``threshold``, ``margin``,
    ``cluster``, ``ci_method``, ...; with a checkpoint also the data options of :func:`train` (``preset``,
    ``labels``, ``uncertain``, ``blank``, ``no_finding``, ...).
    """
    from privaudit.study import runs

    data_opts = {k: options.pop(k) for k in _DATA_OPTIONS if k in options}
    cfg = _audit_config(config, options)
    if preprocess is not None and checkpoint is None:
        raise ConfigError("preprocess (a preprocessing card) applies to a checkpoint audit: give checkpoint= and "
                          "data=")
    if data_opts and checkpoint is None:
        raise ConfigError(f"{next(iter(data_opts))} is a data option: it applies to a checkpoint audit, whose data "
                          "are loaded; a run directory is audited on the data it recorded")
    if checkpoint is not None:
        if source is not None:
            raise ConfigError("give a source or a checkpoint, not both")
        if out is None:
            raise ConfigError("a checkpoint audit needs out: the run directory it writes")
        spec = _data_spec(data, data_opts, cfg.seed)
        return runs.audit_checkpoint(Path(checkpoint), spec, Path(out), task=task, arch=arch, backend=backend,
                                     image_size=image_size, trust=trust_checkpoint, config=cfg, force=force,
                                     command=command, preprocess=preprocess)
    if isinstance(source, pd.DataFrame):
        source = {"model": source}
    if isinstance(source, (list, tuple)):
        source = {Path(p).stem: p for p in source}
        if len(source) != len(set(source)):
            raise ConfigError("prediction files with the same stem; pass a dict of distinct model names")
    if isinstance(source, Mapping):
        return runs.audit_frames(dict(source), config=cfg, reference=reference,
                                 out=Path(out) if out is not None else None, force=force, command=command)
    if source is None:
        raise ConfigError("give a run or study directory, prediction tables, or a checkpoint to audit")
    if out is not None:
        raise ConfigError("a run or study directory is audited in place; leave out out")
    return runs.audit_dir(Path(source), config=cfg, command=command)


def attack(name: str, run, *, shadows: int | None = None, references: int | None = None, offline: bool = False,
           jobs: int | None = None, executor: str = "local", ray_address: str | None = None, seed: int = 0,
           n_boot: int = 1000, min_cell: int = 10, config: AuditConfig | None = None, progress: Progress = False,
           command: str | None = None):
    """Train shadow (``lira``) or reference (``rmia``) models with the run's own backend, configuration and
    exactly its data, add the attack to the run's audit, and return that audit."""
    from privaudit.audit.attacks import create_attack
    from privaudit.study.shadows import run_attack

    kind = create_attack(name, **({"offline": offline} if name == "lira" else {})).models
    k = shadows if kind == "shadows" else references
    if kind is not None and k is None:
        raise ConfigError("give the number of models: shadows=K for lira, references=K for rmia")
    if not Path(run).is_dir():
        raise ConfigError(f"{run}: not a run directory")
    console, quiet = _progress(progress)
    cfg = config or AuditConfig(n_boot=n_boot, seed=seed, min_cell=min_cell)
    return run_attack(Path(run), name, k or 0, offline=offline, jobs=jobs, executor=executor,
                      ray_address=ray_address, seed=seed, audit_config=cfg, command=command, console=console,
                      quiet=quiet)


def load_audit(source):
    """Read an ``audit.json`` (or the one in a run or study directory) as an AuditReport."""
    from privaudit.audit.results import AuditReport
    from privaudit.errors import DataError

    path = Path(source)
    path = path / AUDIT if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path}: not found; give a study directory or an audit.json")
    return AuditReport.from_json(path)


def report(source, *, fmt: str = "html", out=None, policy=None, model_card=None, template=None,
           force: bool = False) -> list[Path]:
    """Render report.html and/or report.pdf from an audit.json (or a study directory) alone; returns the paths."""
    from privaudit.limits import check_out_parent
    from privaudit.reports import write_report

    if out is not None:
        check_out_parent(Path(out))
    path = Path(source)
    path = path / AUDIT if path.is_dir() else path
    load_audit(path)
    return write_report(path, Path(out) if out else None, template_dir=Path(template) if template else None,
                        fmt=fmt, policy=Path(policy) if policy else None,
                        model_card=Path(model_card) if model_card else None, force=force)


def verify_dp(task: str = "cxr", *, data=None, out=None, gradient_canaries: int = 1000, confidence: float = 0.99,
              canary_seed: int = 0, config: TrainConfig | None = None, progress: Progress = False,
              **options) -> dict:
    """White-box test of the DP pipeline in one run (``privaudit verify-dp``): returns verify.json's content,
    whose ``verdict`` is "violation" or "no violation detected". ``options`` are :func:`train`'s."""
    from privaudit.study.runs import verify

    options, data_opts, _ = _split(dict(options))
    cfg = _train_config(task, config, options)
    console, quiet = _progress(progress)
    if out is None:
        raise ConfigError("out: give a folder for verify.json")
    return verify(cfg, _data_spec(data, data_opts, cfg.seed), Path(out), gradient_canaries=gradient_canaries,
                  confidence=confidence, canary_seed=canary_seed, console=console, quiet=quiet)
