"""Patient-level DP-SGD (opacus backend): the privacy unit is the patient, with all its images.

Oracle: with noise 0, in float64, the summed per-patient clipped gradient equals a naive loop (one backward
pass per patient over its images, clip that summed gradient to C, add up) for Opacus' hooks mode (rows summed
by patient) and for the fast engine (ghost, materialised and automatic per layer), for every layer type the
fast engine supports and for the 2D and 3D default models, with patients of 1 to 6 images, their images
scattered through the batch, about half of the patients above C. Then: Poisson sampling of patients (a
chi-square test of each patient's inclusion count; an included patient brings all its images, never split
between physical batches), the accountant at the patient sample rate, group privacy for image-level runs
against the closed form (including "no guarantee"), the records, and bad input.
"""

from __future__ import annotations

import copy
import json
import math
import types
import warnings
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from privaudit.audit.accounting import group_privacy
from privaudit.backends import create_backend
from privaudit.backends._units import PatientSampler
from privaudit.backends.fastdp import (FastDPOptimizer, FastGradSampleModule, Units, forward_backward,
                                       sum_grad_samples)
from privaudit.backends.torch_models import create_model
from privaudit.config import DPConfig, TrainConfig, default_delta
from privaudit.data.manifest import load_manifest
from privaudit.errors import ConfigError
from privaudit.tasks import create_task

REL = 1e-5
SIZES = [1, 2, 3, 4, 5, 6, 3, 1]        # images per patient: 1 to 6, 25 images in all
CXR = create_task("cxr")


def per_sample_loss(out, y):
    return ((out - y) ** 2).sum(1)


def scattered_units(sizes, seed):
    """Patient index of each image, the patients' images shuffled through the batch."""
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))]


def naive(model, x, y, index, c):
    """Per patient: one backward pass of the sum of its images' losses, clip that gradient to C, add up."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for u in range(int(index.max()) + 1):
        model.zero_grad()
        mine = index == u
        per_sample_loss(model(x[mine]), y[mine]).sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        norms.append(norm)
        for t, g in zip(total, grads):
            t += (c / (norm + 1e-6)).clamp(max=1.0) * g
    return total, torch.stack(norms)


def engine_clipped_sum(mode, model, x, y, index, c, force=None):
    """The clipped sum through forward_backward(units=...) and the optimizer's clipping step, noise 0."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = copy.deepcopy(model)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1.0)   # noqa: E731
    units = Units(index, int(index.max()) + 1)
    if mode == "hooks":
        gsm = GradSampleModule(model)
        opt = DPOptimizer(sgd(gsm), noise_multiplier=0.0, max_grad_norm=c, expected_batch_size=units.count)
    else:
        gsm = FastGradSampleModule(model, force=force)
        opt = FastDPOptimizer(sgd(gsm), grad_sample_module=gsm, noise_multiplier=0.0, max_grad_norm=c,
                              expected_batch_size=units.count)
    forward_backward(gsm, x, y, per_sample_loss, engine=types.SimpleNamespace(grad_sample_mode=mode), units=units)
    opt.clip_and_accumulate()
    return [p.summed_grad for p in gsm.parameters() if p.requires_grad], gsm


