"""CT volume IO for 3D tasks: NIfTI in, model-ready cubes out, through MONAI transforms and a disk cache.

:func:`load_volumes` turns ``.nii``/``.nii.gz`` volumes in Hounsfield units into an ``(N, 1, S, S, S)``
float32 array in [0, 1]. Each volume goes through MONAI, in this order (:func:`build_transform`):

1. load with MONAI's ``NibabelReader`` and put the channel first (``EnsureChannelFirst``);
2. ``Orientation("RAS")``: every volume in the same voxel order, whatever order it was stored in;
3. ``ScaleIntensityRange``: the CT window, -150 to 200 HU by default, mapped to [0, 1] and clipped;
4. ``CropForeground``: the bounding box of the body (voxels above the window's floor);
5. ``GaussianSmooth`` when the next step downsamples (sigma = (factor - 1) / 2 voxels per axis, the rule of
   scikit-image's anti-aliasing), so that thin-slice scans do not alias;
6. ``Spacing``: resample to the target spacing, by default isotropic ``fov_mm / S`` (224 mm / 32 = 7 mm);
7. ``ResizeWithPadOrCrop``: a centred cube of ``fov_mm`` (padding is air, 0 after windowing);
8. ``Resize`` to ``S``^3 (a no-op with the default spacing).

The cache
---------
Decoding and resampling a NIfTI volume is by far the slowest part of loading, and every epoch, run and
shadow model needs the same arrays. The result of steps 1-8 for a file is therefore kept as a ``.npy`` in
the cache folder, keyed by the SHA-256 of the file's bytes and by every preprocessing parameter (plus the
cache format and MONAI versions). A second load only hashes the file (skipped too when its path, size and
modification time are unchanged) and reads the array back. The folder is ``$PRIVAUDIT_CACHE_DIR`` if set,
else ``$XDG_CACHE_HOME/privaudit`` (by default ``~/.cache/privaudit``), with ``volumes/`` and ``files/``
inside; the folders privaudit creates there are readable by their owner only, since they hold patient images
(a folder that exists already keeps its mode). Deleting it is always safe.
``PRIVAUDIT_CACHE_DIR=off`` (or ``cache=False``) turns the cache off.

Every unreadable input raises :class:`~privaudit.errors.DataError` with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from privaudit import limits
from privaudit.errors import ConfigError, DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
CACHE_FORMAT = 1
CACHE_ENV = "PRIVAUDIT_CACHE_DIR"
DEFAULT_WINDOW = (-150.0, 200.0)   # HU, the pancreas window of the group's related work
DEFAULT_FOV_MM = 224.0


@dataclass(frozen=True)
class Preprocessing:
    """How a CT volume becomes a model input. Every field is part of the cache key."""

    size: int                                   # edge of the output cube in voxels
    window: tuple[float, float] = DEFAULT_WINDOW  # HU mapped to 0 and 1 (clipped outside)
    fov_mm: float = DEFAULT_FOV_MM              # edge of the physical cube kept around the body's centre
    spacing: tuple[float, float, float] | None = None  # resampling target in mm; None: fov_mm / size
    orientation: str = "RAS"

    def __post_init__(self):
        if self.size < 2:
            raise ConfigError(f"volume size {self.size} is too small; use at least 16 voxels")
        limits.check_limit("image_size", self.size, const="MAX_VOLUME_SIZE")
        if not (math.isfinite(self.fov_mm) and self.fov_mm > 0):
            raise ConfigError(f"fov_mm {self.fov_mm} must be a positive number of mm")
        if self.spacing is not None and not all(math.isfinite(v) and v > 0 for v in self.spacing):
            raise ConfigError(f"spacing {self.spacing} must be positive numbers of mm")
        fov = self.fov_voxels
        if fov[0] * fov[1] * fov[2] > limits.MAX_VOLUME_VOXELS:
            raise ConfigError(f"a field of view of {self.fov_mm:g} mm at {self.target_spacing[0]:g} mm spacing is "
                              f"{'x'.join(map(str, fov))} voxels, above the limit of {limits.MAX_VOLUME_VOXELS:,}; "
                              "use a coarser spacing or a smaller field of view")
        if not self.window[1] > self.window[0]:
            raise ConfigError(f"CT window {self.window} must go from low to high HU")

    @property
    def target_spacing(self) -> tuple[float, float, float]:
        if self.spacing is not None:
            return tuple(float(s) for s in self.spacing)
        s = self.fov_mm / self.size
        return (s, s, s)

    @property
    def fov_voxels(self) -> tuple[int, int, int]:
        return tuple(max(1, int(round(self.fov_mm / s))) for s in self.target_spacing)

    def describe(self) -> dict:
        d = asdict(self)
        d["target_spacing_mm"] = list(self.target_spacing)
        return d


# ---------------------------------------------------------------------------------------------------------
# Checking files


def is_nifti(path: Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _header(path: Path):
    """The nibabel image (header read, data not decoded), or a DataError naming the file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    name = path.name.lower()
    if not path.is_file():
        raise DataError(f"{path}: volume file not found; check the manifest's path column")
    if name.endswith(IMAGE_2D_SUFFIXES):
        raise DataError(f"{path}: a 2D image ({path.suffix}) where this task needs 3D CT volumes; give NIfTI "
                        "volumes (.nii or .nii.gz), or use a 2D task such as cxr")
    if not is_nifti(path):
        raise DataError(f"{path}: not a NIfTI volume (expected .nii or .nii.gz); convert it, e.g. with dcm2niix")
    try:
        with warnings.catch_warnings():   # a degenerate affine makes nibabel warn; it is refused below instead
            warnings.simplefilter("ignore", RuntimeWarning)
            img = nib.load(str(path))   # reads the header only; the data stays on disk until asked for
            shape = tuple(int(s) for s in img.shape)
            dtype = np.dtype(img.get_data_dtype())
            spacing = np.linalg.norm(np.asarray(img.affine, dtype=np.float64)[:3, :3], axis=0)
    except (ImageFileError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}); re-export the volume or drop "
                        "its row") from None
    except Exception as e:   # nibabel's HeaderDataError and others for a header that makes no sense
        raise DataError(f"{path}: a NIfTI header that cannot be read ({type(e).__name__}); re-export the volume "
                        "or drop its row") from None
    if len(shape) < 3 or (len(shape) == 3 and min(shape) == 1) or (len(shape) > 3 and any(s > 1 for s in shape[3:])):
        what = "a 2D image" if len(shape) < 3 or min(shape[:3]) == 1 else f"a {len(shape)}D series"
        raise DataError(f"{path}: {what} of shape {'x'.join(map(str, shape))} where this task needs one 3D "
                        "CT volume per file")
    check_volume_header(path, shape, dtype, spacing)
    return img


