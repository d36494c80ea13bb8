"""Bootstrap counts drawn directly (utility.draw_counts) against the naive reference: the law of the counts, and
AUROCs equal to scikit-learn's on the expanded resample."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from privaudit.audit.stats import SampleMajorWeights, weighted_auroc_fast
from privaudit.audit.utility import Resampler, counts_from_indices, draw_counts, draw_indices


def test_draw_counts_are_multinomial_resamples():
    n, n_boot = 20, 20000
    counts = np.concatenate([b.T for b in draw_counts(n, n_boot, seed=3, block=1024)])
    assert counts.shape == (n_boot, n) and counts.dtype == np.float32
    assert np.all(counts.sum(axis=1) == n) and np.all(counts == np.round(counts)) and counts.min() >= 0
    # each cell is Binomial(n, 1/n); two cells covary by -1/n (a multinomial with equal probabilities)
    freq = np.bincount(counts.astype(int).ravel(), minlength=n + 1)[:6] / counts.size
    pmf = sps.binom.pmf(np.arange(6), n, 1 / n)
    assert np.allclose(freq, pmf, atol=4 * np.sqrt(pmf * (1 - pmf) / counts.size) + 1e-4)
    cov = np.cov(counts[:, :5].T)
    assert np.allclose(np.diag(cov), 1 - 1 / n, atol=0.03)
    assert np.allclose(cov[np.triu_indices(5, 1)], -1 / n, atol=0.02)
    # the naive reference has the same law: compare the distributions of one cell (two-sample chi-square)
    naive = counts_from_indices(draw_indices(n, 5000, seed=4), n)
    table = np.array([np.bincount(np.minimum(c[:, 0].astype(int), 4), minlength=5) for c in (counts[:5000], naive)])
    assert sps.chi2_contingency(table).pvalue > 0.001


def test_draw_counts_blocks_are_reproducible_and_independent_of_the_total():
    a = draw_counts(50, 10, seed=1, block=4)
    b = draw_counts(50, 6, seed=1, block=4)
    assert [x.shape for x in a] == [(50, 4), (50, 4), (50, 2)]
    assert np.array_equal(a[0], b[0])               # block k has its own stream
    assert np.array_equal(a[1][:, :2], b[1])        # same stream, narrower block: a prefix of the resamples
    assert np.array_equal(a[0], draw_counts(50, 10, seed=1, block=4)[0])
    assert not np.array_equal(a[0], draw_counts(50, 10, seed=2, block=4)[0])
    threaded = draw_counts(50, 10, seed=1, block=4, workers=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, threaded))  # threads do not change the draw
    with pytest.raises(ValueError):
        draw_counts(0, 5, seed=0)


def test_fast_auroc_on_drawn_counts_equals_sklearn_on_the_expanded_resample():
    rng = np.random.default_rng(5)
    n = 300
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.4 * y, 2)  # ties
    patients = np.repeat(np.arange(150), 2)
    for clusters in (None, patients):
        r = Resampler(n, n_boot=60, seed=9, clusters=clusters)
        fast = weighted_auroc_fast(y, s, r.sample_major())
        for b, w in enumerate(r.weights[:30]):
            idx = np.repeat(np.arange(n), w.astype(int))
            assert fast[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
        if clusters is not None:
            assert np.array_equal(r.weights[:, 0::2], r.weights[:, 1::2])
            assert r.n_units == 150


def test_sample_major_from_blocks_checks_its_input():
    blocks = draw_counts(30, 7, seed=0, block=3)
    sm = SampleMajorWeights.from_blocks(blocks)
    assert (sm.n, sm.n_boot, sm.dtype) == (30, 7, np.float32)
    dense = SampleMajorWeights(np.concatenate([b.T for b in blocks]))
    y = np.arange(30) % 2
    s = np.linspace(0, 1, 30) ** 2
    assert np.array_equal(weighted_auroc_fast(y, s, sm), weighted_auroc_fast(y, s, dense), equal_nan=True)
    with pytest.raises(ValueError):
        SampleMajorWeights.from_blocks([])
    with pytest.raises(ValueError):
        SampleMajorWeights.from_blocks([blocks[0], blocks[1].astype(np.float64)])
