"""Release policies: thresholds checked against an ``audit.json``, with pass / fail / inconclusive verdicts.

A check with a confidence interval passes when the whole interval is on the good side of the threshold, fails
when the whole interval is on the bad side, and is inconclusive otherwise; a check without one (epsilon, the
attack's TPR) passes or fails on its value, and is inconclusive when the value is missing.

The policy file is TOML with a ``[policy]`` table. Which models it applies to is ``models``: a list of model
names, ``"all"`` (the default: every model in the audit) or ``"dp"`` (every model trained with DP, whatever
it is called: a single run such as ``runs/eps3``, the ``private`` model of a study, each DP run of a sweep).
A rule is a threshold (``max_epsilon = 10.0``), or an inline table that gives it its own models
(``min_auroc = { value = 0.7, models = "all" }``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from privaudit._console import one_line
from privaudit.config import load_toml
from privaudit.errors import ConfigError

# key -> (type, what it bounds)
KEYS = {
    "models": (list, "the models the policy applies to: a list of names, \"all\" (default) or \"dp\""),
    "min_auroc": (float, "macro AUROC of each model: at least this"),
    "max_parity_gap": (float, "largest |performance parity| (macro AUROC) of any group: at most this"),
    "max_parity_gap_by_attribute": (dict, "the same, per attribute, overriding max_parity_gap"),
    "max_epsilon": (float, "the accountant's epsilon: at most this (a non-private model fails)"),
    "max_attack_tpr_at_1pct_fpr": (float, "loss attack TPR at 1% FPR: at most this"),
    "no_soundness_violation": (bool, "the one-run empirical epsilon must not exceed the accountant's"),
}
SCOPES = ("all", "dp")                 # the model sets a policy or a rule can name instead of a list
UNIT_INTERVAL = ("min_auroc", "max_parity_gap", "max_attack_tpr_at_1pct_fpr")   # thresholds in [0, 1]


@dataclass(frozen=True)
class Check:
    check: str
    model: str
    threshold: object
    value: float | None
    ci: tuple | None
    status: str            # pass, fail or inconclusive
    reason: str = ""


def _read_toml(path: Path) -> dict:
    """The policy file as a dict; every way it can fail is one ConfigError line naming the file."""
    return load_toml(path, "policy file")


def _check_models(path, where: str, value) -> None:
    names = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    if not (value in SCOPES if isinstance(value, str) else names):
        raise ConfigError(f"{path}: {where} must be a list of model names, \"all\" or \"dp\", got "
                          f"{one_line(repr(value))[:80]}")


def _check_threshold(path, key: str, value) -> None:
    kind = KEYS[key][0]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: policy key {key!r} must be true or false, got {one_line(repr(value))[:80]}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: policy key {key!r} must be a number (a float), got {one_line(repr(value))[:80]}")
    if not math.isfinite(value):
        raise ConfigError(f"{path}: policy key {key!r} must be a finite number, got {value}")
    if key in UNIT_INTERVAL and not 0 <= value <= 1:
        raise ConfigError(f"{path}: policy key {key!r} is a rate or an AUROC, in [0, 1]; got {value}")
    if key == "max_epsilon" and not value > 0:
        raise ConfigError(f"{path}: policy key 'max_epsilon' must be above 0, got {value}")


@dataclass(frozen=True)
class Policy:
    """``rules``: key -> threshold; ``scopes``: key -> the models of a rule that names its own (a list of
    names, "all" or "dp"); ``rules["models"]``, when given, is the policy's default."""

    rules: dict = field(default_factory=dict)
    scopes: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Policy":
        raw = _read_toml(path)
        extra = sorted(set(raw) - {"policy"} - set(KEYS))
        if "policy" in raw and extra:
            raise ConfigError(f"{path}: unknown table or key {one_line(extra[0])!r} beside [policy]; put the rules "
                              "inside [policy]")
        rules = raw.get("policy", raw)
        if not isinstance(rules, dict):
            raise ConfigError(f"{path}: 'policy' must be a table ([policy] with one rule a line), got "
                              f"{type(rules).__name__}")
        if not any(k != "models" for k in rules):
            raise ConfigError(f"{path}: the policy has no rules; give at least one of "
                              f"{', '.join(k for k in KEYS if k != 'models')}")
        thresholds, scopes = {}, {}
        for key, value in rules.items():
            if key not in KEYS:
                raise ConfigError(f"{path}: unknown policy key {one_line(key)!r}; valid keys: {', '.join(KEYS)}")
            if key == "models":
                _check_models(path, "'models'", value)
                thresholds[key] = value
                continue
            if key == "max_parity_gap_by_attribute":
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: policy key {key!r} must be a table of attribute = number, got "
                                      f"{type(value).__name__}")
                for attr, v in value.items():
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                        raise ConfigError(f"{path}: max_parity_gap_by_attribute.{one_line(attr)} must be a number "
                                          f"in [0, 1], got {one_line(repr(v))[:80]}")
                thresholds[key] = value
                continue
            if isinstance(value, dict):   # { value = ..., models = ... }
                unknown = sorted(set(value) - {"value", "models"})
                if unknown or "value" not in value:
                    raise ConfigError(f"{path}: policy key {key!r} as a table takes 'value' and optionally 'models', "
                                      f"e.g. {key} = {{ value = ..., models = \"dp\" }}")
                if "models" in value:
                    _check_models(path, f"{key}.models", value["models"])
                    scopes[key] = value["models"]
                value = value["value"]
            _check_threshold(path, key, value)
            thresholds[key] = value
        return cls(thresholds, scopes)

    def models_for(self, key: str, doc: dict) -> list[str]:
        """The models of ``doc`` that rule ``key`` applies to."""
        return select_models(self.scopes.get(key, self.rules.get("models") or "all"), doc)


