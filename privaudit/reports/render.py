"""Render a study's ``audit.json`` into a self-contained HTML report, and that HTML into PDF (WeasyPrint).

:func:`build_context` turns the audit document into the plain rows a template shows (the summary, the model
card, the data composition, the headline figures); :mod:`privaudit.reports.figures` draws the figures from
the figure data that the audit keeps. Every value taken from data is autoescaped, so a group named
``<script>`` shows as text. Reports hold aggregates only: counts, rates and intervals, never a patient row.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from privaudit._fs import atomic_write_bytes
from privaudit.audit.results import AuditReport
from privaudit.errors import ConfigError, DataError, MissingDependencyError, OutputExistsError
from privaudit.reports.format import format_ci, format_number, format_p_value, format_percent, format_sci

FORMATS = ("html", "pdf", "both")

# What a model card (``--model-card card.toml``) may hold, and each field's type.
MODEL_CARD_FIELDS: dict[str, type | tuple] = {
    "name": str, "version": str, "description": str, "owners": (str, list), "contact": str, "license": str,
    "intended_use": (str, list), "intended_users": (str, list), "out_of_scope": (str, list),
    "limitations": (str, list), "ethical_considerations": (str, list), "data": str, "references": (str, list),
}


class Suppressed(dict):
    """A suppressed group as a template sees it: every field of it reads "suppressed", and nothing else."""

    def __init__(self):
        super().__init__(suppressed=True)

    def __missing__(self, key):
        return Suppressed()

    def get(self, key, default=None):
        return self[key]

    def __bool__(self):
        return True

    def __str__(self):
        return "suppressed"

    def __html__(self):
        return "suppressed"


class _LazyFigures(Mapping):
    """The report's figures, each set drawn only when a template first reads it (a custom template may use
    none, and the packaged one does not read every set)."""

    def __init__(self, doc: dict):
        self._doc, self._figures = doc, {}

    def __getitem__(self, key):
        from privaudit.reports.figures import BUILDERS

        if key not in self._figures:
            self._figures[key] = BUILDERS[key](self._doc)
        return self._figures[key]

    def __iter__(self):
        from privaudit.reports.figures import BUILDERS

        return iter(BUILDERS)

    def __len__(self):
        from privaudit.reports.figures import BUILDERS

        return len(BUILDERS)


def _view(obj):
    """The document as the template reads it: each ``{"n": null, "suppressed": true}`` becomes a
    :class:`Suppressed`, and a count the audit hid (null in a composition row) reads "suppressed" too."""
    from privaudit.audit._cells import is_suppressed

    if is_suppressed(obj):
        return Suppressed()
    if isinstance(obj, dict):
        out = {k: _view(v) for k, v in obj.items()}
        for split in out.get("suppressed_splits") or ():
            out[f"n_{split}"] = Suppressed()
        return out
    if isinstance(obj, list):
        return [_view(v) for v in obj]
    return obj


def _suppressed_aware(fn):
    """A report filter: the public formatter (privaudit.reports.format), or "suppressed" for a hidden cell."""

    def filt(x, *args):
        return "suppressed" if isinstance(x, Suppressed) else fn(x, *args)

    filt.__name__ = fn.__name__
    return filt


_fmt, _ci, _pval, _pct, _sci = (_suppressed_aware(f) for f in (format_number, format_ci, format_p_value,
                                                                 format_percent, format_sci))


# The top-level template, and the one include per report section (``templates/sections/<name>.html.j2``), in
# the order the report shows them.
MAIN_TEMPLATE = "report.html.j2"
SECTIONS = ("summary", "model", "data", "privacy", "utility", "fairness", "empirical_privacy", "trade_offs",
            "warnings", "provenance", "appendix")


PACKAGE_TEMPLATES = Path(__file__).parent / "templates"


class _FolderLoader(FileSystemLoader):
    """Templates from one folder, and only from it: a file that is a link to somewhere else is refused."""

    def get_source(self, environment, template):
        source, filename, uptodate = super().get_source(environment, template)
        root = os.path.realpath(self.searchpath[0])
        real = os.path.realpath(filename)
        if os.path.commonpath([root, real]) != root:
            raise DataError(f"--template {self.searchpath[0]}: {template} is a link to {real}, outside the "
                            "template folder; a template may use the folder's own files only")
        return source, filename, uptodate


def environment(template_dir: Path | None = None) -> SandboxedEnvironment:
    """A sandboxed, autoescaping Jinja environment: a template (perhaps one somebody sent) may format the data
    it is given, but cannot reach Python's internals, run commands, or read files outside its folder. With
    ``template_dir``, a name (``report.html.j2``, ``report.css``, ``sections/privacy.html.j2``) is looked up in
    that folder first and among privaudit's templates second, so a custom page can include the packaged
    sections and a custom section can replace one of them."""
    packaged = _FolderLoader(str(PACKAGE_TEMPLATES))
    loader = ChoiceLoader([_FolderLoader(str(template_dir)), packaged]) if template_dir else packaged
    env = SandboxedEnvironment(loader=loader, autoescape=select_autoescape(default=True, default_for_string=True),
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


def heatmap_table(doc: dict, attribute: str) -> dict:
    """The print view of an attribute's fairness heatmap: the same cells (figures.heatmap_cells), one row per
    model, metric and group, one column per label (macro last), led by each group's subgroup AUROC and size,
    so that the print view holds every value of the appendix's per-label tables."""
    from privaudit.reports.figures import HEATMAP_METRICS, heatmap_cells

    titles = dict(HEATMAP_METRICS)
    cells = heatmap_cells(doc, attribute)
    labels = list(dict.fromkeys(c["label"] for c in cells))
    rows: dict = {}
    for name, m in doc["models"].items():  # the subgroup AUROC rows, from the same per-label blocks
        per_label = ((m.get("fairness") or {}).get(attribute)) or {}
        for lab in labels:
            for g, v in ((per_label.get(lab) or {}).get("groups") or {}).items():
                row = rows.setdefault((name, "auroc", g), {"model": name, "metric": "subgroup AUROC", "group": g,
                                                           "versus": None, "n": None, "cells": {}})
                sup = bool(v.get("suppressed"))
                if lab == "macro":
                    row["n"] = None if sup else v.get("n")
                a = {} if sup else (v.get("auroc") or {})
                row["cells"][lab] = {"suppressed": sup, "estimate": a.get("estimate"), "ci_low": a.get("ci_low"),
                                     "ci_high": a.get("ci_high")}
    for c in cells:
        key = (c["model"], c["metric"], c["group"])
        row = rows.setdefault(key, {"model": c["model"], "metric": titles[c["metric"]], "group": c["group"],
                                    "versus": c["versus"], "n": None, "cells": {}})
        row["cells"][c["label"]] = c
    return {"labels": labels, "rows": list(rows.values())}


