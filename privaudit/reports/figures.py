"""Figures for the report, drawn with matplotlib from the figure data that the audit keeps in ``audit.json``
(never recomputed from patient rows), and returned as inline SVG strings.

Figure code stays here; templates receive the finished SVG as plain data.
"""

from __future__ import annotations

import io

import numpy as np

COLOURS = ("#0b6e99", "#c2410c", "#15803d", "#7c3aed", "#b91c1c", "#4b5563")


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG is inlined in HTML


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # keep text as text: smaller, searchable, and printable
    return plt.subplots(figsize=(width, height))


def roc_figure(doc: dict, label: str) -> str | None:
    """ROC curves of every model for one label, each with its pointwise 95% bootstrap band."""
    curves = [(name, (m.get("curves") or {}).get(label, {}).get("roc")) for name, m in doc["models"].items()]
    curves = [(n, c) for n, c in curves if c]
    if not curves:
        return None
    fig, ax = _figure(3.6, 3.4)
    for k, (name, c) in enumerate(curves):
        colour = COLOURS[k % len(COLOURS)]
        auc = doc["models"][name]["utility"]["labels"][label]["auroc"]["estimate"]
        ax.plot(c["fpr"], c["tpr"], color=colour, lw=1.6, label=f"{name} (AUROC {auc:.3f})")
        if c.get("tpr_low") is not None:
            ax.fill_between(c["fpr"], c["tpr_low"], c["tpr_high"], color=colour, alpha=0.15, lw=0)
    ax.plot([0, 1], [0, 1], color="#9ca3af", lw=0.8, ls="--")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=label, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    return _svg(fig)


def forest_figure(doc: dict, attribute: str, label: str = "macro") -> str | None:
    """Subgroup AUROC with 95% CIs for each model: one row per group, one marker colour per model."""
    rows = []
    for k, (name, m) in enumerate(doc["models"].items()):
        groups = ((m.get("fairness") or {}).get(attribute) or {}).get(label, {}).get("groups", {})
        for g, v in groups.items():
            a = v.get("auroc") or {}  # a suppressed group has none: it is not drawn
            if a.get("estimate") is not None:
                rows.append((g, k, name, a["estimate"], a["ci_low"], a["ci_high"], v["n"]))
    if not rows:
        return None
    groups = list(dict.fromkeys(r[0] for r in rows))
    n_models = len(doc["models"])
    fig, ax = _figure(5.2, 0.45 * len(groups) * max(1, n_models) + 0.9)
    offsets = np.linspace(-0.18, 0.18, n_models) if n_models > 1 else [0.0]
    seen = set()
    for g, k, name, est, lo, hi, n in rows:
        y = groups.index(g) + offsets[k]
        colour = COLOURS[k % len(COLOURS)]
        ax.errorbar(est, y, xerr=[[est - lo], [hi - est]] if lo is not None else None, fmt="o", ms=4,
                    color=colour, capsize=2, lw=1.2, label=None if name in seen else name)
        seen.add(name)
    ax.set_yticks(range(len(groups)), [f"{g} (n={next(r[6] for r in rows if r[0] == g)})" for g in groups])
    ax.invert_yaxis()
    ax.set(xlabel=f"AUROC ({label})", title=f"{attribute}")
    ax.grid(axis="x", color="#e5e7eb", lw=0.6)
    ax.legend(fontsize=7, frameon=False, loc="best")
    return _svg(fig)


def attack_roc_figure(doc: dict, attack: str = "loss") -> str | None:
    """Membership-inference ROC of each model on log-log axes, where the low-FPR regime that matters shows."""
    curves = [(n, ((m.get("privacy") or {}).get("attacks") or {}).get(attack)) for n, m in doc["models"].items()]
    curves = [(n, a) for n, a in curves if a and a.get("roc")]
    if not curves:
        return None
    fig, ax = _figure(3.6, 3.4)
    floor = 1.0 / max(a["n_nonmembers"] for _, a in curves)
    for k, (name, a) in enumerate(curves):
        fpr, tpr = np.asarray(a["roc"]["fpr"]), np.asarray(a["roc"]["tpr"])
        keep = fpr > 0
        ax.plot(fpr[keep], np.maximum(tpr[keep], floor), color=COLOURS[k % len(COLOURS)], lw=1.4,
                label=f"{name} (AUC {a['auc']:.3f})")
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, color="#9ca3af", lw=0.8, ls="--", label="chance")
    ax.set(xscale="log", yscale="log", xlabel="False positive rate", ylabel="True positive rate",
           title=f"{attack} attack", xlim=(floor, 1), ylim=(floor, 1.05))
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    return _svg(fig)


