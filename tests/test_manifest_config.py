"""Manifest contract, task registry, age groups and configuration checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from privaudit.config import DPConfig, TrainConfig, default_delta
from privaudit.data.manifest import assign_patient_splits, validate_manifest
from privaudit.errors import ConfigError, DataError, RegistryError
from privaudit.tasks import AGE_GROUPS, age_group, create_task

CXR = create_task("cxr")


def test_cxr_task_matches_the_paper():
    assert CXR.labels == ("cardiomegaly", "congestion", "pleural_effusion", "pneumonic_infiltrates", "atelectasis")
    assert CXR.attributes == ("sex", "age_group", "comorbidity")
    with pytest.raises(RegistryError, match="unknown task 'cxrr'.*Did you mean 'cxr'"):
        create_task("cxrr")


def test_age_groups_are_half_open_in_years():
    ages = [0, 30, 30.9, 31, 60, 61, 70, 71, 80, 81, 104, None]
    got = list(age_group(ages))
    assert got == ["0-30", "0-30", "0-30", "31-60", "31-60", "61-70", "61-70", "71-80", "71-80", "81+", "81+", None]
    assert AGE_GROUPS == ("0-30", "31-60", "61-70", "71-80", "81+")


@pytest.mark.parametrize("n,expected", [(100, 6e-3), (2000, 2e-4), (2100, 2e-4), (10_000, 3e-5), (200_000, 1e-6)])
def test_default_delta_is_one_over_n_to_the_1_1_rounded_down(n, expected):
    exact = 1 / n**1.1
    assert default_delta(n) == pytest.approx(expected)
    assert default_delta(n) <= exact < 1 / n


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ConfigError, match="1/N"):
        DPConfig(delta=0.01).resolve_delta(100)
    assert DPConfig(delta=0.001).resolve_delta(100).delta == 0.001


@pytest.mark.parametrize("kw,needle", [
    ({"epsilon": 0}, "positive"), ({"epsilon": -2}, "positive"), ({"accountant": "moments"}, "accountant"),
    ({"epsilon": None, "noise_multiplier": None}, "epsilon or noise_multiplier"),
    ({"epsilon": 3.0, "noise_multiplier": 1.0}, "not both"), ({"poisson_sampling": False}, "Poisson"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
])
def test_dp_config_refuses_bad_settings(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        DPConfig(**kw)


def test_train_config_roundtrip():
    cfg = TrainConfig(epochs=2, dp=DPConfig(epsilon=3.0))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown training option 'epoch'"):
        TrainConfig.from_dict({"epoch": 3})


def _frame(n=12):
    return pd.DataFrame({
        "sample_id": [f"s{i}" for i in range(n)], "path": [f"i{i}.png" for i in range(n)],
        "split": ["train"] * (n - 4) + ["val"] * 2 + ["test"] * 2, "patient_id": [f"p{i}" for i in range(n)],
        **{lab: ["1", "0", ""] * (n // 3) for lab in CXR.labels}, "sex": ["F", "M", "female"] * (n // 3),
        "age": [str(20 + i) for i in range(n)],
    })


def _validate(df, **kw):
    return validate_manifest(df, task=CXR, source="m.csv", root=".", check_files=False, **kw)


def test_valid_manifest_is_canonical():
    m = _validate(_frame())
    assert m.frame["cardiomegaly"].isna().sum() == 4  # blank = unknown
    assert set(m.frame["sex"]) == {"F", "M"}
    assert m.frame["age"].dtype.kind == "f"


def test_label_subset():
    df = _frame().drop(columns=["atelectasis"])
    m = _validate(df, labels=("cardiomegaly", "congestion"))
    assert m.labels == ("cardiomegaly", "congestion")
    with pytest.raises(DataError, match="missing label column 'atelectasis'"):
        _validate(df)


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.drop(columns=["path"]), "missing required column 'path'"),
    (lambda d: d.assign(congestion=["maybe"] + list(d["congestion"][1:])), "'maybe'"),
    (lambda d: d.assign(split=["train"] * 11 + ["dev"]), "'dev'"),
    (lambda d: d.assign(patient_id=["p0"] * 2 + list(d["patient_id"][2:]), split=["train", "test"] + list(d["split"][2:])),
     "patient 'p0' appears in splits test, train"),
    (lambda d: d.assign(sex=["X"] + list(d["sex"][1:])), "column 'sex' holds 'X'"),
    (lambda d: d.assign(age=["abc"] + list(d["age"][1:])), "column 'age' holds 'abc'"),
    (lambda d: d.assign(sample_id=["s0"] * 12), "appears more than once"),
    (lambda d: d.iloc[0:0], "no rows"),
])
def test_manifest_errors_name_the_column_and_value(mutate, needle):
    with pytest.raises(DataError, match=needle):
        _validate(mutate(_frame()))


def test_missing_split_column_gives_seeded_patient_level_splits():
    df = _frame(30).drop(columns=["split"])
    df["patient_id"] = [f"p{i // 3}" for i in range(30)]  # three images per patient
    a = _validate(df, seed=1).frame
    b = _validate(df, seed=1).frame
    assert (a["split"] == b["split"]).all()
    assert (a.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(a["split"]) == {"train", "val", "test"}
    other = assign_patient_splits(df, seed=2)
    assert not np.array_equal(other.to_numpy(), a["split"].to_numpy())
