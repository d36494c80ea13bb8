"""The tf backend (TensorFlow + TF-Privacy): the same run-directory contract as opacus, checked for parity.

Skipped as a whole where TensorFlow is not installed (``make test`` installs it), except the test that the
missing install is reported in one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, invoke
from privaudit.config import DPConfig, TrainConfig
from privaudit.data.manifest import load_manifest
from privaudit.errors import CheckpointError, ConfigError
from privaudit.predictions import validate_predictions
from privaudit.tasks import create_task

CXR = create_task("cxr")
needs_tf = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("tensorflow", "tf_keras", "tensorflow_privacy")),
    reason="TensorFlow is not installed: make install-tf (the tf backend is an extra)")


def _run_cli(*args, env=None, pre="") -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, so that the TensorFlow import state of this process does not matter."""
    code = f"{pre}\nimport sys\nfrom privaudit.cli import main\nsys.argv = ['privaudit', *{[str(a) for a in args]!r}]\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_missing_tensorflow_gives_one_line_with_the_install_command(cohort, tmp_path):
    # an import of None raises ModuleNotFoundError: this interpreter behaves as if TensorFlow were not installed
    res = _run_cli("train", "cxr", "--backend", "tf", "--data", cohort, "--out", tmp_path / "run", "--quiet",
                   pre="import sys; sys.modules['tensorflow'] = None")
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "'tensorflow'" in lines[0] and "--no-deps tf-keras==2.21.0" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


# ---- everything below needs TensorFlow ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tf():
    if needs_tf.args[0]:
        pytest.skip(needs_tf.kwargs["reason"])
    from privaudit.backends._tf_env import import_tf

    return import_tf()


@needs_tf
def test_keras_models_compute_the_torch_function_in_2d_and_3d(tf):
    import torch

    from privaudit.backends.tf_models import create_model, torch_weight_map
    from privaudit.backends.torch_models import create_model as create_torch

    for arch, dims, size in (("resnet9-gn", 2, 32), ("resnet9-gn", 3, 16), ("cnn3d-gn", 3, 16)):
        torch.manual_seed(dims)
        tm = create_torch(arch, in_channels=1, num_classes=3, width=4, spatial_dims=dims).eval()
        km = create_model(arch, in_channels=1, num_classes=3, width=4, spatial_dims=dims, size=size)
        assert km.count_params() == sum(p.numel() for p in tm.parameters())
        state, wmap = tm.state_dict(), torch_weight_map(km)
        assert sorted(k for k, _ in wmap.values()) == sorted(state)  # every torch tensor has its Keras twin
        for w in km.weights:
            key, kind = wmap[w.name]
            t = state[key].numpy()
            w.assign(np.transpose(t, list(range(2, t.ndim)) + [1, 0]) if kind == "conv" else t.T if kind == "dense" else t)
        x = np.random.default_rng(dims).normal(size=(2, 1) + (size,) * dims).astype(np.float32)
        want = tm(torch.from_numpy(x)).detach().numpy()
        got = km(np.moveaxis(x, 1, -1), training=False).numpy()
        np.testing.assert_allclose(got, want, atol=2e-5)


@needs_tf
def test_masked_bce_matches_the_opacus_backend(tf):
    import torch

    from privaudit.backends.opacus_backend import PIXEL_MEAN, PIXEL_STD, masked_bce as torch_bce
    from privaudit.backends.tf_backend import PIXEL_MEAN as M, PIXEL_STD as S, masked_bce

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 2, (6, 4)).astype(np.float32)
    y[rng.random((6, 4)) < 0.3] = np.nan
    y[0] = np.nan  # a sample without any known label: loss 0
    np.testing.assert_allclose(masked_bce(tf.constant(logits), tf.constant(y)).numpy(),
                               torch_bce(torch.from_numpy(logits), torch.from_numpy(y)).numpy(), rtol=1e-6)
    assert (M, S) == (PIXEL_MEAN, PIXEL_STD)


def _toy(tf, seed=0):
    from privaudit.backends._tf_env import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    return keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(8, activation="mish")(inp)))


