"""Run under torchrun by tests/test_distributed.py: one DP-SGD step of the 2-process data-parallel set-up
(DPDDP, Opacus' distributed optimizer, privaudit's after_make_private) against one single-process step on
the same global batch, for each grad-sample mode, with the noise off so that the two must agree.

    torchrun --standalone --nproc_per_node 2 tests/ddp_oracle.py OUT.json
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

from privaudit.backends import distributed
from privaudit.backends.fastdp import FastPrivacyEngine, PerSampleLoss, forward_backward
from privaudit.backends.opacus_backend import masked_bce
from privaudit.backends.torch_models import create_model

warnings.filterwarnings("ignore")
B, C = 8, 0.05    # global batch; a clipping norm small enough that every sample is clipped


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
    distributed.teardown(ctx)
    if ctx.is_main:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