def assert_same(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        err, scale = (g - w).norm().item(), w.norm().item()
        assert err <= REL * scale + 1e-12, f"{what}: parameter {i} differs by {err:.3g} (norm {scale:.3g})"


def check(model, x, y, index, modes):
    model = model.double()
    _, norms = naive(model, x, y, index, 1e12)
    s = norms.sort().values
    c = float(s[len(s) // 2 - 1: len(s) // 2 + 1].mean())     # half of the patients above C, half below
    assert (norms > c).sum() == len(norms) // 2
    want, want_norms = naive(model, x, y, index, c)
    # summing per-image norms is not the patient's norm: the test would catch an engine that did
    assert not torch.allclose(want_norms, naive_image_norm_sum(model, x, y, index), rtol=1e-3)
    out = {}
    for mode, force in modes:
        got, gsm = engine_clipped_sum(mode, model, x, y, index, c, force)
        assert_same(got, want, f"{mode}/{force} vs the naive per-patient loop")
        if mode == "fast":
            assert torch.allclose(gsm.last_per_sample_norms, want_norms, rtol=REL, atol=0)
        out[(mode, force)] = gsm
    return out


def naive_image_norm_sum(model, x, y, index):
    _, image_norms = naive(model, x, y, torch.arange(len(x)), 1e12)
    return torch.zeros(int(index.max()) + 1, dtype=image_norms.dtype).index_add_(0, index, image_norms)


FAST = [("fast", None), ("fast", "ghost"), ("fast", "materialise")]
ALL = [("hooks", None), *FAST]


def with_head(body: nn.Module, x: torch.Tensor, k: int = 3) -> nn.Module:
    body = body.double()
    with torch.no_grad():
        f = body(x).flatten(1).shape[1]
    return nn.Sequential(body, nn.Tanh(), nn.Flatten(), nn.Linear(f, k))


def _frozen_bias():
    layer = nn.Linear(6, 4)
    layer.bias.requires_grad_(False)
    return layer


def _randn(*shape):
    return lambda g, n: torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _randint(*shape, high):
    return lambda g, n: torch.randint(0, high, (n, *shape), generator=g)


# Every layer type the fast engine supports (Linear, Conv1d/2d/3d, GroupNorm, Embedding), with the options that
# change its maths. name: (body, input, also check hooks mode: Opacus' own per-sample gradients are wrong for
# padding modes other than zeros and for Embedding's padding_idx, so those cases check the fast engine only)
LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), _randn(7), True),
    "linear-tokens-no-bias": (lambda: nn.Linear(7, 5, bias=False), _randn(4, 7), True),
    "linear-frozen-bias": (_frozen_bias, _randn(3, 6), True),
    "conv1d-stride-dilation-groups": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
                                      _randn(4, 11), True),
    "conv2d-asymmetric-groups": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                                   groups=2), _randn(4, 7, 6), True),
    "conv2d-reflect-no-bias": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False),
                               _randn(3, 6, 5), False),
    "conv2d-grouped-wide": (lambda: nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2), _randn(8, 7, 6), True),
    "conv3d-stride-dilation-groups": (lambda: nn.Conv3d(2, 4, (3, 2, 3), stride=(1, 2, 2), padding=(1, 0, 2),
                                                        dilation=(2, 1, 1), groups=2), _randn(2, 6, 5, 6), True),
    "conv3d-same-replicate": (lambda: nn.Conv3d(2, 3, (2, 3, 3), padding="same", padding_mode="replicate"),
                              _randn(2, 4, 5, 4), False),
    "groupnorm-2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6)), _randn(3, 6, 6), True),
    "groupnorm-3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.GroupNorm(2, 4, eps=1e-3)),
                     _randn(2, 4, 4, 3), True),
    "embedding-repeated-tokens": (lambda: nn.Embedding(5, 4), _randint(9, high=5), True),
    "embedding-padding-idx": (lambda: nn.Embedding(6, 3, padding_idx=0), _randint(7, high=3), False),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_oracle_per_patient(name):
    body, make_x, with_hooks = LAYERS[name]
    seed = zlib.crc32(name.encode())
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    index = scattered_units(SIZES, seed)
    x = make_x(g, len(index))
    model = with_head(body(), x)
    y = torch.randn(len(x), 3, generator=g, dtype=torch.float64)
    check(model, x, y, index, ALL if with_hooks else FAST)


@pytest.mark.parametrize("arch,dims,size", [("resnet9-gn", 2, 16), ("cnn3d-gn", 3, 12)],
                         ids=["resnet9-gn-2d", "cnn3d-gn-3d"])
def test_default_models_oracle_per_patient(arch, dims, size):
    torch.manual_seed(1)
    model = create_model(arch, in_channels=1, num_classes=3, width=4, spatial_dims=dims)
    g = torch.Generator().manual_seed(2)
    index = scattered_units(SIZES, 5)
    x = torch.randn(len(index), 1, *[size] * dims, generator=g, dtype=torch.float64)
    y = torch.randn(len(index), 3, generator=g, dtype=torch.float64)
    out = check(model, x, y, index, ALL)
    assert set(out[("fast", "materialise")].last_layer_modes.values()) == {"materialise"}
    assert "ghost" in set(out[("fast", "ghost")].last_layer_modes.values())