@needs_tf
def test_dp_step_clips_every_example_to_c_and_divides_by_the_expected_batch(tf):
    from privaudit.backends.tf_backend import DPStep, make_optimizer, masked_bce

    model = _toy(tf)
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(7, 6)) * np.array([[10], [0.01], [5], [1], [20], [0.1], [3]])).astype(np.float32)
    y = rng.integers(0, 2, (7, 3)).astype(np.float32)
    y[2, 1] = np.nan
    clip, expected = 0.5, 10.0
    step = DPStep(model, make_optimizer(1e-3), l2_norm_clip=clip, noise_multiplier=0.0, expected_batch_size=expected,
                  physical_batch_size=3)  # 3 physical batches for 7 examples
    # naive reference: each example's gradient alone, clipped to C by hand
    ref, norms = None, []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = masked_bce(model(x[i:i + 1]), tf.constant(y[i:i + 1]))[0]
        g = [t.numpy() for t in tape.gradient(loss, model.trainable_variables)]
        norm = np.sqrt(sum((t ** 2).sum() for t in g))
        norms.append(norm)
        g = [t * min(1.0, clip / norm) for t in g]
        ref = g if ref is None else [a + b for a, b in zip(ref, g)]
        # one example through the step's clipping: its contribution is at most C
        one = step.noised_mean(x[i:i + 1], y[i:i + 1])
        assert np.sqrt(sum((t.numpy() ** 2).sum() for t in one)) * expected <= clip * (1 + 1e-5)
    assert max(norms) > 2 * clip and min(norms) < clip, "the test needs examples on both sides of C"
    got = step.noised_mean(x, y)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.numpy() * expected, b, rtol=1e-4, atol=1e-6)  # sum of clipped / expected B


@needs_tf
def test_dp_noise_has_sigma_c_over_expected_batch_and_an_empty_batch_still_steps(tf):
    from privaudit.backends.tf_backend import DPStep, make_optimizer

    model = _toy(tf)
    before = [v.numpy().copy() for v in model.trainable_variables]
    step = DPStep(model, make_optimizer(1e-2), l2_norm_clip=2.0, noise_multiplier=1.5, expected_batch_size=4.0,
                  physical_batch_size=4)
    noise = np.concatenate([t.numpy().ravel() for t in step.noised_mean(np.zeros((0, 6), np.float32),
                                                                         np.zeros((0, 3), np.float32))])
    assert noise.std() == pytest.approx(1.5 * 2.0 / 4.0, rel=0.2) and abs(noise.mean()) < 0.2  # 83 parameters
    assert step(np.zeros((0, 6), np.float32), np.zeros((0, 3), np.float32)) is None  # no loss for an empty batch
    assert step.events == [pytest.approx(1.5)]  # ... but a noised step, reported by the query for accounting
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))


@needs_tf
def test_poisson_batches_vary_in_size_with_mean_qn_and_are_reproducible(tf):
    from privaudit.backends.tf_backend import poisson_batches

    x = np.arange(200, dtype=np.float32).reshape(200, 1)
    y = np.zeros((200, 1), np.float32)
    sizes = [len(b[0]) for b in poisson_batches(x, y, sample_rate=0.05, first_step=0, steps=60, seed=3)]
    assert len(sizes) == 60 and len(set(sizes)) > 3
    assert np.mean(sizes) == pytest.approx(10, rel=0.2)
    again = [b[0].numpy().ravel().tolist() for b in poisson_batches(x, y, sample_rate=0.05, first_step=5, steps=2, seed=3)]
    first = [b[0].numpy().ravel().tolist() for b in poisson_batches(x, y, sample_rate=0.05, first_step=0, steps=7, seed=3)]
    assert again == first[5:7] and first[0] != first[1]
    empty = [len(b[0]) for b in poisson_batches(x[:3], y[:3], sample_rate=0.05, first_step=0, steps=20, seed=0)]
    assert 0 in empty  # an empty batch is drawn, and stepped on (see the test above)


