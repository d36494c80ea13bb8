"""ONNX models, run with onnxruntime: no Python code of the file's author is executed, so no trust flag.

An ONNX file is still hostile input, and is checked before onnxruntime sees it (each refusal one line):

- its size: at most :data:`MAX_ONNX_BYTES` for the file, :data:`MAX_ONNX_DATA_BYTES` for its external data;
- external data: a tensor stored beside the file must lie in the file's own folder (no absolute paths, no
  ``..``, no link out of the folder), and the file must exist;
- operator domains: only the standard ones (``""`` / ``ai.onnx`` and ``ai.onnx.ml``) and functions the file
  itself defines in them; a custom-op domain would need a library of native code, which privaudit never loads;
- a file that does not parse, or that the ONNX checker rejects, is corrupt.

Then :class:`OnnxModel` checks the model's single input against the preprocessing card's shape and runs it in
batches (a model with a fixed batch size gets padded batches), returning every output by name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from privaudit.errors import CheckpointError, MissingDependencyError

MAX_ONNX_BYTES = 2 * 2**30          # protobuf's own limit for one message: a larger model keeps external data
MAX_ONNX_DATA_BYTES = 32 * 2**30    # external data, all files together
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
INSTALL_HINT = 'pip install "privaudit[models]"'
_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"ONNX models need {module.split('.')[0]}; install it with "
                                     f"{INSTALL_HINT}") from None


def _graphs(graph):
    yield graph
    for node in graph.node:
        yield from _attr_graphs(node)


def _attr_graphs(node):
    for a in node.attribute:
        if a.HasField("g"):
            yield from _graphs(a.g)
        for g in a.graphs:
            yield from _graphs(g)


def _tensors(model):
    """Every tensor stored in the model: initializers, sparse initializers and constant attributes, in the main
    graph, its subgraphs and the model's functions."""
    def node_tensors(nodes):
        for node in nodes:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices
    for g in _graphs(model.graph):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        yield from node_tensors(g.node)
    for f in model.functions:
        yield from node_tensors(f.node)
        for node in f.node:
            for sub in _attr_graphs(node):
                yield from sub.initializer
                yield from node_tensors(sub.node)


def _nodes(model):
    for g in _graphs(model.graph):
        yield from g.node
    for f in model.functions:
        for node in f.node:
            yield node
            for sub in _attr_graphs(node):
                yield from sub.node


def check_onnx(path) -> dict:
    """Check an ONNX file before running it (see the module docstring); return facts for provenance."""
    onnx = _need("onnx")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX file not found")
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise CheckpointError(f"{path}: the ONNX file is {size / 2**20:.0f} MiB, over privaudit's limit of "
                              f"{MAX_ONNX_BYTES / 2**20:.0f} MiB (privaudit.backends.onnx_predict.MAX_ONNX_BYTES); "
                              "store large weights as external data beside it")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable ONNX file ({type(e).__name__}); export it again, e.g. with "
                              "torch.onnx.export") from None
    if not model.HasField("graph") or not model.graph.node:
        raise CheckpointError(f"{path}: not a readable ONNX file (no graph); export it again, e.g. with "
                              "torch.onnx.export")

    folder = path.parent.resolve()
    data_files: dict[Path, int] = {}
    for t in _tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        target = (folder / loc).resolve()
        if not loc or os.path.isabs(loc) or not target.is_relative_to(folder) or target == folder:
            raise CheckpointError(f"{path}: tensor {t.name!r} points at external data {loc!r} outside the ONNX "
                                  "file's folder; privaudit reads external data only from beside the file")
        if not target.is_file():
            raise CheckpointError(f"{path}: tensor {t.name!r} needs its external data file {loc!r}, which is not "
                                  "beside the ONNX file")
        data_files[target] = target.stat().st_size
    data_bytes = sum(data_files.values())
    if data_bytes > MAX_ONNX_DATA_BYTES:
        raise CheckpointError(f"{path}: its external data is {data_bytes / 2**30:.1f} GiB, over privaudit's limit of "
                              f"{MAX_ONNX_DATA_BYTES / 2**30:.0f} GiB (MAX_ONNX_DATA_BYTES)")

    local = {(f.domain, f.name) for f in model.functions}
    for node in _nodes(model):
        if node.domain in STANDARD_DOMAINS or (node.domain, node.op_type) in local:
            continue
        raise CheckpointError(f"{path}: node {node.name or node.op_type!r} uses operator {node.op_type!r} from the "
                              f"custom domain {node.domain!r}; privaudit runs only the standard ONNX operators "
                              "(ai.onnx, ai.onnx.ml), so export the model with those")
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: the ONNX checker rejects the file ({first[:200]}); export it again") from None
    return {"format": "onnx", "ir_version": int(model.ir_version),
            "opsets": {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import},
            "producer": f"{model.producer_name} {model.producer_version}".strip() or None,
            "external_data_bytes": data_bytes}


