"""Data-parallel training under ``torchrun``: process-group set-up, model wrapping, and rank-0-only output.

``torchrun --nproc_per_node N -m privaudit train ...`` starts N copies of the same command; torchrun tells
each one its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). The opacus backend calls :func:`setup` first, which joins the process group (``nccl``
on CUDA, ``gloo`` on CPU) and picks this process' device (``cuda:LOCAL_RANK``). Without those variables,
or with ``WORLD_SIZE=1``, everything here is a no-op and training runs as a single process.

Under DP the model is wrapped in Opacus' ``DifferentiallyPrivateDistributedDataParallel`` (DPDDP) before
``make_private``, so that Opacus returns its ``DistributedDPOptimizer`` (per-sample clipping on every rank,
the noise added once, on rank 0, and the clipped sums all-reduced) and a distributed Poisson loader: the
training set is split into one shard per rank, and each rank draws each sample of its shard independently
with the *global* sample rate ``batch_size / N``. The union of the local batches is therefore exactly one
Poisson batch of the whole training set, and every rank's accountant counts the same steps at the same
sample rate, so epsilon and the number of steps equal those of a single process with the same
``--batch-size``.

Three details differ from Opacus' defaults, each for a reason:

* Opacus' distributed sampler skips a step when a rank's local batch is empty, so that rank runs fewer
  steps than the others and the gradient all-reduce pairs up different steps (or hangs at the end).
  :class:`EveryStepSampler` yields the empty local batch instead; Opacus' loader already turns it into an
  empty tensor, and the rank joins the step with a zero gradient sum, as the accountant assumes.
* Each rank draws its inclusion coins from its own generator (seed + rank). With one shared seed, the k-th
  sample of every shard would be included or left out together, which is not Poisson sampling.
* Opacus' distributed optimizer all-reduces each gradient as it is laid out in memory; in ew and fast mode
  rank 0's noisy gradient can be laid out differently from the others', and the sum then mixes up weights.
  :func:`contiguous_reduce` makes every gradient row-major first.

**Patient-level DP** (``privacy_unit="patient"``) follows the same plan with patients in place of samples.
:func:`patient_shard` deals the training patients out to the ranks (a seeded permutation that every rank
computes alike, every ``world_size``-th patient to each), so a patient and all its images belong to one rank;
each rank's ``PatientSampler`` (``backends._units``) draws every patient of its shard with the global rate
``q = batch_size / training patients``, from its own generator (seed + rank), for ``ceil(patients /
batch_size)`` logical steps per epoch on every rank, an empty local draw included (one empty physical batch, which
joins the all-reduce with a zero sum). The union of the ranks' draws is one Poisson sample of patients. Opacus'
distributed optimizer divides each rank's clipped sum (rank 0's with the noise) by its ``expected_batch_size``
and the all-reduced sum by the world size, so the backend sets the per-rank expected batch to ``batch_size /
world_size`` (as Opacus' ``make_private`` does for samples): the update is ``(sum of clipped patient gradients +
N(0, sigma^2 C^2)) / batch_size``, as in one process, and the accountant counts the same steps at the same q.

At the end, :func:`teardown` checks that every rank holds the same weights (they apply the same all-reduced
gradient, so they must agree to the last bit) and refuses to write a run whose ranks drifted apart.

Without DP the model is wrapped in torch's ``DistributedDataParallel`` and the batch is split evenly over
the ranks (``--batch-size`` stays the global batch).

Only rank 0 writes: :func:`rank_zero_out` gives the other ranks a scratch folder for the run directory,
removed when training ends, and the backend writes no weights or predictions on them.

This module imports torch only inside its functions, so the command line can use :func:`rank_zero_out`
without loading a framework.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from privaudit.errors import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SHARD_SEED_OFFSET = 15485863   # the patient shards' permutation: its own stream, apart from the coins' (seed + rank)


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun, "
                          "which sets RANK, WORLD_SIZE and LOCAL_RANK") from None


def launch_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun with more than one process, else None."""
    if "WORLD_SIZE" not in os.environ:
        return None
    world = _env_int("WORLD_SIZE")
    if world <= 1:
        return None
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {missing[0]} is not; launch with torchrun, which sets "
                          "RANK, WORLD_SIZE and LOCAL_RANK")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return rank, world, local


def is_main_process() -> bool:
    """True on rank 0, and in a process not started by torchrun."""
    env = launch_env()
    return env is None or env[0] == 0


