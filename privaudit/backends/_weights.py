"""Reading weights safely: ``.safetensors`` (tensors only) or a state_dict through
``torch.load(weights_only=True)``, never arbitrary pickled code. Shared by the opacus backend and the model zoo."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from privaudit.errors import CheckpointError, MissingDependencyError

_INSTALL_HINT = 'pip install "privaudit[models]"'


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load weights with ``torch.load(weights_only=True)``: tensors only, never arbitrary pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":   # tensors only by design
        return load_weights(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: the checkpoint holds pickled Python objects besides tensors (possibly code), and privaudit "
            "never unpickles those; save a plain state_dict with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}); "
                              "save one with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors); got {type(obj).__name__}")
    # Weights saved from DDP or an Opacus GradSampleModule carry a wrapper prefix.
    out = {}
    for k, v in obj.items():
        for prefix in ("_module.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_weights(path) -> dict:
    """Tensors from ``.safetensors`` (safetensors) or a state_dict (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MissingDependencyError(f"{path}: reading .safetensors needs safetensors; install it with "
                                         f"{_INSTALL_HINT}") from None
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return {_strip_prefix(k): v for k, v in state.items()}
    return load_state_dict(path)


def _strip_prefix(k: str) -> str:
    for prefix in ("_module.", "module."):
        if k.startswith(prefix):
            k = k[len(prefix):]
    return k
