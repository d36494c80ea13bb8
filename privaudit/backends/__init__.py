"""Training backends, behind one registry. Each backend trains, predicts and loads checkpoints.

Backends import their framework lazily: importing this package imports neither torch nor tensorflow.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import pandas as pd

from privaudit.errors import MissingDependencyError, unknown_name


@runtime_checkable
class Backend(Protocol):
    """What every backend provides. ``train`` writes ``model/``, ``train.json`` and ``predictions.csv``."""

    name: str

    def train(self, manifest, config, out: Path, *, console=None, quiet: bool = False) -> dict: ...

    def predict_checkpoint(
        self, checkpoint: Path, manifest, *, task: str, arch: str, image_size: int | None = None,
        trust: bool = False,
    ) -> tuple[pd.DataFrame, dict]: ...


# name -> (module, attribute, the install hint shown when the framework is missing)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "opacus": ("privaudit.backends.opacus_backend", "OpacusBackend", "pip install 'torch>=2.4' opacus"),
    # TF-Privacy 0.9's declared requirements are stale (TF < 2.16, numpy < 2), hence the --no-deps step
    "tf": ("privaudit.backends.tf_backend", "TfBackend",
           "pip install 'privaudit[tf]' && pip install --no-deps tf-keras==2.21.0 tensorflow-privacy==0.9.0"),
}


def register_backend(name: str, module: str, attr: str, install_hint: str = "") -> None:
    _BACKENDS[name] = (module, attr, install_hint)


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def create_backend(name: str) -> Backend:
    try:
        module, attr, hint = _BACKENDS[name]
    except KeyError:
        raise unknown_name("backend", name, _BACKENDS) from None
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise MissingDependencyError(
            f"backend {name!r} needs {e.name!r}, which is not installed; install it with: {hint}"
        ) from None
    return getattr(mod, attr)()
