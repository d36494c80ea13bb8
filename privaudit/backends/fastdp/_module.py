"""``FastGradSampleModule``: one forward and one backward pass give per-sample norms and the clipped sum.

During a training forward pass the trainable parameters are switched to ``requires_grad=False``, so that
autograd's backward pass computes the gradients with respect to activations only and skips the (expensive,
and for DP useless) non-private weight gradients. Forward hooks keep each supported layer's input; a hook on
the layer's output tensor receives the gradient of the loss with respect to that output during the ordinary
``loss.backward()``. As soon as a layer has all its output gradients, its per-sample norms are computed
(ghost or materialised, see ``_layers``). :meth:`clipped_grad_sum` then turns the norms into Opacus' clip
factors and forms the clipped gradient sum by book-keeping. ``FastDPOptimizer`` (an Opacus ``DPOptimizer``)
adds Opacus' noise and steps; the accountant and ``BatchMemoryManager`` are Opacus' own.

Patient-level DP: :meth:`FastGradSampleModule.set_units` before a forward pass says which patient each sample
belongs to; that batch's norms and clip factors are then per patient, of the sum of its samples' gradients
(``_layers.Units``).

Guards that turn would-be silent errors into exceptions: a parameter of a hooked layer used outside that
layer's ``forward`` (weight tying by hand, ``F.linear(x, self.fc.weight)``) and an activation modified in place
after the layer read it both raise :class:`FastDPError`.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.overrides import TorchFunctionMode

from privaudit.backends.fastdp._layers import Units, terms_for, unsupported_reason

FALLBACK_HINT = "use --clipping hooks (Opacus' per-sample gradients) for this model"


class FastDPError(RuntimeError):
    """The fast engine met a use of the model that it cannot clip exactly."""


class UnsupportedModelError(NotImplementedError):
    """The model has a trainable layer the fast engine does not handle."""


def unsupported_layers(model: nn.Module) -> list[str]:
    """``"name (Type): reason"`` for each trainable layer the fast engine cannot handle; empty if none."""
    out = []
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        reason = unsupported_reason(module)
        if reason:
            out.append(f"{name or type(model).__name__} ({type(module).__name__}): {reason}")
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{name}.{pname}" if name else pname
            if id(p) in owner:
                out.append(f"{full}: the same parameter as {owner[id(p)]} (shared between layers)")
            owner.setdefault(id(p), full)
    return out


class _Batch:
    """What one training forward pass captured, until the optimizer consumes it."""

    def __init__(self):
        self.n: int | None = None
        self.acts: dict[nn.Module, list] = {}        # layer -> [(input, version at capture)] per use
        self.grads: dict[nn.Module, dict] = {}       # layer -> {use: output gradient}
        self.terms: dict = {}                        # layer -> LayerTerms once its gradients are in
        self.trainable: dict[nn.Module, bool] = {}
        self.backward_seen = False
        self.anchor: torch.Tensor | None = None
        self.units: Units | None = None              # patient-level DP: the unit of each sample


class _ParamUseGuard(TorchFunctionMode):
    """Raise when a hooked layer's parameter enters a torch op outside that layer's own forward."""

    def __init__(self, owners: dict[int, nn.Module], active: list):
        super().__init__()
        self.owners, self.active = owners, active

    def _check(self, t):
        layer = self.owners.get(id(t))
        if layer is not None and (not self.active or self.active[-1] is not layer):
            raise FastDPError(
                f"a parameter of {type(layer).__name__} is used outside that layer's forward (e.g. tied weights or "
                f"a functional call), so its per-sample gradient cannot be attributed; {FALLBACK_HINT}"
            )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for group in (args, kwargs.values()):
            for a in group:
                if isinstance(a, torch.Tensor):
                    self._check(a)
                elif isinstance(a, (list, tuple)):
                    for b in a:
                        if isinstance(b, torch.Tensor):
                            self._check(b)
        return func(*args, **kwargs)


class FastGradSampleModule(AbstractGradSampleModule):
    """Wraps a model so that ``loss.backward()`` yields per-sample norms and the clipped sum by book-keeping.

    ``loss_reduction`` is Opacus' meaning: "mean" when the loss is the batch mean of per-sample losses (the
    output gradients are then multiplied by the batch size, as Opacus does), "sum" for the sum.
    ``force`` ("ghost" or "materialise") overrides the per-layer choice (tests use it).
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 strict: bool = True, force: str | None = None):
        problems = unsupported_layers(m)
        if problems:
            raise UnsupportedModelError(f"the fast engine cannot handle {problems[0]}; {FALLBACK_HINT}")
        if not batch_first:
            raise NotImplementedError("the fast engine needs batch-first inputs")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if force not in (None, "ghost", "materialise"):
            raise ValueError(f"force must be None, 'ghost' or 'materialise', got {force!r}")
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.force = force
        self.hooks_enabled = True
        self.grad_accumulation_allowed = True
        self._layers = [mod for mod in m.modules() if any(True for _ in mod.parameters(recurse=False))
                        and terms_for_safe(mod)]
        self._names = {mod: name for name, mod in m.named_modules()}
        self._batches: list[_Batch] = []
        self._current: _Batch | None = None
        self._active: list = []
        self._handles = []
        for mod in self._layers:
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook))
            self._handles.append(mod.register_forward_hook(self._post_hook))
        self.last_per_sample_norms: torch.Tensor | None = None   # per unit when the batch had units
        self.last_layer_modes: dict[str, str] = {}
        self.iterations = 1
        self._next_units: Units | None = None

    def set_units(self, units: Units | None) -> None:
        """Group the samples of the next training forward pass into units (patients): each unit's gradient is
        the sum of its samples', and it is clipped as one. None: every sample is its own unit."""
        self._next_units = units

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled() and self.hooks_enabled):
            self._next_units = None        # units label a training forward pass only
            return self._module(*args, **kwargs)
        self._batches = [b for b in self._batches if b.backward_seen]   # forward passes never backpropagated
        if self._batches and not self.grad_accumulation_allowed:
            raise ValueError("Poisson sampling is not compatible with grad accumulation. You need to call "
                             "optimizer.step() after every forward/backward pass or consider using BatchMemoryManager")
        batch = _Batch()
        batch.units, self._next_units = self._next_units, None
        self._batches.append(batch)
        self._current = batch
        self._active.clear()
        owners = {}
        for mod in self._layers:
            for p in mod.parameters(recurse=False):
                if p.requires_grad:
                    owners[id(p)] = mod
                    batch.trainable[mod] = True
        toggled = [p for p in self._module.parameters() if id(p) in owners]
        if sum(p.requires_grad for p in self._module.parameters()) != len(toggled):
            raise FastDPError(f"a parameter outside the engine's layers now requires grad; {FALLBACK_HINT}")
        # Autograd then builds no edges to the weights: backward computes activation gradients only.
        for p in toggled:
            p.requires_grad_(False)
        try:
            with _ParamUseGuard(owners, self._active):
                return self._module(*args, **kwargs)
        finally:
            for p in toggled:
                p.requires_grad_(True)
            self._current = None
            self._active.clear()

    def _pre_hook(self, module, inputs):
        batch = self._current
        if batch is not None and batch.trainable.get(module):
            self._active.append(module)
        return None

    def _post_hook(self, module, inputs, output):
        batch = self._current
        if batch is None or not batch.trainable.get(module):
            return None
        if self._active and self._active[-1] is module:
            self._active.pop()
        x = inputs[0]
        if batch.n is None:
            batch.n = int(x.shape[0])
        elif int(x.shape[0]) != batch.n:
            raise FastDPError(f"{type(module).__name__} saw a batch of {x.shape[0]} samples, another layer {batch.n}; "
                              f"the batch dimension must come first everywhere; {FALLBACK_HINT}")
        uses = batch.acts.setdefault(module, [])
        use = len(uses)
        uses.append((x.detach(), x._version))
        if not output.requires_grad:
            # Nothing upstream requires grad (the first layer, an embedding): adding a zero that does gives the
            # output a gradient, in place and exactly, without asking autograd for the input's gradient.
            if batch.anchor is None:
                batch.anchor = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            output.add_(batch.anchor.to(output.dtype))

        def grad_hook(grad, batch=batch, module=module, use=use):
            self._on_grad(batch, module, use, grad)

        output.register_hook(grad_hook)
        return None

    # ---- backward -------------------------------------------------------------------------------------------
    def _on_grad(self, batch: _Batch, module, use: int, grad: torch.Tensor):
        batch.backward_seen = True
        if module in batch.terms:
            raise FastDPError(f"a second backward pass through {type(module).__name__} before optimizer.step(); "
                              "call optimizer.step() (or zero_grad()) after every backward pass")
        batch.grads.setdefault(module, {})[use] = grad.detach()
        if len(batch.grads[module]) == len(batch.acts[module]):
            self._finish_layer(batch, module)

    @torch.no_grad()
    def _finish_layer(self, batch: _Batch, module):
        uses = batch.acts.pop(module, [])
        grads = batch.grads.pop(module, {})
        acts, outs = [], []
        for i, (x, version) in enumerate(uses):
            if x._version != version:
                raise FastDPError(f"the input of {type(module).__name__} was modified in place after the layer read "
                                  f"it, so its per-sample gradient cannot be recovered; {FALLBACK_HINT}")
            if i in grads:                      # a use whose output never reached the loss contributes nothing
                acts.append(x)
                outs.append(grads[i])
        if not acts or batch.n == 0:
            return
        units = batch.units
        if units is not None:
            if len(units.index) != batch.n:
                raise FastDPError(f"set_units gave {len(units.index)} unit labels for a batch of {batch.n} samples")
            units = batch.units = units.to(outs[0].device)
        batch.terms[module] = terms_for(module)(module, acts, outs, batch.n, force=self.force, units=units)

    # ---- clipping ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def clipped_grad_sum(self, max_grad_norm: float) -> dict:
        """``{param: sum_i c_i g_i}`` over the pending batches, with Opacus' flat clip factor
        ``c_i = min(1, C / (||g_i|| + 1e-6))``; consumes them. ``g_i`` is sample i's gradient of its own loss,
        or, for a batch with units, unit i's: the sum of its samples' gradients."""
        batches = [b for b in self._batches if b.backward_seen or b.n == 0]
        self._batches = [b for b in self._batches if not (b.backward_seen or b.n == 0)]
        if not batches:
            raise ValueError("no backward pass since the last optimizer step: call loss.backward() before "
                             "optimizer.step()")
        params = [p for mod in self._layers for p in mod.parameters(recurse=False) if p.requires_grad]
        out = {}
        norms = []
        for batch in batches:
            for module in list(batch.acts):
                self._finish_layer(batch, module)
            n = batch.n or 0
            if n == 0 or not batch.terms:
                continue
            scale = float(n) if self.loss_reduction == "mean" else 1.0   # the loss averaged the n samples
            sq = torch.stack([t.sq_norms for t in batch.terms.values()]).sum(0)
            per_sample = sq.sqrt() * scale
            coef = (max_grad_norm / (per_sample + 1e-6)).clamp(max=1.0) * scale
            for terms in batch.terms.values():
                for p, g in terms.clipped_sum(coef).items():
                    g = g.to(p.dtype)
                    out[p] = g if p not in out else out[p] + g
            norms.append(per_sample)
            self.last_layer_modes = {self._names.get(m, type(m).__name__): t.mode for m, t in batch.terms.items()}
        self.last_per_sample_norms = torch.cat(norms) if norms else None
        self.iterations = len(batches)
        for p in params:
            if p not in out:          # a layer the loss did not reach, or an empty batch: a zero gradient
                out[p] = torch.zeros_like(p)
        return out

    def discard(self, keep_forward_only: bool = True) -> None:
        """Drop captured batches (zero_grad); a forward pass still waiting for its backward is kept."""
        self._batches = [b for b in self._batches if keep_forward_only and not b.backward_seen and b.n != 0]

    # ---- Opacus' GradSampleModule interface -------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = False):
        self.discard()
        super().zero_grad(set_to_none)

    def forbid_grad_accumulation(self):
        self.grad_accumulation_allowed = False

    def allow_grad_accumulation(self):
        self.grad_accumulation_allowed = True

    def disable_hooks(self) -> None:
        self.hooks_enabled = False

    def enable_hooks(self) -> None:
        self.hooks_enabled = True

    def remove_hooks(self) -> None:
        self.hooks_enabled = False
        while self._handles:
            self._handles.pop().remove()
        self._batches.clear()


def terms_for_safe(module) -> bool:
    try:
        terms_for(module)
        return True
    except TypeError:
        return False
