"""Render a study's ``audit.json`` into a self-contained HTML report.

Templates receive plain data (the audit document plus a few derived rows); every value taken from data is
autoescaped, so a group named ``<script>`` shows as text.
"""

from __future__ import annotations

import os
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, PackageLoader, StrictUndefined, select_autoescape

from privaudit.audit.results import AuditReport
from privaudit.errors import DataError


def _fmt(x, digits: int = 3) -> str:
    if x is None:
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


def environment(template_dir: Path | None = None) -> Environment:
    loader = FileSystemLoader(str(template_dir)) if template_dir else PackageLoader("privaudit.reports", "templates")
    env = Environment(loader=loader, autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update({"fmt": _fmt, "ci": _ci, "pval": _pval})
    return env


def render_html(report: AuditReport, *, template_dir: Path | None = None, title: str | None = None) -> str:
    if template_dir is not None and not Path(template_dir).is_dir():
        raise DataError(f"--template {template_dir}: folder not found; give a folder holding report.html.j2")
    doc = report.data
    study = doc["study"]
    headline = []
    for name, m in doc["models"].items():
        acc = (m.get("privacy") or {}).get("accountant")
        headline.append({
            "name": name, "dp": bool(m["run"].get("dp")), "backend": m["run"].get("backend"),
            "arch": m["run"].get("model"), "macro_auroc": m["utility"]["macro_auroc"],
            "epsilon": acc.get("epsilon") if acc else None, "delta": acc.get("delta") if acc else None,
            "accountant": acc.get("accountant") if acc else None,
        })
    from privaudit.reports.figures import figures

    ctx = {"doc": doc, "study": study, "models": doc["models"], "comparisons": doc.get("comparisons") or {},
           "figures": figures(doc),
           "warnings": doc.get("warnings") or [], "headline": headline, "labels": study.get("labels") or [],
           "title": title or f"privaudit report: {study.get('task') or 'study'}"}
    return environment(template_dir).get_template("report.html.j2").render(**ctx)


def write_report(audit_json: Path, out: Path | None = None, *, template_dir: Path | None = None) -> Path:
    """Render ``audit_json`` to ``out`` (default: report.html beside it), written atomically."""
    audit_json = Path(audit_json)
    report = AuditReport.from_json(audit_json)
    html = render_html(report, template_dir=template_dir)
    out = Path(out) if out else audit_json.with_name("report.html")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    return out
