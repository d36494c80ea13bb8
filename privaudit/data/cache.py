"""A preprocessed image cache: every radiograph of a manifest, decoded and resized once, in one memory-mapped array.

Decoding and resizing PNG, JPEG or DICOM files costs far more than a training step needs from the data, so
a GPU waits on them. ``privaudit data cache MANIFEST_OR_FOLDER --image-size N`` does that work once and
writes a cache folder:

``images.npy``
    float32, shape (n, 1, N, N), values in [0, 1]: exactly what :func:`privaudit.data.images.read_image`
    returns, one row per manifest row, read back with ``np.load(mmap_mode=...)`` so that only the rows a
    batch needs are paged in.
``index.csv``
    ``sample_id``, ``path``, ``row``, and the file's ``bytes`` and ``mtime_ns`` when it was cached.
``cache.json``
    the cache format, the preprocessing parameters, the number of images, and ``key``: the SHA-256 of the
    preprocessing parameters and the manifest's (sample_id, path) table.

By default the folder is ``.privaudit-cache/images-<N>px`` beside the manifest (inside the dataset folder
for a preset); ``--out DIR`` puts it elsewhere, and then ``PRIVAUDIT_IMAGE_CACHE=DIR`` tells training where
it is. :func:`privaudit.data.inputs.load_inputs` uses a cache by itself when it is valid for the manifest
and the image size: same parameters, every sample_id present with the same path, and every file unchanged
(same size and modification time). A cache that fails any of these is ignored with a
:class:`StaleCacheWarning` saying why and how to rebuild it; the images are then read as usual.
``PRIVAUDIT_IMAGE_CACHE=off`` turns the cache off.

A cache is trusted by its location, each file's size and modification time, and the manifest's
(sample_id, path) table: training never re-reads the files behind it. A cache copied from elsewhere, or a
file rewritten with its old size and time, is not noticed. ``privaudit data cache ... --verify``
(:func:`verify_cache`) decodes every file again and compares the pixels with the cache.

The cache holds patient images: its folder is created readable by its owner only. Deleting it is always safe.

:class:`ArrayDataset` is the torch dataset over such an array (or any in-memory one) that the opacus
backend's DataLoader reads with worker processes; :func:`loader_options` picks workers and pinned memory.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import multiprocessing as mp
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from privaudit._fs import is_privaudit_dir
from privaudit.errors import ConfigError, DataError, OutputExistsError
from privaudit.limits import check_limit, check_out_parent

CACHE_FORMAT = 1
CACHE_ENV = "PRIVAUDIT_IMAGE_CACHE"
WORKERS_ENV = "PRIVAUDIT_LOADER_WORKERS"
DEFAULT_DIRNAME = ".privaudit-cache"
# What the cached values are; a change to read_image's output must change this text (and so every key).
READER = ("privaudit.data.images.read_image: grey float32 in [0, 1] (16-bit of either byte order over 65535, "
          "DICOM palette colour through its LUT), PIL bilinear resize to size x size")
_CHUNK = 64   # at most this many images per task when decoding in worker processes


class StaleCacheWarning(UserWarning):
    """A cache exists for this manifest and size but does not match it; the images are read instead."""


def cache_params(size: int) -> dict:
    """The preprocessing parameters a cache is built with; every one is part of its key."""
    return {"format": CACHE_FORMAT, "size": int(size), "channels": 1, "dtype": "float32", "reader": READER}


def manifest_key(frame: pd.DataFrame) -> str:
    """SHA-256 of the manifest's (sample_id, path) table, in row order."""
    h = hashlib.sha256()
    for sid, path in zip(frame["sample_id"].astype(str), frame["path"].astype(str)):
        h.update(f"{sid}\t{path}\n".encode())
    return h.hexdigest()


def cache_key(frame: pd.DataFrame, size: int) -> str:
    blob = json.dumps(cache_params(size), sort_keys=True) + manifest_key(frame)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir(manifest, size: int) -> Path:
    return Path(manifest.root) / DEFAULT_DIRNAME / f"images-{int(size)}px"