def _dims(shape) -> list:
    return [d if isinstance(d, int) else (d or "?") for d in shape]


class OnnxModel:
    """A checked ONNX file in an onnxruntime session on the CPU."""

    def __init__(self, path):
        self.path = Path(path)
        self.info = check_onnx(self.path)
        ort = _need("onnxruntime")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{self.path}: onnxruntime cannot load the model ({first[:200]})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CheckpointError(f"{self.path}: the model has {len(inputs)} inputs "
                                  f"({', '.join(i.name for i in inputs)}); privaudit feeds one image tensor")
        self.input = inputs[0]
        if self.input.type not in _INPUT_TYPES:
            raise CheckpointError(f"{self.path}: the model's input {self.input.name!r} is a {self.input.type}; "
                                  "privaudit feeds float images (tensor(float), float16 or double)")
        self.dtype = _INPUT_TYPES[self.input.type]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.info.update({"input": self.input.name, "input_shape": _dims(self.input.shape),
                          "outputs": self.output_names})

    def check_input(self, per_sample: list[int], source: str) -> None:
        """Refuse a card whose input (``per_sample``, no batch axis) the model's declared shape cannot take."""
        shape = list(self.input.shape)
        want = ["batch", *per_sample]
        fits = len(shape) == len(want) and all(not isinstance(d, int) or d == w for d, w in zip(shape[1:], per_sample))
        if not fits:
            raise CheckpointError(f"{self.path}: the model's input {self.input.name!r} has shape {_dims(shape)} but "
                                  f"the preprocessing ({source}) gives {want}; set [input] size, channels or layout "
                                  "in the card (--preprocess) to fit the model")

    def __call__(self, xb: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by name for one batch of prepared inputs (any batch size; padded when the model fixes it)."""
        n = len(xb)
        fixed = self.input.shape[0] if isinstance(self.input.shape[0], int) else None
        chunks = [xb] if fixed is None else [xb[i:i + fixed] for i in range(0, n, fixed)]
        got: dict[str, list] = {name: [] for name in self.output_names}
        for c in chunks:
            m = len(c)
            if fixed is not None and m < fixed:
                c = np.concatenate([c, np.zeros((fixed - m, *c.shape[1:]), dtype=c.dtype)])
            try:
                outs = self.session.run(None, {self.input.name: c.astype(self.dtype, copy=False)})
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise CheckpointError(f"{self.path}: onnxruntime fails on inputs of shape {list(c.shape)} "
                                      f"({first[:200]}); check [input] size and channels in the card") from None
            for name, o in zip(self.output_names, outs):
                o = np.asarray(o)
                if o.ndim == 0 or o.shape[0] != len(c):
                    raise CheckpointError(f"{self.path}: output {name!r} has shape {list(o.shape)}, not one row "
                                          f"per image of the batch ({len(c)}); privaudit needs per-image outputs")
                got[name].append(o[:m].reshape(m, -1).astype(np.float64))
        return {name: np.concatenate(v) for name, v in got.items()}
