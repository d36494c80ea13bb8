"""The fast DP-SGD engine (privaudit.backends.fastdp).

Oracle: in float64, on random batches where some samples' gradient norms exceed the clipping norm C and some
do not, the engine's clipped gradient sum and per-sample norms equal Opacus' hooks mode and a naive loop of
batch-size-1 backward passes, for every supported layer type (varied shapes, strides, padding, dilation,
groups; reused and frozen layers), each with the ghost norm, materialised per-sample gradients and the
automatic per-layer choice, and for the full 2D and 3D models. Then: Opacus' noise with the right standard
deviation, the Opacus pipeline (Poisson batches, BatchMemoryManager, empty batches, accountant), the
fallback to hooks mode and the guards against silently wrong gradients.
"""

from __future__ import annotations

import copy
import warnings
import zlib

import pytest
import torch
from torch import nn

from privaudit.backends.fastdp import (
    FastDPError,
    FastDPFallbackWarning,
    FastDPOptimizer,
    FastGradSampleModule,
    FastPrivacyEngine,
    PerSampleLoss,
    UnsupportedModelError,
    forward_backward,
    unsupported_layers,
)
from privaudit.backends.torch_models import create_model, list_models

REL = 1e-5
FORCES = [None, "ghost", "materialise"]


def per_sample_loss(out, y):
    return ((out - y) ** 2).sum(1)


def with_head(body: nn.Module, x: torch.Tensor, k: int = 3) -> nn.Module:
    """body -> tanh -> flatten -> Linear(k): every sample's loss depends non-linearly on the body's output."""
    body = body.double()
    with torch.no_grad():
        f = body(x).flatten(1).shape[1]
    return nn.Sequential(body, nn.Tanh(), nn.Flatten(), nn.Linear(f, k))


