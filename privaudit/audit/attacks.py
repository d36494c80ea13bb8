"""The attack registry: membership-inference attacks by name, like Opacus' accountant registry.

An attack turns a target model's prediction table (and, for the shadow-model attacks, the statistics of shadow
or reference models trained with and without each sample) into one membership score per sample: higher means
"member". The audit engine scores the prediction-only attacks (``loss``: the loss, confidence and entropy
thresholds) itself; ``privaudit attack NAME`` trains the models that ``lira`` and ``rmia`` need and stores their
scores for the audit. Register more with :func:`register_attack`.

**Patients.** Given ``units`` (the patient id of each row), an attack scores patients: each image's statistic is
computed as without units, a patient's statistic is the mean over its images
(:func:`privaudit.audit.privacy.unit_mean`), and every row gets its patient's score. LiRA fits its in/out
Gaussians to the shadows' patient means (shadows include or exclude whole patients), so the test is the
likelihood ratio of the statistic actually used; RMIA averages the log-probability of the true labels over the
patient's images (a geometric mean of Pr(x | theta)) in the target and in each reference model, and compares a
patient with the population of non-member patients.

Nothing here imports torch or tensorflow.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from privaudit.errors import unknown_name


class Attack:
    """One membership-inference attack. ``models`` says what it needs trained: None (the target's own
    predictions), ``"shadows"`` (LiRA) or ``"references"`` (RMIA)."""

    name = "attack"
    models: str | None = None

    def score(self, preds: pd.DataFrame, labels, stats: list[pd.DataFrame] | None = None, *,
              units=None) -> dict[str, np.ndarray]:
        """Scores per row of ``preds``, keyed by the name under which the audit reports them. With ``units`` (one
        id per row, e.g. the patient id), each row holds its unit's score."""
        raise NotImplementedError


def _codes(units, n_rows: int):
    """(code per row, number of units) for ``units``; each row its own unit when ``units`` is None."""
    if units is None:
        return np.arange(n_rows), n_rows
    from privaudit.audit.privacy import unit_codes

    codes, uniq = unit_codes(units)
    return codes, len(uniq)


class LossAttack(Attack):
    """Yeom et al.'s threshold attacks: a low loss, a high confidence or a low entropy means member."""

    name = "loss"

    def score(self, preds, labels, stats=None, *, units=None):
        from privaudit.audit.privacy import loss_attack_scores, unit_mean

        scores = loss_attack_scores(preds, labels)
        if units is None:
            return scores
        codes, n = _codes(units, len(preds))
        return {k: unit_mean(v, codes, n)[codes] for k, v in scores.items()}


def _stack(stats: list[pd.DataFrame], column: str) -> np.ndarray:
    return np.vstack([s[column].to_numpy(dtype=float) for s in stats])


class LiraAttack(Attack):
    """Carlini et al.'s likelihood-ratio attack on the logit-scaled confidence (online: in- and out-shadows;
    offline: out-shadows only). With fewer than 16 shadows one global variance is fixed, as the paper does."""

    name = "lira"
    models = "shadows"

    def __init__(self, offline: bool = False):
        self.offline = offline

    def score(self, preds, labels, stats=None, *, units=None):
        from privaudit.audit.privacy import lira_scores, logit_confidence, unit_mean

        codes, n = _codes(units, len(preds))
        inn = np.vstack([s["in"].to_numpy() == 1 for s in stats]).astype(float)
        # a unit is in a shadow when all its rows are (shadows draw whole patients, so all or none are)
        inn = unit_mean(inn, codes, n) == 1
        target = unit_mean(logit_confidence(preds, labels), codes, n)
        shadow = unit_mean(_stack(stats, "logit_confidence"), codes, n)
        fixed = len(stats) < 16
        score = lira_scores(target, shadow, inn, online=not self.offline, fixed_variance=fixed,
                            min_models=1 if fixed else 2)
        return {"lira_offline" if self.offline else "lira": score[codes]}


class RmiaAttack(Attack):
    """Zarifzadeh et al.'s RMIA: the target's likelihood ratio against reference models, compared with the
    target's non-members (never in its training set) as the population."""

    name = "rmia"
    models = "references"

    def score(self, preds, labels, stats=None, *, units=None):
        from privaudit.audit.privacy import rmia_scores, true_label_probability, unit_mean

        codes, n = _codes(units, len(preds))

        def per_unit(p):  # the geometric mean of a unit's Pr(x | theta): exp of the mean log-probability
            p = np.asarray(p, dtype=float)
            return p if units is None else np.exp(unit_mean(np.log(p), codes, n))

        out = unit_mean(np.vstack([s["in"].to_numpy() != 1 for s in stats]).astype(float), codes, n) == 1
        probs = per_unit(_stack(stats, "true_prob"))
        ref_mean = np.where(out, probs, 0.0).sum(axis=0) / np.maximum(out.sum(axis=0), 1)
        ref_mean = np.where(out.any(axis=0), ref_mean, np.nan)
        target = per_unit(true_label_probability(preds, labels))
        non_member = unit_mean((preds["member"] == 0).to_numpy().astype(float), codes, n) == 1
        pop = non_member & np.isfinite(ref_mean)
        score = rmia_scores(target, ref_mean[None, :], target[pop], ref_mean[pop][None, :])
        return {"rmia": np.where(np.isfinite(ref_mean), score, np.nan)[codes]}


_ATTACKS: dict[str, Callable[..., Attack]] = {}


def register_attack(name: str, factory: Callable[..., Attack]) -> None:
    """Register an attack class (or factory) under ``name``."""
    _ATTACKS[name] = factory


def create_attack(name: str, **options) -> Attack:
    """The attack registered as ``name``; an unknown name lists the valid ones."""
    try:
        factory = _ATTACKS[name]
    except KeyError:
        raise unknown_name("attack", name, _ATTACKS) from None
    return factory(**options)


def list_attacks(*, trained: bool | None = None) -> list[str]:
    """Registered attack names; ``trained=True``: those that need shadow or reference models."""
    return [n for n, f in _ATTACKS.items() if trained is None or (getattr(f, "models", None) is not None) == trained]


for _cls in (LossAttack, LiraAttack, RmiaAttack):
    register_attack(_cls.name, _cls)
