"""The ``privaudit`` command line: parse, validate into config objects, call one library function, print.

Bad input (any :class:`~privaudit.errors.PrivauditError`) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from privaudit._console import plain, print_error, safe
from privaudit._version import __version__
from privaudit.config import AuditConfig, TrainConfig
from privaudit.errors import PrivauditError

app = typer.Typer(
    name="privaudit",
    help="Train and audit medical-imaging models: differential privacy, fairness and accuracy, with evidence.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Make and inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=False)
err_console = Console(stderr=True)


class Accountant(str, Enum):
    prv = "prv"
    rdp = "rdp"
    gdp = "gdp"


class Clipping(str, Enum):
    hooks = "hooks"
    ew = "ew"
    ghost = "ghost"
    fast = "fast"


def _command() -> str:
    """The command line as typed, for provenance (the library never reads sys.argv itself)."""
    import shlex

    return " ".join(shlex.quote(a) for a in ["privaudit", *sys.argv[1:]]) if sys.argv else "privaudit"


# Library messages speak of parameters (batch_size, dp=False); on the command line they are flags.
_PARAM_FLAGS = {"dp=False": "--no-dp", "shadows=K": "--shadows K", "references=K": "--references K",
                "ray_address": "--ray-address", "jobs": "--jobs"}


def flag_text(message: str, params) -> str:
    """``message`` with the command's parameter names written as its flags: names with an underscore anywhere
    (unambiguous), one-word names where the message starts with them ("epochs must be at least 1")."""
    for param, flag in _PARAM_FLAGS.items():
        message = re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w=])", flag, message)
    for name in sorted(params, key=len, reverse=True):
        flag = "--" + name.replace("_", "-")
        if "_" in name:
            message = re.sub(rf"(?<![\w-]){name}(?!\w)", flag, message)
        elif message.startswith(name + " "):
            message = message.replace(name, flag, 1)
    return message


DEBUG_ENV = "PRIVAUDIT_DEBUG"   # =1: an unexpected exception shows its traceback instead of one line


def _unexpected(e: Exception) -> str:
    """One line for an exception that is not a PrivauditError: a file-system error names its file, anything else
    is privaudit's fault and says how to see the traceback."""
    if isinstance(e, OSError) and (e.filename or e.strerror):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or type(e).__name__}; check the path and its permissions"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return (f"internal error ({type(e).__name__}{': ' + text[:300] if text else ''}); please report it "
            f"({DEBUG_ENV}=1 shows the traceback)")


