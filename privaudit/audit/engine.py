"""``run_audit``: from prediction tables to one study's ``audit.json`` document.

Utility and fairness use the test split. One :class:`~privaudit.audit.utility.Resampler` is drawn for the
study, so every model, label, group and metric is resampled with the same indices, and every difference
(between models, between groups) is paired.
"""

from __future__ import annotations

import datetime as _dt
import platform
import re
from importlib import metadata

import numpy as np
import pandas as pd

from privaudit import __version__
from privaudit.audit import stats
from privaudit.audit.fairness import SELECTION_METRICS, dp_verdict, holm, pearson_r, selection_metrics
from privaudit.audit.results import SCHEMA_VERSION, AuditReport
from privaudit.audit.utility import Resampler, paired_p_value, percentile_ci, weighted_auroc
from privaudit.config import AuditConfig
from privaudit.errors import DataError
from privaudit.predictions import labels_of, validate_predictions
from privaudit.tasks import age_group

PRIVACY_KEYS = ("epsilon", "delta", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate", "steps",
                "poisson_sampling")
MIN_GROUP_N = 10        # below this many test samples a group's metrics are not reported
MAX_BCA_UNITS = 5000    # BCa needs one jackknife AUROC per unit left out
PRIVILEGED = {"sex": "M", "comorbidity": "0"}  # aif360 needs a privileged group; others: the largest group
ROC_POINTS = 101


