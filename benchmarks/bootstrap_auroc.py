"""Benchmark: the whole paired bootstrap of AUROC, resample set-up included, against the old set-up and the naive
per-resample loop.

Two models score ``--n`` test samples on ``--labels`` labels; ``--boot`` resamples are shared by both models (a
paired bootstrap). Timed, end to end (drawing the resamples, laying them out, and every AUROC):

* old: ``draw_indices`` (a ``(B, n)`` int64 index matrix), ``counts_from_indices`` (a ``(B, n)`` float64
  count matrix), ``SampleMajorWeights`` (its transposed float32 copy), then ``weighted_auroc_fast`` for every
  model and label: the path before this change, the baseline of the ratios;
* new: ``Resampler(...).sample_major()``, counts drawn directly in the sample-major float32 blocks that
  ``weighted_auroc_fast`` reads (``utility.draw_counts``: 32-bit indices counted a tile at a time, no ``(B, n)``
  matrix), then the same AUROCs;
* new, 2 threads: the same with ``draw_counts(workers=2)`` and the AUROCs of the (model, label) pairs mapped over
  2 threads (numpy and scipy's sparse product release the GIL in their loops);
* two-level: the new path plus, per label, the two-level summaries over seeds (the two models taken as two
  seeds of one setting: ``seed_mean_interval`` of each label and ``seed_difference`` of the pair), i.e. the cost
  of covering training randomness on top of the patient bootstrap;
* the naive loop of the paper's code (per resample: ``roc_auc_score`` per label per model on the expanded
  indices) on ``--naive-boot`` resamples, extrapolated linearly to ``--boot``.

Checks: on the first ``--naive-boot`` new resamples, ``weighted_auroc_fast`` equals ``roc_auc_score`` on the
expanded resample (max abs diff < 1e-9); the old and the new bootstrap agree in law (the bootstrap SDs of
every AUROC within max(10%, 5/sqrt(2B)): different draws of the same multinomial). Goals, printed with
PASS/FAIL: new end to end <= 10 s and two-level <= 1.5 x new. Exit status 1 if a check fails. On a shared
machine the absolute seconds move with the load; the ratios against the old path, measured in the same run,
are the robust figures.

    python benchmarks/bootstrap_auroc.py --n 100000 --labels 8 --boot 2000 --naive-boot 20
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sklearn.metrics import roc_auc_score

from privaudit.audit.stats import SampleMajorWeights, seed_difference, seed_mean_interval, weighted_auroc_fast
from privaudit.audit.utility import Resampler, counts_from_indices, draw_counts, draw_indices

GOAL_SECONDS = 10.0
GOAL_TWO_LEVEL = 1.5
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


def all_aurocs(y: np.ndarray, scores: np.ndarray, weights, workers: int = 1) -> np.ndarray:
    """``weighted_auroc_fast`` for every model and label: ``(models, labels, B)``."""
    pairs = [(m, lab) for m in range(scores.shape[0]) for lab in range(y.shape[1])]

    def one(pair):
        m, lab = pair
        return weighted_auroc_fast(y[:, lab], scores[m, :, lab], weights)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            res = list(pool.map(one, pairs))
    else:
        res = [one(p) for p in pairs]
    return np.array(res).reshape(scores.shape[0], y.shape[1], -1)


def naive_aurocs(y: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """One ``roc_auc_score`` per resample, label and model on the expanded indices: ``(models, labels, R)``."""
    out = np.full((scores.shape[0], y.shape[1], len(counts)), np.nan)
    for b, w in enumerate(counts):
        idx = np.repeat(np.arange(len(w)), w.astype(int))
        for lab in range(y.shape[1]):
            yb = y[idx, lab]
            if 0 < yb.sum() < len(yb):
                for m in range(scores.shape[0]):
                    out[m, lab, b] = roc_auc_score(yb, scores[m, idx, lab])
    return out


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="test predictions (default 100000)")
    ap.add_argument("--labels", type=int, default=8, help="labels per model (default 8)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--naive-boot", type=int, default=20, help="resamples timed in the naive loop (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-old", action="store_true", help="do not time the old set-up (it needs 3.2 GB at the "
                    "defaults)")
    args = ap.parse_args(argv)
    naive_boot = min(args.naive_boot, args.boot)
    y, scores = make_predictions(args.n, args.labels, args.seed)
    pairs = 2 * args.labels
    print(f"data: n={args.n} labels={args.labels} models=2 resamples={args.boot}; label prevalence "
          f"{y.mean(axis=0).min():.3f}..{y.mean(axis=0).max():.3f}", flush=True)

    old_total = old = None
    if not args.skip_old:
        def old_path():
            idx = draw_indices(args.n, args.boot, args.seed + 1)
            t_idx = time.perf_counter()
            counts = counts_from_indices(idx, args.n)
            del idx
            t_cnt = time.perf_counter()
            sm = SampleMajorWeights(counts)
            del counts
            t_sm = time.perf_counter()
            return all_aurocs(y, scores, sm), (t_idx, t_cnt, t_sm)

        t0 = time.perf_counter()
        (old, (t_idx, t_cnt, t_sm)), old_total = timed(old_path)
        print(f"old: draw_indices {t_idx - t0:.2f} s, counts_from_indices {t_cnt - t_idx:.2f} s, "
              f"SampleMajorWeights {t_sm - t_cnt:.2f} s, AUROCs {t0 + old_total - t_sm:.2f} s "
              f"-> {old_total:.2f} s end to end", flush=True)

    def new_path(workers=1):
        t_a = time.perf_counter()
        if workers > 1:
            sm = SampleMajorWeights.from_blocks(draw_counts(args.n, args.boot, args.seed + 1, workers=workers))
        else:
            sm = Resampler(args.n, n_boot=args.boot, seed=args.seed + 1).sample_major()
        t_b = time.perf_counter()
        return all_aurocs(y, scores, sm, workers), sm, t_b - t_a

    (new, sm, new_setup), new_total = timed(new_path)
    print(f"new: counts drawn in sample-major blocks {new_setup:.2f} s, AUROCs {new_total - new_setup:.2f} s "
          f"-> {new_total:.2f} s end to end", flush=True)
    (thr, _, thr_setup), thr_total = timed(lambda: new_path(workers=2))
    print(f"new, 2 threads: set-up {thr_setup:.2f} s, AUROCs {thr_total - thr_setup:.2f} s -> {thr_total:.2f} s",
          flush=True)

    def two_level():
        aurocs, _, _ = new_path()
        est = np.array([[float(weighted_auroc_fast(y[:, lab], scores[m, :, lab], np.ones((1, args.n)))[0])
                         for lab in range(args.labels)] for m in range(2)])
        for lab in range(args.labels):
            seed_mean_interval(est[:, lab], aurocs[:, lab])
            seed_difference(est[:1, lab], est[1:, lab], aurocs[:1, lab], aurocs[1:, lab])
        return aurocs

    _, two_total = timed(two_level)
    print(f"two-level (patient bootstrap + seed level): {two_total:.2f} s", flush=True)

    counts = np.concatenate([b[:, :naive_boot].T for b in sm.blocks[:1]])[:naive_boot]
    (naive, naive_s) = timed(lambda: naive_aurocs(y, scores, counts))
    naive_full = naive_s * args.boot / naive_boot
    print(f"naive loop: {naive_s:.2f} s for {naive_boot} resamples -> {naive_full:.1f} s extrapolated to "
          f"{args.boot}", flush=True)

    best = min(new_total, thr_total)
    print()
    print(f"{'path':<34}{'time (s)':>10}{'naive/path':>12}{'old/path':>10}")
    rows = [("naive (extrapolated)", naive_full), ("old set-up + AUROC", old_total), ("new, end to end", new_total),
            ("new, end to end, 2 threads", thr_total), ("two-level, end to end", two_total)]
    for name, secs in rows:
        if secs is None:
            continue
        ratio_old = f"{old_total / secs:.2f}x" if old_total else "-"
        print(f"{name:<34}{secs:>10.2f}{naive_full / secs:>11.1f}x{ratio_old:>10}")
    print()
    print(f"goal: whole bootstrap, set-up included, <= {GOAL_SECONDS:.0f} s: best new path {best:.2f} s -> "
          f"{verdict(best <= GOAL_SECONDS)}")
    print(f"goal: two-level <= {GOAL_TWO_LEVEL} x new: {two_total / new_total:.2f}x -> "
          f"{verdict(two_total <= GOAL_TWO_LEVEL * new_total)}")
    diff_naive = float(np.nanmax(np.abs(new[..., :naive_boot] - naive)))
    same_nan = bool(np.array_equal(np.isnan(new[..., :naive_boot]), np.isnan(naive)))
    ok_naive = diff_naive < TOLERANCE and same_nan
    threads_same = bool(np.array_equal(new, thr, equal_nan=True))
    print(f"check: weighted_auroc_fast on the drawn counts vs roc_auc_score on the expanded resample "
          f"({naive_boot} resamples x {pairs}): max |diff| = {diff_naive:.2e}, same nan pattern {same_nan} -> "
          f"{verdict(ok_naive)}")
    print(f"check: 2 threads give the same AUROCs as 1: {threads_same} -> {verdict(threads_same)}")
    ok_law = True
    if old is not None:
        sd_old, sd_new = np.nanstd(old, axis=-1), np.nanstd(new, axis=-1)
        rel = float(np.max(np.abs(sd_new / sd_old - 1)))
        tol = max(0.10, 5 / np.sqrt(2 * args.boot))  # an SD from B resamples has relative MC error 1/sqrt(2B)
        ok_law = rel < tol
        print(f"check: old and new bootstrap SDs of every AUROC agree (max relative diff {rel:.3f} < {tol:.2f}) -> "
              f"{verdict(ok_law)}")
    return 0 if ok_naive and threads_same and ok_law else 1


if __name__ == "__main__":
    sys.exit(main())
