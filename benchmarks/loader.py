"""Images per second through a training DataLoader: decoding PNG files against the preprocessed cache.

    python benchmarks/loader.py                                # synthetic 512x512 PNGs, resized to 256
    python benchmarks/loader.py --data cohort/manifest.csv --size 256 --workers 8

Both paths feed the same DataLoader (same batch size, worker processes, and pinned memory on CUDA) and
yield the same normalised tensors: ``png`` reads each file and resizes it (what training does without a
cache), ``cache`` reads rows of the memory-mapped array that ``privaudit data cache`` writes. ``build``
is the one-off cost of writing that cache. Without ``--data`` the cohort is ``--distinct`` synthetic
radiographs at ``--native`` pixels, listed ``--n`` times in all (different sample ids, repeated files), so
that a big cohort costs little to make; every file is decoded anew each time either way. Both runs start
with the files in the operating system's page cache (they were just written), so the figures compare
decoding with reading, not disk speeds. The last line names the machine's cores and torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from privaudit.backends.opacus_backend import PIXEL_MEAN, PIXEL_STD
from privaudit.data.cache import ArrayDataset, build_cache, loader_options, open_cache
from privaudit.data.images import read_image
from privaudit.data.presets import load_data
from privaudit.tasks import create_task


class PngDataset:
    """What training reads without a cache: decode and resize each file, then normalise."""

    def __init__(self, paths, y, size):
        self.paths, self.y, self.size = [str(p) for p in paths], y, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x = torch.from_numpy(read_image(Path(self.paths[i]), self.size)[None])
        return (x - PIXEL_MEAN) / PIXEL_STD, torch.from_numpy(self.y[i])


def make_cohort(folder: Path, *, n: int, distinct: int, native: int) -> Path:
    from privaudit.data.synth_cxr import synthesize_cxr

    src = synthesize_cxr(folder / "src", n=max(distinct, 20), image_size=native, seed=0)
    base = pd.read_csv(src, dtype=str)
    rows = base.iloc[np.arange(n) % len(base)].reset_index(drop=True)
    rows["sample_id"] = [f"{s}_{i}" for i, s in enumerate(rows["sample_id"])]
    rows["patient_id"] = [f"{p}_{i}" for i, p in enumerate(rows["patient_id"])]
    rows["path"] = "src/" + rows["path"]
    path = folder / "manifest.csv"
    rows.to_csv(path, index=False)
    return path


def rate(loader, device, epochs: int) -> float:
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for xb, _yb in loader:
            xb = xb.to(device, non_blocking=True)
            n += len(xb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a manifest.csv or dataset folder (default: synthetic)")
    ap.add_argument("--n", type=int, default=2000, help="synthetic rows")
    ap.add_argument("--distinct", type=int, default=32, help="distinct synthetic files")
    ap.add_argument("--native", type=int, default=512, help="edge of the synthetic PNGs")
    ap.add_argument("--size", type=int, default=256, help="edge the loader resizes to")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: as training picks "
                    "them on CUDA, 2 on CPU)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    opts = loader_options(device)
    if args.workers is not None:
        opts["num_workers"] = args.workers
    elif device.type == "cpu":
        opts["num_workers"] = 2
    tmp = Path(tempfile.mkdtemp(prefix="privaudit-loader-bench-"))
    try:
        if args.data is None:
            t0 = time.perf_counter()
            manifest_path = make_cohort(tmp, n=args.n, distinct=args.distinct, native=args.native)
            print(f"# synthetic cohort: {args.n} rows over {max(args.distinct, 20)} PNGs of {args.native}x{args.native} "
                  f"({time.perf_counter() - t0:.0f} s to make)", flush=True)
            cache_dir = None
        else:
            manifest_path = args.data
            cache_dir = tmp / "cache"
        manifest = load_data(manifest_path, task=create_task("cxr"))
        y = manifest.frame[list(manifest.labels)].to_numpy(np.float32)
        n = len(manifest.frame)

        png = DataLoader(PngDataset(manifest.image_paths(), y, args.size), batch_size=args.batch, **opts)
        png_rate = rate(png, device, args.epochs)
        print(f"png    {png_rate:10.0f} images/s   decode + resize to {args.size}x{args.size}, "
              f"{opts['num_workers']} workers, batch {args.batch}", flush=True)

        t0 = time.perf_counter()
        folder, _ = build_cache(manifest, args.size, cache_dir, jobs=max(1, opts["num_workers"]))
        build_s = time.perf_counter() - t0
        print(f"build  {n / build_s:10.0f} images/s   one-off: {n} images in {build_s:.1f} s, "
              f"{(folder / 'images.npy').stat().st_size / 2**20:.0f} MiB", flush=True)
        if cache_dir is not None:
            os.environ["PRIVAUDIT_IMAGE_CACHE"] = str(cache_dir)
        x = open_cache(manifest, args.size)
        assert x is not None, "the cache just built is not valid"
        ds = ArrayDataset(x, y, mean=PIXEL_MEAN, std=PIXEL_STD)
        cache = DataLoader(ds, batch_size=args.batch, collate_fn=ArrayDataset.collate, **opts)
        cache_rate = rate(cache, device, args.epochs)
        print(f"cache  {cache_rate:10.0f} images/s   memory-mapped .npy, {opts['num_workers']} workers, "
              f"batch {args.batch}", flush=True)
        print(f"ratio  {cache_rate / png_rate:10.1f} x", flush=True)
        print(f"# {n} images x {args.epochs} epoch(s); {device.type}{', pinned memory' if opts['pin_memory'] else ''}; "
              f"{os.cpu_count()} CPU cores; torch {torch.__version__}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
