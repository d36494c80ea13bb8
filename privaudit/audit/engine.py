"""``run_audit``: from prediction tables to one study's ``audit.json`` document.

Utility and fairness use the test split. One :class:`~privaudit.audit.utility.Resampler` is drawn for the
study, so every model, label, group and metric is resampled with the same indices, and every difference
(between models, between groups) is paired.
"""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata

import numpy as np
import pandas as pd

from privaudit._version import __version__
from privaudit.audit import stats
from privaudit.audit._cells import (count_units, identifier_like, suppress_groups, suppress_table, suppressed,
                                    units_of)
from privaudit.audit.fairness import (SELECTION_METRICS, SINGLE_RUNS_WARNING, gap_change_verdict, holm,
                                      macro_disparate_impact, pearson_r, pearson_r_bootstrap, selection_metrics)
from privaudit.audit.studywide import aggregates_over_seeds, sweep_groups, trade_offs_of
from privaudit.audit.results import SCHEMA_VERSION, AuditReport
from privaudit.audit.utility import Resampler, paired_p_value, percentile_ci, weighted_auroc
from privaudit.config import AuditConfig
from privaudit.errors import DataError
from privaudit.predictions import (ATTRIBUTE_COLUMNS, blank_patient_ids, blank_patient_warning, labels_of,
                                   validate_predictions)
from privaudit.tasks import age_group, create_task, list_tasks

PRIVACY_KEYS = ("epsilon", "delta", "accountant", "noise_multiplier", "max_grad_norm", "sample_rate", "steps",
                "poisson_sampling")
MIN_CLASS_N = 10        # below this many known positives or negatives in the test split a label's AUROC is flagged
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


NOT_ATTRIBUTES = {"sample_id", "split", "member", "loss", "patient_id", "age", "sex"}


def known_attributes() -> set[str]:
    """The attribute columns privaudit knows: those its own prediction files carry and those its tasks name
    (``age_group`` comes from ``age``)."""
    names = set(ATTRIBUTE_COLUMNS)
    for task in list_tasks():
        names |= set(create_task(task).attributes)
    return names - {"age"}


def other_columns(df: pd.DataFrame) -> list[str]:
    """The columns of a prediction table that are not predictions, labels or bookkeeping."""
    return [c for c in df.columns if c not in NOT_ATTRIBUTES and not c.startswith(("y_", "p_"))]


def attribute_arrays(df: pd.DataFrame, age_edges, columns=()) -> dict[str, np.ndarray]:
    """The sensitive attributes of a prediction table as object arrays of group names (None = unknown):
    ``sex``, ``age_group`` (from ``age``), the other attribute columns privaudit knows (comorbidity, site,
    ...), every ``attr_*`` column, and the other ``columns`` named. A column privaudit does not know (a record
    number, a file path) is not an attribute unless it is named."""
    out = {}
    if "sex" in df.columns:
        out["sex"] = np.array([_as_group(v) for v in df["sex"]], dtype=object)
    if "age" in df.columns:
        out["age_group"] = age_group(df["age"].to_numpy(), age_edges).to_numpy(dtype=object)
    wanted = known_attributes() | set(columns)
    for col in other_columns(df):
        if col in wanted or col.startswith("attr_"):
            out[col] = np.array([_as_group(v) for v in df[col]], dtype=object)
    return out


