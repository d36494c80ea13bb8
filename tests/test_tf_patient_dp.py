"""Patient-level DP-SGD on the tf backend (TensorFlow + TF-Privacy).

Oracle: on the same weights, in float64 with noise 0, the tf backend's per-patient clipped sum (per-example
gradients summed by patient, each patient's sum clipped to C by TF-Privacy's GaussianSumQuery, summed) equals
the opacus backend's (hooks mode and the fast engine) to 1e-5, for the default CXR model with patients of 1 to
6 images scattered through the batch, about half of them above C. Then: the tf.data pipeline draws each patient
with probability q (chi-square) with all its images in one physical batch, and the same patients as the opacus
backend's sampler at the same seed; the noise is sigma C over the expected number of patients, also for an
empty draw; a run's epsilon is the accountant's at the patient rate, and its train.json has the opacus
backend's records; and one CLI run.

Skipped where TensorFlow is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import types

import numpy as np
import pandas as pd
import pytest

from privaudit.config import DPConfig, TrainConfig, default_delta
from privaudit.data.manifest import load_manifest
from privaudit.tasks import create_task

CXR = create_task("cxr")
SIZES = [1, 2, 3, 4, 5, 6, 3, 1]        # images per patient: 1 to 6, 25 images in all
needs_tf = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("tensorflow", "tf_keras", "tensorflow_privacy")),
    reason="TensorFlow is not installed: make install-tf (the tf backend is an extra)")
pytestmark = needs_tf


@pytest.fixture(scope="module")
def tf():
    from privaudit.backends._tf_env import import_tf

    return import_tf()


# ---- the per-patient clipped sum, against the opacus backend on the same weights ---------------------------------
def _torch_clipped_sum(model, x, y, index, c, mode):
    """The opacus backend's noise-free per-patient clipped sum (its forward_backward with units, then the
    optimizer's clipping step), by parameter name."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from privaudit.backends.fastdp import FastDPOptimizer, FastGradSampleModule, Units, forward_backward
    from privaudit.backends.opacus_backend import masked_bce

    units = Units(index, int(index.max()) + 1)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    if mode == "hooks":
        gsm = GradSampleModule(model)
        opt = DPOptimizer(sgd, noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=units.count)
    else:
        gsm = FastGradSampleModule(model)
        opt = FastDPOptimizer(sgd, grad_sample_module=gsm, noise_multiplier=0.0, max_grad_norm=c,
                              expected_batch_size=units.count)
    forward_backward(gsm, x, y, masked_bce, engine=types.SimpleNamespace(grad_sample_mode=mode), units=units)
    opt.clip_and_accumulate()
    out = {name: p.summed_grad.detach().numpy().copy() for name, p in model.named_parameters()}
    return out


def _patient_norms(model, x, y, index):
    """Each patient's gradient norm (its images' summed loss), by one backward pass per patient."""
    from privaudit.backends.opacus_backend import masked_bce

    norms = []
    for u in range(int(index.max()) + 1):
        model.zero_grad()
        masked_bce(model(x[index == u]), y[index == u]).sum().backward()
        norms.append(math.sqrt(sum(float((p.grad ** 2).sum()) for p in model.parameters())))
    model.zero_grad()
    return np.array(norms)


def _keras_twin(tm, size):
    """The Keras resnet9-gn in float64 holding the torch model's weights, and its weight map."""
    from privaudit.backends._tf_env import import_keras
    from privaudit.backends.tf_models import create_model, torch_weight_map

    keras = import_keras()
    keras.backend.set_floatx("float64")
    try:
        km = create_model("resnet9-gn", in_channels=1, num_classes=3, width=4, spatial_dims=2, size=size)
    finally:
        keras.backend.set_floatx("float32")
    state, wmap = tm.state_dict(), torch_weight_map(km)
    for w in km.weights:
        key, kind = wmap[w.name]
        w.assign(_to_keras(state[key].numpy(), kind))
    return km, wmap


def _to_keras(t, kind):
    return np.transpose(t, list(range(2, t.ndim)) + [1, 0]) if kind == "conv" else t.T if kind == "dense" else t


