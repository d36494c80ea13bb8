"""What every backend shares before and around training: canaries, the privacy unit (patient or image) and the
per-patient image cap, the training-set size, delta and the sample rate (so that the opacus and tf backends
refuse the same inputs with the same messages), the progress bars, and file hashes. Framework-free.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from privaudit.config import DPConfig, TrainConfig, patient_unit_refusal
from privaudit.errors import ConfigError

CANARY_SEED_OFFSET = 7919
MAX_CANARY_GIB = 8          # the canaries' images are held in memory: refuse more than this (float32)
CAP_SEED_OFFSET = 104729    # the max_images_per_patient choice: its own stream, apart from training's


@dataclass(frozen=True)
class TrainingPlan:
    train_mask: np.ndarray      # rows of the manifest trained on: the training split, after max_images_per_patient
    canaries: object | None     # privaudit.data.canaries.Canaries (unpacks as images, labels, included), or None
    n_train: int                # training images, included canary images counted
    dp: DPConfig                # with delta resolved for n_units when DP is on
    sample_rate: float          # expected batch / n_units
    privacy_unit: str | None = None   # "patient" or "image" under DP; None without DP
    n_units: int = 0            # what DP counts: training patients (an included canary is one) or images
    # The unit (0 .. n_units-1) of each training item, in the order the backends lay them out: the kept
    # training rows in manifest order, then the included canaries' images (a canary patient's images share one
    # unit), then extra_rows. None unless the unit is the patient.
    units: np.ndarray | None = None
    images_per_patient: dict = field(default_factory=dict)   # {max, median} over training patients
    patient_ids: str = "given"  # "derived" when the preset invented them (one per file or case)
    images_left_out: int = 0    # training images that max_images_per_patient left out
    warnings: tuple[str, ...] = ()
    # (images, labels) appended to the training set (verify-dp's gradient canaries), as they train: under the image
    # unit one row per owner when plan_training was given owners
    extra_rows: tuple | None = None
    physical_batch_size: int = 64     # images per forward/backward pass: config.physical_batch_size, resolved


def cap_images(patient_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A mask keeping at most ``k`` rows per patient: a seeded uniform choice, made before training and
    independent of the model, so the cap itself uses no data beyond the patient ids."""
    keys = np.random.default_rng(seed + CAP_SEED_OFFSET).random(len(patient_ids))
    rank = pd.Series(keys).groupby(np.asarray(patient_ids, dtype=object)).rank(method="first").to_numpy()
    return rank <= k


def resolve_unit(config: TrainConfig, several: bool, *, torchrun: bool) -> tuple[str, list[str]]:
    """The privacy unit of a DP run, and warnings. Left unset, it is the patient whenever a patient has more
    than one training image (otherwise the two units are one mechanism) and patient-level DP runs here; where it
    cannot (ew or ghost clipping), the image, with a warning. Asked for, it is refused there."""
    why = patient_unit_refusal(config.backend, config.clipping, torchrun=torchrun)
    if config.privacy_unit == "patient" and why:
        raise ConfigError(why)
    if config.privacy_unit is not None:
        return config.privacy_unit, []
    if not several:
        return "image", []
    if why:
        reason = why.split(";")[0].replace("privacy_unit 'patient' ", "patient-level DP ")
        return "image", [f"privacy unit: image, since {reason}: the guarantee covers one image, and a patient with "
                         "several images is covered only by group privacy (see group_privacy)"]
    return "patient", []