# ---- the three ways to the clipped sum ------------------------------------------------------------------------
def naive(model, x, y, c):
    """Clip each sample's gradient from its own backward pass (batch size 1) and add them up."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(x)):
        model.zero_grad()
        per_sample_loss(model(x[i:i + 1]), y[i:i + 1]).sum().backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        norms.append(norm)
        factor = (c / (norm + 1e-6)).clamp(max=1.0)
        for t, g in zip(total, grads):
            t += factor * g
    return total, torch.stack(norms)


def opacus_hooks(model, x, y, c):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(copy.deepcopy(model))
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=c,
                      expected_batch_size=len(x))
    (per_sample_loss(gsm(x), y).sum() / len(x)).backward()
    norms = torch.stack([g.reshape(len(x), -1).norm(dim=1) for g in opt.grad_samples], 1).norm(dim=1)
    opt.clip_and_accumulate()
    return [p.summed_grad for p in gsm.parameters() if p.requires_grad], norms


def fast(model, x, y, c, force=None):
    gsm = FastGradSampleModule(copy.deepcopy(model), force=force)
    opt = FastDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), grad_sample_module=gsm, noise_multiplier=0.0,
                          max_grad_norm=c, expected_batch_size=len(x))
    (per_sample_loss(gsm(x), y).sum() / len(x)).backward()
    opt.clip_and_accumulate()
    return [p.summed_grad for p in gsm.parameters() if p.requires_grad], gsm.last_per_sample_norms, gsm


def assert_same(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, what
        err, scale = (g - w).norm().item(), w.norm().item()
        assert err <= REL * scale + 1e-12, f"{what}: parameter {i} differs by {err:.3g} (norm {scale:.3g})"


def check(model, x, y, force, *, against_opacus=True):
    model = model.double()
    # C between the middle norms: about half of the samples are clipped, half are not
    _, norms = naive(model, x, y, 1e9)
    c = float(norms.sort().values[len(norms) // 2 - 1: len(norms) // 2 + 1].mean())
    assert (norms > c).any() and (norms < c).any()
    want, want_norms = naive(model, x, y, c)
    got, got_norms, gsm = fast(model, x, y, c, force)
    assert torch.allclose(got_norms, want_norms, rtol=REL, atol=0)
    assert_same(got, want, "fast vs naive per-sample loop")
    if against_opacus:
        ref, ref_norms = opacus_hooks(model, x, y, c)
        assert torch.allclose(got_norms, ref_norms, rtol=REL, atol=0)
        assert_same(got, ref, "fast vs Opacus hooks mode")
    return gsm


# ---- layer cases ----------------------------------------------------------------------------------------------
class TwiceConv(nn.Module):
    """One convolution applied twice (its weight's gradient sums both uses)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.tanh(self.conv(x)))


def _frozen_bias():
    layer = nn.Linear(6, 4)
    layer.bias.requires_grad_(False)
    return layer


def _randint(*shape, high):
    return lambda g: torch.randint(0, high, shape, generator=g)


def _randn(*shape):
    return lambda g: torch.randn(*shape, generator=g, dtype=torch.float64)


# name: (body factory, input factory, compare with Opacus hooks mode too)
# Opacus' hooks mode itself gets padding_mode other than "zeros" and Embedding's padding_idx wrong (it unfolds
# with zero padding, and credits the padding row), and its full backward hooks refuse an in-place operation
# on a layer's output, so those cases are checked against the naive loop only.
LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), _randn(6, 7), True),
    "linear-tokens-no-bias": (lambda: nn.Linear(7, 5, bias=False), _randn(6, 4, 7), True),
    "linear-frozen-bias": (_frozen_bias, _randn(6, 3, 6), True),
    "conv1d-stride-dilation-groups": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
                                      _randn(6, 4, 11), True),
    "conv1d-same-circular": (lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="circular"),
                             _randn(6, 3, 9), False),
    "conv2d-asymmetric-groups": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                                   groups=2), _randn(6, 4, 9, 8), True),
    "conv2d-depthwise-1x1-stride": (lambda: nn.Conv2d(4, 8, 1, stride=2, groups=4), _randn(6, 4, 7, 7), True),
    "conv2d-reflect-no-bias": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False),
                               _randn(6, 3, 6, 5), False),
    "conv2d-grouped-wide-stride": (lambda: nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2), _randn(6, 8, 7, 6), True),
    "conv2d-grouped-circular-dilated": (lambda: nn.Conv2d(8, 6, 3, stride=(1, 2), padding=(1, 2), dilation=(2, 1),
                                                          groups=2, padding_mode="circular"), _randn(6, 8, 6, 7), False),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(2, 3, 4, padding="same"), _randn(6, 2, 6, 6), True),
    "conv3d-stride-dilation-groups": (lambda: nn.Conv3d(2, 4, (3, 2, 3), stride=(1, 2, 2), padding=(1, 0, 2),
                                                        dilation=(2, 1, 1), groups=2), _randn(5, 2, 7, 6, 8), True),
    "conv3d-same-replicate": (lambda: nn.Conv3d(2, 3, (2, 3, 3), padding="same", padding_mode="replicate"),
                              _randn(6, 2, 4, 5, 4), False),
    "groupnorm-2d": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(3, 6)), _randn(6, 3, 7, 7), True),
    "groupnorm-1d-one-group": (lambda: nn.GroupNorm(1, 4), _randn(6, 4, 9), True),
    "groupnorm-3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 2), nn.GroupNorm(2, 4, eps=1e-3)),
                     _randn(6, 2, 4, 5, 3), True),
    "embedding-repeated-tokens": (lambda: nn.Embedding(5, 4), _randint(6, 9, high=5), True),
    "embedding-padding-idx": (lambda: nn.Embedding(6, 3, padding_idx=0), _randint(6, 7, high=3), False),
    "conv-used-twice": (TwiceConv, _randn(6, 3, 5, 5), True),
    "conv-then-inplace-relu": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 2)),
                               _randn(6, 3, 6, 6), False),
}