def test_units_of_one_image_are_per_sample_clipping():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    model = create_model("resnet9-gn", in_channels=1, num_classes=3, width=4, spatial_dims=2).double()
    plain = FastGradSampleModule(copy.deepcopy(model))
    (per_sample_loss(plain(x), y).sum() / 6).backward()
    want = plain.clipped_grad_sum(1.0)
    got, _ = engine_clipped_sum("fast", model, x, y, torch.arange(6), 1.0)
    assert_same(got, [want[p] for p in plain.parameters()], "one image per unit vs no units")


def test_hooks_sum_rows_by_patient_and_refuse_a_mismatch():
    p = nn.Parameter(torch.zeros(2))
    model = nn.Module()
    model.p = p
    p.grad_sample = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    sum_grad_samples(model, Units(torch.tensor([1, 0, 1]), 2))
    assert torch.equal(p.grad_sample, torch.tensor([[0.0, 2.0], [4.0, 3.0]]))
    with pytest.raises(ValueError, match="one backward pass"):
        sum_grad_samples(model, Units(torch.tensor([0, 1, 1]), 2))
    with pytest.raises(ValueError, match="hooks or fast"):
        forward_backward(model, torch.zeros(1, 1), torch.zeros(1, 1), per_sample_loss,
                         engine=types.SimpleNamespace(grad_sample_mode="ghost"), units=Units(torch.tensor([0]), 1))


@pytest.mark.parametrize("mode", ["hooks", "fast"])
def test_an_empty_patient_draw_steps_with_noise_only(mode):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    torch.manual_seed(0)
    model = create_model("resnet9-gn", in_channels=1, num_classes=3, width=4, spatial_dims=2)
    gsm = GradSampleModule(model) if mode == "hooks" else FastGradSampleModule(model)
    kw = dict(noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=8)
    sgd = torch.optim.SGD(gsm.parameters(), lr=1.0)
    opt = DPOptimizer(sgd, **kw) if mode == "hooks" else FastDPOptimizer(sgd, grad_sample_module=gsm, **kw)
    before = [p.detach().clone() for p in gsm.parameters()]
    empty = Units(torch.zeros(0, dtype=torch.long), 0)
    assert forward_backward(gsm, torch.zeros(0, 1, 16, 16), torch.zeros(0, 3), per_sample_loss,
                            engine=types.SimpleNamespace(grad_sample_mode=mode), units=empty) is None
    opt.step()
    assert not opt._is_last_step_skipped
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, gsm.parameters())])
    assert 0.9 * 0.5 / 8 < update.std().item() < 1.1 * 0.5 / 8     # sigma C / expected patients, noise alone


# ---- sampling ----------------------------------------------------------------------------------------------------
def test_poisson_sampling_of_patients_includes_each_with_probability_q_and_all_its_images():
    from scipy import stats

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 7, size=40)                     # 40 patients of 1 to 6 images
    units = rng.permutation(np.repeat(np.arange(40), sizes))  # dataset items in any order
    q, steps, physical = 0.2, 3000, 9
    sampler = PatientSampler(units, 40, q, steps=steps, physical=physical, seed=1)
    counts = np.zeros(40)
    batch_patients = []
    for _ in range(steps):
        chosen = sampler.draw()
        counts[chosen] += 1
        batches = sampler.pack(chosen)
        assert [b.last for b in batches] == [False] * (len(batches) - 1) + [True]
        items = np.concatenate([b.items for b in batches])
        # exactly the chosen patients' images, each once, every image of each
        assert sorted(items.tolist()) == sorted(np.flatnonzero(np.isin(units, chosen)).tolist())
        for b in batches:
            assert len(b.items) <= physical
            for local in range(b.n_units):   # a patient lies in one physical batch, whole
                mine = b.items[b.units == local]
                assert len(set(units[mine])) == 1 and len(mine) == sizes[units[mine[0]]]
        batch_patients.append(len(chosen))
    # each patient's inclusion count is Binomial(steps, q): the standardised squares sum to chi-square(40)
    chi2 = float((((counts - steps * q) ** 2) / (steps * q * (1 - q))).sum())
    assert stats.chi2.sf(chi2, df=40) > 0.01, chi2
    assert abs(np.mean(batch_patients) - 40 * q) < 4 * math.sqrt(40 * q * (1 - q) / steps)
    assert len(sampler.pack(np.array([], dtype=np.int64))) == 1    # an empty draw is one empty physical batch