def check_volume_header(path: Path, shape, dtype, spacing) -> None:
    """Refuse a volume whose header declares more voxels or bytes than the limits, or a voxel spacing that is
    not a finite number of at least MIN_VOXEL_SPACING_MM, before nibabel allocates anything (the header is all
    that is read)."""
    voxels = int(np.prod([int(s) for s in shape], dtype=object))
    nbytes = voxels * np.dtype(dtype).itemsize
    dims = "x".join(map(str, shape))
    if min(shape) < 1:
        raise DataError(f"{path}: the header declares an empty volume ({dims}); re-export the volume")
    if voxels > limits.MAX_VOLUME_VOXELS:
        raise DataError(f"{path}: the header declares {dims} = {voxels:,} voxels, above the limit of "
                        f"{limits.MAX_VOLUME_VOXELS:,} (privaudit.limits.MAX_VOLUME_VOXELS); crop or downsample the "
                        "volume, or drop its row")
    if nbytes > limits.MAX_VOLUME_BYTES:
        raise DataError(f"{path}: the header declares {dims} voxels of {np.dtype(dtype).name} = {nbytes:,} bytes, "
                        f"above the limit of {limits.MAX_VOLUME_BYTES:,} (privaudit.limits.MAX_VOLUME_BYTES); "
                        "store it as int16 or crop it, or drop its row")
    spacing = np.asarray(spacing, dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing >= limits.MIN_VOXEL_SPACING_MM)):
        raise DataError(f"{path}: the header's voxel spacing {spacing.tolist()} mm is not a CT's (at least "
                        f"{limits.MIN_VOXEL_SPACING_MM} mm, finite); fix the affine (pixdim, qform/sform) when "
                        "re-exporting the volume")


