"""Per-layer maths of the fast engine: per-sample gradient norms, then the clipped gradient sum.

Every supported layer reduces to the same shape of problem. A sample's weight gradient is a sum over the
layer's positions ``t`` (tokens, pixels, voxels) of outer products ``b_t a_t^T``, where ``a_t`` is what the
layer read at that position (an input row, an unfolded convolution patch) and ``b_t`` the gradient of the
loss with respect to the layer's output there. Two ways give the sample's gradient norm:

* materialise ``W_i = B_i^T A_i`` (``p x d`` numbers per sample, ``T p d`` multiply-adds), or
* the ghost norm ``||W_i||^2 = <A_i A_i^T, B_i B_i^T>`` (two ``T x T`` Gram matrices, ``T^2 (p + d)``),

and :func:`use_ghost` picks the cheaper one per layer (Li et al. 2022; Bu et al. 2023's mixed ghost
clipping). Once every layer's norms are known, the clipped sum ``sum_i c_i W_i`` is either the weighted sum
of the materialised ``W_i`` or, for ghost layers, one matrix product of the re-weighted output gradients
with the activations (book-keeping), so no second backward pass is run.

**Units (patient-level DP).** With :class:`Units`, the clipped unit is a group of samples (a patient's images)
and its gradient the sum of theirs, ``W_P = sum_{i in P} B_i^T A_i``. Per-image norms do not add up to its
norm; the cross-image terms are needed: ``||W_P||^2 = sum_{i, j in P} <A_i A_j^T, B_i B_j^T>``, which is the
ghost norm of the patient's positions laid side by side, ``A_P = [A_i; A_j; ...]`` (``(k T)^2 (p + d)`` work
for k images). Materialised layers sum their per-sample gradients by unit instead (``index_add``); the cost
rule weighs both, with ``T^2`` scaled by the mean unit size an image sees. The clipped sum gives every sample its
unit's clip factor.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Materialising costs ~T*p*d multiply-adds in small per-sample products, plus writing and twice reading
# n*p*d numbers (the norm, then the weighted sum); the ghost norm costs ~T^2*(p+d) multiply-adds, plus one
# large, efficient product for the clipped sum. Ghost wins when T^2*(p+d) < GHOST_RATIO * p*d. Bu et al.
# (2023) compare memory and use 2; timing every ResNet-9 layer on a CPU (benchmarks/dp_overhead.py) put
# the crossover between 40 and 90, because materialising is memory-bound.
GHOST_RATIO = 50.0
# Never materialise more than this many bytes of per-sample gradients for one layer.
MATERIALISE_MAX_BYTES = 1 << 30

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_TYPES = (nn.Linear, *CONV_TYPES, nn.GroupNorm, nn.Embedding)

ClippedSum = Callable[[torch.Tensor], dict]


class LayerTerms:
    """One layer's share of one batch: squared per-unit norms, and how to form its clipped sum. A unit is a
    sample, or with :class:`Units` a group of samples (a patient) whose gradients are summed."""

    __slots__ = ("sq_norms", "clipped_sum", "mode")

    def __init__(self, sq_norms: torch.Tensor, clipped_sum: ClippedSum, mode: str):
        self.sq_norms = sq_norms          # (units,) sum over the layer's trainable parameters
        self.clipped_sum = clipped_sum    # coef (units,) -> {param: sum_u coef_u * grad_u(param)}
        self.mode = mode                  # "ghost" or "materialise" (for reports and tests)


class Units:
    """Which unit (patient) each sample of a batch belongs to: ``index`` (n,) in 0 .. count-1."""

    def __init__(self, index, count: int):
        self.index = torch.as_tensor(index, dtype=torch.long)
        self.count = int(count)
        if self.index.dim() != 1 or (len(self.index) and not 0 <= int(self.index.min()) <= int(self.index.max())
                                     < self.count):
            raise ValueError(f"unit index must be a vector of values in 0..{self.count - 1}")
        self.sizes = torch.bincount(self.index, minlength=self.count)
        if len(self.index) and int(self.sizes.min()) == 0:
            raise ValueError("every unit needs at least one sample")
        # an image's mean unit size, sum_P k_P^2 / n: how much the ghost norm's T^2 grows with units
        self.kbar = float(self.sizes.double().square().sum()) / max(1, len(self.index))
        self._by_size = None

    def to(self, device) -> "Units":
        if self.index.device == torch.device(device):
            return self
        out = Units.__new__(Units)
        out.index, out.count, out.sizes = self.index.to(device), self.count, self.sizes.to(device)
        out.kbar, out._by_size = self.kbar, None
        return out

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample rows (n, ...) summed by unit: (count, ...)."""
        return torch.zeros((self.count, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, self.index, x)

    def expand(self, coef: torch.Tensor) -> torch.Tensor:
        """A per-unit vector as per-sample: each sample takes its unit's value."""
        return coef[self.index]

    def by_size(self) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
        """The samples ordered by (unit size, unit), and for each unit size k present: (k, where its units'
        samples start in that order, the units (u_k,)). The samples of the units of size k are then one
        contiguous (u_k, k) block of the order."""
        if self._by_size is None:
            # sort key: unit size first, then unit, then the sample's position (a stable sort keeps it)
            key = self.sizes[self.index] * (self.count + 1) + self.index
            order = torch.argsort(key, stable=True)
            blocks, start = [], 0
            for k in torch.unique(self.sizes).tolist():
                ids = torch.nonzero(self.sizes == k).flatten()
                blocks.append((k, start, ids))
                start += k * len(ids)
            self._by_size = (order, blocks)
        return self._by_size


def use_ghost(n: int, t: int, p: int, d: int, groups: int, itemsize: int, kbar: float = 1.0) -> bool:
    """True when the ghost norm is cheaper than materialised per-sample gradients for this layer (``kbar``:
    the mean unit size an image sees, 1 without units)."""
    if n * groups * p * d * itemsize > MATERIALISE_MAX_BYTES:
        return True
    return t * t * kbar * (p + d) < GHOST_RATIO * p * d


def _sq(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(n, -1), dim=1).square()


def _ghost_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared norms of ``B_i^T A_i`` for (n, G, T, d) ``a`` and (n, G, T, p) ``b``, without forming them."""
    if a.shape[2] == 1:
        return (a.square().sum(-1) * b.square().sum(-1)).sum((1, 2))
    aa = torch.matmul(a, a.transpose(-1, -2))
    bb = torch.matmul(b, b.transpose(-1, -2))
    return (aa * bb).sum((1, 2, 3))


def _unit_ghost_sq(a: torch.Tensor, b: torch.Tensor, units: Units, dtype) -> torch.Tensor:
    """Squared norms of each unit's summed gradient ``sum_{i in P} B_i^T A_i``: the ghost norm of the unit's
    positions side by side (all the cross-image Gram blocks), units of one size k at a time."""
    sq = torch.zeros(units.count, dtype=dtype, device=b.device)
    _, g, t, _ = b.shape
    order, blocks = units.by_size()
    a, b = a[order], b[order]        # one gather: each unit size's samples are then one contiguous block
    for k, start, ids in blocks:
        u = len(ids)
        ak, bk = a[start:start + u * k], b[start:start + u * k]
        if k > 1:   # (u_k, G, k T, .): a unit's positions side by side (a view when G = 1)
            ak = ak.view(u, k, g, t, -1).transpose(1, 2).reshape(u, g, k * t, a.shape[-1])
            bk = bk.view(u, k, g, t, -1).transpose(1, 2).reshape(u, g, k * t, b.shape[-1])
        sq[ids] = _ghost_sq(ak, bk).to(dtype)
    return sq


def _matmul_terms(a, b, weight, bias, to_weight, *, force: str | None = None, per_sample=None, units=None):
    """Norms and clipped sum of a layer whose per-sample weight gradient is ``sum_t b_t a_t^T``.

    ``a``: (n, G, T, d) what each of G groups read at each position; ``b``: (n, G, T, p) the output gradients
    there. ``weight``/``bias``: the parameters to produce (None when frozen); ``to_weight`` turns a (G, p, d)
    gradient into the weight's layout; the bias gradient is the sum of ``b`` over positions. ``per_sample``,
    when given, is the (n, G, p, d) materialised weight gradient, already computed another way. ``units``:
    norms and clip factors per unit of summed samples (:class:`Units`).
    """
    n, g, t, p = b.shape
    d = a.shape[-1] if a is not None else None
    u = n if units is None else units.count
    sq = torch.zeros(u, dtype=torch.promote_types(b.dtype, torch.float32), device=b.device)
    parts = []
    mode = "ghost"
    per_item = (lambda coef: coef) if units is None else units.expand
    if weight is not None:
        kbar = 1.0 if units is None else units.kbar
        ghost = per_sample is None and (use_ghost(n, t, p, d, g, b.element_size(), kbar) if force is None
                                         else force == "ghost")
        if ghost:
            sq += _ghost_sq(a, b) if units is None else _unit_ghost_sq(a, b, units, sq.dtype)

            def weight_sum(coef, a=a, b=b):
                bc = b * per_item(coef).view(n, 1, 1, 1).to(b.dtype)
                # all samples and positions in one product: (G, p, n*T) @ (G, n*T, d)
                w = torch.matmul(bc.permute(1, 3, 0, 2).reshape(g, p, n * t), a.transpose(0, 1).reshape(g, n * t, d))
                return to_weight(w)
        else:
            mode = "materialise"
            if per_sample is None:
                per_sample = torch.matmul(b.transpose(-1, -2), a)       # (n, G, p, d)
            if units is not None:
                per_sample = units.sum(per_sample)                      # (units, G, p, d)
            sq += _sq(per_sample, u)

            def weight_sum(coef, per_sample=per_sample):
                return to_weight(torch.tensordot(coef.to(per_sample.dtype), per_sample, dims=1))
        parts.append((weight, weight_sum))
    if bias is not None:
        bsum = b.sum(2).reshape(n, g * p)                            # (n, G*p)
        if units is not None:
            bsum = units.sum(bsum)
        sq += _sq(bsum, u)
        parts.append((bias, lambda coef, bsum=bsum: coef.to(bsum.dtype) @ bsum))
    return LayerTerms(sq, lambda coef: {prm: fn(coef) for prm, fn in parts}, mode)


def _trainable(prm):
    return prm if prm is not None and prm.requires_grad else None


def linear_terms(layer: nn.Linear, acts, grads, n: int, *, force=None, units=None) -> LayerTerms:
    d, p = layer.in_features, layer.out_features
    a = _cat([x.reshape(n, -1, d) for x in acts], 1).to(grads[0].dtype)
    b = _cat([y.reshape(n, -1, p) for y in grads], 1)
    shape = layer.weight.shape
    return _matmul_terms(a.unsqueeze(1), b.unsqueeze(1), _trainable(layer.weight), _trainable(layer.bias),
                         lambda w: w.reshape(shape), force=force, units=units)


def _cat(parts, dim):
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _pad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as the convolution sees it: its padding (any padding mode, "same") applied explicitly."""
    pad = list(layer._reversed_padding_repeated_twice)
    if not any(pad):
        return x
    return F.pad(x, pad, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)


def unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches a convolution reads, channels last: (n, positions, prod(kernel) * C_in).

    One strided view of the padded channels-last input (output positions, kernel offsets and channels as
    axes; stride and dilation as steps), then one copy: im2col for any number of spatial dimensions.
    """
    dims = x.dim() - 2
    x = _pad(layer, x).movedim(1, -1).contiguous()
    k, s, dil = layer.kernel_size, layer.stride, layer.dilation
    space, st = x.shape[1:-1], x.stride()
    out = [(space[i] - dil[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(dims)]
    view = x.as_strided((x.shape[0], *out, *k, x.shape[-1]),
                        (st[0], *[st[1 + i] * s[i] for i in range(dims)],
                         *[st[1 + i] * dil[i] for i in range(dims)], st[-1]))
    return view.reshape(x.shape[0], math.prod(out), -1)


_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                     3: torch.nn.grad.conv3d_weight}


def _grouped_weight_grads(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """Every sample's weight gradient at once, as the weight gradient of one convolution with the samples as
    extra groups (torch's convolution backward; on a CPU faster than im2col + batched products for most
    layers). Returns (n, C_out, C_in / groups * prod(kernel))."""
    dims = x.dim() - 2
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        padding = layer.padding
    else:
        x, padding = _pad(layer, x), 0
    weight_size = (n * layer.out_channels, *layer.weight.shape[1:])
    w = _CONV_WEIGHT_GRAD[dims](x.reshape(1, -1, *x.shape[2:]), weight_size, y.reshape(1, -1, *y.shape[2:]),
                                stride=layer.stride, padding=padding, dilation=layer.dilation,
                                groups=n * layer.groups)
    return w.reshape(n, layer.out_channels, -1)


def _grouped_is_faster(layer: nn.Module, x: torch.Tensor) -> bool:
    # Timed on ResNet-9 and cnn3d-gn layers on a CPU (benchmarks/dp_overhead.py): the grouped convolution
    # wins for 3D layers and for 2D layers with a few input channels per group or more; im2col + products
    # wins for a 2D layer that reads one channel (the 7x7 stem). On CUDA, im2col + batched products.
    cg = layer.in_channels // layer.groups
    return x.device.type == "cpu" and math.prod(layer.kernel_size) > 1 and (x.dim() == 5 or cg >= 4)


def conv_terms(layer: nn.Module, acts, grads, n: int, *, force=None, units=None) -> LayerTerms:
    g = layer.groups
    cin, cout = layer.in_channels, layer.out_channels
    cg, kvol = cin // g, math.prod(layer.kernel_size)
    d, p = cg * kvol, cout // g
    dtype = grads[0].dtype
    weight, bias = _trainable(layer.weight), _trainable(layer.bias)
    t = sum(math.prod(y.shape[2:]) for y in grads)
    kbar = 1.0 if units is None else units.kbar
    ghost = use_ghost(n, t, p, d, g, grads[0].element_size(), kbar) if force is None else force == "ghost"
    b = _cat([y.reshape(n, g, p, -1) for y in grads], 3).transpose(-1, -2)          # (n, G, T, p)
    shape = layer.weight.shape
    if weight is None:
        return _matmul_terms(None, b, None, bias, None, units=units)
    if not ghost and _grouped_is_faster(layer, acts[0]):
        per_sample = _grouped_weight_grads(layer, acts[0].to(dtype), grads[0], n)
        for x, y in zip(acts[1:], grads[1:]):       # a layer used more than once: its uses add up
            per_sample += _grouped_weight_grads(layer, x.to(dtype), y, n)
        return _matmul_terms(None, b, weight, bias, lambda w: w.reshape(shape),
                             per_sample=per_sample.view(n, g, p, d), units=units)
    # channels-last patches (n, T, K * C_in) -> (n, G, T, K * C_in / G), uses of the layer side by side along T
    a = _cat([unfold(layer, x.to(dtype)) for x in acts], 1)
    a = a.view(n, t, kvol, g, cg).permute(0, 3, 1, 2, 4).reshape(n, g, t, d)

    def to_weight(w):   # (G, p, K * cg) -> (C_out, cg, *kernel)
        return w.reshape(cout, kvol, cg).transpose(1, 2).reshape(shape)

    return _matmul_terms(a, b, weight, bias, to_weight, force="ghost" if ghost else "materialise", units=units)


def group_norm_terms(layer: nn.GroupNorm, acts, grads, n: int, *, force=None, units=None) -> LayerTerms:
    """Per-sample gradients of gamma (sum over positions of g * xhat, xhat recomputed from the input) and beta
    (sum of g), 2 C numbers per sample: always materialised."""
    c = layer.num_channels
    weight, bias = _trainable(layer.weight), _trainable(layer.bias)
    gw = gb = None
    for x, y in zip(acts, grads):
        y3 = y.reshape(n, c, -1)
        if weight is not None:
            xhat = F.group_norm(x.to(y.dtype), layer.num_groups, eps=layer.eps).reshape(n, c, -1)
            w = torch.linalg.vecdot(xhat, y3)
            gw = w if gw is None else gw + w
        if bias is not None:
            s = y3.sum(2)
            gb = s if gb is None else gb + s
    u = n if units is None else units.count
    sq = torch.zeros(u, dtype=torch.promote_types(grads[0].dtype, torch.float32), device=grads[0].device)
    parts = []
    for prm, per_sample in ((weight, gw), (bias, gb)):
        if prm is not None:
            if units is not None:
                per_sample = units.sum(per_sample)
            sq += _sq(per_sample, u)
            parts.append((prm, per_sample))
    return LayerTerms(sq, lambda coef: {prm: coef.to(ps.dtype) @ ps for prm, ps in parts}, "materialise")


def embedding_terms(layer: nn.Embedding, acts, grads, n: int, *, force=None, units=None) -> LayerTerms:
    """Exact per-sample (per-unit) norms from the rows each sample (unit) touches (a token repeated in a sample,
    or in a unit's samples, adds up)."""
    v, dim = layer.num_embeddings, layer.embedding_dim
    idx = _cat([x.reshape(n, -1) for x in acts], 1)
    g = _cat([y.reshape(n, -1, dim) for y in grads], 1)
    if layer.padding_idx is not None:
        # nn.Embedding never updates the padding row: its gradient there is zero
        g = g * (idx != layer.padding_idx).unsqueeze(-1).to(g.dtype)
    weight = _trainable(layer.weight)
    u = n if units is None else units.count
    sq = torch.zeros(u, dtype=torch.promote_types(g.dtype, torch.float32), device=g.device)
    if weight is None:
        return LayerTerms(sq, lambda coef: {}, "ghost")
    owner = torch.arange(n, device=idx.device) if units is None else units.index.to(idx.device)
    per_item = (lambda coef: coef) if units is None else units.expand
    key = (owner.unsqueeze(1) * v + idx).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(len(uniq), dim, dtype=g.dtype, device=g.device).index_add_(0, inverse, g.reshape(-1, dim))
    sq.index_add_(0, torch.div(uniq, v, rounding_mode="floor"), rows.square().sum(1).to(sq.dtype))

    def weight_sum(coef):
        gc = (g * per_item(coef).view(n, 1, 1).to(g.dtype)).reshape(-1, dim)
        return torch.zeros_like(layer.weight, dtype=g.dtype).index_add_(0, idx.reshape(-1), gc)

    return LayerTerms(sq, lambda coef: {weight: weight_sum(coef)}, "ghost")


def terms_for(layer: nn.Module) -> Callable[..., LayerTerms]:
    t = type(layer)
    if t is nn.Linear:
        return linear_terms
    if t in CONV_TYPES:
        return conv_terms
    if t is nn.GroupNorm:
        return group_norm_terms
    if t is nn.Embedding:
        return embedding_terms
    raise TypeError(t)


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why the fast engine cannot handle this layer's own trainable parameters (None: it can)."""
    own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    t = type(layer)
    if t not in SUPPORTED_TYPES:
        return f"{t.__name__} layers are not supported (supported: Linear, Conv1d/2d/3d, GroupNorm, Embedding)"
    if t is nn.Embedding and (layer.scale_grad_by_freq or layer.sparse):
        return "Embedding with scale_grad_by_freq or sparse gradients mixes samples or needs sparse updates"
    known = {id(layer.weight), id(getattr(layer, "bias", None))}
    if any(id(p) not in known for p in own):
        return f"{t.__name__} has extra parameters the engine does not know"
    return None
