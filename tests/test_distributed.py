"""torchrun data-parallel DP training: a 2-process gloo run earns the same epsilon in the same steps as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import invoke

TRAIN = ["--image-size", "32", "--epochs", "1", "--width", "4", "--batch-size", "16", "--epsilon", "8", "--quiet"]


def one_image_per_patient(cohort: Path, folder: Path) -> Path:
    """The cohort with every image its own patient, so that one process and torchrun (where patient-level DP
    is not available yet) both train image-level DP."""
    import pandas as pd

    frame = pd.read_csv(cohort, dtype=str)
    frame = frame.assign(patient_id=frame["sample_id"], path=[str(cohort.parent / p) for p in frame["path"]])
    folder.mkdir()
    frame.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_two_process_torchrun_matches_single_process(cohort, tmp_path):
    pytest.importorskip("torch.distributed")
    cohort = one_image_per_patient(cohort, tmp_path / "data")
    single = tmp_path / "single"
    res = invoke("train", "cxr", "--data", cohort, *TRAIN, "--out", single)
    assert res.exit_code == 0, res.output + (res.stderr or "")

    scratch = tmp_path / "tmp"          # where the non-zero rank keeps its scratch run directory
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch), "PYTHONUNBUFFERED": "1"}
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "privaudit", "train", "cxr", "--data", str(cohort), *TRAIN, "--out", str(ddp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one = json.loads((single / "train.json").read_text())
    two = json.loads((ddp / "train.json").read_text())
    assert two["distributed"] == {"world_size": 2, "backend": "gloo", "launcher": "torchrun",
                                  "data_parallel": "opacus DPDDP"}
    assert one["distributed"] is None
    # the accountant counts the global batch: same sample rate, noise, steps and so the same epsilon
    assert two["steps"] == one["steps"] > 0
    assert two["sample_rate"] == pytest.approx(one["sample_rate"])
    assert two["noise_multiplier"] == pytest.approx(one["noise_multiplier"])
    assert two["epsilon"] == pytest.approx(one["epsilon"], rel=1e-9)
    assert two["accountant_history"] == one["accountant_history"]
    assert two["history"][-1]["steps"] == two["steps"]
    assert two["privacy_unit"] == one["privacy_unit"] == "image" and two["warnings"] == []
    # only rank 0 wrote: one run directory, nothing half-written beside it, the other rank's scratch gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ddp", "single", "tmp"]
    assert (ddp / "predictions.csv").is_file() and (ddp / "model" / "weights.pt").is_file()
    assert not [p for p in scratch.iterdir() if p.name.startswith("privaudit-")]
    assert proc.stdout.count("run written to") == 1


def test_auto_unit_under_torchrun_is_the_image_with_a_warning(cohort, monkeypatch):
    """Patient-level DP is not available under torchrun yet: left unset, the unit is the image, with a warning
    that says why; asked for, it is refused with one line."""
    from privaudit.backends._plan import plan_training
    from privaudit.config import DPConfig, TrainConfig
    from privaudit.data.manifest import load_manifest
    from privaudit.errors import ConfigError
    from privaudit.tasks import create_task

    task = create_task("cxr")
    manifest = load_manifest(cohort, task=task)
    assert manifest.split("train")["patient_id"].duplicated().any()   # several images per patient
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    plan = plan_training(manifest, TrainConfig(batch_size=16, dp=DPConfig()), task, 32)
    assert plan.privacy_unit == "image" and plan.n_units == plan.n_train
    assert len(plan.warnings) == 1 and "not available under torchrun yet" in plan.warnings[0]
    with pytest.raises(ConfigError, match="not available under torchrun yet"):
        plan_training(manifest, TrainConfig(batch_size=16, dp=DPConfig(), privacy_unit="patient"), task, 32)


def test_data_parallel_step_equals_single_process_step(tmp_path):
    """Per-sample clipping, the all-reduce and the scaling: 2 ranks on uneven halves = 1 process on the batch."""
    out = tmp_path / "oracle.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    script = Path(__file__).with_name("ddp_oracle.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res) == {"hooks", "ew", "ghost", "fast"}
    for mode, r in res.items():
        assert r["moved"] > 1e-3, mode                      # the step did move the weights...
        assert r["max_diff"] < 1e-6, (mode, r)              # ...and both set-ups moved them alike


@pytest.fixture
def two_ranks(monkeypatch):
    """Make Opacus' samplers believe they run as rank ``r`` of 2, without a process group."""
    import torch.distributed as dist

    state = {"rank": 0}
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: state["rank"])
    return state


def test_every_step_sampler_keeps_ranks_in_step(two_ranks):
    import torch
    from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler

    from privaudit.backends.distributed import _every_step_sampler_class

    n, q, steps = 21, 1 / 21, 300    # local shards of ~10: an empty local batch about a third of the time
    batches, opacus_counts = {}, {}
    for rank in (0, 1):
        two_ranks["rank"] = rank
        ours = _every_step_sampler_class()(total_size=n, sample_rate=q, shuffle_seed=5, steps=steps,
                                           generator=torch.Generator().manual_seed(rank))
        theirs = DistributedUniformWithReplacementSampler(total_size=n, sample_rate=q, shuffle_seed=5, steps=steps,
                                                          generator=torch.Generator().manual_seed(rank))
        batches[rank] = [b.tolist() for b in ours]
        opacus_counts[rank] = len(list(theirs))
    # every rank runs every step, empty or not; Opacus' own sampler drops the empty ones
    assert len(batches[0]) == len(batches[1]) == steps
    assert any(len(b) == 0 for b in batches[0]) and any(len(b) == 0 for b in batches[1])
    assert opacus_counts[0] < steps and opacus_counts[1] < steps
    # the shards are disjoint and cover the training set
    seen = [set().union(*map(set, batches[r])) for r in (0, 1)]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))
    # each sample joins a step with probability q, whichever rank holds it (Poisson sampling of the whole set)
    counts = torch.zeros(n)
    for r in (0, 1):
        for b in batches[r]:
            counts[b] += 1
    rate = counts / steps
    assert abs(float(rate.mean()) - q) < 0.01
    # the ranks draw independent coins: with one shared seed, their batch sizes would move together
    sizes = torch.tensor([[len(a), len(b)] for a, b in zip(batches[0], batches[1])], dtype=torch.float)
    assert abs(float(torch.corrcoef(sizes.T)[0, 1])) < 0.3


def test_rank_zero_out_and_env(monkeypatch, tmp_path):
    from privaudit.backends import distributed
    from privaudit.errors import ConfigError

    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert distributed.launch_env() is None and distributed.is_main_process()
    with distributed.rank_zero_out(tmp_path / "out") as p:
        assert p == tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert distributed.launch_env() == (1, 2, 1) and not distributed.is_main_process()
    with distributed.rank_zero_out(tmp_path / "out") as p:
        assert p != tmp_path / "out"
        p.mkdir(parents=True)
        (p / "x").write_text("scratch")
    assert not p.exists() and not (tmp_path / "out").exists()
    # every other command refuses to run as one of several torchrun processes
    res = invoke("audit", tmp_path)
    assert res.exit_code == 2 and "under torchrun only 'privaudit train'" in res.stderr
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ConfigError, match="RANK='two' is not an integer"):
        distributed.launch_env()
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match=r"RANK=5 is outside 0\.\.1"):
        distributed.launch_env()
