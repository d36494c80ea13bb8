"""torchrun data-parallel DP training: a 2-process gloo run earns the same epsilon in the same steps as one process,
at image level and at patient level (patients sharded over the processes, one Poisson sample of patients)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke

TRAIN = ["--image-size", "32", "--epochs", "1", "--width", "4", "--batch-size", "16", "--epsilon", "8", "--quiet"]


def one_image_per_patient(cohort: Path, folder: Path) -> Path:
    """The cohort with every image its own patient, so that the unit is the image (the two units are then one
    mechanism) and the image-level Poisson loader is the one compared."""
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


def torchrun(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2`` of ``args``; the non-zero rank's scratch goes to tmp_path/tmp."""
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_two_process_patient_level_run_matches_single_process(cohort, tmp_path):
    """Patient-level DP under torchrun: the same unit, patients, sample rate, steps, noise and epsilon as one
    process, and the epsilon is Opacus' accountant at the patient rate, recomputed from the cohort."""
    pytest.importorskip("torch.distributed")
    import pandas as pd
    from opacus.accountants import PRVAccountant

    from privaudit.config import default_delta

    args = ["train", "cxr", "--data", cohort, "--image-size", "16", "--epochs", "1", "--width", "4", "--batch-size",
            "4", "--physical-batch-size", "16", "--epsilon", "8", "--privacy-unit", "patient", "--quiet"]
    single = tmp_path / "single"
    res = invoke(*args, "--out", single)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    ddp = tmp_path / "ddp"
    proc = torchrun(["-m", "privaudit", *args, "--out", ddp], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one = json.loads((single / "train.json").read_text())
    two = json.loads((ddp / "train.json").read_text())
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["data_parallel"] == "opacus DPDDP"
    frame = pd.read_csv(cohort, dtype=str)
    train = frame[frame["split"] == "train"]
    n_patients = train["patient_id"].nunique()
    assert n_patients < len(train)                          # several images per patient
    q, steps = 4 / n_patients, math.ceil(n_patients / 4)
    for tj in (one, two):
        assert tj["privacy_unit"] == tj["privacy"]["privacy_unit"] == "patient" and tj["warnings"] == []
        assert tj["n_units"] == n_patients and tj["n_train"] == len(train)
        assert tj["sample_rate"] == pytest.approx(q, rel=1e-12) and tj["steps"] == steps
        assert tj["delta"] == default_delta(n_patients)
        assert tj["history"][-1]["steps"] == steps
    for key in ("epsilon", "noise_multiplier", "delta", "sample_rate"):
        assert two[key] == pytest.approx(one[key], rel=1e-12), key
    assert two["accountant_history"] == one["accountant_history"]
    acc = PRVAccountant()
    acc.history = [(two["noise_multiplier"], q, steps)]
    assert two["epsilon"] == pytest.approx(acc.get_epsilon(delta=two["delta"]), rel=1e-6)
    assert two["epsilon"] <= 8 + 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single", "tmp"]
    assert not [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("privaudit-")]
    assert proc.stdout.count("run written to") == 1


def test_auto_unit_under_torchrun_is_the_patient(cohort, monkeypatch):
    """Under torchrun, as in one process, the unit left unset is the patient (several images per patient),
    without a warning, and asking for it is accepted."""
    from privaudit.backends._plan import plan_training
    from privaudit.config import DPConfig, TrainConfig
    from privaudit.data.manifest import load_manifest
    from privaudit.tasks import create_task

    task = create_task("cxr")
    manifest = load_manifest(cohort, task=task)
    assert manifest.split("train")["patient_id"].duplicated().any()   # several images per patient
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    n_patients = manifest.split("train")["patient_id"].nunique()
    for unit in (None, "patient"):
        plan = plan_training(manifest, TrainConfig(batch_size=4, dp=DPConfig(), privacy_unit=unit), task, 32)
        assert plan.privacy_unit == "patient" and plan.n_units == n_patients and plan.warnings == ()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_patient_sampler_is_one_poisson_sample_of_patients(world):
    """Each rank draws its shard at the global rate q from its own generator: every patient on exactly one rank
    with all its images, every rank the same number of steps, and the union over the ranks includes each patient
    with probability q (chi-square), independently across ranks (the union's size is Binomial(patients, q))."""
    from scipy import stats

    from privaudit.backends._units import PatientSampler
    from privaudit.backends.distributed import DistContext, patient_shard, sampling_seed

    rng = np.random.default_rng(0)
    n, q, steps, physical, seed = 41, 0.15, 3000, 9, 7
    sizes = rng.integers(1, 7, size=n)                          # 41 patients of 1 to 6 images
    units = rng.permutation(np.repeat(np.arange(n), sizes))     # dataset items in any order
    samplers = []
    for rank in range(world):
        ctx = DistContext(device=None, rank=rank, world_size=world)
        samplers.append(PatientSampler(units, n, q, steps=steps, physical=physical, seed=sampling_seed(seed, ctx),
                                       shard=patient_shard(n, ctx, seed=seed)))
    shards = [set(s.shard.tolist()) for s in samplers]
    assert set().union(*shards) == set(range(n)) and sum(map(len, shards)) == n    # disjoint, covering
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(len(s) == steps for s in samplers)
    counts, sizes_per_rank = np.zeros(n), np.zeros((steps, world))
    for t in range(steps):
        for r, s in enumerate(samplers):
            chosen = s.draw()
            assert set(chosen.tolist()) <= shards[r]
            counts[chosen] += 1
            sizes_per_rank[t, r] = len(chosen)
            batches = s.pack(chosen)      # an empty draw still gives the one (empty, last) batch of the step
            assert [b.last for b in batches] == [False] * (len(batches) - 1) + [True]
            items = np.concatenate([b.items for b in batches])
            assert sorted(items.tolist()) == sorted(np.flatnonzero(np.isin(units, chosen)).tolist())
    chi2 = float((((counts - steps * q) ** 2) / (steps * q * (1 - q))).sum())
    assert stats.chi2.sf(chi2, df=n) > 0.01, chi2
    union = sizes_per_rank.sum(1)
    assert abs(union.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / steps)
    assert 0.9 < union.var() / (n * q * (1 - q)) < 1.1       # a shared seed across ranks would inflate it
    corr = np.corrcoef(sizes_per_rank.T)[np.triu_indices(world, 1)]
    assert np.abs(corr).max() < 0.1
    assert (sizes_per_rank == 0).any()                         # empty local draws happened, and took their step


def test_one_process_patient_sampler_draws_every_patient_as_before():
    """Without torchrun the shard is every patient, and the draws are those of one generator over all of them."""
    from privaudit.backends._units import PatientSampler
    from privaudit.backends.distributed import DistContext, patient_shard

    units = np.repeat(np.arange(10), 2)
    assert patient_shard(10, DistContext(device=None), seed=1) is None
    s = PatientSampler(units, 10, 0.3, steps=5, physical=4, seed=3)
    ref = np.random.default_rng(3)
    for _ in range(5):
        assert s.draw().tolist() == np.flatnonzero(ref.random(10) < 0.3).tolist()


def test_data_parallel_step_equals_single_process_step(tmp_path):
    """Per-sample clipping, the all-reduce and the scaling: 2 ranks on uneven halves = 1 process on the batch."""
    out = tmp_path / "oracle.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    script = Path(__file__).with_name("ddp_oracle.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    noise = res.pop("patient-noise")
    patient = {k: res.pop(k) for k in list(res) if k.startswith("patient-")}
    assert set(res) == {"hooks", "ew", "ghost", "fast"}
    for mode, r in res.items():
        assert r["moved"] > 1e-3, mode                      # the step did move the weights...
        assert r["max_diff"] < 1e-6, (mode, r)              # ...and both set-ups moved them alike
    # patient level: patients split by rank (unevenly; rank 0 drawing none), several physical batches a rank
    assert set(patient) == {f"patient-{m}-{c}" for m in ("hooks", "fast") for c in ("uneven", "rank0-empty")}
    for case, r in patient.items():
        assert r["moved"] > 1e-4, case
        assert r["max_diff"] < 1e-3 * r["moved"], (case, r)     # = one process on the same patients
        assert r["naive_diff"] < 1e-3 * r["moved"], (case, r)   # = clip each patient's summed gradient, add, / 8
    # the noise alone (no patient drawn anywhere): sigma C / expected patients, added once and not per rank
    assert abs(noise["std"] / noise["expected"] - 1) < 0.05, noise


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
