"""Benchmark: the vectorised paired bootstrap of AUROC against the naive per-resample loop.

Two models score ``--n`` test samples on ``--labels`` labels. ``--boot`` resamples are drawn once with
``draw_indices`` and turned into counts with ``counts_from_indices``; both models are resampled with the same
rows (a paired bootstrap). Timed:

* ``weighted_auroc`` (privaudit.audit.utility) on the count matrix, for both models and every label;
* ``weighted_auroc_fast`` (privaudit.audit.stats), including building its ``SampleMajorWeights`` once;
* the naive loop of the paper's code (per resample: the indices of an ``np.random.choice``-style draw, then
  ``sklearn.metrics.roc_auc_score`` per label per model) on ``--naive-boot`` resamples, extrapolated
  linearly to ``--boot``. It runs on the first rows of the shared indices so that the results can be compared;
  drawing those indices is not charged to it (about 1 ms a resample, under 1% of its time).

Checks: the naive loop and ``weighted_auroc`` agree on the shared resamples (max abs diff < 1e-9), and
``weighted_auroc_fast`` equals ``weighted_auroc`` on every resample. Goals: naive / vectorised >= 50x and the
vectorised bootstrap under 10 s. The resample setup (indices and counts) is shared by every metric and model
of a study, so it is reported apart. Exit status 1 if a check fails.

    python benchmarks/bootstrap_auroc.py --n 100000 --labels 8 --boot 2000 --naive-boot 50
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from privaudit.audit.stats import SampleMajorWeights, weighted_auroc_fast
from privaudit.audit.utility import counts_from_indices, draw_indices, weighted_auroc

GOAL_RATIO = 50.0
GOAL_SECONDS = 10.0
TOLERANCE = 1e-9


def make_predictions(n: int, n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n, L)`` with prevalences from 2% to 40%, and two models' scores ``(2, n, L)``.

    Scores are sigmoid outputs rounded to float32, as a network would save them, so some are tied.
    """
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.02, 0.4, n_labels)
    y = (rng.random((n, n_labels)) < prevalence).astype(np.int8)
    latent = 1.5 * y + rng.normal(0, 1, (n, n_labels))
    scores = np.stack([1 / (1 + np.exp(-(gain * latent + rng.normal(0, 0.7, (n, n_labels)))))
                       for gain in (1.0, 0.8)])
    return y, scores.astype(np.float32).astype(np.float64)


def all_aurocs(fn: Callable[..., np.ndarray], y: np.ndarray, scores: np.ndarray, weights) -> np.ndarray:
    """``fn(y, s, weights)`` for every model and label: ``(models, labels, B)``."""
    return np.stack([np.stack([fn(y[:, lab], scores[m, :, lab], weights) for lab in range(y.shape[1])])
                     for m in range(scores.shape[0])])


def naive_aurocs(y: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One ``roc_auc_score`` per resample, label and model: ``(models, labels, len(indices))``."""
    out = np.full((scores.shape[0], y.shape[1], len(indices)), np.nan)
    for b, idx in enumerate(indices):
        for lab in range(y.shape[1]):
            yb = y[idx, lab]
            if 0 < yb.sum() < len(yb):
                for m in range(scores.shape[0]):
                    out[m, lab, b] = roc_auc_score(yb, scores[m, idx, lab])
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="test predictions (default 100000)")
    ap.add_argument("--labels", type=int, default=8, help="labels per model (default 8)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--naive-boot", type=int, default=50, help="resamples timed in the naive loop (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    naive_boot = min(args.naive_boot, args.boot)

    y, scores = make_predictions(args.n, args.labels, args.seed)
    print(f"data: n={args.n} labels={args.labels} models=2 resamples={args.boot} (naive loop timed on "
          f"{naive_boot}); label prevalence {y.mean(axis=0).min():.3f}..{y.mean(axis=0).max():.3f}", flush=True)

    t0 = time.perf_counter()
    indices = draw_indices(args.n, args.boot, args.seed + 1)
    t1 = time.perf_counter()
    weights = counts_from_indices(indices, args.n)
    t2 = time.perf_counter()
    naive_indices = indices[:naive_boot].copy()
    del indices
    print(f"resample setup, shared by every metric and model: draw_indices {t1 - t0:.2f} s, "
          f"counts_from_indices {t2 - t1:.2f} s", flush=True)

    t0 = time.perf_counter()
    naive = naive_aurocs(y, scores, naive_indices)
    naive_s = time.perf_counter() - t0
    naive_full = naive_s * args.boot / naive_boot
    print(f"naive loop: {naive_s:.2f} s for {naive_boot} resamples "
          f"({naive_s / naive_boot / (2 * args.labels) * 1e3:.1f} ms per roc_auc_score) "
          f"-> {naive_full:.1f} s extrapolated to {args.boot}", flush=True)

    t0 = time.perf_counter()
    ref = all_aurocs(weighted_auroc, y, scores, weights)
    ref_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepared = SampleMajorWeights(weights)
    t1 = time.perf_counter()
    fast = all_aurocs(weighted_auroc_fast, y, scores, prepared)
    t2 = time.perf_counter()
    fast_s = t2 - t0

    diff_naive = float(np.nanmax(np.abs(ref[..., :naive_boot] - naive)))
    same_nan = bool(np.array_equal(np.isnan(ref[..., :naive_boot]), np.isnan(naive)))
    fast_exact = bool(np.array_equal(fast, ref, equal_nan=True))
    diff_fast = float(np.nanmax(np.abs(fast - ref)))

    print()
    print(f"{'path':<22}{'time (s)':>10}{'naive/path':>12}   goals: ratio >= {GOAL_RATIO:.0f}x, time < "
          f"{GOAL_SECONDS:.0f} s")
    rows = [("naive (extrapolated)", naive_full, None),
            ("weighted_auroc", ref_s, naive_full / ref_s),
            ("weighted_auroc_fast", fast_s, naive_full / fast_s)]
    for name, secs, ratio in rows:
        goals = "" if ratio is None else (f"   ratio {verdict(ratio >= GOAL_RATIO)}, "
                                          f"time {verdict(secs < GOAL_SECONDS)}")
        ratio_s = "" if ratio is None else f"{ratio:.1f}x"
        print(f"{name:<22}{secs:>10.2f}{ratio_s:>12}{goals}")
    per_call = 2 * args.labels
    print(f"  (weighted_auroc_fast: SampleMajorWeights {t1 - t0:.2f} s once, then {(t2 - t1) / per_call:.2f} s "
          f"per model and label; weighted_auroc: {ref_s / per_call:.2f} s per model and label)")
    print()
    ok_naive = diff_naive < TOLERANCE and same_nan
    print(f"check: weighted_auroc vs naive on the {naive_boot} shared resamples: max |diff| = {diff_naive:.2e}, "
          f"same nan pattern: {same_nan} -> {verdict(ok_naive)}")
    print(f"check: weighted_auroc_fast == weighted_auroc on all {args.boot} resamples x {2 * args.labels} "
          f"(model, label): {fast_exact} (max |diff| = {diff_fast:.1e}) -> {verdict(fast_exact)}")
    return 0 if ok_naive and fast_exact else 1


if __name__ == "__main__":
    sys.exit(main())
