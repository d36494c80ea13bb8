"""Shared fixtures: tiny synthetic cohorts and one tiny train-and-audit study, made once per test worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two xdist workers on two cores: one thread each

TINY = ["--n-samples", "60", "--image-size", "32", "--epochs", "1", "--width", "4", "--batch-size", "4",
        "--physical-batch-size", "32", "--n-boot", "100", "--quiet"]


def invoke(*args):
    """Run the CLI in-process and return typer's Result (stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from privaudit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A 60-image synthetic CXR cohort at 32x32; returns its manifest.csv."""
    from privaudit.data.synth_cxr import synthesize_cxr

    return synthesize_cxr(tmp_path_factory.mktemp("cohort"), n=60, image_size=32, seed=3)


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Path:
    """One tiny train-and-audit study (private + non-private), shared by the tests that read its files."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("study") / "study"
    # a larger cohort than TINY's 60, so that the test split holds both classes of every label
    res = invoke("train-and-audit", "cxr", "--backend", "opacus", *TINY, "--n-samples", "160", "--out", out)
    assert res.exit_code == 0, res.output + (res.stderr or "")
    return out


@pytest.fixture(scope="session")
def patient_cohort(tmp_path_factory) -> Path:
    """A 120-image synthetic CXR cohort at 16x16 whose patients (re-assigned within each split) have 1 to 6
    images, about 3 on average; returns its manifest.csv."""
    import numpy as np
    import pandas as pd

    from privaudit.data.synth_cxr import synthesize_cxr

    src = synthesize_cxr(tmp_path_factory.mktemp("patient-cohort"), n=120, image_size=16, seed=4)
    frame = pd.read_csv(src, dtype=str)
    ids = np.empty(len(frame), dtype=object)
    cycle = [3, 1, 5, 2, 6, 4, 2, 3]
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(frame["split"].to_numpy() == split)
        start, j = 0, 0
        while start < len(rows):
            k = cycle[j % len(cycle)]
            ids[rows[start:start + k]] = f"{split}-p{j:03d}"
            start, j = start + k, j + 1
    frame["patient_id"] = ids
    out = src.parent / "patients.csv"
    frame.to_csv(out, index=False)
    return out
