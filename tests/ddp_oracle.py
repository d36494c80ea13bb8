"""Run under torchrun by tests/test_distributed.py: one DP-SGD step of the 2-process data-parallel set-up
(DPDDP, Opacus' distributed optimizer, privaudit's after_make_private) against one single-process step on
the same global batch, for each grad-sample mode, with the noise off so that the two must agree.

Patient-level DP: one logical step of 8 patients (1 to 4 images each, scattered through the data), split
between the ranks by patient (unevenly, and with rank 0 drawing no patient at all), each rank packing its
patients into physical batches of at most 4 images with ``PatientSampler.pack`` and stepping as the backend's
loop does, against one process on the 8 patients and against a naive loop (per patient: the gradient of its
images' summed loss, clipped to C; the sum over patients divided by the expected 8 patients), in hooks and
fast mode. The optimizer is made by the backend's own ``_make_patient_private``, so its per-rank denominator is
the one training uses. And with noise on and both ranks drawing no patient, the update is the noise alone: its
standard deviation must be sigma C / 8 (added once, on rank 0, not once per rank).

    torchrun --standalone --nproc_per_node 2 tests/ddp_oracle.py OUT.json
"""

from __future__ import annotations

import json
import sys
import types
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from privaudit.backends import distributed
from privaudit.backends._units import PatientSampler
from privaudit.backends.fastdp import FastPrivacyEngine, PerSampleLoss, Units, forward_backward
from privaudit.backends.opacus_backend import OpacusBackend, masked_bce
from privaudit.backends.torch_models import create_model

warnings.filterwarnings("ignore")
B, C = 8, 0.05    # global batch; a clipping norm small enough that every sample is clipped
SIZES = [1, 3, 2, 1, 2, 4, 1, 2]    # images of the step's 8 patients (16 images)
PHYSICAL = 4
# each case: the patients rank 0 draws (rank 1 draws the others)
SPLITS = {"uneven": [0, 5], "rank0-empty": []}


def new_model():
    torch.manual_seed(0)
    return create_model("resnet9-gn", in_channels=1, num_classes=3, width=4, spatial_dims=2)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in distributed.unwrap_model(model).parameters()])


def one_step(mode: str, ctx, x, y, *, split: bool) -> torch.Tensor:
    torch.manual_seed(0)
    model = create_model("resnet9-gn", in_channels=1, num_classes=3, width=4, spatial_dims=2)
    if split:
        model = distributed.wrap_model(model, ctx, dp=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = FastPrivacyEngine(accountant="prv")
    loader = DataLoader(TensorDataset(x, y), batch_size=B)
    made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
                               max_grad_norm=C, poisson_sampling=False, grad_sample_mode=mode,
                               criterion=PerSampleLoss(masked_bce))
    model, optimizer, loader = made[0], made[1], made[-1]
    if split:
        distributed.after_make_private(loader, optimizer, ctx, seed=0)
        # uneven local batches (1 and 7), as Poisson sampling draws them: the gradients' layouts then differ
        part = slice(0, 1) if ctx.rank == 0 else slice(1, B)
        xb, yb = x[part], y[part]
    else:
        xb, yb = x, y
    optimizer.zero_grad(set_to_none=True)
    forward_backward(model, xb, yb, masked_bce, engine=engine)
    optimizer.step()
    return torch.cat([p.detach().flatten() for p in distributed.unwrap_model(model).parameters()])


def patient_step(mode: str, ctx, x, y, units, chosen, *, split: bool, noise: float = 0.0) -> torch.Tensor:
    """One patient-level logical step over the patients ``chosen`` (this rank's part when ``split``)."""
    model = new_model()
    if split:
        model = distributed.wrap_model(model, ctx, dp=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = FastPrivacyEngine(accountant="prv")
    sampler = PatientSampler(units, len(SIZES), 0.5, steps=1, physical=PHYSICAL, seed=0,
                             shard=chosen if split else None)
    common = dict(module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=B),
                  max_grad_norm=C, poisson_sampling=True, grad_sample_mode=mode, criterion=PerSampleLoss(masked_bce))
    model, optimizer = OpacusBackend._make_patient_private(
        engine, types.SimpleNamespace(noise_multiplier=noise), types.SimpleNamespace(batch_size=len(SIZES), epochs=1),
        sampler, common)
    if split:
        distributed.contiguous_reduce(optimizer, ctx)
    for b in sampler.pack(np.asarray(chosen, dtype=np.int64)):   # as OpacusBackend._fit steps
        optimizer.zero_grad(set_to_none=True)
        items = torch.from_numpy(b.items)
        forward_backward(model, x[items], y[items], masked_bce, engine=engine,
                         units=Units(torch.from_numpy(b.units), b.n_units))
        optimizer.signal_skip_step(do_skip=not b.last)
        optimizer.step()
    return flat(model)


def naive_patient_step(x, y, units) -> torch.Tensor:
    """Per patient: backward of its images' summed loss, clip to C; add up, divide by the 8 patients, SGD lr 1."""
    model = new_model()
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for u in range(len(SIZES)):
        mine = torch.from_numpy(np.flatnonzero(units == u))
        grads = torch.autograd.grad(masked_bce(model(x[mine]), y[mine]).sum(), params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        for t, g in zip(total, grads):
            t += g * min(1.0, C / (float(norm) + 1e-6))
    with torch.no_grad():
        for p, t in zip(params, total):
            p -= t / len(SIZES)
    return flat(model)


def main() -> None:
    ctx = distributed.setup("cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 1, 16, 16, generator=g)
    y = torch.randint(0, 2, (B, 3), generator=g).float()
    out = {}
    for mode in ("hooks", "ew", "ghost", "fast"):
        alone = one_step(mode, ctx, x, y, split=False)
        together = one_step(mode, ctx, x, y, split=True)
        torch.manual_seed(0)
        start = torch.cat([p.detach().flatten() for p in create_model(
            "resnet9-gn", in_channels=1, num_classes=3, width=4, spatial_dims=2).parameters()])
        out[mode] = {"max_diff": float((alone - together).abs().max()), "moved": float((alone - start).abs().max())}
    units = np.random.default_rng(4).permutation(np.repeat(np.arange(len(SIZES)), SIZES))
    xp = torch.randn(len(units), 1, 16, 16, generator=g)
    yp = torch.randint(0, 2, (len(units), 3), generator=g).float()
    start, naive = flat(new_model()), naive_patient_step(xp, yp, units)
    for mode in ("hooks", "fast"):
        alone = patient_step(mode, ctx, xp, yp, units, list(range(len(SIZES))), split=False)
        for case, first in SPLITS.items():
            mine = first if ctx.rank == 0 else [u for u in range(len(SIZES)) if u not in first]
            together = patient_step(mode, ctx, xp, yp, units, mine, split=True)
            out[f"patient-{mode}-{case}"] = {"max_diff": float((alone - together).abs().max()),
                                             "naive_diff": float((naive - together).abs().max()),
                                             "moved": float((alone - start).abs().max())}
    noisy = patient_step("fast", ctx, xp, yp, units, [], split=True, noise=1.0)
    out["patient-noise"] = {"std": float((noisy - start).std()), "expected": C / len(SIZES), "n": len(start)}
    distributed.teardown(ctx)
    if ctx.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
