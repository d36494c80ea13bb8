"""Canaries for one-run privacy auditing (Steinke, Nasr & Jagielski 2023), in the run's privacy unit.

A canary image is out-of-distribution (smoothed random texture, unlike any radiograph or CT) with deliberately
random labels, so the only way a model can fit it is by memorising it. For a 3D task (CT) a canary is a volume
of the task's shape: smoothed 3D random texture, with random labels too.

The canary *unit* follows the run's privacy unit (``privaudit.backends._plan``):

* **image**: each canary is one image, included independently with probability 1/2 (as before units existed);
* **patient**: each canary is a canary *patient* with 1 to k images (k = ``MAX_IMAGES_PER_PATIENT``, or less
  when the run caps a patient's images), its number of images drawn uniformly from the seeded generator; every
  image is a texture of its own with labels of its own. The patient joins the training set with probability
  1/2 as a unit: all its images or none. In training it is a patient like any other (the patient sampler draws
  its images together).

After training the audit scores each canary unit by its loss (lower = guessed "in"); a canary patient's loss is
the mean of its images' losses (``privaudit.audit.empirical.unit_losses``), so the number of images, drawn
independently of inclusion, does not move the score. The inclusion mask is kept beside the run
(``canaries.csv``) so the audit can count how well "low loss" predicts "was included".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

CANARY_KIND = "smoothed random-texture images with random labels (out-of-distribution, mislabelled)"
CANARY_KIND_3D = "smoothed 3D random-texture volumes with random labels (out-of-distribution, mislabelled)"
MAX_IMAGES_PER_PATIENT = 4   # a canary patient has 1 to this many images (uniform), fewer when the run caps them
AGGREGATION = "mean"         # a canary patient's loss: the mean of its images' losses


@dataclass(frozen=True, eq=False)
class Canaries:
    """The canaries of one run. ``images`` ``(n_images, 1, *spatial)`` in [0, 1] and ``labels``
    ``(n_images, n_labels)`` hold every canary image; ``owner[i]`` is image i's canary unit (0 .. m-1, in
    order, a unit's images adjacent) and ``unit_included[u]`` whether unit u is trained on.

    It unpacks as the triple ``(images, labels, included)`` the backends read, ``included`` being per image
    (an image is trained on exactly when its unit is), so ``images[included]`` are the rows training adds."""

    images: np.ndarray
    labels: np.ndarray
    owner: np.ndarray
    unit_included: np.ndarray
    unit: str = "image"          # "image" or "patient"
    spatial_dims: int = 2

    @property
    def m(self) -> int:
        """Canary units: images, or canary patients."""
        return len(self.unit_included)

    @property
    def included(self) -> np.ndarray:
        """Per image: is it trained on (its unit is included)."""
        return self.unit_included[self.owner]

    @property
    def n_images(self) -> np.ndarray:
        """Images per canary unit."""
        return np.bincount(self.owner, minlength=self.m)

    @property
    def kind(self) -> str:
        return CANARY_KIND_3D if self.spatial_dims == 3 else CANARY_KIND

    def __iter__(self):
        return iter((self.images, self.labels, self.included))


def _textures(rng: np.random.Generator, n: int, size: int, spatial_dims: int) -> np.ndarray:
    """``n`` smoothed random textures ``(n, 1, *[size] * spatial_dims)``, each stretched to [0, 1]. Drawn one
    at a time (the generator's stream is the same as one draw of all; the peak memory is one float64 image)."""
    out = np.empty((n, 1) + (size,) * spatial_dims, dtype=np.float32)
    for i in range(n):
        img = gaussian_filter(rng.random((size,) * spatial_dims), sigma=1.0)
        lo, hi = img.min(), img.max()
        out[i, 0] = (img - lo) / max(hi - lo, 1e-9)
    return out


def make_canaries(m: int, *, size: int, n_labels: int, seed: int, spatial_dims: int = 2, unit: str = "image",
                  max_images: int = MAX_IMAGES_PER_PATIENT) -> Canaries:
    """``m`` canary units from one seeded generator (``numpy.random.default_rng(seed)``).

    ``unit`` "image": m images, drawn as before units existed (textures, then labels, then inclusion), so an
    image-level run's canaries are unchanged. ``unit`` "patient": first each patient's number of images, uniform
    on 1 .. ``max_images``, then the textures and labels of all their images (in patient order), then each
    patient's inclusion (probability 1/2)."""
    if unit not in ("image", "patient"):
        raise ValueError(f"unit must be 'image' or 'patient', got {unit!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_images + 1, m) if unit == "patient" else np.ones(m, dtype=np.int64)
    n = int(counts.sum())
    images = _textures(rng, n, size, spatial_dims)
    labels = rng.integers(0, 2, (n, n_labels)).astype(np.float32)
    unit_included = rng.random(m) < 0.5
    owner = np.repeat(np.arange(m), counts).astype(np.int64)
    return Canaries(images, labels, owner, unit_included, unit, spatial_dims)


def canary_table(canaries: Canaries, losses: np.ndarray) -> pd.DataFrame:
    """What the run directory keeps (``canaries.csv``): one row per canary unit (image or canary patient) with
    its inclusion, its loss (a patient's: the mean over its images) and its number of images."""
    from privaudit.audit.empirical import unit_losses

    losses = np.asarray(losses, dtype=float)
    if losses.shape != canaries.owner.shape:
        raise ValueError(f"need one loss per canary image ({len(canaries.owner)}), got shape {losses.shape}")
    prefix = "cpatient" if canaries.unit == "patient" else "canary"
    return pd.DataFrame({"canary_id": [f"{prefix}{i:05d}" for i in range(canaries.m)],
                         "included": canaries.unit_included.astype(int),
                         "loss": unit_losses(losses, canaries.owner, canaries.m),
                         "n_images": canaries.n_images, "unit": canaries.unit})
