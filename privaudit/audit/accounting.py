"""Recompute a run's epsilon from its dp block with independent accountants (Opacus and dp_accounting).

Imported lazily, and only for a model that has a dp block, because Opacus imports torch.
"""

from __future__ import annotations

import logging
import warnings

CROSS_CHECKS = ("rdp", "prv", "gdp", "dp_accounting_rdp", "dp_accounting_pld")


def opacus_epsilon(accountant: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps under one of Opacus' accountants."""
    from opacus.accountants import create_accountant

    # Opacus warns that GDP is experimental and logs RDP orders that fail to converge; the cross-check table
    # and its warnings say what matters, so keep the console clean.
    logging.getLogger("opacus").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = create_accountant(accountant)
        acc.history = [(noise_multiplier, sample_rate, steps)]
        return float(acc.get_epsilon(delta=delta))


def dp_accounting_epsilon(kind: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The same composition with Google's dp_accounting (RDP or PLD)."""
    import dp_accounting
    from absl import logging as absl_logging
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    acc = (rdp_privacy_accountant.RdpAccountant() if kind == "rdp"
           else pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3))
    # dp_accounting logs every RDP order that fails to converge (while composing); those orders are excluded
    # from the minimum, which stays valid, so the log lines are noise for our users.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    finally:
        absl_logging.set_verbosity(verbosity)


def cross_checks(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> tuple[dict, list[str]]:
    """Every accountant's epsilon; an accountant that fails gives ``None`` and a warning, never a crash."""
    out, warns = {}, []
    args = dict(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    for name in CROSS_CHECKS:
        try:
            if name.startswith("dp_accounting_"):
                eps = dp_accounting_epsilon(name.rsplit("_", 1)[1], **args)
            else:
                eps = opacus_epsilon(name, **args)
            out[name] = eps if eps == eps and eps != float("inf") else None
            if out[name] is None:
                warns.append(f"accountant {name} gave no finite epsilon for sigma={noise_multiplier:g}, "
                             f"q={sample_rate:g}, steps={steps}")
        except Exception as e:  # e.g. PRV's domain error at large epsilon
            out[name] = None
            warns.append(f"accountant {name} failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                         "its cross-check is null")
    return out, warns


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float] | None:
    """What an (epsilon, delta)-DP guarantee per record says about a group of ``k`` records (a patient with
    ``k`` images under image-level DP): ``(k epsilon, k e^((k-1) epsilon) delta)``, the standard group-privacy
    bound, from chaining the guarantee over the k neighbouring data sets between the two groups.

    Returns None when that delta reaches 1: the bound then promises nothing.
    """
    import math

    if not (isinstance(k, int) or float(k).is_integer()) or int(k) < 1:
        raise ValueError(f"k must be a whole number of records >= 1, got {k}")
    if not (epsilon >= 0 and math.isfinite(epsilon)) or not 0 <= delta < 1:
        raise ValueError(f"need a finite epsilon >= 0 and delta in [0, 1), got ({epsilon}, {delta})")
    k = int(k)
    if delta == 0:
        return k * epsilon, 0.0
    log_delta = math.log(k) + (k - 1) * epsilon + math.log(delta)   # in logs: e^((k-1) eps) overflows early
    if log_delta >= 0:
        return None
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta
