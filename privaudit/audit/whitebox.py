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

Two checks of the mechanism against its accounted parameters come with it (``noise_check``,
``sampling_check``): the excluded canaries' projections are the noise along their directions, so their spread
tests "at least the accounted noise"; the included canaries' mean projection tests "sampled at most at the
accounted rate, and clipped". A one-run epsilon bound needs about 10^5 canaries to see a sample rate twice the
accounted one (it doubles the Gaussian-DP mu); these checks see it with 10^3. The verdict fires on any of the
three (``evaluate``).

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


def simulate_projections(m: int, *, sigma: float, q: float, steps: int, seed: int = 0, noise_scale: float = 1.0,
                         rate_scale: float = 1.0, clip_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Projections of the ideal mechanism: ``(projections (steps, m), included)``, in units of C.

    The mechanism can be made faulty: noise ``noise_scale * sigma``, sample rate ``rate_scale * q``, and a
    sampled canary contributing ``clip_scale`` (1 when clipped; the canary's full norm when clipping is skipped).
    """
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    q_true = min(1.0, q * rate_scale)
    proj = np.empty((steps, m))
    for t in range(steps):
        proj[t] = included * (rng.random(m) < q_true) * clip_scale + noise_scale * sigma * rng.standard_normal(m)
    return proj, included


def simulate_scores(m: int, *, sigma: float, q: float, steps: int, seed: int = 0, **fault) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the ideal mechanism (``simulate_projections``), always scored with the accounted q and sigma."""
    proj, included = simulate_projections(m, sigma=sigma, q=q, steps=steps, seed=seed, **fault)
    return canary_scores(proj, q=q, sigma=sigma), included


def noise_check(projections, included, *, sigma: float, level: float) -> dict:
    """Does every step add at least the accounted noise? A one-sided chi-square test on the excluded canaries.

    An excluded canary's projection is the noise's component along its direction, N(0, sigma^2) independently
    across canaries (orthogonal directions) and steps, plus the other units' gradients projected on it, which
    only add to its spread. So S = sum x^2 / sigma^2 over the n projections is at least chi-square(n) under the
    accounted noise; ``p_value`` = P[chi2(n) <= S], and ``violated`` when it is below ``level``.
    ``std_ratio`` = sqrt(S / n) estimates (observed noise) / (accounted noise).
    """
    from scipy.stats import chi2

    x = np.asarray(projections, dtype=float)[:, ~np.asarray(included, dtype=bool)]
    n = x.size
    if n == 0:
        return {"violated": False, "p_value": None, "std_ratio": None, "n": 0, "level": level}
    stat = float((x**2).sum() / sigma**2)
    p = float(chi2.cdf(stat, n))
    return {"violated": bool(p < level), "p_value": p, "std_ratio": float(np.sqrt(stat / n)), "n": int(n),
            "level": level}


def sampling_check(projections, included, *, q: float, level: float) -> dict:
    """Are the canaries sampled at most at the accounted rate, and clipped? A one-sided test on the signal.

    A clipped canary sampled at a step adds C along its direction (1 in units of C), so an included canary's mean
    projection over the steps is q + noise + the other units' share, an excluded one's noise + that share. The
    difference of the two groups' means (one value per canary: canaries are independent) estimates q_true times
    the clipped contribution; ``z`` = (difference - q) / its standard error, ``p_value`` = P[N(0, 1) >= z],
    ``violated`` when below ``level``. ``rate_ratio`` = difference / q: about 1 for a correct pipeline, 2 for a
    sampler drawing at twice the rate, about 100 q_true / q when clipping is skipped (canary norm 100 C).
    """
    from scipy.stats import norm

    x = np.asarray(projections, dtype=float)
    inc = np.asarray(included, dtype=bool)
    a, b = x[:, inc].mean(axis=0), x[:, ~inc].mean(axis=0)
    if len(a) < 2 or len(b) < 2:
        return {"violated": False, "p_value": None, "rate_ratio": None, "z": None, "level": level}
    diff = float(a.mean() - b.mean())
    se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    z = (diff - q) / se
    p = float(norm.sf(z))
    return {"violated": bool(p < level), "p_value": p, "rate_ratio": diff / q, "z": float(z), "level": level}


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


CHECK_SHARE = 0.1   # each mechanism check runs at this share of the significance (1 - confidence)


def evaluate(projections, included, *, sigma: float, q: float, delta: float, eps_accountant: float,
             confidence: float = 0.99) -> dict:
    """Everything a white-box run concludes from its projections ((steps, m), in units of C).

    ``tests``: the epsilon test (the f-DP empirical epsilon at ``confidence`` exceeds the accountant's), and two
    checks of the mechanism against its accounted parameters, each at level (1 - confidence) * CHECK_SHARE:
    ``noise_check`` and ``sampling_check``. ``verdict``: "violation" when any test fires, so a correct pipeline is
    called a violation with probability at most (1 - confidence) * (1 + 2 * CHECK_SHARE).
    """
    proj = np.asarray(projections, dtype=float)
    included = np.asarray(included, dtype=bool)
    scores = canary_scores(proj, q=q, sigma=sigma)
    found = bounds(scores, included, delta=delta, confidence=confidence)
    level = (1 - confidence) * CHECK_SHARE
    tests = {"epsilon": {"violated": bool(found["fdp"]["estimate"] > eps_accountant),
                         "empirical": found["fdp"]["estimate"], "accountant": eps_accountant,
                         "confidence": confidence},
             "noise": noise_check(proj, included, sigma=sigma, level=level),
             "sampling": sampling_check(proj, included, q=q, level=level)}
    fired = [k for k, t in tests.items() if t["violated"]]
    return {"verdict": VIOLATION if fired else NO_VIOLATION, "fired": fired, "tests": tests,
            "empirical_epsilon": found, "scores": scores}


def ideal_bounds(m: int, *, sigma: float, q: float, steps: int, delta: float, eps_accountant: float | None = None,
                 confidence: float = 0.99, reps: int = 20, seed: int = 0, **fault) -> dict:
    """``reps`` simulated runs of the ideal mechanism (``fault``: ``simulate_projections``' scales).

    Per analysis, the median and the 5% and 95% quantiles of the bound over the runs; given the accountant's
    epsilon, the share of runs in which the bound exceeds it (``detection_rate``) and, for each test of
    ``evaluate`` and its verdict, the share of runs in which it fires (for the correct mechanism: false alarms).
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    seeds = np.random.default_rng(seed).integers(0, 2**32, size=reps)
    runs = {"fdp": [], "steinke": []}
    fired = {"epsilon": 0, "noise": 0, "sampling": 0, "verdict": 0}
    for s in seeds:
        proj, included = simulate_projections(m, sigma=sigma, q=q, steps=steps, seed=int(s), **fault)
        if eps_accountant is None:
            b = bounds(canary_scores(proj, q=q, sigma=sigma), included, delta=delta, confidence=confidence)
        else:
            res = evaluate(proj, included, sigma=sigma, q=q, delta=delta, eps_accountant=eps_accountant,
                           confidence=confidence)
            b = res["empirical_epsilon"]
            for k in res["fired"]:
                fired[k] += 1
            fired["verdict"] += res["verdict"] == VIOLATION
        for key in runs:
            runs[key].append(b[key]["estimate"])
    out = {"m": m, "sigma": sigma, "q": q, "steps": steps, "delta": delta, "confidence": confidence,
           "reps": reps, "seed": seed, "fault": {k: float(v) for k, v in fault.items()}}
    for key, vals in runs.items():
        v = np.asarray(vals)
        out[key] = {"median": float(np.median(v)), "q05": float(np.quantile(v, 0.05)),
                    "q95": float(np.quantile(v, 0.95)), "mean": float(v.mean()),
                    "detection_rate": None if eps_accountant is None else float((v > eps_accountant).mean()),
                    "runs": [float(x) for x in v]}
    out["firing_rate"] = None if eps_accountant is None else {k: n / reps for k, n in fired.items()}
    return out
