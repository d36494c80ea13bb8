"""The attack registry: membership-inference attacks by name, like Opacus' accountant registry.

An attack turns a target model's prediction table (and, for the shadow-model attacks, the statistics of shadow
or reference models trained with and without each sample) into one membership score per sample: higher means
"member". The audit engine scores the prediction-only attacks (``loss``: the loss, confidence and entropy
thresholds) itself; ``privaudit attack NAME`` trains the models that ``lira`` and ``rmia`` need and stores their
scores for the audit. Register more with :func:`register_attack`.

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

    def score(self, preds: pd.DataFrame, labels, stats: list[pd.DataFrame] | None = None) -> dict[str, np.ndarray]:
        """Scores per sample, keyed by the name under which the audit reports them."""
        raise NotImplementedError


class LossAttack(Attack):
    """Yeom et al.'s threshold attacks: a low loss, a high confidence or a low entropy means member."""

    name = "loss"

    def score(self, preds, labels, stats=None):
        from privaudit.audit.privacy import loss_attack_scores

        return loss_attack_scores(preds, labels)


def _stack(stats: list[pd.DataFrame], column: str) -> np.ndarray:
    return np.vstack([s[column].to_numpy(dtype=float) for s in stats])


class LiraAttack(Attack):
    """Carlini et al.'s likelihood-ratio attack on the logit-scaled confidence (online: in- and out-shadows;
    offline: out-shadows only). With fewer than 16 shadows one global variance is fixed, as the paper does."""

    name = "lira"
    models = "shadows"

    def __init__(self, offline: bool = False):
        self.offline = offline

    def score(self, preds, labels, stats=None):
        from privaudit.audit.privacy import lira_scores, logit_confidence

        inn = np.vstack([s["in"].to_numpy() == 1 for s in stats])
        fixed = len(stats) < 16
        score = lira_scores(logit_confidence(preds, labels), _stack(stats, "logit_confidence"), inn,
                            online=not self.offline, fixed_variance=fixed, min_models=1 if fixed else 2)
        return {"lira_offline" if self.offline else "lira": score}


class RmiaAttack(Attack):
    """Zarifzadeh et al.'s RMIA: the target's likelihood ratio against reference models, compared with the
    target's non-members (never in its training set) as the population."""

    name = "rmia"
    models = "references"

    def score(self, preds, labels, stats=None):
        from privaudit.audit.privacy import rmia_scores, true_label_probability

        out = np.vstack([s["in"].to_numpy() != 1 for s in stats])
        probs = _stack(stats, "true_prob")
        ref_mean = np.where(out, probs, 0.0).sum(axis=0) / np.maximum(out.sum(axis=0), 1)
        ref_mean = np.where(out.any(axis=0), ref_mean, np.nan)
        target = true_label_probability(preds, labels)
        pop = (preds["member"] == 0).to_numpy() & np.isfinite(ref_mean)
        score = rmia_scores(target, ref_mean[None, :], target[pop], ref_mean[pop][None, :])
        return {"rmia": np.where(np.isfinite(ref_mean), score, np.nan)}


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