def verdict_rows(doc: dict) -> list[dict]:
    """Per comparison and attribute, the two verdicts side by side: does DP amplify unfairness (the fairness
    verdict) and does it narrow or widen the gap in attack success (the privacy-gap verdict)."""
    out = []
    for cname, c in (doc.get("comparisons") or {}).items():
        fair, priv = c.get("fairness_verdict") or {}, c.get("privacy_gap_verdict") or {}
        for attr in dict.fromkeys([*fair, *priv]):
            out.append({"comparison": cname, "attribute": attr, "fairness": fair.get(attr), "privacy": priv.get(attr)})
    return out


def _composition_rows(study: dict) -> list[dict]:
    """Per attribute: its groups (suppressed ones and hidden split counts read "suppressed"), the unknown
    count, the suppression rule and the groups it touched ("small")."""
    out = []
    for attr, c in ((study.get("data") or {}).get("composition") or {}).items():
        groups = {}
        for g, v in _view(c["groups"]).items():
            if not isinstance(v, Suppressed):
                v = {**v, "small": bool(v.get("small") or v.get("suppressed_splits"))}
            groups[g] = v
        n_unknown = c.get("n_unknown", 0)
        out.append({"attribute": attr, "groups": groups, "n_unknown": Suppressed() if n_unknown is None else n_unknown,
                    "rule": c.get("rule", ""), "flagged": [g for g, v in groups.items() if v.get("small")]})
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
            unset = {"init": "none", "physical_batch_size": "automatic"}.get(key, "task default")
            rows.append({"setting": key.replace("_", " "), "values": [unset if v is None else v for v in vals]})
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
    from privaudit.audit._cells import MIN_CELL
    from privaudit.audit.results import suppress_v1

    doc = suppress_v1(doc, MIN_CELL)  # a version 2 document is suppressed already, by patients
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
    view = _view(doc)
    return {
        "doc": view, "study": view["study"], "models": view["models"], "comparisons": view.get("comparisons") or {},
        "figures": _LazyFigures(doc), "warnings": doc.get("warnings") or [], "headline": headline_rows(doc),
        "labels": study.get("labels") or [], "composition": _composition_rows(study),
        "several_epsilons": len(set(round(e, 6) for e in eps)) > 1, "verdict": verdict, "card": card,
        "provenance": _provenance(study), "config_keys": config_keys, "config_rows": config_rows,
        "trade_offs": view["study"].get("trade_offs"), "aggregates": view["study"].get("aggregates"),
        "attack_rows": {name: _attack_rows(m) for name, m in view["models"].items()},
        "heatmap_tables": {a: heatmap_table(doc, a) for a in study.get("attributes") or []},
        "verdict_rows": verdict_rows(doc),
        "title": title or f"privaudit report: {study.get('task') or 'study'}",
    }