def plan_training(manifest, config: TrainConfig, task, size: int, *, extra_rows: tuple | None = None) -> TrainingPlan:
    """Fix the privacy unit, make the canaries in it and check the batch against the training set; raise ConfigError
    with the fix.

    ``extra_rows`` = (images, labels) join the training set as ordinary units (each its own patient), counted in
    n_train and n_units (so in delta and the sample rate): ``privaudit verify-dp`` adds its gradient canaries
    this way. An optional third array, ``owner`` (one integer a row), groups them: under the patient unit the rows
    of one owner are one patient (one unit, so one physical batch); under the image unit only each owner's first
    row trains (the plan's ``extra_rows`` holds the rows kept)."""
    frame = manifest.frame
    train_mask = (frame["split"] == "train").to_numpy()
    pids = frame["patient_id"].astype(str).to_numpy()
    left_out = 0
    if config.max_images_per_patient is not None:
        rows = np.flatnonzero(train_mask)
        keep = cap_images(pids[rows], config.max_images_per_patient, config.seed)
        train_mask = train_mask.copy()
        train_mask[rows[~keep]] = False
        left_out = int((~keep).sum())
    codes, uniq = pd.factorize(pids[train_mask])
    counts = np.bincount(codes, minlength=len(uniq))
    several = bool(len(counts)) and counts.max() > 1   # some patient has several training images
    per_patient = {"max": int(counts.max()), "median": float(np.median(counts))} if len(counts) else {}
    unit, warns = None, []
    if config.dp.enabled:
        from privaudit.backends.distributed import launch_env

        unit, warns = resolve_unit(config, several, torchrun=launch_env() is not None)
    canaries = _make_canaries(config, task, size, len(manifest.labels), unit, several)
    # Included canaries are training samples: their images count in n_train; under the patient unit each included
    # canary patient is one patient (verify-dp's extra rows one each), so the sample rate and delta count them.
    extra_owner = None
    if extra_rows is not None and len(extra_rows) > 2:
        extra_owner = pd.factorize(np.asarray(extra_rows[2]))[0]   # 0 .. owners-1, in order of first row
        if unit != "patient":   # each row would be a unit of its own: keep one row per owner
            first = np.unique(extra_owner, return_index=True)[1]
            extra_rows, extra_owner = (extra_rows[0][first], extra_rows[1][first]), None
        else:
            extra_rows = (extra_rows[0], extra_rows[1])
    extra = len(extra_rows[0]) if extra_rows is not None else 0
    extra_units = int(extra_owner.max(initial=-1)) + 1 if extra_owner is not None else extra
    n_canary_images = int(canaries.included.sum()) if canaries is not None else 0
    n_canary_units = int(canaries.unit_included.sum()) if canaries is not None else 0
    n_train = int(train_mask.sum()) + n_canary_images + extra
    n_units = len(uniq) + n_canary_units + extra_units if unit == "patient" else n_train
    what = "patients" if unit == "patient" else "samples"
    if config.batch_size > n_units:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the training set ({n_units} {what}"
                          + ("; under privacy_unit 'patient' the batch counts patients" if unit == "patient" else "")
                          + "); use a smaller batch size")
    units = None
    canary_sizes = np.bincount(_canary_units(canaries)) if n_canary_images else np.zeros(0, np.int64)
    extra_sizes = np.bincount(extra_owner) if extra_owner is not None else np.zeros(0, np.int64)
    physical = physical_batch(config, unit, int(max(counts.max(initial=1), canary_sizes.max(initial=1),
                                                    extra_sizes.max(initial=1))))
    if unit == "patient":
        big = int(counts.argmax())
        if counts[big] > physical:
            raise ConfigError(
                f"patient {uniq[big]!r} has {counts[big]} training images, more than physical_batch_size "
                f"{config.physical_batch_size}, and a patient's images must share one physical batch; raise "
                f"physical_batch_size to {counts.max()} or cap them with max_images_per_patient "
                f"{config.physical_batch_size}")
        units = np.concatenate([codes, len(uniq) + _canary_units(canaries), len(uniq) + n_canary_units
                                + (np.arange(extra) if extra_owner is None else extra_owner)]).astype(np.int64)
    dp = config.dp.resolve_delta(n_units, what) if config.dp.enabled else config.dp
    sample_rate = config.batch_size / n_units
    if dp.enabled and sample_rate >= 1:
        raise ConfigError(f"sample rate {sample_rate:.3g} (batch {config.batch_size} / {n_units} {what}) must be "
                          "below 1 for DP amplification by sampling; use a smaller batch_size")
    id_source = getattr(manifest, "patient_ids", "given")
    if id_source == "derived" and dp.enabled:
        warns.append("the patient ids were derived by the data preset (one per case or file), not given: two scans of "
                     "one person count as two patients, so a per-patient guarantee may cover less than a person")
    return TrainingPlan(train_mask, canaries, n_train, dp, sample_rate, unit, n_units, units, per_patient, id_source,
                        left_out, tuple(warns), extra_rows, physical)


def physical_batch(config: TrainConfig, unit: str | None, largest: int) -> int:
    """Images per forward/backward pass: ``physical_batch_size`` when given; otherwise the batch size, raised under
    patient-level DP to ``largest`` (the most training images of one patient, a canary patient's included), so that
    the default always fits a whole patient. A given size that is too small is refused by the caller."""
    if config.physical_batch_size is not None:
        return config.physical_batch_size
    return max(config.batch_size, largest) if unit == "patient" else config.batch_size


