"""What every backend shares before and around training: canaries, the training-set size, delta and the
sample rate (so that the opacus and tf backends refuse the same inputs with the same messages), the progress
bars, and file hashes. Framework-free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privaudit.config import DPConfig, TrainConfig
from privaudit.errors import ConfigError

CANARY_SEED_OFFSET = 7919


@dataclass(frozen=True)
class TrainingPlan:
    train_mask: np.ndarray      # rows of the manifest in the training split
    canaries: tuple | None      # (images, labels, included) from make_canaries, or None
    n_train: int                # training samples, included canaries counted
    dp: DPConfig                # with delta resolved for n_train when DP is on
    sample_rate: float          # expected batch / n_train
    extra_rows: tuple | None = None   # (images, labels) appended to the training set: verify-dp's gradient canaries


def plan_training(manifest, config: TrainConfig, task, size: int, *, extra_rows: tuple | None = None) -> TrainingPlan:
    """Make the canaries and check the batch against the training set; raise ConfigError with the fix.

    ``extra_rows`` = (images, labels) join the training set as ordinary units, counted in n_train (so in delta
    and the sample rate): ``privaudit verify-dp`` adds its gradient canaries this way."""
    train_mask = (manifest.frame["split"] == "train").to_numpy()
    canaries = None
    if config.canaries:
        from privaudit.data.canaries import make_canaries

        if task.spatial_dims != 2:
            raise ConfigError(f"--canaries makes 2D canary images; task {task.name!r} has 3D volumes, so run it "
                              "without --canaries (the loss and LiRA/RMIA attacks still audit membership)")
        canaries = make_canaries(config.canaries, size=size, n_labels=len(manifest.labels),
                                 seed=config.seed + CANARY_SEED_OFFSET)
    # Included canaries are training samples: the sample rate and delta account for them.
    n_train = int(train_mask.sum()) + (int(canaries[2].sum()) if canaries is not None else 0)
    n_train += len(extra_rows[0]) if extra_rows is not None else 0
    if config.batch_size > n_train:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the training set ({n_train} samples); "
                          "use a smaller batch size")
    dp = config.dp.resolve_delta(n_train) if config.dp.enabled else config.dp
    sample_rate = config.batch_size / n_train
    if dp.enabled and sample_rate >= 1:
        raise ConfigError(f"sample rate {sample_rate:.3g} (batch {config.batch_size} / {n_train} samples) must be "
                          "below 1 for DP amplification by sampling; use a smaller --batch-size")
    return TrainingPlan(train_mask, canaries, n_train, dp, sample_rate, extra_rows)


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


def write_canaries(out: Path, canaries: tuple, losses, seed: int) -> dict:
    """Write the canaries' membership and losses to ``out/canaries.csv``; return train.json's canary block."""
    from privaudit.data.canaries import CANARY_KIND, canary_table
    from privaudit.predictions import write_predictions

    _, _, included = canaries
    write_predictions(canary_table(included, losses), out / "canaries.csv")
    return {"m": len(included), "n_included": int(included.sum()), "kind": CANARY_KIND,
            "inclusion_probability": 0.5, "seed": seed + CANARY_SEED_OFFSET, "file": "canaries.csv"}


def non_private_block(steps: int) -> dict:
    """train.json's privacy block for a run that claims no epsilon (the DP and clip-only blocks extend it)."""
    return {"dp": False, "epsilon": None, "delta": None, "accountant": None, "noise_multiplier": None,
            "max_grad_norm": None, "sample_rate": None, "steps": steps, "poisson_sampling": False}
