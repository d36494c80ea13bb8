"""Benchmark of the pdac pipeline: volumes per second for loading (uncached against cached) and for DP and
non-private training, with the peak memory.

    .venv/bin/python benchmarks/pdac.py                      # 120 volumes at 32^3, width 16, batch 16
    .venv/bin/python benchmarks/pdac.py --n 400 --epochs 2

It writes a synthetic cohort and a private volume cache into a temporary folder (removed at the end), so the
user's cache is untouched. Training throughput is training-set volumes x epochs / training seconds, read from
train.json, so model building and data loading are excluded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120, help="synthetic volumes")
    ap.add_argument("--size", type=int, default=32, help="cube edge in voxels")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="the pdac default")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="privaudit-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["PRIVAUDIT_CACHE_DIR"] = str(tmp / "cache")
        from privaudit.backends.opacus_backend import OpacusBackend, peak_memory
        from privaudit.config import DPConfig, TrainConfig
        from privaudit.data.presets import load_data
        from privaudit.data.synth_ct import synthesize_ct
        from privaudit.data.volumes import load_volumes
        from privaudit.tasks import create_task

        t0 = time.perf_counter()
        manifest_path = synthesize_ct(tmp / "data", n=args.n, image_size=args.size, seed=0)
        t_synth = time.perf_counter() - t0
        manifest = load_data(manifest_path, task=create_task("pdac"))
        paths = manifest.image_paths()
        load_volumes(paths[:1], args.size, cache=False)   # import MONAI and warm up outside the timings

        t0 = time.perf_counter()
        load_volumes(paths, args.size, cache=False)
        t_nocache = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_volumes(paths, args.size)                     # first pass: decode and fill the cache
        t_fill = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_volumes(paths, args.size)                     # cached: hash check + .npy read
        t_cached = time.perf_counter() - t0

        rows = [("synthesise (write NIfTI)", args.n / t_synth),
                ("load, no cache (MONAI decode + resample)", args.n / t_nocache),
                ("load, first pass filling the cache", args.n / t_fill),
                ("load, cached", args.n / t_cached)]
        memory = {}
        for dp in (False, True):
            cfg = TrainConfig(task="pdac", epochs=args.epochs, width=args.width, batch_size=args.batch_size,
                              physical_batch_size=args.batch_size, image_size=args.size, seed=0,
                              dp=DPConfig(enabled=dp, epsilon=8.0))
            info = OpacusBackend().train(manifest, cfg, tmp / f"run-{dp}", quiet=True)
            name = "train DP-SGD (Opacus, epsilon 8)" if dp else "train non-private"
            rows.append((name, info["n_train"] * args.epochs / info["train_seconds"]))
            memory[name] = info["peak_memory"]

        import torch

        print(f"pdac benchmark: {args.n} volumes at {args.size}^3, width {args.width}, batch {args.batch_size}, "
              f"{args.epochs} epoch(s), torch threads {torch.get_num_threads()}")
        for name, rate in rows:
            print(f"  {name:<42s} {rate:8.1f} volumes/s")
        print(f"  cached / uncached loading speed-up       {t_nocache / t_cached:8.1f} x")
        for name, mem in memory.items():
            cuda = mem["cuda_max_allocated_mb"]
            print(f"  peak memory after {name:<33s} CPU RSS {mem['cpu_rss_peak_mb']:.0f} MiB"
                  + (f", CUDA {cuda:.0f} MiB" if cuda is not None else ""))
        print(f"  peak memory of the process               CPU RSS {peak_memory('cpu')['cpu_rss_peak_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
