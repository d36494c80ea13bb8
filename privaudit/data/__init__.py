"""Data: the canonical manifest, presets for real layouts, synthetic cohorts and image IO."""

from privaudit.data.manifest import Manifest, load_manifest, validate_manifest

__all__ = ["Manifest", "load_manifest", "validate_manifest"]