def _versions() -> dict:
    out = {"privaudit": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "pandas", "scikit-learn", "scipy", "fairlearn", "aif360", "torch", "opacus"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _est(point: float, boots: np.ndarray, ci: float, *, n_boot: bool = False, interval=None) -> dict:
    lo, hi, n_ok = percentile_ci(boots, ci)
    if interval is not None:
        lo, hi = interval
    ok = point is not None and np.isfinite(point)
    out = {"estimate": float(point) if ok else None, "ci_low": lo if ok else None, "ci_high": hi if ok else None}
    if n_boot:
        out.update({"n_boot": n_ok, "ci_method": "bca" if interval is not None else "percentile"})
    return out


def _nan_mean(arrays) -> np.ndarray:
    """Mean over labels, nan when any label is nan (a macro over a subset of labels would change meaning)."""
    return np.mean(np.vstack(arrays), axis=0)


def _as_group(v) -> str | None:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def attribute_arrays(df: pd.DataFrame, age_edges) -> dict[str, np.ndarray]:
    """Every sensitive attribute of a prediction table as an object array of group names (None = unknown):
    ``sex``, ``age_group`` (from ``age``) and any other non-prediction column (comorbidity, site, ...)."""
    out = {}
    if "sex" in df.columns:
        out["sex"] = np.array([_as_group(v) for v in df["sex"]], dtype=object)
    if "age" in df.columns:
        out["age_group"] = age_group(df["age"].to_numpy(), age_edges).to_numpy(dtype=object)
    skip = {"sample_id", "split", "member", "loss", "patient_id", "age", "sex"}
    for col in df.columns:
        if col not in skip and not col.startswith(("y_", "p_")):
            out[col] = np.array([_as_group(v) for v in df[col]], dtype=object)
    return out


class _Study:
    """Shared state of one audit: aligned test tables, the resampler, thresholds and the warnings."""

    def __init__(self, frames: dict[str, pd.DataFrame], config: AuditConfig):
        self.config = config
        self.warnings: list[str] = []
        names = list(frames)
        self.labels = labels_of(frames[names[0]])
        for name in names[1:]:
            if labels_of(frames[name]) != self.labels:
                raise DataError(f"model {name!r} has labels {labels_of(frames[name])} but {names[0]!r} has "
                                f"{self.labels}; paired audits need the same labels")
        self.test, self.val = {}, {}
        for name, df in frames.items():
            t = df[df["split"] == "test"]
            if len(t) == 0:
                raise DataError(f"model {name!r}: no rows with split 'test'; the audit measures the test split")
            self.test[name] = t.set_index("sample_id")
            self.val[name] = df[df["split"] == "val"]
        ref_ids = self.test[names[0]].index
        for name in names[1:]:
            ids = self.test[name].index
            if len(ids) != len(ref_ids) or not ids.isin(ref_ids).all():
                missing = ref_ids.difference(ids)
                example = missing[0] if len(missing) else ids.difference(ref_ids)[0]
                raise DataError(f"models {names[0]!r} and {name!r} were not scored on the same test samples "
                                f"(e.g. sample_id {example!r}); paired comparisons need identical test sets")
            self.test[name] = self.test[name].loc[ref_ids]
        ref = self.test[names[0]]
        self.ref = ref
        self.n = len(ref)
        self.y = {lab: ref[f"y_{lab}"].to_numpy(dtype=float) for lab in self.labels}
        for name in names[1:]:
            for lab in self.labels:
                other = self.test[name][f"y_{lab}"].to_numpy(dtype=float)
                if not np.array_equal(np.isnan(other), np.isnan(self.y[lab])) or not np.allclose(
                        np.nan_to_num(other), np.nan_to_num(self.y[lab])):
                    raise DataError(f"models {names[0]!r} and {name!r} disagree on y_{lab} for the same samples; "
                                    "they must be scored against the same labels")
        self.clusters = ref["patient_id"].to_numpy() if "patient_id" in ref.columns else None
        if self.clusters is None and config.cluster:
            self.warnings.append("no patient_id column: resampling images, which understates the CI width if "
                                 "patients have several images")
        self.resampler = Resampler(self.n, n_boot=config.n_boot, seed=config.seed, clusters=self.clusters,
                                   cluster=config.cluster)
        self.W = self.resampler.weights
        self.sample_major = stats.SampleMajorWeights(self.W)  # the fast AUROC path reads W in this layout
        self.attributes = self._attributes(ref)
        self.thresholds: dict = {}
        self.boots: dict = {}

    def _attributes(self, ref: pd.DataFrame) -> dict[str, np.ndarray]:
        available = attribute_arrays(ref, self.config.age_edges)
        wanted = self.config.attributes
        if wanted is None:
            return available
        out = {}
        for spec in wanted:
            parts = spec.split("*")
            missing = [p for p in parts if p not in available]
            if missing:
                raise DataError(f"attribute {missing[0]!r} is not in the prediction file; available: "
                                f"{', '.join(available) or 'none'}")
            cols = [available[p] for p in parts]
            out[spec] = np.array([None if any(c[i] is None for c in cols) else "|".join(c[i] for c in cols)
                                  for i in range(self.n)], dtype=object)
        return out

    def known(self, lab: str, mask: np.ndarray | None = None) -> np.ndarray:
        keep = ~np.isnan(self.y[lab])
        return keep if mask is None else keep & mask

    def scores(self, name: str, lab: str) -> np.ndarray:
        return self.test[name][f"p_{lab}"].to_numpy(dtype=float)

    def auroc_boot(self, name: str, lab: str, mask: np.ndarray | None = None):
        """(point AUROC, bootstrap AUROCs, n, n_pos) for one model and label, on the known labels in ``mask``."""
        keep = self.known(lab, mask)
        yk, p = self.y[lab][keep], self.scores(name, lab)[keep]
        n, n_pos = int(keep.sum()), int(yk.sum())
        if n == 0:
            return float("nan"), np.full(self.config.n_boot, np.nan), 0, 0
        boots = stats.weighted_auroc_fast(self.y[lab], self.scores(name, lab), self.sample_major, keep=keep)
        return float(weighted_auroc(yk, p, np.ones((1, n)))[0]), boots, n, n_pos

    def threshold(self, name: str, lab: str) -> tuple[float, str]:
        """The decision threshold: fixed, or Youden's J on the val split (on test, with a warning, without one)."""
        if (name, lab) in self.thresholds:
            return self.thresholds[(name, lab)]
        if self.config.threshold != "youden":
            res = (float(self.config.threshold), "fixed")
        else:
            val = self.val[name]
            yv = val[f"y_{lab}"].to_numpy(dtype=float)
            kv = ~np.isnan(yv)
            if kv.any() and 0 < yv[kv].sum() < kv.sum():
                res = (stats.youden_threshold(yv[kv], val[f"p_{lab}"].to_numpy(dtype=float)[kv]), "val")
            else:
                keep = self.known(lab)
                res = (stats.youden_threshold(self.y[lab][keep], self.scores(name, lab)[keep]), "test")
                self.warnings.append(f"{name}: the Youden threshold of {lab} was chosen on the test split (no val "
                                     "split with both classes), so sensitivity and specificity are optimistic")
        self.thresholds[(name, lab)] = res
        return res

    def jackknife_auroc(self, name: str, lab: str) -> np.ndarray | None:
        """Leave-one-unit-out AUROCs (units: patients when clustered) for BCa; None when too many units."""
        keep = self.known(lab)
        codes = self.resampler.codes if self.resampler.codes is not None else np.arange(self.n)
        units = np.unique(codes[keep])
        if len(units) > MAX_BCA_UNITS:
            return None
        W = (codes[keep][None, :] != units[:, None]).astype(float)
        return weighted_auroc(self.y[lab][keep], self.scores(name, lab)[keep], W)


def _metric_block(study: _Study, y, p, W, thr, ci) -> dict:
    """AUPRC, Brier, ECE, the rates at the threshold, and sensitivity at a fixed specificity, each with a CI."""
    ones = np.ones((1, len(y)))
    spec = study.config.specificity
    out = {}
    for key, fn in (("auprc", stats.weighted_average_precision), ("brier", stats.weighted_brier),
                    ("ece", stats.weighted_ece)):
        out[key] = _est(float(fn(y, p, ones)[0]), fn(y, p, W), ci)
    point = stats.weighted_rates(y, p, thr, ones)
    boot = stats.weighted_rates(y, p, thr, W)
    out["rates"] = {k: _est(float(point[k][0]), boot[k], ci) for k in point}
    out["sensitivity_at_specificity"] = {str(spec): _est(
        float(stats.weighted_sensitivity_at_specificity(y, p, ones, spec)[0]),
        stats.weighted_sensitivity_at_specificity(y, p, W, spec), ci)}
    return out


def _utility(study: _Study, name: str) -> dict:
    cfg, ci = study.config, study.config.ci
    labels, points, curves = {}, [], {}
    for lab in study.labels:
        point, b, n, n_pos = study.auroc_boot(name, lab)
        study.boots[(name, lab, None, None)] = (point, b)
        points.append(point)
        interval = None
        if cfg.ci_method == "bca" and np.isfinite(point):
            jack = study.jackknife_auroc(name, lab)
            if jack is None:
                study.warnings.append(f"{name}: BCa for {lab} needs one jackknife AUROC per patient, and there are "
                                      f"more than {MAX_BCA_UNITS}; the percentile interval is reported")
            else:
                interval = stats.bca_interval(point, b[np.isfinite(b)], jack, ci)
        if not np.isfinite(point):
            study.warnings.append(f"{name}: AUROC of {lab} is null because the test split has "
                                  f"{'no samples with a known label' if n == 0 else 'only one class'} for it")
        keep = study.known(lab)
        y, p, W = study.y[lab][keep], study.scores(name, lab)[keep], study.W[:, keep]
        thr, source = study.threshold(name, lab)
        block = _metric_block(study, y, p, W, thr, ci)
        rates = block.pop("rates")
        labels[lab] = {
            "n": n, "n_pos": n_pos, "auroc": _est(point, b, ci, n_boot=True, interval=interval), **block,
            "youden": {"threshold": thr if np.isfinite(thr) else None, "threshold_source": source,
                       **{k: rates[k] for k in ("sensitivity", "specificity", "accuracy")}},
        }
        curves[lab] = _curves(y, p, W)
    point = float(np.mean(points))
    b = _nan_mean([study.boots[(name, lab, None, None)][1] for lab in study.labels])
    study.boots[(name, "macro", None, None)] = (point, b)
    return {"labels": labels, "macro_auroc": _est(point, b, ci, n_boot=True), "n": study.n}, curves


def _curves(y, p, W) -> dict:
    """ROC on a fixed FPR grid with a pointwise bootstrap band, and a reliability diagram (figure data)."""
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        return {"roc": None, "calibration": None}
    grid = np.linspace(0, 1, ROC_POINTS)
    fpr, tpr, _ = roc_curve(y, p)
    band = []
    for w in W[: min(len(W), 200)]:  # 200 resamples suffice for a 95% band on a figure
        idx = np.repeat(np.arange(len(y)), w.astype(int))
        if len(np.unique(y[idx])) < 2:
            continue
        f, t, _ = roc_curve(y[idx], p[idx])
        band.append(np.interp(grid, f, t))
    lo, hi = (np.quantile(band, [0.025, 0.975], axis=0) if band else (None, None))
    bins = np.minimum((p * 10).astype(int), 9)
    cal = [{"bin": k, "n": int((bins == k).sum()),
            "mean_p": float(p[bins == k].mean()) if (bins == k).any() else None,
            "observed": float(y[bins == k].mean()) if (bins == k).any() else None} for k in range(10)]
    return {"roc": {"fpr": grid.tolist(), "tpr": np.interp(grid, fpr, tpr).tolist(),
                    "tpr_low": None if lo is None else lo.tolist(), "tpr_high": None if hi is None else hi.tolist()},
            "calibration": cal}


def _group_metrics(study: _Study, name: str, lab: str, mask: np.ndarray, ci: float) -> dict:
    keep = study.known(lab, mask)
    y, p, W = study.y[lab][keep], study.scores(name, lab)[keep], study.W[:, keep]
    thr, _ = study.threshold(name, lab)
    ones = np.ones((1, len(y)))
    point, boot = stats.weighted_rates(y, p, thr, ones), stats.weighted_rates(y, p, thr, W)
    out = {"selection_rate": _est(float(point["selection_rate"][0]), boot["selection_rate"], ci),
           "tpr": _est(float(point["sensitivity"][0]), boot["sensitivity"], ci),
           "fpr": _est(float(point["fpr"][0]), boot["fpr"], ci)}
    for key, fn in (("brier", stats.weighted_brier), ("ece", stats.weighted_ece)):
        out[key] = _est(float(fn(y, p, ones)[0]), fn(y, p, W), ci)
    return out


def _selection(study: _Study, name: str, attr: str, values: np.ndarray, lab: str, ci: float) -> dict:
    """aif360's selection-rate metrics at the Youden threshold (macro: the mean over labels)."""
    present = sorted({v for v in values if v is not None})
    privileged = PRIVILEGED.get(attr)
    if len(present) == 2 and privileged not in present:
        counts = {g: int((values == g).sum()) for g in present}
        privileged = max(present, key=lambda g: counts[g])
    labs = study.labels if lab == "macro" else [lab]
    per = []
    for la in labs:
        thr, _ = study.threshold(name, la)
        yhat = (study.scores(name, la) >= thr).astype(int) if np.isfinite(thr) else np.zeros(study.n, int)
        res = selection_metrics(study.y[la], yhat, values, privileged if len(present) == 2 else None, study.W)
        if not np.isfinite(thr):
            res = {g: {**e, **{m: {"estimate": np.nan, "boot": np.full(study.config.n_boot, np.nan)}
                               for m in SELECTION_METRICS}} for g, e in res.items()}
        per.append(res)
    out = {}
    for metric in SELECTION_METRICS:
        groups = {}
        for g in per[0]:
            point = float(np.mean([r[g][metric]["estimate"] for r in per if g in r]))
            boot = _nan_mean([r[g][metric]["boot"] for r in per if g in r])
            groups[g] = {**_est(point, boot, ci), "privileged": str(per[0][g]["privileged"])}
        out[metric] = next(iter(groups.values())) if len(present) == 2 and len(groups) == 1 else groups
    return out


def _fairness(study: _Study, name: str) -> dict:
    ci = study.config.ci
    out = {}
    for attr, values in study.attributes.items():
        present = sorted({v for v in values if v is not None})
        if len(present) < 2:
            study.warnings.append(f"{name}: attribute {attr!r} has {len(present)} group(s) in the test split; "
                                  "its fairness metrics are skipped")
            continue
        per_label, label_boot = {}, {}  # label_boot[(label, group)]: reused by the macro rows
        for lab in list(study.labels) + ["macro"]:
            groups, group_boot = {}, {}
            for g in present:
                mask = values == g
                if lab == "macro":
                    parts = [label_boot[(la, g)] for la in study.labels]
                    point = float(np.mean([q[0] for q in parts]))
                    b = _nan_mean([q[1] for q in parts])
                    n, n_pos = int(mask.sum()), None
                else:
                    point, b, n, n_pos = label_boot[(lab, g)] = study.auroc_boot(name, lab, mask)
                if n < MIN_GROUP_N or not np.isfinite(point):
                    why = (f"only {n} test samples" if n < MIN_GROUP_N
                           else "a label in it is null" if lab == "macro" else "one class")
                    study.warnings.append(f"{name}: AUROC of {lab} for {attr}={g} is null ({why})")
                    point, b = float("nan"), np.full(len(b), np.nan)
                group_boot[g] = (point, b, n)
                groups[g] = {"n": n, "n_pos": n_pos, "auroc": _est(point, b, ci)}
                if lab != "macro" and n >= MIN_GROUP_N:
                    groups[g].update(_group_metrics(study, name, lab, mask, ci))
            parity = {}
            for g in present:
                others = [h for h in present if h != g and np.isfinite(group_boot[h][0])]
                if not np.isfinite(group_boot[g][0]) or not others:
                    parity[g] = {"estimate": None, "ci_low": None, "ci_high": None}
                    continue
                wts = np.array([group_boot[h][2] for h in others], dtype=float)
                ref_point = float(np.average([group_boot[h][0] for h in others], weights=wts))
                ref_boot = np.average(np.vstack([group_boot[h][1] for h in others]), axis=0, weights=wts)
                pp_point, pp_boot = group_boot[g][0] - ref_point, group_boot[g][1] - ref_boot
                study.boots[(name, lab, attr, g)] = (pp_point, pp_boot)
                parity[g] = _est(pp_point, pp_boot, ci)
            per_label[lab] = {"groups": groups, "performance_parity": parity,
                              **_selection(study, name, attr, values, lab, ci)}
        out[attr] = per_label
    out["pearson_r"] = _pearson(study, name)
    return out


def _pearson(study: _Study, name: str) -> dict:
    """Pearson's r of age (continuous) against the per-sample absolute error |y - p|."""
    if "age" not in study.ref.columns:
        return {}
    age = study.ref["age"].to_numpy(dtype=float)
    out, errs = {}, []
    for lab in study.labels:
        err = np.abs(study.y[lab] - study.scores(name, lab))
        errs.append(err)
        out[lab] = _r_block(study, name, f"age vs |y - p| of {lab}", age, err)
    stacked = np.vstack(errs)
    known = np.isfinite(stacked)
    with np.errstate(invalid="ignore"):  # a sample with no known label has no error: nan, left out of r
        macro = np.where(known, stacked, 0.0).sum(axis=0) / known.sum(axis=0)
    out["macro"] = _r_block(study, name, "age vs mean |y - p|", age, macro)
    return {"age": out}


def _r_block(study: _Study, name: str, what: str, x, y) -> dict:
    res = pearson_r(x, y, confidence=study.config.ci)
    if res.get("reason"):
        study.warnings.append(f"{name}: Pearson's r of {what} is null: {res['reason']}")
    return {"r": res["r"], "p_value": res["p_value"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
            "n": res["n"], "x": "age", "y": "abs_error"}


def _attacks(df: pd.DataFrame, labels, name: str, warnings: list[str], *, seed: int, age_edges,
             extra_scores: pd.DataFrame | None = None, delta: float = 0.0) -> dict | None:
    """Threshold membership-inference attacks on members against an equal number of non-members."""
    from privaudit.audit.privacy import attack_metrics, loss_attack_scores

    if "member" not in df.columns:
        warnings.append(f"{name}: membership-inference attacks are null: the prediction file has no 'member' "
                        "column (1 for training samples, 0 otherwise)")
        return None
    member = df["member"].to_numpy()
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
    groups = {attr: values[rows] for attr, values in attribute_arrays(df, age_edges).items()}
    scores = loss_attack_scores(df, labels)
    extra_null: list[str] = []
    if extra_scores is not None:  # shadow-model attacks (LiRA, RMIA) scored by `privaudit attack`
        aligned = extra_scores.set_index("sample_id").reindex(df["sample_id"].astype(str))
        for col in aligned.columns:
            sc = aligned[col].to_numpy(dtype=float)
            missing = int(np.isnan(sc[rows]).sum())
            if missing == len(rows):
                warnings.append(f"{name}: attack {col} has no scores (too few shadow models); it is null")
                extra_null.append(col)
                continue
            if missing:
                warnings.append(f"{name}: attack {col} leaves out {missing} of the {len(rows)} attacked samples, "
                                "which no shadow model had both in and out; train more shadow models to include them")
            scores[col] = sc
    if "loss" not in scores:
        warnings.append(f"{name}: no per-sample 'loss' column, so the loss attack is null; the confidence "
                        "attack uses the labels and probabilities instead")
    base = [scores[x] for x in ("loss", "confidence", "entropy") if x in scores]
    if base:
        from privaudit.audit.privacy import trained_attack_scores

        trained = np.full(len(df), np.nan)
        trained[rows] = trained_attack_scores(np.column_stack(base)[rows], np.r_[np.ones(k), np.zeros(k)], seed=seed)
        scores["trained"] = trained
    attacks = {"loss": None, **{col: None for col in extra_null}}
    for attack, sc in scores.items():
        ok = np.isfinite(sc[rows])  # shadow-model attacks may lack a score for a few samples
        ok_in, ok_out = ok[:k], ok[k:]
        res, warns = attack_metrics(sc[idx_in][ok_in], sc[idx_out][ok_out],
                                    groups={a: g[ok] for a, g in groups.items()})
        attacks[attack] = res
        if attack == "loss":
            warnings.extend(f"{name}: loss attack: {w}" for w in warns)
            from privaudit.audit.privacy import repeated_trials_bound

            res["epsilon_lower_bound_repeated_trials"] = repeated_trials_bound(
                sc[idx_in][ok_in], sc[idx_out][ok_out], delta=delta)
    return attacks


def _empirical(block: dict, canaries: pd.DataFrame | None, run: dict | None, name: str, warnings: list[str],
               seed: int) -> None:
    """The one-run lower bound from the run's canaries (lower loss = guessed 'in'), and its soundness check."""
    from privaudit.audit.empirical import one_run_audit, soundness

    if canaries is None:
        return
    if not {"included", "loss"} <= set(canaries.columns) or canaries["loss"].isna().any():
        raise DataError(f"model {name!r}: the canary table needs 'included' and a 'loss' for every canary")
    dp = bool(run and run.get("dp"))
    delta = float(run["delta"]) if dp else 0.0
    scores, included = -canaries["loss"].to_numpy(dtype=float), canaries["included"].to_numpy().astype(bool)
    res = one_run_audit(scores, included, delta=delta, confidence=0.95, seed=seed)
    # Beside Steinke et al.'s bound, the f-DP one (Mahloujifar et al.), one-sided over every threshold with a
    # Bonferroni correction. It needs delta > 0: a non-private run is read at the delta DP would use for its N.
    from privaudit.audit.onerun import FDP, one_run_epsilon
    from privaudit.config import default_delta

    fdp_delta = delta if dp else (default_delta(int(run["n_train"])) if run and run.get("n_train") else None)
    res["fdp"] = (None if not fdp_delta else
                  one_run_epsilon(scores, included, delta=fdp_delta, confidence=0.95, method=FDP, thresholds="all"))
    block["empirical_epsilon"] = res
    if dp:
        check = soundness(float(run["epsilon"]), res["r"], res["v"], delta, res["m"], confidence=0.99)
        block["soundness"] = check
        if check["violated"]:
            warnings.append(f"{name}: SOUNDNESS VIOLATION: the canaries were guessed too well for the claimed "
                            f"epsilon {run['epsilon']:.3g} (p = {check['p_value']:.2g} at 99% confidence); the "
                            "training broke its own DP assumptions, so its epsilon must not be trusted")


def _privacy(run: dict | None, name: str, warnings: list[str], df: pd.DataFrame, labels, *, seed: int,
             age_edges, canaries: pd.DataFrame | None = None, attack_scores: pd.DataFrame | None = None) -> dict:
    delta = float(run["delta"]) if run and run.get("dp") and run.get("delta") else 0.0
    block = {"accountant": None, "attacks": _attacks(df, labels, name, warnings, seed=seed, age_edges=age_edges,
                                                     extra_scores=attack_scores, delta=delta),
             "empirical_epsilon": None, "soundness": None}
    _empirical(block, canaries, run, name, warnings, seed)
    if not run or not run.get("dp"):
        return block
    acc = {k: run.get(k) for k in PRIVACY_KEYS}
    from privaudit.audit.accounting import cross_checks

    checks, warns = cross_checks(noise_multiplier=acc["noise_multiplier"], sample_rate=acc["sample_rate"],
                                 steps=acc["steps"], delta=acc["delta"])
    acc["cross_checks"] = checks
    from privaudit.audit.empirical import flag_accountants

    # one-sided: an accountant below the tight ones (PRV, PLD) understates epsilon; RDP above them is normal
    acc["flags"] = flag_accountants(checks, used=acc["accountant"])
    warnings.extend(f"{name}: {w}" for w in warns + acc["flags"])
    block["accountant"] = acc
    return block


def _compare(study: _Study, name: str, ref: str) -> dict:
    cfg, ci, boots = study.config, study.config.ci, study.boots
    labels = {}
    for lab in study.labels:
        pa, ba = boots[(name, lab, None, None)]
        pr, br = boots[(ref, lab, None, None)]
        d = ba - br
        keep = study.known(lab)
        clusters = study.clusters[keep] if study.clusters is not None and study.resampler.clustered else None
        try:
            delong = stats.delong_test(study.y[lab][keep], study.scores(name, lab)[keep],
                                       study.scores(ref, lab)[keep], clusters=clusters)["p_value"]
        except ValueError:  # one class: DeLong is undefined, as is the AUROC
            delong = None
        labels[lab] = {"auroc_difference": _est(pa - pr, d, ci), "p_value": paired_p_value(d),
                       "delong_p_value": None if delong is None or not np.isfinite(delong) else float(delong)}
    pa, ba = boots[(name, "macro", None, None)]
    pr, br = boots[(ref, "macro", None, None)]
    d = ba - br
    out = {"labels": labels, "macro_auroc_difference": _est(pa - pr, d, ci), "p_value": paired_p_value(d)}

    # Does DP amplify unfairness? Change in each |parity gap|, paired over the same resamples.
    rows = []
    for attr, values in study.attributes.items():
        present = sorted({v for v in values if v is not None})
        # with two groups the two gaps are mirror images: judge one of them
        groups = present[:1] if len(present) == 2 else present
        for lab in list(study.labels) + ["macro"]:
            for g in groups:
                if (name, lab, attr, g) not in boots or (ref, lab, attr, g) not in boots:
                    continue
                (p1, b1), (p0, b0) = boots[(name, lab, attr, g)], boots[(ref, lab, attr, g)]
                change, change_boot = abs(p1) - abs(p0), np.abs(b1) - np.abs(b0)
                lo90, hi90, _ = percentile_ci(change_boot, 1 - 2 * cfg.alpha)
                rows.append({"attr": attr, "lab": lab, "group": g, "est": _est(change, change_boot, ci),
                             "p": paired_p_value(change_boot), "lo90": lo90, "hi90": hi90, "change": change})
    # Holm across attributes, labels and groups (the macro rows are summaries, outside the family)
    family = [i for i, r in enumerate(rows) if r["lab"] != "macro"]
    adjusted = np.full(len(rows), np.nan)
    if family:
        adjusted[family] = holm([rows[i]["p"] for i in family])
    fair, summary = {}, {}
    for attr in dict.fromkeys(r["attr"] for r in rows):
        for lab in dict.fromkeys(r["lab"] for r in rows if r["attr"] == attr):
            idx = [i for i, r in enumerate(rows) if r["attr"] == attr and r["lab"] == lab]
            changes = {rows[i]["group"]: {**rows[i]["est"], "p_value": rows[i]["p"]} for i in idx}
            verdict = _verdict(rows, idx, adjusted, cfg, holm_family=lab != "macro")
            fair.setdefault(attr, {})[lab] = {"parity_gap_change": changes, "verdict": verdict}
        idx = [i for i in family if rows[i]["attr"] == attr]
        summary[attr] = _verdict(rows, idx, adjusted, cfg, holm_family=True)
    out["fairness"] = fair
    out["fairness_verdict"] = summary
    return out


def _verdict(rows, idx, adjusted, cfg: AuditConfig, *, holm_family: bool) -> dict:
    sub = [rows[i] for i in idx]
    return dp_verdict([r["change"] for r in sub], [r["lo90"] for r in sub], [r["hi90"] for r in sub],
                      [adjusted[i] for i in idx] if holm_family else [r["p"] for r in sub],
                      margin=cfg.margin, alpha=cfg.alpha,
                      names=[f"{r['attr']}={r['group']} ({r['lab']})" for r in sub], adjusted=holm_family)


# An epsilon sweep names its models "eps=<setting>/seed=<seed>": <setting> is a target epsilon, "inf" (no
# privacy) or "clip" (clipping without noise). The study then aggregates each setting over its seeds.
SWEEP_NAME = re.compile(r"^eps=([^/]+)/seed=(-?\d+)$")
SWEEP_KINDS = {"inf": "non_private", "clip": "clip_only"}
FEW_LABELS = 10  # label-difficulty r over fewer labels than this says little (one point per label)


def sweep_groups(names) -> dict[str, list[str]] | None:
    """The models of an epsilon sweep grouped by setting, in order; None unless every one of two or more models
    is named ``eps=<setting>/seed=<seed>``."""
    names = list(names)
    groups: dict[str, list[str]] = {}
    for n in names:
        m = SWEEP_NAME.match(n)
        if not m:
            return None
        groups.setdefault(m.group(1), []).append(n)
    return groups if len(names) >= 2 else None


def _spread(values, boots, ci: float) -> dict:
    """Mean and seed-to-seed spread (sd with ddof 1, min, max) of one figure over a setting's seeds, and, when
    ``boots`` are given, the bootstrap CI of the mean: every model is resampled with the same indices, so the
    mean of the seeds' resamples is a resample of the mean. Seeds whose figure is null are left out."""
    ok = [i for i, v in enumerate(values) if v is not None and np.isfinite(v)]
    v = np.array([values[i] for i in ok], dtype=float)
    out = {"mean": float(v.mean()) if len(v) else None, "sd": float(v.std(ddof=1)) if len(v) >= 2 else None,
           "min": float(v.min()) if len(v) else None, "max": float(v.max()) if len(v) else None, "n_seeds": len(v)}
    if boots is not None:
        lo, hi, n_ok = (percentile_ci(np.mean(np.vstack([boots[i] for i in ok]), axis=0), ci) if ok
                        else (None, None, 0))
        out.update({"ci_low": lo, "ci_high": hi, "n_boot": n_ok})
    return out


def _largest_gap(study: _Study, name: str, lab: str, attr: str):
    """The largest |performance-parity gap| over an attribute's groups (point, resamples), or None."""
    keys = [k for k in study.boots if k[0] == name and k[1] == lab and k[2] == attr]
    if not keys:
        return None
    point = max(abs(study.boots[k][0]) for k in keys)
    boot = np.fmax.reduce(np.abs(np.vstack([study.boots[k][1] for k in keys])), axis=0)  # nan only if all are
    return point, boot


def _aggregates(models: dict, study: _Study, groups: dict[str, list[str]]) -> dict:
    """Per sweep setting, over its seeds: mean and spread of epsilon, macro AUROC, each label's AUROC and the
    largest parity gap per attribute (and label), next to the bootstrap CI of the mean."""
    ci, out = study.config.ci, {}
    for setting, names in groups.items():
        kind = SWEEP_KINDS.get(setting, "dp")
        try:
            target = float(setting) if kind == "dp" else None
        except ValueError:
            target = None
        target = target if target is not None and np.isfinite(target) else None

        def fig(lab, attr=None):
            pairs = ([study.boots.get((n, lab, None, None)) for n in names] if attr is None
                     else [_largest_gap(study, n, lab, attr) for n in names])
            return _spread([p[0] if p else None for p in pairs],
                           [p[1] if p else np.full(study.config.n_boot, np.nan) for p in pairs], ci)

        gaps = {}
        for attr in study.attributes:
            per = {lab: fig(lab, attr) for lab in list(study.labels) + ["macro"]}
            if any(v["n_seeds"] for v in per.values()):
                gaps[attr] = per
        out[setting] = {
            "kind": kind, "epsilon_target": target, "models": names, "n_seeds": len(names),
            "epsilon": _spread([(models[n]["privacy"]["accountant"] or {}).get("epsilon") for n in names], None, ci),
            "macro_auroc": fig("macro"), "auroc": {lab: fig(lab) for lab in study.labels},
            "max_parity_gap": gaps,
        }
    if any(len(names) < 2 for names in groups.values()):
        study.warnings.append("sweep: a setting has a single seed, so its seed-to-seed sd is null; train 2 or more "
                              "seeds per epsilon (--seeds) to see how much training randomness moves each figure")
    return out


def _r_quiet(study: _Study, what: str, x, y, xname: str, yname: str, *, warn: bool = True) -> dict:
    res = pearson_r(x, y, confidence=study.config.ci)
    if res.get("reason") and warn:
        study.warnings.append(f"study: Pearson's r of {what} is null: {res['reason']}")
    return {"r": res["r"], "p_value": res["p_value"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
            "n": res["n"], "x": xname, "y": yname}


def _label_difficulty(models: dict, study: _Study, groups: dict[str, list[str]], prevalence: dict) -> dict | None:
    """The paper's label-difficulty analysis: per setting, Pearson's r between each label's AUROC drop
    (non-private minus this setting, means over seeds) and (a) the label's non-private AUROC, (b) its
    training-set prevalence. One point per label."""
    if "inf" not in groups:
        study.warnings.append("label difficulty is null: it compares each setting with the non-private runs, and "
                              "the sweep has none; add inf to --epsilons")
        return None
    labels = list(study.labels)

    def mean_auroc(names, lab):
        v = [models[n]["utility"]["labels"][lab]["auroc"]["estimate"] for n in names]
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else None

    base = {lab: mean_auroc(groups["inf"], lab) for lab in labels}
    prev = [np.nan if prevalence.get(lab) is None else prevalence[lab] for lab in labels]
    per = {}
    for setting, names in groups.items():
        if setting == "inf":
            continue
        drop = {lab: None if base[lab] is None or mean_auroc(names, lab) is None else base[lab] - mean_auroc(names, lab)
                for lab in labels}
        y = [np.nan if drop[lab] is None else drop[lab] for lab in labels]
        per[setting] = {
            "auroc_drop": drop,
            "vs_non_private_auroc": _r_quiet(study, f"AUROC drop ({setting}) vs non-private AUROC over labels",
                                             [np.nan if base[lab] is None else base[lab] for lab in labels], y,
                                             "non_private_auroc", "auroc_drop"),
            "vs_prevalence": _r_quiet(study, f"AUROC drop ({setting}) vs training prevalence over labels", prev, y,
                                      "train_prevalence", "auroc_drop"),
        }
    if not per:
        return None
    note = (f"one point per label: with {len(labels)} labels, r says little about label difficulty in general "
            "(its CI spans most of -1 to 1)") if len(labels) < FEW_LABELS else None
    if note:
        study.warnings.append(f"label difficulty: {note}")
    return {"reference": "inf", "labels": labels, "non_private_auroc": base, "train_prevalence": prevalence,
            "by_setting": per, "note": note}


def _trade_offs(models: dict, study: _Study, prevalence: dict | None = None) -> dict | None:
    """Across the DP models of a study: Pearson's r of log(epsilon) against the macro AUROC, each label's AUROC
    and each performance-parity gap (the paper's question: does more privacy move the gaps?), one point per
    model. Non-private and clip-only models have no finite epsilon and stay out; with fewer than 4 points every
    r is null, with one warning. An epsilon sweep also gets the label-difficulty analysis. None for a study that
    is not a sweep and has fewer than two DP models."""
    groups = sweep_groups(models)
    eps = {n: (m["privacy"]["accountant"] or {}).get("epsilon") for n, m in models.items()}
    dp_models = [n for n, e in eps.items() if e is not None and np.isfinite(e) and e > 0]
    if len(dp_models) < 2 and groups is None:
        return None
    few = len(dp_models) < 4
    if few:
        study.warnings.append(f"study: Pearson's r of log(epsilon) vs macro AUROC, each label's AUROC and each "
                              f"parity gap is null: only {len(dp_models)} model(s) have a finite epsilon "
                              "(non-private and clip-only runs have none), and r needs at least 4")
    x = np.log([eps[n] for n in dp_models]) if dp_models else np.zeros(0)

    def r(what, y, yname, warn=True):
        return _r_quiet(study, f"log(epsilon) vs {what}", x, [np.nan if v is None else v for v in y], "log_epsilon",
                        yname, warn=warn and not few)

    out = {"x": "log(epsilon)", "models": dp_models, "epsilons": [eps[n] for n in dp_models],
           "macro_auroc": r("macro AUROC", [models[n]["utility"]["macro_auroc"]["estimate"] for n in dp_models],
                            "macro_auroc"),
           "auroc": {lab: r(f"AUROC of {lab}", [models[n]["utility"]["labels"][lab]["auroc"]["estimate"]
                                                 for n in dp_models], "auroc") for lab in study.labels},
           "performance_parity": {}}
    null_gaps = []  # one warning for them all: a small group's gap is null in most models
    for attr in study.attributes:
        for lab in list(study.labels) + ["macro"]:
            groups_here = list(dict.fromkeys(
                g for m in models.values()
                for g in ((m["fairness"].get(attr, {}).get(lab) or {}).get("performance_parity", {}))))
            for g in groups_here:
                y = [((models[n]["fairness"].get(attr, {}).get(lab) or {}).get("performance_parity", {}).get(g)
                      or {}).get("estimate") for n in dp_models]
                block = r(f"parity gap of {attr}={g} ({lab})", y, "performance_parity", warn=False)
                out["performance_parity"].setdefault(attr, {}).setdefault(lab, {})[g] = block
                if block["r"] is None:
                    null_gaps.append(f"{attr}={g} ({lab}, {block['n']} points)")
    if null_gaps and not few:
        study.warnings.append(f"study: Pearson's r of log(epsilon) vs the parity gap is null for {len(null_gaps)} "
                              f"group(s), whose gap is null (a small or one-class group) or constant in too many "
                              f"models for 4 points: {', '.join(null_gaps[:6])}{', ...' if len(null_gaps) > 6 else ''}")
    if groups is not None:
        out["label_difficulty"] = _label_difficulty(models, study, groups, prevalence or {})
    return out


# A group is flagged as under-represented when the test split holds fewer than this many of it, or when it is
# under this share of the cohort: its subgroup metrics then have wide intervals and say little.
SMALL_GROUP_N, SMALL_GROUP_SHARE = 30, 0.05


def _composition(frame: pd.DataFrame, attributes, age_edges) -> tuple[dict, dict]:
    """Cohort size per split for each group of each (single) sensitive attribute, with representativeness
    flags, and the patient-level split check (no patient may sit in two splits). Counts only: aggregates."""
    arrays = attribute_arrays(frame, age_edges)
    split = frame["split"].to_numpy()
    total = len(frame)
    comp = {}
    for attr in attributes:
        if "*" in attr or attr not in arrays:
            continue
        vals = arrays[attr]
        groups = {}
        for g in sorted({v for v in vals if v is not None}, key=str):
            mask = vals == g
            counts = {s: int((mask & (split == s)).sum()) for s in ("train", "val", "test")}
            share = float(mask.sum() / total) if total else 0.0
            small = counts["test"] < SMALL_GROUP_N or share < SMALL_GROUP_SHARE
            groups[str(g)] = {"n": int(mask.sum()), **{f"n_{s}": c for s, c in counts.items()},
                              "share": share, "small": bool(small)}
        n_unknown = int(sum(v is None for v in vals))
        comp[attr] = {"groups": groups, "n_unknown": n_unknown,
                      "rule": f"small: fewer than {SMALL_GROUP_N} in the test split or under "
                              f"{SMALL_GROUP_SHARE:.0%} of the cohort"}
    check = {"checked": False, "patients_in_several_splits": None, "n_patients": None}
    if "patient_id" in frame.columns:
        per = frame.groupby("patient_id")["split"].nunique()
        check = {"checked": True, "patients_in_several_splits": int((per > 1).sum()), "n_patients": int(len(per))}
    return comp, check


def run_audit(
    predictions: dict[str, pd.DataFrame],
    *,
    runs: dict[str, dict] | None = None,
    reference: str | None = None,
    config: AuditConfig | None = None,
    task: str | None = None,
    data: dict | None = None,
    canaries: dict[str, pd.DataFrame] | None = None,
    attack_scores: dict[str, pd.DataFrame] | None = None,
) -> AuditReport:
    """Audit one or more models scored on the same test samples.

    ``predictions`` maps model name to its prediction table; ``runs`` maps model name to its ``train.json``
    (for the dp block); ``reference`` names the model the others are compared against (by default
    ``non_private`` when present); ``canaries`` maps model name to its canary table (``included``, ``loss``)
    for the one-run empirical epsilon; ``attack_scores`` maps model name to a table of ``sample_id`` plus one
    score column per shadow-model attack (higher = member), as ``privaudit attack`` writes it.
    """
    if not predictions:
        raise DataError("no prediction tables to audit")
    config = config or AuditConfig()
    runs = runs or {}
    frames = {name: validate_predictions(df, f"predictions of {name!r}") for name, df in predictions.items()}
    study = _Study(frames, config)
    if reference is None and "non_private" in frames and len(frames) > 1:
        reference = "non_private"
    if reference is not None and reference not in frames:
        raise DataError(f"--reference {reference!r} is not one of the models ({', '.join(frames)})")

    models = {}
    for name, df in frames.items():
        run = runs.get(name)
        run_block = {"backend": None, "model": None, "seed": None, "dp": False}
        if run:
            run_block = {"backend": run.get("backend"), "model": run.get("architecture"), "seed": run.get("seed"),
                         **{k: run.get(k) for k in PRIVACY_KEYS}, "dp": bool(run.get("dp"))}
        utility, curves = _utility(study, name)
        models[name] = {
            "run": run_block,
            "utility": utility,
            "curves": curves,
            "fairness": _fairness(study, name),
            "privacy": _privacy(run, name, study.warnings, df, study.labels, seed=config.seed,
                                age_edges=config.age_edges, canaries=(canaries or {}).get(name),
                                attack_scores=(attack_scores or {}).get(name)),
        }
    comparisons = {f"{name} vs {reference}": _compare(study, name, reference)
                   for name in frames if reference is not None and name != reference}

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
    sweep = sweep_groups(models)
    aggregates = _aggregates(models, study, sweep) if sweep else None
    trade_offs = _trade_offs(models, study, prevalence)
    composition, split_check = _composition(ref_frame, study.attributes, config.age_edges)
    data_block.setdefault("composition", composition)
    data_block.setdefault("patient_split_check", split_check)
    if split_check["checked"] and split_check["patients_in_several_splits"]:
        study.warnings.append(f"{split_check['patients_in_several_splits']} patients have images in more than one "
                              "split: test metrics are optimistic and membership labels are blurred; split by patient")
    for attr, c in composition.items():
        small = [g for g, v in c["groups"].items() if v["small"]]
        if small:
            study.warnings.append(f"{attr}: groups {', '.join(small)} are small ({c['rule']}); their subgroup "
                                  "metrics have wide intervals")
    doc = {
        "schema_version": SCHEMA_VERSION,
        "study": {
            "task": task,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "labels": study.labels,
            "attributes": list(study.attributes),
            "data": data_block,
            "bootstrap": {**study.resampler.describe(), "ci": config.ci, "method": config.ci_method},
            "threshold": config.threshold if config.threshold != "youden" else "youden (val split)",
            "margin": config.margin,
            **({"aggregates": aggregates} if aggregates is not None else {}),
            **({"trade_offs": trade_offs} if trade_offs is not None else {}),
        },
        "models": models,
        "comparisons": comparisons,
        "warnings": list(dict.fromkeys(study.warnings)),
    }
    return AuditReport(doc)
