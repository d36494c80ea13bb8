"""What the torch and Keras model zoos share, without importing either framework (so that the Keras zoo does not
need torch)."""

from __future__ import annotations


def gn_groups(channels: int) -> int:
    """GroupNorm groups with at least 4 channels per group and at most 32 groups."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1
