"""Figures for the report, drawn with matplotlib from the figure data that the audit keeps in ``audit.json``
(never recomputed from patient rows), and returned as inline SVG strings.

Figure code stays here; templates receive the finished SVG as plain data.

Names come from data (a group called ``$\\foo$`` or ``_x``), so every figure is drawn with matplotlib's
mathtext and TeX off (:data:`TEXT_RC`), and every name goes through :func:`mpl_text`: text shows as typed
and can never crash the parser and lose the whole audit.
"""

from __future__ import annotations

import functools
import io

import numpy as np

from privaudit._console import one_line

COLOURS = ("#0b6e99", "#c2410c", "#15803d", "#7c3aed", "#b91c1c", "#4b5563")
# matplotlib settings under which every figure is drawn: no mathtext ($...$), no TeX, text kept as text
TEXT_RC = {"text.parse_math": False, "text.usetex": False, "svg.fonttype": "none"}


def mpl_text(s) -> str:
    """A name from data as matplotlib text: on one line, and with a leading underscore kept visible (a legend
    leaves out labels that start with ``_``). ``$``, ``^``, ``_`` and ``\\`` need no escape: the figures are
    drawn with mathtext off."""
    text = one_line(s)
    return "\u200b" + text if text.startswith("_") else text


def _plain_text(fn):
    """Draw the figure under :data:`TEXT_RC`, whatever the user's matplotlibrc says."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(TEXT_RC):
            return fn(*args, **kwargs)

    return wrapper


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG is inlined in HTML


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update(TEXT_RC)  # text as text (smaller, searchable, printable), never parsed as math
    plt.rcParams["svg.hashsalt"] = "privaudit"  # stable ids: the same audit.json draws the same SVG
    return plt.subplots(nrows, ncols, figsize=(width, height), **kwargs)


@_plain_text
def roc_figure(doc: dict, label: str) -> str | None:
    """ROC curves of every model for one label, each with its pointwise 95% bootstrap band."""
    curves = [(name, (m.get("curves") or {}).get(label, {}).get("roc")) for name, m in doc["models"].items()]
    curves = [(n, c) for n, c in curves if c]
    if not curves:
        return None
    fig, ax = _figure(3.6, 3.4)
    for k, (name, c) in enumerate(curves):
        colour = COLOURS[k % len(COLOURS)]
        auc = doc["models"][name]["utility"]["labels"].get(label, {}).get("auroc", {}).get("estimate")
        ax.plot(c["fpr"], c["tpr"], color=colour, lw=1.6, label=f"{mpl_text(name)} (AUROC {_num(auc)})")
        if c.get("tpr_low") is not None:
            ax.fill_between(c["fpr"], c["tpr_low"], c["tpr_high"], color=colour, alpha=0.15, lw=0)
    ax.plot([0, 1], [0, 1], color="#9ca3af", lw=0.8, ls="--")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=mpl_text(label), xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    return _svg(fig)


@_plain_text
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
        xerr = [[max(0.0, est - lo)], [max(0.0, hi - est)]] if lo is not None and hi is not None else None
        ax.errorbar(est, y, xerr=xerr, fmt="o", ms=4, color=colour, capsize=2, lw=1.2,
                    label=None if name in seen else mpl_text(name))
        seen.add(name)
    ax.set_yticks(range(len(groups)), [f"{mpl_text(g)} (n={next(r[6] for r in rows if r[0] == g)})" for g in groups])
    ax.invert_yaxis()
    ax.set(xlabel=f"AUROC ({mpl_text(label)})", title=mpl_text(attribute))
    ax.grid(axis="x", color="#e5e7eb", lw=0.6)
    ax.legend(fontsize=7, frameon=False, loc="best")
    return _svg(fig)


@_plain_text
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
                label=f"{mpl_text(name)} (AUC {_num(a.get('auc'))})")
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, color="#9ca3af", lw=0.8, ls="--", label="chance")
    ax.set(xscale="log", yscale="log", xlabel="False positive rate", ylabel="True positive rate",
           title=f"{mpl_text(attack)} attack", xlim=(floor, 1), ylim=(floor, 1.05))
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    return _svg(fig)


SPLIT_COLOURS = {"train": "#0b6e99", "val": "#9ca3af", "test": "#c2410c"}


@_plain_text
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
    ax.set_yticks(range(len(groups)), [mpl_text(f"{g} *" if comp["groups"][g].get("small") or
                                                comp["groups"][g].get("suppressed_splits") else g) for g in groups])
    ax.invert_yaxis()
    ax.set(xlabel="images", title=mpl_text(attribute))
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


@_plain_text
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
    ax.errorbar(x, est, yerr=[np.maximum(est - lo, 0), np.maximum(hi - est, 0)], fmt="o", color=COLOURS[0], ms=4,
                capsize=2, lw=1,
                label="DP models (95% CI)")
    agg = doc["study"].get("aggregates") or {}
    means = sorted((v["epsilon"]["mean"], v["macro_auroc"]["mean"]) for v in agg.values()
                   if isinstance(v, dict) and (v.get("epsilon") or {}).get("mean") is not None
                   and (v.get("macro_auroc") or {}).get("mean") is not None)
    if means:
        ax.plot(*zip(*means), color=COLOURS[0], lw=1, alpha=0.7, label="mean over seeds")
    for k, (name, _, m) in enumerate((n, e, m) for n, e, m in pts if e is None):
        ax.axhline(m["utility"]["macro_auroc"]["estimate"], color=COLOURS[(k + 1) % len(COLOURS)], lw=1, ls="--",
                   label=f"{mpl_text(name)} (no finite epsilon)")
    _epsilon_axis(ax, x)
    ax.set(xlabel="epsilon (accountant)", ylabel="macro AUROC", title="privacy-utility")
    ax.grid(color="#e5e7eb", lw=0.6)
    ax.legend(fontsize=6, frameon=False, loc="lower right")
    return _svg(fig)


@_plain_text
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
            lo.append(max(0.0, est["estimate"] - (est.get("ci_low") if est.get("ci_low") is not None
                                                   else est["estimate"])))
            hi.append(max(0.0, (est.get("ci_high") if est.get("ci_high") is not None else est["estimate"])
                          - est["estimate"]))
        if xs:
            jitter = np.exp(0.02 * (k - len(groups) / 2))  # small multiplicative offset so bars do not overlap
            ax.errorbar(np.array(xs) * jitter, ys, yerr=[lo, hi], fmt="o-", color=colour, ms=3, capsize=2, lw=1,
                        label=mpl_text(g))
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
           title=f"privacy-fairness: {mpl_text(attribute)}")
    ax.grid(color="#e5e7eb", lw=0.6)
    ax.legend(fontsize=6, frameon=False, loc="best")
    return _svg(fig)


# ---- fairness heatmaps ---------------------------------------------------------------------------------------
# One figure per attribute: a panel per metric (columns) and model (rows), each a grid of groups x labels
# (+ macro). Every cell carries its value and interval in an SVG <title> (a tooltip on hover); the print view
# shows the same cells as a compact table (render.heatmap_table), from the same heatmap_cells.

HEATMAP_METRICS = (("performance_parity", "performance parity"),
                   ("statistical_parity_difference", "stat. parity diff."),
                   ("disparate_impact", "disparate impact"),
                   ("equal_opportunity_difference", "equal opp. diff."),
                   ("average_odds_difference", "avg. odds diff."))


def _fmt_cell(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def heatmap_cells(doc: dict, attribute: str) -> list[dict]:
    """The cells of an attribute's fairness heatmap, from audit.json as it stands: one per model, metric, group
    and label (``macro`` last), with ``versus`` (None for performance parity, which compares a group with the
    size-weighted others; else the privileged side, a group or ``"rest"``), ``estimate``, ``ci_low``,
    ``ci_high`` (None when undefined) and ``suppressed``. A two-group selection metric has one cell, in the
    unprivileged group's row; a suppressed one marks every group's row."""
    labels = list(doc["study"].get("labels") or []) + ["macro"]
    cells = []
    for name, m in doc["models"].items():
        per_label = ((m.get("fairness") or {}).get(attribute)) or {}
        for metric, _ in HEATMAP_METRICS:
            for lab in labels:
                block = per_label.get(lab) or {}
                entry = block.get(metric)
                if not entry:
                    continue
                groups = list(block.get("performance_parity") or {})
                if metric == "performance_parity":
                    rows = {g: (None, v) for g, v in entry.items()}
                elif "estimate" in entry:  # two groups: unprivileged minus (or over) privileged
                    unpriv = [g for g in groups if g != entry.get("privileged")]
                    rows = {unpriv[0] if unpriv else "unprivileged": (entry.get("privileged"), entry)}
                elif entry.get("suppressed") is True:
                    rows = {g: (None, entry) for g in groups}
                else:
                    rows = {g: (v.get("privileged", "rest"), v) for g, v in entry.items()}
                for g, (versus, v) in rows.items():
                    sup = bool(v.get("suppressed"))
                    cells.append({"model": name, "metric": metric, "label": lab, "group": g, "versus": versus,
                                  "suppressed": sup, "estimate": None if sup else v.get("estimate"),
                                  "ci_low": None if sup else v.get("ci_low"),
                                  "ci_high": None if sup else v.get("ci_high")})
    return cells


def cell_title(cell: dict) -> str:
    """The tooltip of one heatmap cell (also what the tests parse): ``model | metric | label | group[ vs other]:
    estimate (95% CI low to high)``."""
    row = cell["group"] if not cell["versus"] else f"{cell['group']} vs {cell['versus']}"
    what = f"{cell['model']} | {cell['metric']} | {cell['label']} | {row}"
    if cell["suppressed"]:
        return f"{what}: suppressed (small group)"
    if cell["estimate"] is None:
        return f"{what}: n/a"
    return f"{what}: {_fmt_cell(cell['estimate'])} (95% CI {_fmt_cell(cell['ci_low'])} to {_fmt_cell(cell['ci_high'])})"


def _add_titles(svg: str, titles: dict[str, str]) -> str:
    """Put ``<title>`` (escaped) first inside each ``<g id="...">`` that matplotlib wrote for a cell's gid."""
    from html import escape

    for gid, text in titles.items():
        tag = f'<g id="{gid}">'
        svg = svg.replace(tag, f"{tag}<title>{escape(text)}</title>", 1)
    return svg


