"""Render a study's ``audit.json`` into a self-contained HTML report, and that HTML into PDF (WeasyPrint).

:func:`build_context` turns the audit document into the plain rows a template shows (the summary, the model
card, the data composition, the headline figures); :mod:`privaudit.reports.figures` draws the figures from
the figure data that the audit keeps. Every value taken from data is autoescaped, so a group named
``<script>`` shows as text. Reports hold aggregates only: counts, rates and intervals, never a patient row.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, PackageLoader, StrictUndefined, TemplateNotFound, select_autoescape

from privaudit.audit.results import AuditReport
from privaudit.errors import ConfigError, DataError, MissingDependencyError

FORMATS = ("html", "pdf", "both")

# What a model card (``--model-card card.toml``) may hold, and each field's type.
MODEL_CARD_FIELDS: dict[str, type | tuple] = {
    "name": str, "version": str, "description": str, "owners": (str, list), "contact": str, "license": str,
    "intended_use": (str, list), "intended_users": (str, list), "out_of_scope": (str, list),
    "limitations": (str, list), "ethical_considerations": (str, list), "data": str, "references": (str, list),
}


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(est: dict | None, digits: int = 3) -> str:
    if not est or est.get("estimate") is None:
        return "n/a"
    s = _fmt(est["estimate"], digits)
    if est.get("ci_low") is not None and est.get("ci_high") is not None:
        s += f" ({_fmt(est['ci_low'], digits)} to {_fmt(est['ci_high'], digits)})"
    return s


def _pval(p) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _pct(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _sci(x) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def environment(template_dir: Path | None = None) -> Environment:
    loader = FileSystemLoader(str(template_dir)) if template_dir else PackageLoader("privaudit.reports", "templates")
    env = Environment(loader=loader, autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update({"fmt": _fmt, "ci": _ci, "pval": _pval, "pct": _pct, "sci": _sci})
    return env


def load_model_card(path: Path | None) -> dict | None:
    """Read an optional model card (TOML); unknown keys and wrong types are refused with the key named."""
    if path is None:
        return None
    from privaudit._console import one_line
    from privaudit.config import load_toml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--model-card {path}: file not found")
    card = load_toml(path, "model card")   # a folder, unreadable, not UTF-8, not TOML: one line naming the file
    for key, value in card.items():
        if key not in MODEL_CARD_FIELDS:
            raise ConfigError(f"{path}: unknown model-card key {one_line(key)!r}; known keys: "
                              f"{', '.join(MODEL_CARD_FIELDS)}")
        types = MODEL_CARD_FIELDS[key]
        if not isinstance(value, types) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
            want = "text or a list of texts" if isinstance(types, tuple) else "text"
            raise ConfigError(f"{path}: model-card key {key!r} must be {want}, got {type(value).__name__}")
    return {k: ([v] if isinstance(v, str) and isinstance(MODEL_CARD_FIELDS[k], tuple) else v) for k, v in card.items()}


def _largest_gap(model: dict) -> dict | None:
    """The largest absolute performance-parity gap (macro AUROC) over every attribute and group of a model."""
    best = None
    for attr, per_label in (model.get("fairness") or {}).items():
        if attr == "pearson_r":
            continue
        for group, est in ((per_label.get("macro") or {}).get("performance_parity") or {}).items():
            if est and est.get("estimate") is not None and (best is None or abs(est["estimate"]) > abs(best["estimate"])):
                best = {**est, "attribute": attr, "group": group}
    return best


def _attack_rows(model: dict) -> list[dict]:
    rows = []
    for name, a in ((model.get("privacy") or {}).get("attacks") or {}).items():
        rows.append({"attack": name, "a": a})
    return rows


def headline_rows(doc: dict) -> list[dict]:
    """One row per model: the figures the summary shows, each with its interval."""
    rows = []
    for name, m in doc["models"].items():
        priv = m.get("privacy") or {}
        acc = priv.get("accountant")
        attacks = priv.get("attacks") or {}
        tpr = None
        for attack_name, a in attacks.items():  # the strongest attack at 1% FPR
            v = (a or {}).get("tpr_at_fpr", {}).get("0.01")
            if v is not None and (tpr is None or v > tpr["value"]):
                tpr = {"value": v, "attack": attack_name, "n": (a or {}).get("n_nonmembers")}
        rows.append({
            "name": name, "dp": bool(m["run"].get("dp")), "backend": m["run"].get("backend"),
            "arch": m["run"].get("model"), "macro_auroc": m["utility"]["macro_auroc"],
            "epsilon": acc.get("epsilon") if acc else None, "delta": acc.get("delta") if acc else None,
            "accountant": acc.get("accountant") if acc else None, "largest_gap": _largest_gap(m),
            "empirical_epsilon": (priv.get("empirical_epsilon") or {}).get("estimate"),
            "empirical_confidence": (priv.get("empirical_epsilon") or {}).get("confidence"),
            "soundness_violated": bool((priv.get("soundness") or {}).get("violated")),
            "tpr_at_1pct": tpr,
        })
    return rows


def _composition_rows(study: dict) -> list[dict]:
    out = []
    for attr, c in ((study.get("data") or {}).get("composition") or {}).items():
        out.append({"attribute": attr, "groups": c["groups"], "n_unknown": c.get("n_unknown", 0),
                    "rule": c.get("rule", ""), "flagged": [g for g, v in c["groups"].items() if v.get("small")]})
    return out


def _finite_epsilons(doc: dict) -> list[float]:
    eps = []
    for m in doc["models"].values():
        acc = (m.get("privacy") or {}).get("accountant")
        if acc and acc.get("epsilon") is not None:
            eps.append(acc["epsilon"])
    return eps


def _provenance(study: dict) -> list[tuple[str, str]]:
    rows = [(k, v) for k, v in (study.get("versions") or {}).items()]
    data = study.get("data") or {}
    for key, label in (("manifest", "manifest"), ("manifest_sha256", "manifest sha256"), ("preset", "data preset"),
                       ("seed", "data seed (synthetic cohort)")):
        if data.get(key) is not None:
            rows.append((label, str(data[key])))
    rows.append(("bootstrap seed", str((study.get("bootstrap") or {}).get("seed"))))
    return rows


# The training settings the provenance table shows per model, in this order.
CONFIG_KEYS = ("backend", "arch", "width", "image_size", "epochs", "batch_size", "physical_batch_size", "lr",
               "seed", "init", "canaries", "clipping")


def _config_rows(study: dict) -> tuple[list[str], list[dict]]:
    """The training settings as (model names, one row per setting with a value per model): settings down,
    models across, so that the table fits a page whatever the number of settings."""
    configs = {name: c or {} for name, c in (study.get("configs") or {}).items()}
    if not configs:
        return [], []
    names = list(configs)
    rows = []
    for key in CONFIG_KEYS:
        if any(key in c for c in configs.values()):
            vals = [configs[n].get(key) for n in names]
            rows.append({"setting": key.replace("_", " "),
                         "values": [("none" if key == "init" else "task default") if v is None else v
                                    for v in vals]})
    dp_vals = []
    for n in names:
        dp = configs[n].get("dp") or {}
        dp_vals.append("off" if not dp.get("enabled", True) else
                       ", ".join(f"{k}={v}" for k, v in dp.items() if k != "enabled" and v is not None))
    rows.append({"setting": "DP", "values": dp_vals})
    return names, rows


def build_context(doc: dict, *, checks=None, policy_name: str | None = None, model_card: dict | None = None,
                  title: str | None = None) -> dict:
    """Everything the template shows, as plain data (no objects with behaviour)."""
    from privaudit.reports.figures import figures

    study = doc["study"]
    config_keys, config_rows = _config_rows(study)
    card = model_card if model_card is not None else study.get("model_card")
    eps = _finite_epsilons(doc)
    verdict = None
    if checks is not None:
        statuses = [c.status for c in checks]
        verdict = {"overall": "fail" if "fail" in statuses else "inconclusive" if "inconclusive" in statuses else "pass",
                   "policy": policy_name,
                   "checks": [{"model": c.model, "check": c.check, "threshold": c.threshold, "value": c.value,
                               "ci": c.ci, "status": c.status, "reason": c.reason} for c in checks]}
    return {
        "doc": doc, "study": study, "models": doc["models"], "comparisons": doc.get("comparisons") or {},
        "figures": figures(doc), "warnings": doc.get("warnings") or [], "headline": headline_rows(doc),
        "labels": study.get("labels") or [], "composition": _composition_rows(study),
        "several_epsilons": len(set(round(e, 6) for e in eps)) > 1, "verdict": verdict, "card": card,
        "provenance": _provenance(study), "config_keys": config_keys, "config_rows": config_rows,
        "trade_offs": study.get("trade_offs"), "aggregates": study.get("aggregates"),
        "attack_rows": {name: _attack_rows(m) for name, m in doc["models"].items()},
        "title": title or f"privaudit report: {study.get('task') or 'study'}",
    }


def render_html(report: AuditReport, *, template_dir: Path | None = None, title: str | None = None,
                checks=None, policy_name: str | None = None, model_card: dict | None = None) -> str:
    if template_dir is not None and not Path(template_dir).is_dir():
        raise DataError(f"--template {template_dir}: folder not found; give a folder holding report.html.j2")
    ctx = build_context(report.data, checks=checks, policy_name=policy_name, model_card=model_card, title=title)
    try:
        template = environment(template_dir).get_template("report.html.j2")
    except TemplateNotFound as e:
        raise DataError(f"--template {template_dir}: no {e.name} in that folder; copy privaudit's "
                        "report.html.j2 (and report.css) there as a starting point") from None
    return template.render(**ctx)


def html_to_pdf(html: str) -> bytes:
    """The PDF of the report's HTML (WeasyPrint; the print stylesheet adds page numbers and the contents)."""
    try:
        import weasyprint
    except (ImportError, OSError) as e:  # OSError: WeasyPrint is installed but the Pango libraries are not
        raise MissingDependencyError(
            f"PDF output needs WeasyPrint and the Pango libraries ({e}); install them with "
            "'pip install weasyprint' and 'apt-get install libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0'"
        ) from None
    import logging

    logging.getLogger("weasyprint").setLevel(logging.ERROR)  # font-matching chatter is not the user's business
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    return weasyprint.HTML(string=html, base_url=None).write_pdf()


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def write_report(audit_json: Path, out: Path | None = None, *, template_dir: Path | None = None,
                 fmt: str = "html", policy: Path | None = None, model_card: Path | None = None) -> list[Path]:
    """Render ``audit_json`` as HTML and/or PDF; return the files written.

    Without ``out`` the files go beside ``audit.json`` as ``report.html`` / ``report.pdf``. With ``out`` and
    ``fmt="both"``, ``out`` names the HTML file and the PDF takes the same stem. Everything is rendered in
    memory first, so a failure leaves no half-written report.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    audit_json = Path(audit_json)
    report = AuditReport.from_json(audit_json)
    checks = policy_name = None
    if policy is not None:
        from privaudit.reports.policy import Policy, evaluate

        checks = evaluate(report.data, Policy.load(Path(policy)))
        policy_name = Path(policy).name
    card = load_model_card(model_card)
    html = render_html(report, template_dir=template_dir, checks=checks, policy_name=policy_name, model_card=card)
    targets: dict[str, Path] = {}
    if out is not None:
        out = Path(out)
        if fmt == "both":
            targets = {"html": out.with_suffix(".html"), "pdf": out.with_suffix(".pdf")}
        else:
            targets = {fmt: out}
    else:
        for kind in (("html", "pdf") if fmt == "both" else (fmt,)):
            targets[kind] = audit_json.with_name(f"report.{kind}")
    for path in targets.values():
        if not path.parent.is_dir():
            raise ConfigError(f"--out {path}: folder {path.parent} does not exist")
    payloads = {"html": html.encode("utf-8")}
    if "pdf" in targets:
        payloads["pdf"] = html_to_pdf(html)
    for kind, path in targets.items():
        _write_atomic(path, payloads[kind])
    return list(targets.values())
