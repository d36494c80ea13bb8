"""Task-generic input loading shared by every backend: the model-ready array for a manifest.

Both backends call :func:`load_inputs`; only their tensor pipelines differ (torch DataLoader, ``tf.data``).
The array is channels-first float32 in [0, 1]: (N, C, H, W) for 2D tasks, (N, C, D, H, W) for 3D tasks.
A TensorFlow backend moves the channel axis last itself.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from privaudit.data.manifest import Manifest
from privaudit.tasks import TaskSpec


def load_inputs(manifest: Manifest, task: TaskSpec, size: int, *,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read every row of ``manifest`` for ``task`` at edge length ``size``; return (x, y).

    ``y`` is (N, n_labels) float32 with NaN for unknown labels, writable (for ``torch.from_numpy``).
    2D images come from the manifest's preprocessed cache when it is valid (see :mod:`privaudit.data.cache`);
    ``x`` is then a copy-on-write memory map of the cached array.
    """
    paths = manifest.image_paths()
    if task.spatial_dims == 2:
        from privaudit.data.cache import open_cache
        from privaudit.data.images import load_images

        # A valid `privaudit data cache` array (memory-mapped) when there is one; else decode the files.
        x = open_cache(manifest, size)
        if x is None:
            x = load_images(paths, size, progress=progress)
        elif progress is not None:
            progress(len(paths))
    else:
        from privaudit.data.volumes import load_volumes  # 3D: MONAI preprocessing with a disk cache

        x = load_volumes(paths, size, progress=progress)
    y = manifest.frame[list(manifest.labels)].to_numpy(dtype=np.float32).copy()
    return x, y