def handle_errors(fn):
    """Turn user errors into one line on stderr and exit code 2; Ctrl-C into exit code 130. Any other exception
    is one line and exit code 2 too (``PRIVAUDIT_DEBUG=1`` re-raises it), so that no command, ``check`` above
    all, exits 1 on a crash."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrivauditError as e:
            import inspect

            params = [n for n in inspect.signature(fn).parameters if n not in ("task", "source", "run_dir", "attack")]
            print_error(err_console, flag_text(str(e), params))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:   # never a traceback, and never exit 1 (which `check` means as "policy failed")
            if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
                raise
            print_error(err_console, _unexpected(e))
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool):
    if value:
        console.print(f"privaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(ctx: typer.Context,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    """privaudit: private, fair and accurate medical-imaging models, and the evidence for it."""
    if ctx.invoked_subcommand not in (None, "train", "verify-dp"):
        from privaudit.backends.distributed import launch_env

        try:
            launched = launch_env() is not None
        except PrivauditError:
            launched = True
        if launched:   # every torchrun process runs the command; only these two know how to share the work
            print_error(err_console, f"under torchrun only 'privaudit train' and 'verify-dp' run data-parallel; "
                                     f"run 'privaudit "
                                     f"{ctx.invoked_subcommand}' as a single process (train, then audit the run)")
            raise typer.Exit(2)


# ---- shared options ------------------------------------------------------------------------------------------
Backend_ = Annotated[str, typer.Option("--backend", "-b", help="Training backend: opacus (PyTorch + Opacus) or tf "
                                        "(TensorFlow + TF-Privacy, an extra: see README).")]
Data_ = Annotated[Optional[Path], typer.Option("--data", help="A manifest.csv or a dataset folder (CheXpert, NIH, "
                                               "MIMIC-CXR-JPG; for pdac an MSD Task07_Pancreas folder or its "
                                               "parent). Default: a freshly synthesised cohort.")]
Preset_ = Annotated[Optional[str], typer.Option("--preset", help="Force a layout: manifest, chexpert, nih, mimic, "
                                                "msd (default: detected).")]
Controls_ = Annotated[Optional[Path], typer.Option("--controls", help="msd preset: folder of tumour-free CT volumes "
                                                   "(NIfTI, e.g. NIH Pancreas-CT converted), the negatives; site is "
                                                   "then the source, a shortcut the audit shows.")]
LabelFrom_ = Annotated[Optional[str], typer.Option("--label-from", help="msd preset: segmentation (default: a case "
                                                   "is a tumour scan when its label map holds the tumour class, "
                                                   "else refused) or dataset (every MSD case positive, maps unread).",
                                                   metavar="segmentation|dataset")]
Uncertain_ = Annotated[Optional[str], typer.Option("--uncertain", help="chexpert and mimic presets: what an uncertain "
                                                   "(-1) finding becomes: ignore (default, U-Ignore: unknown, left out "
                                                   "of loss and metrics), zeros (U-Zeros: negative) or ones (U-Ones: "
                                                   "positive).", metavar="ignore|zeros|ones")]
Blank_ = Annotated[Optional[str], typer.Option("--blank", help="chexpert and mimic presets: what a blank finding (not "
                                               "mentioned in the report) becomes: unknown (default) or negative.",
                                               metavar="unknown|negative")]
NoFinding_ = Annotated[Optional[str], typer.Option("--no-finding", help="chexpert and mimic presets: negative "
                                                   "(default, as torchxrayvision: a positive No Finding makes the row's "
                                                   "blank findings negative) or ignore (No Finding is not read).",
                                                   metavar="negative|ignore")]
Labels_ = Annotated[Optional[str], typer.Option("--labels", help="Comma-separated subset of the task's labels.")]
Views_ = Annotated[str, typer.Option("--views", help="frontal (default) or all.")]
Epsilon_ = Annotated[Optional[float], typer.Option("--epsilon", help="Target epsilon (default 8 unless "
                                                   "--noise-multiplier is given).")]
Delta_ = Annotated[Optional[float], typer.Option("--delta", help="Delta (default 1/N^1.1 rounded down, N = training "
                                                 "samples).")]
Noise_ = Annotated[Optional[float], typer.Option("--noise-multiplier", help="Use this noise multiplier instead of "
                                                 "a target epsilon.")]
Clip_ = Annotated[float, typer.Option("--max-grad-norm", help="Per-sample clipping norm C.")]
Acc_ = Annotated[Accountant, typer.Option("--accountant", help="Privacy accountant.")]
Clipping_ = Annotated[Clipping, typer.Option("--clipping", help="Per-sample clipping engine (opacus backend): "
                      "Opacus' hooks, ew (expanded weights) or ghost modes, or fast (privaudit's engine: the same "
                      "clipped, noised gradient and epsilon at close to non-private speed; models with other "
                      "layers than Linear, Conv, GroupNorm and Embedding fall back to hooks). Library networks "
                      "(--arch torchvision:...) use fast under hooks where it covers them.")]
Unit_ = Annotated[Optional[str], typer.Option("--privacy-unit", metavar="patient|image", help="What differential privacy "
                  "protects: patient (every image of a patient, sampled, clipped and counted together) or image. "
                  "Default: patient whenever a patient has more than one training image (else the two are the same). "
                  "--batch-size counts this unit.")]
MaxImages_ = Annotated[Optional[int], typer.Option("--max-images-per-patient", help="Train on at most K "
                       "images per patient, chosen at random (seeded) before training; bounds a patient's share of "
                       "the data (MIMIC has patients with 100+ images). Default: all images.")]
NoDP_ = Annotated[bool, typer.Option("--no-dp", help="Train without differential privacy.")]
Epochs_ = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs (default: the task's; cxr 5, "
                                                "pdac 15).")]
Batch_ = Annotated[Optional[int], typer.Option("--batch-size", help="Logical (expected) batch size, in privacy "
                                               "units (patients under patient-level DP) (default: the task's; cxr "
                                               "64, pdac 16).")]
PBatch_ = Annotated[Optional[int], typer.Option("--physical-batch-size", help="Largest batch held in memory at "
                                                "once, in images (default: the batch size, raised under patient-level"
                                                " DP to the largest patient's images).")]
Size_ = Annotated[Optional[int], typer.Option("--image-size", help="Input edge in pixels or voxels (default: the "
                                              "task's; cxr 64, pdac 32).")]
NSamples_ = Annotated[Optional[int], typer.Option("--n-samples", help="Size of the synthetic cohort when --data is "
                                                  "not given (default: the task's; cxr 3000, pdac 400).")]
Width_ = Annotated[Optional[int], typer.Option("--width", help="Channels of the network's first stage (default: the "
                                               "task's; cxr 32, pdac 16; privaudit's own architectures only).")]
Arch_ = Annotated[Optional[str], typer.Option("--arch", help="Architecture (default: the task's; resnet9-gn for cxr, "
                                              "cnn3d-gn for pdac), or a network from a library: "
                                              "torchvision:densenet121, timm:resnet18, monai:DenseNet121 (2D or "
                                              "3D from the task; needs privaudit\\[models]). Library networks get "
                                              "GroupNorm in place of BatchNorm for DP training.")]
LR_ = Annotated[Optional[float], typer.Option("--lr", help="NAdam learning rate (default: the task's; cxr 2e-3, "
                                              "pdac 5e-4).")]
Seed_ = Annotated[int, typer.Option("--seed", help="Random seed (data split, initialisation, sampling).")]
Init_ = Annotated[Optional[Path], typer.Option("--init", help="Start from these weights: a state_dict (read with "
                  "weights_only=True) or a .safetensors file. For a library network (--arch torchvision:...) they "
                  "are loaded before any BatchNorm replacement; RGB weights are summed to one channel and a "
                  "classifier of another size (ImageNet's) starts afresh, both recorded in train.json.")]
Device_ = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
Canaries_ = Annotated[int, typer.Option("--canaries", help="Insert this many canaries (each trained on with "
                                        "probability 1/2) for the one-run empirical epsilon: canary patients of 1 to 4 "
                                        "images under the patient unit, single images (volumes for pdac) otherwise.")]
ModelCard_ = Annotated[Optional[Path], typer.Option("--model-card", help="Model card (TOML: description, "
                     "intended_use, out_of_scope, limitations, ...) for the report's model section; see "
                     "examples/model_card.toml.")]
Force_ = Annotated[bool, typer.Option("--force", help="Replace what --out already holds.")]
Quiet_ = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
NBoot_ = Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples.")]
CI_ = Annotated[float, typer.Option("--ci", help="Confidence level of the intervals.")]
MinCell_ = Annotated[int, typer.Option("--min-cell", help="Smallest group, in patients, whose counts and metrics "
                                       "are shown; smaller groups are suppressed, as in health statistics.")]


def _labels(text: str | None):
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


def _default_out(task: str, backend: str) -> Path:
    from privaudit.study.api import _default_out as default

    return default(task, backend)


def _check_arch(task: str, backend: str, arch: str | None) -> None:
    """Fail on a library network's name (torchvision:, timm:, monai:) before any data is read."""
    if not arch or ":" not in arch:
        return
    from privaudit.errors import ConfigError

    if backend != "opacus":
        raise ConfigError(f"--arch {arch}: library networks run on the opacus backend (PyTorch); use "
                          f"--backend opacus, or one of the {backend} backend's own architectures")
    from privaudit.backends.zoo import check_zoo_name
    from privaudit.tasks import create_task

    check_zoo_name(arch, spatial_dims=create_task(task).spatial_dims)


@contextlib.contextmanager
def _model_changes(arch: str | None):
    """For a library network: Python's ModelChangedWarning off, because the command prints train.json's
    warnings (the same line) as ``warning: ...`` once training is done."""
    if not arch or ":" not in arch:
        yield
        return
    import warnings

    from privaudit.backends.zoo import ModelChangedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModelChangedWarning)
        yield


def _print_train_warnings(infos) -> None:
    for info in infos:
        for w in (info or {}).get("warnings") or []:
            err_console.print(plain(f"warning: {w}"), highlight=False, soft_wrap=True)


