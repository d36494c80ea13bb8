"""``run_audit``: from prediction tables to one study's ``audit.json`` document.

Utility and fairness use the test split. One :class:`~privaudit.audit.utility.Resampler` is drawn for the
study, so every model, label and group is resampled with the same indices and differences are paired.
"""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata

import numpy as np
import pandas as pd

from privaudit import __version__
from privaudit.audit.results import SCHEMA_VERSION, AuditReport
from privaudit.audit.utility import Resampler, paired_p_value, percentile_ci, weighted_auroc
from privaudit.config import AuditConfig
from privaudit.errors import DataError
from privaudit.predictions import labels_of, validate_predictions
from privaudit.tasks import AGE_EDGES, age_group

PRIVACY_KEYS = ("epsilon", "delta", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate", "steps",
                "poisson_sampling")
MIN_GROUP_N = 10  # below this many test samples a group's AUROC is not reported


def _versions() -> dict:
    out = {"privaudit": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "pandas", "scikit-learn", "scipy", "fairlearn", "aif360", "torch", "opacus"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _est(point: float, boots: np.ndarray, ci: float, *, n_boot: bool = False) -> dict:
    lo, hi, n_ok = percentile_ci(boots, ci)
    out = {"estimate": point if np.isfinite(point) else None, "ci_low": lo, "ci_high": hi}
    if n_boot:
        out.update({"n_boot": n_ok, "ci_method": "percentile"})
    return out


class _Study:
    """Shared state of one audit: aligned test tables, the resampler, and the warnings collected."""

    def __init__(self, frames: dict[str, pd.DataFrame], config: AuditConfig, age_edges):
        self.config = config
        self.warnings: list[str] = []
        names = list(frames)
        first = frames[names[0]]
        self.labels = labels_of(first)
        for name in names[1:]:
            if labels_of(frames[name]) != self.labels:
                raise DataError(f"model {name!r} has labels {labels_of(frames[name])} but {names[0]!r} has "
                                f"{self.labels}; paired audits need the same labels")
        self.full = frames
        test = {}
        for name, df in frames.items():
            t = df[df["split"] == "test"]
            if len(t) == 0:
                raise DataError(f"model {name!r}: no rows with split 'test'; the audit measures the test split")
            test[name] = t.set_index("sample_id")
        ref_ids = test[names[0]].index
        for name in names[1:]:
            ids = test[name].index
            if len(ids) != len(ref_ids) or not ids.isin(ref_ids).all():
                missing = ref_ids.difference(ids)
                example = missing[0] if len(missing) else ids.difference(ref_ids)[0]
                raise DataError(f"models {names[0]!r} and {name!r} were not scored on the same test samples "
                                f"(e.g. sample_id {example!r}); paired comparisons need identical test sets")
            test[name] = test[name].loc[ref_ids]
        self.test = test
        ref = test[names[0]]
        self.n = len(ref)
        self.y = {lab: ref[f"y_{lab}"].to_numpy(dtype=float) for lab in self.labels}
        for name in names[1:]:
            for lab in self.labels:
                other = test[name][f"y_{lab}"].to_numpy(dtype=float)
                if not np.array_equal(np.isnan(other), np.isnan(self.y[lab])) or not np.allclose(
                        np.nan_to_num(other), np.nan_to_num(self.y[lab])):
                    raise DataError(f"models {names[0]!r} and {name!r} disagree on y_{lab} for the same samples; "
                                    "they must be scored against the same labels")
        clusters = ref["patient_id"].to_numpy() if "patient_id" in ref.columns else None
        if clusters is None and config.cluster:
            self.warnings.append("no patient_id column: resampling images, which understates the CI width if "
                                 "patients have several images")
        self.resampler = Resampler(self.n, n_boot=config.n_boot, seed=config.seed, clusters=clusters,
                                   cluster=config.cluster)
        self.W = self.resampler.weights
        self.attributes = self._attributes(ref, age_edges)

    def _attributes(self, ref: pd.DataFrame, age_edges) -> dict[str, np.ndarray]:
        attrs = {}
        if "sex" in ref.columns:
            attrs["sex"] = ref["sex"].astype(object).where(ref["sex"].notna(), None).to_numpy()
        if "age" in ref.columns:
            attrs["age_group"] = age_group(ref["age"].to_numpy(), age_edges).to_numpy()
        for col in ("comorbidity", "site"):
            if col in ref.columns:
                v = ref[col]
                attrs[col] = np.array([None if pd.isna(x) else str(int(x)) if isinstance(x, float) and float(x).is_integer()
                                       else str(x) for x in v], dtype=object)
        return attrs

    # ---- utility ------------------------------------------------------------------------------------------
    def auroc_boot(self, name: str, lab: str, mask: np.ndarray | None = None) -> tuple[float, np.ndarray, int, int]:
        """(point AUROC, bootstrap AUROCs, n, n_pos) for one model and label, on the known labels in ``mask``."""
        y = self.y[lab]
        keep = ~np.isnan(y) if mask is None else (~np.isnan(y) & mask)
        yk = y[keep]
        p = self.test[name][f"p_{lab}"].to_numpy(dtype=float)[keep]
        n, n_pos = int(keep.sum()), int(yk.sum())
        if n == 0:
            return float("nan"), np.full(self.config.n_boot, np.nan), 0, 0
        point = float(weighted_auroc(yk, p, np.ones((1, n)))[0])
        return point, weighted_auroc(yk, p, self.W[:, keep]), n, n_pos


def _utility(study: _Study, name: str, boots: dict) -> dict:
    ci = study.config.ci
    labels = {}
    points = []
    for lab in study.labels:
        point, b, n, n_pos = study.auroc_boot(name, lab)
        boots[(name, lab, None, None)] = (point, b)
        points.append(point)
        if not np.isfinite(point):
            study.warnings.append(f"{name}: AUROC of {lab} is null because the test split has "
                                  f"{'no samples with a known label' if n == 0 else 'only one class'} for it")
        labels[lab] = {"n": n, "n_pos": n_pos, "auroc": _est(point, b, ci, n_boot=True)}
    point = float(np.mean(points))
    b = np.mean(np.vstack([boots[(name, lab, None, None)][1] for lab in study.labels]), axis=0)
    boots[(name, "macro", None, None)] = (point, b)
    return {"labels": labels, "macro_auroc": _est(point, b, ci, n_boot=True), "n": study.n}


def _fairness(study: _Study, name: str, boots: dict) -> dict:
    ci = study.config.ci
    out = {}
    for attr, values in study.attributes.items():
        present = sorted({v for v in values if v is not None})
        if len(present) < 2:
            study.warnings.append(f"{name}: attribute {attr!r} has {len(present)} group(s) in the test split; "
                                  "its fairness metrics are skipped")
            continue
        per_label = {}
        for lab in list(study.labels) + ["macro"]:
            groups, group_boot = {}, {}
            for g in present:
                mask = values == g
                if lab == "macro":
                    parts = [study.auroc_boot(name, la, mask) for la in study.labels]
                    point = float(np.mean([p[0] for p in parts]))
                    b = np.mean(np.vstack([p[1] for p in parts]), axis=0)
                    n, n_pos = int(mask.sum()), None
                else:
                    point, b, n, n_pos = study.auroc_boot(name, lab, mask)
                if n < MIN_GROUP_N or not np.isfinite(point):
                    why = (f"only {n} test samples" if n < MIN_GROUP_N
                           else "a label in it is null" if lab == "macro" else "one class")
                    study.warnings.append(f"{name}: AUROC of {lab} for {attr}={g} is null ({why})")
                    point, b = float("nan"), np.full(len(b), np.nan)
                group_boot[g] = (point, b, n)
                boots[(name, lab, attr, g)] = (point, b)
                groups[g] = {"n": n, "n_pos": n_pos, "auroc": _est(point, b, ci)}
            parity = {}
            for g in present:
                others = [h for h in present if h != g and np.isfinite(group_boot[h][0])]
                if not np.isfinite(group_boot[g][0]) or not others:
                    parity[g] = {"estimate": None, "ci_low": None, "ci_high": None}
                    continue
                wts = np.array([group_boot[h][2] for h in others], dtype=float)
                ref_point = float(np.average([group_boot[h][0] for h in others], weights=wts))
                ref_boot = np.average(np.vstack([group_boot[h][1] for h in others]), axis=0, weights=wts)
                pp_point = group_boot[g][0] - ref_point
                pp_boot = group_boot[g][1] - ref_boot
                boots[(name, lab, attr, f"parity:{g}")] = (pp_point, pp_boot)
                parity[g] = _est(pp_point, pp_boot, ci)
            per_label[lab] = {"groups": groups, "performance_parity": parity}
        out[attr] = per_label
    return out


def _attacks(df: pd.DataFrame, labels, name: str, warnings: list[str], *, seed: int, age_edges) -> dict | None:
    """Threshold membership-inference attacks on members against an equal number of non-members."""
    from privaudit.audit.privacy import attack_metrics, loss_attack_scores

    member = df["member"].to_numpy() if "member" in df.columns else np.zeros(0)
    n_in, n_out = int((member == 1).sum()), int((member == 0).sum())
    if n_in == 0 or n_out == 0:
        warnings.append(f"{name}: membership-inference attacks are null: the prediction file has {n_in} members "
                        f"and {n_out} non-members, and an attack needs both")
        return None
    rng = np.random.default_rng(seed)
    k = min(n_in, n_out)
    idx_in = np.sort(rng.choice(np.flatnonzero(member == 1), k, replace=False))
    idx_out = np.sort(rng.choice(np.flatnonzero(member == 0), k, replace=False))
    rows = np.r_[idx_in, idx_out]
    groups = {}
    if "sex" in df.columns:
        groups["sex"] = df["sex"].to_numpy(dtype=object)[rows]
    if "age" in df.columns:
        groups["age_group"] = age_group(df["age"].to_numpy(), age_edges).to_numpy()[rows]
    for col in ("comorbidity", "site"):
        if col in df.columns:
            groups[col] = df[col].astype(str).where(df[col].notna(), None).to_numpy(dtype=object)[rows]
    scores = loss_attack_scores(df, labels)
    if "loss" not in scores:
        warnings.append(f"{name}: no per-sample 'loss' column, so the loss attack is null; the confidence "
                        "attack uses the labels and probabilities instead")
    attacks = {"loss": None}
    for attack, sc in scores.items():
        res, warns = attack_metrics(sc[idx_in], sc[idx_out], groups=groups)
        attacks[attack] = res
        if attack == "loss":
            warnings.extend(f"{name}: loss attack: {w}" for w in warns)
    return attacks


def _privacy(run: dict | None, name: str, warnings: list[str], df: pd.DataFrame, labels, *, seed: int,
             age_edges) -> dict:
    block = {"accountant": None, "attacks": _attacks(df, labels, name, warnings, seed=seed, age_edges=age_edges),
             "empirical_epsilon": None, "soundness": None}
    if not run or not run.get("dp"):
        return block
    acc = {k: run.get(k) for k in PRIVACY_KEYS}
    from privaudit.audit.accounting import cross_checks

    checks, warns = cross_checks(noise_multiplier=acc["noise_multiplier"], sample_rate=acc["sample_rate"],
                                 steps=acc["steps"], delta=acc["delta"])
    acc["cross_checks"] = checks
    warnings.extend(f"{name}: {w}" for w in warns)
    block["accountant"] = acc
    return block


def _compare(study: _Study, name: str, ref: str, boots: dict) -> dict:
    ci = study.config.ci
    labels = {}
    for lab in study.labels:
        pa, ba = boots[(name, lab, None, None)]
        pr, br = boots[(ref, lab, None, None)]
        d = ba - br
        labels[lab] = {"auroc_difference": _est(pa - pr, d, ci), "p_value": paired_p_value(d)}
    pa, ba = boots[(name, "macro", None, None)]
    pr, br = boots[(ref, "macro", None, None)]
    d = ba - br
    out = {"labels": labels, "macro_auroc_difference": _est(pa - pr, d, ci), "p_value": paired_p_value(d)}
    fair = {}
    for (m, lab, attr, g), (point, b) in boots.items():
        if m != name or attr is None or not str(g).startswith("parity:"):
            continue
        if (ref, lab, attr, g) not in boots:
            continue
        rp, rb = boots[(ref, lab, attr, g)]
        grp = g.split(":", 1)[1]
        # change in the absolute gap: positive means the model widened this group's gap relative to the reference
        change_point = abs(point) - abs(rp)
        change_boot = np.abs(b) - np.abs(rb)
        fair.setdefault(attr, {}).setdefault(lab, {})[grp] = _est(change_point, change_boot, ci)
    out["fairness"] = fair
    return out


def run_audit(
    predictions: dict[str, pd.DataFrame],
    *,
    runs: dict[str, dict] | None = None,
    reference: str | None = None,
    config: AuditConfig | None = None,
    task: str | None = None,
    data: dict | None = None,
    age_edges=AGE_EDGES,
) -> AuditReport:
    """Audit one or more models scored on the same test samples.

    ``predictions`` maps model name to its prediction table; ``runs`` maps model name to its ``train.json``
    (for the dp block); ``reference`` names the model the others are compared against (by default
    ``non_private`` when present).
    """
    if not predictions:
        raise DataError("no prediction tables to audit")
    config = config or AuditConfig()
    runs = runs or {}
    frames = {name: validate_predictions(df, f"predictions of {name!r}") for name, df in predictions.items()}
    study = _Study(frames, config, age_edges)
    if reference is None and "non_private" in frames and len(frames) > 1:
        reference = "non_private"
    if reference is not None and reference not in frames:
        raise DataError(f"--reference {reference!r} is not one of the models ({', '.join(frames)})")

    boots: dict = {}
    models = {}
    for name, df in frames.items():
        run = runs.get(name)
        run_block = {"backend": None, "model": None, "seed": None, "dp": False}
        if run:
            run_block = {"backend": run.get("backend"), "model": run.get("architecture"), "seed": run.get("seed"),
                         **{k: run.get(k) for k in ("dp", *PRIVACY_KEYS)}}
            run_block["dp"] = bool(run.get("dp"))
        models[name] = {
            "run": run_block,
            "utility": _utility(study, name, boots),
            "fairness": _fairness(study, name, boots),
            "privacy": _privacy(run, name, study.warnings, df, study.labels, seed=config.seed, age_edges=age_edges),
        }
    comparisons = {}
    if reference is not None:
        for name in frames:
            if name != reference:
                comparisons[f"{name} vs {reference}"] = _compare(study, name, reference, boots)

    ref_frame = frames[next(iter(frames))]
    data_block = dict(data or {})
    for split in ("train", "val", "test"):
        data_block.setdefault(f"n_{split}", int((ref_frame["split"] == split).sum()))
    train = ref_frame[ref_frame["split"] == "train"]
    prevalence = {}
    for lab in study.labels:  # training-set prevalence (test prevalence sits beside each AUROC as n_pos / n)
        y = train[f"y_{lab}"].dropna()
        prevalence[lab] = float(y.mean()) if len(y) else None
    data_block.setdefault("prevalence", prevalence)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "study": {
            "task": task,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "labels": study.labels,
            "data": data_block,
            "bootstrap": {**study.resampler.describe(), "ci": config.ci, "method": config.ci_method},
        },
        "models": models,
        "comparisons": comparisons,
        "warnings": study.warnings,
    }
    return AuditReport(doc)
