"""Patient-level DP-SGD's batches: Poisson sampling of patients, and physical batches that keep each patient's
images together.

A logical step includes each training patient independently with probability ``q = batch_size / patients``
and, with it, every one of its training images (after ``max_images_per_patient``). The step is then cut into
physical batches of at most ``physical_batch_size`` images, each holding whole patients, so that a patient's
gradient (the sum of its images' gradients) is complete within one backward pass and can be clipped as one
unit there. Framework-free but for :class:`EmptySafeCollate`, which imports torch when called.

Under torchrun each process draws only its *shard* of the patients (``backends.distributed.patient_shard``),
still at the global rate q: every patient lies in exactly one shard, so the union of the processes' draws is one
Poisson sample of all patients, and a patient's images are all read by the process that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PhysicalBatch:
    items: np.ndarray     # dataset items (int64), the images of whole patients
    units: np.ndarray     # each item's patient within this batch: 0 .. n_units - 1, in order of first appearance
    n_units: int          # patients in this batch
    last: bool            # the last physical batch of its logical step (the optimizer steps after it)


class PatientSampler:
    """Poisson sampling over units, ``units[i]`` being the unit (patient) of dataset item ``i``.

    ``steps`` logical steps make an epoch; the coins come from one seeded generator, drawn in the main process.
    ``shard`` (torchrun) lists the units this process draws, each still with probability ``sample_rate``, the
    global rate; None (one process) draws every unit.
    """

    def __init__(self, units: np.ndarray, n_units: int, sample_rate: float, *, steps: int, physical: int,
                 seed: int, shard: np.ndarray | None = None):
        units = np.asarray(units, dtype=np.int64)
        if not 0 < sample_rate < 1:
            raise ValueError(f"sample_rate must be in (0, 1), got {sample_rate}")
        self.order = np.argsort(units, kind="stable")          # items grouped by unit, in item order within one
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(units, minlength=n_units))])
        sizes = np.diff(self.offsets)
        if sizes.max(initial=0) > physical:
            raise ValueError(f"a unit has {sizes.max()} items, more than the physical batch of {physical}")
        self.n_units, self.sample_rate, self.steps, self.physical = n_units, float(sample_rate), steps, physical
        self.rng = np.random.default_rng(seed)
        self.shard = np.arange(n_units, dtype=np.int64) if shard is None else np.sort(np.asarray(shard, np.int64))
        if len(self.shard) and not (0 <= self.shard[0] and self.shard[-1] < n_units):
            raise ValueError(f"a shard's units must lie in 0 .. {n_units - 1}")

    def __len__(self) -> int:
        return self.steps

    def items_of(self, unit: int) -> np.ndarray:
        return self.order[self.offsets[unit]:self.offsets[unit + 1]]

    def draw(self) -> np.ndarray:
        """One logical step's patients (of this process' shard): each included independently with probability q."""
        return self.shard[self.rng.random(len(self.shard)) < self.sample_rate]

    def pack(self, chosen: np.ndarray) -> list[PhysicalBatch]:
        """Cut one logical step into physical batches of whole patients (greedy, in patient order)."""
        out, items, units, size, n = [], [], [], 0, 0
        for u in chosen:
            mine = self.items_of(int(u))
            if size + len(mine) > self.physical and size:
                out.append(PhysicalBatch(np.concatenate(items), np.concatenate(units), n, False))
                items, units, size, n = [], [], 0, 0
            items.append(mine)
            units.append(np.full(len(mine), n, dtype=np.int64))
            size += len(mine)
            n += 1
        if items:
            out.append(PhysicalBatch(np.concatenate(items), np.concatenate(units), n, True))
        else:   # an empty Poisson draw: one empty batch, so the step still adds noise, as the accountant assumes
            out.append(PhysicalBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), 0, True))
        last = out[-1]
        out[-1] = PhysicalBatch(last.items, last.units, last.n_units, True)
        return out

    def epoch(self) -> list[PhysicalBatch]:
        """One epoch's physical batches, drawn now, in order."""
        return [b for _ in range(self.steps) for b in self.pack(self.draw())]


class EmptySafeCollate:
    """``ArrayDataset.collate``, plus empty tensors for an empty batch (picklable, for worker processes)."""

    def __init__(self, x_shape: tuple, y_shape: tuple):
        self.x_shape, self.y_shape = tuple(x_shape), tuple(y_shape)

    def __call__(self, batch):
        import torch

        from privaudit.data.cache import ArrayDataset

        if len(batch) == 0:
            return [torch.zeros((0, *self.x_shape)), torch.zeros((0, *self.y_shape))]
        return ArrayDataset.collate(batch)
