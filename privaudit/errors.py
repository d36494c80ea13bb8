"""Error types. The CLI turns every :class:`PrivauditError` into one line on stderr and exit code 2.

Messages say what is wrong (naming the file, column or value) and how to fix it, in one line.
"""

from __future__ import annotations


class PrivauditError(Exception):
    """Base class for every error that is the user's input rather than a bug."""


class DataError(PrivauditError):
    """A manifest, image, label or prediction file is missing, unreadable or invalid."""


class ConfigError(PrivauditError):
    """An option or configuration value is out of range or inconsistent."""


class RegistryError(PrivauditError, ValueError):
    """An unknown task, backend, architecture, preset or attack name."""


class DPError(PrivauditError):
    """A model, loader or setting breaks the assumptions behind a DP guarantee."""


class CheckpointError(PrivauditError):
    """A checkpoint that cannot be loaded safely or does not fit the task."""


class OutputExistsError(PrivauditError):
    """The output directory already holds a run."""


class MissingDependencyError(PrivauditError):
    """An optional dependency (a backend's framework) is not installed."""


def unknown_name(kind: str, name: str, valid) -> RegistryError:
    """Build the error for an unknown registry name, listing the valid ones (and a close match)."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return RegistryError(f"unknown {kind} {name!r}; valid {kind}s are: {', '.join(valid)}.{hint}")
