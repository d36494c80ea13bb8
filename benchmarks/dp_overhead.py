"""Cost of DP-SGD's per-sample clipping: ms per training step and peak memory, non-private against Opacus'
hooks, ew and ghost modes and privaudit's ``fast`` engine, all in one process, for the default CXR model
(ResNet-9, GroupNorm, Mish; 2D) and then the PDAC model (3D).

    python benchmarks/dp_overhead.py                      # CXR: width 64, 64x64, batch 64
    python benchmarks/dp_overhead.py --steps 30 --skip-pdac

A step is what training does per batch: zero_grad, forward, backward, ``optimizer.step()`` (NAdam; under DP
with Opacus' noise and accountant, noise multiplier 1, C = 1). The modes take turns in rounds, so that a
change in the machine's load hits them alike; each reports the median over ``--steps`` timed steps after
``--warmup`` untimed ones, its ratio to non-private, and the peak memory one step adds to the model, optimizer
state and data, starting with no gradients held (CUDA: the allocator's peak; CPU: the process's resident-set
high-water mark, after returning freed memory to the system). The CXR lines come first, one per mode:

    fast      281.0 ms/step    1.86x   peak    412 MiB

The ``-patient`` modes clip per patient (patient-level DP): the same images, grouped into patients of 1 to 8
images, about 3 on average (``--images-per-patient``), each patient's gradient the sum of its images', clipped
as one (hooks mode: per-sample rows summed by patient; fast: exact per-patient norms with the cross-image
terms). Their ratio is to the same non-private step on the same images; the goal for ``fast-patient`` on the
default CXR model is at most 1.5x.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from privaudit.backends.fastdp import FastPrivacyEngine, PerSampleLoss, Units, forward_backward
from privaudit.backends.opacus_backend import masked_bce
from privaudit.backends.torch_models import create_model
from privaudit.errors import PrivauditError
from privaudit.tasks import create_task

MODES = ("non-dp", "hooks", "ew", "ghost", "fast", "hooks-patient", "fast-patient")


def patient_units(n: int, mean: float, seed: int = 0) -> Units:
    """n images as patients of 1 to 8 images (1 + Poisson(mean - 1), capped at 8: a long tail), scattered
    through the batch."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(8, 1 + rng.poisson(mean - 1))))
    sizes[-1] -= sum(sizes) - n
    index = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    return Units(torch.from_numpy(index), len(sizes))


class PeakMemory:
    """Peak memory of a stretch of steps, above what was in use when it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = None
        if device.type == "cpu":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if self._libc is not None:
            self._libc.malloc_trim(0)      # return freed heap pages, so the baseline is what is really in use
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                   # reset the resident-set high-water mark (Linux)
        self.base = self._status("VmRSS:")

    def mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (self._status("VmHWM:") - self.base) / 2**20


class Runner:
    """One mode's model, optimizer and step."""

    def __init__(self, mode: str, model, batches, device, batch: int, units: Units | None = None):
        self.mode, self.batches, self.i = mode, batches, 0
        self.units = units.to(device) if mode.endswith("-patient") else None
        mode = mode.removesuffix("-patient")
        model = copy.deepcopy(model).to(device)
        optimizer = torch.optim.NAdam(model.parameters(), lr=1e-3)
        self.engine = None
        if mode != "non-dp":
            x, y = batches[0]
            data = TensorDataset(x.repeat(8, *[1] * (x.dim() - 1)).cpu(), y.repeat(8, 1).cpu())
            self.engine = FastPrivacyEngine(accountant="prv")
            out = self.engine.make_private(module=model, optimizer=optimizer,
                                           data_loader=DataLoader(data, batch_size=batch),
                                           criterion=PerSampleLoss(masked_bce), noise_multiplier=1.0,
                                           max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode=mode)
            model, optimizer = out[0], out[1]
            if self.units is not None:
                optimizer.expected_batch_size = self.units.count   # patient-level DP divides by patients
        model.train()
        self.model, self.optimizer, self.device = model, optimizer, device

    def step(self) -> float:
        xb, yb = self.batches[self.i % len(self.batches)]
        self.i += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        forward_backward(self.model, xb, yb, masked_bce, engine=self.engine, units=self.units)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000


