"""Empirical lower bounds on epsilon from membership guesses, and checks of the accountants against each other.

Three tools, all plain numpy/scipy:

* the one-run audit of Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1) Training Run"
  (NeurIPS 2023, arXiv:2305.08846): canaries included independently with probability 1/2 in a single
  training run, and a bound on how many of them an attack can classify correctly under (eps, delta)-DP;
* the repeated-trials bound of Jagielski, Ullman & Oprea (2020), "Auditing Differentially Private Machine
  Learning: How Private is Private SGD?" (NeurIPS 2020): Clopper-Pearson bounds on a threshold attack's TPR
  and FPR over independent trainings, turned into epsilon through the hypothesis-testing view of DP;
* flags for an accountant whose epsilon falls below the tight ones (PRV, PLD), i.e. one that understates the
  privacy loss.

An empirical bound is a lower bound: "the training run is not (eps, delta)-DP for any eps below this, at the
stated confidence". It can expose a broken implementation or accountant (``soundness``), never prove privacy.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import beta, binom

ONE_RUN_METHOD = "steinke2023-one-run"
REPEATED_TRIALS_METHOD = "jagielski2020-repeated-trials"
EPS_MAX = 50.0  # search range of the one-run bound; a bound this large is reported as 50
SCAN_POINTS = 401  # grid on which the delta > 0 p-value is scanned before the last crossing is refined
# (k+, k-) as fractions of the canaries: guess "in" for the top k+, "out" for the bottom k-
GUESS_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_K_GRID = tuple((a, b) for a in GUESS_FRACTIONS for b in GUESS_FRACTIONS if a + b > 0)
TIGHT_ACCOUNTANTS = ("prv", "dp_accounting_pld")
# Largest relative shortfall below the tight reference tolerated before an accountant is flagged, and ("tight")
# the largest relative disagreement tolerated between PRV and PLD.
DEFAULT_TOLERANCE = {"gdp": 0.02, "rdp": 0.01, "dp_accounting_rdp": 0.01, "tight": 0.05}


def _check_counts(r: int, v: int, delta: float, m: int | None) -> None:
    if not 0 <= v <= r:
        raise ValueError(f"need 0 <= v <= r, got r={r}, v={v}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must lie in [0, 1], got {delta}")
    if delta > 0 and m is None:
        raise ValueError("delta > 0 needs m, the number of canaries (guessed or not)")
    if m is not None and m < r:
        raise ValueError(f"need r <= m, got r={r}, m={m}")


def _p_values(r: int, v: int, eps: np.ndarray, delta: float, m: int | None) -> np.ndarray:
    """``one_run_p_value`` at every epsilon of ``eps`` (arguments already checked)."""
    q = expit(eps)  # e^eps / (1 + e^eps)
    p = binom.sf(v - 1, r, q)
    if delta > 0 and v > 0:
        # P[v - i <= B <= v - 1] for i = 1..v, as running sums of the pmf at v-1, v-2, ..., 0
        window = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1)[None, :], r, q[:, None]), axis=1)
        p = p + 2 * m * delta * (window / np.arange(1, v + 1)).max(axis=1)
    return np.minimum(p, 1.0)


def one_run_p_value(r: int, v: int, eps: float, delta: float = 0.0, m: int | None = None) -> float:
    """Upper bound on P[V >= v] for the correct guesses V of a one-run audit of an (eps, delta)-DP run.

    Setting (Steinke, Nasr & Jagielski 2023): m canaries, each included independently with probability 1/2; the
    attack guesses "in" or "out" for r of them (abstaining on the rest) from the trained model, and V counts
    its correct guesses. With q = e^eps / (1 + e^eps) and f(v) = P[Binomial(r, q) >= v], their Theorem 3.1
    (main result, "DP implies guessing is hard") bounds

        P[V >= v] <= f(v) + 2 m delta max_{i = 1..v} (f(v - i) - f(v)) / i,

    which for delta = 0 is the binomial tail f(v): every guess is at best an eps-DP randomized response. This is
    the delta correction the paper proves and its reference code computes (``p_value_DP_audit``); the max term
    is at most 1, so the correction never exceeds 2 m delta. m counts every randomized canary, guessed or not,
    because which canaries are guessed may depend on the model. The result is capped at 1.
    """
    _check_counts(r, v, delta, m)
    return float(_p_values(r, v, np.array([float(eps)]), delta, m)[0])


def one_run_lower_bound(r: int, v: int, *, delta: float = 0.0, m: int | None = None,
                        confidence: float = 0.95) -> float:
    """Empirical epsilon: sup{eps in [0, 50] : one_run_p_value(r, v, eps, delta, m) < 1 - confidence}, else 0.

    A run that is eps-DP is eps'-DP for every eps' >= eps, so P[V >= v] is bounded by the p-value at every
    eps' >= eps; rejecting every eps below the supremum is therefore valid at level 1 - confidence, whether or not
    the p-value is monotone in eps. With delta = 0 it is strictly increasing (for 1 <= v <= r) and the bound is
    the root of p(eps) = 1 - confidence, found with ``brentq``. The delta term can be non-monotone in eps, so for
    delta > 0 the p-value is scanned on a grid over [0, eps_0], where eps_0 is the delta = 0 bound (an upper limit,
    as the delta term only adds), and the last crossing is refined with ``brentq``; a dip below the level that
    falls between grid points is missed, which can only make the bound smaller.
    """
    _check_counts(r, v, delta, m)
    level = 1.0 - confidence
    if not 0 < level < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")

    def pure(eps: float) -> float:
        return float(binom.sf(v - 1, r, expit(eps))) - level

    if pure(0.0) >= 0:
        return 0.0
    eps_pure = EPS_MAX if pure(EPS_MAX) < 0 else brentq(pure, 0.0, EPS_MAX, xtol=1e-12)
    if delta == 0:
        return float(eps_pure)
    grid = np.linspace(0.0, eps_pure, SCAN_POINTS)
    below = np.flatnonzero(_p_values(r, v, grid, delta, m) < level)
    if below.size == 0:
        return 0.0
    i = below[-1]
    if i == len(grid) - 1:
        return float(grid[i])
    return float(brentq(lambda e: one_run_p_value(r, v, e, delta, m) - level, grid[i], grid[i + 1], xtol=1e-12))


def _guess_counts(scores: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Correct guesses among the top k ("in") and among the bottom k ("out"), for k = 0..n.

    Canaries are ranked by descending score; ties keep the (random) order in which the canaries are given.
    """
    inc = included[np.argsort(-scores, kind="stable")]
    return np.r_[0, np.cumsum(inc)], np.r_[0, np.cumsum(~inc[::-1])]