def unit_record(plan: TrainingPlan, config: TrainConfig, privacy: dict) -> tuple[dict, dict, list[str]]:
    """train.json's privacy-unit fields: (fields of the privacy block, top-level fields, warnings).

    The privacy block gains ``privacy_unit``, ``n_units``, ``unit_gradient`` (what is clipped, for the patient
    unit) and, for an image-level run that earned an epsilon,
    ``group_privacy``: what the guarantee says about a patient with k images at k = the median (rounded up) and
    the maximum number of training images per patient, by :func:`privaudit.audit.accounting.group_privacy`;
    an entry whose delta reaches 1 holds nulls and ``guarantee: false``, with a warning.
    """
    from privaudit.audit.accounting import group_privacy

    warns = list(plan.warnings)
    block = {"privacy_unit": plan.privacy_unit, "n_units": plan.n_units if plan.privacy_unit else None,
             "unit_gradient": "sum of the patient's image loss gradients, clipped as one"
             if plan.privacy_unit == "patient" else None, "group_privacy": None}
    eps, delta = privacy.get("epsilon"), privacy.get("delta")
    if plan.privacy_unit == "image" and privacy.get("dp") and eps is not None and plan.images_per_patient:
        block["group_privacy"] = {}
        for where in ("median", "max"):
            k = int(math.ceil(plan.images_per_patient[where]))
            got = group_privacy(eps, delta, k)
            block["group_privacy"][where] = {"k": k, "epsilon": got[0] if got else None,
                                             "delta": got[1] if got else None, "guarantee": got is not None}
            if got is None:
                warns.append(f"no guarantee for a patient with {k} images ({where} images per patient): image-level "
                             f"DP at epsilon {eps:.3g}, delta {delta:.3g} gives by group privacy a delta of 1 or more "
                             "for them; train with privacy_unit 'patient' to protect patients")
    top = {"images_per_patient": plan.images_per_patient or None, "patient_ids": plan.patient_ids,
           "max_images_per_patient": config.max_images_per_patient, "images_left_out": plan.images_left_out}
    return block, top, warns


def sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks (weights can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def progress_bars(console, quiet: bool):
    """The rich progress display both backends use for loading, epochs and steps."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), console=console, disable=quiet, transient=False)


def _make_canaries(config: TrainConfig, task, size: int, n_labels: int, unit: str | None, several: bool):
    """The run's canaries (``privaudit.data.canaries``), in its privacy unit: canary patients under the patient
    unit, single images otherwise. A run without DP takes the unit a DP run of the same settings would (so a
    study's non-private baseline is audited in the private model's unit)."""
    if not config.canaries:
        return None
    from privaudit.data.canaries import MAX_IMAGES_PER_PATIENT, make_canaries

    if unit is None:
        from privaudit.backends.distributed import launch_env

        try:
            unit = resolve_unit(config, several, torchrun=launch_env() is not None)[0]
        except ConfigError:
            unit = "image"
    # a canary patient has 1 to k images: k at most the run's per-patient cap and its physical batch
    k = min(MAX_IMAGES_PER_PATIENT, config.max_images_per_patient or MAX_IMAGES_PER_PATIENT,
            config.physical_batch_size or MAX_IMAGES_PER_PATIENT) if unit == "patient" else 1
    gib = config.canaries * k * size ** task.spatial_dims * 4 / 2**30   # float32, at most k images per canary
    if gib > MAX_CANARY_GIB:
        raise ConfigError(f"canaries {config.canaries} of up to {k} image(s) at {size}^{task.spatial_dims} could "
                          f"take {gib:.0f} GiB of memory (limit {MAX_CANARY_GIB} GiB); use fewer canaries")
    return make_canaries(config.canaries, size=size, n_labels=n_labels, seed=config.seed + CANARY_SEED_OFFSET,
                         spatial_dims=task.spatial_dims, unit=unit, max_images=k)


def _canary_units(canaries) -> np.ndarray:
    """The unit (0 .. included canary patients - 1) of each included canary image, in order."""
    if canaries is None:
        return np.zeros(0, np.int64)
    kept = np.flatnonzero(canaries.unit_included)
    return np.searchsorted(kept, canaries.owner[canaries.included]).astype(np.int64)


def write_canaries(out: Path, canaries, losses, seed: int) -> dict:
    """Write the canaries' membership and losses (one per image, in order) to ``out/canaries.csv``, one row per
    canary unit; return train.json's canary block."""
    from privaudit.data.canaries import AGGREGATION, canary_table
    from privaudit.predictions import write_predictions

    write_predictions(canary_table(canaries, losses), out / "canaries.csv")
    n = canaries.n_images
    return {"m": canaries.m, "n_included": int(canaries.unit_included.sum()), "unit": canaries.unit,
            "n_images": int(n.sum()), "n_included_images": int(canaries.included.sum()),
            "images_per_unit": {"min": int(n.min()) if len(n) else 0, "max": int(n.max()) if len(n) else 0},
            "score": "minus the loss" if canaries.unit == "image" else f"minus the {AGGREGATION} loss of its images",
            "kind": canaries.kind, "spatial_dims": canaries.spatial_dims,
            "inclusion_probability": 0.5, "seed": seed + CANARY_SEED_OFFSET, "file": "canaries.csv"}


def non_private_block(steps: int) -> dict:
    """train.json's privacy block for a run that claims no epsilon (the DP and clip-only blocks extend it)."""
    return {"dp": False, "epsilon": None, "delta": None, "accountant": None, "noise_multiplier": None,
            "max_grad_norm": None, "sample_rate": None, "steps": steps, "poisson_sampling": False}


def recorded_path(path: Path, out: Path) -> str:
    """How train.json records a file the run started from: relative to the folder that holds the run directory
    when it lies inside it (a study's own pretraining weights, which move with the study), else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path(out).absolute().parent))
    except ValueError:
        return str(path)
