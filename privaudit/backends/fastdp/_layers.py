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
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Materialising costs ~T*p*d multiply-adds plus two passes over the p*d numbers per sample (the norm and the
# weighted sum, both memory-bound); the ghost norm costs ~T^2*(p+d) multiply-adds. Ghost wins below this
# ratio (Bu et al. use 2, from the memory of the two options).
GHOST_RATIO = 2.0
# Never materialise more than this many bytes of per-sample gradients for one layer.
MATERIALISE_MAX_BYTES = 1 << 30

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_TYPES = (nn.Linear, *CONV_TYPES, nn.GroupNorm, nn.Embedding)

ClippedSum = Callable[[torch.Tensor], dict]


class LayerTerms:
    """One layer's share of one batch: squared per-sample norms, and how to form its clipped sum."""

    __slots__ = ("sq_norms", "clipped_sum", "mode")

    def __init__(self, sq_norms: torch.Tensor, clipped_sum: ClippedSum, mode: str):
        self.sq_norms = sq_norms          # (n,) sum over the layer's trainable parameters
        self.clipped_sum = clipped_sum    # coef (n,) -> {param: sum_i coef_i * grad_i(param)}
        self.mode = mode                  # "ghost" or "materialise" (for reports and tests)


def use_ghost(n: int, t: int, p: int, d: int, groups: int, itemsize: int) -> bool:
    """True when the ghost norm is cheaper than materialised per-sample gradients for this layer."""
    if n * groups * p * d * itemsize > MATERIALISE_MAX_BYTES:
        return True
    return t * t * (p + d) < GHOST_RATIO * p * d


def _sq(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(n, -1), dim=1).square()


def _matmul_terms(a: torch.Tensor, b: torch.Tensor, weight, bias, weight_shape, *, force: str | None = None):
    """Norms and clipped sum of a layer whose per-sample weight gradient is ``sum_t b_t a_t^T``.

    ``a``: (n, G, T, d) what each group read at each position; ``b``: (n, G, T, p) the output gradients.
    ``weight``/``bias`` are the parameters to produce (None when frozen); the weight gradient has shape
    (G*p, d), reshaped to ``weight_shape``; the bias gradient is the sum of ``b`` over positions.
    """
    n, g, t, d = a.shape
    p = b.shape[-1]
    sq = torch.zeros(n, dtype=torch.promote_types(b.dtype, torch.float32), device=b.device)
    parts = []
    mode = "ghost"
    if weight is not None:
        ghost = use_ghost(n, t, p, d, g, b.element_size()) if force is None else force == "ghost"
        if ghost:
            if t == 1:
                sq += (_sq(a, n) * _sq(b, n)) if g == 1 else (a.square().sum(-1) * b.square().sum(-1)).sum((1, 2))
            else:
                aa = torch.matmul(a, a.transpose(-1, -2))
                bb = torch.matmul(b, b.transpose(-1, -2))
                sq += (aa * bb).sum((1, 2, 3))
                del aa, bb

            def weight_sum(coef, a=a, b=b):
                bc = b * coef.view(n, 1, 1, 1).to(b.dtype)
                # sum over samples and positions at once: (G, p, n*T) @ (G, n*T, d)
                w = torch.matmul(bc.permute(1, 3, 0, 2).reshape(g, p, n * t), a.transpose(0, 1).reshape(g, n * t, d))
                return w.reshape(weight_shape)
        else:
            mode = "materialise"
            per_sample = torch.matmul(b.transpose(-1, -2), a)       # (n, G, p, d)
            sq += _sq(per_sample, n)

            def weight_sum(coef, per_sample=per_sample):
                return torch.tensordot(coef.to(per_sample.dtype), per_sample, dims=1).reshape(weight_shape)
        parts.append((weight, weight_sum))
    if bias is not None:
        bsum = b.sum(2).reshape(n, g * p)                            # (n, G*p)
        sq += _sq(bsum, n)
        parts.append((bias, lambda coef, bsum=bsum: coef.to(bsum.dtype) @ bsum))
    return LayerTerms(sq, lambda coef: {prm: fn(coef) for prm, fn in parts}, mode)


def _trainable(prm):
    return prm if prm is not None and prm.requires_grad else None


def linear_terms(layer: nn.Linear, acts, grads, n: int, *, force=None) -> LayerTerms:
    d, p = layer.in_features, layer.out_features
    a = torch.cat([x.reshape(n, -1, d) for x in acts], dim=1).to(grads[0].dtype)
    b = torch.cat([y.reshape(n, -1, p) for y in grads], dim=1)
    return _matmul_terms(a.unsqueeze(1), b.unsqueeze(1), _trainable(layer.weight), _trainable(layer.bias),
                         layer.weight.shape, force=force)


def unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches a convolution reads: (n, C_in * prod(kernel), positions), with its padding applied."""
    dims = x.dim() - 2
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    pad = list(layer._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    k, s, dil = layer.kernel_size, layer.stride, layer.dilation
    if dims == 1:
        return F.unfold(x.unsqueeze(2), (1, k[0]), dilation=(1, dil[0]), stride=(1, s[0]))
    if dims == 2:
        return F.unfold(x, k, dilation=dil, stride=s)
    for i in range(dims):
        x = x.unfold(2 + i, dil[i] * (k[i] - 1) + 1, s[i])   # appends one window axis per spatial axis
    if any(v != 1 for v in dil):
        x = x[(...,) + tuple(slice(None, None, v) for v in dil)]
    n, c = x.shape[:2]
    out_axes = list(range(2, 2 + dims))
    win_axes = list(range(2 + dims, 2 + 2 * dims))
    return x.permute(0, 1, *win_axes, *out_axes).reshape(n, c * math.prod(k), -1)


def conv_terms(layer: nn.Module, acts, grads, n: int, *, force=None) -> LayerTerms:
    g = layer.groups
    cin, cout = layer.in_channels, layer.out_channels
    d, p = cin // g * math.prod(layer.kernel_size), cout // g
    dtype = grads[0].dtype
    # (n, G, d, T) patches and (n, G, p, T) output gradients, uses of the layer side by side along T
    a = torch.cat([unfold(layer, x.to(dtype)).view(n, g, d, -1) for x in acts], dim=3)
    b = torch.cat([y.reshape(n, g, p, -1) for y in grads], dim=3)
    return _matmul_terms(a.transpose(-1, -2), b.transpose(-1, -2), _trainable(layer.weight),
                         _trainable(layer.bias), layer.weight.shape, force=force)


def group_norm_terms(layer: nn.GroupNorm, acts, grads, n: int, *, force=None) -> LayerTerms:
    c = layer.num_channels
    gw = gb = None
    weight, bias = _trainable(layer.weight), _trainable(layer.bias)
    for x, y in zip(acts, grads):
        y3 = y.reshape(n, c, -1)
        if weight is not None:
            xhat = F.group_norm(x.to(y.dtype), layer.num_groups, eps=layer.eps).reshape(n, c, -1)
            w = torch.einsum("ncs,ncs->nc", xhat, y3)
            gw = w if gw is None else gw + w
        if bias is not None:
            s = y3.sum(2)
            gb = s if gb is None else gb + s
    sq = torch.zeros(n, dtype=torch.promote_types(grads[0].dtype, torch.float32), device=grads[0].device)
    parts = []
    for prm, per_sample in ((weight, gw), (bias, gb)):
        if prm is not None:
            sq += _sq(per_sample, n)
            parts.append((prm, per_sample))
    return LayerTerms(sq, lambda coef: {prm: coef.to(ps.dtype) @ ps for prm, ps in parts}, "materialise")


def embedding_terms(layer: nn.Embedding, acts, grads, n: int, *, force=None) -> LayerTerms:
    """Exact per-sample norms from the rows each sample touches (a token repeated in a sample adds up)."""
    v, dim = layer.num_embeddings, layer.embedding_dim
    idx = torch.cat([x.reshape(n, -1) for x in acts], dim=1)
    g = torch.cat([y.reshape(n, -1, dim) for y in grads], dim=1)
    if layer.padding_idx is not None:
        # nn.Embedding never updates the padding row: its gradient there is zero
        g = g * (idx != layer.padding_idx).unsqueeze(-1).to(g.dtype)
    weight = _trainable(layer.weight)
    sq = torch.zeros(n, dtype=torch.promote_types(g.dtype, torch.float32), device=g.device)
    if weight is None:
        return LayerTerms(sq, lambda coef: {}, "ghost")
    key = (torch.arange(n, device=idx.device).unsqueeze(1) * v + idx).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.zeros(len(uniq), dim, dtype=g.dtype, device=g.device).index_add_(0, inverse, g.reshape(-1, dim))
    sq.index_add_(0, torch.div(uniq, v, rounding_mode="floor"), rows.square().sum(1).to(sq.dtype))

    def weight_sum(coef):
        gc = (g * coef.view(n, 1, 1).to(g.dtype)).reshape(-1, dim)
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
