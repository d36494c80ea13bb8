"""One-run empirical epsilon from canary scores: Steinke et al.'s bound and the f-DP bound, side by side.

Setting (both papers): m canaries, each included in the training run independently with probability 1/2. An
attack scores every canary (higher = "was included") and guesses "in" for those scoring at least a threshold,
abstaining on the rest (one-sided: no "out" guesses, k- = 0). With ``n_guess`` guesses of which ``n_correct``
are right, each analysis rejects the claim "the run is (eps, delta)-DP" at a significance level when so many
right guesses would be too unlikely; the empirical epsilon is the largest eps so rejected.

* Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
  arXiv:2305.08846), Theorem 3.1: every guess is at best an eps-DP randomised response, so the right guesses
  are dominated by Binomial(n_guess, e^eps / (1 + e^eps)), plus a delta term (``empirical.one_run_p_value``).
* Mahloujifar, Melis & Chaudhuri (2024), "Auditing f-Differential Privacy in One Run" (ICML 2025,
  arXiv:2410.22235): the test uses the whole trade-off curve f of the claimed mechanism rather than its
  (eps, delta) point. Their Algorithm 3 walks down from c right guesses, bounding by recursion the
  probability mass that c, c-1, ..., 0 right guesses must carry if P[>= c right] were at least the
  significance level; the claim is rejected when that mass exceeds what ``n_guess`` guesses among m canaries
  can hold. As in the paper's experiments and JAX-Privacy, the claimed curve is the Gaussian one: "(eps,
  delta)" stands for mu-GDP with mu = 1 / sigma, sigma the Gaussian mechanism's noise for (eps, delta)
  (``dp_accounting.get_sigma_gaussian``). This suits DP-SGD, whose trade-off curve is close to Gaussian
  (the central limit theorem of Dong, Roth & Su); it is a stronger claim than (eps, delta)-DP alone, and that
  is why the bound is tighter.

Choosing the threshold: a fixed ``threshold`` (or a fixed number of guesses, ``top_k``) is one test at the
stated significance. Searching every threshold for the best bound tests many hypotheses, so the significance is
divided among them (Bonferroni): ``thresholds="all"`` divides by m + 1 (one test per possible number of
guesses: valid whatever the data); ``thresholds="hull"`` searches only the vertices of the empirical ROC curve's
concave hull and divides by their number, which is what JAX-Privacy 2.0's ``Bonferroni`` strategy does (a
data-dependent number of tests, so not a strict union bound; kept to compare with JAX-Privacy).

JAX-Privacy (``jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run`` / ``epsilon_one_run_fdp``) is an
independent implementation of both bounds; the tests check that these functions give the same numbers.
Plain numpy/scipy and dp_accounting; no torch or tensorflow.
"""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit, ndtr, ndtri
from scipy.stats import binom

from privaudit.audit.empirical import EPS_MAX, ONE_RUN_METHOD, one_run_lower_bound

STEINKE = ONE_RUN_METHOD                  # "steinke2023-one-run"
FDP = "mahloujifar2024-fdp-one-run"
METHODS = (STEINKE, FDP)
THRESHOLD_SEARCHES = ("all", "hull")
XTOL = 1e-9


# --------------------------------------------------------------------------------------------------------------
# counts