SPLIT_COLOURS = {"train": "#0b6e99", "val": "#9ca3af", "test": "#c2410c"}


def composition_figure(doc: dict, attribute: str) -> str | None:
    """The cohort by one sensitive attribute: a horizontal bar per group, stacked by split, with small
    (under-represented) groups marked."""
    comp = ((doc["study"].get("data") or {}).get("composition") or {}).get(attribute)
    if not comp or not comp.get("groups"):
        return None
    # suppressed groups are not drawn; a suppressed split count draws as 0, and its group is starred
    groups = [g for g, v in comp["groups"].items() if not v.get("suppressed")]
    if not groups:
        return None
    fig, ax = _figure(4.6, 0.32 * len(groups) + 0.9)
    left = np.zeros(len(groups))
    for split, colour in SPLIT_COLOURS.items():
        vals = np.array([comp["groups"][g][f"n_{split}"] or 0 for g in groups], dtype=float)
        ax.barh(range(len(groups)), vals, left=left, color=colour, label=split, height=0.7)
        left += vals
    ax.set_yticks(range(len(groups)), [f"{g} *" if comp["groups"][g].get("small") or
                                       comp["groups"][g].get("suppressed_splits") else g for g in groups])
    ax.invert_yaxis()
    ax.set(xlabel="images", title=attribute)
    ax.set_axisbelow(True)
    ax.grid(axis="x", color="#e5e7eb", lw=0.6)
    ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(groups) < 4 else -0.18),
              ncol=3)
    return _svg(fig)


def _epsilon_points(doc: dict):
    """(name, epsilon or None, model) for every model; None for non-private and clip-only runs."""
    out = []
    for name, m in doc["models"].items():
        acc = (m.get("privacy") or {}).get("accountant")
        out.append((name, acc.get("epsilon") if acc else None, m))
    return out


