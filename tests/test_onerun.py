"""The one-run bounds (privaudit.audit.onerun): equal to JAX-Privacy's, sound on an exact Gaussian mechanism."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom, norm

from privaudit.audit import onerun
from privaudit.audit.empirical import one_run_lower_bound, one_run_p_value, p_value_at_least, soundness


def _jax_auditing():
    """jax_privacy/auditing.py, loaded by path: the package's __init__ imports JAX, the file itself needs only
    numpy, scipy and dp_accounting (installed with --no-deps by the test set-up)."""
    spec = importlib.util.find_spec("jax_privacy")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("jax-privacy is not installed (make install-test installs it with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / "auditing.py"
    name = "jax_privacy_auditing_reference"
    if name not in sys.modules:
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module   # before executing it: its dataclasses look their module up there
        file_spec.loader.exec_module(module)
    return sys.modules[name]


def _scores(m, mu, seed, decimals=None):
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    scores = mu * included + rng.normal(size=m)
    if decimals is not None:   # ties between canaries
        scores = np.round(scores, decimals)
    return scores, included


# (m, mu, seed, decimals, significance, delta): weak to strong attacks, ties, two deltas and two levels
SCORE_SETS = [(200, 1.0, 0, None, 0.05, 1e-5), (400, 2.0, 1, None, 0.05, 1e-3), (600, 3.0, 2, 1, 0.01, 1e-5),
              (300, 0.3, 3, None, 0.05, 1e-5), (500, 5.0, 4, None, 0.01, 1e-4)]


@pytest.mark.parametrize("m,mu,seed,decimals,significance,delta", SCORE_SETS)
def test_both_bounds_equal_jax_privacy(m, mu, seed, decimals, significance, delta):
    jax = _jax_auditing()
    scores, included = _scores(m, mu, seed, decimals)
    auditor = jax.CanaryScoreAuditor(scores[included], scores[~included])
    threshold = float(np.quantile(scores, 0.85))
    for strategy, ours in [(jax.Bonferroni(), {"thresholds": "hull"}), (jax.Explicit(threshold), {"threshold": threshold})]:
        for method, theirs in [(onerun.STEINKE, auditor.epsilon_one_run), (onerun.FDP, auditor.epsilon_one_run_fdp)]:
            expected = theirs(significance, delta, one_sided=True, threshold_strategy=strategy)
            got = onerun.one_run_epsilon(scores, included, delta=delta, confidence=1 - significance, method=method,
                                         **ours)
            assert got["estimate"] == pytest.approx(expected, abs=1e-5), (type(strategy).__name__, method)
    # the sets are not all trivial: some bound is positive
    assert max(onerun.one_run_epsilon(scores, included, delta=delta, confidence=1 - significance,
                                      thresholds="hull")["estimate"], mu < 1) > 0


def test_a_result_recomputes_from_its_counts():
    scores, included = _scores(500, 3.0, 5)
    for method, fn in [(onerun.FDP, onerun.fdp_epsilon), (onerun.STEINKE, onerun.steinke_epsilon)]:
        for kwargs in ({"thresholds": "all"}, {"thresholds": "hull"}, {"top_k": [200, 100, 50]}, {"top_k": 60}):
            res = onerun.one_run_epsilon(scores, included, delta=1e-5, confidence=0.99, method=method, **kwargs)
            # Steinke's delta term, 2 m delta max_i P[v - i <= B < v] / i >= 2 m delta / (v + 1) ~ 8e-5, is above
            # the 0.01 / 501 of a search over every threshold: no bound there
            assert res["estimate"] > 0 or (method == onerun.STEINKE and kwargs == {"thresholds": "all"})
            again = fn(res["m"], res["n_guess"], res["n_correct"], significance=res["significance"], delta=1e-5)
            assert again == pytest.approx(res["estimate"], abs=1e-6)
            assert res["n_guess"] == (scores >= res["threshold"]).sum()
            assert res["n_correct"] == (scores[included] >= res["threshold"]).sum()
            assert res["significance"] == pytest.approx(0.01 / res["n_tests"])
    assert onerun.one_run_epsilon(scores, included, delta=1e-5, thresholds="all")["n_tests"] == 501


def test_guess_counts_and_roc_hull_by_hand():
    scores = np.array([0.1, 0.4, 0.4, 0.9, 0.7])
    included = np.array([False, True, False, True, True])
    thr, g, c = onerun.guess_counts(scores, included)
    assert thr.tolist() == [0.1, 0.4, 0.7, 0.9, np.inf]
    assert g.tolist() == [5, 4, 2, 1, 0] and c.tolist() == [3, 3, 2, 1, 0]
    # (missed included, rejected excluded) per threshold: (0,0) (0,1) (1,2) (2,2) (3,2); (0,1) lies on no
    # chord below the hull, (1,2) is a vertex, (2,2) is on the segment (1,2)-(3,2) and goes
    assert onerun.roc_hull(g, c, 3, 2).tolist() == [0, 1, 2, 4]


def test_gaussian_blow_up_inverse_is_the_closed_form():
    for eps, delta in [(0.5, 1e-5), (2.0, 1e-3), (6.0, 1e-6)]:
        mu = onerun.gaussian_mu(eps, delta)
        # mu-GDP is exactly (eps, delta)-DP on its privacy profile (Dong, Roth & Su, Corollary 2.13)
        assert norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2) == pytest.approx(delta, rel=1e-6)
        y = np.array([1e-6, 1e-3, 0.2, 0.9])
        assert onerun.gaussian_blow_up_inverse(mu)(y) == pytest.approx(norm.cdf(norm.ppf(y) - mu), rel=1e-12)


def test_fdp_bound_on_an_exact_gaussian_mechanism_is_sound_and_tighter_than_steinke():
    """Scores mu * included + N(0, 1) come from a mechanism that is exactly mu-GDP for each canary's inclusion,
    so its true epsilon at delta is known. At 95% confidence the f-DP bound may exceed it in at most ~5% of
    runs; it must also beat Steinke et al.'s bound on average (their analysis ignores the Gaussian shape)."""
    mu, delta, m, reps, confidence = 2.0, 1e-5, 500, 40, 0.95
    true_eps = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - np.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 50)
    fdp, steinke = [], []
    for seed in range(reps):
        scores, included = _scores(m, mu, 100 + seed)
        for out, method in ((fdp, onerun.FDP), (steinke, onerun.STEINKE)):
            out.append(onerun.one_run_epsilon(scores, included, delta=delta, confidence=confidence, method=method,
                                              top_k=[235, 125, 62, 31, 15])["estimate"])
    fdp, steinke = np.array(fdp), np.array(steinke)
    assert (fdp > true_eps).sum() <= binom.ppf(0.999, reps, 1 - confidence)
    assert fdp.mean() > steinke.mean() > 0
    assert fdp.mean() > 0.3 * true_eps   # and it says something


