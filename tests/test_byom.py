"""Bring your own model: zoo architectures, ONNX, the preprocessing card and audit_model.

The reference predictions are computed here by hand (images in [0, 1], privaudit's (x - 0.5) / 0.25, the
module, a sigmoid), so that every route (state_dict, safetensors, ONNX, the in-memory API, the backend's
predict_checkpoint) is compared with the framework's own output rather than with another privaudit path.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from privaudit import byom
from privaudit.backends import onnx_predict
from privaudit.backends.zoo import (ModelChangedWarning, build_zoo_model, create_zoo_model, make_dp_compatible,
                                    zoo_clipping)
from privaudit.data.inputs import load_inputs
from privaudit.data.presets import load_data
from privaudit.errors import CheckpointError, ConfigError, PrivauditError, RegistryError
from privaudit.preprocess import card_from_dict, load_preprocess_card, prepare_inputs, select_outputs
from privaudit.tasks import create_task

pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")
pytest.importorskip("onnx")

CXR = create_task("cxr")
SIZE = 32
ISSUE_CARD = """
[input]
size = 224              # edge in pixels (or voxels for 3D)
channels = 1            # 1 = greyscale; 3 = the grey image repeated
scale = "mean_std"      # or "range", with range = [-1024, 1024]
mean = [0.5]
std = [0.25]
[output]
activation = "sigmoid"  # sigmoid | softmax | none (already probabilities)
[output.map]            # task label = the model's output index (or its name, for ONNX outputs with names)
cardiomegaly = 0
pleural_effusion = 2
"""


def _export(model, x, path, **kw):
    """torch.onnx.export, quietly (the TorchScript exporter is quick on DenseNet-121, and deprecated)."""
    kw.setdefault("dynamo", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kw)


def _probs(df: pd.DataFrame, labels) -> np.ndarray:
    return df[[f"p_{lab}" for lab in labels]].to_numpy(dtype=float)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from privaudit.data.synth_cxr import synthesize_cxr

    path = synthesize_cxr(tmp_path_factory.mktemp("byom_cxr"), n=40, image_size=SIZE, seed=5)
    return load_data(path, task=CXR)


@pytest.fixture(scope="module")
def densenet(tmp_path_factory):
    """A torchvision DenseNet-121 with random weights, 1 channel, 5 outputs; saved three ways."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("densenet")
    model = create_zoo_model("torchvision:densenet121", in_channels=1, num_classes=5, spatial_dims=2).eval()
    torch.save(model.state_dict(), d / "densenet.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "densenet.safetensors"))
    _export(model, torch.zeros(2, 1, SIZE, SIZE), d / "densenet.onnx", input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return model, d


@pytest.fixture(scope="module")
def reference(manifest, densenet):
    """The module run directly on privaudit's preprocessing, by hand."""
    model, _ = densenet
    x, _ = load_inputs(manifest, CXR, SIZE)
    with torch.no_grad():
        logits = model((torch.from_numpy(np.asarray(x)) - 0.5) / 0.25)
    return torch.sigmoid(logits).double().numpy()


# ------------------------------------------------------------------------------------- same predictions

def test_state_dict_safetensors_onnx_and_module_give_the_modules_predictions(manifest, densenet, reference, tmp_path):
    from privaudit.backends.opacus_backend import OpacusBackend

    model, d = densenet
    labels = list(manifest.labels)
    arch = "torchvision:densenet121"
    routes = {
        "state_dict": byom.predict_zoo_checkpoint(d / "densenet.pt", manifest, task="cxr", arch=arch,
                                                  image_size=SIZE)[0],
        "safetensors": byom.predict_zoo_checkpoint(d / "densenet.safetensors", manifest, task="cxr", arch=arch,
                                                   image_size=SIZE)[0],
        # what `privaudit audit --checkpoint X.onnx` calls (backend.predict_checkpoint)
        "onnx": OpacusBackend().predict_checkpoint(d / "densenet.onnx", manifest, task="cxr", arch=None,
                                                   image_size=SIZE)[0],
        "backend_safetensors": OpacusBackend().predict_checkpoint(d / "densenet.safetensors", manifest, task="cxr",
                                                                  arch=arch, image_size=SIZE)[0],
        "module": byom.predict_with_model(model, manifest, {"input": {"size": SIZE}}, task="cxr")[0],
    }
    for name, df in routes.items():
        assert list(df["sample_id"]) == list(manifest.frame["sample_id"]), name
        assert np.abs(_probs(df, labels) - reference).max() < 1e-5, name
        assert {"sample_id", "split", "member", "loss", "sex", "age"} <= set(df.columns)
    # audit_model writes the run directory with the same predictions, the elsewhere warning and a valid audit
    out = tmp_path / "audit"
    report = byom.audit_model(model, manifest, task="cxr", preprocess={"input": {"size": SIZE}}, out=out)
    written = pd.read_csv(out / "predictions.csv")
    assert np.abs(_probs(written, labels) - reference).max() < 1e-5
    doc = json.loads((out / "audit.json").read_text())
    assert set(doc["models"]) == {"model"} and doc["models"]["model"]["run"]["dp"] is False
    assert any("trained elsewhere" in w for w in report.warnings)
    assert (out / "report.html").is_file()


def test_dynamo_export_with_external_data_runs_and_matches(manifest, tmp_path):
    """torch.onnx.export's default exporter stores weights beside the file (external data), as large models do."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).eval()
    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 1, SIZE, SIZE),), str(path), dynamo=True, external_data=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    assert list(tmp_path.glob("tiny.onnx.data"))
    x, _ = load_inputs(manifest, CXR, SIZE)
    with torch.no_grad():
        ref = torch.sigmoid(model((torch.from_numpy(np.asarray(x)) - 0.5) / 0.25)).double().numpy()
    df, info = byom.predict_onnx(path, manifest, {"input": {"size": SIZE}}, task="cxr", batch_size=7)
    assert np.abs(_probs(df, manifest.labels) - ref).max() < 1e-5
    assert info["external_data_bytes"] > 0 and info["input"]


# --------------------------------------------------------------------------------------- the output map

class Eighteen(nn.Module):
    """18 outputs, each a known function of the image: output j = mean pixel * (j - 8.5) / 100."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return m[:, None] * (torch.arange(18, dtype=x.dtype) - 8.5)[None, :] / 100


def test_output_map_of_an_18_output_model_selects_the_right_columns(manifest, tmp_path):
    pathologies = [f"path{j}" for j in range(18)]
    card = card_from_dict({"input": {"size": SIZE, "scale": "range", "range": [-1024, 1024]},
                           "output": {"activation": "sigmoid", "names": pathologies,
                                      "map": {"cardiomegaly": 3, "pleural_effusion": "path11",
                                              "atelectasis": 17}}})
    df, info = byom.predict_with_model(Eighteen(), manifest, card, task="cxr")
    x, _ = load_inputs(manifest, CXR, SIZE)
    m = (-1024 + np.asarray(x, dtype=np.float64) * 2048).mean(axis=(1, 2, 3))
    for lab, j in {"cardiomegaly": 3, "pleural_effusion": 11, "atelectasis": 17}.items():
        np.testing.assert_allclose(df[f"p_{lab}"], 1 / (1 + np.exp(-m * (j - 8.5) / 100)), rtol=1e-5,
                                   atol=1e-6)
    # labels the map leaves out are left out, with a warning: not filled with zeros
    assert "p_congestion" not in df and "y_congestion" not in df and "p_pneumonic_infiltrates" not in df
    assert sorted(w.split(":")[0] for w in info["warnings"]) == ["label congestion", "label pneumonic_infiltrates"]
    report = byom.audit_model(Eighteen(), manifest, task="cxr", preprocess=card)
    assert set(report.data["study"]["labels"]) == {"cardiomegaly", "pleural_effusion", "atelectasis"}
    assert any("congestion" in w and "left out" in w for w in report.warnings)


def test_named_onnx_outputs_and_a_callable_returning_probabilities(manifest, tmp_path):
    class TwoHeads(nn.Module):
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, -m], 1), (2 * m)[:, None]

    path = tmp_path / "heads.onnx"
    _export(TwoHeads(), torch.zeros(2, 1, SIZE, SIZE), path, input_names=["x"], output_names=["pair", "cardio"],
            dynamic_axes={"x": {0: "n"}, "pair": {0: "n"}, "cardio": {0: "n"}})
    card = {"input": {"size": SIZE, "scale": "unit"},
            "output": {"map": {"cardiomegaly": "cardio", "congestion": 1}}}
    df, _ = byom.predict_onnx(path, manifest, card, task="cxr")
    x, _ = load_inputs(manifest, CXR, SIZE)
    m = np.asarray(x, dtype=np.float64).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(df["p_cardiomegaly"], 1 / (1 + np.exp(-2 * m)), rtol=1e-5)
    np.testing.assert_allclose(df["p_congestion"], 1 / (1 + np.exp(m)), rtol=1e-5)

    def probabilities(xb):   # a callable (no torch) that returns probabilities: activation "none" by default
        return np.tile(1 / (1 + np.exp(-xb.mean(axis=(1, 2, 3))))[:, None], (1, 5))

    df2, _ = byom.predict_with_model(probabilities, manifest, None, task="cxr")
    x64, _ = load_inputs(manifest, CXR, CXR.input_size)   # no card: the task's size, privaudit's scaling
    z = ((np.asarray(x64, dtype=np.float64) - 0.5) / 0.25).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(df2["p_cardiomegaly"], 1 / (1 + np.exp(-z)), rtol=1e-5)
    with pytest.raises(CheckpointError, match=r"activation = \"none\" says the model gives probabilities") as e:
        byom.predict_with_model(lambda xb: np.full((len(xb), 5), 3.0), manifest, None, task="cxr")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- the card