@_plain_text
def fairness_heatmap(doc: dict, attribute: str) -> str | None:
    """One attribute's fairness at a glance: for each model (rows of panels) and metric (columns), a heatmap of
    labels (rows, macro last) by groups (columns), coloured by the estimate (diverging around no difference: 0,
    or 1 for disparate impact, on a log scale; one scale per metric, shared by the models), hatched where
    suppressed, grey for the reference group of a two-group comparison, with the value and 95% CI of each cell
    on hover."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    cells = heatmap_cells(doc, attribute)
    if not cells:
        return None
    models = list(dict.fromkeys(c["model"] for c in cells))
    metrics = [(k, t) for k, t in HEATMAP_METRICS if any(c["metric"] == k for c in cells)]
    labels = list(dict.fromkeys(c["label"] for c in cells))
    groups = list(dict.fromkeys(c["group"] for c in cells))
    height = len(models) * (0.15 * len(labels) + 0.2) + 0.9
    fig, axes = _figure(1.3 * len(metrics) + 1.3, height, len(models), len(metrics), squeeze=False)
    cmap = plt.get_cmap("RdBu_r")
    titles = {}
    uid = "".join(ch if ch.isalnum() else "_" for ch in attribute)[:20]
    for j, (metric, title) in enumerate(metrics):
        mine = [c for c in cells if c["metric"] == metric]

        def value(c, metric=metric):
            if c["estimate"] is None:
                return None
            if metric == "disparate_impact":
                return float(np.log2(c["estimate"])) if c["estimate"] > 0 else None
            return c["estimate"]

        vals = [abs(v) for c in mine if (v := value(c)) is not None and np.isfinite(v)]
        top = max(vals + [0.05])
        norm = Normalize(vmin=-top, vmax=top)  # symmetric: white is no difference
        versus = {c["versus"] for c in mine} - {None}
        for i, name in enumerate(models):
            ax = axes[i][j]
            for c in (c for c in mine if c["model"] == name):
                v = value(c)
                gid = f"heatmap-{uid}-{len(titles)}"
                face = "#d1d5db" if v is None or not np.isfinite(v) else cmap(norm(v))
                rect = Rectangle((groups.index(c["group"]) - 0.5, labels.index(c["label"]) - 0.5), 1, 1,
                                 facecolor=face, edgecolor="white", lw=0.6, hatch="////" if c["suppressed"] else None)
                rect.set_gid(gid)
                ax.add_patch(rect)
                titles[gid] = cell_title(c)
            for g in groups:  # the privileged side of a two-group comparison has no cell of its own
                if versus and g in versus and not any(c["group"] == g and c["model"] == name for c in mine):
                    ax.add_patch(Rectangle((groups.index(g) - 0.5, -0.5), 1, len(labels), facecolor="#f3f4f6",
                                           edgecolor="white", lw=0.6))
                    ax.text(groups.index(g), (len(labels) - 1) / 2, "reference", rotation=90, ha="center",
                            va="center", fontsize=5, color="#6b7280")
            ax.set_xlim(-0.5, len(groups) - 0.5)
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.set_yticks(range(len(labels)), labels if j == 0 else [""] * len(labels), fontsize=5.5)
            tilt = len(groups) * max(len(str(g)) for g in groups) > 16  # would the names touch?
            ax.set_xticks(range(len(groups)), groups if i == len(models) - 1 else [""] * len(groups),
                          rotation=40 if tilt else 0, ha="right" if tilt else "center", fontsize=5.5)
            ax.tick_params(length=0, pad=1)
            for side in ax.spines.values():
                side.set_visible(False)
            if j == 0:
                ax.set_ylabel(name, fontsize=6.5)
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        bar = fig.colorbar(sm, ax=[axes[i][j] for i in range(len(models))], location="top", fraction=0.05,
                           pad=0.02, aspect=14)
        bar.solids.set_rasterized(False)  # vector, not an embedded bitmap: the page stays text and paths
        bar.ax.tick_params(labelsize=5, length=2, pad=1)
        edge = float(f"{0.7 * top:.1g}")  # a round value inside the scale, so the end labels stay apart
        ticks = [-edge, 0.0, edge]
        bar.set_ticks(ticks, labels=[f"{2 ** t:.2g}" for t in ticks] if metric == "disparate_impact"
                      else [f"{t:+.2g}" if t else "0" for t in ticks])
        note = "\n(AUROC vs the others)" if metric == "performance_parity" else f"\n(vs {', '.join(sorted(versus))})"
        bar.set_label(f"{title}{note}", fontsize=6, labelpad=2)
    fig.suptitle(f"{attribute}: fairness by label and group (hover a cell for its 95% CI)", fontsize=7.5,
                 y=1 + 0.15 / height)
    return _add_titles(_svg(fig), titles)


def _attack_for_risk(doc: dict) -> str | None:
    """The attack the per-group risk figure shows: the loss attack when any model has it, else the first."""
    names = [a for m in doc["models"].values() for a, v in (((m.get("privacy") or {}).get("attacks")) or {}).items()
             if v and v.get("by_group")]
    return "loss" if "loss" in names else (names[0] if names else None)


@_plain_text
def exposure_figure(doc: dict, attribute: str, attack: str | None = None) -> str | None:
    """Who is exposed, beside who is served: per group (rows) and model (colours), three forest panels with
    95% intervals: the subgroup AUROC (macro; the fairness view), the attack's AUC (bootstrap) and its TPR at the
    group's own 1% FPR (Clopper-Pearson). Suppressed groups are not drawn."""
    attack = attack or _attack_for_risk(doc)

    def fair(m, g):
        v = ((((m.get("fairness") or {}).get(attribute) or {}).get("macro") or {}).get("groups") or {}).get(g) or {}
        return v.get("auroc")

    def risk(m, g, key):
        a = ((m.get("privacy") or {}).get("attacks") or {}).get(attack) or {}
        v = ((a.get("by_group") or {}).get(attribute) or {}).get(g) or {}
        if key == "auc":
            return v.get("auc_ci")
        return ((v.get("tpr_at_own_fpr") or {}).get("0.01"))

    groups = []
    for m in doc["models"].values():
        for g in list((((m.get("fairness") or {}).get(attribute) or {}).get("macro") or {}).get("groups") or {}) + \
                 list(((((m.get("privacy") or {}).get("attacks") or {}).get(attack) or {}).get("by_group") or {})
                      .get(attribute) or {}):
            if g not in groups:
                groups.append(g)
    panels = [("subgroup AUROC (macro)", lambda m, g: fair(m, g), None),
              (f"{attack} attack AUC", lambda m, g: risk(m, g, "auc"), 0.5),
              (f"{attack} attack TPR at the group's own 1% FPR", lambda m, g: risk(m, g, "tpr"), 0.01)]
    drawn = [[(name, g, p[1](m, g)) for name, m in doc["models"].items() for g in groups] for p in panels]
    drawn = [[(n, g, e) for n, g, e in d if e and e.get("estimate") is not None] for d in drawn]
    if attack is None or not groups or not any(drawn[1:]):
        return None
    import matplotlib.pyplot as plt

    height = 0.22 * len(groups) * max(1, len(doc["models"])) ** 0.5 + 0.9
    fig, axes = _figure(7.2, height, 1, 3, sharey=True)
    names = list(doc["models"])
    offsets = np.linspace(-0.18, 0.18, len(names)) if len(names) > 1 else [0.0]
    for ax, (title, _, chance), rows in zip(axes, panels, drawn):
        for name, g, e in rows:
            k = names.index(name)
            y = groups.index(g) + offsets[k]
            lo = e.get("ci_low") if e.get("ci_low") is not None else e["estimate"]
            hi = e.get("ci_high") if e.get("ci_high") is not None else e["estimate"]
            ax.errorbar(e["estimate"], y, xerr=[[e["estimate"] - lo], [hi - e["estimate"]]], fmt="o", ms=3.5,
                        color=COLOURS[k % len(COLOURS)], capsize=2, lw=1.1)
        if chance is not None:
            ax.axvline(chance, color="#9ca3af", lw=0.8, ls="--")
        ax.set_title(title, fontsize=7)
        ax.grid(axis="x", color="#e5e7eb", lw=0.6)
        ax.tick_params(labelsize=6)
    axes[0].set_yticks(range(len(groups)), groups, fontsize=7)
    axes[0].set_ylim(len(groups) - 0.5, -0.5)
    handles = [plt.Line2D([], [], color=COLOURS[k % len(COLOURS)], marker="o", ls="", ms=4) for k in range(len(names))]
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=6, frameon=False)
    fig.suptitle(f"{attribute}: who is served and who is exposed", fontsize=8, y=1 + 0.25 / height)
    fig.subplots_adjust(bottom=0.3 if len(groups) < 4 else 0.2, wspace=0.08)
    return _svg(fig)


