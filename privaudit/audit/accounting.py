"""Privacy accountants behind one registry: the epsilon of DP-SGD, and the noise multiplier for a target epsilon.

An accountant answers two questions about ``steps`` Poisson-subsampled Gaussian steps (noise multiplier sigma,
sample rate q) at a given delta::

    acc = create_accountant("prv")
    acc.epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=5000, delta=1e-5)
    acc.noise_multiplier(epsilon=8.0, sample_rate=0.01, steps=5000, delta=1e-5)

Registered here: Opacus' ``prv``, ``rdp`` and ``gdp``, and Google's dp_accounting as ``dp_accounting_rdp`` and
``dp_accounting_pld``. The same registry serves ``--accountant``, ``privaudit accountant``, the tf backend
(which runs dp_accounting) and the audit's cross-checks (:func:`cross_checks`, every registered accountant on a
run's dp block). :func:`register_accountant` adds one, as Opacus' ``register_accountant`` does.

The libraries are imported inside the methods, because Opacus imports torch and ``privaudit.audit`` must not.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from privaudit.errors import ConfigError, unknown_name

# The accountants registered by privaudit, in the order of the audit's cross-check table.
CROSS_CHECKS = ("rdp", "prv", "gdp", "dp_accounting_rdp", "dp_accounting_pld")
# dp_accounting's PLD resolution (the loss discretisation per step): 1e-3, tight to about 1%.
PLD_DISCRETIZATION = 1e-3


@runtime_checkable
class Accountant(Protocol):
    """What a registered accountant answers (keyword arguments, as :func:`cross_checks` calls them)."""

    def epsilon(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float: ...

    def noise_multiplier(self, *, epsilon: float, sample_rate: float, steps: int, delta: float) -> float: ...


_REGISTRY: dict[str, Callable[[], Accountant]] = {}
# The registered names (a live, read-only view: ``"prv" in ACCOUNTANTS``, ``list(ACCOUNTANTS)``), in
# registration order.
ACCOUNTANTS = MappingProxyType(_REGISTRY)


def register_accountant(name: str, cls: Callable[[], Accountant], *, force: bool = False) -> None:
    """Register ``cls`` (a class, or any callable without arguments, whose objects have ``epsilon`` and
    ``noise_multiplier``) under ``name``. A taken name is refused unless ``force=True``."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"accountant name must be a non-empty string, got {name!r}")
    if not callable(cls):
        raise ConfigError(f"accountant {name!r}: register a class or a factory, got {type(cls).__name__}")
    missing = [m for m in ("epsilon", "noise_multiplier") if isinstance(cls, type) and not hasattr(cls, m)]
    if missing:
        raise ConfigError(f"accountant {name!r}: {cls.__name__} has no {' or '.join(missing)} method; an accountant "
                          "answers epsilon(noise_multiplier, sample_rate, steps, delta) and "
                          "noise_multiplier(epsilon, sample_rate, steps, delta)")
    if name in _REGISTRY and not force:
        raise ConfigError(f"accountant {name!r} is already registered; pass force=True to replace it")
    _REGISTRY[name] = cls


def create_accountant(name: str) -> Accountant:
    """A fresh accountant registered under ``name``; an unknown name lists the registered ones."""
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        raise unknown_name("accountant", str(name), _REGISTRY) from None
    return factory()


def accountant_names() -> tuple[str, ...]:
    """The registered accountants, in registration order."""
    return tuple(_REGISTRY)


def check_accounting_arguments(*, sample_rate: float, steps: int, delta: float, epsilon: float | None = None,
                               noise_multiplier: float | None = None) -> None:
    """Refuse values no accountant can take, naming the parameter."""
    if not 0 < sample_rate < 1:
        raise ConfigError(f"sample_rate must be in (0, 1) (the Poisson sampling rate, batch / N), got {sample_rate}")
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be a whole number of at least 1, got {steps}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if epsilon is not None and not epsilon > 0:
        raise ConfigError(f"epsilon must be positive, got {epsilon}")
    if noise_multiplier is not None and not noise_multiplier > 0:
        raise ConfigError(f"noise_multiplier must be positive, got {noise_multiplier}")