# ---- training on a cohort with several images per patient (conftest's patient_cohort) --------------------------
def _train(manifest_path, tmp_path, **kw):
    dp = DPConfig(**{"epsilon": None, "noise_multiplier": 1.0, "accountant": "rdp", **kw.pop("dp", {})})
    cfg = TrainConfig(**{"width": 4, "image_size": 16, "batch_size": 6, "physical_batch_size": 8, "epochs": 1,
                         "dp": dp, **kw})
    manifest = load_manifest(manifest_path, task=CXR)
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    return create_backend("opacus").train(manifest, cfg, out, quiet=True), out


def _train_patients(path):
    frame = pd.read_csv(path, dtype=str)
    return frame.loc[frame["split"] == "train", "patient_id"]


def test_patient_run_counts_patients_and_matches_opacus_accountant(patient_cohort, tmp_path):
    from opacus.accountants import create_accountant

    tj, run = _train(patient_cohort, tmp_path)
    pids = _train_patients(patient_cohort)
    n_patients, n_images = pids.nunique(), len(pids)
    assert n_images > n_patients * 2
    q, steps, delta = 6 / n_patients, math.ceil(n_patients / 6), default_delta(n_patients)
    assert tj["privacy_unit"] == tj["privacy"]["privacy_unit"] == "patient"
    assert tj["n_units"] == n_patients and tj["n_train"] == n_images
    assert tj["sample_rate"] == pytest.approx(q, rel=1e-12) and tj["steps"] == steps and tj["delta"] == delta
    acc = create_accountant("rdp")
    acc.history = [(1.0, q, steps)]                           # recomputed from the data, not from train.json
    assert tj["epsilon"] == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)
    sizes = pids.value_counts()
    assert tj["images_per_patient"] == {"max": int(sizes.max()), "median": float(sizes.median())}
    assert tj["patient_ids"] == "given" and tj["group_privacy"] is None and tj["warnings"] == []
    assert json.loads((run / "train.json").read_text())["privacy_unit"] == "patient"


def test_patient_target_epsilon_is_met_not_exceeded(patient_cohort, tmp_path):
    tj, _ = _train(patient_cohort, tmp_path, dp={"noise_multiplier": None, "epsilon": 3.0})
    assert tj["privacy_unit"] == "patient" and 2.7 <= tj["epsilon"] <= 3.0 + 1e-6


