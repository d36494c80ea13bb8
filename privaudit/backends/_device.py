"""The device a backend trains on, from ``--device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``).

One place for both backends and the distributed set-up; the framework (torch or TensorFlow) is imported only
inside the function that needs it.
"""

from __future__ import annotations

from privaudit.errors import ConfigError

FRAMEWORKS = ("torch", "tf")


def pick_device(name: str = "auto", *, framework: str = "torch"):
    """The device for ``name``: a ``torch.device`` for ``framework="torch"``, a TensorFlow device string
    (``"/GPU:0"``, ``"/CPU:0"``) for ``framework="tf"``. ``auto`` takes the first GPU when there is one."""
    if framework == "torch":
        return _torch_device(name)
    if framework == "tf":
        return _tf_device(name)
    raise ConfigError(f"unknown framework {framework!r}; use one of {', '.join(FRAMEWORKS)}")


def _torch_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but CUDA is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None


def _tf_device(name: str) -> str:
    from privaudit.backends._tf_env import import_tf

    gpus = import_tf().config.list_physical_devices("GPU")
    if name == "auto":
        return "/GPU:0" if gpus else "/CPU:0"
    if name == "cpu":
        return "/CPU:0"
    if name.startswith("cuda"):
        if not gpus:
            raise ConfigError(f"--device {name} was asked for but TensorFlow sees no GPU here; use --device cpu")
        return f"/GPU:{name.partition(':')[2] or 0}"
    raise ConfigError(f"unknown --device {name!r}; use auto, cpu or cuda")