def select_models(scope, doc: dict) -> list[str]:
    """The models of ``doc`` named by ``scope``: a list of names, "all" or "dp" (trained with DP)."""
    names = list(doc["models"])
    if scope == "all":
        return names
    if scope == "dp":
        return [n for n in names if (doc["models"][n].get("run") or {}).get("dp") is True]
    missing = [m for m in scope if m not in doc["models"]]
    if missing:
        raise ConfigError(f"policy names model {one_line(missing[0])!r}, which the audit does not have "
                          f"({one_line(', '.join(names))}); name one of those, or use models = \"dp\" or \"all\"")
    return list(scope)


def _interval(est: dict | None, threshold: float, *, at_least: bool, name: str, model: str) -> Check:
    if not est or est.get("estimate") is None:
        return Check(name, model, threshold, None, None, "inconclusive", "not measurable (see the audit's warnings)")
    e, lo, hi = est["estimate"], est.get("ci_low"), est.get("ci_high")
    lo = e if lo is None else lo
    hi = e if hi is None else hi
    good = lo >= threshold if at_least else hi <= threshold
    bad = hi < threshold if at_least else lo > threshold
    status = "pass" if good else "fail" if bad else "inconclusive"
    reason = "" if status != "inconclusive" else "the confidence interval straddles the threshold"
    return Check(name, model, threshold, e, (lo, hi), status, reason)


def _folded_worst(parity: dict):
    """The group with the largest |gap|, with its CI folded onto the absolute scale, or None."""
    worst = None
    for g, est in (parity or {}).items():
        if not est or est.get("estimate") is None:
            continue
        e = est["estimate"]
        lo = e if est.get("ci_low") is None else est["ci_low"]
        hi = e if est.get("ci_high") is None else est["ci_high"]
        folded = {"estimate": abs(e), "ci_low": 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)),
                  "ci_high": max(abs(lo), abs(hi))}
        if worst is None or folded["estimate"] > worst[1]["estimate"]:
            worst = (g, folded)
    return worst


def evaluate(doc: dict, policy: Policy) -> list[Check]:
    """Every check of ``policy`` on every model it applies to, in the audit's model order."""
    rules = policy.rules
    # the per-attribute table refines max_parity_gap: one parity rule, with max_parity_gap's models
    keys = [k for k in KEYS if k in rules and k not in ("models", "max_parity_gap_by_attribute")]
    if "max_parity_gap_by_attribute" in rules and "max_parity_gap" not in keys:
        keys.append("max_parity_gap")
    scope = {k: set(policy.models_for(k, doc)) for k in keys}
    if not any(scope.values()):
        what = rules.get("models") or "all"
        raise ConfigError(f"the policy applies to {'the DP models' if what == 'dp' else one_line(str(what))}, and "
                          f"the audit has none ({one_line(', '.join(doc['models']))}); name the models to check")
    out = []
    for name, m in doc["models"].items():
        def applies(key: str) -> bool:
            return key in scope and name in scope[key]

        if applies("min_auroc"):
            out.append(_interval(m["utility"]["macro_auroc"], rules["min_auroc"], at_least=True,
                                 name="macro AUROC", model=name))
        if applies("max_parity_gap"):
            per_attr = rules.get("max_parity_gap_by_attribute") or {}
            for attr, per_label in (m.get("fairness") or {}).items():
                if attr == "pearson_r" or not isinstance(per_label, dict) or "macro" not in per_label:
                    continue
                limit = per_attr.get(attr, rules.get("max_parity_gap"))
                if limit is None:
                    continue
                worst = _folded_worst(per_label["macro"].get("performance_parity"))
                out.append(_interval(worst[1] if worst else None, limit, at_least=False,
                                     name=f"parity gap, {attr}" + (f" ({worst[0]})" if worst else ""), model=name))
        acc = (m.get("privacy") or {}).get("accountant")
        if applies("max_epsilon"):
            eps = acc.get("epsilon") if acc else None
            status = "fail" if eps is None or eps > rules["max_epsilon"] else "pass"
            out.append(Check("epsilon", name, rules["max_epsilon"], eps, None, status,
                             "" if acc else "trained without DP: no finite epsilon"))
        if applies("max_attack_tpr_at_1pct_fpr"):
            loss = ((m.get("privacy") or {}).get("attacks") or {}).get("loss")
            tpr = (loss.get("tpr_at_fpr") or {}).get("0.01") if loss else None
            status = "inconclusive" if tpr is None else "pass" if tpr <= rules["max_attack_tpr_at_1pct_fpr"] else "fail"
            out.append(Check("attack TPR at 1% FPR", name, rules["max_attack_tpr_at_1pct_fpr"], tpr, None, status,
                             "not measurable (see warnings)" if tpr is None else ""))
        if applies("no_soundness_violation") and rules.get("no_soundness_violation"):
            sound = (m.get("privacy") or {}).get("soundness")
            if sound is None:
                out.append(Check("no soundness violation", name, True, None, None, "inconclusive",
                                 "no canaries in this run (train with --canaries M)" if acc else
                                 "trained without DP: nothing to check"))
            else:
                out.append(Check("no soundness violation", name, True, sound.get("p_value"), None,
                                 "fail" if sound.get("violated") else "pass", ""))
    return out
