"""Coverage of the bootstrap AUROC interval, by simulation with a known population AUROC.

Scores are N(0, 1) for negatives and N(d, 1) for positives, so the population AUROC is Phi(d / sqrt 2). Each
repetition draws a fresh sample, builds the audit's percentile interval (the same Resampler and
weighted_auroc that run_audit uses) and checks whether it covers the truth. A correct 95% interval covers it in
about 95% of repetitions; with 2,000 repetitions the count should land within 93.5-96.5%.

    python benchmarks/coverage.py --reps 2000 --n 300 --boot 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import binom, norm

from privaudit.audit.utility import Resampler, percentile_ci, weighted_auroc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--n", type=int, default=300, help="samples per repetition (half positive)")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--d", type=float, default=1.0, help="separation of the score distributions")
    ap.add_argument("--ci", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    truth = norm.cdf(args.d / np.sqrt(2))
    rng = np.random.default_rng(args.seed)
    half = args.n // 2
    y = np.r_[np.zeros(half), np.ones(args.n - half)]
    covered, t0 = 0, time.perf_counter()
    for k in range(args.reps):
        s = np.r_[rng.normal(0, 1, half), rng.normal(args.d, 1, args.n - half)]
        boots = weighted_auroc(y, s, Resampler(args.n, n_boot=args.boot, seed=args.seed + k).weights)
        lo, hi, _ = percentile_ci(boots, args.ci)
        covered += lo <= truth <= hi
    rate = covered / args.reps
    lo_ok, hi_ok = binom.ppf([0.0005, 0.9995], args.reps, args.ci) / args.reps
    print(f"population AUROC {truth:.4f}; {args.reps} repetitions of n={args.n}, {args.boot} resamples each "
          f"({time.perf_counter() - t0:.1f} s)")
    print(f"coverage of the {args.ci:.0%} percentile interval: {rate:.2%} "
          f"(99.9% binomial band for a correct method: {lo_ok:.2%} to {hi_ok:.2%}); "
          f"goal 93.5-96.5%: {'PASS' if 0.935 <= rate <= 0.965 else 'FAIL'}")


if __name__ == "__main__":
    main()
