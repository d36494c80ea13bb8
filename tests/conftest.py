"""Shared fixtures: tiny synthetic cohorts and one tiny train-and-audit study, made once per test worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two xdist workers on two cores: one thread each

TINY = ["--n-samples", "60", "--image-size", "32", "--epochs", "1", "--width", "4", "--batch-size", "4", "--physical-batch-size", "32",
        "--n-boot", "100", "--quiet"]


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