def test_the_issues_card_loads_as_written_and_prepares_inputs(tmp_path):
    path = tmp_path / "card.toml"
    path.write_text(ISSUE_CARD)
    card = load_preprocess_card(path)
    assert (card.size, card.channels, card.scale, card.mean, card.std) == (224, 1, "mean_std", (0.5,), (0.25,))
    assert card.activation == "sigmoid" and card.map == {"cardiomegaly": 0, "pleural_effusion": 2}
    x = np.array([0.0, 0.5, 1.0], dtype=np.float32).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(prepare_inputs(x, card).ravel(), [-2.0, 0.0, 2.0])
    rgb = card_from_dict({"input": {"channels": 3, "scale": "range", "range": [-1024, 1024]}})
    y = prepare_inputs(x, rgb)
    assert y.shape == (3, 3, 1, 1) and np.all(y[:, 0] == y[:, 2])
    np.testing.assert_allclose(y[:, 1].ravel(), [-1024.0, 0.0, 1024.0])
    last = card_from_dict({"input": {"channels": 3, "layout": "channels_last", "mean": [0.1, 0.2, 0.3],
                                     "std": [1, 2, 4]}})
    z = prepare_inputs(np.full((1, 1, 2, 2), 0.5, dtype=np.float32), last)
    assert z.shape == (1, 2, 2, 3)
    np.testing.assert_allclose(z[0, 0, 0], [0.4, 0.15, 0.05], rtol=1e-6)
    softmax = card_from_dict({"output": {"activation": "softmax"}})
    sel = select_outputs({"o": np.array([[0.0, np.log(3.0)]])}, softmax, ["a", "b"])
    np.testing.assert_allclose(sel.probs, [[0.25, 0.75]])