def test_per_patient_clipped_sum_equals_the_opacus_backend_on_the_same_weights(tf):
    import copy

    import torch

    from privaudit.backends.tf_backend import PatientDPStep, make_optimizer
    from privaudit.backends.torch_models import create_model

    size = 16
    torch.manual_seed(1)
    tm = create_model("resnet9-gn", in_channels=1, num_classes=3, width=4, spatial_dims=2).double()
    g = torch.Generator().manual_seed(2)
    index = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
    index = index[torch.randperm(len(index), generator=g)]          # a patient's images scattered in the batch
    x = torch.randn(len(index), 1, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (len(index), 3), generator=g).double()
    y[torch.rand(y.shape, generator=g) < 0.2] = float("nan")        # unknown labels, masked out of the loss
    norms = _patient_norms(tm, x, y, index)
    s = np.sort(norms)
    c = float(s[len(s) // 2 - 1: len(s) // 2 + 1].mean())            # half of the patients above C, half below
    assert (norms > c).sum() == len(norms) // 2

    km, wmap = _keras_twin(tm, size)
    step = PatientDPStep(km, make_optimizer(1e-3), l2_norm_clip=c, noise_multiplier=0.0,
                         expected_batch_size=float(len(SIZES)))
    xk = np.moveaxis(x.numpy(), 1, -1)
    got, loss = step.unit_clipped_sum(xk, y.numpy(), tf.constant(index.numpy(), tf.int32),
                                      tf.constant(len(SIZES), tf.int32))
    got = {v.name: t.numpy() for v, t in zip(km.trainable_variables, got)}
    assert got[km.trainable_variables[0].name].dtype == np.float64

    from privaudit.backends.opacus_backend import masked_bce

    assert float(loss) == pytest.approx(float(masked_bce(tm(x), y).sum().detach()), rel=1e-9)
    for mode in ("hooks", "fast"):
        want = _torch_clipped_sum(copy.deepcopy(tm), x, y, index, c, mode)
        for name, t in got.items():
            key, kind = wmap[name]
            w = _to_keras(want[key], kind)
            err, scale = np.linalg.norm(t - w), np.linalg.norm(w)
            assert err <= 1e-5 * scale + 1e-12, f"{mode}: {name} differs by {err:.3g} (norm {scale:.3g})"
    # the noised mean divides that sum by the expected number of patients
    mean = step.noised_mean(xk, y.numpy(), tf.constant(index.numpy(), tf.int32), tf.constant(len(SIZES), tf.int32))
    v0 = km.trainable_variables[0].name
    np.testing.assert_allclose(mean[0].numpy() * len(SIZES), got[v0], rtol=1e-9, atol=1e-15)
    # clipping each image on its own (image-level DP) is a different sum: the test can tell them apart
    image = _torch_clipped_sum(copy.deepcopy(tm), x, y, torch.arange(len(x)), c, "hooks")
    key, kind = wmap[v0]
    assert np.linalg.norm(_to_keras(image[key], kind) - got[v0]) > 1e-3 * np.linalg.norm(got[v0])


def test_patient_noise_is_sigma_c_over_the_expected_patients_and_an_empty_draw_steps(tf):
    from privaudit.backends._tf_env import import_keras
    from privaudit.backends.tf_backend import PatientDPStep, make_optimizer

    keras = import_keras()
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Dense(40, activation="mish")(inp)))
    before = [v.numpy().copy() for v in model.trainable_variables]
    step = PatientDPStep(model, make_optimizer(1e-2), l2_norm_clip=2.0, noise_multiplier=1.5,
                         expected_batch_size=4.0)
    empty = (np.zeros((0, 6), np.float32), np.zeros((0, 3), np.float32), np.zeros(0, np.int32), np.int32(0))
    noise = np.concatenate([t.numpy().ravel() for t in step.noised_mean(*empty)])   # 403 parameters
    assert noise.std() == pytest.approx(1.5 * 2.0 / 4.0, rel=0.1) and abs(noise.mean()) < 0.1
    assert step(*empty, last=True) is None and step.events == [pytest.approx(1.5)]
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))
    # a step of two physical batches applies once, after the last; its loss is the mean over its images
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    y = np.ones((5, 3), np.float32)
    assert step(x[:2], y[:2], np.array([0, 0], np.int32), np.int32(1), last=False) is None
    assert step.events == [pytest.approx(1.5)]
    loss = step(x[2:], y[2:], np.array([0, 1, 1], np.int32), np.int32(2), last=True)
    assert len(step.events) == 2 and loss > 0