def _train_config(task, backend, arch, width, image_size, epochs, batch_size, physical_batch_size, lr, seed, device,
                  init, no_dp, epsilon, delta, noise_multiplier, max_grad_norm, accountant, canaries=0,
                  clipping=Clipping.hooks, privacy_unit=None, max_images_per_patient=None) -> TrainConfig:
    """The options as a TrainConfig; what is left out takes the task's defaults (TrainConfig.for_task)."""
    _check_arch(task, backend, arch)
    return TrainConfig.for_task(task, backend=backend, arch=arch, width=width, image_size=image_size, epochs=epochs,
                                batch_size=batch_size, physical_batch_size=physical_batch_size, lr=lr, seed=seed,
                                device=device, init=init, canaries=canaries, clipping=Clipping(clipping).value,
                                dp=not no_dp, epsilon=epsilon, delta=delta, noise_multiplier=noise_multiplier,
                                max_grad_norm=max_grad_norm, accountant=Accountant(accountant).value,
                                privacy_unit=privacy_unit,
                                max_images_per_patient=max_images_per_patient)


def _data(task, data, preset, labels, views, n_samples, seed, controls, label_from, uncertain=None, blank=None,
          no_finding=None):
    from privaudit.study.data import DataSpec

    return DataSpec(path=data, preset=preset, labels=_labels(labels), views=views, n_samples=n_samples, seed=seed,
                    controls=controls, label_from=label_from, uncertain=uncertain, blank=blank, no_finding=no_finding)


def _audit_json(source: Path) -> Path:
    """The audit.json of a study or run directory, or the file itself."""
    from privaudit.errors import DataError

    path = source / "audit.json" if source.is_dir() else source
    if not path.is_file():
        raise DataError(f"{path}: not found; give a study directory or an audit.json")
    return path


def _print_headline(doc: dict) -> None:
    from privaudit.reports.format import format_ci as _ci

    table = Table(title=plain(f"privaudit: {doc['study'].get('task') or 'study'} (test AUROC, 95% CI)"))
    table.add_column("label")
    for name in doc["models"]:   # names come from data (--name, file stems): never parsed as markup
        table.add_column(plain(name))
    for cname in doc["comparisons"]:
        table.add_column(plain(cname.replace(" vs ", " - ")))
    eps_row = ["epsilon"]
    for m in doc["models"].values():
        acc = m["privacy"]["accountant"]
        eps_row.append(plain(f"{acc['epsilon']:.2f} ({acc['accountant']}, δ={acc['delta']:.0e})" if acc
                             else "∞ (no DP)"))
    table.add_row(*eps_row, *[""] * len(doc["comparisons"]))
    labels = doc["study"]["labels"]
    for lab in labels + ["macro"]:
        row = [plain(lab)]
        for m in doc["models"].values():
            row.append(_ci(m["utility"]["macro_auroc"] if lab == "macro" else m["utility"]["labels"][lab]["auroc"]))
        for c in doc["comparisons"].values():
            row.append(_ci(c["macro_auroc_difference"] if lab == "macro" else c["labels"][lab]["auroc_difference"]))
        table.add_row(*row, style="bold" if lab == "macro" else None)
    console.print(table)


# ---- commands ------------------------------------------------------------------------------------------------
@app.command("train-and-audit")
@handle_errors
def train_and_audit_cmd(
    task: Annotated[str, typer.Argument(help="Task: cxr or pdac.")],
    backend: Backend_ = "opacus",
    data: Data_ = None,
    preset: Preset_ = None,
    controls: Controls_ = None,
    label_from: LabelFrom_ = None,
    uncertain: Uncertain_ = None,
    blank: Blank_ = None,
    no_finding: NoFinding_ = None,
    labels: Labels_ = None,
    views: Views_ = "frontal",
    epsilon: Epsilon_ = None,
    delta: Delta_ = None,
    noise_multiplier: Noise_ = None,
    max_grad_norm: Clip_ = 1.0,
    accountant: Acc_ = Accountant.prv,
    clipping: Clipping_ = Clipping.hooks,
    privacy_unit: Unit_ = None,
    max_images_per_patient: MaxImages_ = None,
    no_dp: NoDP_ = False,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also train the non-private model "
                                           "for comparison.")] = True,
    pretrain: Annotated[bool, typer.Option("--pretrain/--no-pretrain", help="First pretrain both models without "
                        "privacy on a separate synthetic public cohort, as the paper pretrained on public data "
                        "(cxr only).")] = False,
    epochs: Epochs_ = None,
    batch_size: Batch_ = None,
    physical_batch_size: PBatch_ = None,
    image_size: Size_ = None,
    n_samples: NSamples_ = None,
    width: Width_ = None,
    arch: Arch_ = None,
    lr: LR_ = None,
    seed: Seed_ = 0,
    init: Init_ = None,
    device: Device_ = "auto",
    canaries: Canaries_ = 0,
    n_boot: NBoot_ = 1000,
    min_cell: MinCell_ = 10,
    out: Annotated[Optional[Path], typer.Option("--out", help="Study directory (default runs/<task>-<backend>-"
                                                "<timestamp>/).")] = None,
    pdf: Annotated[bool, typer.Option("--pdf", help="Also write report.pdf (WeasyPrint).")] = False,
    model_card: ModelCard_ = None,
    force: Force_ = False,
    quiet: Quiet_ = False,
):
    """Train a DP model and its non-private baseline, audit both, and write a study directory with a report.

    Example:

        privaudit train-and-audit cxr --backend opacus --epsilon 8

        privaudit train-and-audit cxr --data CheXpert-v1.0-small/ --labels cardiomegaly,pleural_effusion
    """
    from privaudit.study.runs import train_and_audit

    cfg = _train_config(task, backend, arch, width, image_size, epochs, batch_size, physical_batch_size, lr, seed,
                        device, init, no_dp, epsilon, delta, noise_multiplier, max_grad_norm, accountant, canaries,
                        clipping, privacy_unit, max_images_per_patient)
    out = out or _default_out(task, backend)
    spec = _data(task, data, preset, labels, views, n_samples, seed, controls, label_from, uncertain, blank, no_finding)
    with _model_changes(cfg.arch):
        study = train_and_audit(cfg, spec, out, baseline=baseline, pretrain=pretrain,
                                audit=AuditConfig(n_boot=n_boot, seed=seed, min_cell=min_cell), force=force,
                                pdf=pdf, model_card=model_card, command=_command(), console=console, quiet=quiet)
    _print_train_warnings(run.train_info() for run in study.runs.values())
    doc = study.audit.data
    _print_headline(doc)
    runs = ", ".join(f"{name}/" for name in doc["models"])
    console.print(f"study written to [bold]{safe(out)}[/]: audit.json, report.html, {'report.pdf, ' if pdf else ''}"
                  f"{safe(runs)}")