@pytest.mark.parametrize("card, match", [
    ({"input": {"sise": 224}}, r"unknown key 'sise' in \[input\].*Did you mean 'size'"),
    ({"output": {"activaton": "sigmoid"}}, r"unknown key 'activaton'.*Did you mean 'activation'"),
    ({"input": {"scale": "zscore"}}, r"scale must be one of mean_std, range, unit; got 'zscore'"),
    ({"input": {"scale": "range"}}, r"needs \[input\] range"),
    ({"input": {"scale": "range", "range": [1024, -1024]}}, r"low < high"),
    ({"input": {"channels": 2}}, r"channels must be 1"),
    ({"input": {"channels": 3, "mean": [0.1, 0.2]}}, r"mean has 2 values for 3 channel"),
    ({"input": {"std": [0.0]}}, r"std must be positive"),
    ({"input": {"size": 0}}, r"size must be a positive"),
    ({"output": {"activation": "tanh"}}, r"activation must be one of"),
    ({"output": {"map": {"cardiomegaly": -1}}}, r"\[output.map\] cardiomegaly = -1"),
    ({"output": {"map": {"cardiomegaly": 0, "congestion": 0}}}, r"same output 0"),
])
def test_card_errors_are_one_line(card, match):
    with pytest.raises(ConfigError, match=match) as e:
        card_from_dict(card, source="card.toml")
    assert "\n" not in str(e.value) and str(e.value).startswith("card.toml: ")


