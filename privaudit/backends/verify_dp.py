"""``privaudit verify-dp``: a white-box test, in one training run, that a DP-SGD pipeline is as private as its
accountant says (opacus backend here; the tf backend's instrument is ``verify_dp_tf``).

The run is an ordinary ``train`` of the opacus backend (same task, data, model, clipping mode, sampler,
noise, optimizer and, under torchrun, all-reduce) with ``m`` *gradient canaries* added:

* **Rows of the training set.** Each canary is included with probability 1/2 (seeded); the included ones are
  appended to the training set as ordinary units (``plan_training``'s ``extra_rows``), counted in N, delta and the
  sample rate, and drawn by the pipeline's own Poisson sampler like any other row. A canary row is an image
  whose first two pixels carry a marker (a value no image in [0, 1] can take) and the canary's number, and
  whose labels are all unknown (so its own loss, and gradient, is zero).
* **Injection.** A forward pre-hook on the model reads which rows of each physical batch are canaries; after
  the backward pass, before the optimizer clips (``clip_and_accumulate``), each canary row's per-sample
  gradient (Opacus' ``p.grad_sample``) is replaced by ``CANARY_NORM * C`` times the canary's direction: a
  random unit vector supported on the canary's own block of the parameters (the parameters are split at
  random into m disjoint blocks, so that the directions are orthogonal). From there on it is the pipeline's:
  a correct one clips it to norm C, adds the noise, scales, all-reduces and steps.
* **Observation.** Just before the wrapped torch optimizer steps, the auditor reads the gradient it is about
  to apply (noised, scaled by Opacus' expected batch size, and all-reduced), undoes the scaling, and projects
  the noised sum on every canary's direction, in units of C.
* **Scores and bounds** (``privaudit.audit.whitebox``): each canary's score is the sum over steps of the
  per-step log-likelihood ratio under the *accounted* q and sigma; the empirical epsilon follows from
  Steinke et al.'s and from the f-DP (Mahloujifar et al.) analysis; the ideal Gaussian mechanism with the same
  (sigma, q, steps, m) is simulated for comparison. Two checks test the mechanism against its accounted
  parameters: the noise along the excluded canaries' directions, and the included canaries' signal (sample rate
  and clipping). Verdict: "violation" when the f-DP empirical epsilon at the given confidence exceeds the
  accountant's epsilon or a check fails (``whitebox.evaluate``), else "no violation detected".

The hooks and ew clipping modes materialise ``p.grad_sample``, where the canaries are injected. The fast engine
(``privaudit.backends.fastdp``) keeps per-layer book-keeping instead; there the canary rows' share joins the
batch's book-keeping before the engine computes norms and clip factors (``_fast_terms``), so the engine's own
clipping handles them. Ghost clipping keeps no per-sample state that could take them, so verify-dp refuses it
(a canary injected after its clipping would bypass it).

**Patient-level DP** (``privacy_unit="patient"``, hooks or fast clipping): each included canary is a patient of
its own, ``ROWS_PER_CANARY`` (2) rows sharing one unit id (``plan_training``'s extra-row owners), drawn by the
patient Poisson sampler at the patient rate q. Each row carries 1/ROWS_PER_CANARY of the canary's gradient: a
correct pipeline sums the patient's rows (CANARY_NORM * C along the direction) and clips the sum to C, while one
that clips each image first lets ROWS_PER_CANARY * C through, which the sampling check and the epsilon see. The
gradient must be set before the per-patient sum: in hooks mode the backward pass is followed at once by
``fastdp.sum_grad_samples``, so the canary rows of ``p.grad_sample`` are set by a callback that autograd runs when
the backward pass ends (queued from a gradient hook on the model's output), before that sum; the fast engine's
canary share is summed per canary patient and laid on it through the engine's own unit index. From there the patient is summed, clipped and noised like any other. Scoring uses the run's patient-level
q, sigma, C and steps, as the accountant does. Under torchrun each canary patient is dealt to one process by the
patient shard (``distributed.patient_shard``), like a real patient, and drawn there at the global rate; a
process whose draw is empty still steps (its forward pass sees no rows). Every process observes the all-reduced
noised sum; rank 0 scores it. The tf backend's patient-level step is instrumented in ``verify_dp_tf``.

**Faults, for tests only.** ``fault=`` (or the environment variable ``PRIVAUDIT_TEST_FAULT`` when ``fault`` is
None) breaks the pipeline on purpose, each fault making it less private than its accountant says:
``no-clipping`` (per-sample gradients are not clipped), ``low-noise:F`` (noise multiplied by F < 1 while the
accountant counts the full noise), ``double-rate`` (the sampler draws with twice the accounted sample rate)
``rank-noise`` (under torchrun every process adds its own noise with sigma / world_size, as a naive
data-parallel port would; the all-reduced sum then holds sigma / sqrt(world_size)) and ``per-image-clipping``
(patient level only: each image is clipped to C before the per-patient sum, which is not clipped again, while the
accountant counts patients; hooks: every row of ``p.grad_sample`` is clipped before ``sum_grad_samples``; fast:
the engine is given no units, so it clips images). ``verify.json`` names the fault, so a faulted result is never
mistaken for a real one.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from privaudit._fs import write_json
from privaudit.audit import whitebox
from privaudit.errors import ConfigError, OutputExistsError

FAULT_ENV = "PRIVAUDIT_TEST_FAULT"
FAULTS = ("no-clipping", "low-noise", "double-rate", "rank-noise", "per-image-clipping")
SCHEMA = "privaudit.verify/1"
CANARY_NORM = 100.0     # the injected per-sample gradient norm, in units of the clipping norm C
# Rows of one canary patient under patient-level DP: each row carries 1/ROWS_PER_CANARY of the canary's gradient, so
# a pipeline that clips each image before the per-patient sum lets ROWS_PER_CANARY * C through (one row per canary
# at the image level)
ROWS_PER_CANARY = 2
MARK = -1000.0          # first pixel of a canary row (raw scale; images hold [0, 1])
MIN_CANARIES = 20
IDEAL_REPS = 20
SEED_OFFSET = 104729    # the canaries' generator is seeded with seed + SEED_OFFSET (inclusion, directions)
SUPPORTED_CLIPPING = ("hooks", "ew", "fast")


class _CanaryRows:
    """The key of the canaries' share in a fast-engine batch's book-keeping (``batch.terms``)."""

    __name__ = "gradient canaries"


def parse_fault(spec: str | None) -> tuple[str, float] | None:
    """``"low-noise:0.5"`` -> ("low-noise", 0.5); the other faults take no factor. None for no fault."""
    if spec is None or str(spec).strip() == "":
        return None
    name, _, arg = str(spec).strip().partition(":")
    if name not in FAULTS:
        raise ConfigError(f"unknown fault {name!r} (a test-only switch); use one of {', '.join(FAULTS)}")
    if name == "low-noise":
        try:
            factor = float(arg)
        except ValueError:
            raise ConfigError(f"fault low-noise needs its noise factor, e.g. low-noise:0.5; got {spec!r}") from None
        if not 0 <= factor < 1:
            raise ConfigError(f"fault low-noise:{arg} must scale the noise by a factor in [0, 1)")
        return name, factor
    if arg:
        raise ConfigError(f"fault {name} takes no factor; got {spec!r}")
    return name, 1.0


class GradientCanaries:
    """The instrument the opacus backend calls (``OpacusBackend.train(instrument=...)``): it adds the canary
    rows to the training plan, injects their gradients and records each step's projections."""

    def __init__(self, m: int, *, seed: int, fault: tuple[str, float] | None = None):
        self.m, self.seed, self.fault = int(m), int(seed), fault
        rng = np.random.default_rng(seed + SEED_OFFSET)
        self.included = rng.random(self.m) < 0.5
        self._direction_seed = int(rng.integers(0, 2**32))
        self.projections: list[np.ndarray] = []   # one (m,) array per optimizer step, in units of C
        self._pending: list = []
        self.rank, self.world_size, self.n_params, self.grad_sample_mode = 0, 1, None, None
        self.privacy_unit = "image"
        self.rows_per_canary = 1   # rows a canary has in training: ROWS_PER_CANARY under the patient unit (attach)

    # ---- before training ----------------------------------------------------------------------------------
    def rows(self, *, task, size: int, n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The included canaries' rows (images, labels, owner) for ``plan_training``'s ``extra_rows``:
        ``ROWS_PER_CANARY`` identical rows per canary, its number the owner, so that under the patient unit a
        canary is one patient of several rows (the plan keeps one row per canary under the image unit)."""
        ids = np.repeat(np.flatnonzero(self.included), ROWS_PER_CANARY)
        shape = (task.in_channels,) + (size,) * task.spatial_dims
        x = np.zeros((len(ids), *shape), np.float32)
        flat = x.reshape(len(ids), -1)
        flat[:, 0] = MARK
        flat[:, 1] = ids
        y = np.full((len(ids), n_labels), np.nan, np.float32)
        return x, y, ids

    def directions(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """The canaries' directions over ``d`` flat parameters: ``(owner, vals)``, canary ``owner[i]``'s direction
        having ``vals[i]`` at parameter i and 0 elsewhere. The parameters are split at random into m disjoint
        blocks, and canary j's direction is a random unit vector on block j, so the directions are orthogonal."""
        if d < self.m:
            raise ConfigError(f"the model has {d} trainable parameters, fewer than the {self.m} gradient canaries "
                              "(each needs its own); use fewer canaries or a wider model")
        rng = np.random.default_rng(self._direction_seed)
        owner = rng.permutation(d) % self.m
        vals = rng.standard_normal(d)
        vals /= np.sqrt(np.bincount(owner, weights=vals**2, minlength=self.m))[owner]
        return owner, vals

    def attach(self, *, model, optimizer, loader, engine, ddp) -> None:
        import torch

        if engine is None:
            raise ConfigError("verify-dp tests a DP training run; it needs DP (leave out --no-dp)")
        self.grad_sample_mode = engine.grad_sample_mode
        if self.grad_sample_mode not in SUPPORTED_CLIPPING:
            raise ConfigError(f"verify-dp injects its canaries into the per-sample gradients, which --clipping "
                              f"{self.grad_sample_mode} never keeps; use --clipping hooks, ew or fast")
        from privaudit.backends.opacus_backend import _PatientLoader

        self.rank, self.world_size, self.device = ddp.rank, ddp.world_size, ddp.device
        # patient-level DP: each canary is a patient of its own (ROWS_PER_CANARY rows), drawn by the patient sampler
        self.privacy_unit = "patient" if isinstance(loader, _PatientLoader) else "image"
        self.rows_per_canary = ROWS_PER_CANARY if self.privacy_unit == "patient" else 1
        if self.fault and self.fault[0] == "per-image-clipping" and self.privacy_unit != "patient":
            raise ConfigError("fault per-image-clipping needs privacy_unit 'patient' (at the image level it is the "
                              "correct pipeline)")
        self.optimizer = optimizer
        self.clip_norm = float(optimizer.max_grad_norm)   # the accounted C (a fault may change the optimizer's)
        self.params = list(optimizer.params)
        sizes = [p.numel() for p in self.params]
        d = int(sum(sizes))
        self.n_params = d
        self.offsets = np.r_[0, np.cumsum(sizes)]
        owner, vals = self.directions(d)
        order = np.argsort(owner, kind="stable")
        self._starts = np.searchsorted(owner[order], np.arange(self.m + 1))
        self._order = torch.as_tensor(order, dtype=torch.long, device=self.device)
        self._sorted_vals = torch.as_tensor(vals[order], dtype=torch.float32, device=self.device)
        self._owner = torch.as_tensor(owner, dtype=torch.long, device=self.device)
        self._vals = torch.as_tensor(vals, dtype=torch.float32, device=self.device)
        self._scale = self._world = None
        self._hooks(model, optimizer, loader)

    def _hooks(self, model, optimizer, loader) -> None:
        from opacus.optimizers import DPOptimizer

        from privaudit.backends.opacus_backend import PIXEL_MEAN, PIXEL_STD

        mark = (MARK - PIXEL_MEAN) / PIXEL_STD
        fault = self.fault[0] if self.fault else None

        def record(module, args):
            import torch

            if not (module.training and torch.is_grad_enabled()) or not args:
                return
            xb = args[0]
            if len(xb) == 0:   # an empty draw (a rank's shard under torchrun often has none): no canary rows
                self._pending.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                return
            flat = xb.detach().reshape(len(xb), -1)
            rows = torch.nonzero(flat[:, 0] < mark / 2).reshape(-1)
            ids = torch.round(flat[rows, 1] * PIXEL_STD + PIXEL_MEAN).long()
            if self._pending:
                raise RuntimeError("verify-dp saw two training forward passes without an optimizer step between")
            self._pending.append((rows.cpu().numpy(), ids.cpu().numpy()))

        model.register_forward_pre_hook(record)

        clip = optimizer.clip_and_accumulate
        fast = self.grad_sample_mode == "fast"
        by_patient = self.privacy_unit == "patient" and not fast
        if by_patient:
            # Hooks mode sums p.grad_sample's rows by patient right after the backward pass
            # (fastdp.sum_grad_samples), before the optimizer clips: the canary rows must be set before that sum,
            # so they are set when autograd finishes the backward pass (Opacus' hooks have then filled
            # p.grad_sample), by a callback queued from the model output's gradient hook.
            from torch.autograd import Variable

            def inject_pending():
                rows, ids = self._pending.pop() if self._pending else (np.zeros(0, np.int64), None)
                if len(rows):
                    self._inject(rows, ids)
                if fault == "per-image-clipping":
                    self._clip_rows()

            def queue(grad):
                Variable._execution_engine.queue_callback(inject_pending)

            def watch_output(module, args, output):
                import torch

                if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) \
                        and output.requires_grad:
                    output.register_hook(queue)

            model.register_forward_hook(watch_output)

        def clip_and_accumulate():
            if by_patient:   # injected at the end of the backward pass (above); an empty batch may have none
                rows, _ = self._pending.pop() if self._pending else (np.zeros(0, np.int64), None)
                if len(rows):
                    raise RuntimeError("verify-dp's canary rows reached the optimizer without their injection")
            elif not fast:   # the fast engine has no p.grad_sample: its book-keeping takes the canaries (below)
                rows, ids = self._pending.pop() if self._pending else (np.zeros(0, np.int64), None)
                if len(rows):
                    self._inject(rows, ids)
            # per-image-clipping (hooks): each image was clipped before the per-patient sum (_clip_rows), which is
            # then not clipped again; on the fast engine the units are dropped instead (below)
            if fault == "no-clipping" or (fault == "per-image-clipping" and not fast):
                c = optimizer.max_grad_norm
                optimizer.max_grad_norm = float("inf")
                try:
                    return clip()
                finally:
                    optimizer.max_grad_norm = c
            return clip()

        optimizer.clip_and_accumulate = clip_and_accumulate
        if fast:
            module = optimizer.grad_sample_module
            clipped_sum = module.clipped_grad_sum
            key = _CanaryRows()

            def clipped_grad_sum(max_grad_norm):
                for batch in module._batches:
                    if not (batch.backward_seen or batch.n == 0):
                        continue
                    rows, ids = self._pending.pop(0) if self._pending else (np.zeros(0, np.int64), None)
                    if len(rows) and batch.n:
                        batch.terms[key] = self._fast_terms(rows, ids, batch.n, module.loss_reduction, batch.units)
                return clipped_sum(max_grad_norm)

            module.clipped_grad_sum = clipped_grad_sum
            if fault == "per-image-clipping":
                set_units = module.set_units
                # the engine is told no units: it clips every image, and sums the clipped images (patients too)
                module.set_units = lambda units: set_units(None)

        add_noise = optimizer.add_noise
        if fault == "low-noise":
            factor = self.fault[1]

            def noisy():
                nm = optimizer.noise_multiplier
                optimizer.noise_multiplier = nm * factor
                try:
                    return add_noise()
                finally:
                    optimizer.noise_multiplier = nm

            optimizer.add_noise = noisy
        elif fault == "rank-noise":
            if self.world_size < 2:
                raise ConfigError("fault rank-noise needs torchrun with 2 or more processes")

            import torch

            # each process draws its own noise, as a port seeding by rank would (with one shared seed the ranks'
            # noises would coincide and add up to the full sigma)
            own = torch.Generator(device=self.device).manual_seed(self.seed * 1009 + self.rank + 1)

            def every_rank():
                nm, gen = optimizer.noise_multiplier, optimizer.generator
                optimizer.noise_multiplier, optimizer.generator = nm / self.world_size, own
                try:
                    return DPOptimizer.add_noise(optimizer)   # every rank, not only rank 0
                finally:
                    optimizer.noise_multiplier, optimizer.generator = nm, gen

            optimizer.add_noise = every_rank
        elif fault == "double-rate":
            # Opacus' Poisson sampler of images, or privaudit's of patients
            sampler = loader.sampler if self.privacy_unit == "patient" else loader.batch_sampler
            if not hasattr(sampler, "sample_rate"):
                raise ConfigError("fault double-rate needs a Poisson sampler")
            sampler.sample_rate = min(1.0, 2 * sampler.sample_rate)

        scale_grad = optimizer.scale_grad

        def record_scale():
            self._scale = (optimizer.expected_batch_size * optimizer.accumulated_iterations
                           if optimizer.loss_reduction == "mean" else 1.0)
            return scale_grad()

        optimizer.scale_grad = record_scale
        if hasattr(optimizer, "reduce_gradients"):
            reduce = optimizer.reduce_gradients

            def record_reduce():
                self._world = optimizer.world_size if optimizer.loss_reduction == "mean" else 1
                return reduce()

            optimizer.reduce_gradients = record_reduce

        inner = optimizer.original_optimizer
        step = inner.step

        def observed_step(*args, **kwargs):
            self._observe()
            return step(*args, **kwargs)

        inner.step = observed_step

    # ---- during training ----------------------------------------------------------------------------------
    def _inject(self, rows: np.ndarray, ids: np.ndarray) -> None:
        """Replace the per-sample gradients of the canary rows by CANARY_NORM * C * their directions, divided among
        the canary's rows (``rows_per_canary``): a canary patient's sum is CANARY_NORM * C along its direction."""
        import torch

        with torch.no_grad():
            vec = self._canary_vectors(ids, self.clip_norm) / self.rows_per_canary
            rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.device)
            for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
                gs = p.grad_sample
                if not isinstance(gs, torch.Tensor):
                    raise RuntimeError("verify-dp expects one per-sample gradient tensor per parameter and step")
                gs[rows_t.to(gs.device)] = vec[:, a:b].reshape(len(rows), *p.shape).to(gs.device, gs.dtype)

    def _clip_rows(self) -> None:
        """Fault per-image-clipping (hooks): clip every row of ``p.grad_sample`` (one image each) to norm C, before
        the per-patient sum, as a pipeline clipping images while accounting patients would."""
        import torch

        with torch.no_grad():
            gs = [p.grad_sample for p in self.params]
            if not all(isinstance(g, torch.Tensor) for g in gs) or not len(gs[0]):   # an empty draw: no images
                return
            norms = torch.sqrt(sum(g.reshape(len(g), -1).float().square().sum(dim=1) for g in gs))
            factor = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(self.params, gs):
                p.grad_sample = g * factor.to(g.device, g.dtype).reshape(-1, *([1] * (g.dim() - 1)))

    def _fast_terms(self, rows: np.ndarray, ids: np.ndarray, n: int, loss_reduction: str, units=None):
        """The canary rows' share of a fast-engine batch: their squared per-unit norms and their clipped sum.

        The fast engine keeps per-sample gradients of the batch's loss (the mean over n rows, so each 1/n of the
        row's own gradient) and multiplies norms and clip factors by n; the canary share is kept in those units,
        so that the engine's own clipping sees a gradient of norm CANARY_NORM * C on each canary row.

        Under patient-level DP (``units``, the batch's ``fastdp.Units``) the engine's norms and clip factors are
        per patient: each canary row's share goes to its patient's entry, looked up in the engine's own unit
        index: the patient's rows are summed (their squared norm is the sum's), and that sum joins the patient's
        other terms (a canary row's own loss gradient is zero), then is clipped with the patient's clip factor.
        """
        import torch

        from privaudit.backends.fastdp._layers import LayerTerms

        scale = float(n) if loss_reduction == "mean" else 1.0
        vec = self._canary_vectors(ids, self.clip_norm) / (scale * self.rows_per_canary)
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if units is not None:
            # a canary patient's rows are summed first: its norm is that of the sum (CANARY_NORM * C), not the root
            # of its rows' squared norms
            at, inverse = torch.unique(units.index.to(self.device)[rows_t], return_inverse=True)
            vec = torch.zeros((len(at), vec.shape[1]), dtype=vec.dtype, device=self.device).index_add_(0, inverse, vec)
            sq = torch.zeros(units.count, dtype=torch.float32, device=self.device)
            sq[at] = vec.square().sum(dim=1)
        else:
            at = rows_t
            sq = torch.zeros(n, dtype=torch.float32, device=self.device)
            sq[rows_t] = vec.square().sum(dim=1)

        def clipped_sum(coef):
            weighted = coef.to(self.device, torch.float32)[at][:, None] * vec
            total = weighted.sum(dim=0)
            return {p: total[a:b].reshape(p.shape) for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:])}

        return LayerTerms(sq, clipped_sum, "canary")

    def _canary_vectors(self, ids: np.ndarray, c: float):
        """(len(ids), n_params): CANARY_NORM * C times each canary's direction, flat over the parameters."""
        import torch

        vec = torch.zeros((len(ids), self.n_params), dtype=torch.float32, device=self.device)
        for r, j in enumerate(ids):
            a, b = self._starts[j], self._starts[j + 1]
            vec[r, self._order[a:b]] = self._sorted_vals[a:b] * (CANARY_NORM * c)
        return vec

    def _observe(self) -> None:
        """Project the step's noised gradient sum on every canary direction (units of C)."""
        import torch

        if self._scale is None:
            raise RuntimeError("verify-dp could not see the optimizer's scaling of the noised gradient")
        factor = self._scale * (self._world or 1) / self.clip_norm
        with torch.no_grad():
            g = torch.cat([p.grad.reshape(-1).float() for p in self.params]).to(self.device) * factor
            proj = torch.zeros(self.m, dtype=torch.float32, device=self.device).index_add_(0, self._owner, self._vals * g)
        self.projections.append(proj.cpu().numpy())
        self._scale = self._world = None


