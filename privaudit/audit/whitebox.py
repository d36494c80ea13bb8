"""White-box one-run audit of DP-SGD with gradient canaries: the scores, the verdict, and the ideal mechanism.

A gradient canary (Nasr et al. 2023, "Tight Auditing of Differentially Private Machine Learning"; Steinke,
Nasr & Jagielski 2023, white-box setting) is a training unit whose per-sample gradient is replaced by a vector
of norm much larger than the clipping norm C in a fixed direction u. A correct DP-SGD step clips it to C u,
adds N(0, (sigma C)^2) noise to the sum, and the auditor, who sees the noised sum G_t of every step, projects
it on u: x_t = <G_t, u> / C (in units of C). When the canary was not sampled x_t ~ N(0, sigma^2) (up to the
small projections of the other units' gradients), when it was, N(1, sigma^2). Each canary is included in the
training set with probability 1/2 and then sampled at each step with probability q, so the likelihood ratio of
"included" against "excluded" given x_t is (1 - q) + q exp((x_t - 1/2) / sigma^2), and the canary's score is
the sum over steps of its logarithm (``step_llr``): the Neyman-Pearson statistic for the accounted mechanism.

The score is turned into an empirical epsilon with ``onerun`` (both analyses), with the number of guesses
fixed in advance to a short geometric list (``top_k_grid``) with a Bonferroni correction over it: a valid
test whatever the scores, and nearly as strong as searching every threshold with JAX-Privacy's correction.

The *ideal* mechanism is what a perfect implementation would show: the same canaries, steps, q and sigma, each
x_t drawn exactly as above with nothing else in the gradient (``simulate_scores``). Its bounds tell how close
the real harness came to what the statistic can reach (``ideal_bounds``); its faulty variants (less noise, a
higher sample rate, no clipping) tell which faults an audit of this size can detect.

numpy and scipy only; no torch or tensorflow.
"""

from __future__ import annotations

import numpy as np

from privaudit.audit import onerun

VIOLATION = "violation"
NO_VIOLATION = "no violation detected"
TOP_FRACTION = 0.47   # the largest number of guesses, as a share of the canaries: below the ~1/2 included
MIN_GUESSES = 5


def top_k_grid(m: int) -> list[int]:
    """The numbers of guesses tried, fixed before the run: 0.47 m (just under the expected number of included
    canaries, m/2, so that a perfect attack can get them all right), then m/4, m/8, ... down to 5."""
    ks = {max(1, int(TOP_FRACTION * m))}
    j = 2
    while m // 2**j >= MIN_GUESSES:
        ks.add(m // 2**j)
        j += 1
    return sorted(ks, reverse=True)


def step_llr(x, *, q: float, sigma: float) -> np.ndarray:
    """log((1 - q) + q exp((x - 1/2) / sigma^2)) for projections ``x`` in units of C: the log-likelihood ratio
    of one step's projection under "included" (sampled with probability q) against "excluded"."""
    x = np.asarray(x, dtype=float)
    return np.logaddexp(np.log1p(-q), np.log(q) + (x - 0.5) / sigma**2)


def canary_scores(projections, *, q: float, sigma: float) -> np.ndarray:
    """Each canary's score: the sum over steps of ``step_llr`` of its projections ((steps, m) array)."""
    proj = np.asarray(projections, dtype=float)
    if proj.ndim != 2:
        raise ValueError(f"projections must be a (steps, canaries) array, got shape {proj.shape}")
    out = np.zeros(proj.shape[1])
    for row in proj:
        out += step_llr(row, q=q, sigma=sigma)
    return out


def simulate_scores(m: int, *, sigma: float, q: float, steps: int, seed: int = 0, noise_scale: float = 1.0,
                    rate_scale: float = 1.0, clip_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the ideal mechanism: ``(scores, included)`` for m canaries over ``steps`` steps.

    Scoring always uses the accounted ``q`` and ``sigma``; the mechanism itself can be faulty: noise
    ``noise_scale * sigma``, sample rate ``rate_scale * q``, and a sampled canary contributing ``clip_scale``
    (in units of C: 1 when clipped, the canary's full norm when clipping is skipped).
    """
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    scores = np.zeros(m)
    q_true = min(1.0, q * rate_scale)
    for _ in range(steps):
        x = included * (rng.random(m) < q_true) * clip_scale + noise_scale * sigma * rng.standard_normal(m)
        scores += step_llr(x, q=q, sigma=sigma)
    return scores, included


def bounds(scores, included, *, delta: float, confidence: float = 0.99) -> dict:
    """Both one-run bounds of the scores on the ``top_k_grid``, and each one's cap: the bound had every guess
    been right (at the best number of guesses of the grid not above the number of included canaries)."""
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included).astype(bool)
    m, n_in = len(scores), int(included.sum())
    ks = top_k_grid(m)
    out = {}
    for key, method in (("fdp", onerun.FDP), ("steinke", onerun.STEINKE)):
        res = onerun.one_run_epsilon(scores, included, delta=delta, confidence=confidence, method=method, top_k=ks)
        feasible = np.array([k for k in ks if k <= n_in], dtype=np.int64)
        if len(feasible):
            best = onerun._fdp_best if method == onerun.FDP else onerun._steinke_best
            res["cap"] = float(best(m, feasible, feasible, res["significance"], delta)[0])
        else:
            res["cap"] = 0.0
        res["top_k"] = ks
        out[key] = res
    return out


def verdict(empirical: float, eps_accountant: float) -> str:
    """"violation" when the empirical epsilon exceeds the accountant's, else "no violation detected"."""
    return VIOLATION if empirical > eps_accountant else NO_VIOLATION


def ideal_bounds(m: int, *, sigma: float, q: float, steps: int, delta: float, eps_accountant: float | None = None,
                 confidence: float = 0.99, reps: int = 20, seed: int = 0, **fault) -> dict:
    """Bounds of ``reps`` simulated runs of the ideal mechanism (``fault``: ``simulate_scores``' scales).

    Returns, per analysis, the median and the 5% and 95% quantiles of the bound over the repetitions and, given
    the accountant's epsilon, the share of runs in which the bound exceeds it (the detection rate; for the
    correct mechanism the false-alarm rate, which the confidence level caps at 1 - confidence).
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    seeds = np.random.default_rng(seed).integers(0, 2**32, size=reps)
    runs = {"fdp": [], "steinke": []}
    for s in seeds:
        scores, included = simulate_scores(m, sigma=sigma, q=q, steps=steps, seed=int(s), **fault)
        b = bounds(scores, included, delta=delta, confidence=confidence)
        for key in runs:
            runs[key].append(b[key]["estimate"])
    out = {"m": m, "sigma": sigma, "q": q, "steps": steps, "delta": delta, "confidence": confidence,
           "reps": reps, "seed": seed, "fault": {k: float(v) for k, v in fault.items()}}
    for key, vals in runs.items():
        v = np.asarray(vals)
        out[key] = {"median": float(np.median(v)), "q05": float(np.quantile(v, 0.05)),
                    "q95": float(np.quantile(v, 0.95)), "mean": float(v.mean()),
                    "detection_rate": None if eps_accountant is None else float((v > eps_accountant).mean())}
    return out
