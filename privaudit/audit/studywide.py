"""Analysis across the models of a study: an epsilon sweep's aggregates over seeds, the privacy-utility and
privacy-fairness trade-offs (Pearson's r of log epsilon), and the paper's label-difficulty analysis.

Each run's privacy setting and seed are read from its ``train.json`` (``target_epsilon``, ``clip_only``, ``dp``,
``seed``), never parsed from the model's name.
"""

from __future__ import annotations

import numpy as np

from privaudit.audit import stats
from privaudit.audit._cells import is_suppressed
from privaudit.audit.fairness import gap_change_verdict, holm, pearson_r

# An epsilon sweep's settings: a target epsilon ("8"), "inf" (no privacy) or "clip" (clipping without noise).
SWEEP_KINDS = {"inf": "non_private", "clip": "clip_only"}
FEW_LABELS = 10  # label-difficulty r over fewer labels than this says little (one point per label)


def setting_of(run: dict | None) -> str | None:
    """A run's privacy setting, from its train.json: ``"inf"`` (no DP), ``"clip"`` (clip-only) or its target
    epsilon (``"8"``); None when the run records none (a model trained elsewhere, or a fixed noise multiplier)."""
    if not run:
        return None
    if run.get("clip_only"):
        return "clip"
    if not run.get("dp"):
        return "inf"
    target = run.get("target_epsilon")
    return f"{float(target):g}" if target is not None else None


def sweep_groups(runs: dict) -> dict[str, list[str]] | None:
    """The models of an epsilon sweep grouped by privacy setting, in order (``runs``: model name -> train.json);
    None unless there are two or more models and every one records its setting."""
    groups: dict[str, list[str]] = {}
    for name, run in runs.items():
        setting = setting_of(run)
        if setting is None:
            return None
        groups.setdefault(setting, []).append(name)
    for names in groups.values():  # seed order (train.json's seed), so seed k of two settings pairs up
        names.sort(key=lambda n: (runs[n].get("seed") is None, runs[n].get("seed") or 0))
    return groups if len(runs) >= 2 else None


def _seeds(models: dict, names: list[str]) -> list:
    return [(models[n].get("run") or {}).get("seed") for n in names]


def _paired(models: dict, a: list[str], b: list[str]) -> bool:
    """Two settings are paired when they hold the same seeds (seed k of each shares its initialisation)."""
    sa, sb = _seeds(models, a), _seeds(models, b)
    return None not in sa and sa == sb


def _mdc_entry(change: dict, mdc) -> dict:
    """One parity-gap change as audit.json keeps it (as engine's comparisons keep it)."""
    keep = ("estimate", "ci_low", "ci_high", "p_value", "measure", "abs_gap_change", "gap_private", "gap_reference",
            "equivalence_bound", "n_boot_used", "n_seeds", "covers_training_randomness")
    return {**{k: change[k] for k in keep}, "minimum_detectable_change": mdc}


def _per_seed(study, names: list[str], key) -> tuple[np.ndarray, np.ndarray] | None:
    """(per-seed points (S,), replicates (S, B)) of ``study.boots[(name, *key)]`` in ``names``' order, or None."""
    got = [study.boots.get((n, *key)) for n in names]
    if any(g is None for g in got):
        return None
    return np.array([g[0] for g in got], dtype=float), np.vstack([g[1] for g in got])


def _vs_reference(study, names: list[str], ref: list[str], paired: bool) -> dict:
    """Each setting's mean AUROC minus the reference's, over seeds (stats.seed_difference)."""
    ci = study.config.ci

    def diff(key):
        a, b = _per_seed(study, names, key), _per_seed(study, ref, key)
        if a is None or b is None:
            return None
        return stats.seed_difference(a[0], b[0], a[1], b[1], ci=ci, paired=paired)

    return {"macro_auroc": diff(("macro", None, None)),
            "auroc": {lab: diff((lab, None, None)) for lab in study.labels}}


