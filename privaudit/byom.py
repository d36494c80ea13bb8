"""Bring your own model: predictions and audits for models trained elsewhere.

Three ways in, one prediction table out (the ``predictions.csv`` schema, see :mod:`privaudit.predictions`):

- :func:`predict_with_model`: an in-memory ``torch.nn.Module`` (its outputs are logits unless the card says
  otherwise) or any callable that takes a float32 numpy batch and returns probabilities;
- :func:`predict_onnx`: an ONNX file, run with onnxruntime (no trust flag: no Python code is executed);
- :func:`predict_zoo_checkpoint`: weights (``.safetensors`` or a ``weights_only`` state_dict) of a
  ``torchvision:`` / ``timm:`` / ``monai:`` architecture.

Each reads the images in [0, 1], prepares them as the preprocessing card says (:mod:`privaudit.preprocess`;
privaudit's own preprocessing when there is no card), maps the outputs to the data's labels and returns
``(predictions, info)``. :func:`audit_model` hands the table to the audit engine, as an audit of a checkpoint
does, and optionally writes a run directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from privaudit.errors import CheckpointError, ConfigError
from privaudit.preprocess import (PreprocessCard, as_card, bce_losses, default_card, input_shape, prepare_inputs,
                                  select_outputs)
from privaudit.tasks import create_task

ELSEWHERE_WARNING = ("model trained elsewhere: privaudit cannot see how it was trained, so no DP guarantee is "
                     "reported for it")


def _task(task):
    return create_task(task) if isinstance(task, str) else task


def _load(manifest, task, card: PreprocessCard):
    from privaudit.data.inputs import load_inputs

    size = card.size or task.input_size
    x, y = load_inputs(manifest, task, size)
    return x, y, size


def _predict_batches(run, x: np.ndarray, y: np.ndarray, card: PreprocessCard, labels, *, what: str,
                     batch_size: int):
    """Run ``run(prepared batch) -> {output name: (n, k) array}`` over ``x`` and select the labels' columns."""
    outs: dict[str, list] = {}
    for i in range(0, len(x), batch_size):
        got = run(prepare_inputs(x[i:i + batch_size], card))
        for name, v in got.items():
            outs.setdefault(name, []).append(np.asarray(v, dtype=np.float64).reshape(len(v), -1))
    if not outs:
        raise CheckpointError(f"{what} gave no output")
    raw = {name: np.concatenate(v) for name, v in outs.items()}
    sel = select_outputs(raw, card, labels, what=what)
    keep = [list(labels).index(lab) for lab in sel.labels]
    losses = bce_losses(sel.probs, y[:, keep])
    return sel, losses


def _as_outputs(out) -> dict[str, np.ndarray]:
    """A model's return value as {name: array}: a tensor or array, a tuple/list of them, or a dict."""
    def arr(v):
        if hasattr(v, "detach"):
            v = v.detach().float().cpu().numpy()
        return np.asarray(v, dtype=np.float64)

    if isinstance(out, dict):
        return {str(k): arr(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": arr(v) for i, v in enumerate(out)}
    return {"output": arr(out)}


def _frame(manifest, sel, losses) -> pd.DataFrame:
    from privaudit.predictions import build_predictions

    return build_predictions(manifest.frame, sel.labels, sel.probs, losses)


def predict_with_model(model, manifest, card=None, *, task="cxr", batch_size: int = 32, device=None,
                       image_size: int | None = None):
    """Predict with an in-memory model; return ``(predictions, info)``.

    ``model``: a ``torch.nn.Module`` (put in eval mode; run without gradients on ``device``, default its own)
    whose outputs are logits (activation ``sigmoid``) unless the card says otherwise, or any other callable
    that takes the prepared float32 numpy batch and returns probabilities (activation ``none`` by default).
    ``card``: a :class:`PreprocessCard`, a dict, a TOML path, or None for privaudit's own preprocessing.
    ``image_size``: the input edge when the card gives none (default: the task's input size).
    """
    task = _task(task)
    is_module = _is_module(model)
    card = as_card(card)
    if card is None:
        card = default_card(activation="sigmoid" if is_module else "none")
    card = _sized(card, image_size)
    if not callable(model):
        raise ConfigError(f"model must be a torch nn.Module or a callable returning probabilities; got "
                          f"{type(model).__name__}")
    x, y, size = _load(manifest, task, card)
    what = type(model).__name__ if is_module else getattr(model, "__name__", "the model")
    if is_module:
        import torch

        was_training = model.training
        model.eval()
        dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))

        def run(xb):
            with torch.no_grad():
                return _as_outputs(model(torch.from_numpy(xb).to(dev)))
        try:
            sel, losses = _predict_batches(run, x, y, card, manifest.labels, what=what, batch_size=batch_size)
        except RuntimeError as e:
            shape = [batch_size, *input_shape(card, size=size, spatial_dims=task.spatial_dims)]
            raise CheckpointError(f"{what} fails on inputs of shape {shape} "
                                  f"({str(e).splitlines()[0][:200]}); check [input] size and channels") from None
        finally:
            model.train(was_training)
    else:
        sel, losses = _predict_batches(lambda xb: _as_outputs(model(xb)), x, y, card, manifest.labels, what=what,
                                       batch_size=batch_size)
    info = {"format": "nn.Module" if is_module else "callable", "model": what, "preprocess": card.to_dict(),
            "image_size": size, "outputs": sel.columns, "warnings": sel.warnings()}
    return _frame(manifest, sel, losses), info