def _check(config, gradient_canaries: int, confidence: float) -> None:
    if config.backend not in ("opacus", "tf"):
        raise ConfigError(f"verify-dp runs the opacus and tf backends; --backend {config.backend} is not supported")
    if config.backend == "tf":
        from privaudit.backends.distributed import launch_env

        if launch_env() is not None:   # every process would train on its own and write alone
            raise ConfigError("verify-dp runs the tf backend in one process (it trains on one device); run it "
                              "without torchrun, or use --backend opacus under torchrun")
    if not config.dp.enabled:
        raise ConfigError("verify-dp tests a DP training run; it needs DP (leave out --no-dp)")
    if config.dp.noise_multiplier == 0:
        raise ConfigError("verify-dp needs noise: a clip-only run (--noise-multiplier 0) claims no epsilon to test")
    if config.canaries:
        raise ConfigError("verify-dp brings its own gradient canaries; leave out --canaries")
    if config.backend == "opacus" and config.clipping not in SUPPORTED_CLIPPING:
        raise ConfigError(f"verify-dp injects its canaries into the per-sample gradients, which --clipping "
                          f"{config.clipping} never keeps; use --clipping hooks, ew or fast")
    if int(gradient_canaries) < MIN_CANARIES:
        raise ConfigError(f"gradient_canaries must be at least {MIN_CANARIES}, got {gradient_canaries}; "
                          "1000 or more give a useful bound")
    if not 0.5 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0.5, 1), got {confidence}")