class ExecutorName(str, Enum):
    local = "local"
    ray = "ray"


Executor_ = Annotated[ExecutorName, typer.Option("--executor", help="Where the independent trainings run: local "
                      "(a process pool sized to the machine, one process per GPU when there are GPUs) or ray "
                      "(Ray tasks, one GPU per task when there are GPUs).")]
RayAddress_ = Annotated[Optional[str], typer.Option("--ray-address", help="HOST:PORT of a running Ray cluster "
                        "(with --executor ray; default: start Ray on this machine).")]


@app.command("sweep")
@handle_errors
def sweep_cmd(
    task: Annotated[str, typer.Argument(help="Task: cxr or pdac.")],
    backend: Backend_ = "opacus",
    epsilons: Annotated[str, typer.Option("--epsilons", help="Comma-separated settings: target epsilons, inf (no "
                        "privacy) and clip (clipping with noise multiplier 0).")] = "1,3,8,inf",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per setting (--seed, --seed + 1, ...).")] = 1,
    data: Data_ = None,
    preset: Preset_ = None,
    controls: Controls_ = None,
    label_from: LabelFrom_ = None,
    uncertain: Uncertain_ = None,
    blank: Blank_ = None,
    no_finding: NoFinding_ = None,
    labels: Labels_ = None,
    views: Views_ = "frontal",
    delta: Delta_ = None,
    max_grad_norm: Clip_ = 1.0,
    accountant: Acc_ = Accountant.prv,
    clipping: Clipping_ = Clipping.hooks,
    privacy_unit: Unit_ = None,
    max_images_per_patient: MaxImages_ = None,
    epochs: Epochs_ = None,
    batch_size: Batch_ = None,
    physical_batch_size: PBatch_ = None,
    image_size: Size_ = None,
    n_samples: NSamples_ = None,
    width: Width_ = None,
    arch: Arch_ = None,
    lr: LR_ = None,
    seed: Seed_ = 0,
    init: Init_ = None,
    device: Device_ = "auto",
    canaries: Canaries_ = 0,
    n_boot: NBoot_ = 1000,
    min_cell: MinCell_ = 10,
    executor: Executor_ = ExecutorName.local,
    ray_address: RayAddress_ = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="Processes of the local pool (default: one per "
                    "GPU, else one per CPU core).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Sweep directory (default runs/<task>-<backend>-"
                                                "<timestamp>/). Give an existing sweep to resume it.")] = None,
    quiet: Quiet_ = False,
):
    """Train one model per (epsilon, seed) on the same data and splits, and audit them all as one study: the
    paper's privacy-utility and privacy-fairness trade-offs. A failed or interrupted sweep resumes when run
    again with the same --out: finished runs are kept and not redone.

    Example:

        privaudit sweep cxr --backend opacus --epsilons 1,3,8,inf --seeds 3 --out runs/sweep

        privaudit sweep cxr --epsilons 1,8,inf,clip --executor ray --ray-address 10.0.0.5:6379 --out runs/sweep
    """
    from privaudit.errors import ConfigError
    from privaudit.study.sweep import parse_epsilons, run_sweep, summary_table

    points = parse_epsilons(epsilons)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    if ray_address and executor != ExecutorName.ray:
        raise ConfigError("--ray-address needs --executor ray")
    cfg = _train_config(task, backend, arch, width, image_size, epochs, batch_size, physical_batch_size, lr, seed,
                        device, init, False, None, delta, None, max_grad_norm, accountant, canaries,
                        clipping, privacy_unit, max_images_per_patient)
    out = out or _default_out(task, backend)
    spec = _data(task, data, preset, labels, views, n_samples, seed, controls, label_from, uncertain, blank, no_finding)
    study = run_sweep(cfg, spec, out, points=points, seeds=seeds, executor=executor.value, ray_address=ray_address,
                      jobs=jobs, audit=AuditConfig(n_boot=n_boot, seed=seed, min_cell=min_cell), command=_command(), console=console,
                      quiet=quiet)
    doc = study.audit.data
    console.print(summary_table(doc))
    macro = (doc["study"].get("trade_offs") or {}).get("macro_auroc") or {}
    if macro.get("r") is not None:
        console.print(f"Pearson's r of log(ε) vs macro AUROC: {macro['r']:.3f} (p = {macro['p_value']:.3g}, "
                      f"n = {macro['n']} models)")
    console.print(f"sweep written to [bold]{safe(out)}[/]: audit.json, report.html, {len(doc['models'])} run "
                  "directories")


@app.command("train")
@handle_errors
def train_cmd(
    task: Annotated[str, typer.Argument(help="Task: cxr or pdac.")],
    backend: Backend_ = "opacus",
    data: Data_ = None,
    preset: Preset_ = None,
    controls: Controls_ = None,
    label_from: LabelFrom_ = None,
    uncertain: Uncertain_ = None,
    blank: Blank_ = None,
    no_finding: NoFinding_ = None,
    labels: Labels_ = None,
    views: Views_ = "frontal",
    epsilon: Epsilon_ = None,
    delta: Delta_ = None,
    noise_multiplier: Noise_ = None,
    max_grad_norm: Clip_ = 1.0,
    accountant: Acc_ = Accountant.prv,
    clipping: Clipping_ = Clipping.hooks,
    privacy_unit: Unit_ = None,
    max_images_per_patient: MaxImages_ = None,
    no_dp: NoDP_ = False,
    epochs: Epochs_ = None,
    batch_size: Batch_ = None,
    physical_batch_size: PBatch_ = None,
    image_size: Size_ = None,
    n_samples: NSamples_ = None,
    width: Width_ = None,
    arch: Arch_ = None,
    lr: LR_ = None,
    seed: Seed_ = 0,
    init: Init_ = None,
    device: Device_ = "auto",
    canaries: Canaries_ = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<task>-<backend>-"
                                                "<timestamp>/).")] = None,
    force: Force_ = False,
    quiet: Quiet_ = False,
):
    """Train one model into a run directory: model/, train.json, predictions.csv, config.json.

    Example:

        privaudit train cxr --data manifest.csv --epsilon 3 --out runs/eps3
    """
    from privaudit.study.runs import train

    cfg = _train_config(task, backend, arch, width, image_size, epochs, batch_size, physical_batch_size, lr, seed,
                        device, init, no_dp, epsilon, delta, noise_multiplier, max_grad_norm, accountant, canaries,
                        clipping, privacy_unit, max_images_per_patient)
    out = out or _default_out(task, backend)
    spec = _data(task, data, preset, labels, views, n_samples, seed, controls, label_from, uncertain, blank, no_finding)
    from privaudit.backends.distributed import rank_zero_out

    # under torchrun only rank 0 writes --out; the others use scratch
    with rank_zero_out(out) as target, _model_changes(cfg.arch):
        run = train(cfg, spec, target, force=force, command=_command(), console=console, quiet=quiet)
    if run is None:   # a torchrun rank other than 0
        return
    info = run.train_info()
    _print_train_warnings([info])
    eps = f"ε = {info['epsilon']:.2f} (δ = {info['delta']:.0e}, {info['accountant']})" if info["dp"] else "no DP"
    console.print(f"run written to [bold]{safe(out)}[/]: {info['steps']} steps, {eps}")