@dataclass
class DistContext:
    """Where this process stands: its rank, how many there are, its device, and the process group."""

    device: object                      # torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1           # processes on this machine
    backend: str | None = None          # "nccl" or "gloo"; None for a single process
    dp: bool = False                    # set by wrap_model: DPDDP (True) or torch DDP (False)
    owns_group: bool = field(default=False, repr=False)  # whether teardown() destroys the group

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict | None:
        """The train.json block: None for a single process."""
        if not self.active:
            return None
        return {"world_size": self.world_size, "backend": self.backend, "launcher": "torchrun",
                "data_parallel": "opacus DPDDP" if self.dp else "torch DDP"}


def setup(device: str = "auto") -> DistContext:
    """Join torchrun's process group when there is one; otherwise a single-process context on ``device``."""
    import torch

    from privaudit.backends._device import pick_device

    env = launch_env()
    if env is None:
        return DistContext(device=pick_device(device))
    rank, world, local = env
    import torch.distributed as dist

    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but CUDA is not available here; use --device cpu")
    if use_cuda:
        n = torch.cuda.device_count()
        if local >= n:
            raise ConfigError(f"LOCAL_RANK={local} but only {n} GPU(s) are visible; use torchrun "
                              f"--nproc_per_node {n} or fewer on this machine")
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        owns = True
    else:
        backend = dist.get_backend()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    return DistContext(device=dev, rank=rank, world_size=world, local_rank=local, local_world_size=local_world,
                       backend=backend, owns_group=owns)


def check_in_sync(model, ctx: DistContext) -> None:
    """Refuse a run whose ranks ended with different weights: their gradients were not all-reduced alike.

    Every rank applies the same all-reduced (noisy) gradient, so the weights must agree to the last bit; a
    difference means some rank trained on its local gradient alone, and the run is not the DP-SGD that the
    accountant counted.
    """
    if not ctx.active:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        params = [p.detach().double().flatten() for p in unwrap_model(model).parameters()]
        flat = torch.cat(params) if params else torch.zeros(1, dtype=torch.float64)
        weights = torch.arange(1, len(flat) + 1, dtype=torch.float64, device=flat.device)
        mine = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()]).to(ctx.device)
    gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    worst = max(float((g - gathered[0]).abs().max()) for g in gathered)
    if worst > 1e-9 * max(1.0, float(gathered[0].abs().max())):
        from privaudit.errors import DPError

        raise DPError(f"the {ctx.world_size} processes ended training with different weights (checksums differ by "
                      f"{worst:.3g}), so their gradients were not synchronised; nothing was written. This is a bug: "
                      "please report it with the command line")


def teardown(ctx: DistContext, model=None) -> None:
    """Check that the ranks' weights agree (given ``model``), wait for every rank, leave the process group.

    Only a process group that :func:`setup` created is destroyed.
    """
    if not ctx.active:
        return
    import torch.distributed as dist

    if model is not None and dist.is_initialized():
        check_in_sync(model, ctx)
    if not ctx.owns_group:
        return
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    ctx.owns_group = False


def wrap_model(model, ctx: DistContext, *, dp: bool):
    """DPDDP under DP (before ``make_private``), torch DDP otherwise; the model itself for one process."""
    if not ctx.active:
        return model
    ctx.dp = dp
    if dp:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        return DPDDP(model)   # broadcasts rank 0's initial weights
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def unwrap_model(model):
    """The plain network inside Opacus' GradSampleModule and (DP)DDP wrappers."""
    while True:
        if hasattr(model, "_module"):
            model = model._module
        elif type(model).__name__ in ("DistributedDataParallel", "DifferentiallyPrivateDistributedDataParallel"):
            model = model.module
        else:
            return model


def sampling_seed(seed: int, ctx: DistContext) -> int:
    """The seed of this rank's sampling generator: its own stream per rank (see the module docstring)."""
    return seed + ctx.rank


def patient_shard(n_units: int, ctx: DistContext, *, seed: int):
    """The patients (units 0 .. n_units-1) that this rank draws under patient-level DP; None for one process.

    A permutation seeded by ``seed`` alone, so every rank computes the same one, dealt out every ``world_size``-th
    patient: the shards are disjoint, cover every patient, and differ in size by at most one patient. The shards
    stay fixed through training; which rank holds a patient does not change its inclusion law (probability q at
    every step, independently of the others).
    """
    if not ctx.active:
        return None
    import numpy as np

    order = np.random.default_rng(seed + SHARD_SEED_OFFSET).permutation(n_units)
    return np.sort(order[ctx.rank::ctx.world_size])


def local_batch_size(batch_size: int, ctx: DistContext) -> int:
    """Per-rank batch of non-private data-parallel training; the global ``batch_size`` must split evenly."""
    if not ctx.active:
        return batch_size
    if batch_size % ctx.world_size:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly over {ctx.world_size} processes; "
                          f"use a multiple of {ctx.world_size}")
    return batch_size // ctx.world_size