def render_html(report: AuditReport, *, template_dir: Path | None = None, title: str | None = None,
                checks=None, policy_name: str | None = None, model_card: dict | None = None) -> str:
    if template_dir is not None:
        if not Path(template_dir).is_dir():
            raise DataError(f"--template {template_dir}: folder not found; give a folder holding {MAIN_TEMPLATE}")
        if not (Path(template_dir) / MAIN_TEMPLATE).is_file():
            raise DataError(f"--template {template_dir}: no {MAIN_TEMPLATE} in that folder; copy privaudit's "
                            f"{MAIN_TEMPLATE} there as a starting point (it may include privaudit's sections/*.html.j2)")
    ctx = build_context(report.data, checks=checks, policy_name=policy_name, model_card=model_card, title=title)
    try:
        return environment(template_dir).get_template(MAIN_TEMPLATE).render(**ctx)
    except TemplateNotFound as e:  # an include that neither the folder nor privaudit's templates hold
        if template_dir is None:
            raise
        raise DataError(f"--template {template_dir}: no {e.name} in that folder or among privaudit's templates; "
                        f"the packaged sections are {', '.join(f'sections/{s}.html.j2' for s in SECTIONS)}") from None
    except TemplateError as e:  # SecurityError (the sandbox refused), a syntax error, an undefined name
        if template_dir is None:
            raise
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise DataError(f"--template {template_dir}: {type(e).__name__}{line}: {str(e).splitlines()[0]}") from None


def _fetcher(weasyprint, folder: Path):
    """WeasyPrint's URL fetcher, restricted to ``data:`` URLs and the files inside ``folder`` (the template's
    folder, links resolved): a template cannot embed ``file:///etc/passwd`` or fetch from the network.
    Refused URLs are kept in ``refused``."""
    from urllib.parse import unquote, urlsplit

    root = os.path.realpath(folder)

    class Fetcher(weasyprint.URLFetcher):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.refused: list[str] = []

        def fetch(self, url, headers=None):
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            if scheme == "file" and parts.netloc in ("", "localhost"):
                real = os.path.realpath(unquote(parts.path))
                if os.path.commonpath([root, real]) == root and os.path.isfile(real):
                    return super().fetch(url, headers)
            elif scheme == "data":
                return super().fetch(url, headers)
            self.refused.append(url)
            raise ValueError(f"privaudit refuses {url}: a report may embed data: URLs and its template folder's files only")

    return Fetcher(allowed_protocols=("data", "file"), allow_redirects=False)


def html_to_pdf(html: str, *, template_dir: Path | None = None) -> bytes:
    """The PDF of the report's HTML (WeasyPrint; the print stylesheet adds page numbers and the contents).

    Resources load from ``data:`` URLs and the template folder only (relative URLs start there); the PDF is
    refused, with one line naming the URL, when the HTML asks for anything else."""
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
    folder = Path(template_dir or PACKAGE_TEMPLATES).absolute()
    fetcher = _fetcher(weasyprint, folder)
    pdf = weasyprint.HTML(string=html, base_url=str(folder) + os.sep, url_fetcher=fetcher).write_pdf()
    if fetcher.refused:
        raise DataError(f"the report refers to {fetcher.refused[0]}, which privaudit does not embed: a PDF may use "
                        f"data: URLs and the files of its template folder ({folder}) only")
    return pdf


def _check_target(path: Path, audit_json: Path, *, beside: bool, force: bool) -> None:
    """An output file may replace: report.html / report.pdf beside its own audit.json; with ``force``, any other
    regular file (never the audit.json it is rendered from). Everything else that exists is refused."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        raise ConfigError(f"--out {path} is a folder; give a file name")
    if os.path.realpath(path) == os.path.realpath(audit_json):
        raise ConfigError(f"--out {path} is the audit.json the report is rendered from; give another file name")
    own = path.parent.absolute() == audit_json.parent.absolute() and path.name in ("report.html", "report.pdf")
    if not (beside or own or force):
        raise OutputExistsError(f"--out {path} already exists; choose a new file name or pass --force to replace it")


def write_report(audit_json: Path, out: Path | None = None, *, template_dir: Path | None = None,
                 fmt: str = "html", policy: Path | None = None, model_card: Path | None = None,
                 force: bool = False) -> list[Path]:
    """Render ``audit_json`` as HTML and/or PDF; return the files written.

    Without ``out`` the files go beside ``audit.json`` as ``report.html`` / ``report.pdf``, replacing earlier
    ones. With ``out`` and ``fmt="both"``, ``out`` names the HTML file and the PDF takes the same stem; a file
    that exists there is replaced only with ``force`` (or when it is the report.html / report.pdf beside this
    audit.json), and keeps its mode. Everything is rendered in memory first, so a failure leaves no
    half-written report.
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
        _check_target(path, audit_json, beside=out is None, force=force)
    html = render_html(report, template_dir=template_dir, checks=checks, policy_name=policy_name, model_card=card)
    payloads = {"html": html.encode("utf-8")}
    if "pdf" in targets:
        payloads["pdf"] = html_to_pdf(html, template_dir=template_dir)
    for kind, path in targets.items():
        atomic_write_bytes(path, payloads[kind], mode=None)  # mkstemp + replace; an existing file keeps its mode
    return list(targets.values())
