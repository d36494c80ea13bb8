"""verify-dp (privaudit.backends.verify_dp): the correct pipeline passes, each injected fault is a violation.

Configuration (documented in the README table): the synthetic CXR cohort at 16 px (120 images), resnet9-gn at
width 4, batch 32, 2 epochs, noise multiplier 1.0 (epsilon about 1.4), 1000 gradient canaries, 99%.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from privaudit.audit import onerun, whitebox
from privaudit.config import DPConfig, TrainConfig
from privaudit.errors import ConfigError, OutputExistsError

M = 1000
# The mildest noise reduction the harness is documented to catch at this size: in simulation of this
# configuration the noise check fires in 85% of runs at 0.98 and in all at 0.97 (README table).
LOW_NOISE = 0.97


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    import torch

    from privaudit.data.manifest import load_manifest
    from privaudit.data.synth_cxr import synthesize_cxr
    from privaudit.tasks import create_task

    torch.set_num_threads(1)
    path = synthesize_cxr(tmp_path_factory.mktemp("cohort"), n=120, image_size=16, seed=3)
    return load_manifest(path, task=create_task("cxr"))


def _config(**kw) -> TrainConfig:
    base = dict(task="cxr", image_size=16, width=4, epochs=2, batch_size=32, physical_batch_size=4096, device="cpu",
                dp=DPConfig(epsilon=None, noise_multiplier=1.0))
    return TrainConfig(**{**base, **kw})


def _run(manifest, out, **kw):
    from privaudit.backends.verify_dp import verify_dp

    return verify_dp(manifest, _config(), out, gradient_canaries=M, ideal_reps=3, **kw)


def test_correct_pipeline_passes_and_verify_json_recomputes(manifest, tmp_path):
    res = _run(manifest, tmp_path / "v")
    assert res["verdict"] == whitebox.NO_VIOLATION and res["fired"] == [] and res["fault"] is None
    on_disk = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert on_disk["verdict"] == res["verdict"] and on_disk["schema"] == "privaudit.verify/1"
    acc, tests = res["accountant"], res["tests"]
    assert acc["steps"] > 20 and acc["noise_multiplier"] == 1.0
    # the canaries are training units: about M/2 of them joined the 84 training images, and the sampler drew them
    assert res["run"]["n_train"] == res["canaries"]["n_included"] + 84
    assert acc["sample_rate"] == pytest.approx(1 / np.ceil(res["run"]["n_train"] / 32))
    # what the auditor saw matches the accounted mechanism: the noise along the canaries' directions, and the
    # clipped canaries showing up at the accounted rate
    assert 0.97 < tests["noise"]["std_ratio"] < 1.05 and tests["noise"]["p_value"] > 0.01
    assert 0.6 < tests["sampling"]["rate_ratio"] < 1.4
    assert tests["epsilon"]["empirical"] < acc["epsilon"]
    # the bounds recompute from verify_scores.csv and the recorded counts
    table = pd.read_csv(tmp_path / "v" / "verify_scores.csv")
    assert len(table) == M and table["included"].sum() == res["canaries"]["n_included"]
    for key, method in (("fdp", onerun.FDP), ("steinke", onerun.STEINKE)):
        e = res["empirical_epsilon"][key]
        again = onerun.one_run_epsilon(table["score"].to_numpy(), table["included"].to_numpy(), delta=acc["delta"],
                                       confidence=0.99, method=method, top_k=e["top_k"])
        assert again["estimate"] == pytest.approx(e["estimate"], abs=1e-9)
        assert e["estimate"] <= e["cap"]
    assert res["ideal"]["m"] == M and res["ideal"]["steps"] == acc["steps"]
    assert res["ideal"]["firing_rate"]["verdict"] == 0.0
    with pytest.raises(OutputExistsError):
        _run(manifest, tmp_path / "v")


@pytest.mark.parametrize("fault,fires", [("no-clipping", {"epsilon", "sampling"}),
                                         (f"low-noise:{LOW_NOISE}", {"noise"}),
                                         ("double-rate", {"sampling"})])
def test_each_fault_is_a_violation(manifest, tmp_path, monkeypatch, fault, fires):
    if fault == "double-rate":   # through the environment switch, as a torchrun test would
        monkeypatch.setenv("PRIVAUDIT_TEST_FAULT", fault)
        res = _run(manifest, tmp_path / "v")
    else:
        res = _run(manifest, tmp_path / "v", fault=fault)
    assert res["verdict"] == whitebox.VIOLATION, res["tests"]
    assert set(res["fired"]) == fires
    assert res["fault"]["name"] == fault.partition(":")[0]
    tests = res["tests"]
    if fault == "no-clipping":   # unclipped canaries (norm 100 C) leak: the epsilon bound itself breaks the claim
        assert tests["epsilon"]["empirical"] > 2 * tests["epsilon"]["accountant"]
        assert tests["sampling"]["rate_ratio"] > 50
    elif fault.startswith("low-noise"):
        assert tests["noise"]["std_ratio"] == pytest.approx(LOW_NOISE, abs=0.01)
    else:
        assert 1.5 < tests["sampling"]["rate_ratio"] < 2.5


def test_the_fast_engine_takes_the_canaries_in_its_book_keeping(manifest, tmp_path):
    """--clipping fast has no p.grad_sample: the canaries join its per-layer book-keeping. With the same seeds
    it must see what Opacus' hooks see (same sampling and noise, the same clipping), and catch the same fault."""
    from privaudit.backends.verify_dp import verify_dp

    runs = {}
    for clipping in ("hooks", "fast"):
        runs[clipping] = verify_dp(manifest, _config(clipping=clipping), tmp_path / clipping, gradient_canaries=M,
                                   ideal_reps=1)
        assert runs[clipping]["run"]["clipping"] == clipping
    hooks, fast = (pd.read_csv(tmp_path / c / "verify_scores.csv")["score"].to_numpy() for c in ("hooks", "fast"))
    assert np.abs(hooks - fast).max() < 1e-3 * max(1.0, np.abs(hooks).max())
    assert runs["fast"]["tests"]["noise"]["std_ratio"] == pytest.approx(runs["hooks"]["tests"]["noise"]["std_ratio"],
                                                                        rel=1e-4)
    bad = verify_dp(manifest, _config(clipping="fast"), tmp_path / "bad", gradient_canaries=M, ideal_reps=1,
                    fault="no-clipping")
    assert bad["verdict"] == whitebox.VIOLATION and {"epsilon", "sampling"} <= set(bad["fired"])


