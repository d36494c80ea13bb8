"""Audit results: the versioned ``audit.json`` document, its JSON Schema, and a tidy-frame view."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from privaudit._fs import to_jsonable, write_json
from privaudit.errors import DataError

SCHEMA_VERSION = 1


def load_schema() -> dict:
    return json.loads(resources.files("privaudit.audit").joinpath("audit.schema.json").read_text())


MAX_AUDIT_BYTES = 512 * 1024 ** 2   # an audit.json holds aggregates; a sweep of hundreds of models is a few MB


def _describe(error) -> str:
    """One short line for a jsonschema error: what the schema wanted, never a dump of the whole value."""
    from privaudit._console import one_line

    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    got = kinds.get(type(error.instance), type(error.instance).__name__)
    if error.validator == "type":
        want = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"expected {' or '.join(map(str, want))}, got {got}"
    if error.validator == "const":
        return f"must be {json.dumps(error.validator_value)}"
    if error.validator in ("oneOf", "anyOf"):
        return f"{got} that matches none of the allowed forms"
    text = one_line(error.message)
    return text if len(text) <= 160 else text[:157] + "..."


def validate_document(data, name: str = "audit.json") -> None:
    """Validate an audit document against the shipped JSON Schema; raise one :class:`DataError` line naming
    ``name``, the first failing JSON path and what the schema expected there."""
    import jsonschema
    from jsonschema.exceptions import best_match

    from privaudit._console import one_line

    validator = jsonschema.Draft202012Validator(load_schema())
    try:
        error = best_match(validator.iter_errors(data))
        while error is not None and error.validator in ("oneOf", "anyOf") and error.context:
            # the form meant is the one of the value's own type: report what is wrong inside it
            inner = [e for e in error.context if e.validator != "type" or e.relative_path] or error.context
            error = best_match(inner)
    except RecursionError:
        raise DataError(f"{name}: nested too deeply to be an audit.json") from None
    if error is not None:
        raise DataError(f"{name}: not a valid audit.json: at {one_line(error.json_path)}: {_describe(error)}; "
                        "write it again with privaudit audit (or fix that entry)")
    # what a schema cannot say: the points of a curve come in pairs
    for model, m in data["models"].items():
        for kind, curves in (("curves", {k: (c or {}).get("roc") for k, c in (m.get("curves") or {}).items()}),
                             ("privacy.attacks", {k: (a or {}).get("roc") for k, a in
                                                  ((m["privacy"].get("attacks") or {}).items())})):
            for key, roc in curves.items():
                if not roc:
                    continue
                sizes = {f: len(roc[f]) for f in ("fpr", "tpr", "tpr_low", "tpr_high") if roc.get(f) is not None}
                if len(set(sizes.values())) > 1:
                    raise DataError(f"{name}: not a valid audit.json: at $.models.{one_line(model)}.{kind}."
                                    f"{one_line(key)}.roc: its arrays differ in length "
                                    f"({', '.join(f'{f} {n}' for f, n in sizes.items())}); write it again with "
                                    "privaudit audit")


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
        """Read an ``audit.json`` path (or a JSON string), validated against the shipped schema; refuse a newer
        schema than this version knows. Anything else raises one :class:`DataError` line naming the file and,
        for a document that breaks the schema, the first JSON path that does."""
        text = source
        name = "audit.json text"
        if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            name = str(source)
            path = Path(source)
            if path.is_dir():
                raise DataError(f"{source}: a folder, not an audit.json; give the file or its study directory")
            try:
                size = path.stat().st_size
                if size > MAX_AUDIT_BYTES:
                    raise DataError(f"{source}: {size:,} bytes, above the {MAX_AUDIT_BYTES:,} an audit.json can "
                                    "hold; is it an audit.json?")
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                raise DataError(f"{source}: cannot read ({e.strerror})") from None
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: not UTF-8 text (byte {e.start}); this is not an audit.json") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}: not valid JSON ({e.msg} at line {e.lineno}); is the file truncated?") from None
        except RecursionError:
            raise DataError(f"{name}: JSON nested too deeply to be an audit.json") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise DataError(f"{name}: no integer 'schema_version'; this is not an audit.json")
        if version > SCHEMA_VERSION:
            raise DataError(f"{name}: schema_version {version} is newer than this privaudit understands "
                            f"({SCHEMA_VERSION}); upgrade privaudit")
        validate_document(data, name)
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