def _check_scores(scores, included) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included).astype(bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(f"scores and included must be 1-D of one length, got {scores.shape} and {included.shape}")
    if len(scores) == 0 or not np.isfinite(scores).all():
        raise ValueError("scores must be finite, and there must be at least one canary")
    return scores, included


def guess_counts(scores, included) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, n_guess, n_correct)`` for every threshold that changes the guesses.

    Thresholds are the distinct scores in increasing order, then +inf (no guess); guessing "in" for the
    canaries scoring at least the threshold gives ``n_guess`` guesses, ``n_correct`` of them included.
    """
    scores, included = _check_scores(scores, included)
    thresholds = np.r_[np.unique(scores), np.inf]
    n_guess = len(scores) - np.searchsorted(np.sort(scores), thresholds, side="left")
    n_correct = included.sum() - np.searchsorted(np.sort(scores[included]), thresholds, side="left")
    return thresholds, n_guess.astype(np.int64), n_correct.astype(np.int64)


def roc_hull(n_guess, n_correct, n_in: int, n_out: int) -> np.ndarray:
    """Indices of the thresholds at the strict vertices of the empirical ROC curve's concave hull.

    The curve is traced by (missed included canaries, rejected excluded ones) as the threshold rises, both
    counts non-decreasing; a point on or below the segment joining its neighbours on the hull is dropped, so
    collinear points go too. Both ends (every canary guessed, none guessed) are always kept.
    """
    fn = n_in - np.asarray(n_correct)
    tn = n_out - (np.asarray(n_guess) - np.asarray(n_correct))
    hull: list[int] = []
    for i in range(len(fn)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # cross product of (b - a) and (i - b) in the (fn, tn) plane; <= 0: b is not a strict vertex
            if (tn[b] - tn[a]) * (fn[i] - fn[b]) - (tn[i] - tn[b]) * (fn[b] - fn[a]) <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return np.asarray(hull, dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------
# one test: (m, n_guess, n_correct) at a significance level


def steinke_epsilon(m: int, n_guess: int, n_correct: int, *, significance: float, delta: float) -> float:
    """Steinke et al.'s bound for one test: the largest eps at which ``n_correct`` right guesses out of
    ``n_guess`` (m canaries) reject (eps, delta)-DP at ``significance``; 0 if none (``one_run_lower_bound``)."""
    if n_guess == 0:
        return 0.0
    return one_run_lower_bound(int(n_guess), int(n_correct), delta=delta, m=int(m), confidence=1 - significance)


@functools.lru_cache(maxsize=4096)
def gaussian_mu(eps: float, delta: float) -> float:
    """mu of the Gaussian trade-off curve through (eps, delta): 1 / sigma of the Gaussian mechanism with
    sensitivity 1 that is exactly (eps, delta)-DP (dp_accounting); inf when any sigma will do (delta = 1)."""
    import dp_accounting

    sigma = float(dp_accounting.get_sigma_gaussian(float(eps), float(delta)))
    return np.inf if sigma == 0 else 1.0 / sigma


def gaussian_blow_up_inverse(mu: float):
    """y -> the least probability x that an event can have under one neighbour when it has probability y
    under the other, for mu-GDP: Phi(Phi^-1(y) - mu), i.e. 1 - G_mu(1 - y) with G_mu the trade-off curve."""
    if np.isinf(mu):
        return lambda y: np.where(np.asarray(y) >= 1.0, 1.0, 0.0)
    return lambda y: ndtr(ndtri(y) - mu)


def fdp_margin(m: int, n_guess, n_correct, *, significance: float, blow_up_inverse) -> np.ndarray:
    """Mahloujifar et al.'s Algorithm 3, vectorised over tests: > 0 where the f-DP claim is rejected.

    Suppose P[at least c right guesses] >= tau (tau the significance). Start from r = tau c / m and
    h = tau (c' - c) / m (c' guesses), the mass that right and wrong guesses must then carry, and for
    i = c - 1, ..., 0 let h <- max(h, f_inv(r)) (what a trade-off curve f forces the wrong guesses to hold
    given the right ones) and r <- min(1, r + i / (c' - i) * (increase of h)). The claim is rejected when the
    final r + h exceeds c' / m, the share of the canaries guessed at all. Returns ``r + h - c' / m`` per test.
    """
    g = np.atleast_1d(np.asarray(n_guess, dtype=np.int64))
    c = np.atleast_1d(np.asarray(n_correct, dtype=np.int64))
    r = significance * c / m
    h = significance * (g - c) / m
    # Once h stops growing, neither h nor r changes again: such a test is done ("frozen").
    frozen = c <= 0
    i = int(c.max()) - 1 if c.size else -1
    while i >= 0:
        act = (c > i) & ~frozen
        if not act.any():
            waiting = ~frozen & (c <= i)
            if not waiting.any():
                break
            i = int(c[waiting].max()) - 1   # jump to where the next test starts
            continue
        ra, ha, ga = r[act], h[act], g[act]
        h_new = np.maximum(ha, blow_up_inverse(ra))
        r[act] = np.minimum(ra + (i / (ga - i)) * (h_new - ha), 1.0)
        h[act] = h_new
        frozen[np.flatnonzero(act)[h_new == ha]] = True
        i -= 1
    return r + h - g / m


_NORMAL = NormalDist()
_SQRT_HALF = math.sqrt(0.5)
FEW_TESTS = 16   # up to this many tests the recursion runs on Python floats, one test after the other


def _fdp_margin_scalar(m: int, g: int, c: int, significance: float, mu: float) -> float:
    """``fdp_margin`` for one test and Gaussian curves, on Python floats (far faster for a few long recursions)."""
    r = significance * c / m
    h = significance * (g - c) / m
    for i in range(c - 1, -1, -1):
        if r <= 0.0:
            f = 0.0
        elif r >= 1.0:
            f = 1.0
        elif math.isinf(mu):
            f = 0.0
        else:
            f = 0.5 * math.erfc(-(_NORMAL.inv_cdf(r) - mu) * _SQRT_HALF)   # Phi(Phi^-1(r) - mu)
        if f <= h:
            break   # h stops growing: nothing changes any more
        r = min(r + (i / (g - i)) * (f - h), 1.0)
        h = f
    return r + h - g / m


def fdp_epsilon(m: int, n_guess, n_correct, *, significance: float, delta: float) -> float:
    """The f-DP bound (Gaussian trade-off curves) for one test, or the best of several at one significance:
    the largest eps whose mu(eps, delta)-GDP claim is rejected by some (n_guess, n_correct); 0 if none."""
    g = np.atleast_1d(np.asarray(n_guess, dtype=np.int64))
    c = np.atleast_1d(np.asarray(n_correct, dtype=np.int64))
    keep = c > 0
    g, c = g[keep], c[keep]
    if len(g) == 0:
        return 0.0

    def margin(eps: float) -> float:
        mu = gaussian_mu(eps, delta)
        if len(g) <= FEW_TESTS:
            return max(_fdp_margin_scalar(m, int(a), int(b), significance, mu) for a, b in zip(g, c))
        return float(fdp_margin(m, g, c, significance=significance, blow_up_inverse=gaussian_blow_up_inverse(mu)).max())

    if margin(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while margin(hi) > 0:
        lo, hi = hi, hi * 2
        if hi > 1024:   # never reached in practice: with mu = inf nothing is rejected
            return float(hi)
    return float(brentq(margin, lo, hi, xtol=XTOL))


# --------------------------------------------------------------------------------------------------------------
# from scores


def _pure_bounds(g: np.ndarray, c: np.ndarray, significance: float) -> np.ndarray:
    """The delta = 0 Steinke bound of each test, by bisection on all tests at once (upper limits of the
    delta > 0 bounds, as the delta term only adds to the p-value); 0 where even eps = 0 is not rejected."""
    def p(eps):
        return binom.sf(c - 1, g, expit(eps))

    lo, hi = np.zeros(len(g)), np.full(len(g), EPS_MAX)
    ok = p(lo) < significance
    for _ in range(60):
        mid = (lo + hi) / 2
        below = p(mid) < significance
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(ok, lo, 0.0)


def _steinke_best(m: int, g: np.ndarray, c: np.ndarray, significance: float, delta: float) -> tuple[float, int]:
    """The largest Steinke bound over several tests, and the index of the test that gives it (-1 if none).

    Tests are tried in decreasing order of their delta = 0 bound, an upper limit of the delta > 0 one, until
    that limit cannot beat the best so far. A test whose p-value stays at or above the level on the whole grid
    that ``one_run_lower_bound`` scans, even with only two of the terms the delta correction maximises over
    (2 m delta max(P[B = v - 1], P[B <= v - 1] / v)), gives 0 there and is skipped without the full computation.
    """
    from privaudit.audit.empirical import SCAN_POINTS

    pure = _pure_bounds(g, c, significance)
    order = [int(i) for i in np.argsort(-pure, kind="stable") if pure[i] > 0]
    if delta > 0 and order:
        idx = np.asarray(order)
        grid = np.linspace(0.0, 1.0, SCAN_POINTS)[None, :] * pure[idx][:, None]
        q = expit(grid)
        gi, ci = g[idx][:, None], c[idx][:, None]
        tail = binom.sf(ci - 1, gi, q)
        # two of the terms the delta correction maximises over: i = 1 and i = v
        lower = tail + 2 * m * delta * np.maximum(binom.pmf(ci - 1, gi, q), (1 - tail) / ci)
        order = [i for i, alive in zip(order, (lower < significance).any(axis=1)) if alive]
    best, arg = 0.0, -1
    for i in order:
        if pure[i] <= best:
            break
        eps = steinke_epsilon(m, int(g[i]), int(c[i]), significance=significance, delta=delta)
        if eps > best:
            best, arg = eps, i
    return best, arg


def _fdp_best(m: int, g: np.ndarray, c: np.ndarray, significance: float, delta: float) -> tuple[float, int]:
    """The largest f-DP bound over several tests, and the index of the test that gives it (-1 if none)."""
    eps = fdp_epsilon(m, g, c, significance=significance, delta=delta)
    if eps <= 0:
        return 0.0, -1
    # the test that still rejects just below the bound
    probe = fdp_margin(m, g, c, significance=significance,
                       blow_up_inverse=gaussian_blow_up_inverse(gaussian_mu(max(eps - 1e-6, 0.0), delta)))
    return eps, int(np.argmax(probe))


def one_run_epsilon(scores, included, *, delta: float, confidence: float = 0.95, method: str = FDP,
                    threshold: float | None = None, top_k: int | None = None, thresholds: str = "all") -> dict:
    """One-run empirical epsilon from canary scores (higher = "in"), one-sided.

    ``method``: ``FDP`` (Mahloujifar et al., Gaussian trade-off curves) or ``STEINKE`` (Steinke et al.).
    The guesses are those scoring at least ``threshold`` (one test), or the ``top_k`` highest scores (ties
    included; one test, or for a sequence of k the best of them with a Bonferroni correction over their
    number), or else the best threshold with a Bonferroni correction (``thresholds``: "all" or "hull", see the
    module docstring). ``delta`` must be positive.

    Returns ``estimate`` with what recomputes it: ``m``, ``n_guess``, ``n_correct``, ``threshold`` (the score
    cut used), ``significance`` (the per-test level, after any correction), ``n_tests`` and ``selection``;
    ``fdp_epsilon`` / ``steinke_epsilon`` on (m, n_guess, n_correct, significance, delta) give ``estimate``.
    """
    scores, included = _check_scores(scores, included)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if threshold is not None and top_k is not None:
        raise ValueError("give threshold or top_k, not both")
    m = len(scores)
    alpha = 1.0 - confidence
    if top_k is not None:
        ks = sorted({int(k) for k in np.atleast_1d(top_k)})
        if not ks or ks[0] < 1 or ks[-1] > m:
            raise ValueError(f"top_k must lie in 1..{m}, got {top_k}")
        cuts = np.sort(scores)[::-1][np.asarray(ks) - 1]
        n_tests, selection = len(ks), ("top_k" if len(ks) == 1 else "bonferroni-top-k")
    elif threshold is not None:
        cuts, n_tests, selection = np.array([float(threshold)]), 1, "threshold"
    if top_k is not None or threshold is not None:
        g = (scores[None, :] >= cuts[:, None]).sum(axis=1)
        c = (scores[included][None, :] >= cuts[:, None]).sum(axis=1)
    else:
        if thresholds not in THRESHOLD_SEARCHES:
            raise ValueError(f"thresholds must be one of {', '.join(THRESHOLD_SEARCHES)}, got {thresholds!r}")
        cuts, g, c = guess_counts(scores, included)
        if thresholds == "hull":
            keep = roc_hull(g, c, int(included.sum()), int((~included).sum()))
            cuts, g, c = cuts[keep], g[keep], c[keep]
            n_tests = len(keep)
        else:
            n_tests = m + 1
        selection = f"bonferroni-{thresholds}"
    sig = alpha / n_tests
    best = _fdp_best if method == FDP else _steinke_best
    eps, i = best(m, g, c, sig, delta)
    i = i if i >= 0 else int(np.argmax(c - (g - c)))   # no rejection: report the threshold with most net hits
    return {"estimate": float(eps), "method": method, "confidence": confidence, "delta": delta, "m": m,
            "n_guess": int(g[i]), "n_correct": int(c[i]), "threshold": float(cuts[i]), "significance": sig,
            "n_tests": int(n_tests), "selection": selection, "one_sided": True}


def one_run_cap(m: int, *, delta: float, confidence: float = 0.95, method: str = FDP, n_tests: int = 1) -> dict:
    """The largest bound m canaries can give: every guess right, at the best number of guesses.

    With ``n_tests`` > 1 the significance is divided among that many tests, as the threshold search does
    (``n_tests = m + 1`` for ``thresholds="all"``). Returns ``{"estimate", "n_guess"}``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    k = np.arange(1, m + 1, dtype=np.int64)
    sig = (1.0 - confidence) / n_tests
    best = _fdp_best if method == FDP else _steinke_best
    eps, i = best(m, k, k, sig, delta)
    return {"estimate": float(eps), "n_guess": int(k[i]) if i >= 0 else 0}