def check_resample(path: Path, shape, spacing, prep: "Preprocessing") -> None:
    """Refuse a volume that resampling to ``prep``'s spacing would blow up past MAX_VOLUME_VOXELS (a header
    that claims metres-wide voxels)."""
    out = [int(np.ceil(n * s / t)) for n, s, t in zip(shape[:3], spacing, prep.target_spacing)]
    voxels = int(np.prod(out, dtype=object))
    if voxels > limits.MAX_VOLUME_VOXELS:
        raise DataError(f"{path}: resampled to {prep.target_spacing[0]:g} mm its {'x'.join(map(str, shape[:3]))} "
                        f"voxels of {np.round(np.asarray(spacing), 3).tolist()} mm would need "
                        f"{'x'.join(map(str, out))} voxels, above the limit of {limits.MAX_VOLUME_VOXELS:,}; check the "
                        "header's voxel spacing (pixdim, qform/sform)")


def volume_shape(path: Path) -> tuple[int, int, int]:
    """Spatial shape from the NIfTI header (checks the file is a 3D NIfTI volume; does not decode it)."""
    return tuple(int(s) for s in _header(path).shape[:3])


# ---------------------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> Path | None:
    """The cache folder (see the module docstring), or None when ``PRIVAUDIT_CACHE_DIR=off``."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() in ("off", "0", "none", ""):
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "privaudit"


def _private_dir(path: Path) -> Path | None:
    """``path``, created owner-only when it is new; an existing folder keeps its mode (``PRIVAUDIT_CACHE_DIR``
    may name a team's shared folder, or /tmp)."""
    from privaudit._fs import private_mkdir

    try:
        return private_mkdir(path)
    except OSError:
        return None  # a read-only or foreign cache folder: work without the cache


def _atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_digest(path: Path, root: Path | None = None) -> str:
    """SHA-256 of a file's bytes, remembered in the cache under its path, size and modification time."""
    path = Path(path)
    st = path.stat()
    memo = None
    if root is not None:
        stat_key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        memo = root / "files" / f"{stat_key}.txt"
        try:
            text = memo.read_text().strip()
            if len(text) == 64:
                return text
        except OSError:
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None and _private_dir(memo.parent) is not None:
        try:
            _atomic_write(memo, lambda f: f.write(digest), mode="w")
        except OSError:
            pass
    return digest


def _params_key(prep: Preprocessing) -> str:
    import monai

    blob = json.dumps({"format": CACHE_FORMAT, "monai": monai.__version__, **prep.describe()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# MONAI pipeline


@lru_cache(maxsize=1)
def _reader():
    from monai.data import NibabelReader

    return NibabelReader()


def read_volume(path: Path):
    """Decode one NIfTI volume with MONAI's NibabelReader: a channel-first MetaTensor (its affine kept)."""
    import zlib

    from monai.data import MetaTensor
    from monai.transforms import EnsureChannelFirst

    _header(path)
    reader = _reader()
    try:
        img = reader.read(str(path))
        array, meta = reader.get_data(img)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise DataError(f"{path}: truncated or corrupt NIfTI data ({type(e).__name__}: {detail}); re-export the "
                        "volume or drop its row") from None
    if not np.isfinite(array).all():
        raise DataError(f"{path}: the volume holds NaN or infinite values; re-export it")
    return EnsureChannelFirst()(MetaTensor(np.ascontiguousarray(array, dtype=np.float32), meta=meta))


def _anti_alias_sigma(current: Sequence[float], target: Sequence[float]) -> list[float]:
    return [max(0.0, (t / c - 1.0) / 2.0) for c, t in zip(current, target)]


def build_transform(prep: Preprocessing) -> Callable:
    """The MONAI transform chain of the module docstring (steps 2-8), applied to a channel-first MetaTensor."""
    from monai.transforms import (CropForeground, GaussianSmooth, Orientation, Resize, ResizeWithPadOrCrop,
                                  ScaleIntensityRange, Spacing)

    # NIfTI world axes: x from Left to Right, y from Posterior to Anterior, z from Inferior to Superior.
    orient = Orientation(axcodes=prep.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))
    window = ScaleIntensityRange(a_min=prep.window[0], a_max=prep.window[1], b_min=0.0, b_max=1.0, clip=True)
    crop = CropForeground(select_fn=lambda x: x > 0, margin=1, allow_smaller=True)
    spacing = Spacing(pixdim=prep.target_spacing, mode="bilinear", padding_mode="zeros", dtype=np.float32)
    fov = ResizeWithPadOrCrop(spatial_size=prep.fov_voxels, mode="constant")
    resize = Resize(spatial_size=(prep.size,) * 3, mode="trilinear", anti_aliasing=True)

    def apply(img):
        img = window(orient(img))
        if bool((img > 0).any()):
            img = crop(img)
        current = [float(v) for v in np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)]
        sigma = _anti_alias_sigma(current, prep.target_spacing)
        if max(sigma) > 0.25:
            img = GaussianSmooth(sigma=sigma)(img)
        img = resize(fov(spacing(img)))
        return img

    return apply


def preprocess_volume(path: Path, prep: Preprocessing) -> np.ndarray:
    """One file through the whole pipeline, without the cache: (1, S, S, S) float32 in [0, 1]."""
    img = _header(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        spacing = np.linalg.norm(np.asarray(img.affine, dtype=np.float64)[:3, :3], axis=0)
    check_resample(path, img.shape, spacing, prep)
    out = build_transform(prep)(read_volume(path))
    arr = np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)
    return np.clip(arr, 0.0, 1.0)


def _cached(path: Path, prep: Preprocessing, root: Path | None, key: str) -> np.ndarray:
    expected = (1,) + (prep.size,) * 3
    target = None
    if root is not None:
        digest = file_digest(path, root)
        target = root / "volumes" / f"{digest}-{key}.npy"
        if target.is_file():
            try:
                arr = np.load(target, allow_pickle=False)
                if arr.shape == expected and arr.dtype == np.float32:
                    return arr
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed and replaced
    arr = preprocess_volume(path, prep)
    if target is not None and _private_dir(target.parent) is not None:
        try:
            _atomic_write(target, lambda f: np.save(f, arr, allow_pickle=False))
        except OSError:
            pass
    return arr


def load_volumes(paths, size: int, *, progress: Callable[[int], object] | None = None,
                 window: tuple[float, float] = DEFAULT_WINDOW, fov_mm: float = DEFAULT_FOV_MM,
                 spacing: tuple[float, float, float] | None = None, cache: bool = True) -> np.ndarray:
    """Read many NIfTI CT volumes into an (N, 1, size, size, size) float32 array in [0, 1].

    Every file is checked first (header only), so a bad file fails before any slow work. With ``cache``
    (and a cache folder, see the module docstring) each volume is decoded and resampled once.
    """
    paths = [Path(p) for p in paths]
    prep = Preprocessing(size=int(size), window=tuple(float(w) for w in window), fov_mm=float(fov_mm),
                         spacing=None if spacing is None else tuple(float(s) for s in spacing))
    for p in paths:
        _header(p)
    root = _private_dir(cache_dir()) if cache and cache_dir() is not None else None
    key = _params_key(prep)
    out = np.empty((len(paths), 1) + (prep.size,) * 3, dtype=np.float32)
    for i, p in enumerate(paths):
        out[i] = _cached(p, prep, root, key)
        if progress is not None:
            progress(i + 1)
    return out


# ---------------------------------------------------------------------------------------------------------
# Label maps


def label_values(path: Path) -> list[int]:
    """The distinct values of an integer label map (cached under the file's digest)."""
    root = cache_dir()
    root = _private_dir(root) if root is not None else None
    memo = None
    if root is not None:
        memo = root / "labels" / f"{file_digest(path, root)}-v{CACHE_FORMAT}.json"
        try:
            return [int(v) for v in json.loads(memo.read_text())]
        except (OSError, ValueError, TypeError):
            pass
    import zlib

    img = _header(path)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt NIfTI label map ({type(e).__name__}); re-export it") from None
    values = np.unique(data)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise DataError(f"{path}: a label map must hold whole class numbers, but it holds {values[:5].tolist()}...; "
                        "give the segmentation, not a probability map")
    out = [int(v) for v in values]
    if memo is not None and _private_dir(memo.parent) is not None:
        try:
            _atomic_write(memo, lambda f: f.write(json.dumps(out)), mode="w")
        except OSError:
            pass
    return out