def bench(name: str, arch: str, dims: int, size: int, width: int, batch: int, n_labels: int, args, device):
    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, num_classes=n_labels, width=width, spatial_dims=dims)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, 1, *[size] * dims, generator=gen).to(device),
                torch.randint(0, 2, (batch, n_labels), generator=gen).float().to(device)) for _ in range(3)]
    units = patient_units(batch, args.images_per_patient)
    runners = [Runner(m, model, batches, device, batch, units) for m in args.modes]
    times = {r.mode: [] for r in runners}
    for r in runners:
        for _ in range(args.warmup):
            r.step()
    rounds = max(1, args.rounds)
    per_round = -(-args.steps // rounds)
    for _ in range(rounds):
        for r in runners:
            times[r.mode] += [r.step() for _ in range(per_round)]
    peaks = {}
    meter = PeakMemory(device)
    for r in runners:
        # from a clean state: the previous step's gradients (and Opacus' per-sample ones) released first
        r.optimizer.zero_grad(set_to_none=True)
        meter.start()
        r.step()
        peaks[r.mode] = meter.mib()
    med = {m: statistics.median(t) for m, t in times.items()}
    base = med.get("non-dp")
    for r in runners:
        ratio = f"{med[r.mode] / base:7.2f}x" if base else "      -"
        fell_back = r.engine is not None and r.engine.grad_sample_mode != r.mode.removesuffix("-patient")
        note = f"   (fell back to {r.engine.grad_sample_mode})" if fell_back else ""
        print(f"{r.mode:<13}{med[r.mode]:9.1f} ms/step {ratio}   peak {peaks[r.mode]:6.0f} MiB{note}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    shape = "x".join([str(size)] * dims)
    print(f"# {name}: {arch} {dims}D, width {width} ({n_params / 1e6:.2f}M parameters), input 1x{shape}, "
          f"batch {batch} ({units.count} patients in the -patient modes); median of {len(times[runners[0].mode])} steps after {args.warmup} warm-up, {rounds} "
          f"interleaved rounds; {device.type}, {threads} threads; torch {torch.__version__}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode (at least 20 for the report)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4, help="the timed steps are split into this many rounds")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    ap.add_argument("--cxr-width", type=int, default=64)
    ap.add_argument("--cxr-size", type=int, default=64)
    ap.add_argument("--cxr-batch", type=int, default=64)
    ap.add_argument("--pdac-width", type=int, default=None, help="default: the pdac task's (16)")
    ap.add_argument("--pdac-size", type=int, default=None, help="default: the pdac task's input edge (32)")
    ap.add_argument("--pdac-batch", type=int, default=None, help="default: the pdac task's batch size (32)")
    ap.add_argument("--skip-pdac", action="store_true")
    ap.add_argument("--images-per-patient", type=float, default=3.0,
                    help="mean images per patient in the -patient modes (1 + Poisson, at most 8)")
    args = ap.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        sys.exit(f"unknown mode {sorted(unknown)[0]!r}; use some of {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
    warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    bench("cxr", "resnet9-gn", 2, args.cxr_size, args.cxr_width, args.cxr_batch, 5, args, device)
    if not args.skip_pdac:
        try:
            task = create_task("pdac")
            arch, size, labels, defaults = task.default_arch, task.input_size, len(task.labels), task.defaults
        except PrivauditError:   # no pdac task registered: the 3D ResNet-9
            arch, size, labels, defaults = "resnet9-gn", 32, 1, {}
        bench("pdac", arch, 3, args.pdac_size or size, args.pdac_width or defaults.get("width", 16),
              args.pdac_batch or defaults.get("batch_size", 32), labels, args, device)


if __name__ == "__main__":
    main()