def test_refusals_are_config_errors(manifest, tmp_path):
    from privaudit.backends.verify_dp import parse_fault, verify_dp

    for cfg, words in [(_config(clipping="ghost"), "--clipping ghost"),
                       (_config(dp=DPConfig(enabled=False)), "needs DP"), (_config(canaries=10), "--canaries"),
                       (_config(dp=DPConfig(epsilon=None, noise_multiplier=0.0)), "clip-only")]:
        with pytest.raises(ConfigError, match=words):
            verify_dp(manifest, cfg, tmp_path / "x", gradient_canaries=M)
    with pytest.raises(ConfigError, match="at least"):
        verify_dp(manifest, _config(), tmp_path / "x", gradient_canaries=5)
    with pytest.raises(ConfigError, match="unknown fault"):
        verify_dp(manifest, _config(), tmp_path / "x", fault="less-privacy")
    with pytest.raises(ConfigError, match="noise factor"):
        parse_fault("low-noise")
    with pytest.raises(ConfigError, match="torchrun"):   # a per-rank fault needs ranks
        verify_dp(manifest, _config(), tmp_path / "x", gradient_canaries=M, fault="rank-noise")
    with pytest.raises(ConfigError, match="trainable parameters"):   # one parameter block per canary
        verify_dp(manifest, _config(), tmp_path / "x", gradient_canaries=30000)
    assert not (tmp_path / "x" / "verify.json").exists()


DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from privaudit.backends.verify_dp import verify_dp
from privaudit.config import DPConfig, TrainConfig
from privaudit.data.manifest import load_manifest
from privaudit.tasks import create_task
manifest = load_manifest(sys.argv[1], task=create_task("cxr"))
config = TrainConfig(task="cxr", image_size=16, width=4, epochs=2, batch_size=32, physical_batch_size=4096,
                     device="cpu", dp=DPConfig(epsilon=None, noise_multiplier=1.0))
verify_dp(manifest, config, sys.argv[2], gradient_canaries=1000, ideal_reps=3)
"""


def test_rank_noise_under_torchrun_is_a_violation(manifest, tmp_path):
    """Two gloo processes; each adds noise sigma / 2 (a naive data-parallel port), so the all-reduced sum holds
    sigma / sqrt(2): the noise check sees it. The fault comes through the environment, as from outside."""
    pytest.importorskip("torch.distributed")
    script = tmp_path / "run_verify.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PRIVAUDIT_TEST_FAULT": "rank-noise",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "v"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(manifest.source), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "verify.json").read_text())
    assert res["run"]["world_size"] == 2 and res["fault"]["name"] == "rank-noise"
    assert res["verdict"] == whitebox.VIOLATION and "noise" in res["fired"]
    assert res["tests"]["noise"]["std_ratio"] == pytest.approx(2**-0.5, abs=0.02)
    # the sampler and clipping are right: only the noise is short
    assert 0.6 < res["tests"]["sampling"]["rate_ratio"] < 1.4


# ---- from the command line ------------------------------------------------------------------------------------
def test_cli_verify_dp_exit_codes(tmp_path, monkeypatch):
    from conftest import invoke
    from privaudit.data.synth_cxr import synthesize_cxr

    path = synthesize_cxr(tmp_path / "cohort", n=120, image_size=16, seed=3)
    args = ["verify-dp", "cxr", "--data", path, "--image-size", "16", "--width", "4", "--epochs", "2",
            "--batch-size", "32", "--physical-batch-size", "4096", "--noise-multiplier", "1.0", "--device", "cpu",
            "--gradient-canaries", "200", "--quiet"]
    res = invoke(*args, "--out", tmp_path / "ok")
    assert res.exit_code == 0, res.output + res.stderr
    assert json.loads((tmp_path / "ok" / "verify.json").read_text())["verdict"] == whitebox.NO_VIOLATION
    monkeypatch.setenv("PRIVAUDIT_TEST_FAULT", "no-clipping")
    res = invoke(*args, "--out", tmp_path / "bad")
    assert res.exit_code == 1, res.output + res.stderr
    assert "violation" in res.output and json.loads((tmp_path / "bad" / "verify.json").read_text())["fault"]
    res = invoke(*args, "--out", tmp_path / "bad")   # verify.json there already: refused, one line
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