def _spec_values(arrays: dict[str, np.ndarray], spec: str) -> np.ndarray:
    """The groups of an attribute, or of an intersection ``a*b`` (joined with ``|``; None if a part is)."""
    cols = [arrays[p] for p in spec.split("*")]
    if len(cols) == 1:
        return cols[0]
    return np.array([None if any(c[i] is None for c in cols) else "|".join(c[i] for c in cols)
                     for i in range(len(cols[0]))], dtype=object)


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
        self.sample_major = self.resampler.sample_major()  # the counts as drawn, in the fast AUROC's layout
        self.frame = frames[names[0]]   # every split: the cohort composition and the identifier check use it
        self.attributes = self._attributes(self.frame)
        self.cells = self._small_cells()
        self.thresholds: dict = {}
        self.boots: dict = {}
        self.attack_samples: dict = {}   # model -> its _AttackSample (one object shared when paired)
        self.attack_boots: dict = {}     # (model, attack, attr, group) -> (attack-AUC gap, its resamples)
        self.recorded_unit: str | None = None   # the privacy unit every run that records one agrees on

    def _attributes(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The attributes audited, as group arrays over the test rows (in ``ref`` order); their values over
        every row are kept in ``attribute_values``. Identifier-like ones are left out with a warning."""
        edges, wanted = self.config.age_edges, self.config.attributes
        named = {p for spec in (wanted or ()) for p in spec.split("*")}
        arrays = attribute_arrays(frame, edges, columns=named)
        specs = list(arrays)
        if wanted is not None:
            for spec in wanted:
                missing = [p for p in spec.split("*") if p not in arrays]
                if missing and missing[0] == "age" and "age_group" in arrays:
                    raise DataError("attribute 'age' is grouped as 'age_group' (see --age-bins); name age_group")
                if missing and missing[0] in NOT_ATTRIBUTES and missing[0] in frame.columns:
                    raise DataError(f"{missing[0]!r} is an identifier or bookkeeping column, not an attribute; "
                                    "name a column of group values such as sex or site")
                if missing:
                    available = list(attribute_arrays(frame, edges, columns=other_columns(frame)))
                    raise DataError(f"attribute {missing[0]!r} is not in the prediction file; available: "
                                    f"{', '.join(available) or 'none'}")
            specs = list(wanted)
        units = units_of(frame)
        test_rows = np.flatnonzero(frame["split"].to_numpy() == "test")
        self.attribute_values: dict[str, np.ndarray] = {}
        out = {}
        for spec in specs:
            values = _spec_values(arrays, spec)
            why = identifier_like(values, units)
            if why:  # the column's name only: never one of its values
                self.warnings.append(f"attribute {spec!r} is not grouped: it looks like an identifier ({why}); "
                                     "audit a coarser column instead")
                continue
            self.attribute_values[spec] = values
            out[spec] = values[test_rows]
        return out

    def _small_cells(self) -> dict:
        """Per attribute, the groups suppressed in every per-group output (see :mod:`privaudit.audit._cells`):
        ``groups`` (all, in order), ``attr`` (fewer than min_cell test patients), ``labels`` (per label: also
        those with fewer than min_cell patients with a known label) and ``macro`` (any label's)."""
        k = self.config.min_cell
        units = units_of(self.ref)
        out = {}
        for attr, values in self.attributes.items():
            groups = sorted({v for v in values if v is not None})
            sup = suppress_groups({g: count_units(units, values == g) for g in groups}, k)
            labels = {}
            for lab in self.labels:
                known = self.known(lab)
                labels[lab] = suppress_groups({g: count_units(units, (values == g) & known) for g in groups}, k,
                                              start=sup)
            macro = set().union(sup, *labels.values())
            out[attr] = {"groups": groups, "attr": sup, "labels": labels, "macro": macro}
            if sup:
                self.warnings.append(f"{attr}: group(s) {', '.join(g for g in groups if g in sup)} suppressed: fewer "
                                     f"than {k} patients in the test split; their counts and metrics are not shown, "
                                     "and they are left out of the other groups' comparisons")
            extra = [g for g in groups if g in macro and g not in sup]
            if extra:
                self.warnings.append(f"{attr}: group(s) {', '.join(extra)} suppressed for some labels: fewer than "
                                     f"{k} patients with a known label")
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
        labels[lab]["unreliable"] = _unreliable(study, lab, n, n_pos)
        curves[lab] = _curves(y, p, W)
    point = float(np.mean(points))
    b = _nan_mean([study.boots[(name, lab, None, None)][1] for lab in study.labels])
    study.boots[(name, "macro", None, None)] = (point, b)
    macro = _est(point, b, ci, n_boot=True)
    flagged = [lab for lab in study.labels if labels[lab]["unreliable"]["flag"]]
    macro["includes_unreliable"] = flagged   # the macro is over every label; these are flagged
    reliable = [lab for lab in study.labels if lab not in flagged]
    if flagged and reliable:
        rp = float(np.mean([study.boots[(name, lab, None, None)][0] for lab in reliable]))
        rb = _nan_mean([study.boots[(name, lab, None, None)][1] for lab in reliable])
        macro["without_unreliable"] = {**_est(rp, rb, ci, n_boot=True), "labels": reliable}
    return {"labels": labels, "macro_auroc": macro, "n": study.n}, curves


def _unreliable(study: _Study, lab: str, n: int, n_pos: int) -> dict:
    """Whether the test split has too few known positives or negatives of ``lab`` for its AUROC to mean much
    (fewer than MIN_CLASS_N of either); a flagged label's AUROC is still reported, with a warning."""
    n_neg = n - n_pos
    flag = min(n_pos, n_neg) < MIN_CLASS_N
    if flag:
        study.warnings.append(f"label {lab}: the test split has {n_pos} known positive(s) and {n_neg} known "
                              f"negative(s), fewer than {MIN_CLASS_N} of one class, so its AUROC is unreliable "
                              "(flagged in the audit and the report; the macro AUROC includes it)")
    return {"flag": bool(flag), "n_pos": n_pos, "n_neg": n_neg, "min": MIN_CLASS_N}


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


def _selection(study: _Study, name: str, attr: str, values: np.ndarray, lab: str, ci: float,
               hidden: set = frozenset()) -> dict:
    """aif360's selection-rate metrics at the Youden threshold (macro: the mean over labels, except disparate
    impact: the ratio of the mean selection rates, fairness.macro_disparate_impact). The ``hidden``
    (suppressed) groups are left out of every comparison, the "rest" included, and shown as suppressed."""
    everyone = study.cells[attr]["groups"]
    two = len(everyone) == 2
    values = np.array([None if v in hidden else v for v in values], dtype=object)
    present = sorted({v for v in values if v is not None})
    if len(present) < 2:
        return {m: suppressed() if two else {g: suppressed() for g in everyone} for m in SELECTION_METRICS}
    privileged = PRIVILEGED.get(attr)
    if len(present) == 2 and privileged not in present:
        counts = {g: int((values == g).sum()) for g in present}
        privileged = max(present, key=lambda g: counts[g])
    labs = study.labels if lab == "macro" else [lab]
    per = []
    for la in labs:
        thr, _ = study.threshold(name, la)
        yhat = (study.scores(name, la) >= thr).astype(int) if np.isfinite(thr) else np.zeros(study.n, int)
        res = selection_metrics(study.y[la], yhat, values, privileged if two else None, study.W)
        if not np.isfinite(thr):
            nan = {"estimate": np.nan, "boot": np.full(study.config.n_boot, np.nan)}
            res = {g: {**e, **{m: nan for m in SELECTION_METRICS},
                       "selection_rates": {"unprivileged": nan, "privileged": nan}} for g, e in res.items()}
        per.append(res)
    out = {}
    for metric in SELECTION_METRICS:
        groups = {}
        for g in per[0]:
            if metric == "disparate_impact" and len(per) > 1:  # the ratio of mean selection rates over labels
                rates = [[r[g]["selection_rates"][side] for r in per if g in r] for side in ("unprivileged",
                                                                                          "privileged")]
                point = float(macro_disparate_impact(*[[e["estimate"] for e in side] for side in rates]))
                boot = macro_disparate_impact(*[np.vstack([e["boot"] for e in side]) for side in rates])
            else:
                point = float(np.mean([r[g][metric]["estimate"] for r in per if g in r]))
                boot = _nan_mean([r[g][metric]["boot"] for r in per if g in r])
            groups[g] = {**_est(point, boot, ci), "privileged": str(per[0][g]["privileged"])}
        if two and len(groups) == 1:
            out[metric] = next(iter(groups.values()))
        else:
            out[metric] = {g: groups[g] if g in groups else suppressed() for g in everyone
                           if g in groups or g in hidden}
    return out


def _fairness(study: _Study, name: str) -> dict:
    ci = study.config.ci
    out = {}
    for attr, values in study.attributes.items():
        cells = study.cells[attr]
        present = cells["groups"]
        shown = [g for g in present if g not in cells["attr"]]
        if len(shown) < 2:
            study.warnings.append(f"{name}: attribute {attr!r} has {len(shown)} group(s) with at least "
                                  f"{study.config.min_cell} patients in the test split; its fairness metrics are "
                                  "skipped")
            continue
        per_label, label_boot = {}, {}  # label_boot[(label, group)]: reused by the macro rows
        for lab in list(study.labels) + ["macro"]:
            hidden = cells["macro"] if lab == "macro" else cells["labels"][lab]
            groups, group_boot = {}, {}
            for g in present:
                if g in hidden:  # a small cell: no count, no metric, and not in the others' reference
                    groups[g] = suppressed()
                    continue
                mask = values == g
                if lab == "macro":
                    parts = [label_boot[(la, g)] for la in study.labels]
                    point = float(np.mean([q[0] for q in parts]))
                    b = _nan_mean([q[1] for q in parts])
                    n, n_pos = int(mask.sum()), None
                else:
                    point, b, n, n_pos = label_boot[(lab, g)] = study.auroc_boot(name, lab, mask)
                if not np.isfinite(point):
                    why = "a label in it is null" if lab == "macro" else "one class"
                    study.warnings.append(f"{name}: AUROC of {lab} for {attr}={g} is null ({why})")
                    point, b = float("nan"), np.full(len(b), np.nan)
                group_boot[g] = (point, b, n)
                groups[g] = {"n": n, "n_pos": n_pos, "auroc": _est(point, b, ci)}
                if lab != "macro":
                    groups[g].update(_group_metrics(study, name, lab, mask, ci))
            parity = {}
            for g in present:
                if g in hidden:
                    parity[g] = suppressed()
                    continue
                others = [h for h in group_boot if h != g and np.isfinite(group_boot[h][0])]
                if not np.isfinite(group_boot[g][0]) or not others:
                    parity[g] = {"estimate": None, "ci_low": None, "ci_high": None}
                    continue
                wts = np.array([group_boot[h][2] for h in others], dtype=float)
                ref_point = float(np.average([group_boot[h][0] for h in others], weights=wts))
                ref_boot = np.average(np.vstack([group_boot[h][1] for h in others]), axis=0, weights=wts)
                pp_point, pp_boot = group_boot[g][0] - ref_point, group_boot[g][1] - ref_boot
                study.boots[(name, lab, attr, g)] = (pp_point, pp_boot)
                # resamples where any group is undefined drop out: say how many the interval used
                parity[g] = {**_est(pp_point, pp_boot, ci), "n_boot_used": int(np.isfinite(pp_boot).sum())}
            per_label[lab] = {"groups": groups, "performance_parity": parity,
                              **_selection(study, name, attr, values, lab, ci, hidden)}
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
    # ci_low/ci_high (Fisher z) treat every image as independent; the bootstrap resamples patients
    boot = pearson_r_bootstrap(x, y, study.W, confidence=study.config.ci) if res["r"] is not None else None
    return {"r": res["r"], "p_value": res["p_value"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
            "n": res["n"], "x": "age", "y": "abs_error",
            "bootstrap": None if boot is None else {**boot, "clustered": study.resampler.clustered,
                                                    "method": "percentile, the study's resamples"}}


def _suppress_by_group(res: dict, groups: dict[str, np.ndarray], units: np.ndarray, k: int, min_cell: int,
                       warnings: list[str], name: str, attack: str) -> None:
    """Suppress the attack's by-group entries of small groups: a group with fewer than ``min_cell`` attacked
    members or non-members (patients, when it has any). ``groups``/``units`` run over the attacked rows, the
    ``k`` members first."""
    by_group = res.get("by_group") or {}
    member = np.r_[np.ones(k, bool), np.zeros(len(units) - k, bool)]
    for attr, entries in by_group.items():
        values = groups[attr]
        counts = {g: [count_units(units, (values == g) & member), count_units(units, (values == g) & ~member)]
                  for g in entries}
        rows, _ = suppress_table(counts, min_cell, whole_rows=True)
        for g in rows:
            entries[g] = suppressed()
        if rows and attack == "loss":
            warnings.append(f"{name}: loss attack by {attr}: group(s) {', '.join(g for g in entries if g in rows)} "
                            f"suppressed: fewer than {min_cell} attacked members or non-members")


class _AttackSample:
    """The units the membership-inference attacks score: ``k`` member and ``k`` non-member units drawn once, with
    the audit's seed, from the first model's table and found in every other model's, with one bootstrap over
    their patients that every model shares. Attack AUCs are then paired across models, as the test-split metrics
    are, and a privacy gap can be compared between models resample by resample.

    ``unit`` "image": the units are rows (images), resampled by patient. ``unit`` "patient": the units are
    patients whose rows are all members (training patients) or all non-members (held-out patients); patients
    with both are left out (``n_mixed``); a patient's score is the mean of its rows' scores, its group the most
    frequent value of the attribute over its rows, and the bootstrap resamples the patients."""

    def __init__(self, df: pd.DataFrame, config: AuditConfig, attributes, unit: str = "image"):
        from privaudit.audit.privacy import unit_codes, unit_values

        member = df["member"].to_numpy().astype(int)
        rng = np.random.default_rng(config.seed)
        self.unit = unit
        self.n_mixed = 0
        if unit == "patient":
            codes, uniq = unit_codes(df["patient_id"])
            lo = np.full(len(uniq), 1)
            hi = np.zeros(len(uniq), int)
            np.minimum.at(lo, codes, member)
            np.maximum.at(hi, codes, member)
            cand_in, cand_out = np.flatnonzero(lo == 1), np.flatnonzero(hi == 0)
            self.n_mixed = int((lo != hi).sum())
        else:
            cand_in, cand_out = np.flatnonzero(member == 1), np.flatnonzero(member == 0)
        k = int(min(len(cand_in), len(cand_out)))
        idx_in = np.sort(rng.choice(cand_in, k, replace=False))
        idx_out = np.sort(rng.choice(cand_out, k, replace=False))
        chosen = np.r_[idx_in, idx_out]
        self.k = k
        singles = [a for a in attributes if "*" not in a]
        arrays = attribute_arrays(df, config.age_edges, columns=singles)
        self.varying: dict[str, int] = {}   # attribute -> attacked patients with several values over their images
        if unit == "patient":
            self.ids = uniq[chosen].astype(str)
            # the attacked patients' codes: position j of the sample for patient ids[j], -1 for the others
            where = np.full(len(uniq), -1)
            where[chosen] = np.arange(2 * k)
            rows = where[codes]
            self.groups = {}
            for attr in singles:
                if attr in arrays:
                    self.groups[attr], self.varying[attr] = unit_values(arrays[attr], rows, 2 * k)
            self.units = self.ids.astype(object)   # small cells count patients: each unit is one
            clusters = None                        # the units are the patients: resample them
        else:
            self.ids = df["sample_id"].astype(str).to_numpy()[chosen]
            self.groups = {attr: arrays[attr][chosen] for attr in singles if attr in arrays}
            self.units = units_of(df)[chosen]
            clusters = df["patient_id"].to_numpy()[chosen] if "patient_id" in df.columns else None
        self.resampler = Resampler(2 * k, n_boot=config.n_boot, seed=config.seed, clusters=clusters,
                                   cluster=config.cluster)
        # patients are resampled: the image rows' patients (clustered), or the units themselves (patient unit)
        self.clustered = self.resampler.clustered or (unit == "patient" and config.cluster)
        self._sample_major = None

    @property
    def sample_major(self):
        if self._sample_major is None:
            self._sample_major = self.resampler.sample_major()
        return self._sample_major

    def rows_in(self, df: pd.DataFrame, unit: str = "image") -> np.ndarray | None:
        """Where the sample's units are in ``df``, or None when ``df`` is attacked in another unit, lacks one of
        them or disagrees on its membership. Image unit: the positions of the sample's rows (members first).
        Patient unit: per row of ``df``, the position of its patient in the sample (-1: not attacked)."""
        if unit != self.unit:
            return None
        want = np.r_[np.ones(self.k, int), np.zeros(self.k, int)]
        member = df["member"].to_numpy().astype(int)
        if unit == "image":
            pos = pd.Index(df["sample_id"].astype(str)).get_indexer(self.ids)
            if (pos < 0).any():
                return None
            return pos if np.array_equal(member[pos], want) else None
        if "patient_id" not in df.columns:
            return None
        codes = pd.Index(self.ids).get_indexer(df["patient_id"].astype(str))
        at = codes >= 0
        if len(np.unique(codes[at])) != 2 * self.k or not np.array_equal(member[at], want[codes[at]]):
            return None
        return codes

    def unit_scores(self, index: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The sample's units' scores (``2k``, members first) from per-row ``scores``; ``index`` from
        :meth:`rows_in`. A patient's score is the mean of its rows' finite scores (nan when it has none)."""
        from privaudit.audit.privacy import unit_mean

        scores = np.asarray(scores, dtype=float)
        return scores[index] if self.unit == "image" else unit_mean(scores, index, 2 * self.k)


def _attack_sample(study: _Study, name: str, df: pd.DataFrame, unit: str) -> tuple[_AttackSample | None, np.ndarray]:
    """The study's attack sample and where its units are in ``df``; a model whose table lacks those units (or
    labels their membership otherwise, or is attacked in another unit) gets a sample of its own, unpaired, with
    a warning. (None, None) when no unit is a clean member or non-member."""
    samples = study.attack_samples
    first = next(iter(samples.values()), None)
    rows = first.rows_in(df, unit) if first is not None else None
    if rows is None:
        own = _AttackSample(df, study.config, list(study.attributes), unit)
        if own.k == 0:
            return None, None
        if first is not None:
            study.warnings.append(f"{name}: its attacked samples are not those of {next(iter(samples))!r} (other "
                                  "sample ids, membership or unit), so its attack AUCs are not paired with theirs and "
                                  "the privacy-gap comparisons leave it out")
        samples[name] = own
        return own, own.rows_in(df, unit)
    samples[name] = first
    return first, rows


def _attack_intervals(study: _Study, name: str, attack: str, res: dict, scores: np.ndarray, ok: np.ndarray,
                      sample: _AttackSample) -> None:
    """Bootstrap intervals on the attack's AUC, overall and per group, and each group's attack-AUC gap (its AUC
    minus the size-weighted mean of the other shown groups') with its interval and test; the gaps' resamples
    go to ``study.attack_boots`` for the privacy-gap comparison."""
    from privaudit.audit._cells import is_suppressed
    from privaudit.audit.exposure import auc_gaps, normal_test

    ci, alpha = study.config.ci, study.config.alpha
    y = np.r_[np.ones(sample.k), np.zeros(sample.k)]
    s = np.where(ok, scores, 0.0)
    boots = stats.weighted_auroc_fast(y, s, sample.sample_major, keep=ok)
    res["auc_ci"] = {**_est(res["auc"], boots, ci, n_boot=True), "cluster": sample.clustered}
    res["auc_gap"] = {}
    for attr, entries in (res.get("by_group") or {}).items():
        values = sample.groups[attr]
        shown = {}
        for g, e in entries.items():
            if is_suppressed(e):
                continue
            b = stats.weighted_auroc_fast(y, s, sample.sample_major, keep=ok & (values == g))
            point = float("nan") if e.get("auc") is None else e["auc"]
            e["auc_ci"] = _est(point, b, ci)
            shown[g] = (point, b, e["n"])
        gaps = auc_gaps(shown)
        out = {}
        for g, e in entries.items():
            if is_suppressed(e):
                out[g] = suppressed()
            elif g in gaps:
                point, b = gaps[g]
                study.attack_boots[(name, attack, attr, g)] = (point, b)
                test = normal_test(point, b, alpha=alpha)
                out[g] = {**_est(point, b, ci), "p_value": test["p_value"],
                          "equivalence_bound": test["equivalence_bound"], "n_boot_used": test["n_boot_used"]}
            else:
                out[g] = {"estimate": None, "ci_low": None, "ci_high": None, "p_value": None,
                          "equivalence_bound": None, "n_boot_used": 0}
        res["auc_gap"][attr] = out


def _one_per_pair(groups: list) -> list:
    """With two groups their gaps are mirror images: judge one of them."""
    return groups[:1] if len(groups) == 2 else groups


def _exposure(study: _Study, name: str, attacks: dict | None) -> dict:
    """Per attribute, is some group more (or less) exposed than the others in this model? Holm across the
    model's attributes, attacks and groups (:func:`privaudit.audit.exposure.exposure_verdict`)."""
    from privaudit.audit.exposure import exposure_verdict

    rows = []
    for attack, res in (attacks or {}).items():
        for attr, gaps in ((res or {}).get("auc_gap") or {}).items():
            measured = [g for g, v in gaps.items() if v.get("estimate") is not None]
            for g in _one_per_pair(measured):
                rows.append((attr, attack, g, gaps[g]))
    adjusted = holm([r[3]["p_value"] for r in rows]) if rows else np.array([])
    out = {}
    for attr in dict.fromkeys(r[0] for r in rows):
        idx = [i for i, r in enumerate(rows) if r[0] == attr]
        out[attr] = exposure_verdict([rows[i][3] for i in idx], names=[f"{attr}={rows[i][2]} ({rows[i][1]} attack)"
                                                                       for i in idx],
                                     margin=study.config.margin, alpha=study.config.alpha,
                                     adjusted_p=[adjusted[i] for i in idx], family_size=len(rows))
    return out


def _attacks(df: pd.DataFrame, labels, name: str, study: _Study, *, extra_scores: pd.DataFrame | None = None,
             delta: float = 0.0, unit: str = "image") -> dict | None:
    """Threshold membership-inference attacks on member units against an equal number of non-member units (the
    study's attack sample), in ``unit`` (patients: each patient's score is the mean of its images' scores);
    by group for the study's single attributes, small groups suppressed; intervals on every rate
    (Clopper-Pearson) and every AUC (the shared patient bootstrap). Every attack entry says its ``unit``."""
    from privaudit.audit.attacks import create_attack
    from privaudit.audit.privacy import PATIENT_SUFFIX, attack_metrics

    warnings, seed, min_cell = study.warnings, study.config.seed, study.config.min_cell
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
    sample, index = _attack_sample(study, name, df, unit)
    if sample is None:
        warnings.append(f"{name}: membership-inference attacks are null: every patient has both member and "
                        "non-member images, so no patient is a training or a held-out patient; split by patient")
        return None
    if sample.n_mixed:
        warnings.append(f"{name}: {sample.n_mixed} patients with both member and non-member images are left out of "
                        "the patient-level attacks (neither training nor held-out patients); split by patient")
    for attr, n in sample.varying.items():
        if n:
            warnings.append(f"{name}: attacks by {attr}: {n} attacked patients have more than one {attr} value over "
                            "their images; each is grouped by its most frequent one")
    k, what = sample.k, f"{unit}s"
    groups, units = sample.groups, sample.units
    row_scores = create_attack("loss").score(df, labels)
    extra_null: list[str] = []
    if extra_scores is not None:  # shadow-model attacks (LiRA, RMIA) scored by `privaudit attack`
        aligned = extra_scores.set_index("sample_id").reindex(df["sample_id"].astype(str))
        for col in [c for c in aligned.columns if not c.endswith(PATIENT_SUFFIX)]:
            # patients: the attack's own per-patient scores when stored, else the mean of its per-image scores
            source = f"{col}{PATIENT_SUFFIX}" if unit == "patient" and f"{col}{PATIENT_SUFFIX}" in aligned else col
            row_scores[col] = aligned[source].to_numpy(dtype=float)
    # every attack's scores per attacked unit (members first)
    scores = {attack: sample.unit_scores(index, sc) for attack, sc in row_scores.items()}
    for col in [c for c in row_scores if c not in ("loss", "confidence", "entropy")]:
        missing = int(np.isnan(scores[col]).sum())
        if missing == 2 * k:
            warnings.append(f"{name}: attack {col} has no scores (too few shadow models); it is null")
            extra_null.append(col)
            del scores[col]
        elif missing:
            warnings.append(f"{name}: attack {col} leaves out {missing} of the {2 * k} attacked {what}, which no "
                            "shadow model had both in and out; train more shadow models to include them")
    if "loss" not in scores:
        warnings.append(f"{name}: no per-sample 'loss' column, so the loss attack is null; the confidence "
                        "attack uses the labels and probabilities instead")
    base = [scores[x] for x in ("loss", "confidence", "entropy") if x in scores]
    if base:
        from privaudit.audit.privacy import trained_attack_scores

        # the features of a patient are its mean loss, confidence and entropy scores
        scores["trained"] = trained_attack_scores(np.column_stack(base), np.r_[np.ones(k), np.zeros(k)], seed=seed)
    attacks = {"loss": None, **{col: None for col in extra_null}}
    for attack, sc in scores.items():
        ok = np.isfinite(sc)  # shadow-model attacks may lack a score for a few units
        ok_in, ok_out = ok[:k], ok[k:]
        res, warns = attack_metrics(sc[:k][ok_in], sc[k:][ok_out],
                                    groups={a: g[ok] for a, g in groups.items()}, confidence=study.config.ci)
        res["unit"] = unit
        res.setdefault("by_group", {})  # {} when no attribute is audited
        _suppress_by_group(res, {a: g[ok] for a, g in groups.items()}, units[ok], int(ok_in.sum()), min_cell,
                           warnings, name, attack)
        _attack_intervals(study, name, attack, res, sc, ok, sample)
        attacks[attack] = res
        if attack == "loss":
            warnings.extend(f"{name}: loss attack ({what}): {w}" for w in warns)
            own_null = [f"{attr}={g}" for attr, entries in res["by_group"].items() for g, e in entries.items()
                        if not e.get("suppressed") and e["tpr_at_own_fpr"]["0.01"] is None]
            if own_null:
                warnings.append(f"{name}: loss attack: the TPR at a group's own 1% FPR is null for "
                                f"{', '.join(own_null)}: fewer than 100 attacked non-members in the group")
            from privaudit.audit.privacy import repeated_trials_bound

            bound = repeated_trials_bound(sc[:k][ok_in], sc[k:][ok_out], delta=delta, seed=seed)
            if bound is not None:  # its counts (tp, fn, fp, tn and the non-member shares) are in the attack's unit
                bound["unit"] = unit
            res["epsilon_lower_bound_repeated_trials"] = bound
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
    # The canary unit: a row of canaries.csv is one image, or (train with the patient unit) one canary patient
    # scored by the mean loss of its images; m counts those units. Tables from before units are images.
    unit = str(canaries["unit"].iloc[0]) if "unit" in canaries.columns and len(canaries) else "image"
    n_images = (canaries["n_images"].to_numpy() if "n_images" in canaries.columns else np.ones(len(canaries)))
    res.update({"unit": unit, "n_images": int(np.sum(n_images)),
                "score": "minus the mean loss of the canary patient's images" if unit == "patient"
                else "minus the canary's loss"})
    # Beside Steinke et al.'s bound, the f-DP one (Mahloujifar et al.), one-sided over every threshold with a
    # Bonferroni correction. It needs delta > 0: a non-private run is read at the delta DP would use for its N.
    from privaudit.audit.onerun import FDP, one_run_epsilon
    from privaudit.config import default_delta

    fdp_delta = delta if dp else (default_delta(int(run["n_train"])) if run and run.get("n_train") else None)
    res["fdp"] = (None if not fdp_delta else
                  one_run_epsilon(scores, included, delta=fdp_delta, confidence=0.95, method=FDP, thresholds="all"))
    block["empirical_epsilon"] = res
    if dp and run.get("privacy_unit") == "image" and np.max(n_images, initial=1) > 1:
        # a canary with several images is a group of images: an image-level epsilon does not bound it
        warnings.append(f"{name}: the canaries have several images each but the run is image-level DP, so the "
                        "one-run bound is not compared with its epsilon (no soundness check)")
    elif dp:
        check = soundness(float(run["epsilon"]), res["r"], res["v"], delta, res["m"], confidence=0.99)
        check["unit"] = run.get("privacy_unit") or "image"   # the epsilon compared: per patient or per image
        block["soundness"] = check
        if check["violated"]:
            warnings.append(f"{name}: SOUNDNESS VIOLATION: the canaries were guessed too well for the claimed "
                            f"epsilon {run['epsilon']:.3g} (p = {check['p_value']:.2g} at 99% confidence); the "
                            "training broke its own DP assumptions, so its epsilon must not be trusted")


def _attack_unit(run: dict | None, name: str, df: pd.DataFrame, study: _Study) -> str:
    """The unit ``name``'s attacks score (:func:`privaudit.audit.privacy.attack_unit`): its train.json's
    ``privacy_unit``; else the one the study's runs recorded, when they agree; else the patient when some patient
    has several images (and none is split), which the warnings say for a model without a train.json."""
    from privaudit.audit.privacy import attack_unit, mixed_patients

    unit, source = attack_unit((run or {}).get("privacy_unit"), df, study_unit=study.recorded_unit)
    if unit == "patient" and "patient_id" not in df.columns:
        study.warnings.append(f"{name}: the privacy unit is the patient, but the prediction file has no patient_id "
                              "column, so the membership-inference attacks score images; add patient_id")
        return "image"
    if source == "default" and not run:
        why = ("some patient has several images" if unit == "patient" else
               "the table has no patient ids" if "patient_id" not in df.columns else
               "some patients have both member and non-member images" if mixed_patients(df) else
               "no patient has several images")
        study.warnings.append(f"{name}: no train.json records the privacy unit, so the membership-inference attacks "
                              f"score {unit}s ({why})" + (": a patient's score is the mean of its images' scores"
                                                          if unit == "patient" else ""))
    return unit


def _privacy(run: dict | None, name: str, df: pd.DataFrame, study: _Study, *,
             canaries: pd.DataFrame | None = None, attack_scores: pd.DataFrame | None = None) -> dict:
    warnings, seed = study.warnings, study.config.seed
    delta = float(run["delta"]) if run and run.get("dp") and run.get("delta") else 0.0
    attacks = _attacks(df, study.labels, name, study, extra_scores=attack_scores, delta=delta,
                       unit=_attack_unit(run, name, df, study))
    block = {"accountant": None, "attacks": attacks, "empirical_epsilon": None, "soundness": None,
             "exposure": _exposure(study, name, attacks)}
    _empirical(block, canaries, run, name, warnings, seed)
    if run:   # what training warned about (a fallback to image-level DP, patient ids a preset derived, ...)
        warnings.extend(f"{name}: {w}" for w in run.get("warnings") or [])
    if not run or not run.get("dp"):
        return block
    acc = {k: run.get(k) for k in PRIVACY_KEYS}
    # the privacy unit (patient or image; null: not recorded, an image-level run from before units) and, for an
    # image-level run, what it guarantees a patient with k images
    acc.update({k: run.get(k) for k in ("privacy_unit", "n_units", "group_privacy")})
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
            res = stats.delong_test(study.y[lab][keep], study.scores(name, lab)[keep],
                                    study.scores(ref, lab)[keep], clusters=clusters)
            delong, log_p = res["p_value"], res["log_p_value"]
        except ValueError:  # one class: DeLong is undefined, as is the AUROC
            delong = log_p = None
        labels[lab] = {"auroc_difference": _est(pa - pr, d, ci), "p_value": paired_p_value(d),
                       "delong_p_value": None if delong is None or not np.isfinite(delong) else float(delong),
                       # exact where the p-value itself is floored at 2.2e-308
                       "delong_log10_p_value": None if log_p is None or not np.isfinite(log_p)
                       else float(log_p / np.log(10))}
    pa, ba = boots[(name, "macro", None, None)]
    pr, br = boots[(ref, "macro", None, None)]
    d = ba - br
    out = {"labels": labels, "macro_auroc_difference": _est(pa - pr, d, ci), "p_value": paired_p_value(d)}

    # Does DP amplify unfairness? Change in each parity gap, paired over the same resamples (one seed each:
    # stats.seed_gap_change with arrays of length 1; the sweep module passes every seed).
    rows = []
    for attr in study.attributes:
        present = [g for g in study.cells[attr]["groups"] if g not in study.cells[attr]["attr"]]
        # with two groups the two gaps are mirror images: judge one of them
        groups = present[:1] if len(present) == 2 else present
        for lab in list(study.labels) + ["macro"]:
            for g in groups:
                if (name, lab, attr, g) not in boots or (ref, lab, attr, g) not in boots:
                    continue
                (p1, b1), (p0, b0) = boots[(name, lab, attr, g)], boots[(ref, lab, attr, g)]
                rows.append({"attr": attr, "lab": lab, "group": g, "change": stats.seed_gap_change(
                    [p1], [p0], b1[None, :], b0[None, :], ci=ci, alpha=cfg.alpha)})
    # Holm across attributes, labels and groups (the macro rows are summaries, outside the family)
    family = [i for i, r in enumerate(rows) if r["lab"] != "macro"]
    adjusted = np.full(len(rows), np.nan)
    if family:
        adjusted[family] = holm([rows[i]["change"]["p_value"] for i in family])
    fair, summary = {}, {}
    for attr in dict.fromkeys(r["attr"] for r in rows):
        for lab in dict.fromkeys(r["lab"] for r in rows if r["attr"] == attr):
            idx = [i for i, r in enumerate(rows) if r["attr"] == attr and r["lab"] == lab]
            verdict = _verdict(rows, idx, adjusted, cfg, family_size=len(family) if lab != "macro" else None)
            changes = {rows[i]["group"]: _change_entry(rows[i]["change"], mdc)
                       for i, mdc in zip(idx, verdict["minimum_detectable_change"]["by_change"])}
            fair.setdefault(attr, {})[lab] = {"parity_gap_change": changes, "verdict": verdict}
        idx = [i for i in family if rows[i]["attr"] == attr]
        summary[attr] = _verdict(rows, idx, adjusted, cfg, family_size=len(family))
        # one warning for every comparison of single runs; the others name their comparison
        study.warnings.extend(w if w == SINGLE_RUNS_WARNING else f"{name} vs {ref}: {w}"
                              for w in summary[attr]["warnings"])
    out["fairness"] = fair
    out["fairness_verdict"] = summary
    out["privacy_gap"], out["privacy_gap_verdict"] = _privacy_gap(study, name, ref)
    out["covers_training_randomness"] = False  # one model per side; the sweep module covers seeds
    return out


GAP_KEYS = ("estimate", "ci_low", "ci_high", "p_value", "p_value_widened", "p_value_narrowed", "direction", "measure",
            "abs_gap_change", "gap_private", "gap_reference", "equivalence_bound", "n_boot_used", "n_seeds",
            "covers_training_randomness")


def _privacy_gap(study: _Study, name: str, ref: str) -> tuple[dict, dict]:
    """Does DP narrow or widen the gap in attack success between groups? Per attribute, attack and group, the
    change of the attack-AUC gap from ``ref`` to ``name`` on the shared resamples
    (:func:`privaudit.audit.exposure.privacy_gap_change`), Holm across attributes, attacks and groups, and one
    verdict per attribute (:func:`privaudit.audit.exposure.privacy_gap_verdict`). Empty when the two models'
    attacks are not paired (other attacked samples) or were not run."""
    from privaudit.audit.exposure import privacy_gap_change, privacy_gap_verdict

    cfg, boots = study.config, study.attack_boots
    pair = study.attack_samples.get(name), study.attack_samples.get(ref)
    if pair[0] is None or pair[0] is not pair[1]:
        if pair[0] is not None and pair[1] is not None:
            study.warnings.append(f"{name} vs {ref}: the privacy-gap comparison is skipped: the two models' attacks "
                                  "ran on different samples, so their resamples are not paired")
        return {}, {}
    rows = []
    for attr in study.attributes:
        attacks = list(dict.fromkeys(a for (m, a, at, _) in boots if m == name and at == attr))
        for attack in attacks:
            both = [g for (m, a, at, g) in boots if m == name and a == attack and at == attr
                    and (ref, attack, attr, g) in boots]
            for g in _one_per_pair(both):
                (p1, b1), (p0, b0) = boots[(name, attack, attr, g)], boots[(ref, attack, attr, g)]
                rows.append({"attr": attr, "attack": attack, "group": g,
                             "change": privacy_gap_change(p1, p0, b1, b0, ci=cfg.ci, alpha=cfg.alpha)})
    adjusted = holm([r["change"]["p_value"] for r in rows]) if rows else np.array([])
    changes, verdicts = {}, {}
    for attr in dict.fromkeys(r["attr"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["attr"] == attr]
        verdict = privacy_gap_verdict([rows[i]["change"] for i in idx],
                                      names=[f"{attr}={rows[i]['group']} ({rows[i]['attack']} attack)" for i in idx],
                                      margin=cfg.margin, alpha=cfg.alpha, adjusted_p=[adjusted[i] for i in idx],
                                      family_size=len(rows), n_boot=cfg.n_boot)
        for i, mdc in zip(idx, verdict["minimum_detectable_change"]["by_change"]):
            r = rows[i]
            changes.setdefault(attr, {}).setdefault(r["attack"], {})[r["group"]] = {
                **{k: r["change"][k] for k in GAP_KEYS}, "minimum_detectable_change": mdc}
        verdicts[attr] = verdict
        study.warnings.extend(f"{name} vs {ref}: {w}" for w in verdict["warnings"])
    return changes, verdicts


def _change_entry(change: dict, mdc: float | None) -> dict:
    """One parity-gap change as audit.json keeps it (the full stats.seed_gap_change result, minus its internals)."""
    keep = ("estimate", "ci_low", "ci_high", "p_value", "measure", "abs_gap_change", "gap_private", "gap_reference",
            "equivalence_bound", "n_boot_used", "n_seeds", "covers_training_randomness")
    return {**{k: change[k] for k in keep}, "minimum_detectable_change": mdc}


def _verdict(rows, idx, adjusted, cfg: AuditConfig, *, family_size: int | None) -> dict:
    """gap_change_verdict over ``rows[idx]``: Holm-adjusted over the whole family when ``family_size`` is given,
    else (the macro summaries) Holm within ``idx``."""
    sub = [rows[i] for i in idx]
    return gap_change_verdict([r["change"] for r in sub], margin=cfg.margin, alpha=cfg.alpha,
                              names=[f"{r['attr']}={r['group']} ({r['lab']})" for r in sub],
                              adjusted_p=[adjusted[i] for i in idx] if family_size is not None else None,
                              family_size=family_size, n_boot=cfg.n_boot)


SPLITS = ("train", "val", "test")


def _composition(frame: pd.DataFrame, arrays: dict[str, np.ndarray], min_cell: int,
                 warnings: list[str]) -> tuple[dict, dict]:
    """Cohort size (images) per split for each group of each (single) sensitive attribute, and the
    patient-level split check (no patient may sit in two splits). Counts only: aggregates. A group with fewer
    than ``min_cell`` patients is suppressed, and a split count under ``min_cell`` patients is hidden with the
    group's next-smallest ones (:func:`~privaudit.audit._cells.suppress_table`)."""
    split = frame["split"].to_numpy()
    units = units_of(frame)
    total = len(frame)
    rule = f"fewer than {min_cell} patients, or a split count from which one could be worked out"
    comp = {}
    for attr, vals in arrays.items():
        if "*" in attr:
            continue
        present = sorted({v for v in vals if v is not None}, key=str)
        unknown = np.array([v is None for v in vals], dtype=bool)
        counts = {g: [count_units(units, (vals == g) & (split == s)) for s in SPLITS] for g in present}
        rows, cells = suppress_table(counts, min_cell)
        groups = {}
        for g in present:
            if g in rows:
                groups[str(g)] = suppressed()
                continue
            mask = vals == g
            images = {s: int((mask & (split == s)).sum()) for s in SPLITS}
            groups[str(g)] = {"n": int(mask.sum()),
                              **{f"n_{s}": None if (g, j) in cells else images[s] for j, s in enumerate(SPLITS)},
                              "share": float(mask.sum() / total) if total else 0.0}
            hidden_splits = [s for j, s in enumerate(SPLITS) if (g, j) in cells]
            if hidden_splits:
                groups[str(g)]["suppressed_splits"] = hidden_splits
        comp[attr] = {"groups": groups, "n_unknown": int(unknown.sum()), "rule": rule, "min_cell": min_cell}
        if rows or cells:
            what = [f"group(s) {', '.join(str(g) for g in present if g in rows)}"] if rows else []
            what += [f"{len(cells)} split count(s)"] if cells else []
            warnings.append(f"{attr}: the cohort composition suppresses {' and '.join(what)} ({rule})")
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
    provenance: dict | None = None,
    warnings: list[str] | None = None,
    is_sweep: bool = False,
) -> AuditReport:
    """Audit one or more models scored on the same test samples.

    ``predictions`` maps model name to its prediction table; ``runs`` maps model name to its ``train.json``
    (for the dp block); ``reference`` names the model the others are compared against (by default
    ``non_private`` when present); ``canaries`` maps model name to its canary table (``included``, ``loss``)
    for the one-run empirical epsilon; ``attack_scores`` maps model name to a table of ``sample_id`` plus one
    score column per shadow-model attack (higher = member), as ``privaudit attack`` writes it.
    ``provenance`` (the command, each run's configuration, a model card, a sweep's settings) goes into the
    study block as given, and ``warnings`` (e.g. the data loader's) lead the document's warnings. ``is_sweep``:
    the models are the runs of an epsilon sweep, aggregated per privacy setting over seeds (the setting and seed
    read from each run's train.json).
    """
    if not predictions:
        raise DataError("no prediction tables to audit")
    config = config or AuditConfig()
    runs = runs or {}
    frames = {name: validate_predictions(df, f"predictions of {name!r}") for name, df in predictions.items()}
    study = _Study(frames, config)
    study.warnings.extend(warnings or [])
    for name, df in frames.items():
        blank = blank_patient_warning(blank_patient_ids(df), len(df), f"predictions of {name!r}")
        if blank:
            study.warnings.append(blank)
    if reference is None and "non_private" in frames and len(frames) > 1:
        reference = "non_private"
    if reference is not None and reference not in frames:
        raise DataError(f"--reference {reference!r} is not one of the models ({', '.join(frames)})")

    # the privacy unit the study's runs recorded, when they agree: a run without one (trained without DP) is attacked
    # in it too, so that its attacks stay paired with theirs
    recorded = {(runs.get(n) or {}).get("privacy_unit") for n in frames} - {None}
    study.recorded_unit = next(iter(recorded)) if len(recorded) == 1 else None
    models = {}
    for name, df in frames.items():
        run = runs.get(name)
        run_block = {"backend": None, "model": None, "seed": None, "dp": False}
        if run:
            run_block = {"backend": run.get("backend"), "model": run.get("architecture"), "seed": run.get("seed"),
                         **{k: run.get(k) for k in PRIVACY_KEYS}, "dp": bool(run.get("dp"))}
            # what training warned about (e.g. a zoo network changed for DP) belongs in the audit too
            study.warnings.extend(f"{name}: {w}" for w in run.get("warnings") or [])
        utility, curves = _utility(study, name)
        models[name] = {
            "run": run_block,
            "utility": utility,
            "curves": curves,
            "fairness": _fairness(study, name),
            "privacy": _privacy(run, name, df, study, canaries=(canaries or {}).get(name),
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
    sweep = sweep_groups({name: runs.get(name) for name in models}) if is_sweep else None
    aggregates = aggregates_over_seeds(models, study, sweep) if sweep else None
    trade_offs = trade_offs_of(models, study, prevalence, sweep)
    composition, split_check = _composition(ref_frame, study.attribute_values, config.min_cell, study.warnings)
    data_block.setdefault("composition", composition)
    data_block.setdefault("patient_split_check", split_check)
    if split_check["checked"] and split_check["patients_in_several_splits"]:
        study.warnings.append(f"{split_check['patients_in_several_splits']} patients have images in more than one "
                              "split: test metrics are optimistic and membership labels are blurred; split by patient")
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
            **{k: v for k, v in (provenance or {}).items() if v is not None},
            "min_cell": config.min_cell,
            **({"aggregates": aggregates} if aggregates is not None else {}),
            **({"trade_offs": trade_offs} if trade_offs is not None else {}),
        },
        "models": models,
        "comparisons": comparisons,
        "warnings": list(dict.fromkeys(study.warnings)),
    }
    return AuditReport(doc)
