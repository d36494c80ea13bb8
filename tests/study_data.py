"""Prediction tables shaped like a default ``privaudit train-and-audit cxr`` study, without training.

The default study trains on a synthetic cohort of 3,000 radiographs (about a quarter of the patients with 2-3
images; splits 70/10/20 by patient), audits the 5 CXR labels by sex, age group and comorbidity, and compares a
private model with a non-private one. :func:`default_study_predictions` makes prediction tables of that shape
(the report tests and ``benchmarks/report_pages.py`` render them); the non-private model has the stronger
signal and the larger membership gap (members' losses lower than non-members').
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CXR_LABELS = ("cardiomegaly", "congestion", "pleural_effusion", "pneumonic_infiltrates", "atelectasis")
DP_RUN = {"dp": True, "epsilon": 8.0, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 1.1,
          "sample_rate": 0.03, "steps": 160, "max_grad_norm": 1.0, "poisson_sampling": True,
          "backend": "opacus", "architecture": "resnet9-gn", "seed": 0}
NON_PRIVATE_RUN = {"dp": False, "backend": "opacus", "architecture": "resnet9-gn", "seed": 0}


def default_study_predictions(n: int = 3000, seed: int = 0) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """({"private": df, "non_private": df}, runs): the same images, labels and attributes, two models."""
    rng = np.random.default_rng(seed)
    n_patients = int(n / 1.3)
    per = np.ones(n_patients, int)
    extra = rng.random(n_patients) < 0.25
    per[extra] += rng.integers(1, 3, extra.sum())
    patient = np.repeat(np.arange(n_patients), per)[:n]
    p_split = rng.choice(["train", "val", "test"], n_patients, p=[0.7, 0.1, 0.2])
    p_sex = rng.choice(["F", "M"], n_patients)
    p_age = (18 + 77 * rng.beta(1.8, 1.3, n_patients)).astype(int)
    p_com = (rng.random(n_patients) < 1 / (1 + np.exp(-(-0.7 + 0.45 * (p_age - 60) / 10)))).astype(int)
    age = np.minimum(p_age[patient] + rng.integers(0, 2, n), 95)
    df = pd.DataFrame({"sample_id": [f"img{i:05d}" for i in range(n)], "split": p_split[patient],
                       "patient_id": [f"PRV{p:05d}" for p in patient], "sex": p_sex[patient], "age": age,
                       "comorbidity": p_com[patient]})
    df["member"] = (df["split"] == "train").astype(int)
    member = df["member"].to_numpy() == 1
    visibility = np.where(age > 80, 0.5, np.where(age > 70, 0.75, 1.0)) * np.where(df["sex"] == "F", 0.9, 1.0)
    labels = {}
    for j, lab in enumerate(CXR_LABELS):
        y = (rng.random(n) < 0.12 + 0.06 * j).astype(float)
        y[rng.random(n) < 0.02] = np.nan  # an unknown label
        labels[lab] = y
    models = {}
    for name, signal, fit in (("non_private", 1.6, 0.5), ("private", 1.1, 0.08)):
        out = df.copy()
        losses = []
        for j, lab in enumerate(CXR_LABELS):
            y = labels[lab]
            logit = signal * visibility * (2 * np.nan_to_num(y) - 1) + rng.normal(0, 1, n) - 1.0
            logit += np.where(member, fit * (2 * np.nan_to_num(y) - 1), 0.0)  # training members are fitted better
            p = 1 / (1 + np.exp(-logit))
            out[f"y_{lab}"], out[f"p_{lab}"] = y, p
            pc = np.clip(p, 1e-7, 1 - 1e-7)
            losses.append(np.where(np.isnan(y), np.nan, -(np.nan_to_num(y) * np.log(pc)
                                                          + (1 - np.nan_to_num(y)) * np.log1p(-pc))))
        out["loss"] = np.nanmean(np.vstack(losses), axis=0)
        models[name] = out
    return models, {"private": DP_RUN, "non_private": NON_PRIVATE_RUN}
