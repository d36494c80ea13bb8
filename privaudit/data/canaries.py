"""Canaries for one-run privacy auditing (Steinke, Nasr & Jagielski 2023).

A canary is an out-of-distribution image (smoothed random texture, unlike any radiograph) with deliberately
random labels, so the only way a model can fit it is by memorising it. Each canary joins the training set
independently with probability 1/2; after training, the audit ranks canaries by the model's loss and counts how
well "low loss" predicts "was included". The inclusion mask is kept beside the run so the audit can do that.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

CANARY_KIND = "smoothed random-texture images with random labels (out-of-distribution, mislabelled)"


def make_canaries(m: int, *, size: int, n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``m`` canary images ``(m, 1, size, size)`` in [0, 1], their random 0/1 labels ``(m, n_labels)`` and the
    inclusion mask (each canary in training independently with probability 1/2), all from one seeded generator."""
    rng = np.random.default_rng(seed)
    noise = rng.random((m, size, size))
    images = np.stack([gaussian_filter(img, sigma=1.0) for img in noise])
    lo = images.min(axis=(1, 2), keepdims=True)
    hi = images.max(axis=(1, 2), keepdims=True)
    images = ((images - lo) / np.maximum(hi - lo, 1e-9)).astype(np.float32)[:, None]
    labels = rng.integers(0, 2, (m, n_labels)).astype(np.float32)
    included = rng.random(m) < 0.5
    return images, labels, included


def canary_table(included: np.ndarray, losses: np.ndarray) -> pd.DataFrame:
    """What the run directory keeps (``canaries.csv``): one row per canary, its inclusion and its loss."""
    return pd.DataFrame({"canary_id": [f"canary{i:05d}" for i in range(len(included))],
                         "included": included.astype(int), "loss": losses.astype(float)})