def _file_stats(paths) -> tuple[np.ndarray, np.ndarray]:
    sizes, mtimes = np.empty(len(paths), np.int64), np.empty(len(paths), np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise DataError(f"{p}: image file not found; check the manifest's path column") from None
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def _decode_chunk(args) -> np.ndarray:
    from privaudit.data.images import read_image

    paths, size = args
    return np.stack([read_image(Path(p), size)[None] for p in paths]) if paths else np.empty((0, 1, size, size), np.float32)


def _is_cache_dir(path: Path) -> bool:
    try:
        return json.loads((path / "cache.json").read_text()).get("kind") == "privaudit image cache"
    except (OSError, ValueError, AttributeError):
        return False


# ---- building ------------------------------------------------------------------------------------------------
def build_cache(manifest, size: int, out: Path | None = None, *, force: bool = False, jobs: int = 1,
                progress: Callable[[int], None] | None = None) -> tuple[Path, bool]:
    """Write the cache of ``manifest`` at ``size`` x ``size`` into ``out`` (default: beside the manifest).

    Returns (folder, built): ``built`` is False when a valid cache of exactly this manifest was already there
    (and ``force`` is not set). A folder holding an older privaudit cache is replaced; any other non-empty
    folder only with ``force``. All or nothing: on an error nothing is left behind.
    """
    if size < 16:
        raise ConfigError(f"--image-size {size} is too small; use at least 16")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    check_limit("image_size", size)
    check_limit("jobs", jobs)
    out = Path(out) if out is not None else default_cache_dir(manifest, size)
    check_out_parent(out)
    frame = manifest.frame
    if out.is_dir() and not force and _is_cache_dir(out):
        state = check_cache(out, manifest, size)
        if state.valid and state.key == cache_key(frame, size):
            if progress is not None:
                progress(len(frame))
            return out, False
        force = True   # an outdated privaudit cache: replace it
    elif out.is_dir() and any(out.iterdir()) and not (force and is_privaudit_dir(out)):
        raise OutputExistsError(f"--out {out} already holds files that are not a privaudit image cache; choose "
                                "another folder (--force replaces only a folder privaudit wrote)")
    paths = [str(p) for p in manifest.image_paths()]
    sizes, mtimes = _file_stats(paths)
    n = len(paths)
    new_parent = not out.absolute().parent.exists()
    try:
        _write(out, manifest, size, paths, sizes, mtimes, force=force, jobs=jobs, progress=progress)
    except BaseException:
        if new_parent:   # leave no empty .privaudit-cache behind
            with contextlib.suppress(OSError):
                out.absolute().parent.rmdir()
        raise
    return out, True


def _write(out, manifest, size, paths, sizes, mtimes, *, force, jobs, progress) -> None:
    from privaudit._fs import staged_dir

    frame, n = manifest.frame, len(paths)
    # the cache may sit inside the dataset folder, but never hold it (nor the manifest)
    with staged_dir(out, force=force, kind="cache", inputs=(manifest.root, manifest.source)) as tmp:
        arr = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float32, shape=(n, 1, size, size))
        step = max(1, min(_CHUNK, -(-n // (4 * jobs))))   # enough chunks to keep every process busy
        chunks = [(paths[i:i + step], size) for i in range(0, n, step)]
        done = 0
        if jobs == 1 or len(chunks) == 1:
            results = map(_decode_chunk, chunks)
            pool = None
        else:
            # spawned, not forked: the caller may hold threads (torch's), and forking those can deadlock
            pool = ProcessPoolExecutor(max_workers=min(jobs, len(chunks)), mp_context=mp.get_context("spawn"))
            results = pool.map(_decode_chunk, chunks)
        try:
            for block in results:
                arr[done:done + len(block)] = block
                done += len(block)
                if progress is not None:
                    progress(done)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        arr.flush()
        del arr
        pd.DataFrame({"sample_id": frame["sample_id"].astype(str), "path": frame["path"].astype(str),
                      "row": np.arange(n), "bytes": sizes, "mtime_ns": mtimes}).to_csv(tmp / "index.csv", index=False)
        info = {"kind": "privaudit image cache", **cache_params(size), "key": cache_key(frame, size),
                "manifest_key": manifest_key(frame), "n": n, "shape": [n, 1, size, size],
                "source": str(Path(manifest.source).absolute()),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        (tmp / "cache.json").write_text(json.dumps(info, indent=2) + "\n")


# ---- checking and reading ------------------------------------------------------------------------------------
class CacheState:
    """The outcome of :func:`check_cache`: ``valid`` with the rows to read, or the reason it is stale."""

    def __init__(self, folder: Path, *, valid: bool, reason: str = "", rows: np.ndarray | None = None,
                 key: str | None = None):
        self.folder, self.valid, self.reason, self.rows, self.key = folder, valid, reason, rows, key


def check_cache(folder: Path, manifest, size: int) -> CacheState:
    """Is the cache in ``folder`` valid for ``manifest`` at ``size``? Reads the index and stats the files."""
    folder = Path(folder)

    def stale(reason: str) -> CacheState:
        return CacheState(folder, valid=False, reason=reason)

    try:
        info = json.loads((folder / "cache.json").read_text())
    except (OSError, ValueError):
        return stale("cache.json is missing or unreadable")
    params = {k: info.get(k) for k in cache_params(size)}
    if params != cache_params(size):
        diff = next(k for k in params if params[k] != cache_params(size)[k])
        return stale(f"it was built with {diff} {info.get(diff)!r}, not {cache_params(size)[diff]!r}")
    try:
        index = pd.read_csv(folder / "index.csv", dtype={"sample_id": str, "path": str})
    except (OSError, ValueError, pd.errors.ParserError):
        return stale("index.csv is missing or unreadable")
    if list(index.columns[:5]) != ["sample_id", "path", "row", "bytes", "mtime_ns"] or len(index) != info.get("n"):
        return stale("index.csv does not match cache.json")
    frame = manifest.frame
    if manifest_key(frame) == info.get("manifest_key"):
        rows = index["row"].to_numpy(np.int64)
        cached = index
    else:
        by_id = index.set_index("sample_id")
        ids = frame["sample_id"].astype(str)
        missing = ~ids.isin(by_id.index)
        if missing.any():
            return stale(f"sample_id {ids[missing].iloc[0]!r} of the manifest is not in it "
                         f"({int(missing.sum())} missing)")
        cached = by_id.loc[ids.to_numpy()].reset_index()
        moved = cached["path"].to_numpy() != frame["path"].astype(str).to_numpy()
        if moved.any():
            i = int(np.flatnonzero(moved)[0])
            return stale(f"sample_id {ids.iloc[i]!r} has path {frame['path'].iloc[i]!r} in the manifest but "
                         f"{cached['path'].iloc[i]!r} in the cache")
        rows = cached["row"].to_numpy(np.int64)
    sizes, mtimes = _file_stats([str(p) for p in manifest.image_paths()])
    changed = (sizes != cached["bytes"].to_numpy(np.int64)) | (mtimes != cached["mtime_ns"].to_numpy(np.int64))
    if changed.any():
        i = int(np.flatnonzero(changed)[0])
        return stale(f"image {frame['path'].iloc[i]} changed since the cache was built "
                     f"({int(changed.sum())} changed)")
    return CacheState(folder, valid=True, rows=rows, key=info.get("key"))


def _candidates(manifest, size: int) -> list[tuple[Path, bool]]:
    """Cache folders to try, each with whether the user named it (PRIVAUDIT_IMAGE_CACHE)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() == "off":
        return []
    out = []
    if env:
        named = Path(env).expanduser()
        out.append((named / f"images-{int(size)}px" if not _is_cache_dir(named) else named, True))
    out.append((default_cache_dir(manifest, size), False))
    return out


def open_cache(manifest, size: int) -> np.ndarray | None:
    """The manifest's images at ``size`` from a valid cache (row-aligned with the manifest), or None.

    The full array of a cache built from this very manifest comes back memory-mapped (copy-on-write, so
    that nothing can write to the file); a subset of a larger cache is read into memory. A cache that exists
    but does not fit raises a :class:`StaleCacheWarning` with the reason.
    """
    for folder, named in _candidates(manifest, size):
        if not (folder / "cache.json").exists():
            if named:
                warnings.warn(f"{CACHE_ENV}={os.environ.get(CACHE_ENV)} holds no image cache for {size} px "
                              f"(looked for {folder / 'cache.json'}); reading the images instead. Build one with: "
                              f"privaudit data cache {manifest.source} --image-size {size} --out {folder}",
                              StaleCacheWarning, stacklevel=3)
            continue
        state = check_cache(folder, manifest, size)
        if state.valid:
            try:
                arr = np.load(folder / "images.npy", mmap_mode="c", allow_pickle=False)
            except (OSError, ValueError) as e:
                state = CacheState(folder, valid=False, reason=f"images.npy is unreadable ({type(e).__name__})")
            else:
                if arr.dtype != np.float32 or arr.shape[1:] != (1, size, size) or len(arr) <= state.rows.max(initial=-1):
                    state = CacheState(folder, valid=False, reason=f"images.npy has shape {arr.shape}")
                elif np.array_equal(state.rows, np.arange(len(arr))):
                    return arr
                else:
                    order = np.argsort(state.rows, kind="stable")   # read the file in order, then put rows back
                    out = np.empty((len(state.rows), 1, size, size), np.float32)
                    out[order] = arr[state.rows[order]]
                    return out
        warnings.warn(f"image cache {folder} is stale ({state.reason}); reading the images instead. Rebuild it "
                      f"with: privaudit data cache {manifest.source} --image-size {size}"
                      f"{'' if not named else f' --out {folder}'}", StaleCacheWarning, stacklevel=3)
    return None


# ---- verifying ----------------------------------------------------------------------------------------------
class CacheVerification:
    """The outcome of :func:`verify_cache`.

    ``folder``: the cache checked; ``stale``: why it does not fit the manifest (then nothing was compared, and
    training ignores it anyway); ``n_checked``: images decoded and compared; ``mismatches``: one dict per image
    whose cached pixels differ from a fresh decode (``sample_id``, ``path``, ``max_abs_diff``);
    ``unreadable``: one dict per image that cannot be decoded now (``sample_id``, ``path``, ``error``).
    """

    def __init__(self, folder: Path, *, stale: str = "", n_checked: int = 0, mismatches=(), unreadable=(),
                 atol: float = 0.0):
        self.folder, self.stale, self.n_checked = Path(folder), stale, n_checked
        self.mismatches, self.unreadable, self.atol = list(mismatches), list(unreadable), atol

    @property
    def ok(self) -> bool:
        return not self.stale and not self.mismatches and not self.unreadable

    def summary(self) -> str:
        """One line for the user."""
        if self.stale:
            return f"image cache {self.folder} is stale ({self.stale}); training does not use it; rebuild it"
        if self.ok:
            return f"image cache {self.folder}: all {self.n_checked} images match a fresh decode of their files"
        parts = []
        if self.mismatches:
            first = self.mismatches[0]
            parts.append(f"{len(self.mismatches)} image(s) differ from their files (first: {first['path']}, "
                         f"largest difference {first['max_abs_diff']:.3g})")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} file(s) cannot be read (first: {self.unreadable[0]['error']})")
        return (f"image cache {self.folder}: " + "; ".join(parts) + f" of {self.n_checked}; rebuild it with --force")


def _compare_chunk(args) -> list[tuple[int, float | None, str | None]]:
    """(position, largest absolute difference or None, error or None) for each (position, path, cache row)."""
    from privaudit.data.images import read_image

    npy, items, size = args
    cached = np.load(npy, mmap_mode="r", allow_pickle=False)
    out = []
    for pos, path, row in items:
        try:
            fresh = read_image(Path(path), size)
        except DataError as e:
            out.append((pos, None, str(e)))
            continue
        out.append((pos, float(np.max(np.abs(np.asarray(cached[row, 0]) - fresh))), None))
    return out


def find_cache(manifest, size: int) -> Path | None:
    """The cache folder that training would try first for ``manifest`` at ``size`` (one holding cache.json)."""
    for folder, _ in _candidates(manifest, size):
        if (folder / "cache.json").exists():
            return folder
    return None


def verify_cache(manifest, image_size: int, folder: Path | None = None, *, jobs: int = 1, atol: float = 0.0,
                 progress: Callable[[int], None] | None = None) -> CacheVerification:
    """Compare the cached pixels of every manifest image with a fresh decode of its file.

    Training trusts a cache by its location, each file's size and modification time, and the manifest's
    (sample_id, path) table: it never re-reads the files. This is the check that does, for a cache copied
    from elsewhere or files rewritten with their old size and time. ``folder``: the cache (default: the one
    training would use, see :func:`open_cache`). An image differs when some pixel differs by more than
    ``atol`` (the cache holds exactly what decoding gives, so 0 by default; a different Pillow version may
    resize slightly differently). Decodes in ``jobs`` processes, like :func:`build_cache`.
    """
    check_limit("image_size", image_size)
    check_limit("jobs", jobs)
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    if folder is None:
        folder = find_cache(manifest, image_size)
        if folder is None:
            looked = [str(f) for f, _ in _candidates(manifest, image_size)]
            where = f"in {', '.join(looked)}" if looked else f"({CACHE_ENV}=off)"
            raise DataError(f"no image cache at {image_size} px for {manifest.source} {where}; build one with: "
                            f"privaudit data cache {manifest.source} --image-size {image_size}")
    folder = Path(folder)
    if not (folder / "cache.json").is_file():
        raise DataError(f"{folder}: not an image cache (no cache.json); give the folder 'privaudit data cache' wrote")
    state = check_cache(folder, manifest, image_size)
    if not state.valid:
        return CacheVerification(folder, stale=state.reason, atol=atol)
    npy = str(folder / "images.npy")
    try:
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        return CacheVerification(folder, stale=f"images.npy is unreadable ({type(e).__name__})", atol=atol)
    if (arr.dtype != np.float32 or arr.shape[1:] != (1, image_size, image_size)
            or len(arr) <= state.rows.max(initial=-1)):
        return CacheVerification(folder, stale=f"images.npy has shape {arr.shape}", atol=atol)
    del arr
    paths = [str(p) for p in manifest.image_paths()]
    items = list(zip(range(len(paths)), paths, state.rows.tolist()))
    step = max(1, min(_CHUNK, -(-len(items) // (4 * jobs))))
    chunks = [(npy, items[i:i + step], image_size) for i in range(0, len(items), step)]
    pool = None
    if jobs > 1 and len(chunks) > 1:
        pool = ProcessPoolExecutor(max_workers=min(jobs, len(chunks)), mp_context=mp.get_context("spawn"))
    results = pool.map(_compare_chunk, chunks) if pool is not None else map(_compare_chunk, chunks)
    ids = manifest.frame["sample_id"].astype(str).tolist()
    mismatches, unreadable, done = [], [], 0
    try:
        for block in results:
            for pos, diff, error in block:
                if error is not None:
                    unreadable.append({"sample_id": ids[pos], "path": paths[pos], "error": error})
                elif diff > atol:
                    mismatches.append({"sample_id": ids[pos], "path": paths[pos], "max_abs_diff": diff})
            done += len(block)
            if progress is not None:
                progress(done)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return CacheVerification(folder, n_checked=done, mismatches=mismatches, unreadable=unreadable, atol=atol)


# ---- reading for training -----------------------------------------------------------------------------------
class _Batch(list):
    """The samples of one batch (views, for any collate function) plus the stacked tensors they view."""

    def __init__(self, samples, *, tensors):
        super().__init__(samples)
        self.tensors = tensors


class ArrayDataset:
    """A map-style torch dataset over rows of an (N, C, ...) array, memory-mapped or in memory.

    ``rows`` picks the rows of ``x``/``y`` (default: all); ``extra`` appends in-memory (x, y) rows (the
    canaries). Items are ``((x - mean) / std, y)`` as float32 tensors. A batch is read with one sorted
    fancy index (``__getitems__``), which a memory-mapped file serves in file order, and with
    ``collate_fn=ArrayDataset.collate`` it reaches the loop without being split and stacked again. Worker processes reopen
    a memory-mapped array by file name rather than copying it.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, rows=None, *, extra=None, mean: float = 0.0, std: float = 1.0):
        self.x, self.y = x, y
        self.rows = np.arange(len(x), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.extra_x, self.extra_y = extra if extra is not None else (None, None)
        self.n_main = len(self.rows)
        self.n_extra = 0 if self.extra_x is None else len(self.extra_x)
        self.mean, self.std = float(mean), float(std)

    def __len__(self) -> int:
        return self.n_main + self.n_extra

    def _read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        xb = np.empty((len(idx), *self.x.shape[1:]), np.float32)
        yb = np.empty((len(idx), *self.y.shape[1:]), np.float32)
        main = idx < self.n_main
        if main.any():
            pos = np.flatnonzero(main)
            src = self.rows[idx[pos]]
            order = np.argsort(src, kind="stable")
            xb[pos[order]] = self.x[src[order]]
            yb[pos] = self.y[src]
        if (~main).any():
            pos = np.flatnonzero(~main)
            xb[pos] = self.extra_x[idx[pos] - self.n_main]
            yb[pos] = self.extra_y[idx[pos] - self.n_main]
        return xb, yb

    def _tensors(self, xb, yb):
        import torch

        # xb is a fresh array, so normalise in place: the same float32 arithmetic as (x - mean) / std
        return torch.from_numpy(xb).sub_(self.mean).div_(self.std), torch.from_numpy(yb)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        xt, yt = self._tensors(*self._read(np.array([i % len(self)])))
        return xt[0], yt[0]

    def __getitems__(self, indices) -> list:
        if len(indices) == 0:
            return []
        xt, yt = self._tensors(*self._read(np.asarray(indices)))
        return _Batch(zip(xt, yt), tensors=(xt, yt))

    @staticmethod
    def collate(batch):
        """The DataLoader's ``collate_fn``: a batch from ``__getitems__`` is already stacked; else torch's."""
        if isinstance(batch, _Batch):
            return list(batch.tensors)
        from torch.utils.data import default_collate

        return default_collate(batch)

    def __getstate__(self):
        state = dict(self.__dict__)
        x = self.x
        if isinstance(x, np.memmap) and x.filename is not None:
            state["x"] = ("memmap", x.filename, x.dtype.str, x.shape, x.offset)
        return state

    def __setstate__(self, state):
        x = state["x"]
        if isinstance(x, tuple) and x and x[0] == "memmap":
            _, filename, dtype, shape, offset = x
            state["x"] = np.memmap(filename, dtype=np.dtype(dtype), mode="c", shape=shape, offset=offset)
        self.__dict__.update(state)


def loader_options(device, *, local_world_size: int = 1) -> dict:
    """DataLoader options for ``device``: worker processes and pinned memory on CUDA, none on CPU.

    ``PRIVAUDIT_LOADER_WORKERS`` overrides the number of workers (default on CUDA: the CPU cores shared by
    the processes of this machine, at most 8 each; on CPU 0, since the training itself uses the cores).
    """
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            workers = int(env)
        except ValueError:
            raise ConfigError(f"{WORKERS_ENV}={env!r} is not a whole number of worker processes") from None
        if workers < 0:
            raise ConfigError(f"{WORKERS_ENV} must be 0 or more, got {workers}")
    elif getattr(device, "type", str(device)) == "cuda":
        workers = max(1, min(8, (os.cpu_count() or 1) // max(1, local_world_size) - 1))
    else:
        workers = 0
    return {"num_workers": workers, "pin_memory": getattr(device, "type", str(device)) == "cuda"}