# torch notes that an even 'same' kernel makes it pad a copy of the input: a performance remark, not a problem
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("force", FORCES, ids=["auto", "ghost", "materialise"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_oracle(name, force):
    body, make_x, against_opacus = LAYERS[name]
    seed = zlib.crc32(name.encode())
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = make_x(g)
    model = with_head(body(), x)
    y = torch.randn(len(x), 3, generator=g, dtype=torch.float64)
    check(model, x, y, force, against_opacus=against_opacus)


MODELS = [("resnet9-gn", 2, 24), ("resnet9-gn", 3, 12)]
if "cnn3d-gn" in list_models():
    MODELS.append(("cnn3d-gn", 3, 16))


@pytest.mark.parametrize("force", FORCES, ids=["auto", "ghost", "materialise"])
@pytest.mark.parametrize("arch,dims,size", MODELS, ids=[f"{a}-{d}d" for a, d, _ in MODELS])
def test_full_model_oracle(arch, dims, size, force):
    torch.manual_seed(1)
    model = create_model(arch, in_channels=1, num_classes=3, width=4, spatial_dims=dims)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1, *[size] * dims, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    gsm = check(model, x, y, force)
    modes = set(gsm.last_layer_modes.values())
    if force == "materialise":
        assert modes == {"materialise"}
    else:   # GroupNorm always materialises its 2C numbers per sample
        assert "ghost" in modes and modes <= {"ghost", "materialise"}


def test_auto_choice_follows_the_cost_model():
    from privaudit.backends.fastdp import use_ghost

    assert not use_ghost(64, 1024, 64, 49, 1, 4)      # the stem: many positions, few parameters
    assert use_ghost(64, 4, 512, 4608, 1, 4)          # the last block: 2x2 positions, 2.4M parameters
    assert use_ghost(64, 1, 5, 512, 1, 4)             # the linear head


# ---- inside Opacus -------------------------------------------------------------------------------------------
def _engine_run(mode, model, data, *, noise, steps, physical=None, seed=0, dtype=torch.float64):
    """Train ``steps`` logical steps through FastPrivacyEngine.make_private; return (model, engine, optimizer)."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader

    model = copy.deepcopy(model).to(dtype)
    engine = FastPrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        out = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                  data_loader=DataLoader(data, batch_size=8), noise_multiplier=noise,
                                  max_grad_norm=0.5, poisson_sampling=True, grad_sample_mode=mode,
                                  criterion=PerSampleLoss(per_sample_loss),
                                  noise_generator=torch.Generator().manual_seed(seed))
    gsm, opt, loader = out[0], out[1], out[-1]
    if steps == 0:
        return gsm, engine, opt
    torch.manual_seed(seed)   # the Poisson sampler's coins
    done = 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical or 8, optimizer=opt) as batches:
        for xb, yb in batches:
            opt.zero_grad(set_to_none=True)
            forward_backward(gsm, xb.to(dtype), yb.to(dtype), per_sample_loss, engine=engine)
            opt.step()
            done += not opt._is_last_step_skipped
            if done == steps:
                break
    return gsm, engine, opt


def _small_resnet():
    torch.manual_seed(3)
    return create_model("resnet9-gn", in_channels=1, num_classes=3, width=4, spatial_dims=2)


def _data(n=40, size=16):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(4)
    return TensorDataset(torch.randn(n, 1, size, size, generator=g), torch.randn(n, 3, generator=g))


def test_engine_matches_hooks_with_noise_poisson_and_physical_batches():
    data = _data()
    runs = {m: _engine_run(m, _small_resnet(), data, noise=0.7, steps=3, physical=3) for m in ("hooks", "fast")}
    (h, he, ho), (f, fe, fo) = runs["hooks"], runs["fast"]
    assert fe.grad_sample_mode == "fast" and isinstance(f, FastGradSampleModule) and isinstance(fo, FastDPOptimizer)
    # same batches, same clipping, same noise draws: the same weights after three noisy steps
    assert_same([p.detach() for p in f.parameters()], [p.detach() for p in h.parameters()], "weights")
    assert fe.accountant.history == he.accountant.history and len(fe.accountant.history) == 1
    assert fe.get_epsilon(1e-5) == he.get_epsilon(1e-5)


@pytest.mark.parametrize("mode", ["hooks", "ew", "ghost", "fast"])
def test_every_mode_steps_on_an_empty_poisson_batch_with_noise_only(mode):
    data = _data()
    model, engine, opt = _engine_run(mode, _small_resnet(), data, noise=1.0, steps=0, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    empty_x, empty_y = torch.zeros(0, 1, 16, 16), torch.zeros(0, 3)
    assert forward_backward(model, empty_x, empty_y, per_sample_loss, engine=engine) is None
    opt.step()
    assert not opt._is_last_step_skipped and sum(h[2] for h in engine.accountant.history) == 1
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    # lr 1: the update is the noise alone, N(0, (sigma C / B)^2) with B = 8
    assert torch.isfinite(update).all() and 0.5 * 0.5 / 8 < update.std().item() < 2 * 0.5 / 8
    reference = torch.Generator().manual_seed(0)
    noise = torch.cat([torch.normal(0, 0.5, p.shape, generator=reference).flatten() for p in before]) / 8
    assert torch.allclose(update, noise, rtol=1e-4, atol=1e-6)   # Opacus' own noise draws, in Opacus' order


def test_noise_has_the_dp_standard_deviation():
    """The averaged update minus the noise-free update is Gaussian noise with std sigma * C / B (B: expected
    batch size). With K coordinates, (K - 1) s^2 / sd^2 follows chi-square(K - 1); a fixed seed makes the test
    deterministic, and the two-sided 1e-6 bounds hold the std to within about 3%."""
    from scipy import stats

    sigma, c, b = 1.3, 0.5, 8
    data = _data(n=80)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 40), nn.Tanh(), nn.Linear(40, 3))   # 10,403 parameters
    noisy, _, opt = _engine_run("fast", model, data, noise=sigma, steps=1, seed=6)
    clean, _, _ = _engine_run("fast", model, data, noise=0.0, steps=1, seed=6)
    assert opt.expected_batch_size == b
    noise = torch.cat([(p - q).detach().flatten() for p, q in zip(noisy.parameters(), clean.parameters())])
    k, sd = noise.numel(), sigma * c / b
    s2 = noise.var().item()
    lo, hi = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], k - 1) / (k - 1)
    assert lo * sd**2 < s2 < hi * sd**2, (s2**0.5, sd)
    assert abs(noise.mean().item()) < 5 * sd / k**0.5
    assert stats.kstest(noise.numpy() / sd, "norm").pvalue > 1e-6


def test_engine_under_dpddp_uses_opacus_distributed_steps(tmp_path):
    """Under Opacus' DPDDP (torchrun), the fast engine feeds Opacus' distributed optimizer: checked here with a
    one-process gloo group against hooks mode (the two-process run is tests/test_distributed.py's)."""
    import torch.distributed as dist
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from opacus.optimizers import DistributedDPOptimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        data = _data()
        runs = {m: _engine_run(m, DPDDP(_small_resnet()), data, noise=0.7, steps=2, physical=3)
                for m in ("hooks", "fast")}
    finally:
        dist.destroy_process_group()
    (h, _, ho), (f, fe, fo) = runs["hooks"], runs["fast"]
    assert fe.grad_sample_mode == "fast" and isinstance(fo, DistributedDPOptimizer) and isinstance(fo, FastDPOptimizer)
    assert_same([p.detach() for p in f.parameters()], [p.detach() for p in h.parameters()], "weights under DPDDP")


def test_fallback_to_hooks_for_an_unsupported_layer():
    from opacus import GradSampleModule
    from torch.utils.data import DataLoader

    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    engine = FastPrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        with pytest.warns(FastDPFallbackWarning, match=r"LayerNorm.*hooks"):
            gsm, opt, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=1.0,
                                              max_grad_norm=1.0, grad_sample_mode="fast")
    assert engine.grad_sample_mode == "hooks" and type(gsm) is GradSampleModule and not isinstance(opt, FastDPOptimizer)
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        FastGradSampleModule(model)


class OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.scale


def test_unsupported_layers_are_named_with_the_reason():
    assert unsupported_layers(create_model("resnet9-gn", in_channels=1, num_classes=5, width=4, spatial_dims=2)) == []
    found = unsupported_layers(nn.Sequential(nn.Linear(2, 3), OwnParameter()))
    assert len(found) == 1 and found[0].startswith("1 (OwnParameter)")
    assert "scale_grad_by_freq" in unsupported_layers(nn.Embedding(4, 2, scale_grad_by_freq=True))[0]
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert "shared" in unsupported_layers(tied)[0]
    frozen = nn.Sequential(nn.Linear(2, 3), OwnParameter())
    frozen[1].scale.requires_grad_(False)     # a frozen parameter needs no per-sample gradient
    assert unsupported_layers(frozen) == []


class FunctionalTie(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)

    def forward(self, idx):
        return nn.functional.linear(self.emb(idx).mean(1), self.emb.weight)   # the weight used a second time


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x) + 1
        out = self.b(h)
        h.mul_(2)                         # changes what self.b read
        return out


def test_guards_refuse_what_cannot_be_clipped_exactly():
    with pytest.raises(FastDPError, match="outside that layer's forward"):
        FastGradSampleModule(FunctionalTie())(torch.randint(0, 5, (4, 2)))
    gsm = FastGradSampleModule(InPlaceAfter())
    with pytest.raises(FastDPError, match="modified in place"):
        gsm(torch.randn(4, 3)).sum().backward()
        gsm.clipped_grad_sum(1.0)
    gsm = FastGradSampleModule(nn.Linear(3, 2))
    gsm.forbid_grad_accumulation()
    gsm(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="grad accumulation"):
        gsm(torch.randn(4, 3))
    with pytest.raises(ValueError, match="no backward pass"):
        FastGradSampleModule(nn.Linear(3, 2)).clipped_grad_sum(1.0)


def test_eval_and_no_grad_forward_passes_capture_nothing():
    gsm = FastGradSampleModule(nn.Linear(3, 2))
    with torch.no_grad():
        gsm(torch.randn(4, 3))
    gsm.eval()
    gsm(torch.randn(4, 3))
    assert gsm._batches == [] and all(p.requires_grad for p in gsm.parameters())


def test_clipping_option_is_validated():
    from conftest import invoke

    from privaudit.config import TrainConfig
    from privaudit.errors import ConfigError

    assert TrainConfig(clipping="fast").clipping == "fast"
    with pytest.raises(ConfigError, match="unknown clipping 'turbo'"):
        TrainConfig(clipping="turbo")
    with pytest.raises(ConfigError, match="opacus backend"):
        TrainConfig(clipping="fast", backend="tf")
    res = invoke("train", "cxr", "--clipping", "turbo", "--quiet")
    assert res.exit_code == 2 and "turbo" in res.stderr
