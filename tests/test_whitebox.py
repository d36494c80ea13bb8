"""The white-box statistic, checks and ideal mechanism (privaudit.audit.whitebox), against closed forms and
simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, norm

from privaudit.audit import whitebox


def test_step_statistic_is_the_likelihood_ratio_of_the_accounted_mechanism():
    q, sigma = 0.03, 0.8
    x = np.linspace(-3, 4, 15)
    included = (1 - q) * norm.pdf(x, 0, sigma) + q * norm.pdf(x, 1, sigma)
    excluded = norm.pdf(x, 0, sigma)
    assert whitebox.step_llr(x, q=q, sigma=sigma) == pytest.approx(np.log(included / excluded), rel=1e-12)
    proj = np.vstack([x, -x, 2 * x])
    assert whitebox.canary_scores(proj, q=q, sigma=sigma) == pytest.approx(
        sum(whitebox.step_llr(row, q=q, sigma=sigma) for row in proj))


def test_the_number_of_guesses_is_fixed_in_advance():
    assert whitebox.top_k_grid(1000) == [470, 250, 125, 62, 31, 15, 7]
    assert whitebox.top_k_grid(10000)[0] == 4700 and min(whitebox.top_k_grid(10000)) >= whitebox.MIN_GUESSES


def test_checks_hold_their_level_on_the_correct_mechanism_and_see_the_faults():
    sigma, q, steps, m, level, reps = 1.0, 0.05, 30, 400, 0.05, 200
    false_noise = false_rate = 0
    for seed in range(reps):
        proj, inc = whitebox.simulate_projections(m, sigma=sigma, q=q, steps=steps, seed=seed)
        false_noise += whitebox.noise_check(proj, inc, sigma=sigma, level=level)["violated"]
        false_rate += whitebox.sampling_check(proj, inc, q=q, level=level)["violated"]
    limit = binom.ppf(0.999, reps, level)
    assert false_noise <= limit and false_rate <= limit
    proj, inc = whitebox.simulate_projections(m, sigma=sigma, q=q, steps=steps, seed=1, noise_scale=0.9)
    noise = whitebox.noise_check(proj, inc, sigma=sigma, level=1e-3)
    assert noise["violated"] and noise["std_ratio"] == pytest.approx(0.9, abs=0.01)
    proj, inc = whitebox.simulate_projections(m, sigma=sigma, q=q, steps=steps, seed=1, rate_scale=3.0)
    rate = whitebox.sampling_check(proj, inc, q=q, level=1e-3)
    assert rate["violated"] and rate["rate_ratio"] == pytest.approx(3.0, abs=0.6)
    # extra spread from other units' gradients never makes the noise check fire
    proj, inc = whitebox.simulate_projections(m, sigma=sigma, q=q, steps=steps, seed=2)
    proj = proj + 0.3 * np.random.default_rng(0).standard_normal(proj.shape)
    assert not whitebox.noise_check(proj, inc, sigma=sigma, level=0.05)["violated"]


def test_evaluate_and_the_ideal_mechanism():
    sigma, q, steps, m, delta = 0.8, 0.05, 40, 1000, 1e-4
    ok = whitebox.ideal_bounds(m, sigma=sigma, q=q, steps=steps, delta=delta, eps_accountant=2.0, reps=3, seed=0)
    assert ok["firing_rate"]["verdict"] == 0.0 and ok["fdp"]["median"] < 2.0
    bad = whitebox.ideal_bounds(m, sigma=sigma, q=q, steps=steps, delta=delta, eps_accountant=2.0, reps=3, seed=0,
                                clip_scale=100.0)
    # unclipped canaries are found perfectly: the bound reaches the cap of the grid and breaks epsilon 2
    assert bad["firing_rate"]["epsilon"] == 1.0 and bad["fdp"]["median"] > 4
    proj, inc = whitebox.simulate_projections(m, sigma=sigma, q=q, steps=steps, seed=5, noise_scale=0.5)
    res = whitebox.evaluate(proj, inc, sigma=sigma, q=q, delta=delta, eps_accountant=2.0)
    assert res["verdict"] == whitebox.VIOLATION and "noise" in res["fired"]
    assert res["empirical_epsilon"]["fdp"]["estimate"] >= res["empirical_epsilon"]["steinke"]["estimate"]
