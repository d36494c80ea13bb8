"""Audit results: the versioned ``audit.json`` document, its JSON Schema, and a tidy-frame view."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from privaudit._fs import to_jsonable, write_json
from privaudit.errors import DataError

# 2: small groups are suppressed ({"n": null, "suppressed": true}) wherever groups appear, counted in patients
# (study.min_cell); composition split counts may be null; the composition's "small" flag is gone.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


def load_schema() -> dict:
    return json.loads(resources.files("privaudit.audit").joinpath("audit.schema.json").read_text())


@dataclass(frozen=True)
class AuditReport:
    """One study's audit: ``data`` follows the ``audit.json`` contract (ARCHITECTURE.md) exactly."""

    data: dict = field(repr=False)

    @property
    def models(self) -> dict:
        return self.data["models"]

    @property
    def warnings(self) -> list[str]:
        return self.data["warnings"]

    def to_json(self, path: Path | None = None) -> str:
        """The document as strict JSON; with ``path``, validated against the shipped schema and written."""
        doc = to_jsonable(self.data)
        if path is not None:
            import jsonschema

            jsonschema.validate(doc, load_schema())  # never write an audit.json that breaks the contract
            write_json(Path(path), doc)
        return json.dumps(doc, indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, source) -> "AuditReport":
        """Read an ``audit.json`` path (or a JSON string); refuse a newer schema than this version knows."""
        text = source
        name = "audit.json text"
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            name = str(source)
            try:
                text = Path(source).read_text(encoding="utf-8")
            except OSError as e:
                raise DataError(f"{source}: cannot read ({e.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: not valid JSON ({e.msg} at line {e.lineno}); is the file truncated?") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if not isinstance(version, int):
            raise DataError(f"{name}: no integer 'schema_version'; this is not an audit.json")
        if version > SCHEMA_VERSION:
            raise DataError(f"{name}: schema_version {version} is newer than this privaudit understands "
                            f"({SCHEMA_VERSION}); upgrade privaudit")
        if version not in READABLE_VERSIONS:
            raise DataError(f"{name}: schema_version {version} is not one privaudit writes "
                            f"({', '.join(map(str, READABLE_VERSIONS))}); this is not an audit.json")
        return cls(data)

    def validate(self) -> None:
        """Validate against the shipped JSON Schema (raises ``jsonschema.ValidationError``)."""
        import jsonschema

        jsonschema.validate(to_jsonable(self.data), load_schema())

    def to_frame(self) -> pd.DataFrame:
        """One tidy row per model x metric x label x group: estimate and CI (nested metrics get dotted names,
        e.g. ``youden.sensitivity``)."""
        rows = []

        def add(model, section, metric, label, attribute, group, est):
            if not isinstance(est, dict):
                return
            if "estimate" in est:
                rows.append({"model": model, "section": section, "metric": metric, "label": label,
                             "attribute": attribute, "group": group, "estimate": est.get("estimate"),
                             "ci_low": est.get("ci_low"), "ci_high": est.get("ci_high"), "n": est.get("n")})
                return
            for key, sub in est.items():  # e.g. youden.{sensitivity,...}, or a metric per group
                if isinstance(sub, dict):
                    if attribute is not None and group is None and "estimate" in sub:
                        add(model, section, metric, label, attribute, key, sub)
                    else:
                        add(model, section, f"{metric}.{key}", label, attribute, group, sub)

        for name, m in self.models.items():
            util = m.get("utility") or {}
            for lab, res in (util.get("labels") or {}).items():
                for metric, est in res.items():
                    add(name, "utility", metric, lab, None, None, est)
            add(name, "utility", "auroc", "macro", None, None, util.get("macro_auroc"))
            for attr, per_label in (m.get("fairness") or {}).items():
                if attr == "pearson_r" or not isinstance(per_label, dict):
                    continue
                for lab, res in per_label.items():
                    for grp, g in (res.get("groups") or {}).items():
                        for metric, est in g.items():
                            add(name, "fairness", metric, lab, attr, grp, est)
                    for metric, est in res.items():
                        if metric != "groups":
                            add(name, "fairness", metric, lab, attr, None, est)
        for cname, c in (self.data.get("comparisons") or {}).items():
            for lab, res in (c.get("labels") or {}).items():
                add(cname, "comparison", "auroc_difference", lab, None, None, res.get("auroc_difference"))
            add(cname, "comparison", "auroc_difference", "macro", None, None, c.get("macro_auroc_difference"))
            for attr, per_label in (c.get("fairness") or {}).items():
                for lab, res in per_label.items():
                    add(cname, "comparison", "parity_gap_change", lab, attr, None, res.get("parity_gap_change"))
        return pd.DataFrame(rows, columns=["model", "section", "metric", "label", "attribute", "group",
                                           "estimate", "ci_low", "ci_high", "n"])


def suppress_v1(doc: dict, min_cell: int) -> dict:
    """A copy of a schema_version 1 document with its small groups suppressed, for rendering: version 1 kept
    no patient counts, so a group whose published count (images) is under ``min_cell`` is replaced by
    ``{"n": null, "suppressed": true}`` in the fairness groups, parity, selection metrics, the composition and
    the attacks by group. A version 2 document is returned as it is (the audit suppressed it already)."""
    import copy

    from privaudit.audit._cells import suppressed

    if doc.get("schema_version") != 1:
        return doc
    doc = copy.deepcopy(doc)

    def small(entry) -> bool:
        n = entry.get("n") if isinstance(entry, dict) else None
        return isinstance(n, int) and n < min_cell

    hidden_any = False
    for m in (doc.get("models") or {}).values():
        for attr, per_label in (m.get("fairness") or {}).items():
            if attr == "pearson_r" or not isinstance(per_label, dict):
                continue
            for res in per_label.values():
                groups = res.get("groups") or {}
                hide = {g for g, v in groups.items() if small(v)}
                hidden_any |= bool(hide)
                for g in hide:
                    groups[g] = suppressed()
                    if g in (res.get("performance_parity") or {}):
                        res["performance_parity"][g] = suppressed()
                for key, val in res.items():
                    if key in ("groups", "performance_parity") or not isinstance(val, dict) or not hide:
                        continue
                    if "estimate" in val:  # a two-group comparison involving a hidden group
                        res[key] = suppressed()
                    else:
                        for g in hide & set(val):
                            val[g] = suppressed()
        for attack in ((m.get("privacy") or {}).get("attacks") or {}).values():
            for entries in ((attack or {}).get("by_group") or {}).values():
                for g in [g for g, v in entries.items() if small(v)]:
                    entries[g] = suppressed()
                    hidden_any = True
    for c in (((doc.get("study") or {}).get("data") or {}).get("composition") or {}).values():
        groups = c.get("groups") or {}
        for g in [g for g, v in groups.items() if small(v)]:
            groups[g] = suppressed()
            hidden_any = True
        c["rule"] = f"suppressed: fewer than {min_cell} images (a schema_version 1 audit has no patient counts)"
    if hidden_any:
        doc.setdefault("warnings", []).append(
            f"this report was rendered from a schema_version 1 audit.json: groups with fewer than {min_cell} images "
            "were suppressed at rendering; run the audit again for suppression by patients")
    return doc