def _attrs(doc):
    return doc["study"].get("attributes") or []


# Each figure set of the report, by the key a template reads it under: drawn only when read.
BUILDERS = {
    "roc": lambda doc: {lab: svg for lab in (doc["study"].get("labels") or []) if (svg := roc_figure(doc, lab))},
    "forest": lambda doc: {a: svg for a in _attrs(doc) if (svg := forest_figure(doc, a))},
    "heatmap": lambda doc: {a: svg for a in _attrs(doc) if (svg := fairness_heatmap(doc, a))},
    "exposure": lambda doc: {a: svg for a in _attrs(doc) if "*" not in a and (svg := exposure_figure(doc, a))},
    "composition": lambda doc: {a: svg for a in ((doc["study"].get("data") or {}).get("composition") or {})
                                if (svg := composition_figure(doc, a))},
    "attack": lambda doc: {a: svg for a in dict.fromkeys(a for m in doc["models"].values()
                                                           for a in ((m.get("privacy") or {}).get("attacks") or {}))
                           if (svg := attack_roc_figure(doc, a))},
    "tradeoff_utility": tradeoff_utility_figure,
    "tradeoff_fairness": lambda doc: {a: svg for a in _attrs(doc) if (svg := tradeoff_fairness_figure(doc, a))},
}


@_plain_text
def figures(doc: dict) -> dict:
    """All report figures: ``roc``, ``forest``, ``heatmap``, ``exposure``, ``composition`` and
    ``tradeoff_fairness`` (dicts of SVG by label or attribute), ``attack`` (dict by attack name) and
    ``tradeoff_utility`` (SVG or None)."""
    return {key: build(doc) for key, build in BUILDERS.items()}