def test_caps_grow_with_the_canaries_and_bound_every_result():
    caps = [onerun.one_run_cap(m, delta=1e-5, confidence=0.99)["estimate"] for m in (100, 1000)]
    assert 0 < caps[0] < caps[1]
    scores, included = _scores(100, 50.0, 9)   # a perfect attack
    assert onerun.one_run_epsilon(scores, included, delta=1e-5, confidence=0.99, top_k=int(included.sum()))[
        "estimate"] == pytest.approx(onerun.one_run_epsilon(np.where(included, 1.0, 0.0), included, delta=1e-5,
                                                            confidence=0.99, top_k=int(included.sum()))["estimate"])


def test_soundness_uses_the_infimum_over_larger_epsilons_and_agrees_with_the_bound():
    cases = [(60, 55, 1e-4, 300), (200, 150, 1e-5, 1000), (40, 40, 1e-3, 100), (120, 80, 0.0, 500)]
    for r, v, delta, m in cases:
        bound = one_run_lower_bound(r, v, delta=delta, m=m, confidence=0.99)
        for eps in (0.0, 0.5 * bound, bound - 1e-3, bound + 1e-3, bound + 0.5):
            if eps < 0:
                continue
            p = p_value_at_least(r, v, eps, delta, m)
            assert p <= one_run_p_value(r, v, eps, delta, m) + 1e-15
            grid = np.linspace(eps, eps + 5, 200)
            assert p <= min(one_run_p_value(r, v, e, delta, m) for e in grid) + 1e-12
            assert soundness(eps, r, v, delta, m, confidence=0.99)["violated"] == (eps < bound), (r, v, delta, m, eps)
    # with delta = 0 the p-value grows with epsilon: the infimum is the p-value at epsilon itself
    assert p_value_at_least(50, 45, 1.0) == one_run_p_value(50, 45, 1.0)


def test_input_space_canaries_report_the_fdp_bound_beside_steinkes():
    """The audit engine's canary block (``engine._empirical``, what ``privacy.empirical_epsilon`` holds)."""
    import pandas as pd

    from privaudit.audit.engine import _empirical
    from privaudit.config import default_delta

    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    loss = np.where(included, 0.5, 1.0) + rng.normal(0, 0.3, 400)
    canaries = pd.DataFrame({"included": included.astype(int), "loss": loss})
    dp_run = {"dp": True, "epsilon": 0.5, "delta": 1e-5, "accountant": "prv", "noise_multiplier": 5.0,
              "sample_rate": 0.01, "steps": 10, "max_grad_norm": 1.0, "poisson_sampling": True, "n_train": 2000}
    for run, delta in ((dp_run, 1e-5), ({"dp": False, "n_train": 2000}, default_delta(2000))):
        block, warnings = {}, []
        _empirical(block, canaries, run, "m", warnings, seed=0)
        e = block["empirical_epsilon"]
        assert e["method"] == onerun.STEINKE and e["fdp"]["method"] == onerun.FDP
        expected = onerun.one_run_epsilon(-loss, included, delta=delta, confidence=0.95, method=onerun.FDP,
                                          thresholds="all")
        assert e["fdp"]["estimate"] == pytest.approx(expected["estimate"]) and e["fdp"]["delta"] == delta
        assert e["fdp"]["estimate"] > 0.5   # this attack separates the canaries well
    assert block.get("soundness") is None   # no epsilon claimed, nothing to check
    # what the audit writes still meets the shipped audit.json schema
    import jsonschema

    from privaudit._fs import to_jsonable
    from privaudit.audit.results import load_schema

    def find(node):
        if isinstance(node, dict):
            if "empirical_epsilon" in node.get("properties", {}):
                return node["properties"]["empirical_epsilon"]
            for v in node.values():
                hit = find(v)
                if hit is not None:
                    return hit
        return None

    schema = load_schema()
    sub = {**find(schema), "$defs": schema["$defs"]}   # the sub-schema with the definitions it refers to
    jsonschema.validate(to_jsonable(block["empirical_epsilon"]), sub)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**to_jsonable(block["empirical_epsilon"]), "fdp": {"estimate": 1.0}}, sub)
    block = {}
    _empirical(block, canaries, dp_run, "m", [], seed=0)
    assert block["soundness"]["violated"] and "infimum" in block["soundness"]["p_value_over"]
    block = {}
    _empirical(block, canaries, {"dp": False}, "m", [], seed=0)   # no N known: no delta for the f-DP bound
    assert block["empirical_epsilon"]["fdp"] is None
