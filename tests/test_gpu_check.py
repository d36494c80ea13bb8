"""benchmarks/gpu_check.sh runs end to end on CPU at tiny sizes (GPU_CHECK_TINY=1), as it does on the GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_runs_on_cpu_tiny(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "GPU_CHECK_TINY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PRIVAUDIT_WHEELS": str(tmp_path / "no-wheels")}   # opacus and monai are installed here
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "# gpu_check on cpu" in text and "# cxr: resnet9-gn 2D" in text and "# pdac: cnn3d-gn 3D" in text
    res = json.loads(out.read_text())
    assert [m["name"] for m in res["models"]] == ["cxr", "pdac"]
    assert res["models"][0]["input"] == [1, 32, 32] and res["models"][1]["input"] == [1, 16, 16, 16]
    for model in res["models"]:
        rows = {r["mode"]: r for r in model["rows"]}
        assert list(rows) == ["non-dp", "hooks", "ew", "ghost"]
        assert all("skipped" not in r for r in rows.values()), rows
        assert rows["non-dp"]["ratio_to_non_dp"] == 1.0
        for mode, r in rows.items():
            assert r["images_per_s"] > 0 and r["batch"] == (4 if model["name"] == "cxr" else 2)
            assert r["ratio_to_non_dp"] == pytest.approx(r["images_per_s"] / rows["non-dp"]["images_per_s"])
            assert r["peak_gib"] is None and r["ran_as"] == mode      # no GPU memory to report on CPU
            line = next(ln for ln in text.splitlines() if ln.startswith(f"{mode:<8}{r['batch']:>7}"))
            assert f"{r['ratio_to_non_dp']:.2f}x" in line


def test_gpu_check_says_how_to_get_missing_wheels(tmp_path):
    """Without opacus and without wheels, one line on stderr and exit 2 (here: a Python that lacks opacus)."""
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\nexit 1\n")   # every import fails
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PRIVAUDIT_WHEELS": str(tmp_path / "none")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "holds no wheels" in proc.stderr and proc.stderr.count("\n") == 1


def _load_gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_largest_batch_search_on_a_pretend_gpu(monkeypatch):
    """The batch search as it runs on CUDA: doubling to the first failure, then bisection; errors at big batches."""
    import argparse

    import torch

    gc_ = _load_gpu_check()
    cuda = torch.device("cuda")   # only its .type is read: fits is replaced below
    args = argparse.Namespace(start=16, max_batch=4096, refine=2)
    tried = []

    def fake_fits(mode, model, batch, shape, n_labels, device, *, first):
        tried.append(batch)
        return batch <= 100

    monkeypatch.setattr(gc_, "fits", fake_fits)
    assert gc_.largest_batch("hooks", None, (1, 8, 8), 5, cuda, args) == 96
    assert tried == [16, 32, 64, 128, 96, 112]
    args.max_batch = 40                                   # the cap stops the doubling
    assert gc_.largest_batch("hooks", None, (1, 8, 8), 5, cuda, args) == 32
    tried.clear()
    monkeypatch.setattr(gc_, "fits", lambda *a, **k: False)
    assert gc_.largest_batch("hooks", None, (1, 8, 8), 5, cuda, args) is None

    # fits itself: out of memory is "no"; another runtime error is "no" above the first batch, raised at it
    class Boom:
        def __init__(self, mode, model, batch, *rest):
            if batch > 64:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            if batch > 32:
                raise RuntimeError("invalid configuration argument")
            if batch == 8:
                raise RuntimeError("unsupported layer")

        def step(self):
            pass

        def close(self):
            pass

    mod = _load_gpu_check()                               # a fresh copy, with the real fits
    monkeypatch.setattr(mod, "Runner", Boom)
    cpu = torch.device("cpu")
    assert mod.fits("ew", None, 16, (1,), 1, cpu, first=16) is True
    assert mod.fits("ew", None, 128, (1,), 1, cpu, first=16) is False
    assert mod.fits("ew", None, 48, (1,), 1, cpu, first=16) is False
    with pytest.raises(RuntimeError, match="unsupported layer"):
        mod.fits("ew", None, 8, (1,), 1, cpu, first=8)
