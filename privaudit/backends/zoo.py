"""Architectures of the field by name: ``torchvision:densenet121``, ``timm:resnet18``, ``monai:DenseNet121``.

A zoo name is ``<library>:<model>``. :func:`create_zoo_model` builds the library's network with random weights
(nothing is downloaded), its input channels and output size adapted to the task. :func:`build_zoo_model` adds
what training needs:

- ``init`` weights (``.safetensors``, or a state_dict read with ``torch.load(weights_only=True)``) are loaded
  into the architecture *as the library defines it*, so that their keys match; a 3-channel (RGB) stem then
  becomes a 1-channel stem by summing its kernels over R, G and B, which gives on a grey image exactly what the
  RGB stem gave on that image repeated on three channels;
- for DP training only, :func:`make_dp_compatible`: in-place activations off (Opacus' per-sample hooks fail on
  them), BatchNorm replaced by GroupNorm with Opacus' ``ModuleValidator.fix`` (BatchNorm mixes the samples of a
  batch, so per-sample clipping would no longer bound a sample's influence), and Opacus'
  ``ModuleValidator.validate`` must then pass.

Every change to the library's network is recorded (``ZooModel.changes``, written to ``train.json``) and
announced with a :class:`ModelChangedWarning`: the model trained is not the library's model any more.
privaudit's own ``resnet9-bn`` is not a zoo model and stays refused for DP.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from privaudit.errors import CheckpointError, ConfigError, DPError, MissingDependencyError, RegistryError

INSTALL_HINT = 'pip install "privaudit[models]"'

from privaudit.backends._weights import load_weights  # noqa: E402  (re-exported: zoo.load_weights)
# library -> the Python package that provides it
ZOO_LIBRARIES = {"torchvision": "torchvision", "timm": "timm", "monai": "monai"}


class ModelChangedWarning(UserWarning):
    """A zoo network was changed to fit the task or DP (its stem, its norms, its in-place activations)."""


def is_zoo_name(arch) -> bool:
    """True for ``<library>:<model>`` names (privaudit's own architectures have no colon)."""
    return isinstance(arch, str) and ":" in arch


def parse_zoo_name(arch: str) -> tuple[str, str]:
    lib, _, name = arch.partition(":")
    if lib not in ZOO_LIBRARIES:
        close = difflib.get_close_matches(lib, list(ZOO_LIBRARIES), n=1)
        hint = f" Did you mean '{close[0]}:{name}'?" if close else ""
        raise RegistryError(f"unknown model library {lib!r} in architecture {arch!r}; zoo names are "
                            f"torchvision:<model>, timm:<model> or monai:<model>.{hint}")
    if not name:
        raise RegistryError(f"architecture {arch!r} names no model; e.g. {lib}:{_EXAMPLES[lib]}")
    return lib, name


_EXAMPLES = {"torchvision": "densenet121", "timm": "resnet18", "monai": "DenseNet121"}

# torchvision's CUDA wheels beside a CPU torch cannot load torchvision's C++ operators (nms, roi_align, ...).
# Its model definitions are plain Python, but torchvision's import registers shapes for two operators without
# checking that they exist and fails. Declaring their schemas (no kernels: calling them still fails) lets the
# import finish; kept here so that the declaration lives as long as the process.
_TORCHVISION_SHIM = None


def _import_torchvision():
    global _TORCHVISION_SHIM
    try:
        import torchvision
        return torchvision
    except ImportError:
        raise MissingDependencyError(f"torchvision: architectures need torchvision; install it with "
                                     f"{INSTALL_HINT}") from None
    except RuntimeError as e:
        if "torchvision::" not in str(e) or _TORCHVISION_SHIM is not None:
            raise
    import torch

    _TORCHVISION_SHIM = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            _TORCHVISION_SHIM.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:   # declared already (by the extension, or by an earlier attempt)
            pass
    import torchvision
    return torchvision


def _import(lib: str):
    if lib == "torchvision":
        return _import_torchvision()
    if lib == "timm":
        _import_torchvision()   # timm imports torchvision's transforms
        try:
            import timm
        except ImportError:
            raise MissingDependencyError(f"timm: architectures need timm; install it with {INSTALL_HINT}") from None
        return timm
    import monai.networks.nets

    return monai.networks.nets


# MONAI's classification networks: name -> builder(nets, spatial_dims, in_channels, num_classes)
def _monai_builders() -> dict:
    out = {}
    for n in ("DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264"):
        out[n] = lambda nets, d, c, k, n=n: getattr(nets, n)(spatial_dims=d, in_channels=c, out_channels=k,
                                                            pretrained=False)
    for n in ("SEResNet50", "SEResNet101", "SEResNet152", "SEResNext50", "SEResNext101", "SENet154"):
        out[n] = lambda nets, d, c, k, n=n: getattr(nets, n)(spatial_dims=d, in_channels=c, num_classes=k,
                                                            pretrained=False)
    for n in ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"):
        out[n] = lambda nets, d, c, k, n=n: getattr(nets, n)(spatial_dims=d, n_input_channels=c, num_classes=k,
                                                            pretrained=False)
    for b in range(8):
        out[f"efficientnet-b{b}"] = lambda nets, d, c, k, b=b: nets.EfficientNetBN(
            f"efficientnet-b{b}", pretrained=False, spatial_dims=d, in_channels=c, num_classes=k)
    return out


_MONAI = _monai_builders()


def zoo_names(lib: str) -> list[str]:
    """The model names a library offers to privaudit (classification networks)."""
    mod = _import(lib)
    if lib == "torchvision":
        return sorted(mod.models.list_models(module=mod.models))
    if lib == "timm":
        return sorted(mod.list_models())
    return sorted(_MONAI)


def _unknown(lib: str, name: str, valid: list[str]) -> RegistryError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if not close:
        low = {v.lower(): v for v in valid}
        close = [low[c] for c in difflib.get_close_matches(name.lower(), list(low), n=3, cutoff=0.5)]
    hint = f"did you mean {', '.join(f'{lib}:{c}' for c in close)}?" if close else \
        f"e.g. {lib}:{_EXAMPLES[lib]} ({len(valid)} names)"
    return RegistryError(f"unknown {lib} architecture {name!r}; {hint}")


def _spatial_dims_ok(lib: str, arch: str, spatial_dims: int) -> None:
    if lib in ("torchvision", "timm") and spatial_dims != 2:
        raise ConfigError(f"architecture {arch!r} is 2D but the task's inputs are {spatial_dims}D; use a monai: "
                          "network (e.g. monai:DenseNet121) or cnn3d-gn for volumes")


def check_zoo_name(arch: str, *, spatial_dims: int | None = None) -> None:
    """Fail early (before any data is read) on an unknown zoo name or a 2D library for a 3D task."""
    lib, name = parse_zoo_name(arch)
    if spatial_dims is not None:
        _spatial_dims_ok(lib, arch, spatial_dims)
    if lib == "monai":
        if name not in _MONAI:
            raise _unknown(lib, name, sorted(_MONAI))
        return
    mod = _import(lib)
    known = mod.is_model(name) if lib == "timm" else name in zoo_names(lib)
    if not known:
        raise _unknown(lib, name, zoo_names(lib))


def create_zoo_model(arch: str, *, in_channels: int, num_classes: int, spatial_dims: int):
    """Build ``arch`` with random weights (nothing downloaded): ``in_channels`` inputs, ``num_classes`` outputs."""
    lib, name = parse_zoo_name(arch)
    _spatial_dims_ok(lib, arch, spatial_dims)
    mod = _import(lib)
    if lib == "torchvision":
        valid = zoo_names(lib)
        if name not in valid:
            raise _unknown(lib, name, valid)
        model = mod.models.get_model(name, weights=None, num_classes=num_classes)
        if in_channels != 3:
            stem = find_stem(model, 3)
            _set_stem_channels(model, stem, in_channels)
        return model
    if lib == "timm":
        if not mod.is_model(name):
            raise _unknown(lib, name, zoo_names(lib))
        return mod.create_model(name, pretrained=False, in_chans=in_channels, num_classes=num_classes)
    if name not in _MONAI:
        raise _unknown(lib, name, sorted(_MONAI))
    return _MONAI[name](mod, spatial_dims, in_channels, num_classes)


# ---------------------------------------------------------------------------------------------- stem and head

def _convs():
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def find_stem(model, in_channels: int) -> str:
    """Name of the first convolution (in definition order) that reads ``in_channels`` channels: the stem."""
    for name, m in model.named_modules():
        if isinstance(m, _convs()) and m.in_channels == in_channels:
            return name
    raise ConfigError(f"{type(model).__name__}: no convolution reads {in_channels} channels, so its input "
                      "channels cannot be adapted")


def find_head(model, num_classes: int) -> str | None:
    """Name of the last Linear (or 1x1 conv) layer with ``num_classes`` outputs: the classifier."""
    from torch import nn

    found = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or \
                (isinstance(m, _convs()) and m.out_channels == num_classes):
            found = name
    return found


def _set_stem_channels(model, stem: str, channels: int) -> None:
    """Replace the stem by a convolution with ``channels`` inputs, keeping everything else about it. Its new
    kernels are the old ones' first ``channels`` channels (the library's own random initialisation)."""
    import torch

    old = model.get_submodule(stem)
    new = type(old)(channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                    padding_mode=old.padding_mode)
    with torch.no_grad():
        reps = -(-channels // old.in_channels)
        new.weight.copy_(old.weight.repeat(1, reps, *([1] * (old.weight.ndim - 2)))[:, :channels])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    _set_module(model, stem, new)


def _set_module(model, name: str, new) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def collapse_rgb_stem(model, stem: str) -> None:
    """Turn a 3-channel stem into a 1-channel one by summing its kernels over R, G and B: on a grey image it
    then gives exactly what the RGB stem gave on the grey image repeated three times."""
    import torch

    old = model.get_submodule(stem)
    summed = old.weight.detach().sum(dim=1, keepdim=True)
    _set_stem_channels(model, stem, 1)
    with torch.no_grad():
        model.get_submodule(stem).weight.copy_(summed)


# -------------------------------------------------------------------------------------------------- weights

def _few(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_into(model, state: dict, path, arch: str, *, new_head: str | None = None) -> list[str]:
    """Load ``state`` strictly into ``model``; one line naming a few missing / unexpected / misshapen keys.

    ``new_head``: the classifier's name, whose weights may differ in shape (e.g. ImageNet's 1,000 classes when
    the task has 5 labels); it then keeps its random weights. Returns the keys left at their random values.
    """
    own = model.state_dict()
    # BatchNorm's step counter is absent from old checkpoints; torch itself accepts that
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        raise CheckpointError(f"{path}: the weights do not fit {arch}: {'; '.join(parts)}; check --arch, or save "
                              "the model's own state_dict")
    kept = []
    for k, v in own.items():
        if k not in state:
            kept.append(k)
        elif tuple(state[k].shape) != tuple(v.shape):
            if new_head is not None and k.startswith(new_head + "."):
                kept.append(k)
                continue
            raise CheckpointError(f"{path}: {k!r} has shape {list(state[k].shape)} in the weights but "
                                  f"{list(v.shape)} in {arch}; check --arch and the task's labels")
    model.load_state_dict({k: (own[k] if k in kept else state[k]) for k in own}, strict=True)
    return [k for k in kept if not k.endswith(".num_batches_tracked")]


# ------------------------------------------------------------------------------------------------------- DP

def _describe(m) -> str:
    return repr(m).split("\n")[0]


def make_dp_compatible(model) -> tuple[object, list[dict]]:
    """Opacus' fixes for a zoo network, each recorded as ``{"kind", "module", "from", "to"}``.

    In-place activations are turned off, BatchNorm becomes GroupNorm (Opacus' ``ModuleValidator.fix``; the
    BatchNorm's learned scale and shift are carried over, its running statistics dropped), and
    ``ModuleValidator.validate`` must then pass, else :class:`DPError`.
    """
    import torch
    from opacus.validators import ModuleValidator
    from torch import nn

    changes = []
    for name, m in model.named_modules():
        if getattr(m, "inplace", False) is True:
            before = _describe(m)
            m.inplace = False
            changes.append({"kind": "inplace", "module": name, "from": before, "to": _describe(m)})
    _dense_net_relu(model, changes)
    _norm_act_to_groupnorm(model, changes)
    before = {n: m for n, m in model.named_modules()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fixed = ModuleValidator.fix(model)
    except Exception as e:
        raise DPError(f"Opacus' ModuleValidator.fix cannot make this model DP-compatible "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    after = dict(fixed.named_modules())
    for name, old in before.items():
        new = after.get(name)
        if new is None or type(new) is type(old):
            continue
        if isinstance(old, nn.modules.batchnorm._BatchNorm) and isinstance(new, nn.GroupNorm) and old.affine:
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
        kind = "batchnorm" if isinstance(old, nn.modules.batchnorm._BatchNorm) else "opacus_fix"
        changes.append({"kind": kind, "module": name, "from": _describe(old), "to": _describe(new)})
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise DPError(f"the model is still not DP-compatible after Opacus' fixes: {str(errors[0]).splitlines()[0]}")
    return fixed, changes


def _dense_net_relu(model, changes: list) -> None:
    """torchvision's DenseNet applies ``F.relu(..., inplace=True)`` in ``forward`` to the output of its last norm
    layer, which per-sample hooks on that layer cannot allow. A :class:`Copy` appended to ``features`` gives
    the in-place ReLU a copy to work on: same function, same gradient."""
    if type(model).__module__ != "torchvision.models.densenet" or not hasattr(model, "features"):
        return
    child = "copy_for_relu"
    model.features.add_module(child, Copy())
    changes.append({"kind": "inplace", "module": f"features.{child}",
                    "from": "F.relu(inplace=True) on the last norm's output",
                    "to": "Copy() appended to features, so the in-place ReLU acts on a copy (same function)"})


class Copy(nn.Module):
    """The identity, as a new tensor (so that in-place operations after it leave its input alone)."""

    def forward(self, x):
        return x.clone()


def _norm_act_to_groupnorm(model, changes: list) -> None:
    """BatchNorm subclasses Opacus' fixers do not know. timm's ``BatchNormAct2d`` (BatchNorm, then its ``drop``
    and ``act`` children) becomes ``Sequential(GroupNorm, drop, act)`` with the same groups Opacus uses."""
    import torch
    from opacus.validators import ModuleValidator

    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m) in ModuleValidator.FIXERS:
            continue
        if not (hasattr(m, "act") and hasattr(m, "drop")):
            raise DPError(f"layer {name!r} ({type(m).__name__}) is a BatchNorm that Opacus' ModuleValidator.fix "
                          "cannot replace, so the model cannot be trained with DP; pick an architecture with plain "
                          "BatchNorm layers (e.g. timm:resnet18)")
        gn = nn.GroupNorm(min(32, m.num_features), m.num_features, eps=m.eps, affine=m.affine)
        if m.affine:
            with torch.no_grad():
                gn.weight.copy_(m.weight)
                gn.bias.copy_(m.bias)
        new = nn.Sequential(gn, m.drop, m.act)
        _set_module(model, name, new)
        changes.append({"kind": "batchnorm", "module": name, "from": _describe(m),
                        "to": f"Sequential(GroupNorm({gn.num_groups}, {gn.num_channels}), "
                              f"{type(m.drop).__name__}, {type(m.act).__name__})"})


def zoo_clipping(model, requested: str) -> str:
    """The per-sample gradient engine for a zoo network under DP. Library networks modify layer outputs in place
    in their ``forward`` code (ResNet's ``out += identity``), which Opacus' hooks mode cannot take; the fast
    engine can. So the default, ``hooks``, gives way to ``fast`` wherever the fast engine's layers cover the
    network (the same clipping, noise and accounting; train.json records the engine used). Other requests
    stand, and ``fast`` falls back to hooks itself, as for any model."""
    if requested != "hooks":
        return requested
    from privaudit.backends.fastdp import unsupported_layers

    return "fast" if not unsupported_layers(model) else "hooks"


def _state_is_dp_fixed(model, state: dict) -> bool:
    """Weights of this architecture after :func:`make_dp_compatible` (GroupNorm: no running statistics)."""
    from torch import nn

    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return bool(bns) and not any(f"{n}.running_mean" in state for n in bns) and all(
        f"{n}.weight" in state for n in bns if model.get_submodule(n).affine)


# ------------------------------------------------------------------------------------------------ the builder

@dataclass
class ZooModel:
    """A zoo network ready for training or prediction, with what was done to it."""

    model: object                              # the torch nn.Module
    architecture: str                          # "<library>:<model>"
    in_channels: int
    num_classes: int
    changes: list = field(default_factory=list)    # [{"kind", "module", "from", "to"}]: every change made
    init: dict | None = None                   # {"path", "sha256", "format", "new_head"} when weights were loaded
    dp_compatible: bool = False                # make_dp_compatible was applied

    def record(self) -> dict:
        """The ``model_changes`` block of ``train.json``."""
        lib, _ = parse_zoo_name(self.architecture)
        return {"architecture": self.architecture, "library": lib, "library_version": _version(lib),
                "in_channels": self.in_channels, "num_classes": self.num_classes,
                "dp_compatible": self.dp_compatible, "changes": list(self.changes)}

    def warning(self) -> str | None:
        if not self.changes:
            return None
        counts: dict[str, int] = {}
        for c in self.changes:
            counts[c["kind"]] = counts.get(c["kind"], 0) + 1
        what = ", ".join(_KINDS[k].format(n=n) for k, n in counts.items())
        return (f"{self.architecture} was changed: {what}; the model trained is not the library's model as "
                "published (every change is listed under model_changes in train.json)")


# change kind -> how the warning counts it
_KINDS = {"batchnorm": "{n} BatchNorm layer(s) replaced by GroupNorm for DP",
          "inplace": "{n} in-place activation(s) turned off for DP",
          "opacus_fix": "{n} other layer(s) replaced by Opacus' ModuleValidator.fix",
          "stem": "the RGB stem summed to 1 channel",
          "head": "the classifier re-initialised for the task's labels"}


def _version(lib: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(ZOO_LIBRARIES[lib])
    except PackageNotFoundError:
        return None


def build_zoo_model(arch: str, *, in_channels: int, num_classes: int, spatial_dims: int, init=None,
                    dp: bool = False, warn: bool = True) -> ZooModel:
    """The zoo network for training: weights from ``init`` loaded into the library's own layout (before any
    BatchNorm replacement), an RGB stem summed to grey when the task has 1 channel, a classifier of another
    size (ImageNet's) started afresh, then, with ``dp``, :func:`make_dp_compatible`."""
    from privaudit.backends._plan import sha256

    model = create_zoo_model(arch, in_channels=in_channels, num_classes=num_classes, spatial_dims=spatial_dims)
    zm = ZooModel(model, arch, in_channels, num_classes)
    if init is not None:
        path = Path(init)
        state = load_weights(path)
        zm.init = {"path": str(path), "sha256": sha256(path),
                   "format": "safetensors" if path.suffix == ".safetensors" else "torch state_dict"}
        _load_init(zm, state, path, new_head=find_head(model, num_classes))
    if dp and not zm.dp_compatible:
        zm.model, changes = make_dp_compatible(zm.model)
        zm.changes += changes
        zm.dp_compatible = True
    if warn and zm.warning():
        warnings.warn(zm.warning(), ModelChangedWarning, stacklevel=2)
    return zm


def _load_init(zm: ZooModel, state: dict, path: Path, *, new_head: str | None) -> None:
    model = zm.model
    if _state_is_dp_fixed(model, state):   # weights of a DP-trained zoo model: make the layout match first
        zm.model, changes = make_dp_compatible(model)
        zm.changes += changes
        zm.dp_compatible = True
        model = zm.model
    stem = find_stem(model, zm.in_channels)
    w = state.get(stem + ".weight")
    if w is not None and w.ndim >= 3 and int(w.shape[1]) != zm.in_channels:
        if int(w.shape[1]) == 3 and zm.in_channels == 1:
            _set_stem_channels(model, stem, 3)
            kept = load_into(model, state, path, zm.architecture, new_head=new_head)
            before = _describe(model.get_submodule(stem))
            collapse_rgb_stem(model, stem)
            zm.changes.append({"kind": "stem", "module": stem, "from": before,
                               "to": _describe(model.get_submodule(stem)) + ": the RGB kernels summed over R, G "
                                     "and B (a grey image gives what the grey image repeated on R, G and B gave)"})
        else:
            raise CheckpointError(f"{path}: the stem {stem!r} reads {int(w.shape[1])} channels in the weights but "
                                  f"the task's images have {zm.in_channels}; only 3-channel (RGB) weights can be "
                                  "adapted to 1-channel images")
    else:
        kept = load_into(model, state, path, zm.architecture, new_head=new_head)
    if kept:
        head = new_head
        n_w = int(state[f"{head}.weight"].shape[0])
        zm.changes.append({"kind": "head", "module": head, "from": f"{n_w} outputs in the weights",
                           "to": f"{zm.num_classes} outputs (the task's labels), random weights"})
    zm.init["new_head"] = bool(kept)   # the classifier starts from random weights


def zoo_model_for_weights(arch: str, state: dict, path, *, spatial_dims: int, default_channels: int = 1,
                          default_classes: int | None = None) -> ZooModel:
    """The zoo network that ``state`` (weights trained elsewhere, or by privaudit) fits exactly: its input
    channels and output count are read from the weights' stem and classifier. For predictions: nothing is
    replaced except what the weights themselves show (GroupNorm weights of a DP-trained zoo model)."""
    probe = create_zoo_model(arch, in_channels=default_channels, num_classes=default_classes or 7,
                             spatial_dims=spatial_dims)
    stem = find_stem(probe, default_channels)
    head = find_head(probe, default_classes or 7)
    w = state.get(stem + ".weight")
    channels = int(w.shape[1]) if w is not None and w.ndim >= 3 else default_channels
    n_out = default_classes or 7
    if head is not None and f"{head}.weight" in state:
        n_out = int(state[f"{head}.weight"].shape[0])
    model = probe if (channels, n_out) == (default_channels, default_classes or 7) else \
        create_zoo_model(arch, in_channels=channels, num_classes=n_out, spatial_dims=spatial_dims)
    zm = ZooModel(model, arch, channels, n_out)
    if _state_is_dp_fixed(model, state):
        zm.model, changes = make_dp_compatible(model)
        zm.changes += changes
        zm.dp_compatible = True
    load_into(zm.model, state, path, arch)
    return zm