@contextlib.contextmanager
def _quiet_opacus():
    """Opacus warns that GDP is experimental, that an RDP optimum sits at the edge of its orders, and logs RDP
    orders that fail to converge. The optimum stays a valid bound and the cross-check table says what matters,
    so keep the user's console clean."""
    logging.getLogger("opacus").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _quiet_absl():
    """dp_accounting logs (absl) each RDP order that fails to converge; those orders are dropped from the minimum,
    which stays a valid bound, so the lines are noise on the user's console. Its PLD code also divides by a
    vanishing probability mass when the noise search tries a sigma far too small (numpy's overflow
    RuntimeWarning); the epsilon is then infinite, which the search reads as "too little noise", so that warning
    is noise too. Only dp_accounting's own warnings are silenced."""
    import warnings

    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"dp_accounting(\..*)?$")
            yield
    finally:
        absl_logging.set_verbosity(verbosity)


class OpacusAccountant:
    """One of Opacus' accountants (``kind``: ``prv``, ``rdp`` or ``gdp``) on a history of one (sigma, q, steps)."""

    kind = ""

    def epsilon(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        from opacus.accountants import create_accountant as opacus_accountant

        with _quiet_opacus():
            acc = opacus_accountant(self.kind)
            acc.history = [(noise_multiplier, sample_rate, steps)]
            return float(acc.get_epsilon(delta=delta))

    def noise_multiplier(self, *, epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
        """Opacus' ``get_noise_multiplier``: the sigma whose epsilon is below ``epsilon`` and within 0.01 of it."""
        from opacus.accountants.utils import get_noise_multiplier

        with _quiet_opacus():
            try:
                return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                                  sample_rate=sample_rate, steps=steps, accountant=self.kind))
            except ValueError as e:  # "The privacy budget is too low": sigma would pass 1e6
                raise ConfigError(f"epsilon={epsilon:g} cannot be reached at delta={delta:g} with sample_rate="
                                  f"{sample_rate:g} and steps={steps} ({e}); raise epsilon or delta, or lower "
                                  "sample_rate or steps") from None


class OpacusPRV(OpacusAccountant):
    """Opacus' privacy random variable accountant (Gopi et al. 2021): numerically tight, within 0.01 in epsilon."""

    kind = "prv"


class OpacusRDP(OpacusAccountant):
    """Opacus' Renyi DP accountant (Mironov 2017): an upper bound, typically 10-30% above the tight epsilon."""

    kind = "rdp"


class OpacusGDP(OpacusAccountant):
    """Opacus' Gaussian DP accountant (Dong et al. 2019): a central-limit approximation that can understate."""

    kind = "gdp"


def dp_event(noise_multiplier: float, sample_rate: float, steps: int):
    """dp_accounting's event for ``steps`` Poisson-subsampled Gaussian steps."""
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