def _every_step_sampler_class():
    from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
    import torch

    class EveryStepSampler(DistributedUniformWithReplacementSampler):
        """Opacus' distributed Poisson sampler, yielding empty local batches instead of skipping them.

        Shards and coin flips are Opacus' (a permutation seeded by ``shuffle_seed`` and the epoch, then every
        ``num_replicas``-th index; each index kept with ``sample_rate``); only the skip of an empty batch
        is gone, so every rank runs exactly ``num_batches`` steps.
        """

        def __iter__(self):
            if self.shuffle:
                g = torch.Generator()
                g.manual_seed(self.shuffle_seed + self.epoch)
                indices = torch.randperm(self.total_size, generator=g)
            else:
                indices = torch.arange(self.total_size)
            indices = indices[self.rank:self.total_size:self.num_replicas]
            for _ in range(self.num_batches):
                keep = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
                yield indices[keep.nonzero(as_tuple=False).reshape(-1)]

    return EveryStepSampler


def poisson_loader(dp_loader, ctx: DistContext, *, seed: int):
    """Opacus' distributed DPDataLoader with :class:`EveryStepSampler` in place of its batch sampler.

    ``dp_loader`` is what ``make_private`` returned for a DPDDP model; the result keeps its dataset, collate
    function (which makes empty batches), workers, pinned memory and ``sample_rate``.
    """
    from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler

    if not ctx.active or not isinstance(dp_loader.batch_sampler, DistributedUniformWithReplacementSampler):
        return dp_loader
    from torch.utils.data import DataLoader

    old = dp_loader.batch_sampler
    sampler = _every_step_sampler_class()(total_size=old.total_size, sample_rate=old.sample_rate,
                                          shuffle=True, shuffle_seed=seed, steps=old.num_batches,
                                          generator=old.generator)
    loader = DataLoader(dp_loader.dataset, batch_sampler=sampler, collate_fn=dp_loader.collate_fn,
                        num_workers=dp_loader.num_workers, pin_memory=dp_loader.pin_memory,
                        timeout=dp_loader.timeout, worker_init_fn=dp_loader.worker_init_fn,
                        multiprocessing_context=dp_loader.multiprocessing_context, generator=dp_loader.generator,
                        prefetch_factor=dp_loader.prefetch_factor, persistent_workers=dp_loader.persistent_workers)
    loader.sample_rate = dp_loader.sample_rate
    return loader


def contiguous_reduce(optimizer, ctx: DistContext) -> None:
    """Make a distributed DP optimizer hand only row-major gradients to its all-reduce.

    The all-reduce sums the ranks' gradient *storage* element by element. In the ew and fast modes, rank 0's
    noisy gradient can be a permuted (dense but not row-major) tensor while another rank's is row-major, so
    the sum would add up different weights' gradients and the ranks would drift apart (seen with Opacus
    1.6 on gloo). Making each gradient contiguous first keeps the sum elementwise-correct.
    """
    if not ctx.active or not hasattr(optimizer, "reduce_gradients"):
        return
    reduce = optimizer.reduce_gradients

    def reduce_gradients():
        for p in optimizer.params:
            if p.grad is not None and not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        return reduce()

    optimizer.reduce_gradients = reduce_gradients


def after_make_private(loader, optimizer, ctx: DistContext, *, seed: int):
    """What the backend applies to ``make_private``'s results under torchrun (no-ops for one process):
    :func:`poisson_loader` for the loader and :func:`contiguous_reduce` for the optimizer."""
    contiguous_reduce(optimizer, ctx)
    return poisson_loader(loader, ctx, seed=seed)


def shard_sampler(dataset, ctx: DistContext, *, seed: int):
    """torch's DistributedSampler for non-private training, reshuffled at every pass (None for one process)."""
    if not ctx.active:
        return None
    from torch.utils.data import DistributedSampler

    class EpochSampler(DistributedSampler):
        def __iter__(self):
            it = super().__iter__()
            self.set_epoch(self.epoch + 1)
            return it

    return EpochSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)


@contextlib.contextmanager
def rank_zero_out(out: Path):
    """``out`` on rank 0 (and in a single process); a scratch folder on the other ranks, removed at the end.

    Every rank of a torchrun launch runs the whole command; this keeps the run directory rank 0's alone.
    """
    if is_main_process():
        yield Path(out)
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"privaudit-rank{os.environ.get('RANK', '')}-"))
    try:
        yield scratch / "run"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
