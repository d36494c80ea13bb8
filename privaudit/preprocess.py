"""The preprocessing card: how an outside model wants its input, and what its outputs mean (framework-free).

A model trained elsewhere expects its own input (edge length, grey or RGB, scaling) and gives its own outputs
(logits or probabilities, in its own label order, often more labels than the task has). The card says so in
TOML (``--preprocess CARD.toml``, ``preprocess=`` in the API)::

    [input]
    size = 224              # edge in pixels (voxels for 3D); default: the task's input size
    channels = 1            # 1 = greyscale; 3 = the grey image repeated on three channels
    scale = "mean_std"      # (x - mean) / std per channel; "range": [0, 1] mapped onto `range`; "unit": [0, 1]
    mean = [0.5]            # one value, or one per channel
    std = [0.25]
    # range = [-1024, 1024] # with scale = "range" (torchxrayvision's scaling)
    # layout = "channels_first"   # or "channels_last" (NHWC, e.g. an ONNX file exported from Keras)
    [output]
    activation = "sigmoid"  # sigmoid | softmax | none (the model gives probabilities already)
    # names = ["Atelectasis", ...]   # names of the model's output columns, usable in [output.map]
    # output = "logits"     # for a model with several outputs: the one that integer indices refer to
    [output.map]            # task label = the model's output index (or its name)
    cardiomegaly = 0
    pleural_effusion = 2

Images are read in [0, 1] (as privaudit trains on them); the card turns them into what the model expects.
Without ``[output.map]`` the model's outputs must be the data's labels, in order. With it, a label that the map
leaves out is left out of the audit with a warning: it is never filled with zeros.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privaudit.errors import CheckpointError, ConfigError

SCALES = ("mean_std", "range", "unit")
ACTIVATIONS = ("sigmoid", "softmax", "none")
LAYOUTS = ("channels_first", "channels_last")
INPUT_KEYS = ("size", "channels", "scale", "mean", "std", "range", "layout")
OUTPUT_KEYS = ("activation", "names", "output", "map")
# privaudit's own preprocessing (the opacus backend trains on (x - 0.5) / 0.25, with x in [0, 1])
PRIVAUDIT_MEAN, PRIVAUDIT_STD = 0.5, 0.25


@dataclass(frozen=True)
class PreprocessCard:
    """A validated preprocessing card."""

    size: int | None = None                 # input edge (pixels / voxels); None: the task's input size
    channels: int = 1                       # 1 grey, 3 grey repeated
    scale: str = "mean_std"                 # one of SCALES
    mean: tuple[float, ...] = (PRIVAUDIT_MEAN,)
    std: tuple[float, ...] = (PRIVAUDIT_STD,)
    range: tuple[float, float] | None = None   # scale == "range": where [0, 1] goes
    layout: str = "channels_first"          # one of LAYOUTS
    activation: str = "sigmoid"             # one of ACTIVATIONS
    names: tuple[str, ...] | None = None    # names of the primary output's columns
    output: str | None = None               # the primary output (several outputs); None: the first
    map: dict | None = None                 # task label -> int index or str name; None: outputs are the labels
    source: str = "preprocess"              # where the card came from, for messages

    def to_dict(self) -> dict:
        d = {"input": {"size": self.size, "channels": self.channels, "scale": self.scale, "layout": self.layout},
             "output": {"activation": self.activation}}
        if self.scale == "mean_std":
            d["input"].update(mean=list(self.mean), std=list(self.std))
        if self.scale == "range":
            d["input"]["range"] = list(self.range)
        if self.names is not None:
            d["output"]["names"] = list(self.names)
        if self.output is not None:
            d["output"]["output"] = self.output
        if self.map is not None:
            d["output"]["map"] = dict(self.map)
        return d


def default_card(*, channels: int = 1, size: int | None = None, activation: str = "sigmoid") -> PreprocessCard:
    """privaudit's own preprocessing, which its trained models (and zoo models it trains) expect."""
    return PreprocessCard(size=size, channels=channels, activation=activation, source="privaudit's preprocessing")


