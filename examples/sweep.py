"""The paper's privacy-utility trade-off: one model per (epsilon, seed), audited as one study.

    python examples/sweep.py                      # epsilons 1, 8 and no DP, 2 seeds each
"""

import argparse

import privaudit


def main() -> None:
    # the local executor spawns worker processes, which import this file: keep the work under main()
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a tiny cohort, 2 settings, 1 seed (the tests use it)")
    ap.add_argument("--out", default="runs/example-sweep")
    args = ap.parse_args()

    if args.tiny:
        study = privaudit.sweep("cxr", epsilons="8,inf", seeds=1, out=args.out, n_samples=160, image_size=32, epochs=1,
                                width=4, batch_size=16, n_boot=50)
    else:
        study = privaudit.sweep("cxr", epsilons="1,8,inf", seeds=2, out=args.out, progress=True)

    for setting, agg in study.audit.data["study"]["aggregates"].items():
        m = agg["macro_auroc"]
        mean = "n/a" if m["mean"] is None else f"{m['mean']:.3f}"   # n/a: a tiny test split with one class
        print(f"epsilon {setting}: macro AUROC {mean} over {agg['n_seeds']} seed(s)")


if __name__ == "__main__":
    main()