# Each backend's gradient-canary instrument, by (module, class), imported when used (as the backend registry
# does): the tf instrument builds on this module, so importing it here would tie the two modules into a loop.
INSTRUMENTS = {"opacus": ("privaudit.backends.verify_dp", "GradientCanaries"),
               "tf": ("privaudit.backends.verify_dp_tf", "TfGradientCanaries")}


def instrument_class(backend: str):
    """The gradient-canary instrument class of a backend."""
    import importlib

    module, name = INSTRUMENTS[backend]
    return getattr(importlib.import_module(module), name)


def verify_dp(manifest, config, out_dir, *, gradient_canaries: int = 1000, confidence: float = 0.99,
              fault: str | None = None, seed: int = 0, progress=None, ideal_reps: int = IDEAL_REPS) -> dict:
    """Train once with ``gradient_canaries`` gradient canaries, audit the run, write ``out_dir/verify.json``
    (and ``verify_scores.csv``) and return verify.json's content.

    ``manifest``: a ``privaudit.data.manifest.Manifest``; ``config``: the ``TrainConfig`` of the pipeline to
    test (DP on, no input-space canaries; opacus with clipping hooks, ew or fast, or tf; the privacy unit as
    ``train`` resolves it: patient-level on opacus with hooks or fast and on tf). ``seed`` seeds the canaries
    (inclusion, directions) and the ideal simulation; training uses ``config.seed``. ``fault`` is for tests
    (see the module docstring); None reads ``PRIVAUDIT_TEST_FAULT``. ``progress(message)`` is told each stage.
    Under torchrun every process trains; only rank 0 scores and writes, and the others return
    ``{"rank": r, "written": False}``. The result's ``verdict`` is "violation" or "no violation detected".
    """
    from privaudit.backends import create_backend

    _check(config, gradient_canaries, confidence)
    spec = fault if fault is not None else os.environ.get(FAULT_ENV)
    parsed = parse_fault(spec)
    out_dir = Path(out_dir)
    for name in ("verify.json", "verify_scores.csv"):
        if (out_dir / name).exists():
            raise OutputExistsError(f"{out_dir / name} already exists; choose another output directory")
    say = progress or (lambda message: None)

    inst = instrument_class(config.backend)(gradient_canaries, seed=seed, fault=parsed)
    backend = create_backend(config.backend)
    say(f"training with {gradient_canaries} gradient canaries")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="privaudit-verify-") as tmp:
        train_json = backend.train(manifest, config, Path(tmp) / "run", quiet=True, instrument=inst)
    if inst.rank != 0:
        return {"rank": inst.rank, "written": False}
    privacy = train_json["privacy"]
    sigma, q, steps = float(privacy["noise_multiplier"]), float(privacy["sample_rate"]), int(privacy["steps"])
    eps, delta = float(privacy["epsilon"]), float(privacy["delta"])
    proj = np.stack(inst.projections) if inst.projections else np.zeros((0, inst.m), np.float32)
    if len(proj) != steps:
        raise RuntimeError(f"verify-dp observed {len(proj)} noised gradients but the accountant counted {steps} steps")

    say("scoring the canaries")
    res = whitebox.evaluate(proj, inst.included, sigma=sigma, q=q, delta=delta, eps_accountant=eps,
                            confidence=confidence)
    scores, found = res["scores"], res["empirical_epsilon"]
    say(f"simulating the ideal mechanism ({ideal_reps} runs)")
    ideal = whitebox.ideal_bounds(inst.m, sigma=sigma, q=q, steps=steps, delta=delta, eps_accountant=eps,
                                  confidence=confidence, reps=ideal_reps, seed=seed)
    fdp = found["fdp"]["estimate"]
    ideal_median = ideal["fdp"]["median"]
    result = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": res["verdict"],
        "fired": res["fired"],
        "confidence": confidence,
        "tests": res["tests"],
        "fault": None if parsed is None else {"name": parsed[0], "factor": parsed[1],
                                              "note": "injected on purpose by the test-only fault switch"},
        "accountant": {k: privacy.get(k) for k in ("epsilon", "delta", "accountant", "noise_multiplier",
                                                   "max_grad_norm", "sample_rate", "steps", "poisson_sampling",
                                                   "privacy_unit", "n_units")},
        "empirical_epsilon": found,
        "steinke_exceeds_accountant": bool(found["steinke"]["estimate"] > eps),
        "ideal": ideal,
        "ratio_to_ideal": None if ideal_median <= 0 else fdp / ideal_median,
        # share of the ideal runs whose f-DP bound is at most the harness's: about 1/2 when the canaries reach the
        # mechanism as cleanly as in the ideal (a single bound varies a lot from run to run)
        "ideal_percentile": float(np.mean(np.asarray(ideal["fdp"]["runs"]) <= fdp)),
        "canaries": {
            "m": inst.m, "n_included": int(inst.included.sum()), "inclusion_probability": 0.5,
            "seed": seed + SEED_OFFSET, "norm_in_clipping_norms": CANARY_NORM, "n_parameters": inst.n_params,
            # rows (images) of one canary unit, each with 1/rows_per_canary of its gradient: a canary patient has
            # ROWS_PER_CANARY, so that clipping images instead of patients lets rows_per_canary * C through
            "rows_per_canary": inst.rows_per_canary,
            "direction": "random unit vector on a random block of the parameters, one disjoint block per canary",
            "statistic": "sum over steps of log(1 - q + q exp((x - C/2) C / (sigma C)^2)), x the projection of "
                         "the step's noised gradient sum on the canary's direction",
            "scores_file": "verify_scores.csv",
        },
        "run": {"backend": config.backend, "clipping": inst.grad_sample_mode, "task": config.task,
                "privacy_unit": privacy.get("privacy_unit"),
                "arch": train_json.get("architecture"), "width": config.width, "image_size": config.image_size,
                "batch_size": config.batch_size, "epochs": config.epochs, "train_seed": config.seed,
                "n_train": train_json.get("n_train"), "world_size": inst.world_size,
                "seconds": round(time.perf_counter() - t0, 2)},
        "versions": {**train_json.get("versions", {}), "python": platform.python_version()},
    }
    import pandas as pd

    from privaudit._fs import atomic_write_csv, private_mkdir

    private_mkdir(out_dir)
    table = pd.DataFrame({"canary_id": [f"gcanary{i:05d}" for i in range(inst.m)],
                          "included": inst.included.astype(int), "score": scores})
    atomic_write_csv(out_dir / "verify_scores.csv", table, mode=None, index=False, lineterminator="\n",
                     float_format="%.17g")
    write_json(out_dir / "verify.json", result)
    say(f"{result['verdict']}: f-DP empirical epsilon {fdp:.3g} vs the accountant's {eps:.3g}; noise "
        f"{res['tests']['noise']['std_ratio']:.3g} and sample rate {res['tests']['sampling']['rate_ratio']:.3g} "
        "times the accounted")
    return result