def _unknown_key(source, table: str, key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown key {key!r} in [{table}]; valid keys are {', '.join(valid)}.{hint}")


def _number_list(source, key: str, value) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value):
        raise ConfigError(f"{source}: [input] {key} must be a number or a list of numbers, e.g. {key} = [0.5]; "
                          f"got {value!r}")
    return tuple(float(v) for v in value)


def card_from_dict(d: dict, source: str = "preprocess") -> PreprocessCard:
    """Validate a card given as a dict (as TOML reads it); every key is checked, each error in one line."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: a preprocessing card is a table with [input] and [output]; "
                          f"got {type(d).__name__}")
    for top in d:
        if top not in ("input", "output"):
            raise _unknown_key(source, "top level", top, ("input", "output"))
    inp, out = d.get("input", {}), d.get("output", {})
    for table, t in (("input", inp), ("output", out)):
        if not isinstance(t, dict):
            raise ConfigError(f"{source}: [{table}] must be a table")
    for k in inp:
        if k not in INPUT_KEYS:
            raise _unknown_key(source, "input", k, INPUT_KEYS)
    for k in out:
        if k not in OUTPUT_KEYS:
            raise _unknown_key(source, "output", k, OUTPUT_KEYS)

    size = inp.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"{source}: [input] size must be a positive whole number of pixels, e.g. size = 224; "
                          f"got {size!r}")
    channels = inp.get("channels", 1)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"{source}: [input] channels must be 1 (grey) or 3 (the grey image repeated); "
                          f"got {channels!r}")
    scale = inp.get("scale", "mean_std")
    if scale not in SCALES:
        raise ConfigError(f"{source}: [input] scale must be one of {', '.join(SCALES)}; got {scale!r}")
    mean, std = (PRIVAUDIT_MEAN,), (PRIVAUDIT_STD,)
    rng = None
    if scale == "mean_std":
        mean = _number_list(source, "mean", inp.get("mean", [PRIVAUDIT_MEAN]))
        std = _number_list(source, "std", inp.get("std", [PRIVAUDIT_STD]))
        for key, v in (("mean", mean), ("std", std)):
            if len(v) not in (1, channels):
                raise ConfigError(f"{source}: [input] {key} has {len(v)} values for {channels} channel(s); give one "
                                  "value or one per channel")
        if any(s <= 0 for s in std):
            raise ConfigError(f"{source}: [input] std must be positive; got {list(std)}")
        if "range" in inp:
            raise ConfigError(f"{source}: [input] range goes with scale = \"range\"; scale is \"mean_std\"")
    else:
        for key in ("mean", "std"):
            if key in inp:
                raise ConfigError(f"{source}: [input] {key} goes with scale = \"mean_std\"; scale is {scale!r}")
    if scale == "range":
        if "range" not in inp:
            raise ConfigError(f"{source}: scale = \"range\" needs [input] range = [low, high], e.g. [-1024, 1024]")
        rng = _number_list(source, "range", inp["range"])
        if len(rng) != 2 or not rng[0] < rng[1]:
            raise ConfigError(f"{source}: [input] range must be [low, high] with low < high; got {list(rng)}")
    elif "range" in inp:
        raise ConfigError(f"{source}: [input] range goes with scale = \"range\"; scale is {scale!r}")
    layout = inp.get("layout", "channels_first")
    if layout not in LAYOUTS:
        raise ConfigError(f"{source}: [input] layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")

    activation = out.get("activation", "sigmoid")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{source}: [output] activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    names = out.get("names")
    if names is not None:
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"{source}: [output] names must be a list of output names, "
                              "e.g. names = [\"Atelectasis\"]")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"{source}: [output] names lists {dup!r} twice")
        names = tuple(names)
    output = out.get("output")
    if output is not None and (not isinstance(output, str) or not output):
        raise ConfigError(f"{source}: [output] output must be the name of one of the model's outputs; got {output!r}")
    mapping = out.get("map")
    if mapping is not None:
        if not isinstance(mapping, dict) or not mapping:
            raise ConfigError(f"{source}: [output.map] must map task labels to output indices, e.g. cardiomegaly = 0")
        for lab, target in mapping.items():
            ok = (isinstance(target, int) and not isinstance(target, bool) and target >= 0) or \
                 (isinstance(target, str) and target)
            if not ok:
                raise ConfigError(f"{source}: [output.map] {lab} = {target!r}; give the model's output index (0, 1, "
                                  "...) or its name")
        targets = list(mapping.values())
        dup = next((t for t in targets if targets.count(t) > 1), None)
        if dup is not None:
            raise ConfigError(f"{source}: [output.map] maps two labels to the same output {dup!r}")
        mapping = dict(mapping)
    return PreprocessCard(size=size, channels=channels, scale=scale, mean=mean, std=std, range=rng, layout=layout,
                          activation=activation, names=names, output=output, map=mapping, source=source)


def load_preprocess_card(path) -> PreprocessCard:
    """Read and validate a preprocessing card (TOML)."""
    from privaudit.config import load_toml

    path = Path(path)
    return card_from_dict(load_toml(path), source=str(path))


def as_card(preprocess) -> PreprocessCard | None:
    """``preprocess=`` as the API takes it: None, a card, a dict, or the path of a TOML card."""
    if preprocess is None or isinstance(preprocess, PreprocessCard):
        return preprocess
    if isinstance(preprocess, dict):
        return card_from_dict(preprocess)
    return load_preprocess_card(preprocess)


# ----------------------------------------------------------------------------------------------- the input

def prepare_inputs(x: np.ndarray, card: PreprocessCard) -> np.ndarray:
    """Images in [0, 1], (N, 1, *spatial), to what the model reads: channels, scaling, layout (float32)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] != card.channels:
        if x.shape[1] != 1:
            raise ConfigError(f"{card.source}: the images have {x.shape[1]} channels; [input] channels must match")
        x = np.repeat(x, card.channels, axis=1)
    if card.scale == "mean_std":
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = np.asarray(card.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(card.std, dtype=np.float32).reshape(shape)
        x = (x - mean) / std
    elif card.scale == "range":
        lo, hi = card.range
        x = np.float32(lo) + x * np.float32(hi - lo)
    if card.layout == "channels_last":
        x = np.moveaxis(x, 1, -1)
    return np.ascontiguousarray(x, dtype=np.float32)


def input_shape(card: PreprocessCard, *, size: int, spatial_dims: int) -> list[int]:
    """The per-sample input shape the card gives the model (no batch axis)."""
    spatial = [size] * spatial_dims
    return spatial + [card.channels] if card.layout == "channels_last" else [card.channels] + spatial


# ---------------------------------------------------------------------------------------------- the output

def _activate(z: np.ndarray, activation: str, source: str, what: str) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if activation == "sigmoid":
        from scipy.special import expit

        return expit(z)
    if activation == "softmax":
        if z.shape[1] < 2:
            raise ConfigError(f"{source}: [output] activation = \"softmax\" over {what}, which has a single column "
                              "(always 1); use sigmoid")
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    bad = ~np.isfinite(z) | (z < 0) | (z > 1)
    if bad.any():
        raise CheckpointError(f"{source}: [output] activation = \"none\" says the model gives probabilities, but "
                              f"{what} holds {float(z[bad][0]):.4g}; set activation = \"sigmoid\" (or softmax) for "
                              "logits")
    return z


@dataclass
class OutputSelection:
    """The model's outputs turned into one probability column per kept label."""

    labels: list[str]                       # the data's labels the model gives, in the data's order
    probs: np.ndarray                       # (N, len(labels))
    left_out: list[str] = field(default_factory=list)   # labels of the data the model does not give
    columns: dict = field(default_factory=dict)          # label -> "output[index]" it was read from

    def warnings(self) -> list[str]:
        return [f"label {lab}: the model has no output for it (not in [output.map]), so it is left out of the "
                "audit" for lab in self.left_out]


def select_outputs(outputs: dict, card: PreprocessCard, labels, *, what: str = "the model") -> OutputSelection:
    """Map the model's raw outputs (name -> (N, k) array, in the model's order) to the data's labels.

    Integer targets index the columns of the primary output (``[output] output``, default the first); string
    targets name a column (``[output] names``) or a one-column output of the model. Raises a one-line error for
    an output the model lacks; a label the map leaves out is reported in ``left_out``.
    """
    labels = list(labels)
    src = card.source
    outs = {name: np.asarray(v).reshape(len(v), -1) for name, v in outputs.items()}
    order = list(outs)
    if not order:
        raise CheckpointError(f"{what} gives no output")
    primary = card.output or order[0]
    if primary not in outs:
        raise ConfigError(f"{src}: [output] output = {primary!r}, but {what} has no output of that name; its outputs "
                          f"are {', '.join(order)}")
    k = outs[primary].shape[1]
    if card.names is not None and len(card.names) != k:
        raise ConfigError(f"{src}: [output] names lists {len(card.names)} names but {what}'s output {primary!r} "
                          f"has {k} columns")

    if card.map is None:
        if k != len(labels):
            raise CheckpointError(f"{what} has {k} outputs but the data has {len(labels)} labels "
                                  f"({', '.join(labels)}); give [output.map] in a preprocessing card "
                                  "(--preprocess) to say which output is which label")
        p = _activate(outs[primary], card.activation, src, f"output {primary!r}")
        return OutputSelection(labels, p, [], {lab: f"{primary}[{j}]" for j, lab in enumerate(labels)})

    for lab in card.map:
        if lab not in labels:
            close = difflib.get_close_matches(lab, labels, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{src}: [output.map] names {lab!r}, which is not a label of the data "
                              f"({', '.join(labels)}).{hint}")
    activated: dict[str, np.ndarray] = {}

    def column(target) -> tuple[np.ndarray, str]:
        if isinstance(target, int):
            if target >= k:
                raise ConfigError(f"{src}: [output.map] points at output {target}, but {what}'s output {primary!r} "
                                  f"has {k} columns (0 to {k - 1})")
            name, j = primary, target
        elif card.names is not None and target in card.names:
            name, j = primary, card.names.index(target)
        elif target in outs:
            if outs[target].shape[1] != 1:
                raise ConfigError(f"{src}: [output.map] names output {target!r}, which has {outs[target].shape[1]} "
                                  "columns; name a one-column output, or give an index into it with [output] output")
            name, j = target, 0
        else:
            known = list(card.names or []) + order
            close = difflib.get_close_matches(target, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{src}: [output.map] names output {target!r}, which {what} does not have; its outputs "
                              f"are {', '.join(known)}.{hint}")
        if name not in activated:
            activated[name] = _activate(outs[name], card.activation, src, f"output {name!r}")
        return activated[name][:, j], f"{name}[{j}]"

    kept, cols, where = [], [], {}
    for lab in labels:   # the data's order
        if lab in card.map:
            col, where[lab] = column(card.map[lab])
            kept.append(lab)
            cols.append(col)
    left_out = [lab for lab in labels if lab not in card.map]
    return OutputSelection(kept, np.stack(cols, axis=1), left_out, where)


def bce_losses(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample binary cross-entropy from probabilities, averaged over the sample's known labels (NaN =
    unknown), as the training loss privaudit records; probabilities are clipped to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    known = ~np.isnan(y)
    yy = np.nan_to_num(y, nan=0.0)
    loss = -(yy * np.log(p) + (1 - yy) * np.log1p(-p)) * known
    return loss.sum(axis=1) / np.maximum(known.sum(axis=1), 1)
