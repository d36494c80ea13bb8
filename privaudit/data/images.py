"""Image IO for radiographs: PNG, JPEG and DICOM, returned as float32 grey-level arrays in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privaudit.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float32)
    except Exception as e:  # pydicom raises many types for corrupt files
        raise DataError(f"{path}: not a readable DICOM image ({type(e).__name__}); re-export or drop it from the manifest") from None
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = arr.max() - arr
    if arr.ndim == 3:  # colour or multi-frame: take the first frame / mean channel
        arr = arr.mean(axis=-1) if arr.shape[-1] in (3, 4) else arr[0]
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(arr, dtype=np.float32)


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """Read one radiograph as a 2D float32 array in [0, 1], resized to ``size`` x ``size`` if given."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        arr = _read_dicom(path)
        img = Image.fromarray(arr, mode="F")
    else:
        try:
            with Image.open(path) as im:
                im.load()
                img = im.convert("F") if im.mode in ("I", "I;16", "F") else im.convert("L").convert("F")
                scale = 65535.0 if im.mode.startswith("I") else 255.0
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found; check the manifest's path column") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(
                f"{path}: not a readable image ({type(e).__name__}); replace the file or drop its row from the manifest"
            ) from None
        img = Image.fromarray(np.asarray(img, dtype=np.float32) / scale, mode="F")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def load_images(paths, size: int, *, progress=None) -> np.ndarray:
    """Read many images into an (N, 1, size, size) float32 array."""
    out = np.empty((len(paths), 1, size, size), dtype=np.float32)
    for i, p in enumerate(paths):
        out[i, 0] = read_image(p, size)
        if progress is not None:
            progress(i + 1)
    return out
