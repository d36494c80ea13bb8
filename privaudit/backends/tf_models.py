"""Keras model zoo, layer for layer the same networks as :mod:`privaudit.backends.torch_models`
(``resnet9-gn`` and ``cnn3d-gn``, each in 2D and 3D).

``resnet9-gn`` mirrors the torch ResNet9: a 7x7/2 stem convolution, GroupNorm, Mish and a 3x3/2 max pool, four
BasicBlocks of widths (w, 2w, 4w, 8w) with strides (1, 2, 2, 2) and 1x1 projection shortcuts, global average
pooling and a linear head. Keras works channels-last, so inputs are (H, W, C) or (D, H, W, C).

PyTorch pads explicitly (padding=3 and 1); Keras' ``"same"`` pads asymmetrically on even inputs, which would
shift every window by one pixel. The Keras networks therefore pad explicitly too, so that with the same weights
the two backends compute the same function (the tests copy torch weights in and compare outputs). Max pooling
in PyTorch pads with -inf; here the pooled tensor is a Mish output (always above -0.31), so it is shifted by +1,
zero-padded, pooled and shifted back, which gives the same maxima. Only built-in, serialisable layers are used
(no ``Lambda``), so the saved ``.keras`` files load with ``safe_mode=True``.

Layer names follow the torch parameter names (``stem_conv`` for ``stem.0``, ``block2_1_conv`` for
``blocks.2.conv1``, ``features3_norm`` for ``features.3.adn.N``, ``fc``), which :func:`torch_weight_map` uses
to copy weights across.
"""

from __future__ import annotations

from privaudit.backends._arch import gn_groups
from privaudit.backends._tf_env import import_keras
from privaudit.errors import ConfigError, unknown_name

GN_EPS = 1e-5  # torch.nn.GroupNorm's default (Keras' default is 1e-3)


def _layers(dims: int):
    keras = import_keras()
    L = keras.layers
    if dims == 2:
        return L.Conv2D, L.ZeroPadding2D, L.MaxPooling2D, L.GlobalAveragePooling2D
    if dims == 3:
        return L.Conv3D, L.ZeroPadding3D, L.MaxPooling3D, L.GlobalAveragePooling3D
    raise ConfigError(f"spatial_dims must be 2 or 3, got {dims}")


