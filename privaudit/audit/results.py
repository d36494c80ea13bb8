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
# 3: membership-inference attacks report in the run's privacy unit: under the patient unit they score patients
# (training vs held-out patients) and n_members, n_nonmembers and the by-group counts count patients; each attack
# (and its repeated-trials bound) says which in a new "unit" key.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


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
        if version not in READABLE_VERSIONS:
            raise DataError(f"{name}: schema_version {version} is not one privaudit writes "
                            f"({', '.join(map(str, READABLE_VERSIONS))}); this is not an audit.json")
        validate_document(data, name)
        return cls(data)

    def validate(self) -> None:
        """Validate against the shipped JSON Schema (raises ``jsonschema.ValidationError``)."""
        import jsonschema

        jsonschema.validate(to_jsonable(self.data), load_schema())

    def to_frame(self) -> pd.DataFrame:
        """Every estimate in the document, one tidy row each: utility, fairness, privacy (the accountant's
        epsilon and its cross-checks, each attack's AUC and TPRs, overall and by group, the empirical epsilon and
        its soundness check), comparisons with their verdicts, and a sweep's aggregates and trade-offs; also
        whatever later versions add, since the walk is generic.

        Columns: ``model`` (a model, a comparison ``"a vs b"``, or ``study``), ``section`` (utility, fairness,
        privacy, comparison, aggregates, trade_offs), ``metric`` (dotted, e.g. ``youden.sensitivity`` or
        ``attacks.loss.tpr_at_fpr.0.01``), ``label``, ``attribute``, ``group``, ``estimate``, ``ci_low``,
        ``ci_high``, ``n``, ``p_value``, ``answer`` (a verdict's yes / no / inconclusive) and ``path`` (where the
        value sits in audit.json). Figure data (ROC points, calibration bins) and settings are left out.
        """
        rows: list[dict] = []
        for name, m in self.models.items():
            for section in ("utility", "fairness", "privacy"):
                _walk(rows, m.get(section), ["models", name, section], model=name, section=section)
        for cname, c in (self.data.get("comparisons") or {}).items():
            _walk(rows, c, ["comparisons", cname], model=cname, section="comparison")
        study = self.data.get("study") or {}
        for section in ("aggregates", "trade_offs"):
            _walk(rows, study.get(section), ["study", section], model="study", section=section)
        return pd.DataFrame(rows, columns=FRAME_COLUMNS)


FRAME_COLUMNS = ["model", "section", "metric", "label", "attribute", "group", "estimate", "ci_low", "ci_high", "n",
                 "p_value", "answer", "path"]
# keys that describe an estimate rather than being one; lists (figure data) are never rows
_SIDE_KEYS = {"ci_low", "ci_high", "n", "n_boot", "ci_method", "n_pos", "p_value", "p_value_adjusted", "n_seeds",
              "sd", "min", "max", "privileged", "reason", "method", "confidence", "x", "y", "n_members",
              "n_nonmembers", "n_boot_used", "delta", "alpha", "margin", "threshold", "noise_multiplier",
              "max_grad_norm", "sample_rate", "steps", "m", "r", "v", "share", "n_unknown"}