def one_run_audit(scores, included, *, delta: float = 0.0, confidence: float = 0.95,
                  k_grid=None, split: float = 0.5, seed: int = 0) -> dict:
    """One-run empirical epsilon (Steinke, Nasr & Jagielski 2023) with an honest choice of (k+, k-).

    ``scores[i]`` is the attack's score of canary i (higher = "in"), ``included[i]`` whether it was trained on;
    inclusion must have been drawn independently with probability 1/2 before training. The attack guesses "in"
    for the top k+ canaries by score and "out" for the bottom k-.

    Choosing (k+, k-) to maximize the bound on the same canaries that give the bound would test many hypotheses
    and report the luckiest, which overstates epsilon. So the canaries are split at random (``seed``) into a
    selection part (a fraction ``split``) and an evaluation part; (k+, k-) are chosen on the selection part as the
    fractions of ``k_grid`` (pairs (f+, f-) with f+ + f- <= 1; k = floor(f n)) giving the largest bound (ties: the
    smaller delta = 0 p-value at eps = 0), then applied to the evaluation part, whose bound alone is reported.
    The guesses on the evaluation canaries are a function of the model and of the selection canaries' membership
    only, so Theorem 3.1 applies to them, with m the evaluation canaries. The split costs power (half the canaries
    for the bound) but keeps the bound a valid lower bound at ``confidence``.

    Returns ``estimate`` with ``m``, ``r``, ``v``, ``k_plus``, ``k_minus`` of the evaluation part, enough to
    recompute it with ``one_run_lower_bound``.
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if scores.ndim != 1 or scores.shape != included.shape:
        raise ValueError(f"scores and included must be 1-D of one length, got {scores.shape} and {included.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    grid = np.asarray(DEFAULT_K_GRID if k_grid is None else k_grid, dtype=float).reshape(-1, 2)
    if len(grid) == 0 or (grid < 0).any() or (grid.sum(axis=1) > 1).any():
        raise ValueError("k_grid must hold pairs (f+, f-) of non-negative fractions with f+ + f- <= 1")
    order = np.random.default_rng(seed).permutation(len(scores))
    n_sel = int(round(split * len(scores)))
    if not 0 < n_sel < len(scores):
        raise ValueError(f"split={split} leaves no canary for selection or evaluation ({len(scores)} canaries)")
    sel, ev = order[:n_sel], order[n_sel:]

    top, bottom = _guess_counts(scores[sel], included[sel])
    kp, km = np.floor(grid * n_sel).astype(int).T
    rs, vs = kp + km, top[kp] + bottom[km]
    p0 = binom.sf(vs - 1, rs, 0.5)  # the delta = 0 p-value at eps = 0; the bound is 0 unless it is < 1 - confidence
    bounds = [one_run_lower_bound(int(r), int(v), delta=delta, m=n_sel, confidence=confidence) if p < 1 - confidence
              else 0.0 for r, v, p in zip(rs, vs, p0)]
    f_plus, f_minus = grid[np.lexsort((p0, -np.asarray(bounds)))[0]]

    m = len(ev)
    top, bottom = _guess_counts(scores[ev], included[ev])
    kp, km = int(np.floor(f_plus * m)), int(np.floor(f_minus * m))
    r, v = kp + km, int(top[kp] + bottom[km])
    return {"estimate": one_run_lower_bound(r, v, delta=delta, m=m, confidence=confidence),
            "method": ONE_RUN_METHOD, "confidence": confidence, "delta": delta, "m": m, "r": r, "v": v,
            "k_plus": kp, "k_minus": km, "selection": "split-half"}


def unit_losses(losses, owner, n_units: int | None = None) -> np.ndarray:
    """Each unit's loss, the mean of its items' losses: ``owner[i]`` is item i's unit (0 .. n_units - 1).

    The one-run audit in the patient unit scores a canary patient by the mean loss of its images (lower = "in").
    The mean, not the sum, so that a patient's number of images (drawn independently of its inclusion) does not
    move its score; every unit needs at least one item."""
    losses = np.asarray(losses, dtype=float)
    owner = np.asarray(owner, dtype=np.int64)
    if losses.ndim != 1 or losses.shape != owner.shape:
        raise ValueError(f"losses and owner must be 1-D of one length, got {losses.shape} and {owner.shape}")
    n_units = int(owner.max()) + 1 if n_units is None else int(n_units)
    counts = np.bincount(owner, minlength=n_units)
    if len(counts) != n_units or (counts == 0).any():
        raise ValueError(f"every unit 0 .. {n_units - 1} needs at least one item, and no item another unit")
    return np.bincount(owner, weights=losses, minlength=n_units) / counts


def p_value_at_least(r: int, v: int, eps: float, delta: float = 0.0, m: int | None = None) -> float:
    """inf over eps' >= eps of ``one_run_p_value(r, v, eps', delta, m)``: the p-value of the claim "(eps, delta)-DP".

    A run that is (eps, delta)-DP is (eps', delta)-DP for every eps' >= eps, so each of those p-values bounds
    P[V >= v] and so does their infimum. It is the p-value that matches ``one_run_lower_bound``: it is below a
    level exactly when the bound at that level exceeds eps (up to the scan's resolution). With delta = 0 the
    p-value increases with eps and the infimum is at eps itself. Otherwise the delta term can fall as eps grows;
    past the point where the binomial tail alone reaches the p-value at eps nothing lower is possible, so the
    p-value is scanned up to there and the smallest grid value refined with a bounded scalar minimisation.
    """
    _check_counts(r, v, delta, m)
    p0 = one_run_p_value(r, v, eps, delta, m)
    if delta == 0 or v == 0 or p0 >= 1.0:
        return p0

    def tail(e: float) -> float:
        return float(binom.sf(v - 1, r, expit(e))) - p0

    if tail(eps) >= 0:
        return p0
    stop = EPS_MAX if tail(EPS_MAX) < 0 else brentq(tail, eps, EPS_MAX, xtol=1e-12)
    if stop <= eps:
        return p0
    grid = np.linspace(eps, stop, SCAN_POINTS)
    ps = _p_values(r, v, grid, delta, m)
    i = int(np.argmin(ps))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = min(p0, float(ps[i]))
    if hi > lo:
        from scipy.optimize import minimize_scalar

        res = minimize_scalar(lambda e: one_run_p_value(r, v, e, delta, m), bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-10})
        best = min(best, float(res.fun))
    return best


def soundness(eps_accountant: float, r: int, v: int, delta: float, m: int, confidence: float = 0.99) -> dict:
    """Whether a one-run audit contradicts the accountant's epsilon.

    ``p_value`` = ``p_value_at_least(r, v, eps_accountant, delta, m)``, the infimum of the one-run p-value over
    every eps' >= eps_accountant, bounds the chance of v or more correct guesses if the run really were
    (eps_accountant, delta)-DP; ``violated`` when it is below 1 - confidence, i.e. the attack guessed too well for
    the claimed epsilon (a bug in training or accounting, or canaries that were not included independently with
    probability 1/2). This is the same test as "``one_run_lower_bound`` at ``confidence`` exceeds the accountant's
    epsilon".
    """
    p = p_value_at_least(r, v, eps_accountant, delta, m)
    return {"violated": bool(p < 1 - confidence), "p_value": p, "confidence": confidence,
            "p_value_over": "every epsilon' >= the accountant's epsilon (infimum)"}


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval for a binomial proportion k / n at level ``confidence``.

    With a = 1 - confidence: lo = Beta(a/2; k, n - k + 1) quantile (0 when k = 0), hi = Beta(1 - a/2; k + 1, n - k)
    quantile (1 when k = n). Each end alone is a one-sided bound at level 1 - a/2.
    """
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def repeated_trials_lower_bound(tp: int, fn: int, fp: int, tn: int, *, delta: float,
                                confidence: float = 0.95) -> dict:
    """Empirical epsilon of Jagielski, Ullman & Oprea (2020) from a threshold attack over repeated trainings.

    tp/fn count trainings with the target record that the attack called in/out, fp/tn those without it. Under
    (eps, delta)-DP every test satisfies TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta, so

        eps >= max(0, ln((TPR_lo - delta) / FPR_hi), ln((1 - FPR_hi - delta) / (1 - TPR_lo))),

    a form being skipped when its numerator is not positive. TPR_lo and FPR_hi are one-sided Clopper-Pearson
    bounds, each at level 1 - (1 - confidence)/2 (the ends of the two-sided intervals at ``confidence``), so by
    Bonferroni both hold together with probability >= ``confidence``. This only holds when the counts come from
    independent repeated trainings, each one trial; it is not valid for the members and non-members of a single
    training run, whose outcomes are not independent trials of one mechanism on neighbouring datasets.
    """
    if min(tp, fn, fp, tn) < 0 or tp + fn < 1 or fp + tn < 1:
        raise ValueError(f"need non-negative counts and trials with and without the target, got {(tp, fn, fp, tn)}")
    tpr_low = clopper_pearson(tp, tp + fn, confidence)[0]
    fpr_high = clopper_pearson(fp, fp + tn, confidence)[1]
    forms = [0.0]
    if tpr_low - delta > 0:
        forms.append(float(np.log((tpr_low - delta) / fpr_high)))
    if 1 - fpr_high - delta > 0:
        forms.append(float(np.log((1 - fpr_high - delta) / (1 - tpr_low))))
    return {"estimate": max(forms), "tpr_low": tpr_low, "fpr_high": fpr_high, "confidence": confidence,
            "delta": delta, "method": REPEATED_TRIALS_METHOD}


def flag_accountants(cross_checks: dict, used: str, tolerance: dict | None = None) -> list[str]:
    """Warnings for accountants whose epsilon understates the tight ones (``accounting.cross_checks`` output).

    The reference is the largest of the tight accountants available (Opacus' PRV and dp_accounting's PLD, both
    numerically tight up to their discretization). An accountant is flagged when its epsilon is below
    reference * (1 - tolerance), with default tolerances (``DEFAULT_TOLERANCE``; ``tolerance`` overrides by key):

    * gdp, 2%: the Gaussian DP accountant is a central-limit approximation that can understate epsilon;
    * rdp and dp_accounting_rdp, 1%: RDP's conversion to (eps, delta) is an upper bound, typically 10-30% above
      the tight value, so any shortfall beyond numerical noise points at a bug or a mismatched setting;
    * tight, 5%: PRV and PLD are flagged when they differ by more than 5% of the larger, either way.

    Accountants absent, unknown or ``None`` are skipped; when neither tight accountant is available, the one
    warning says that no check was possible. A flag on ``used``, the accountant behind the reported epsilon, says
    that the reported epsilon is understated.
    """
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    tight = {k: cross_checks[k] for k in TIGHT_ACCOUNTANTS if cross_checks.get(k) is not None}
    if not tight:
        return [f"no tight accountant ({', '.join(TIGHT_ACCOUNTANTS)}) gave an epsilon, so the others are unchecked"]
    ref = max(tight.values())
    out = []
    if len(tight) == 2:
        a, b = tight.values()
        if abs(a - b) > tol["tight"] * max(a, b):
            out.append(f"the tight accountants disagree: prv {a:.4g} vs dp_accounting_pld {b:.4g} "
                       f"(more than {tol['tight']:.0%} apart); the larger is used as the reference")
    for name, eps in cross_checks.items():
        if name in TIGHT_ACCOUNTANTS or name not in tol or eps is None or eps >= ref * (1 - tol[name]):
            continue
        msg = (f"accountant {name} gives epsilon {eps:.4g}, {(ref - eps) / ref:.1%} below the tight reference "
               f"{ref:.4g} (tolerance {tol[name]:.0%})")
        out.append(msg + ("; it is the accountant behind the reported epsilon, which is therefore understated"
                          if name == used else ""))
    return out