# The accountants' tolerances. RDP: both are upper bounds minimised over a grid of orders, which differ between the
# libraries (Opacus: 1.1..10.9 by 0.1 and 12..63), so they agree to about 0.2%; allow 1%. PLD vs PRV: both
# are upper bounds, Opacus' PRV within its eps_error=0.01 (absolute), dp_accounting's PLD within its
# discretisation (1e-3 per step's loss, composed); allow 0.01 + 1%.
@needs_tf
@pytest.mark.parametrize("sigma,q,steps,delta", [(1.0, 0.01, 1000, 1e-5), (0.6, 0.03, 235, 2e-4), (2.0, 0.3, 8, 1e-3)])
def test_epsilon_matches_the_opacus_accountant_of_the_same_kind(tf, sigma, q, steps, delta):
    from privaudit.audit.accounting import opacus_epsilon
    from privaudit.backends.tf_backend import ACCOUNTANTS, compute_epsilon

    args = dict(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    rdp, rdp_opacus = compute_epsilon("rdp", **args), opacus_epsilon("rdp", **args)
    assert rdp == pytest.approx(rdp_opacus, rel=0.01)
    pld, prv = compute_epsilon("prv", **args), opacus_epsilon("prv", **args)
    assert abs(pld - prv) <= 0.01 + 0.01 * prv
    assert ACCOUNTANTS == {"prv": "dp_accounting_pld", "rdp": "dp_accounting_rdp"}


@needs_tf
def test_noise_calibration_meets_the_target_epsilon_and_gdp_is_refused(tf):
    from privaudit.backends.tf_backend import compute_epsilon, noise_for_epsilon

    args = dict(sample_rate=0.05, steps=40, delta=1e-4)
    for acc in ("rdp", "prv"):
        sigma = noise_for_epsilon(acc, epsilon=2.0, **args)
        assert 1.97 <= compute_epsilon(acc, noise_multiplier=sigma, **args) <= 2.0
    with pytest.raises(ConfigError, match="gdp.*not available in the tf backend"):
        noise_for_epsilon("gdp", epsilon=2.0, **args)


def _tf_train(cohort: Path, out: Path, **kw) -> dict:
    from privaudit.backends import create_backend

    dp = DPConfig(**{"epsilon": None, "noise_multiplier": 1.0, "accountant": "rdp", **kw.pop("dp", {})})
    cfg = TrainConfig(**{"backend": "tf", "width": 4, "image_size": 32, "batch_size": 8, "physical_batch_size": 8,
                         "epochs": 1, "dp": dp, **kw})
    return create_backend("tf").train(load_manifest(cohort, task=CXR), cfg, out, quiet=True)


@needs_tf
@pytest.mark.parametrize("batch,needle", [(500, "batch_size 500 is larger than the training set"),
                                          (None, "sample rate 1 .* must be below 1")])
def test_batch_and_sample_rate_refusals_match_opacus(tf, cohort, tmp_path, batch, needle):
    frame = load_manifest(cohort, task=CXR).frame
    n_patients = frame.loc[frame["split"] == "train", "patient_id"].nunique()   # the unit: patients, as opacus
    with pytest.raises(ConfigError, match=needle):
        _tf_train(cohort, tmp_path / "run", batch_size=batch or n_patients, physical_batch_size=16)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tf_study(tmp_path_factory, tf) -> Path:
    """A tiny train-and-audit study with --backend tf (private + non-private), through the CLI."""
    out = tmp_path_factory.mktemp("tfstudy") / "study"
    # physical batch 32: a patient of this cohort has 14 training images, and a patient shares one physical batch
    res = invoke("train-and-audit", "cxr", "--backend", "tf", *TINY, "--n-samples", "120", "--physical-batch-size", "32",
                 "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    return out


@needs_tf
def test_tf_study_writes_the_full_contract_with_the_opacus_schemas_and_its_keras_model_audits(tf_study, tmp_path):
    from privaudit.backends import create_backend
    from privaudit.backends.tf_backend import compute_epsilon, load_keras_model, predict_arrays, _prepare

    for f in ("audit.json", "report.html", "private/model/model.keras", "private/model/model.json",
              "private/train.json", "private/predictions.csv", "private/config.json", "private/audit.json",
              "non_private/model/model.keras", "non_private/train.json", "non_private/predictions.csv"):
        assert (tf_study / f).is_file(), f
    doc = json.loads((tf_study / "audit.json").read_text())
    assert set(doc["models"]) == {"private", "non_private"} and "private vs non_private" in doc["comparisons"]
    acc = doc["models"]["private"]["privacy"]["accountant"]
    assert acc["accountant"] == "dp_accounting_pld" and acc["flags"] == []
    assert acc["epsilon"] == pytest.approx(acc["cross_checks"]["dp_accounting_pld"], rel=1e-6)
    assert acc["epsilon"] == pytest.approx(acc["cross_checks"]["prv"], abs=0.01 + 0.01 * acc["cross_checks"]["prv"])

    # the same schemas as an opacus run on the same cohort and settings
    manifest_path = tf_study / "data" / "manifest.csv"
    cfg = TrainConfig(width=4, image_size=32, batch_size=16, epochs=1,
                      dp=DPConfig(epsilon=None, noise_multiplier=1.0))
    opacus = create_backend("opacus").train(load_manifest(manifest_path, task=CXR), cfg, tmp_path / "op", quiet=True)
    tj = json.loads((tf_study / "private" / "train.json").read_text())
    assert set(opacus) <= set(tj) and set(opacus["privacy"]) <= set(tj["privacy"])
    assert tj["poisson_sampling"] is True and tj["backend"] == "tf" and tj["steps"] == tj["history"][-1]["steps"]
    assert tj["epsilon"] <= 8.0 and tj["epsilon"] == pytest.approx(compute_epsilon(
        "prv", noise_multiplier=tj["noise_multiplier"], sample_rate=tj["sample_rate"], steps=tj["steps"],
        delta=tj["delta"]))
    ours, theirs = pd.read_csv(tf_study / "private" / "predictions.csv"), pd.read_csv(tmp_path / "op" / "predictions.csv")
    assert list(ours.columns) == list(theirs.columns)
    assert (ours["sample_id"] == theirs["sample_id"]).all() and (ours["member"] == theirs["member"]).all()
    validate_predictions(ours, "tf"), validate_predictions(theirs, "opacus")
    mj = json.loads((tf_study / "private" / "model" / "model.json").read_text())
    assert set(json.loads((tmp_path / "op" / "model" / "model.json").read_text())) <= set(mj)

    # model.keras loads with safe_mode=True and reproduces predictions.csv
    model = load_keras_model(tf_study / "private" / "model" / "model.keras")
    manifest = load_manifest(manifest_path, task=CXR)
    from privaudit.data.inputs import load_inputs

    x, y = load_inputs(manifest, CXR, 32)
    probs, _ = predict_arrays(model, _prepare(x), y)
    np.testing.assert_allclose(probs[:, 0], ours["p_cardiomegaly"].to_numpy(), atol=1e-5)

    # (in this test rather than its own, so that pytest-xdist's workers do not each train the study)
    # audit --checkpoint model.keras: the backend is picked by the suffix, and predicts as the run did
    out = tmp_path / "audit"
    res = invoke("audit", "--checkpoint", tf_study / "non_private" / "model" / "model.keras", "--data",
                 tf_study / "data" / "manifest.csv", "--out", out, "--n-boot", "50")
    assert res.exit_code == 0, res.output + (res.stderr or "")
    doc = json.loads((out / "audit.json").read_text())
    assert doc["models"]["model"]["run"]["backend"] == "tf"
    mine = pd.read_csv(out / "predictions.csv")
    trained = pd.read_csv(tf_study / "non_private" / "predictions.csv")
    np.testing.assert_allclose(mine["p_atelectasis"], trained["p_atelectasis"], atol=1e-5)


def _save(model, path: Path) -> Path:
    model.save(path)
    return path


@needs_tf
def test_keras_checkpoints_with_code_or_the_wrong_outputs_are_refused(tf, cohort, tmp_path):
    from privaudit.backends._tf_env import import_keras

    keras = import_keras()
    inp = keras.Input((32, 32, 1))
    flat = keras.layers.Flatten()(inp)
    lam = keras.layers.Lambda(lambda t: t * 1.0, name="sneaky")(flat)
    evil = _save(keras.Model(inp, keras.layers.Dense(5)(lam)), tmp_path / "evil.keras")
    res = invoke("audit", "--checkpoint", evil, "--data", cohort, "--out", tmp_path / "a1")
    assert res.exit_code == 2 and "Lambda" in res.stderr and "'sneaky'" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "a1").exists()

    three = _save(keras.Model(inp, keras.layers.Dense(3)(flat)), tmp_path / "three.keras")
    res = invoke("audit", "--checkpoint", three, "--data", cohort, "--out", tmp_path / "a2")
    assert res.exit_code == 2 and "3 outputs but the data has 5 labels" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "a2").exists()

    # a module outside Keras named in the config is refused before anything is imported
    cfg_path = tmp_path / "foreign.keras"
    with zipfile.ZipFile(three) as src, zipfile.ZipFile(cfg_path, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "config.json":
                cfg = json.loads(data)
                cfg["config"]["layers"][-1]["module"] = "os"
                data = json.dumps(cfg).encode()
            dst.writestr(item, data)
    from privaudit.backends.tf_backend import load_keras_model

    with pytest.raises(CheckpointError, match="module 'os'"):
        load_keras_model(cfg_path)
    (tmp_path / "weights.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CheckpointError, match="reads Keras' .keras files only"):
        load_keras_model(tmp_path / "weights.h5")


@needs_tf
def test_keras_3_behind_tf_keras_is_one_line(cohort, tmp_path):
    res = _run_cli("train", "cxr", "--backend", "tf", "--data", cohort, "--out", tmp_path / "run", "--quiet",
                   env={"TF_USE_LEGACY_KERAS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert res.returncode == 2, res.stderr
    line = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "TF_USE_LEGACY_KERAS=1" in line[0] and "TF_USE_LEGACY_KERAS=0" in line[0]
