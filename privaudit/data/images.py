"""Image IO for radiographs: PNG, JPEG, TIFF, BMP and DICOM, returned as float32 grey-level arrays in [0, 1].

Images come from outside, so reading one is guarded:

* Only the formats meant to be read are opened. PIL picks its decoder from a file's content, not its name, so
  it is told which ones it may use (:data:`PIL_FORMATS`): a ``.png`` that holds PostScript, or any other
  format, is refused rather than handed to a plugin (PIL's EPS plugin runs Ghostscript). DICOM files
  (``.dcm``, ``.dicom``) are read with pydicom only.
* The size an image declares in its header is checked against :data:`privaudit.limits.MAX_IMAGE_PIXELS`
  before any pixel is decoded, so a small file that declares a huge canvas (a decompression bomb) is refused
  before it can take the memory; PIL's own decompression-bomb warning and error are turned into the same
  :class:`~privaudit.errors.DataError`. The check comes before decoding in every worker process of
  ``privaudit data cache --jobs N`` too, so N workers cannot multiply such an image's memory.
* A multi-frame DICOM (or a multi-page TIFF) gives its first frame; a colour image gives the mean of its
  channels (DICOM) or PIL's grey conversion (the other formats).

Every unreadable, unsupported or oversized file raises one :class:`~privaudit.errors.DataError` line that
names it.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np

from privaudit import limits
from privaudit.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")
# The PIL plugins an image may be decoded by; any other content is refused whatever the file is called.
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
_DEFLATED = "1.2.840.10008.1.2.1.99"   # DICOM's Deflated Explicit VR Little Endian transfer syntax
_READ_HINT = "replace the file or drop its row from the manifest"


def _too_large(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}, above the limit of {limits.MAX_IMAGE_PIXELS:,} pixels "
                     "(privaudit.limits.MAX_IMAGE_PIXELS); a decompression bomb or not a radiograph: "
                     f"{_READ_HINT}")


def check_pixels(path: Path, width: int, height: int, frames: int = 1) -> None:
    """Refuse an image whose header declares more than MAX_IMAGE_PIXELS pixels (per frame decoded)."""
    width, height, frames = int(width), int(height), max(1, int(frames))
    if width < 1 or height < 1:
        raise DataError(f"{path}: the header declares an empty {width} x {height} image; {_READ_HINT}")
    if width * height * frames > limits.MAX_IMAGE_PIXELS:
        shape = f"{width} x {height}" + (f" x {frames} frames" if frames > 1 else "")
        raise _too_large(path, f"the header declares {shape} = {width * height * frames:,} pixels")


# ---- DICOM --------------------------------------------------------------------------------------------------
def _check_deflated(path: Path, meta) -> None:
    """A deflated DICOM is inflated whole when read: inflate it here first, in bounded steps, and refuse it
    when it inflates past the bytes the pixel limit allows (a zip bomb that calls itself a DICOM)."""
    budget = 8 * limits.MAX_IMAGE_PIXELS + (1 << 20)   # up to 8 bytes a pixel (RGB at 16 bits), plus the header
    start = 128 + 4 + 12 + int(meta.get("FileMetaInformationGroupLength", 0) or 0)  # preamble, DICM, group length
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as f:
        f.seek(start)
        while (chunk := f.read(1 << 16)) and not inflate.eof:
            while chunk and not inflate.eof:   # bytes after the end of the stream (padding) are not inflated
                total += len(inflate.decompress(chunk, 1 << 20))
                if total > budget:
                    raise _too_large(path, f"the deflated DICOM inflates to more than {budget:,} bytes")
                chunk = inflate.unconsumed_tail


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        meta = pydicom.filereader.read_file_meta_info(str(path))
        if str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
            _check_deflated(path, meta)
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check the manifest's path column") from None
    except DataError:
        raise
    except Exception as e:  # pydicom raises many types for corrupt files
        raise DataError(f"{path}: not a readable DICOM file ({type(e).__name__}); {_READ_HINT}") from None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{path}: a DICOM file without a valid image size (Rows, Columns); is it an image? "
                        f"{_READ_HINT}") from None
    check_pixels(path, cols, rows)   # one frame is decoded, whatever the number of frames
    if samples not in (1, 3) or frames < 1:
        raise DataError(f"{path}: a DICOM image with {samples} samples per pixel and {frames} frames; "
                        f"privaudit reads grey or RGB images: {_READ_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # pydicom's notes on non-conformant but readable files
            if str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
                arr = pixel_array(pydicom.dcmread(str(path)), index=0)
            else:
                arr = pixel_array(str(path), index=0)   # reads and decodes the first frame only
            if getattr(ds, "PhotometricInterpretation", "") == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
        arr = np.asarray(arr, dtype=np.float32)
    except Exception as e:
        raise DataError(f"{path}: a DICOM file whose pixels cannot be decoded ({type(e).__name__}); "
                        f"{_READ_HINT}") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):   # colour: the mean of the channels
        arr = arr.mean(axis=-1)
    if arr.ndim != 2:
        raise DataError(f"{path}: a DICOM frame of shape {'x'.join(map(str, arr.shape))}, not a 2D image; "
                        f"{_READ_HINT}")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = arr.max() - arr
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{path}: a DICOM image with non-finite values; {_READ_HINT}")
    return ((arr - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(arr, dtype=np.float32)


# ---- PNG, JPEG, TIFF, BMP ------------------------------------------------------------------------------------
def _read_pil(path: Path):
    """The image as PIL mode "F" with values in [0, 1]; checked against the pixel limit before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PIL_FORMATS) as im:
                check_pixels(path, *im.size)   # from the header; nothing is decoded yet
                im.load()
                wide = im.mode in ("I", "F") or im.mode.startswith("I;16")   # any byte order of 16 bits
                img = im.convert("F") if wide else im.convert("L").convert("F")
                scale = 65535.0 if im.mode.startswith("I") else 255.0
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found; check the manifest's path column") from None
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large(path, f"PIL refuses it as a decompression bomb ({str(e).split('.')[0]})") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image: not a {', '.join(PIL_FORMATS[:-1])} or {PIL_FORMATS[-1]} "
                        f"file (DICOM files need a .dcm name); convert it, or {_READ_HINT}") from None
    except MemoryError:
        raise _too_large(path, "decoding it ran out of memory") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for corrupt files
        raise DataError(f"{path}: not a readable image ({type(e).__name__}); {_READ_HINT}") from None
    return Image.fromarray(np.asarray(img, dtype=np.float32) / scale, mode="F")


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """Read one radiograph as a 2D float32 array in [0, 1], resized to ``size`` x ``size`` if given."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        img = Image.fromarray(_read_dicom(path), mode="F")
    else:
        img = _read_pil(path)
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
