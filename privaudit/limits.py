"""Upper limits on sizes and counts, in one place, and the checks at the door that use them.

Every numeric option that sets how much work or memory a command uses has a ceiling here, far above any
sensible use, so that a typo (``--n-boot 10000000``, ``--image-size 100000``) is refused up front with one
line instead of running for days or exhausting the machine. The limits are module constants: a Python caller
who really needs more can raise one (``privaudit.limits.MAX_N_BOOT = 10**6``) before calling privaudit.

Files are limited the same way before they are decoded: the pixels of an image (:mod:`privaudit.data.images`)
and the voxels and bytes of a NIfTI volume (:mod:`privaudit.data.volumes`) are checked against their
headers, so that a small file that declares a huge canvas is refused before any memory is allocated.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from privaudit.errors import ConfigError

# ---- options ------------------------------------------------------------------------------------------------
MAX_N_BOOT = 100_000            # bootstrap resamples (--n-boot); 10,000 already gives 3-digit CIs
MAX_IMAGE_SIZE = 2048           # edge of a 2D model input in pixels (--image-size)
MAX_VOLUME_SIZE = 256           # edge of a 3D model input in voxels (--image-size of a 3D task): 64 MiB a cube
MAX_N_SAMPLES = 1_000_000       # synthetic cohort size (--n-samples, data synth --n)
MAX_EPOCHS = 10_000             # --epochs
MAX_BATCH_SIZE = 1_000_000      # logical batch size (--batch-size); DP-SGD batches reach tens of thousands
MAX_PHYSICAL_BATCH_SIZE = 65_536  # --physical-batch-size, the batch held in memory at once
MAX_WIDTH = 1024                # channels of the network's first stage (--width)
MAX_CANARIES = 100_000          # --canaries for the one-run empirical epsilon
MAX_GRADIENT_CANARIES = 100_000  # gradient-space canaries, where a backend offers them
MAX_SHADOWS = 1024              # LiRA shadow models (--shadows); the LiRA paper uses 256
MAX_REFERENCES = 1024           # RMIA reference models (--references)
MAX_SEEDS = 1000                # seeds per sweep setting (--seeds)
MAX_SWEEP_POINTS = 100          # epsilon settings of one sweep (--epsilons)
MAX_JOBS = 1024                 # worker processes (--jobs)
MAX_BOOTSTRAP_CELLS = 200_000_000  # n_boot x test samples: the bootstrap's weight matrix (8 bytes a cell)

# ---- files --------------------------------------------------------------------------------------------------
MAX_IMAGE_PIXELS = 64_000_000   # width x height x frames of one image file, read from its header before decoding
MAX_VOLUME_VOXELS = 512 * 512 * 2048  # voxels of one NIfTI volume (a 512 x 512 x 2000 whole-body CT fits)
MAX_VOLUME_BYTES = 2 * 1024 ** 3  # bytes of one decoded NIfTI volume, at its stored data type
MIN_VOXEL_SPACING_MM = 0.01     # a finer voxel spacing in a NIfTI header is not a CT's (and would make the
                                # anti-aliasing kernel of the downsampling absurdly large)

# name -> (limit constant name, what the value counts); the check's message names both
_LIMITS = {
    "n_boot": "MAX_N_BOOT", "image_size": "MAX_IMAGE_SIZE", "volume_size": "MAX_VOLUME_SIZE",
    "n_samples": "MAX_N_SAMPLES", "n": "MAX_N_SAMPLES", "epochs": "MAX_EPOCHS", "batch_size": "MAX_BATCH_SIZE",
    "physical_batch_size": "MAX_PHYSICAL_BATCH_SIZE", "width": "MAX_WIDTH", "canaries": "MAX_CANARIES",
    "gradient_canaries": "MAX_GRADIENT_CANARIES", "shadows": "MAX_SHADOWS", "references": "MAX_REFERENCES",
    "seeds": "MAX_SEEDS", "jobs": "MAX_JOBS", "epsilons": "MAX_SWEEP_POINTS",
}


def _key(name: str) -> str:
    """``--n-boot`` and ``n_boot`` name the same limit."""
    return name.lstrip("-").replace("-", "_")


def limit_of(name: str) -> int:
    """The current limit on the option ``name`` (read at call time, so a raised constant takes effect)."""
    return globals()[_LIMITS[_key(name)]]


def check_limit(name: str, value, limit: int | None = None, *, const: str | None = None) -> None:
    """Refuse ``value`` of the parameter ``name`` above ``limit`` (default: the module's limit for ``name``).

    ``name`` is the parameter as the library spells it (``n_boot``), or the CLI's flag (``--n-boot``), and the
    message uses it as given. ``const`` names
    the constant behind ``limit`` when it is not the default one for ``name``. A value that is not a whole
    number is refused too, since each of these counts something.
    """
    if const is not None and limit is None:
        limit = globals()[const]
    if limit is None:
        limit = limit_of(name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if value > limit:
        const = const or _LIMITS.get(_key(name))
        raise ConfigError(f"{name} {value} is above the limit {limit}; give at most {limit}"
                          + (f" (from Python, privaudit.limits.{const} raises it)" if const else ""))


def check_out_parent(out: Path, *, option: str = "--out") -> None:
    """Refuse an output path whose parent cannot be a folder: a regular file (or a link to one) sits where
    one of its parent folders should be. One line naming the file in the way, before anything is written."""
    out = Path(out)
    for parent in list(out.absolute().parents)[::-1]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{option} {out}: {parent} is a file, not a folder; choose an output path whose "
                              "parent folders are folders")
        if not parent.exists():
            return