def _fairness_vs_reference(study, setting: str, names: list[str], ref: list[str], paired: bool) -> dict:
    """Does DP amplify unfairness, over seeds: each parity gap of the setting against the reference's, with the
    rows, Holm family and verdicts of engine's single-run comparisons (stats.seed_gap_change with every seed)."""
    cfg = study.config
    rows = []
    for attr in study.attributes:
        present = [g for g in study.cells[attr]["groups"] if g not in study.cells[attr]["attr"]]
        groups = present[:1] if len(present) == 2 else present  # two groups: mirror-image gaps, judge one
        for lab in list(study.labels) + ["macro"]:
            for g in groups:
                a, b = _per_seed(study, names, (lab, attr, g)), _per_seed(study, ref, (lab, attr, g))
                if a is None or b is None:
                    continue
                rows.append({"attr": attr, "lab": lab, "group": g, "change": stats.seed_gap_change(
                    a[0], b[0], a[1], b[1], ci=cfg.ci, alpha=cfg.alpha, paired=paired)})
    family = [i for i, r in enumerate(rows) if r["lab"] != "macro"]
    adjusted = np.full(len(rows), np.nan)
    if family:
        adjusted[family] = holm([rows[i]["change"]["p_value"] for i in family])

    def verdict(idx, family_size):
        sub = [rows[i] for i in idx]
        return gap_change_verdict([r["change"] for r in sub], margin=cfg.margin, alpha=cfg.alpha,
                                  names=[f"{r['attr']}={r['group']} ({r['lab']})" for r in sub],
                                  adjusted_p=[adjusted[i] for i in idx] if family_size is not None else None,
                                  family_size=family_size, n_boot=cfg.n_boot)

    fair, summary = {}, {}
    for attr in dict.fromkeys(r["attr"] for r in rows):
        for lab in dict.fromkeys(r["lab"] for r in rows if r["attr"] == attr):
            idx = [i for i, r in enumerate(rows) if r["attr"] == attr and r["lab"] == lab]
            v = verdict(idx, len(family) if lab != "macro" else None)
            fair.setdefault(attr, {})[lab] = {
                "parity_gap_change": {rows[i]["group"]: _mdc_entry(rows[i]["change"], mdc)
                                      for i, mdc in zip(idx, v["minimum_detectable_change"]["by_change"])},
                "verdict": v}
        summary[attr] = verdict([i for i in family if rows[i]["attr"] == attr], len(family))
        study.warnings.extend(f"sweep: {setting} vs inf: {w}" for w in summary[attr]["warnings"])
    return {"fairness": fair, "fairness_verdict": summary}


def _spread(values, boots, ci: float) -> dict:
    """Mean and seed-to-seed spread (sd with ddof 1, min, max) of one figure over a setting's seeds, and, when
    ``boots`` (each seed's replicates, every model resampled with the same rows) are given, the two-level
    interval of the mean (:func:`~privaudit.audit.stats.seed_mean_interval`): between-seed variance over S plus
    the test-set covariance the seeds share; one seed covers the test patients only. Null seeds are left out."""
    ok = [i for i, v in enumerate(values) if v is not None and np.isfinite(v)]
    v = np.array([values[i] for i in ok], dtype=float)
    out = {"mean": float(v.mean()) if len(v) else None, "sd": float(v.std(ddof=1)) if len(v) >= 2 else None,
           "min": float(v.min()) if len(v) else None, "max": float(v.max()) if len(v) else None, "n_seeds": len(v)}
    if boots is not None:
        res = stats.seed_mean_interval(np.array([np.nan if x is None else x for x in values], dtype=float),
                                       np.vstack(boots), ci=ci)
        out.update(ci_low=res["ci_low"], ci_high=res["ci_high"], n_boot=res["n_boot_used"] or 0, se=res["se"],
                   df=res["df"], var_between=res["var_between"], var_shared_test=res["var_shared_test"],
                   n_boot_used=res["n_boot_used"], covers_training_randomness=res["covers_training_randomness"],
                   test_noise_included=True, method=res["method"], warning=res["warning"])
    return out


def _largest_gap(study, name: str, lab: str, attr: str):
    """The largest |performance-parity gap| over an attribute's groups (point, resamples), or None."""
    keys = [k for k in study.boots if k[0] == name and k[1] == lab and k[2] == attr]
    if not keys:
        return None
    point = max(abs(study.boots[k][0]) for k in keys)
    boot = np.fmax.reduce(np.abs(np.vstack([study.boots[k][1] for k in keys])), axis=0)  # nan only if all are
    return point, boot


