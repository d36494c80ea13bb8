"""Task registry: what a task predicts, from what input, and for which sensitive attributes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from privaudit.errors import unknown_name

# The paper's age groups, half-open in whole years: "0-30" is age < 31, then 31-60, 61-70, 71-80, 81+.
AGE_EDGES: tuple[int, ...] = (0, 31, 61, 71, 81)
AGE_GROUPS: tuple[str, ...] = ("0-30", "31-60", "61-70", "71-80", "81+")


def parse_age_edges(text: str) -> tuple[int, ...]:
    """Parse ``"31,61,71,81"`` (the lower edges after 0) into AGE_EDGES-style edges."""
    edges = [0] + [int(x) for x in text.split(",") if x.strip()]
    if any(b <= a for a, b in zip(edges, edges[1:])):
        from privaudit.errors import ConfigError

        raise ConfigError(f"age bins {text!r} must be increasing whole years, e.g. 31,61,71,81")
    return tuple(edges)


def age_group_labels(edges: tuple[int, ...] = AGE_EDGES) -> tuple[str, ...]:
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]
    labels.append(f"{edges[-1]}+")
    return tuple(labels)


def age_group(age, edges: tuple[int, ...] = AGE_EDGES) -> pd.Series:
    """Map ages in years to the half-open age groups; missing ages stay missing."""
    age = pd.to_numeric(pd.Series(age), errors="coerce")
    labels = age_group_labels(edges)
    idx = np.searchsorted(np.asarray(edges[1:], dtype=float), np.floor(age.to_numpy(dtype=float)), side="right")
    out = pd.Series([labels[i] if i < len(labels) else None for i in idx], index=age.index, dtype=object)
    out[age.isna()] = None
    return out


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task."""

    name: str
    labels: tuple[str, ...]          # one 0/1 column per label in the manifest
    spatial_dims: int                # 2 for radiographs, 3 for CT volumes
    input_size: int                  # default edge length in pixels / voxels
    in_channels: int                 # image channels the model sees
    attributes: tuple[str, ...]      # sensitive attributes audited by default
    default_arch: str                # model used when none is named
    description: str = ""
    label_docs: dict = field(default_factory=dict)
    # Defaults of the options a user leaves out (epochs, batch_size, width, lr, n_samples); see default().
    defaults: dict = field(default_factory=dict)

    def default(self, option: str):
        """This task's default for a training or synthetic-cohort option, else the generic one."""
        return self.defaults.get(option, GENERIC_DEFAULTS[option])


# Option defaults shared by every task unless its TaskSpec.defaults says otherwise (cxr uses these).
GENERIC_DEFAULTS: dict = {"epochs": 5, "batch_size": 64, "width": 32, "lr": 2e-3, "n_samples": 3000}


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    _TASKS[spec.name] = spec
    return spec


def create_task(name: str) -> TaskSpec:
    try:
        return _TASKS[name]
    except KeyError:
        raise unknown_name("task", name, _TASKS) from None


def list_tasks() -> list[str]:
    return sorted(_TASKS)


register_task(
    TaskSpec(
        name="cxr",
        labels=("cardiomegaly", "congestion", "pleural_effusion", "pneumonic_infiltrates", "atelectasis"),
        spatial_dims=2,
        input_size=64,
        in_channels=1,
        attributes=("sex", "age_group", "comorbidity"),
        default_arch="resnet9-gn",
        description="Multi-label chest radiograph classification (the UKA-CXR findings of arXiv:2302.01622).",
    )
)

register_task(
    TaskSpec(
        name="pdac",
        labels=("pdac",),
        spatial_dims=3,
        input_size=32,
        in_channels=1,
        # site: scanner or source, a known shortcut in public pancreas data (tumour and control scans come
        # from different archives)
        attributes=("sex", "age_group", "site"),
        default_arch="cnn3d-gn",
        description="Pancreatic ductal adenocarcinoma present or not in an abdominal CT volume "
                    "(the paper's second task, N=1,625).",
        label_docs={"pdac": "1 when the volume shows a pancreatic ductal adenocarcinoma (in the msd preset: "
                            "when the segmentation holds the tumour class)"},
        # Measured on 2 CPU cores: DP + non-private in a few minutes, non-private AUROC about 0.8 (README).
        defaults={"epochs": 15, "batch_size": 16, "width": 16, "lr": 5e-4, "n_samples": 400},
    )
)