# ---- sampling in the tf.data pipeline ---------------------------------------------------------------------------
def test_pipeline_draws_each_patient_with_probability_q_with_all_its_images_as_opacus_does(tf):
    from scipy import stats

    from privaudit.backends._units import PatientSampler
    from privaudit.backends.tf_backend import patient_batches

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 7, size=40)                        # 40 patients of 1 to 6 images
    units = rng.permutation(np.repeat(np.arange(40), sizes))   # dataset rows in any order
    x = np.arange(len(units), dtype=np.float32)[:, None]       # each row holds its own index
    y = np.zeros((len(units), 1), np.float32)
    q, steps, physical = 0.2, 1500, 9
    opacus = PatientSampler(units, 40, q, steps=steps, physical=physical, seed=1)   # the opacus backend's draws
    counts, chosen, per_step = np.zeros(40), [], 0
    for xb, _, ub, nb, last in patient_batches(x, y, PatientSampler(units, 40, q, steps=steps, physical=physical,
                                                                     seed=1), steps=steps):
        rows, ub = xb.numpy()[:, 0].astype(int), ub.numpy()
        assert len(rows) <= physical and (ub.max(initial=-1) + 1) == int(nb)
        for local in range(int(nb)):   # a patient lies whole in one physical batch
            mine = rows[ub == local]
            assert len(set(units[mine])) == 1 and len(mine) == sizes[units[mine[0]]]
            chosen.append(units[mine[0]])
        if bool(last):
            assert sorted(chosen) == opacus.draw().tolist()   # the same patients as the opacus backend's sampler
            counts[chosen] += 1
            chosen, per_step = [], per_step + 1
    assert per_step == steps
    chi2 = float((((counts - steps * q) ** 2) / (steps * q * (1 - q))).sum())   # Binomial(steps, q) each
    assert stats.chi2.sf(chi2, df=40) > 0.01, chi2


# ---- runs (on conftest's patient_cohort) --------------------------------------------------------------------------
def _train_patients(path) -> pd.Series:
    frame = pd.read_csv(path, dtype=str)
    return frame.loc[frame["split"] == "train", "patient_id"]


def test_cli_tf_patient_run_accounts_patients_with_the_opacus_records(tf, patient_cohort, tmp_path):
    """One tiny CLI run (the default accountant, a target epsilon): its epsilon recomputed at the patient rate
    from the data, and its train.json against an opacus patient-level run's on the same cohort."""
    from conftest import invoke

    from privaudit.audit.accounting import opacus_epsilon
    from privaudit.backends import create_backend
    from privaudit.backends.tf_backend import compute_epsilon

    out = tmp_path / "run"
    res = invoke("train", "cxr", "--backend", "tf", "--data", patient_cohort, "--image-size", "16", "--width", "4",
                 "--epochs", "1", "--batch-size", "6", "--physical-batch-size", "8", "--privacy-unit", "patient",
                 "--quiet", "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    tj = json.loads((out / "train.json").read_text())
    pids = _train_patients(patient_cohort)
    n_patients, n_images = pids.nunique(), len(pids)
    q, steps, delta = 6 / n_patients, math.ceil(n_patients / 6), default_delta(n_patients)
    assert tj["privacy_unit"] == tj["privacy"]["privacy_unit"] == "patient" and tj["backend"] == "tf"
    assert tj["n_units"] == n_patients and tj["n_train"] == n_images > 2 * n_patients
    assert tj["sample_rate"] == pytest.approx(q, rel=1e-12) and tj["steps"] == steps and tj["delta"] == delta
    # recomputed from the data, not from train.json: dp_accounting's PLD (what prv runs here), and Opacus' PRV
    args = {"noise_multiplier": tj["noise_multiplier"], "sample_rate": q, "steps": steps, "delta": delta}
    assert tj["accountant"] == "dp_accounting_pld" and tj["epsilon"] <= 8.0
    assert tj["epsilon"] == pytest.approx(compute_epsilon("prv", **args), rel=1e-9)
    prv = opacus_epsilon("prv", **args)
    assert abs(tj["epsilon"] - prv) <= 0.01 + 0.01 * prv
    sizes = pids.value_counts()
    assert tj["images_per_patient"] == {"max": int(sizes.max()), "median": float(sizes.median())}
    assert tj["unit_gradient"] == "sum of the patient's image loss gradients, clipped as one"
    assert tj["group_privacy"] is None and tj["warnings"] == [] and tj["patient_ids"] == "given"
    assert "per patient" in tj["microbatches"] and "expected number of patients 6" in tj["normalisation"]
    # the opacus backend's patient-level run: the same records (tf has a few more), the same accounting inputs
    cfg = TrainConfig(width=4, image_size=16, batch_size=6, physical_batch_size=8, epochs=1,
                      dp=DPConfig(epsilon=None, noise_multiplier=1.0))
    op = create_backend("opacus").train(load_manifest(patient_cohort, task=CXR), cfg, tmp_path / "op", quiet=True)
    assert set(op) <= set(tj) and set(op["privacy"]) <= set(tj["privacy"])
    for k in ("privacy_unit", "n_units", "sample_rate", "steps", "delta", "images_per_patient", "unit_gradient",
              "group_privacy", "n_train", "patient_ids", "max_images_per_patient", "images_left_out"):
        assert tj[k] == op[k], k
