"""The accountant registry: each registered accountant is its library's answer, solving inverts it, and names are checked."""

from __future__ import annotations

import pytest

from privaudit.audit import accounting
from privaudit.audit.accounting import (ACCOUNTANTS, create_accountant, cross_checks, epsilon_of,
                                        register_accountant, solve_noise_multiplier)
from privaudit.errors import ConfigError, RegistryError

SETTINGS = [(1.0, 0.01, 200, 1e-5), (0.8, 0.05, 50, 1e-4), (2.0, 0.2, 10, 1e-3)]


def _opacus(kind, sigma, q, steps, delta):
    from opacus.accountants import create_accountant as opacus_accountant

    acc = opacus_accountant(kind)
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


def _dp_accounting(kind, sigma, q, steps, delta):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = (rdp_privacy_accountant.RdpAccountant() if kind == "rdp"
           else pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3))
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.compose(event).get_epsilon(delta)


def test_the_builtin_accountants_are_registered_in_the_cross_check_order():
    assert tuple(ACCOUNTANTS)[:5] == ("rdp", "prv", "gdp", "dp_accounting_rdp", "dp_accounting_pld")
    assert "prv" in ACCOUNTANTS and accounting.accountant_names()[:5] == tuple(ACCOUNTANTS)[:5]
    with pytest.raises(TypeError):
        ACCOUNTANTS["mine"] = object  # read-only: register_accountant is the way in


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("sigma,q,steps,delta", SETTINGS)
def test_each_accountant_is_its_library_on_the_same_composition(sigma, q, steps, delta):
    args = dict(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    for kind in ("prv", "rdp", "gdp"):
        assert create_accountant(kind).epsilon(**args) == pytest.approx(_opacus(kind, sigma, q, steps, delta), rel=1e-9)
    for kind in ("rdp", "pld"):
        ours = create_accountant(f"dp_accounting_{kind}").epsilon(**args)
        assert ours == pytest.approx(_dp_accounting(kind, sigma, q, steps, delta), rel=1e-9)
    # and the cross-check table is the registry's answers, one per registered accountant
    checks, warns = cross_checks(**args)
    assert not warns and list(checks) == list(ACCOUNTANTS)
    assert checks["prv"] == pytest.approx(_opacus("prv", sigma, q, steps, delta), rel=1e-9)
    assert epsilon_of(sigma, q, steps, delta, accountant="dp_accounting_pld") == checks["dp_accounting_pld"]


@pytest.mark.parametrize("name", ["prv", "rdp", "gdp", "dp_accounting_rdp", "dp_accounting_pld"])
def test_solving_for_sigma_meets_the_target_epsilon_and_no_less_noise_would(name):
    from opacus.accountants.utils import get_noise_multiplier

    q, steps, delta, target = 0.05, 40, 1e-4, 2.0
    sigma = solve_noise_multiplier(target, q, steps, delta, accountant=name)
    acc = create_accountant(name)
    eps = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert target - 0.02 <= eps <= target  # spends at most the target, and nearly all of it
    # 2% less noise overspends: the solver did not hand back a needlessly large sigma
    assert acc.epsilon(noise_multiplier=0.98 * sigma, sample_rate=q, steps=steps, delta=delta) > target
    if name in ("prv", "rdp", "gdp"):  # Opacus' own solver, called directly, gives the same sigma
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            direct = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                          accountant=name)
        assert sigma == pytest.approx(direct, rel=1e-12)


def test_unknown_names_and_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(RegistryError, match=r"unknown accountant 'prvv'.*dp_accounting_pld.*Did you mean 'prv'\?"):
        create_accountant("prvv")
    with pytest.raises(RegistryError, match="unknown accountant"):
        solve_noise_multiplier(2.0, 0.05, 40, 1e-4, accountant="pld")
    for kwargs, needle in (({"epsilon": 0.0}, "epsilon must be positive"), ({"sample_rate": 1.0}, "sample_rate"),
                           ({"steps": 0}, "steps must be"), ({"delta": 1.5}, "delta must be in")):
        args = {"epsilon": 2.0, "sample_rate": 0.05, "steps": 40, "delta": 1e-4, **kwargs}
        with pytest.raises(ConfigError, match=needle):
            solve_noise_multiplier(**args)
    with pytest.raises(ConfigError, match="epsilon=1e-06 cannot be reached"):
        solve_noise_multiplier(1e-6, 0.5, 1000, 1e-8, accountant="gdp")  # sigma would pass 1e6


class _Laplace:
    """A toy accountant with a closed form: basic composition of a pure-DP mechanism, epsilon = steps / sigma."""

    def epsilon(self, *, noise_multiplier, sample_rate, steps, delta):
        return steps / noise_multiplier

    def noise_multiplier(self, *, epsilon, sample_rate, steps, delta):
        return steps / epsilon


class _Broken(_Laplace):
    def epsilon(self, **kwargs):
        raise ArithmeticError("diverged")


def test_a_registered_accountant_serves_solving_and_the_cross_checks():
    try:
        register_accountant("toy", _Laplace)
        register_accountant("broken", _Broken)
        assert solve_noise_multiplier(4.0, 0.1, 8, 1e-5, accountant="toy") == 2.0
        checks, warns = cross_checks(noise_multiplier=2.0, sample_rate=0.1, steps=8, delta=1e-5,
                                     accountants=["toy", "broken"])
        assert checks == {"toy": 4.0, "broken": None}
        assert warns == ["accountant broken failed (ArithmeticError: diverged); its cross-check is null"]
        with pytest.raises(ConfigError, match="'toy' is already registered; pass force=True"):
            register_accountant("toy", _Broken)
        register_accountant("toy", _Broken, force=True)
        assert isinstance(create_accountant("toy"), _Broken)
        with pytest.raises(ConfigError, match="has no epsilon or noise_multiplier method"):
            register_accountant("nothing", object)
    finally:
        for name in ("toy", "broken"):
            accounting._REGISTRY.pop(name, None)
    assert "toy" not in ACCOUNTANTS


def test_the_tf_backend_accounts_through_the_registry():
    from privaudit.backends import tf_backend  # tensorflow itself is imported lazily, inside the functions

    args = dict(noise_multiplier=1.0, sample_rate=0.05, steps=40, delta=1e-4)
    assert tf_backend.compute_epsilon("prv", **args) == create_accountant("dp_accounting_pld").epsilon(**args)
    assert tf_backend.compute_epsilon("rdp", **args) == create_accountant("dp_accounting_rdp").epsilon(**args)
    assert tf_backend.compute_epsilon("rdp", **{**args, "steps": 0}) == 0.0
    with pytest.raises(ConfigError, match="gdp.*not available in the tf backend"):
        tf_backend.compute_epsilon("gdp", **args)


def test_the_pld_noise_search_prints_no_numpy_overflow_warning():
    """dp_accounting's PLD overflows (a RuntimeWarning on the user's console) when the search tries a sigma far too
    small for a tiny cohort's high sample rate; the accountant keeps that to itself and still meets the target."""
    import warnings

    from privaudit.audit.accounting import create_accountant

    acc = create_accountant("dp_accounting_pld")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma = acc.noise_multiplier(epsilon=8.0, sample_rate=8 / 46, steps=6, delta=0.01)
    assert acc.epsilon(noise_multiplier=sigma, sample_rate=8 / 46, steps=6, delta=0.01) <= 8.0
