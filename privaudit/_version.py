"""The package version, in a module of its own so that any part of privaudit can read it without importing
the package (and so the public API) first."""

__version__ = "0.1.0"
