"""Throughput of DP-SGD on one GPU: images/s and peak memory at the largest physical batch that fits.

Run it through ``benchmarks/gpu_check.sh`` (which installs the carried wheels first); see that file's header.

For each model (ResNet-9 with GroupNorm at 1x256x256, five labels; the 3D CT model ``cnn3d-gn`` at 1x64^3,
one label) and each mode (non-private; Opacus DP-SGD with ``grad_sample_mode`` hooks, ew and ghost; and
privaudit's ``fast`` engine when asked for), it

1. finds the largest physical batch that fits in GPU memory: doubling from ``--start`` until a step runs out
   of memory (or ``--max-batch``), then halving the gap ``--refine`` times;
2. builds the mode afresh at that batch, runs ``--warmup`` steps, then times ``--steps`` steps
   (zero_grad, forward, backward, ``optimizer.step()`` with NAdam; under DP: per-sample clipping at C = 1,
   Gaussian noise with multiplier 1, and the accountant's step hook);
3. prints images/s, the DP/non-DP throughput ratio, and the peak GPU memory allocated by torch during the
   timed steps (``torch.cuda.max_memory_allocated``).

A total time budget (``--budget-s``) keeps the whole check within its limit: a mode that would start after
the budget is spent is reported as skipped. On a machine without CUDA nothing can run out of memory, so the
batch is ``--start`` as given and memory is reported as "-"; that is how the tests run it, at tiny sizes.
``--json PATH`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader, TensorDataset

MODES = ("non-dp", "hooks", "ew", "ghost", "fast")
T0 = time.perf_counter()


def _quiet_warnings() -> None:
    for msg in (".*[Ss]ecure RNG.*", ".*[Ff]ull backward hook.*", ".*non-full backward hook.*",
                ".*Optimal order is the.*", ".*--clipping fast cannot handle.*"):
        warnings.filterwarnings("ignore", message=msg)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


class Runner:
    """One mode's model, optimizer and training step at one physical batch size."""

    def __init__(self, mode: str, model, batch: int, shape: tuple, n_labels: int, device):
        from privaudit.backends.fastdp import FastPrivacyEngine, PerSampleLoss
        from privaudit.backends.opacus_backend import masked_bce

        self.mode, self.device, self.batch = mode, device, batch
        torch.manual_seed(1)   # inputs made on the device itself: no large host buffer to copy
        self.x = torch.randn(batch, *shape, device=device)
        self.y = torch.randint(0, 2, (batch, n_labels), device=device).float()
        model = copy.deepcopy(model).to(device)
        optimizer = torch.optim.NAdam(model.parameters(), lr=1e-3)
        self.engine = None
        if mode != "non-dp":
            # A tiny CPU dataset only tells make_private the batch size; the steps use the GPU tensors above.
            data = TensorDataset(torch.zeros(2 * batch, 1), torch.zeros(2 * batch, n_labels))
            self.engine = FastPrivacyEngine(accountant="prv")
            out = self.engine.make_private(module=model, optimizer=optimizer,
                                           data_loader=DataLoader(data, batch_size=batch),
                                           criterion=PerSampleLoss(masked_bce), noise_multiplier=1.0,
                                           max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
            model, optimizer = out[0], out[1]
        model.train()
        self.model, self.optimizer, self.loss = model, optimizer, masked_bce

    def step(self) -> None:
        from privaudit.backends.fastdp import forward_backward

        self.optimizer.zero_grad(set_to_none=True)
        forward_backward(self.model, self.x, self.y, self.loss, engine=self.engine)
        self.optimizer.step()

    def close(self) -> None:
        if self.engine is not None and hasattr(self.model, "_close"):
            self.model._close()
        self.model = self.optimizer = self.engine = self.x = self.y = None


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def fits(mode, model, batch, shape, n_labels, device, *, first: int) -> bool:
    """Whether two steps run at ``batch``. Running out of GPU memory means no; so does any other runtime
    error above the first batch tried (a kernel's 32-bit index limit, say), which is reported."""
    r = None
    try:
        r = Runner(mode, model, batch, shape, n_labels, device)
        r.step()
        r.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True
    except (OOM, RuntimeError) as e:
        if isinstance(e, OOM) or "out of memory" in str(e).lower():
            return False
        if batch == first:
            raise
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        print(f"#   {mode} at batch {batch}: {type(e).__name__}: {msg}; taken as not fitting", flush=True)
        return False
    finally:
        if r is not None:
            r.close()
        del r
        _free(device)


def largest_batch(mode, model, shape, n_labels, device, args) -> int | None:
    if device.type != "cuda":
        return args.start
    ok, bad = None, None
    b = args.start
    while b <= args.max_batch:
        if fits(mode, model, b, shape, n_labels, device, first=args.start):
            ok, b = b, b * 2
        else:
            bad = b
            break
    if ok is None:
        return None
    if bad is not None:
        for _ in range(args.refine):
            mid = (ok + bad) // 2
            if mid in (ok, bad):
                break
            if fits(mode, model, mid, shape, n_labels, device, first=args.start):
                ok = mid
            else:
                bad = mid
    return ok


def measure(mode, model, batch, shape, n_labels, device, args) -> dict:
    r = Runner(mode, model, batch, shape, n_labels, device)
    try:
        for _ in range(args.warmup):
            r.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            r.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        used = r.engine.grad_sample_mode if r.engine is not None else mode
        return {"mode": mode, "batch": batch, "images_per_s": batch * args.steps / dt,
                "ms_per_step": 1000 * dt / args.steps, "peak_gib": peak, "ran_as": used}
    finally:
        r.close()
        del r
        _free(device)


def check_model(name, arch, dims, size, width, n_labels, args, device) -> dict:
    from privaudit.backends.torch_models import create_model

    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, num_classes=n_labels, width=width, spatial_dims=dims)
    shape = (1, *[size] * dims)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {name}: {arch} {dims}D, width {width} ({n_params / 1e6:.2f}M parameters), input "
          f"{'x'.join(map(str, shape))}, {n_labels} label(s)", flush=True)
    print(f"{'mode':<8}{'batch':>7}{'images/s':>12}{'ms/step':>10}{'DP/non-DP':>11}{'peak GiB':>10}", flush=True)
    rows, base = [], None
    for mode in args.modes:
        if time.perf_counter() - T0 > args.budget_s:
            print(f"{mode:<8}  skipped: the {args.budget_s:.0f} s budget is spent", flush=True)
            rows.append({"mode": mode, "skipped": "time budget"})
            continue
        try:
            batch = largest_batch(mode, model, shape, n_labels, device, args)
            if batch is None:
                print(f"{mode:<8}  batch {args.start} does not fit", flush=True)
                rows.append({"mode": mode, "skipped": f"batch {args.start} does not fit"})
                continue
            row = measure(mode, model, batch, shape, n_labels, device, args)
        except Exception as e:   # one mode failing (an unsupported layer, say) must not hide the others
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            print(f"{mode:<8}  failed: {type(e).__name__}: {msg}", flush=True)
            rows.append({"mode": mode, "skipped": f"{type(e).__name__}: {msg}"})
            _free(device)
            continue
        if mode == "non-dp":
            base = row["images_per_s"]
        row["ratio_to_non_dp"] = row["images_per_s"] / base if base else None
        ratio = f"{row['ratio_to_non_dp']:.2f}x" if row["ratio_to_non_dp"] is not None else "-"
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        note = f"  (ran as {row['ran_as']})" if row["ran_as"] != mode else ""
        print(f"{mode:<8}{batch:>7}{row['images_per_s']:>12.1f}{row['ms_per_step']:>10.1f}{ratio:>11}{peak:>10}{note}",
              flush=True)
        rows.append(row)
    return {"name": name, "arch": arch, "spatial_dims": dims, "input": list(shape), "width": width,
            "n_params": n_params, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="non-dp,hooks,ew,ghost")
    ap.add_argument("--size", type=int, default=256, help="2D input edge")
    ap.add_argument("--width", type=int, default=64, help="ResNet-9 width")
    ap.add_argument("--size3d", type=int, default=64, help="3D input edge")
    ap.add_argument("--width3d", type=int, default=32, help="3D model width")
    ap.add_argument("--start", type=int, default=16, help="first batch tried (the batch on CPU)")
    ap.add_argument("--start3d", type=int, default=4, help="first 3D batch tried (the batch on CPU)")
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--refine", type=int, default=2, help="bisection steps after the first batch that fails")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=220.0, help="start no new mode after this many seconds")
    ap.add_argument("--skip-3d", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        sys.exit(f"unknown mode {unknown[0]!r}; use some of {', '.join(MODES)}")
    _quiet_warnings()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    import opacus

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# gpu_check on {card}; python {platform.python_version()}, torch {torch.__version__}, "
          f"opacus {opacus.__version__}, cuda {torch.version.cuda}", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = {"device": card, "torch": torch.__version__, "opacus": opacus.__version__, "models": []}
    results["models"].append(check_model("cxr", "resnet9-gn", 2, args.size, args.width, 5, args, device))
    if not args.skip_3d:
        start = args.start
        args.start = args.start3d
        results["models"].append(check_model("pdac", "cnn3d-gn", 3, args.size3d, args.width3d, 1, args, device))
        args.start = start
    results["seconds"] = round(time.perf_counter() - T0, 1)
    print(f"# done in {results['seconds']:.0f} s; DP/non-DP is the throughput ratio at each mode's own largest batch",
          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