_SKIP = {"curves", "run", "flags", "note", "models", "epsilons", "reference", "kind", "answer", "unreliable",
         "family_size", "power", "alpha_holm"}  # a verdict's settings and a label's flags, not figures


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _locate(path: list[str], section: str) -> dict:
    """label / attribute / group from a value's path, by the contract's layout of each section."""
    keys = path[3:] if path[0] in ("models",) else path[2:]
    out = {"label": None, "attribute": None, "group": None}
    if section == "utility":
        if keys[:1] == ["labels"] and len(keys) > 1:
            out["label"] = keys[1]
        elif keys[:1] == ["macro_auroc"]:
            out["label"] = "macro"
    elif section == "fairness" and keys:
        if keys[0] == "pearson_r":
            out.update(attribute=keys[1] if len(keys) > 1 else None, label=keys[2] if len(keys) > 2 else None)
        else:
            out.update(attribute=keys[0], label=keys[1] if len(keys) > 1 else None)
            rest = keys[2:]
            if rest[:1] == ["groups"] and len(rest) > 1:
                out["group"] = rest[1]
            elif rest[:1] == ["performance_parity"] and len(rest) > 1:
                out["group"] = rest[1]
            elif len(rest) > 1 and rest[1] not in ("estimate",):
                out["group"] = rest[1]
    elif section == "privacy" and ("by_group" in keys or "auc_gap" in keys):
        i = keys.index("by_group" if "by_group" in keys else "auc_gap")
        out.update(attribute=keys[i + 1] if len(keys) > i + 1 else None, group=keys[i + 2] if len(keys) > i + 2 else None)
    elif section == "privacy" and keys[:1] == ["exposure"] and len(keys) > 1:
        out["attribute"] = keys[1]
    elif section == "comparison" and keys:
        if keys[0] == "labels" and len(keys) > 1:
            out["label"] = keys[1]
        elif keys[0] in ("privacy_gap", "privacy_gap_verdict") and len(keys) > 1:
            out["attribute"] = keys[1]  # privacy_gap.<attribute>.<attack>.<group>
            if keys[0] == "privacy_gap" and len(keys) > 3:
                out["group"] = keys[3]
        elif keys[0] == "fairness" and len(keys) > 2:
            out.update(attribute=keys[1], label=keys[2])
            if len(keys) > 4 and keys[3] == "parity_gap_change":
                out["group"] = keys[4]
    return out


def _metric(path: list[str], section: str, loc: dict) -> str:
    keys = path[3:] if path[0] == "models" else path[2:]
    drop = {v for v in loc.values() if v is not None} | {"labels", "groups", "by_group", "macro_auroc"}
    parts = [k for k in keys if k not in drop]
    if section == "utility" and keys[:1] == ["macro_auroc"]:
        parts = ["auroc", *parts]
    return ".".join(parts) or section


def _scalar(v):
    return v if _is_number(v) else None


def _walk(rows: list[dict], node, path: list[str], *, model: str, section: str, n=None, p=None) -> None:
    if not isinstance(node, dict):
        return
    n = node.get("n", n) if _is_number(node.get("n")) else n
    p = _scalar(node.get("p_value")) if _is_number(node.get("p_value")) else p  # a comparison's paired p
    loc = _locate(path, section)
    if "estimate" in node or ("r" in node and "p_value" in node) or ("mean" in node and "n_seeds" in node):
        est = node.get("estimate", node.get("r", node.get("mean")))
        rows.append({"model": model, "section": section, "metric": _metric(path, section, loc), **loc,
                     "estimate": est, "ci_low": node.get("ci_low"), "ci_high": node.get("ci_high"),
                     "n": node.get("n_seeds", n), "p_value": p, "answer": None,
                     "path": ".".join(path)})
    elif "answer" in node:  # a verdict
        rows.append({"model": model, "section": section, "metric": _metric(path, section, loc), **loc,
                     "estimate": None, "ci_low": None, "ci_high": None, "n": None,
                     "p_value": _scalar(node.get("p_value_adjusted", node.get("p_value"))),
                     "answer": node.get("answer"),
                     "path": ".".join(path)})
    for key, value in node.items():
        if key in _SKIP or (key in _SIDE_KEYS and ("estimate" in node or "r" in node or "mean" in node)):
            continue
        if isinstance(value, dict):
            _walk(rows, value, [*path, str(key)], model=model, section=section, n=n,
                  p=p if section == "comparison" else None)
        elif _is_number(value) and key not in _SIDE_KEYS and not ("estimate" in node or "mean" in node
                                                                 or ("r" in node and "p_value" in node)):
            sub = [*path, str(key)]
            loc2 = _locate(sub, section)
            rows.append({"model": model, "section": section, "metric": _metric(sub, section, loc2), **loc2,
                         "estimate": float(value), "ci_low": None, "ci_high": None,
                         "n": n, "p_value": None, "answer": None,
                         "path": ".".join(sub)})


def suppress_v1(doc: dict, min_cell: int) -> dict:
    """A copy of a schema_version 1 document with its small groups suppressed, for rendering: version 1 kept
    no patient counts, so a group whose published count (images) is under ``min_cell`` is replaced by
    ``{"n": null, "suppressed": true}`` in the fairness groups, parity, selection metrics, the composition and
    the attacks by group. A version 2 or later document is returned as it is (the audit suppressed it already)."""
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
