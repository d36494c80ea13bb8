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
            a = v["auroc"]
            if a["estimate"] is not None:
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


def figures(doc: dict) -> dict:
    """All report figures as ``{"roc": {label: svg}, "forest": {attribute: svg}, "attack": svg | None}``
    (missing ones left out)."""
    labels = doc["study"].get("labels") or []
    roc = {lab: svg for lab in labels if (svg := roc_figure(doc, lab))}
    attrs = doc["study"].get("attributes") or []
    forest = {a: svg for a in attrs if (svg := forest_figure(doc, a))}
    return {"roc": roc, "forest": forest, "attack": attack_roc_figure(doc)}