@app.command("audit")
@handle_errors
def audit_cmd(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run directory written by 'privaudit train'.")] = None,
    predictions: Annotated[Optional[list[Path]], typer.Option("--predictions", help="A prediction file "
                           "(repeatable); any tool's, in the predictions.csv schema.")] = None,
    name: Annotated[Optional[list[str]], typer.Option("--name", help="Model name per --predictions file "
                    "(default: the file stem).")] = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Model the others are compared "
                         "against.")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Weights trained elsewhere: a "
                          "state_dict or .safetensors (privaudit's or a library architecture, see --arch), an .onnx "
                          "file (run with onnxruntime, no trust flag needed), TorchScript with --trust-checkpoint, "
                          "or a Keras .keras file.")] = None,
    data: Data_ = None,
    preset: Preset_ = None,
    controls: Controls_ = None,
    label_from: LabelFrom_ = None,
    uncertain: Uncertain_ = None,
    blank: Blank_ = None,
    no_finding: NoFinding_ = None,
    labels: Labels_ = None,
    task: Annotated[str, typer.Option("--task", help="Task of the checkpoint: cxr or pdac.")] = "cxr",
    arch: Annotated[str, typer.Option("--arch", help="Architecture of the checkpoint: privaudit's own, or a "
                    "library network such as torchvision:densenet121, timm:resnet18, monai:DenseNet121 (needs "
                    "privaudit\\[models]). Ignored for an .onnx file.")] = "resnet9-gn",
    preprocess: Annotated[Optional[Path], typer.Option("--preprocess", help="Preprocessing card (TOML) for a model "
                          "trained elsewhere: input size, channels, scaling, output activation and which model "
                          "output is which label (\\[output.map]). For .onnx checkpoints and library "
                          "architectures; default: privaudit's own preprocessing.")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", "-b", help="Backend that loads the checkpoint "
                       "(default: tf for a .keras file, else opacus).")] = None,
    image_size: Size_ = None,
    trust_checkpoint: Annotated[bool, typer.Option("--trust-checkpoint", help="Allow TorchScript checkpoints, "
                                "which contain code: only for files you trust.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output directory (for --predictions and "
                                                "--checkpoint).")] = None,
    n_boot: NBoot_ = 1000,
    min_cell: MinCell_ = 10,
    ci: CI_ = 0.95,
    seed: Seed_ = 0,
    cluster: Annotated[bool, typer.Option("--cluster/--no-cluster", help="Resample patients rather than images "
                                          "when patient_id repeats.")] = True,
    ci_method: Annotated[str, typer.Option("--ci-method", help="percentile, or bca for the AUROCs.")] = "percentile",
    attributes: Annotated[Optional[str], typer.Option("--attributes", help="Comma-separated attributes to audit "
                          "(default: the known attribute columns sex, age, comorbidity, site, race, ethnicity, and every attr_* "
                          "column; other columns only when named); 'sex*age_group' gives intersectional groups.")] = None,
    age_bins: Annotated[Optional[str], typer.Option("--age-bins", help="Lower edges of the age groups after 0, "
                        "in years (default 31,61,71,81).")] = None,
    threshold: Annotated[str, typer.Option("--threshold", help="youden (chosen on the val split) or a fixed "
                         "probability.")] = "youden",
    margin: Annotated[float, typer.Option("--margin", help="AUROC margin within which a change in a parity gap "
                      "counts as no change.")] = 0.02,
    force: Force_ = False,
):
    """Audit a run directory, prediction files, or a checkpoint trained elsewhere; writes audit.json and report.html.

    Example:

        privaudit audit runs/cxr-opacus-20261128/private

        privaudit audit --predictions dp.csv --predictions base.csv --reference base --out audit/

        privaudit audit --checkpoint model.pt --arch resnet9-gn --data manifest.csv --out audit/

        privaudit audit --checkpoint model.keras --data manifest.csv --out audit/

        privaudit audit --checkpoint densenet121.onnx --data manifest.csv --preprocess card.toml --out audit/

        privaudit audit --checkpoint weights.safetensors --arch torchvision:densenet121 --data manifest.csv --out audit/
    """
    from privaudit.errors import ConfigError
    from privaudit.study import runs
    from privaudit.tasks import AGE_EDGES, parse_age_edges

    config = AuditConfig(n_boot=n_boot, ci=ci, seed=seed, cluster=cluster, ci_method=ci_method, min_cell=min_cell,
                         attributes=_labels(attributes), threshold=threshold, margin=margin,
                         age_edges=parse_age_edges(age_bins) if age_bins else AGE_EDGES)
    given = [x for x in (run_dir, predictions, checkpoint) if x]
    if len(given) != 1:
        raise ConfigError("give exactly one of RUN_DIR, --predictions FILE or --checkpoint PATH")
    card = None
    if preprocess is not None:
        if checkpoint is None:
            raise ConfigError("--preprocess describes a model trained elsewhere; give it with --checkpoint")
        from privaudit.preprocess import load_preprocess_card

        card = load_preprocess_card(preprocess)
    if checkpoint is not None and checkpoint.suffix != ".onnx":
        _check_arch(task, backend or "opacus", arch)
    policies = [n for n, v in (("uncertain", uncertain), ("blank", blank), ("no_finding", no_finding)) if v]
    if policies and checkpoint is None:
        raise ConfigError(f"{policies[0]} applies to --checkpoint audits, which load data; a run is audited on the "
                          "labels it recorded, and prediction files carry their own")
    if run_dir is not None:
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: not a directory; give a run directory, or a file with --predictions")
        report = runs.audit_dir(run_dir, config=config, command=_command())
        path = run_dir / "audit.json"
    elif predictions:
        if out is None:
            raise ConfigError("--predictions needs --out DIR for audit.json")
        names = list(name or [])
        if names and len(names) != len(predictions):
            raise ConfigError(f"{len(names)} --name value(s) for {len(predictions)} --predictions file(s); give one "
                              "per file")
        names = names or [Path(f).stem for f in predictions]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names {names} repeat; give distinct names with --name")
        report = runs.audit_frames(dict(zip(names, predictions)), config=config, reference=reference, out=out,
                                   force=force, command=_command())
        path = Path(out) / "audit.json"
    else:
        if out is None:
            raise ConfigError("--checkpoint needs --out DIR for the run directory it writes")
        spec = _data(task, data, preset, labels, "frontal", None, seed, controls, label_from, uncertain, blank,
                     no_finding)
        report = runs.audit_checkpoint(checkpoint, spec, out, task=task, arch=arch, backend=backend,
                                       image_size=image_size, trust=trust_checkpoint, config=config, force=force,
                                       command=_command(), preprocess=card)
        path = Path(out) / "audit.json"
    _print_headline(report.data)
    console.print(f"audit written to [bold]{safe(path)}[/]")