def test_card_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[input\nsize = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_preprocess_card(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_preprocess_card(tmp_path / "missing.toml")


# ----------------------------------------------------------------------------------- zoo architectures

def test_rgb_weights_become_a_grey_stem_and_an_imagenet_head_starts_afresh(tmp_path):
    torch.manual_seed(2)
    rgb = create_zoo_model("torchvision:resnet18", in_channels=3, num_classes=1000, spatial_dims=2).eval()
    path = tmp_path / "imagenet_like.pt"
    torch.save(rgb.state_dict(), path)
    with pytest.warns(ModelChangedWarning, match="torchvision:resnet18 was changed"):
        zm = build_zoo_model("torchvision:resnet18", in_channels=1, num_classes=5, spatial_dims=2, init=path)
    grey = zm.model.eval()
    assert grey.conv1.in_channels == 1 and grey.fc.out_features == 5
    changed = {c["module"]: c for c in zm.changes}
    assert "summed" in changed["conv1"]["to"] and "fc" in changed and zm.init["new_head"] is True
    # summing the RGB kernels on a grey image is the RGB network on the grey image repeated three times
    x = torch.rand(2, 1, 32, 32)
    feats = nn.Sequential(*list(grey.children())[:-1])
    feats_rgb = nn.Sequential(*list(rgb.children())[:-1])
    with torch.no_grad():
        torch.testing.assert_close(feats(x), feats_rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    # old checkpoints without BatchNorm's step counter load, as torch allows; a misshapen key is one line
    from privaudit.backends.zoo import load_into

    old = {k: v for k, v in rgb.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert load_into(create_zoo_model("torchvision:resnet18", in_channels=3, num_classes=1000, spatial_dims=2),
                     old, "old.pt", "torchvision:resnet18") == []
    old["layer1.0.conv1.weight"] = old["layer1.0.conv1.weight"][:32]
    with pytest.raises(CheckpointError, match=r"old.pt: 'layer1.0.conv1.weight' has shape \[32, 64, 3, 3\] in the "
                                              r"weights but \[64, 64, 3, 3\] in torchvision:resnet18"):
        load_into(rgb, old, "old.pt", "torchvision:resnet18")
    # and weights whose keys do not fit: one line naming a few of them
    from privaudit.backends.torch_models import create_model

    own = tmp_path / "resnet9.pt"
    torch.save(create_model("resnet9-gn", in_channels=1, num_classes=5, width=4, spatial_dims=2).state_dict(), own)
    with pytest.raises(CheckpointError, match=r"do not fit torchvision:resnet18: \d+ key\(s\) missing \(conv1.weight, "
                                              r"bn1.weight, .*unexpected \(stem.0.weight") as e:
        build_zoo_model("torchvision:resnet18", in_channels=1, num_classes=5, spatial_dims=2, init=own, warn=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch, match", [
    ("torchvision:densnet121", r"unknown torchvision architecture 'densnet121'; did you mean torchvision:densenet121"),
    ("timm:resnet181", r"unknown timm architecture 'resnet181'; did you mean timm:resnet18"),
    ("monai:DenseNet12", r"unknown monai architecture 'DenseNet12'; did you mean monai:DenseNet121"),
    ("monai:densenet121", r"did you mean monai:DenseNet121"),
    ("torchvison:densenet121", r"unknown model library 'torchvison'.*Did you mean 'torchvision:densenet121'"),
])
def test_unknown_zoo_names_suggest_the_closest(arch, match):
    from privaudit.backends.zoo import check_zoo_name

    for build in (lambda: check_zoo_name(arch, spatial_dims=2),
                  lambda: create_zoo_model(arch, in_channels=1, num_classes=5, spatial_dims=2)):
        with pytest.raises(RegistryError, match=match) as e:
            build()
        assert "\n" not in str(e.value)
    check_zoo_name("timm:resnet18", spatial_dims=2)   # known names pass without building anything


def test_2d_libraries_refuse_3d_tasks_and_dp_fixes_are_recorded():
    with pytest.raises(ConfigError, match="is 2D but the task's inputs are 3D"):
        create_zoo_model("timm:resnet18", in_channels=1, num_classes=1, spatial_dims=3)
    model = create_zoo_model("timm:test_resnet", in_channels=1, num_classes=5, spatial_dims=2)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fixed, changes = make_dp_compatible(model)
    from opacus.validators import ModuleValidator

    assert ModuleValidator.validate(fixed, strict=False) == []
    assert sum("BatchNorm2d" in c["from"] and "GroupNorm" in c["to"] for c in changes) == n_bn > 0
    assert not any(getattr(m, "inplace", False) for m in fixed.modules())
    assert zoo_clipping(fixed, "hooks") == "fast" and zoo_clipping(fixed, "ew") == "ew"
    ln = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))   # the fast engine does not cover LayerNorm
    assert zoo_clipping(ln, "hooks") == "hooks"


# -------------------------------------------------------------------------------------- DP training

def _accountant_epsilon(tj: dict) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(tj["accountant"])
    acc.history = [(tj["noise_multiplier"], tj["sample_rate"], tj["steps"])]
    return acc.get_epsilon(delta=tj["delta"])


@pytest.mark.parametrize("task, arch", [("cxr", "timm:test_resnet"), ("pdac", "monai:resnet10")])
def test_zoo_models_train_one_dp_epoch_with_the_accountants_epsilon(task, arch, tmp_path):
    from privaudit.backends.opacus_backend import OpacusBackend
    from privaudit.config import DPConfig, TrainConfig

    torch.set_num_threads(1)
    spec = create_task(task)
    if task == "cxr":
        from privaudit.data.synth_cxr import synthesize_cxr

        mpath = synthesize_cxr(tmp_path / "data", n=24, image_size=SIZE, seed=1)
        size = SIZE
    else:
        from privaudit.data.synth_ct import synthesize_ct

        mpath = synthesize_ct(tmp_path / "data", n=16, image_size=16, seed=1)
        size = 16
    manifest = load_data(mpath, task=spec)
    cfg = TrainConfig(task=task, arch=arch, epochs=1, batch_size=4, image_size=size,
                      dp=DPConfig(epsilon=None, noise_multiplier=1.0, delta=1e-3))
    with pytest.warns(ModelChangedWarning, match="was changed"):
        tj = OpacusBackend().train(manifest, cfg, tmp_path / "run", quiet=True)
    assert tj["dp"] is True and tj["steps"] >= 1
    assert tj["epsilon"] == pytest.approx(_accountant_epsilon(tj), rel=1e-9)
    changes = tj["model_changes"]["changes"]
    assert any(c["kind"] == "batchnorm" and "BatchNorm" in c["from"] and "GroupNorm" in c["to"] for c in changes)
    assert "BatchNorm layer(s) replaced by GroupNorm" in tj["warnings"][0]
    assert tj["grad_sample_mode"] == "fast"   # the fast engine covers these networks once BatchNorm is gone
    saved = json.loads((tmp_path / "run" / "train.json").read_text())
    assert saved["model_changes"] == json.loads(json.dumps(tj["model_changes"]))
    # privaudit's DP-trained zoo weights are recognised (GroupNorm) and predict what the run predicted
    df, info = byom.predict_zoo_checkpoint(tmp_path / "run" / "model" / "weights.pt", manifest, task=task, arch=arch,
                                           image_size=size)
    written = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert np.abs(_probs(df, manifest.labels) - _probs(written, manifest.labels)).max() < 1e-5
    assert info["model_changes"]["dp_compatible"] is True
    if task == "cxr":   # the audit repeats training's warning that the network was changed
        from privaudit.audit import run_audit
        from privaudit.config import AuditConfig

        report = run_audit({"private": written}, runs={"private": tj}, config=AuditConfig(n_boot=20), task=task)
        assert any(w.startswith("private: timm:test_resnet was changed") for w in report.warnings)


def test_privaudits_own_batchnorm_model_stays_refused_for_dp(tmp_path):
    from privaudit.backends.opacus_backend import OpacusBackend
    from privaudit.config import DPConfig, TrainConfig
    from privaudit.data.synth_cxr import synthesize_cxr
    from privaudit.errors import DPError

    manifest = load_data(synthesize_cxr(tmp_path / "data", n=24, image_size=SIZE, seed=1), task=CXR)
    cfg = TrainConfig(arch="resnet9-bn", epochs=1, batch_size=4, image_size=SIZE, width=4,
                      dp=DPConfig(epsilon=None, noise_multiplier=1.0, delta=1e-3))
    with pytest.raises(DPError, match="BatchNorm"):
        OpacusBackend().train(manifest, cfg, tmp_path / "run", quiet=True)


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("missing", ["onnxruntime", "timm", "safetensors"])
def test_a_missing_extra_gives_the_install_line(missing, manifest, tmp_path, monkeypatch):
    from privaudit.backends.zoo import create_zoo_model, load_weights
    from privaudit.errors import MissingDependencyError

    path = _tiny_onnx(tmp_path / "tiny.onnx")
    (tmp_path / "w.safetensors").write_bytes(b"")
    import sys

    for mod in [m for m in sys.modules if m == missing or m.startswith(missing + ".")] + [missing]:
        monkeypatch.setitem(sys.modules, mod, None)   # importing it now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'install it with pip install "privaudit\[models\]"'):
        if missing == "onnxruntime":
            byom.predict_onnx(path, manifest, {"input": {"size": SIZE}}, task="cxr")
        elif missing == "timm":
            create_zoo_model("timm:resnet18", in_channels=1, num_classes=5, spatial_dims=2)
        else:
            load_weights(tmp_path / "w.safetensors")


def _tiny_onnx(path: Path, size: int = SIZE) -> Path:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 5)).eval()
    _export(model, torch.zeros(1, 1, size, size), path, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _edit_onnx(src: Path, dst: Path, edit) -> Path:
    import onnx

    m = onnx.load(str(src))
    edit(m, onnx)
    onnx.save(m, str(dst))
    return dst


def _outside_data(m, onnx):
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../secret.bin")


def _custom_domain(m, onnx):
    m.graph.node[0].domain = "com.example.native"
    m.opset_import.add(domain="com.example.native", version=1)


@pytest.mark.parametrize("case, error, match", [
    ("shape", CheckpointError, r"input 'image' has shape \['batch', 1, 32, 32\] but the preprocessing .* gives "
                               r"\['batch', 1, 64, 64\]; set \[input\] size"),
    ("missing_output", ConfigError, r"\[output.map\] names output 'Effusion', which .* does not have"),
    ("map_index", ConfigError, r"\[output.map\] points at output 7, but .* has 5 columns"),
    ("corrupt", CheckpointError, r"not a readable ONNX file"),
    ("outside", CheckpointError, r"external data '\.\./secret\.bin' outside the ONNX file's folder"),
    ("custom_op", CheckpointError, r"custom domain 'com\.example\.native'"),
    ("oversized", CheckpointError, r"over privaudit's limit"),
    ("zoo_keys", CheckpointError, r"do not fit timm:resnet18: \d+ key\(s\) missing"),
])
def test_bad_input_gives_one_line_and_writes_nothing(case, error, match, manifest, tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    onnx_path = _tiny_onnx(d / "tiny.onnx")
    model, preprocess, arch = onnx_path, {"input": {"size": SIZE}}, None
    if case == "shape":
        preprocess = {"input": {"size": 64}}
    elif case == "missing_output":
        preprocess = {"input": {"size": SIZE}, "output": {"map": {"pleural_effusion": "Effusion"}}}
    elif case == "map_index":
        preprocess = {"input": {"size": SIZE}, "output": {"map": {"cardiomegaly": 7}}}
    elif case == "corrupt":
        model = d / "corrupt.onnx"
        model.write_bytes(b"\x08\x07garbage" + bytes(range(256)))
    elif case == "outside":
        (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
        model = _edit_onnx(onnx_path, d / "outside.onnx", _outside_data)
    elif case == "custom_op":
        model = _edit_onnx(onnx_path, d / "custom.onnx", _custom_domain)
    elif case == "oversized":
        monkeypatch.setattr(onnx_predict, "MAX_ONNX_BYTES", 100)
    elif case == "zoo_keys":
        model, arch = d / "w.pt", "timm:resnet18"
        torch.save(nn.Linear(3, 5).state_dict(), model)
    out = tmp_path / "out"
    with pytest.raises(error, match=match) as e:
        byom.audit_model(model, manifest, task="cxr", preprocess=preprocess, arch=arch, out=out)
    assert isinstance(e.value, PrivauditError) and "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


# ------------------------------------------------------------------------------------------ the command line

def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output + (res.stderr or "")
    err = res.stderr.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_cli_audits_an_onnx_file_with_a_card_as_the_module_predicts(manifest, densenet, reference, tmp_path):
    import privaudit
    from conftest import invoke

    _, d = densenet
    card = tmp_path / "card.toml"
    card.write_text(f"[input]\nsize = {SIZE}\n[output.map]\ncardiomegaly = 0\npleural_effusion = 2\n")
    out = tmp_path / "audit"
    res = invoke("audit", "--checkpoint", d / "densenet.onnx", "--data", manifest.source, "--preprocess", card,
                 "--out", out, "--n-boot", "20")
    assert res.exit_code == 0, res.output + (res.stderr or "")
    written = pd.read_csv(out / "predictions.csv")
    assert list(written["sample_id"]) == list(manifest.frame["sample_id"])
    assert np.abs(_probs(written, ["cardiomegaly", "pleural_effusion"]) - reference[:, [0, 2]]).max() < 1e-5
    assert not any(c.endswith("congestion") for c in written.columns)   # left out, not filled
    doc = json.loads((out / "audit.json").read_text())
    assert doc["study"]["labels"] == ["cardiomegaly", "pleural_effusion"]
    assert any(w.startswith("model: label congestion") and "left out" in w for w in doc["warnings"])
    assert any("trained elsewhere" in w for w in doc["warnings"])
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint"]["architecture"] == "onnx" and config["checkpoint"]["backend"] == "onnxruntime"
    assert config["command"].startswith("privaudit")   # in-process, sys.argv is pytest's
    assert (out / "report.html").is_file()
    # the Python API takes the same path
    api_out = tmp_path / "api"
    report = privaudit.audit(checkpoint=d / "densenet.onnx", data=manifest.source, preprocess=card, out=api_out,
                             n_boot=20)
    pd.testing.assert_frame_equal(pd.read_csv(api_out / "predictions.csv"), written)
    assert report.data["study"]["labels"] == doc["study"]["labels"]


@pytest.mark.parametrize("command", ["train", "train-and-audit", "sweep", "audit"])
def test_cli_refuses_an_unknown_library_name_before_reading_data(command, tmp_path):
    from conftest import invoke

    out = tmp_path / "out"
    if command == "audit":
        args = ["audit", "--checkpoint", tmp_path / "w.pt", "--data", tmp_path / "manifest.csv"]
    else:
        args = [command, "cxr", "--n-samples", "20", "--image-size", "16"]
    err = _one_line_error(invoke(*args, "--arch", "timm:resnt18", "--out", out))
    assert "unknown timm architecture 'resnt18'; did you mean timm:resnet18" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_preprocess_errors_are_one_line_and_write_nothing(manifest, tmp_path):
    from conftest import invoke

    onnx_path = _tiny_onnx(tmp_path / "tiny.onnx")
    card = tmp_path / "card.toml"
    card.write_text(f'[input]\nsize = {SIZE}\n[output.map]\npleural_effusion = "Effusion"\n')
    out = tmp_path / "out"
    err = _one_line_error(invoke("audit", "--checkpoint", onnx_path, "--data", manifest.source, "--preprocess",
                                 card, "--out", out, "--n-boot", "20"))
    assert "[output.map] names output 'Effusion'" in err   # the card's table names survive the console's markup
    err = _one_line_error(invoke("audit", "--predictions", tmp_path / "p.csv", "--preprocess", card, "--out", out))
    assert "--preprocess describes a model trained elsewhere; give it with --checkpoint" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_trains_a_timm_model_with_dp_and_records_the_batchnorm_replacement(tmp_path):
    from conftest import invoke

    torch.set_num_threads(1)
    out = tmp_path / "run"
    res = invoke("train", "cxr", "--arch", "timm:test_resnet", "--n-samples", "40", "--image-size", str(SIZE),
                 "--epochs", "1", "--batch-size", "8", "--noise-multiplier", "1.0", "--delta", "1e-3", "--out", out,
                 "--quiet")
    assert res.exit_code == 0, res.output + (res.stderr or "")
    tj = json.loads((out / "train.json").read_text())
    assert tj["dp"] is True and tj["architecture"] == "timm:test_resnet"
    assert tj["epsilon"] == pytest.approx(_accountant_epsilon(tj), rel=1e-9)
    assert any(c["kind"] == "batchnorm" and "GroupNorm" in c["to"] for c in tj["model_changes"]["changes"])
    assert "warning: timm:test_resnet was changed" in res.stderr and "ModelChangedWarning" not in res.stderr