def test_hooks_and_fast_train_the_same_patient_level_model(patient_cohort, tmp_path):
    """Same patient batches, same per-patient clipping and noise draws: the same weights and epsilon."""
    from privaudit.backends.opacus_backend import load_state_dict

    runs = {m: _train(patient_cohort, tmp_path, clipping=m, physical_batch_size=7) for m in ("hooks", "fast")}
    (h, hdir), (f, fdir) = runs["hooks"], runs["fast"]
    assert h["steps"] == f["steps"] > 0 and h["epsilon"] == f["epsilon"]
    a, b = load_state_dict(hdir / "model" / "weights.pt"), load_state_dict(fdir / "model" / "weights.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k


def test_image_level_run_reports_group_privacy_and_no_guarantee(patient_cohort, tmp_path):
    tj, _ = _train(patient_cohort, tmp_path, privacy_unit="image", dp={"noise_multiplier": 0.4})
    n_images = len(_train_patients(patient_cohort))
    assert tj["privacy_unit"] == "image" and tj["n_units"] == n_images == tj["n_train"]
    assert tj["sample_rate"] == pytest.approx(6 / n_images, rel=0.2) and tj["delta"] == default_delta(n_images)
    gp = tj["group_privacy"]
    eps, delta = tj["epsilon"], tj["delta"]
    for where in ("median", "max"):
        k = math.ceil(tj["images_per_patient"][where])
        assert gp[where]["k"] == k
        closed = (k * eps, k * math.exp((k - 1) * eps) * delta)
        if closed[1] < 1:
            assert gp[where]["guarantee"] and gp[where]["epsilon"] == pytest.approx(closed[0], rel=1e-12)
            assert gp[where]["delta"] == pytest.approx(closed[1], rel=1e-12)
        else:
            assert gp[where] == {"k": k, "epsilon": None, "delta": None, "guarantee": False}
            assert any(f"no guarantee for a patient with {k} images" in w for w in tj["warnings"])
    assert not gp["max"]["guarantee"]      # epsilon is large at sigma 0.4: k = 6 is left with nothing


def test_group_privacy_closed_form():
    assert group_privacy(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = group_privacy(0.5, 1e-6, 3)
    assert eps == 1.5 and delta == pytest.approx(3 * math.exp(1.0) * 1e-6, rel=1e-12)
    assert group_privacy(8.0, 2e-4, 2) is None          # the example: 2 e^8 2e-4 = 1.19
    assert group_privacy(8.0, 2e-5, 2) == pytest.approx((16.0, 2 * math.exp(8.0) * 2e-5))
    assert group_privacy(3.0, 0.0, 4) == (12.0, 0.0)
    assert group_privacy(50.0, 1e-9, 400) is None        # no overflow on the way to "no guarantee"
    for bad in [(1.0, 1e-5, 0), (1.0, 1.0, 2), (float("inf"), 1e-5, 2), (1.0, 1e-5, 2.5)]:
        with pytest.raises(ValueError):
            group_privacy(*bad)


def test_cap_is_seeded_model_free_and_recorded(patient_cohort, tmp_path):
    from privaudit.backends._plan import plan_training

    manifest = load_manifest(patient_cohort, task=CXR)
    cfg = TrainConfig(width=4, image_size=16, batch_size=6, max_images_per_patient=2,
                      dp=DPConfig(epsilon=None, noise_multiplier=1.0))
    plan = plan_training(manifest, cfg, CXR, 16)
    kept = manifest.frame[plan.train_mask]
    assert kept.groupby("patient_id").size().max() == 2 and plan.images_per_patient["max"] == 2
    sizes = _train_patients(patient_cohort).value_counts()
    assert plan.images_left_out == int((sizes - 2).clip(lower=0).sum()) > 0
    assert plan.n_units == len(sizes)                        # every patient keeps at least one image
    again = plan_training(manifest, cfg, CXR, 16)
    assert np.array_equal(again.train_mask, plan.train_mask)   # fixed before training: same seed, same images
    other = plan_training(manifest, TrainConfig(**{**cfg.to_dict(), "dp": cfg.dp, "seed": 1}), CXR, 16)
    assert not np.array_equal(other.train_mask, plan.train_mask)
    tj, _ = _train(patient_cohort, tmp_path, max_images_per_patient=2)
    assert tj["max_images_per_patient"] == 2 and tj["images_left_out"] == plan.images_left_out
    assert tj["n_train"] == int(plan.train_mask.sum())


def test_audit_copies_the_unit_into_the_accountant_block(patient_cohort, tmp_path):
    from privaudit.audit.engine import run_audit
    from privaudit.config import AuditConfig
    from privaudit.predictions import read_predictions

    tj, run = _train(patient_cohort, tmp_path, privacy_unit="image", dp={"noise_multiplier": 0.4})
    rep = run_audit({"private": read_predictions(run / "predictions.csv")}, runs={"private": tj},
                    config=AuditConfig(n_boot=10))
    rep.validate()
    acc = rep.models["private"]["privacy"]["accountant"]
    assert acc["privacy_unit"] == "image" and acc["n_units"] == tj["n_units"]
    assert acc["group_privacy"] == tj["group_privacy"]
    assert any("no guarantee for a patient" in w for w in rep.warnings)


# ---- where patient-level DP does not run, and bad input -------------------------------------------------------
def test_auto_unit_falls_back_to_image_with_a_warning_where_patient_level_cannot_run(patient_cohort, tmp_path):
    from privaudit.backends._plan import plan_training

    tj, _ = _train(patient_cohort, tmp_path, clipping="ghost")
    assert tj["privacy_unit"] == "image" and tj["group_privacy"] is not None
    assert any("patient-level DP needs a patient's image gradients summed" in w for w in tj["warnings"])
    plan = plan_training(load_manifest(patient_cohort, task=CXR), TrainConfig(backend="tf", batch_size=6), CXR, 16)
    assert plan.privacy_unit == "patient" and plan.warnings == ()   # the tf backend does patient-level DP too


def test_one_image_per_patient_is_image_level(cohort, tmp_path):
    from privaudit.backends._plan import plan_training

    manifest = load_manifest(cohort, task=CXR)
    frame = manifest.frame.assign(patient_id=manifest.frame["sample_id"])
    plan = plan_training(type(manifest)(frame, manifest.root, manifest.source, manifest.labels),
                         TrainConfig(batch_size=8, dp=DPConfig(epsilon=None, noise_multiplier=1.0)), CXR, 32)
    assert plan.privacy_unit == "image" and plan.warnings == ()


@pytest.mark.parametrize("kw,needle", [
    ({"max_images_per_patient": 0}, "max_images_per_patient must be at least 1, got 0"),
    ({"privacy_unit": "person"}, "unknown privacy_unit 'person'; use patient or image"),
    ({"privacy_unit": "patient", "clipping": "ew"}, "which clipping 'ew' cannot do"),
    ({"privacy_unit": "patient", "clipping": "ghost"}, "use clipping 'fast' or 'hooks', or privacy_unit 'image'"),
])
def test_bad_unit_options_are_one_line_config_errors(kw, needle):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,needle", [
    ({"batch_size": 500}, "batch_size 500 is larger than the training set"),
    ({"physical_batch_size": 4}, "raise physical_batch_size to 6 or cap them with max_images_per_patient 4"),
])
def test_bad_batches_are_refused_before_anything_is_written(patient_cohort, tmp_path, kw, needle):
    with pytest.raises(ConfigError) as e:
        _train(patient_cohort, tmp_path, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    if "batch_size" in kw:
        assert f"({_train_patients(patient_cohort).nunique()} patients;" in str(e.value)


def test_msd_case_ids_are_recorded_as_derived(tmp_path):
    from privaudit.data.presets import load_data
    from privaudit.data.synth_ct import synthesize_ct

    folder = tmp_path / "msd"
    synthesize_ct(folder, n=12, image_size=16, seed=1, layout="msd")
    def load():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the preset's own shortcut warning
            return load_data(folder, task=create_task("pdac"), preset="msd", controls=folder / "controls")

    derived = load()
    assert derived.patient_ids == "derived"
    for sub in (folder, folder / "controls"):   # demographics.csv naming every scan's patient
        demo = pd.read_csv(sub / "demographics.csv")
        demo.assign(patient_id=[f"person{i}" for i in range(len(demo))]).to_csv(sub / "demographics.csv", index=False)
    given = load()
    assert given.patient_ids == "given" and given.frame["patient_id"].str.startswith("person").all()


# ---- from the command line ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--privacy-unit", "person"], "unknown --privacy-unit 'person'"),
    (["--max-images-per-patient", "0"], "--max-images-per-patient must be at least 1"),
    (["--batch-size", "5000"], "--batch-size 5000 is larger than the training set"),
])
def test_cli_bad_unit_options_are_one_line_and_write_nothing(patient_cohort, tmp_path, args, needle):
    from conftest import invoke

    out = tmp_path / "run"
    res = invoke("train", "cxr", "--data", patient_cohort, "--image-size", "16", "--width", "4", "--epochs", "1", *args,
                 "--quiet", "--out", out)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert needle in res.stderr and not out.exists()


def test_cli_patient_run_epsilon_is_the_accountant_at_the_patient_rate(patient_cohort, tmp_path):
    import json

    from opacus.accountants import RDPAccountant

    from conftest import invoke

    out = tmp_path / "run"
    res = invoke("train", "cxr", "--data", patient_cohort, "--image-size", "16", "--width", "4", "--epochs", "1",
                 "--batch-size", "6", "--physical-batch-size", "8", "--noise-multiplier", "1.0", "--accountant", "rdp",
                 "--privacy-unit", "patient", "--quiet", "--out", out)
    assert res.exit_code == 0, res.stderr
    tj = json.loads((out / "train.json").read_text())
    n_patients = _train_patients(patient_cohort).nunique()
    assert tj["privacy_unit"] == "patient" and tj["n_units"] == n_patients
    assert tj["sample_rate"] == pytest.approx(6 / n_patients)
    acc = RDPAccountant()
    acc.history = [(1.0, 6 / n_patients, tj["steps"])]
    assert tj["epsilon"] == pytest.approx(acc.get_epsilon(tj["delta"]), rel=1e-6)