@app.command("report")
@handle_errors
def report_cmd(
    source: Annotated[Path, typer.Argument(help="A study or run directory, or an audit.json.")],
    fmt: Annotated[str, typer.Option("--format", help="html, pdf or both.", metavar="html|pdf|both")] = "html",
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file (default report.html / report.pdf "
                                                "beside audit.json; with --format both, the PDF takes the same "
                                                "name with .pdf).")] = None,
    policy: Annotated[Optional[Path], typer.Option("--policy", help="Release policy (TOML): its pass / fail / "
                                                   "inconclusive verdicts go into the summary.")] = None,
    model_card: ModelCard_ = None,
    template: Annotated[Optional[Path], typer.Option("--template", help="Folder with your own "
                                                     "report.html.j2 (and report.css).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file (it keeps its mode). "
                                        "report.html / report.pdf beside their own audit.json are always "
                                        "re-rendered.")] = False,
):
    """Render report.html and/or report.pdf from an audit.json alone.

    Examples:

        privaudit report runs/cxr-opacus-20261128/

        privaudit report runs/study1 --format both --policy examples/policy.toml --model-card examples/model_card.toml

        privaudit report runs/study1/audit.json --format pdf --out signed/report.pdf
    """
    from privaudit.study.api import report

    written = report(_audit_json(source), fmt=fmt, out=out, policy=policy, model_card=model_card, template=template,
                     force=force)
    console.print("report written to " + ", ".join(f"[bold]{safe(p)}[/]" for p in written))


@data_app.command("synth")
@handle_errors
def synth_cmd(
    task: Annotated[str, typer.Argument(help="Task: cxr or pdac.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images or volumes, manifest.csv and "
                                      "cohort.json.")],
    n: Annotated[Optional[int], typer.Option("--n", help="Number of images or volumes (default: the task's; cxr "
                                             "3000, pdac 400).")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Edge of each image in pixels, or of "
                                                      "each CT cube in voxels (default: the task's; cxr 64, pdac "
                                                      "32).")] = None,
    seed: Seed_ = 0,
    public: Annotated[bool, typer.Option("--public", help="Make a 'public' pretraining cohort instead (cxr).")] = False,
    layout: Annotated[str, typer.Option("--layout", help="manifest (default), or msd for pdac: the Medical "
                                        "Segmentation Decathlon layout (dataset.json, imagesTr/, labelsTr/) plus a "
                                        "controls/ folder, for the msd preset.", metavar="manifest|msd")]
    = "manifest",
    force: Force_ = False,
    quiet: Quiet_ = False,
):
    """Write a synthetic cohort in the real file formats: PNG radiographs (cxr) or NIfTI CT volumes in HU (pdac),
    with manifest.csv and cohort.json, which documents the planted subgroup effects.

    Examples:

        privaudit data synth cxr --out cohort/ --n 500 --image-size 64 --seed 1

        privaudit data synth pdac --out ct/ --n 400 --image-size 32 --seed 0

        privaudit data synth pdac --out Task07_Pancreas/ --layout msd
    """
    from privaudit._fs import staged_dir
    from privaudit.errors import ConfigError
    from privaudit.study.data import synthesize
    from privaudit.tasks import create_task

    spec = create_task(task)
    n = int(spec.default("n_samples")) if n is None else n
    image_size = spec.input_size if image_size is None else image_size
    from privaudit.limits import check_limit

    check_limit("--n", n)
    check_limit("--image-size", image_size, const="MAX_VOLUME_SIZE" if spec.spatial_dims == 3 else "MAX_IMAGE_SIZE")
    if n < 20:
        raise ConfigError(f"--n {n} is too small for train/val/test splits; use at least 20")
    if image_size < 16:
        raise ConfigError(f"--image-size {image_size} is too small; use at least 16")
    if layout not in ("manifest", "msd"):
        raise ConfigError(f"--layout {layout!r} is not one of manifest, msd")
    with staged_dir(out, force=force) as tmp:
        synthesize(task, tmp, n=n, image_size=image_size, seed=seed, public=public, layout=layout, console=console,
                   quiet=quiet)
    if layout == "msd":
        console.print(f"cohort written to [bold]{safe(out)}[/]: dataset.json, imagesTr/, labelsTr/, controls/, "
                      f"cohort.json; load it with --data {safe(out)} --controls {safe(Path(out) / 'controls')}",
                      soft_wrap=True)
    else:
        console.print(f"cohort written to [bold]{safe(out)}[/]: manifest.csv, cohort.json, images/", soft_wrap=True)


