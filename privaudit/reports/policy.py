"""Release policies: thresholds checked against an ``audit.json``, with pass / fail / inconclusive verdicts.

A check with a confidence interval passes when the whole interval is on the good side of the threshold, fails
when the whole interval is on the bad side, and is inconclusive otherwise; a check without one (epsilon, the
attack's TPR) passes or fails on its value, and is inconclusive when the value is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from privaudit.config import load_toml
from privaudit.errors import ConfigError

# key -> (type, what it bounds)
KEYS = {
    "models": (list, "the models the policy applies to (default: every model in the audit)"),
    "min_auroc": (float, "macro AUROC of each model: at least this"),
    "max_parity_gap": (float, "largest |performance parity| (macro AUROC) of any group: at most this"),
    "max_parity_gap_by_attribute": (dict, "the same, per attribute, overriding max_parity_gap"),
    "max_epsilon": (float, "the accountant's epsilon: at most this (a non-private model fails)"),
    "max_attack_tpr_at_1pct_fpr": (float, "loss attack TPR at 1% FPR: at most this"),
    "no_soundness_violation": (bool, "the one-run empirical epsilon must not exceed the accountant's"),
}


@dataclass(frozen=True)
class Check:
    check: str
    model: str
    threshold: object
    value: float | None
    ci: tuple | None
    status: str            # pass, fail or inconclusive
    reason: str = ""


@dataclass(frozen=True)
class Policy:
    rules: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Policy":
        raw = load_toml(path)
        rules = raw.get("policy", raw)
        for key, value in rules.items():
            if key not in KEYS:
                raise ConfigError(f"{path}: unknown policy key {key!r}; valid keys: {', '.join(KEYS)}")
            kind = KEYS[key][0]
            ok = isinstance(value, kind) and not (kind is float and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise ConfigError(f"{path}: policy key {key!r} must be a {kind.__name__}, got {value!r}")
        for attr, value in (rules.get("max_parity_gap_by_attribute") or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{path}: max_parity_gap_by_attribute.{attr} must be a number, got {value!r}")
        return cls(rules)


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


def evaluate(doc: dict, policy: Policy) -> list[Check]:
    rules = policy.rules
    models = rules.get("models") or list(doc["models"])
    missing = [m for m in models if m not in doc["models"]]
    if missing:
        raise ConfigError(f"policy names model {missing[0]!r}, which the audit does not have "
                          f"({', '.join(doc['models'])})")
    out = []
    for name in models:
        m = doc["models"][name]
        if "min_auroc" in rules:
            out.append(_interval(m["utility"]["macro_auroc"], rules["min_auroc"], at_least=True,
                                 name="macro AUROC", model=name))
        if "max_parity_gap" in rules or "max_parity_gap_by_attribute" in rules:
            per_attr = rules.get("max_parity_gap_by_attribute") or {}
            for attr, per_label in (m.get("fairness") or {}).items():
                if attr == "pearson_r" or "macro" not in per_label:
                    continue
                limit = per_attr.get(attr, rules.get("max_parity_gap"))
                if limit is None:
                    continue
                # the largest gap, in absolute value, with its CI folded to the absolute scale
                worst = None
                for g, est in per_label["macro"]["performance_parity"].items():
                    if est.get("estimate") is None:
                        continue
                    e, lo, hi = abs(est["estimate"]), est["ci_low"], est["ci_high"]
                    folded = {"estimate": e, "ci_low": 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi)),
                              "ci_high": max(abs(lo), abs(hi))}
                    if worst is None or folded["estimate"] > worst[1]["estimate"]:
                        worst = (g, folded)
                chk = _interval(worst[1] if worst else None, limit, at_least=False,
                                name=f"parity gap, {attr}" + (f" ({worst[0]})" if worst else ""), model=name)
                out.append(chk)
        acc = (m.get("privacy") or {}).get("accountant")
        if "max_epsilon" in rules:
            eps = acc.get("epsilon") if acc else None
            status = "fail" if eps is None or eps > rules["max_epsilon"] else "pass"
            out.append(Check("epsilon", name, rules["max_epsilon"], eps, None, status,
                             "" if acc else "trained without DP: no finite epsilon"))
        if "max_attack_tpr_at_1pct_fpr" in rules:
            loss = ((m.get("privacy") or {}).get("attacks") or {}).get("loss")
            tpr = loss["tpr_at_fpr"].get("0.01") if loss else None
            status = "inconclusive" if tpr is None else "pass" if tpr <= rules["max_attack_tpr_at_1pct_fpr"] else "fail"
            out.append(Check("attack TPR at 1% FPR", name, rules["max_attack_tpr_at_1pct_fpr"], tpr, None, status,
                             "not measurable (see warnings)" if tpr is None else ""))
        if rules.get("no_soundness_violation"):
            sound = (m.get("privacy") or {}).get("soundness")
            if sound is None:
                out.append(Check("no soundness violation", name, True, None, None, "inconclusive",
                                 "no canaries in this run (train with --canaries M)" if acc else
                                 "trained without DP: nothing to check"))
            else:
                out.append(Check("no soundness violation", name, True, sound["p_value"], None,
                                 "fail" if sound["violated"] else "pass", ""))
    return out