def _conv_norm(x, filters: int, kernel: int, stride: int, pad: int, dims: int, name: str, *, act: bool):
    keras = import_keras()
    conv, zpad, _, _ = _layers(dims)
    if pad:
        x = zpad(pad, name=f"{name}_pad")(x)
    x = conv(filters, kernel, strides=stride, padding="valid", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.GroupNormalization(groups=gn_groups(filters), axis=-1, epsilon=GN_EPS, name=f"{name}_norm")(x)
    if act:
        x = keras.layers.Activation("mish", name=f"{name}_act")(x)
    return x


def _basic_block(x, c_in: int, c_out: int, stride: int, dims: int, name: str):
    keras = import_keras()
    conv, _, _, _ = _layers(dims)
    if stride != 1 or c_in != c_out:
        identity = conv(c_out, 1, strides=stride, padding="valid", use_bias=False, name=f"{name}_short_conv")(x)
        identity = keras.layers.GroupNormalization(groups=gn_groups(c_out), axis=-1, epsilon=GN_EPS,
                                                   name=f"{name}_short_norm")(identity)
    else:
        identity = x
    out = _conv_norm(x, c_out, 3, stride, 1, dims, f"{name}_1", act=True)
    out = _conv_norm(out, c_out, 3, 1, 1, dims, f"{name}_2", act=False)
    out = keras.layers.Add(name=f"{name}_add")([out, identity])
    return keras.layers.Activation("mish", name=f"{name}_act")(out)


def resnet9_gn(*, in_channels: int, num_classes: int, width: int, spatial_dims: int, size: int | None = None):
    """The paper's ResNet-9 (GroupNorm + Mish) as a Keras functional model with channels-last input."""
    keras = import_keras()
    _, zpad, pool, gap = _layers(spatial_dims)
    inp = keras.Input(shape=(size,) * spatial_dims + (in_channels,), name="image")
    x = _conv_norm(inp, width, 7, 2, 3, spatial_dims, "stem", act=True)
    # torch's MaxPool(3, stride=2, padding=1) pads with -inf; Mish >= -0.31, so +1 / zero-pad / pool / -1 is exact
    x = keras.layers.Rescaling(1.0, offset=1.0, name="stem_pool_shift")(x)
    x = zpad(1, name="stem_pool_pad")(x)
    x = pool(3, strides=2, padding="valid", name="stem_pool")(x)
    x = keras.layers.Rescaling(1.0, offset=-1.0, name="stem_pool_unshift")(x)
    c = width
    for i, w in enumerate((width, 2 * width, 4 * width, 8 * width)):
        x = _basic_block(x, c, w, 1 if i == 0 else 2, spatial_dims, f"block{i}")
        c = w
    x = gap(name="pool")(x)
    out = keras.layers.Dense(num_classes, name="fc")(x)
    return keras.Model(inp, out, name=f"resnet9_gn_{spatial_dims}d")


def cnn3d_gn(*, in_channels: int, num_classes: int, width: int, spatial_dims: int, size: int | None = None,
             stages: int = 3, dropout: float = 0.0):
    """torch_models.CNN3D in Keras: a 3x3 stride-2 stem, then per stage a stride-2 block doubling the width
    (capped at 4 x width) and a stride-1 block (conv, GroupNorm, ReLU: MONAI's Convolution order), global
    average and max pooling concatenated, dropout, a linear head."""
    keras = import_keras()
    _, _, _, gap = _layers(spatial_dims)
    gmp = {2: keras.layers.GlobalMaxPooling2D, 3: keras.layers.GlobalMaxPooling3D}[spatial_dims]
    inp = keras.Input(shape=(size,) * spatial_dims + (in_channels,), name="image")
    x = _conv_norm(inp, width, 3, 2, 1, spatial_dims, "stem", act=False)
    x = keras.layers.ReLU(name="stem_act")(x)
    c, j = width, 0
    for i in range(stages):
        c_out = min(width * 2 ** (i + 1), 4 * width)
        for stride in (2, 1):
            x = _conv_norm(x, c_out, 3, stride, 1, spatial_dims, f"features{j}", act=False)
            x = keras.layers.ReLU(name=f"features{j}_act")(x)
            j += 1
        c = c_out
    pooled = keras.layers.Concatenate(name="pool")([gap(name="avg")(x), gmp(name="max")(x)])
    out = keras.layers.Dense(num_classes, name="fc")(keras.layers.Dropout(dropout, name="dropout")(pooled))
    return keras.Model(inp, out, name=f"cnn3d_gn_{spatial_dims}d")


# name -> factory(in_channels, num_classes, width, spatial_dims, size) and the dims it supports
_MODELS: dict[str, dict] = {
    "resnet9-gn": {"factory": resnet9_gn, "spatial_dims": (2, 3),
                   "doc": "ResNet-9 with GroupNorm and Mish (the paper's model), as torch_models.ResNet9"},
    "cnn3d-gn": {"factory": cnn3d_gn, "spatial_dims": (2, 3),
                 "doc": "small CT classifier with GroupNorm and ReLU (the pdac default), as torch_models.CNN3D"},
}


def register_model(name: str, factory, spatial_dims=(2,), doc: str = "") -> None:
    _MODELS[name] = {"factory": factory, "spatial_dims": tuple(spatial_dims), "doc": doc}


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, *, in_channels: int, num_classes: int, width: int, spatial_dims: int,
                 size: int | None = None):
    """A fresh Keras model; ``size`` fixes the input edge (None leaves it free)."""
    try:
        entry = _MODELS[name]
    except KeyError:
        raise unknown_name("architecture", name, _MODELS) from None
    if spatial_dims not in entry["spatial_dims"]:
        raise ConfigError(f"architecture {name!r} does not support {spatial_dims}D inputs in the tf backend")
    return entry["factory"](in_channels=in_channels, num_classes=num_classes, width=width,
                            spatial_dims=spatial_dims, size=size)


def torch_weight_map(model) -> dict[str, tuple[str, str]]:
    """Keras weight name -> (torch state_dict key, how to convert it), for the resnet9-gn layer names.

    Conversions: ``conv`` moves (out, in, *k) to (*k, in, out); ``dense`` transposes; ``copy`` keeps as is.
    """
    out = {}
    for layer in model.layers:
        n = layer.name
        if n == "stem_conv":
            tk = "stem.0"
        elif n == "stem_norm":
            tk = "stem.1"
        elif n == "fc":
            tk = "fc"
        elif n.startswith("features") and n.endswith(("_conv", "_norm")):  # cnn3d-gn: MONAI Convolution blocks
            j, part = n[len("features"):].split("_")
            tk = f"features.{j}.{'conv' if part == 'conv' else 'adn.N'}"
        elif n.startswith("block") and ("_conv" in n or "_norm" in n):
            b, rest = n[len("block"):].split("_", 1)
            tk = {"1_conv": "conv1", "1_norm": "norm1", "2_conv": "conv2", "2_norm": "norm2",
                  "short_conv": "shortcut.0", "short_norm": "shortcut.1"}[rest]
            tk = f"blocks.{b}.{tk}"
        else:
            continue
        for w in layer.weights:
            kind = w.name.split("/")[-1].split(":")[0]
            if kind == "kernel":
                out[w.name] = (f"{tk}.weight", "dense" if n == "fc" else "conv")
            elif kind in ("gamma", "bias", "beta"):
                out[w.name] = (f"{tk}.{'weight' if kind == 'gamma' else 'bias'}", "copy")
    return out