@data_app.command("cache")
@handle_errors
def cache_cmd(
    data: Annotated[Path, typer.Argument(help="A manifest.csv or a dataset folder (CheXpert, NIH, MIMIC-CXR-JPG).")],
    image_size: Annotated[int, typer.Option("--image-size", help="Edge in pixels that training will use.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Cache folder (default: .privaudit-cache/images-<N>px "
                                                "beside the manifest; elsewhere, point PRIVAUDIT_IMAGE_CACHE at "
                                                "it for training).")] = None,
    task: Annotated[str, typer.Option("--task", help="Task whose manifest this is: cxr.")] = "cxr",
    preset: Preset_ = None,
    labels: Labels_ = None,
    views: Views_ = "frontal",
    uncertain: Uncertain_ = None,
    blank: Blank_ = None,
    no_finding: NoFinding_ = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Processes decoding images (default: the CPU cores).")]
    = 0,
    verify: Annotated[bool, typer.Option("--verify", help="Decode every image again and compare it with the cache "
                      "(training trusts a cache by each file's size and modification time); exit 1 when any image "
                      "differs or cannot be read.")] = False,
    force: Force_ = False,
    quiet: Quiet_ = False,
):
    """Decode and resize every image once into a memory-mapped array that training then reads.

    Training on the same manifest at the same --image-size uses the cache by itself while it is valid, and
    warns and reads the images when the manifest or a file changed since (rebuild with --force). --verify
    checks an existing cache against the files, pixel by pixel.

    Example:

        privaudit data cache cohort/manifest.csv --image-size 256

        privaudit data cache cohort/manifest.csv --image-size 256 --verify
    """
    import os

    from rich.progress import Progress

    from privaudit.data.cache import CACHE_ENV, build_cache, default_cache_dir, verify_cache
    from privaudit.errors import ConfigError
    from privaudit.tasks import create_task
    from privaudit.study.data import DataSpec, load_manifest

    if verify and force:
        raise ConfigError("give --verify or --force, not both (--verify checks a cache, --force rebuilds it)")
    if create_task(task).spatial_dims != 2:
        raise ConfigError(f"task {task!r} has 3D volumes, which are cached on first use (see PRIVAUDIT_CACHE_DIR); "
                          "privaudit data cache is for 2D images")
    manifest = load_manifest(DataSpec(path=data, preset=preset, labels=_labels(labels), views=views,
                                      uncertain=uncertain, blank=blank, no_finding=no_finding), task)
    if verify:
        with Progress(console=console, disable=quiet) as prog:
            t = prog.add_task("verifying the cache", total=len(manifest.frame))
            rep = verify_cache(manifest, image_size, out, jobs=jobs or os.cpu_count() or 1,
                               progress=lambda k: prog.update(t, completed=k))
        console.print(plain(rep.summary()), highlight=False, soft_wrap=True)
        raise typer.Exit(0 if rep.ok else 1)
    with Progress(console=console, disable=quiet) as prog:
        t = prog.add_task("caching images", total=len(manifest.frame))
        folder, built = build_cache(manifest, image_size, out, force=force, jobs=jobs or os.cpu_count() or 1,
                                    progress=lambda k: prog.update(t, completed=k))
    what = "written to" if built else "already up to date in"
    console.print(f"image cache for {len(manifest.frame)} images at {image_size}x{image_size} {what} "
                  f"[bold]{safe(folder)}[/]")
    if Path(folder).absolute() != default_cache_dir(manifest, image_size).absolute():
        console.print(f"training finds it with: export {CACHE_ENV}={safe(folder)}")


@app.command("accountant")
@handle_errors
def accountant_cmd(
    sample_rate: Annotated[float, typer.Option("--sample-rate", help="Poisson sampling rate q (batch / N).")],
    steps: Annotated[int, typer.Option("--steps", help="Number of noisy steps.")],
    delta: Annotated[float, typer.Option("--delta", help="Target delta.")],
    noise_multiplier: Annotated[Optional[float], typer.Option("--noise-multiplier", help="Noise multiplier "
                                "sigma; give it, or --epsilon to solve for it.")] = None,
    epsilon: Annotated[Optional[float], typer.Option("--epsilon", help="Solve for the noise multiplier that "
                       "reaches this epsilon.")] = None,
    accountant: Acc_ = Accountant.prv,
):
    """Epsilon of DP-SGD under every accountant, or the noise multiplier for a target epsilon.

    Example:

        privaudit accountant --noise-multiplier 1.1 --sample-rate 0.01 --steps 5000 --delta 1e-5

        privaudit accountant --epsilon 8 --sample-rate 0.02 --steps 500 --delta 1e-4
    """
    from privaudit.audit.accounting import check_accounting_arguments, cross_checks, solve_noise_multiplier
    from privaudit.errors import ConfigError

    if (noise_multiplier is None) == (epsilon is None):
        raise ConfigError("give exactly one of --noise-multiplier and --epsilon")
    check_accounting_arguments(sample_rate=sample_rate, steps=steps, delta=delta, epsilon=epsilon,
                               noise_multiplier=noise_multiplier)
    if epsilon is not None:
        noise_multiplier = solve_noise_multiplier(epsilon, sample_rate, steps, delta, accountant=accountant.value)
        console.print(f"noise multiplier for ε = {epsilon:g} ({accountant.value}): [bold]{noise_multiplier:.4f}[/]")
    checks, warns = cross_checks(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    table = Table(title=f"ε at δ = {delta:g}: σ = {noise_multiplier:.4f}, q = {sample_rate:g}, {steps} steps")
    table.add_column("accountant")
    table.add_column("epsilon", justify="right")
    for name, eps in checks.items():
        table.add_row(name, "n/a" if eps is None else f"{eps:.4f}")
    console.print(table)
    for w in warns:
        err_console.print(plain(f"warning: {w}"), highlight=False, soft_wrap=True)


@app.command("attack")
@handle_errors
def attack_cmd(
    attack: Annotated[str, typer.Argument(help="lira or rmia.")],
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'privaudit train'.")],
    shadows: Annotated[Optional[int], typer.Option("--shadows", help="Shadow models for LiRA.")] = None,
    references: Annotated[Optional[int], typer.Option("--references", help="Reference models for RMIA.")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="LiRA with out-shadows only.")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="Shadow models trained at once by the local pool "
                    "(default: one per GPU, else one per CPU core).")] = None,
    executor: Executor_ = ExecutorName.local,
    ray_address: RayAddress_ = None,
    seed: Seed_ = 0,
    n_boot: NBoot_ = 1000,
    min_cell: MinCell_ = 10,
    quiet: Quiet_ = False,
):
    """Train shadow (LiRA) or reference (RMIA) models with the run's own backend, configuration and data, and
    add the attack to the run's audit. Finished shadow models are reused when the command runs again.

    Example:

        privaudit attack lira runs/eps3 --shadows 16 --jobs 2

        privaudit attack rmia runs/eps3 --references 4

        privaudit attack lira runs/eps3 --shadows 64 --executor ray --ray-address 10.0.0.5:6379
    """
    from privaudit.study.api import attack as run_attack

    report = run_attack(attack, run_dir, shadows=shadows, references=references, offline=offline, jobs=jobs,
                        executor=executor.value, ray_address=ray_address, seed=seed, n_boot=n_boot, min_cell=min_cell,
                        command=_command(), progress=console if not quiet else False)
    path = run_dir / "audit.json"
    attacks = report.data["models"]
    from privaudit.reports.format import format_number

    for name, m in attacks.items():
        for key, a in ((m["privacy"]["attacks"]) or {}).items():
            if a and key.startswith(attack):
                tpr = (a.get("tpr_at_fpr") or {}).get("0.01")
                console.print(plain(f"{name}: {key} AUC {format_number(a.get('auc'))}, TPR at 1% FPR "
                                    f"{format_number(tpr)}"), highlight=False)
    console.print(f"audit written to [bold]{safe(path)}[/]")