def _is_module(model) -> bool:
    try:
        from torch import nn
    except ImportError:
        return False
    return isinstance(model, nn.Module)


def predict_onnx(path, manifest, card=None, *, task="cxr", batch_size: int = 32):
    """Predict with an ONNX file (checked first: size, external data, operator domains; see
    :mod:`privaudit.backends.onnx_predict`); return ``(predictions, info)``. Without a card: privaudit's own
    preprocessing and a sigmoid on the outputs."""
    from privaudit.backends._plan import sha256
    from privaudit.backends.onnx_predict import OnnxModel

    task = _task(task)
    card = as_card(card) or default_card()
    model = OnnxModel(path)
    size = card.size or task.input_size
    model.check_input(input_shape(card, size=size, spatial_dims=task.spatial_dims), card.source)
    x, y, size = _load(manifest, task, card)
    sel, losses = _predict_batches(model, x, y, card, manifest.labels, what=str(Path(path)), batch_size=batch_size)
    info = {**model.info, "checkpoint": str(path), "sha256": sha256(Path(path)), "architecture": "onnx",
            "preprocess": card.to_dict(), "image_size": size, "outputs": sel.columns, "warnings": sel.warnings()}
    return _frame(manifest, sel, losses), info


def predict_zoo_checkpoint(path, manifest, *, task="cxr", arch: str, card=None, batch_size: int = 32, device="auto",
                           image_size: int | None = None):
    """Predict with weights of a zoo architecture (``.safetensors`` or a ``weights_only`` state_dict); return
    ``(predictions, info)``. The network's input channels and output count are read from the weights; weights of
    a zoo model privaudit trained with DP (GroupNorm in place of BatchNorm) are recognised and fitted the same
    way. Without a card: privaudit's own preprocessing (as privaudit trains zoo models) and a sigmoid.
    ``device``: "auto" (CUDA when available), a torch device, or None (the CPU)."""
    from privaudit.backends._plan import sha256
    from privaudit.backends.zoo import is_zoo_name, load_weights, zoo_model_for_weights

    task = _task(task)
    if not is_zoo_name(arch):
        raise ConfigError(f"architecture {arch!r} is not a zoo name (torchvision:<model>, timm:<model>, monai:<model>)")
    path = Path(path)
    state = load_weights(path)
    zm = zoo_model_for_weights(arch, state, path, spatial_dims=task.spatial_dims, default_channels=task.in_channels,
                               default_classes=len(manifest.labels))
    card = as_card(card) or default_card(channels=zm.in_channels, size=image_size)
    if card.channels != zm.in_channels:
        raise ConfigError(f"{card.source}: [input] channels = {card.channels}, but the weights' stem reads "
                          f"{zm.in_channels} channel(s); set channels = {zm.in_channels}")
    if device == "auto":   # CUDA when there is one
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is not None:
        zm.model.to(device)
    preds, info = predict_with_model(zm.model, manifest, card, task=task, batch_size=batch_size, device=device)
    info.update({"format": "safetensors" if path.suffix == ".safetensors" else "state_dict", "architecture": arch,
                 "checkpoint": str(path), "sha256": sha256(path), "model": arch,
                 "model_changes": zm.record() if zm.changes else None})
    return preds, info