def aggregates_over_seeds(models: dict, study, groups: dict[str, list[str]]) -> dict:
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
        if "inf" in groups and setting != "inf":
            paired = _paired(models, names, groups["inf"])
            out[setting]["vs_reference"] = {"reference": "inf", "paired": paired,
                                            **_vs_reference(study, names, groups["inf"], paired)}
            out[setting]["fairness_vs_reference"] = {
                "reference": "inf", "paired": paired,
                **_fairness_vs_reference(study, setting, names, groups["inf"], paired)}
    if any(len(names) < 2 for names in groups.values()):
        study.warnings.append(f"sweep: {stats.NO_TRAINING_RANDOMNESS}")
    return out


def _r_quiet(study, what: str, x, y, xname: str, yname: str, *, warn: bool = True) -> dict:
    res = pearson_r(x, y, confidence=study.config.ci)
    if res.get("reason") and warn:
        study.warnings.append(f"study: Pearson's r of {what} is null: {res['reason']}")
    return {"r": res["r"], "p_value": res["p_value"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
            "n": res["n"], "x": xname, "y": yname}


def _label_difficulty(models: dict, study, groups: dict[str, list[str]], prevalence: dict) -> dict | None:
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


def trade_offs_of(models: dict, study, prevalence: dict | None = None,
                  groups: dict[str, list[str]] | None = None) -> dict | None:
    """Across the DP models of a study: Pearson's r of log(epsilon) against the macro AUROC, each label's AUROC
    and each performance-parity gap (the paper's question: does more privacy move the gaps?), one point per
    model. Non-private and clip-only models have no finite epsilon and stay out; with fewer than 4 points every
    r is null, with one warning. An epsilon sweep also gets the label-difficulty analysis. None for a study that
    is not a sweep and has fewer than two DP models."""
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
            groups_here = list(dict.fromkeys(  # a group suppressed (too few patients) in any model stays out
                g for m in models.values()
                for g, v in ((m["fairness"].get(attr, {}).get(lab) or {}).get("performance_parity", {})).items()
                if not is_suppressed(v)))
            groups_here = [g for g in groups_here if not any(
                is_suppressed(((m["fairness"].get(attr, {}).get(lab) or {}).get("performance_parity", {})).get(g))
                for m in models.values())]
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
        trend = _trend(models, study, groups)
        if trend is not None:
            out["trend"] = trend
    return out


def _trend(models: dict, study, groups: dict[str, list[str]]) -> dict | None:
    """Sweeps: the two-level trend over the DP settings against log epsilon (stats.seed_trend), covering seeds
    and the shared test set; paired when every DP setting holds the same seeds. None with fewer than 2 settings."""
    dp = [s for s, names in groups.items() if SWEEP_KINDS.get(s, "dp") == "dp" and _finite(s)]
    if len(dp) < 2:
        return None
    x = np.log([float(s) for s in dp])
    paired = all(_paired(models, groups[dp[0]], groups[s]) for s in dp[1:])
    cfg = study.config

    def trend(key):
        got = [_per_seed(study, groups[s], key) for s in dp]
        if any(g is None for g in got):
            return None
        return stats.seed_trend(x, [g[0] for g in got], [g[1] for g in got], ci=cfg.ci, paired=paired,
                                seed=cfg.seed)

    parity = {}
    for attr in study.attributes:
        for lab in list(study.labels) + ["macro"]:
            gs = dict.fromkeys(k[3] for k in study.boots if k[1] == lab and k[2] == attr)
            for g in gs:
                t = trend((lab, attr, g))
                if t is not None:
                    parity.setdefault(attr, {}).setdefault(lab, {})[g] = t
    return {"x": "log(epsilon)", "settings": dp, "paired": paired, "macro_auroc": trend(("macro", None, None)),
            "auroc": {lab: trend((lab, None, None)) for lab in study.labels}, "performance_parity": parity}


def _finite(setting: str) -> bool:
    try:
        return bool(np.isfinite(float(setting)) and float(setting) > 0)
    except ValueError:
        return False