def _epsilon_axis(ax, eps) -> None:
    """A log epsilon axis ticked at the epsilons used, labelled plainly (1, 3, 8) rather than as powers."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = sorted({float(f"{e:.2g}") for e in eps})  # seeds reach slightly different epsilons
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])


def tradeoff_utility_figure(doc: dict) -> str | None:
    """The privacy-utility curve: epsilon (log axis) against macro AUROC with its CI; the models without a
    finite epsilon (non-private, clip-only) as horizontal reference lines. Needs two finite epsilons."""
    pts = _epsilon_points(doc)
    finite = [(n, e, m) for n, e, m in pts if e is not None]
    if len({round(e, 6) for _, e, _ in finite}) < 2:
        return None
    fig, ax = _figure(4.6, 3.2)
    est = np.array([m["utility"]["macro_auroc"]["estimate"] for _, _, m in finite], dtype=float)
    lo = np.array([m["utility"]["macro_auroc"].get("ci_low") or np.nan for _, _, m in finite], dtype=float)
    hi = np.array([m["utility"]["macro_auroc"].get("ci_high") or np.nan for _, _, m in finite], dtype=float)
    x = np.array([e for _, e, _ in finite])
    ax.errorbar(x, est, yerr=[est - lo, hi - est], fmt="o", color=COLOURS[0], ms=4, capsize=2, lw=1,
                label="DP models (95% CI)")
    agg = doc["study"].get("aggregates") or {}
    means = sorted((v["epsilon"]["mean"], v["macro_auroc"]["mean"]) for v in agg.values()
                   if isinstance(v, dict) and (v.get("epsilon") or {}).get("mean") is not None
                   and (v.get("macro_auroc") or {}).get("mean") is not None)
    if means:
        ax.plot(*zip(*means), color=COLOURS[0], lw=1, alpha=0.7, label="mean over seeds")
    for k, (name, _, m) in enumerate((n, e, m) for n, e, m in pts if e is None):
        ax.axhline(m["utility"]["macro_auroc"]["estimate"], color=COLOURS[(k + 1) % len(COLOURS)], lw=1, ls="--",
                   label=f"{name} (no finite epsilon)")
    _epsilon_axis(ax, x)
    ax.set(xlabel="epsilon (accountant)", ylabel="macro AUROC", title="privacy-utility")
    ax.grid(color="#e5e7eb", lw=0.6)
    ax.legend(fontsize=6, frameon=False, loc="lower right")
    return _svg(fig)


def tradeoff_fairness_figure(doc: dict, attribute: str) -> str | None:
    """The privacy-fairness curve for one attribute: epsilon against each group's performance-parity gap
    (macro AUROC) with its CI, and the non-private gap as a dashed line in the group's colour."""
    pts = _epsilon_points(doc)
    finite = sorted(((n, e, m) for n, e, m in pts if e is not None), key=lambda t: t[1])
    if len({round(e, 6) for _, e, _ in finite}) < 2:
        return None
    groups = list(dict.fromkeys(g for _, _, m in finite for g in
                                (((m.get("fairness") or {}).get(attribute) or {}).get("macro") or {})
                                .get("performance_parity", {})))
    if not groups:
        return None
    fig, ax = _figure(4.6, 3.2)
    drawn = 0
    for k, g in enumerate(groups):
        colour = COLOURS[k % len(COLOURS)]
        xs, ys, lo, hi = [], [], [], []
        for _, e, m in finite:
            est = ((((m.get("fairness") or {}).get(attribute) or {}).get("macro") or {})
                   .get("performance_parity", {}).get(g)) or {}
            if est.get("estimate") is None:
                continue
            xs.append(e), ys.append(est["estimate"])
            lo.append(est["estimate"] - (est.get("ci_low") if est.get("ci_low") is not None else est["estimate"]))
            hi.append((est.get("ci_high") if est.get("ci_high") is not None else est["estimate"]) - est["estimate"])
        if xs:
            jitter = np.exp(0.02 * (k - len(groups) / 2))  # small multiplicative offset so bars do not overlap
            ax.errorbar(np.array(xs) * jitter, ys, yerr=[lo, hi], fmt="o-", color=colour, ms=3, capsize=2, lw=1,
                        label=str(g))
            drawn += 1
        for n, e, m in pts:
            if e is None:
                est = ((((m.get("fairness") or {}).get(attribute) or {}).get("macro") or {})
                       .get("performance_parity", {}).get(g)) or {}
                if est.get("estimate") is not None:
                    ax.axhline(est["estimate"], color=colour, lw=0.8, ls="--", alpha=0.7)
    if not drawn:  # every group's gap is null (small or one-class groups): nothing to draw
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    ax.axhline(0, color="#6b7280", lw=0.6)
    _epsilon_axis(ax, [e for _, e, _ in finite])
    ax.set(xlabel="epsilon (accountant)", ylabel="parity gap (macro AUROC)",
           title=f"privacy-fairness: {attribute}")
    ax.grid(color="#e5e7eb", lw=0.6)
    ax.legend(fontsize=6, frameon=False, loc="best")
    return _svg(fig)


def figures(doc: dict) -> dict:
    """All report figures: ``roc`` and ``forest`` and ``composition`` and ``tradeoff_fairness`` (dicts of SVG
    by label or attribute), ``attack`` (dict by attack name) and ``tradeoff_utility`` (SVG or None)."""
    labels = doc["study"].get("labels") or []
    roc = {lab: svg for lab in labels if (svg := roc_figure(doc, lab))}
    attrs = doc["study"].get("attributes") or []
    forest = {a: svg for a in attrs if (svg := forest_figure(doc, a))}
    comp_attrs = list(((doc["study"].get("data") or {}).get("composition") or {}))
    composition = {a: svg for a in comp_attrs if (svg := composition_figure(doc, a))}
    attack_names = list(dict.fromkeys(a for m in doc["models"].values()
                                      for a in ((m.get("privacy") or {}).get("attacks") or {})))
    attack = {a: svg for a in attack_names if (svg := attack_roc_figure(doc, a))}
    fairness_curves = {a: svg for a in attrs if (svg := tradeoff_fairness_figure(doc, a))}
    return {"roc": roc, "forest": forest, "composition": composition, "attack": attack,
            "tradeoff_utility": tradeoff_utility_figure(doc), "tradeoff_fairness": fairness_curves}