def _sized(card, image_size):
    import dataclasses

    card = as_card(card)
    if image_size is None:
        return card
    if card is None:
        return default_card(size=image_size)
    return card if card.size is not None else dataclasses.replace(card, size=image_size)


def predict_checkpoint_file(checkpoint, manifest, *, task="cxr", arch: str | None = None,
                            image_size: int | None = None, preprocess=None):
    """What ``privaudit audit --checkpoint FILE [--arch NAME] [--preprocess CARD] [--image-size N]`` predicts
    with, for an ``.onnx`` file or zoo weights; ``image_size`` applies when the card gives no size."""
    card = _sized(preprocess, image_size)
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".onnx":
        preds, info = predict_onnx(checkpoint, manifest, card, task=task)
        info["backend"] = "onnxruntime"
    else:
        if card is not None and preprocess is None:   # only a size: keep the channels the weights read
            card = None
        preds, info = predict_zoo_checkpoint(checkpoint, manifest, task=task, arch=arch, card=card,
                                             image_size=image_size)
        info["backend"] = "opacus"
    return preds, info


def predict_any(model, manifest, *, task="cxr", arch: str | None = None, preprocess=None, image_size=None,
                batch_size: int = 32):
    """Dispatch on what ``model`` is: an ONNX path, zoo weights (with ``arch``), or an in-memory model."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix != ".onnx" and arch is None:
            raise ConfigError(f"{path}: weights need their architecture; give arch= (e.g. torchvision:densenet121), "
                              "or pass an .onnx file")
        return predict_checkpoint_file(path, manifest, task=task, arch=arch, image_size=image_size,
                                       preprocess=preprocess)
    return predict_with_model(model, manifest, preprocess, task=task, batch_size=batch_size, image_size=image_size)


def audit_model(model, data, *, task: str = "cxr", preprocess=None, out=None, config=None, name: str = "model",
                arch: str | None = None, image_size: int | None = None, preset: str | None = None, labels=None,
                batch_size: int = 32, force: bool = False, command: str | None = None):
    """Audit a model trained elsewhere on ``data``: the same audit as ``privaudit audit --checkpoint``.

    ``model``: an in-memory ``torch.nn.Module``, a callable returning probabilities, an ``.onnx`` path, or a
    weights path with ``arch`` (a zoo name). ``data``: a :class:`~privaudit.data.manifest.Manifest`, or a
    manifest / preset folder path (``preset``, ``labels`` as for ``--data``). ``preprocess``: a preprocessing
    card (path, dict or :class:`PreprocessCard`). ``image_size``: the input edge when the card gives none.
    ``config``: an :class:`~privaudit.config.AuditConfig`. ``command``: the command line, for ``config.json``.
    With ``out``, writes a run directory there (``predictions.csv``, ``config.json``, ``audit.json``,
    ``report.html``; nothing when an error occurs). Returns the :class:`~privaudit.audit.results.AuditReport`.
    """
    from privaudit.audit import run_audit
    from privaudit.config import AuditConfig
    from privaudit.data.manifest import Manifest

    task_spec = create_task(task)
    config = config or AuditConfig()
    card = as_card(preprocess)
    if isinstance(data, Manifest):
        manifest = data
    else:
        from privaudit.data.presets import load_data

        manifest = load_data(Path(data), task=task_spec, preset=preset, labels=tuple(labels) if labels else None)
    preds, info = predict_any(model, manifest, task=task, arch=arch, preprocess=card, image_size=image_size,
                              batch_size=batch_size)
    data_info = {"manifest": str(manifest.source)}
    run = {"backend": info.get("backend"), "architecture": info.get("architecture") or info.get("model"),
           "task": task, "seed": None, "dp": False}
    report = run_audit({name: preds}, runs={name: run}, config=config, task=task, data=data_info,
                       provenance={"command": command} if command else None)
    report.data["warnings"].extend(f"{name}: {w}" for w in info.get("warnings", []))
    report.data["warnings"].append(ELSEWHERE_WARNING)
    if out is not None:
        from privaudit._fs import staged_dir, write_json
        from privaudit.predictions import write_predictions
        from privaudit.reports import write_report

        with staged_dir(Path(out), force=force) as tmp:
            write_predictions(preds, tmp / "predictions.csv")
            write_json(tmp / "config.json", {"checkpoint": info, "data": data_info,
                                             **({"command": command} if command else {})})
            report.to_json(tmp / "audit.json")
            write_report(tmp / "audit.json")
    return report
