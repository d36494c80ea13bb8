"""The fast engine inside Opacus: ``FastDPOptimizer`` and ``FastPrivacyEngine``.

Opacus' ``DPOptimizer.pre_step`` clips (``clip_and_accumulate``), then adds noise, scales by the expected
batch size and calls the accountant's hook. ``FastDPOptimizer`` replaces only the first step, taking the
clipped sum from :class:`FastGradSampleModule` instead of from ``p.grad_sample``; Opacus' noise, scaling,
skip-step logic (``BatchMemoryManager``) and accounting run unchanged. ``FastPrivacyEngine`` is Opacus'
``PrivacyEngine`` with one more ``grad_sample_mode``, ``"fast"``: Poisson data loader, noise calibration
(``make_private_with_epsilon``) and accountant are inherited.
"""

from __future__ import annotations

import warnings

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_exp_weights import GradSampleModuleExpandedWeights
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from torch import nn

from privaudit.backends.fastdp._layers import Units
from privaudit.backends.fastdp._module import FastGradSampleModule, unsupported_layers
from privaudit.config import CLIPPING_MODES

# grad-sample modes the opacus backend offers: Opacus' three, and this engine
GRAD_SAMPLE_MODES = CLIPPING_MODES


class FastDPFallbackWarning(UserWarning):
    """--clipping fast was asked for, but the model needs Opacus' hooks mode."""


class FastDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` fed by a :class:`FastGradSampleModule` rather than by ``p.grad_sample``."""

    def __init__(self, optimizer, *, grad_sample_module: FastGradSampleModule, **kwargs):
        super().__init__(optimizer, **kwargs)
        if not isinstance(self.max_grad_norm, (int, float)):
            raise ValueError("the fast engine clips with one flat norm; per-layer norms need --clipping hooks")
        self.grad_sample_module = grad_sample_module
        self._iterations = 1

    def _get_flat_grad_sample(self, p: torch.Tensor):
        return None  # there are none: the module hands over the clipped sum directly

    @property
    def accumulated_iterations(self) -> int:
        return self._iterations

    def clip_and_accumulate(self):
        sums = self.grad_sample_module.clipped_grad_sum(self.max_grad_norm)
        self._iterations = self.grad_sample_module.iterations
        for p in self.params:
            grad = sums.get(p)
            if grad is None:
                raise ValueError("a parameter of the optimizer is not in the model the fast engine wraps")
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad

    def zero_grad(self, set_to_none: bool = False):
        self.grad_sample_module.discard()
        super().zero_grad(set_to_none)


class FastDistributedDPOptimizer(FastDPOptimizer, DistributedDPOptimizer):
    """Under DPDDP: the fast clipping, then Opacus' distributed steps (noise on rank 0, clipped sums all-reduced)."""


class ExpandedWeightsModule(GradSampleModuleExpandedWeights):
    """Opacus' ew mode, except that evaluation and no-grad forward passes run the plain model: torch's expanded
    weights refuse a forward pass while the last step's per-sample gradients are still attached."""

    def forward(self, x, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._module(x, *args, **kwargs)
        return super().forward(x, *args, **kwargs)


class FastPrivacyEngine(PrivacyEngine):
    """Opacus' ``PrivacyEngine`` plus ``grad_sample_mode="fast"``.

    After ``make_private``, ``grad_sample_mode`` is the mode actually used ("hooks" when "fast" fell back,
    with a :class:`FastDPFallbackWarning`) and ``criterion`` is Opacus' ghost-clipping loss wrapper in
    "ghost" mode (None otherwise). ``make_private`` returns what Opacus' does for the mode.
    """

    grad_sample_mode: str = "hooks"
    criterion = None

    def make_private(self, *, module: nn.Module, grad_sample_mode: str = "hooks", **kwargs):
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}; "
                             f"use one of {', '.join(GRAD_SAMPLE_MODES)}")
        if grad_sample_mode == "fast":
            problems = unsupported_layers(module)
            if isinstance(module, nn.parallel.DistributedDataParallel):
                problems = ["torch's DistributedDataParallel (use Opacus' DPDDP under DP)"]
            if kwargs.get("clipping", "flat") != "flat":
                problems = [f"clipping={kwargs['clipping']!r} (the fast engine clips with one flat norm)"]
            if problems:
                warnings.warn(f"--clipping fast cannot handle {problems[0]}; using Opacus' hooks mode for this model "
                              "(same clipping, noise and accounting, slower)", FastDPFallbackWarning, stacklevel=2)
                grad_sample_mode = "hooks"
        self.grad_sample_mode = grad_sample_mode
        self._fast_module = None
        out = super().make_private(module=module, grad_sample_mode=grad_sample_mode, **kwargs)
        self.criterion = out[2] if len(out) == 4 else None
        return out

    def _prepare_model(self, module, *, grad_sample_mode: str = "hooks", **kwargs):
        if (grad_sample_mode == "ew" and kwargs.get("wrap_model", True)
                and not isinstance(module, GradSampleModuleExpandedWeights)):
            self.validate(module=module, optimizer=None, data_loader=None)
            return ExpandedWeightsModule(module, batch_first=kwargs.get("batch_first", True),
                                         loss_reduction=kwargs.get("loss_reduction", "mean"))
        if grad_sample_mode != "fast":
            return super()._prepare_model(module, grad_sample_mode=grad_sample_mode, **kwargs)
        if not kwargs.get("wrap_model", True):
            raise ValueError("the fast engine wraps the model (wrap_model=True)")
        self.validate(module=module, optimizer=None, data_loader=None)
        if isinstance(module, FastGradSampleModule):
            self._fast_module = module
        else:
            self._fast_module = FastGradSampleModule(module, batch_first=kwargs.get("batch_first", True),
                                                     loss_reduction=kwargs.get("loss_reduction", "mean"))
        return self._fast_module

    def _prepare_optimizer(self, *, optimizer, grad_sample_mode: str = "hooks", **kwargs):
        if grad_sample_mode != "fast":
            return super()._prepare_optimizer(optimizer=optimizer, grad_sample_mode=grad_sample_mode, **kwargs)
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        noise_generator = kwargs.pop("noise_generator", None)
        distributed = kwargs.pop("distributed", False)
        kwargs.pop("clipping", None)
        generator = self.secure_rng if self.secure_mode else noise_generator
        cls = FastDistributedDPOptimizer if distributed else FastDPOptimizer
        return cls(optimizer, grad_sample_module=self._fast_module, generator=generator, secure_mode=self.secure_mode,
                   **kwargs)


def sum_grad_samples(model: nn.Module, units: Units) -> None:
    """Hooks mode, patient-level DP: replace each parameter's per-sample gradients (``p.grad_sample``, one row per
    image) by their sums per unit (one row per patient), so that Opacus' optimizer, which clips each row, clips
    each patient's summed gradient as one."""
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if p.requires_grad and gs is not None:
            if not isinstance(gs, torch.Tensor) or len(gs) != len(units.index):
                raise ValueError("per-sample gradients of one backward pass are needed to sum them by patient; "
                                 "call optimizer.step() after every physical batch")
            p.grad_sample = units.to(gs.device).sum(gs)


def forward_backward(model, xb, yb, per_sample_loss, *, engine=None, units: Units | None = None) -> float | None:
    """One physical batch's forward and backward pass as its grad-sample mode needs it.

    ``per_sample_loss(logits, targets)`` gives one loss per sample; the batch loss is their mean (their sum
    over ``max(1, n)``, which stays defined for the empty batches of Poisson sampling: the step then adds
    noise only, as the accountant assumes). Returns the batch's mean loss, None for an empty batch.

    ``units`` (patient-level DP) groups the samples into patients: the optimizer then clips each patient's
    gradient, the sum of its samples' loss gradients, as one (hooks and fast modes).
    """
    mode = engine.grad_sample_mode if engine is not None else None
    n = len(xb)
    if units is not None:
        if mode not in ("hooks", "fast"):
            raise ValueError(f"per-patient clipping needs grad_sample_mode hooks or fast, not {mode!r}")
        if len(units.index) != n:
            raise ValueError(f"{len(units.index)} unit labels for a batch of {n} samples")
        if mode == "fast":
            model.set_units(units)
    if mode == "ew" and n == 0:
        # torch's expanded weights refuse an empty batch: give Opacus the empty per-sample gradients directly
        for p in model.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return None
    if mode == "ghost":
        loss = engine.criterion(model(xb), yb)   # Opacus' DPTensorFastGradientClipping: two backward passes
    else:
        loss = per_sample_loss(model(xb), yb).sum() / max(1, n)
    loss.backward()
    if units is not None and mode == "hooks":
        sum_grad_samples(model, units)
    return float(loss.detach()) if n else None


class PerSampleLoss(nn.Module):
    """A per-sample loss function as an ``nn.Module`` with a ``reduction``, as Opacus' ghost clipping needs."""

    def __init__(self, fn, reduction: str = "mean"):
        super().__init__()
        self.fn, self.reduction = fn, reduction

    def forward(self, logits, targets):
        loss = self.fn(logits, targets)
        if self.reduction == "none":
            return loss
        return loss.sum() / max(1, len(loss)) if self.reduction == "mean" else loss.sum()
