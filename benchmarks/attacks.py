"""Wall time of attack scoring: loss threshold, LiRA (online and offline) and RMIA on --n samples with --shadows
shadow statistics each, plus the ROC metrics. Scoring alone should stay under a few seconds.

    python benchmarks/attacks.py --n 100000 --shadows 16

The time per shadow model on the default cohort is the training time of one run (see the demo's
train.json `train_seconds`); `privaudit attack ... --jobs N` runs N of them at once.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from privaudit.audit.privacy import attack_metrics, lira_scores, rmia_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--shadows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    n, k = args.n, args.shadows
    member = rng.random(n) < 0.5
    inn = rng.random((k, n)) < 0.5
    shadow = rng.normal(0, 1, (k, n)) + 0.5 * inn
    target = rng.normal(0, 1, n) + 0.5 * member
    prob = 1 / (1 + np.exp(-target))
    ref_prob = 1 / (1 + np.exp(-shadow))
    timings = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        return out

    scores = {
        "loss": timed("loss", lambda: target.copy()),
        "lira": timed("lira (online)", lambda: lira_scores(target, shadow, inn, online=True)),
        "lira_offline": timed("lira (offline)", lambda: lira_scores(target, shadow, inn, online=False)),
        "rmia": timed("rmia", lambda: rmia_scores(prob, ref_prob.mean(axis=0, keepdims=True), prob[~member],
                                                  ref_prob.mean(axis=0)[~member][None, :])),
    }
    for name, sc in scores.items():
        res, _ = timed(f"metrics ({name})", lambda sc=sc: attack_metrics(sc[member], sc[~member]))
        print(f"{name:14s} AUC {res['auc']:.3f}  TPR@1%FPR {res['tpr_at_fpr']['0.01']:.3f}")
    print(f"\n{n} samples x {k} shadow statistics")
    for name, t in timings.items():
        print(f"  {name:22s} {t:7.3f} s")
    total = sum(timings.values())
    print(f"  {'total':22s} {total:7.3f} s  ({'PASS' if total < 5 else 'FAIL'}: goal a few seconds)")


if __name__ == "__main__":
    main()