@app.command("verify-dp")
@handle_errors
def verify_dp_cmd(
    task: Annotated[str, typer.Argument(help="Task: cxr or pdac.")],
    data: Data_,
    out: Annotated[Path, typer.Option("--out", help="Folder for verify.json and verify_scores.csv.")],
    backend: Backend_ = "opacus",
    preset: Preset_ = None,
    labels: Labels_ = None,
    views: Views_ = "frontal",
    epsilon: Epsilon_ = None,
    delta: Delta_ = None,
    noise_multiplier: Noise_ = None,
    max_grad_norm: Clip_ = 1.0,
    accountant: Acc_ = Accountant.prv,
    clipping: Clipping_ = Clipping.hooks,
    privacy_unit: Unit_ = None,
    epochs: Epochs_ = None,
    batch_size: Batch_ = None,
    physical_batch_size: PBatch_ = None,
    image_size: Size_ = None,
    width: Width_ = None,
    arch: Arch_ = None,
    lr: LR_ = None,
    seed: Seed_ = 0,
    init: Init_ = None,
    device: Device_ = "auto",
    gradient_canaries: Annotated[int, typer.Option("--gradient-canaries", help="Gradient canaries: extra training "
                                 "rows whose per-sample gradient is set to 100 C along a random direction; each "
                                 "joins the training set with probability 1/2. More canaries, a stronger test.")]
    = 1000,
    confidence: Annotated[float, typer.Option("--confidence", help="Confidence of the empirical epsilon and of the "
                          "verdict.")] = 0.99,
    canary_seed: Annotated[int, typer.Option("--canary-seed", help="Seed of the canaries (inclusion, directions) "
                           "and of the ideal simulation; training keeps --seed.")] = 0,
    quiet: Quiet_ = False,
):
    """White-box test of a DP training pipeline in one run: gradient canaries go through the pipeline's own
    sampler, clipping, noise and optimizer; the noised gradients give an empirical epsilon (Steinke et al. and
    f-DP) to hold against the accountant's. Exit 0: no violation detected; 1: violation; 2: bad input.

    Example:

        privaudit verify-dp cxr --data cohort/manifest.csv --epsilon 2 --gradient-canaries 1000 --out verify/
    """
    from privaudit.reports.format import format_number
    from privaudit.study.runs import verify

    cfg = _train_config(task, backend, arch, width, image_size, epochs, batch_size, physical_batch_size, lr, seed,
                        device, init, False, epsilon, delta, noise_multiplier, max_grad_norm, accountant, 0,
                        clipping, privacy_unit, None)
    spec = _data(task, data, preset, labels, views, None, seed, None, None)
    res = verify(cfg, spec, out, gradient_canaries=gradient_canaries, confidence=confidence, canary_seed=canary_seed,
                 console=console, quiet=quiet)
    if res.get("written") is False:   # a torchrun rank other than 0
        return
    tests = res.get("tests") or {}
    emp = res.get("empirical_epsilon") or {}
    table = Table(title=f"verify-dp: {safe(res['verdict'])} at {confidence:.0%} confidence")
    for col in ("figure", "value"):
        table.add_column(col)
    table.add_row("accountant epsilon", format_number((res.get("accountant") or {}).get("epsilon")))
    for name in ("fdp", "steinke"):
        table.add_row(f"empirical epsilon ({name})", format_number((emp.get(name) or {}).get("estimate")))
    ideal = ((res.get("ideal") or {}).get("fdp") or {})
    table.add_row("ideal mechanism, f-DP median", format_number(ideal.get("median")))
    table.add_row("harness / ideal", format_number(res.get("ratio_to_ideal")))
    for name, t in tests.items():
        table.add_row(f"test {name}", "violated" if t.get("violated") else "passed")
    console.print(table)
    console.print(f"written to [bold]{safe(Path(out) / 'verify.json')}[/]", soft_wrap=True)
    if res["verdict"] == "violation":
        raise typer.Exit(1)


@app.command("check")
@handle_errors
def check_cmd(
    source: Annotated[Path, typer.Argument(help="A study or run directory, or an audit.json.")],
    policy: Annotated[Path, typer.Option("--policy", help="Policy file (TOML); see examples/policy.toml.")],
):
    """Check an audit against a release policy; exit 0 when every check passes, 1 when any fails or cannot be
    decided, 2 on bad input. Use it to gate a CI pipeline or a model release.

    Example:

        privaudit check runs/study1 --policy examples/policy.toml
    """
    from privaudit.audit.results import AuditReport
    from privaudit.reports.policy import Policy, evaluate

    path = _audit_json(source)
    checks = evaluate(AuditReport.from_json(path).data, Policy.load(policy))
    table = Table(title=plain(f"policy {policy.name} on {path}"))
    for col in ("model", "check", "threshold", "value (95% CI)", "verdict"):
        table.add_column(col)
    colours = {"pass": "green", "fail": "red", "inconclusive": "yellow"}
    for c in checks:   # model and group names come from data: every cell is plain text, never markup
        value = "n/a" if c.value is None else f"{c.value:.3f}"
        if c.ci:
            value += f" ({c.ci[0]:.3f} to {c.ci[1]:.3f})"
        verdict = Text.assemble((c.status, colours.get(c.status, "")), plain(f": {c.reason}" if c.reason else ""))
        table.add_row(plain(c.model), plain(c.check), plain(str(c.threshold)), plain(value), verdict)
    console.print(table)
    if any(c.status != "pass" for c in checks):
        raise typer.Exit(1)


def main() -> None:
    from privaudit._fs import install_signal_handlers
    from privaudit._quiet import quiet_process

    quiet_process()   # third-party start-up noise (TensorFlow's C++ notices, aif360's optional extras) stays off
    install_signal_handlers()   # SIGTERM (what a scheduler sends) is handled like Ctrl-C: nothing half-written
    try:
        app()
    except KeyboardInterrupt:   # a signal that lands after the command's own handler, while typer is exiting
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