class DpAccountingAccountant:
    """Google's dp_accounting (TF-Privacy's accounting library), RDP or PLD (``kind``)."""

    kind = ""

    def __init__(self, discretization: float = PLD_DISCRETIZATION):
        self.discretization = discretization

    def _fresh(self, discretization: float | None = None):
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant

        if self.kind == "rdp":
            return rdp_privacy_accountant.RdpAccountant()
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization or self.discretization)

    def epsilon(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
        if steps == 0:
            return 0.0
        with _quiet_absl():
            acc = self._fresh()
            return float(acc.compose(dp_event(noise_multiplier, sample_rate, steps)).get_epsilon(delta))

    def noise_multiplier(self, *, epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
        """The sigma whose epsilon is at most ``epsilon`` and within 1e-3 (in sigma) of it, found with
        dp_accounting's calibration (Brent's method).

        PLD at the accounting resolution (1e-3) costs seconds per evaluation, so for PLD the search runs first at a
        coarse resolution (1e-2), whose epsilon is pessimistic (an upper bound), and then refines at full
        resolution between that sigma and the first sigma below it (in steps of 5%, then 10%) that misses the
        target. The final check steps sigma up until the full-resolution epsilon meets the target.
        """
        import dp_accounting

        tol = 1e-3
        pld = self.kind == "pld"

        def calibrate(discretization, bracket):
            with _quiet_absl():
                return float(dp_accounting.calibrate_dp_mechanism(
                    lambda: self._fresh(discretization), lambda s: dp_event(s, sample_rate, steps), epsilon, delta,
                    bracket_interval=bracket, tol=tol))

        def eps(sigma):
            return self.epsilon(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta)

        sigma = calibrate(1e-2 if pld else None, dp_accounting.LowerEndpointAndGuess(0.05, 1.0))
        if pld:
            lo = 0.95 * sigma
            while eps(lo) <= epsilon:  # the coarse epsilon can overstate by 10% and more at small epsilon
                sigma, lo = lo, 0.9 * lo
            sigma = calibrate(self.discretization, dp_accounting.ExplicitBracketInterval(lo, sigma))
        # Brent's method stops within tol of the root on either side: step up until the target is really met.
        while eps(sigma) > epsilon:
            sigma += tol
        return sigma


class DpAccountingRDP(DpAccountingAccountant):
    """dp_accounting's RDP accountant: an upper bound, over its own grid of orders."""

    kind = "rdp"


class DpAccountingPLD(DpAccountingAccountant):
    """dp_accounting's privacy loss distribution accountant: tight up to its discretisation (1e-3 per step)."""

    kind = "pld"


for _name, _cls in zip(CROSS_CHECKS, (OpacusRDP, OpacusPRV, OpacusGDP, DpAccountingRDP, DpAccountingPLD)):
    register_accountant(_name, _cls)


def solve_noise_multiplier(epsilon: float, sample_rate: float, steps: int, delta: float, *,
                           accountant: str = "prv") -> float:
    """The noise multiplier sigma that spends at most ``epsilon`` (at ``delta``) over ``steps`` Poisson-sampled
    steps at rate ``sample_rate``, under ``accountant`` (any registered name)."""
    acc = create_accountant(accountant)
    check_accounting_arguments(sample_rate=sample_rate, steps=steps, delta=delta, epsilon=epsilon)
    return acc.noise_multiplier(epsilon=epsilon, sample_rate=sample_rate, steps=int(steps), delta=delta)


def epsilon_of(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
               accountant: str = "prv") -> float:
    """The epsilon (at ``delta``) of ``steps`` Poisson-sampled steps with noise ``noise_multiplier`` at rate
    ``sample_rate``, under ``accountant`` (any registered name)."""
    acc = create_accountant(accountant)
    check_accounting_arguments(sample_rate=sample_rate, steps=steps, delta=delta, noise_multiplier=noise_multiplier)
    return acc.epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=int(steps), delta=delta)


def opacus_epsilon(accountant: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps under one of Opacus' accountants (its registered name)."""
    return create_accountant(accountant).epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                                 steps=steps, delta=delta)


def dp_accounting_epsilon(kind: str, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The same composition with Google's dp_accounting (``kind``: ``rdp`` or ``pld``)."""
    return create_accountant(f"dp_accounting_{kind}").epsilon(noise_multiplier=noise_multiplier,
                                                              sample_rate=sample_rate, steps=steps, delta=delta)


def cross_checks(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                 accountants: Iterable[str] | None = None) -> tuple[dict, list[str]]:
    """The epsilon of every registered accountant (or of ``accountants``); one that fails gives ``None`` and a
    warning, never a crash."""
    out, warns = {}, []
    args = dict(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    for name in (accountant_names() if accountants is None else accountants):
        try:
            eps = create_accountant(name).epsilon(**args)
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
