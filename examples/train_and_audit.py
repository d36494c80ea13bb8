"""The main job from Python: a DP model and its non-private baseline, audited as one study.

    python examples/train_and_audit.py            # the default synthetic cohort (a few minutes on 2 cores)
"""

import argparse

import privaudit

ap = argparse.ArgumentParser()
ap.add_argument("--tiny", action="store_true", help="a tiny cohort and one epoch (the tests use it)")
ap.add_argument("--out", default="runs/example-study")
args = ap.parse_args()

size = dict(n_samples=120, image_size=32, epochs=1, width=4, batch_size=16, n_boot=50) if args.tiny else {}
study = privaudit.train_and_audit("cxr", out=args.out, epsilon=8, force=True, progress=not args.tiny, **size)

audit = study.audit
for name, model in audit.models.items():
    acc = model["privacy"]["accountant"]
    eps = f"epsilon {acc['epsilon']:.2f} ({acc['accountant']})" if acc else "no DP"
    print(f"{name}: macro AUROC {privaudit.reports.format_ci(model['utility']['macro_auroc'])}, {eps}")
table = study.to_frame()
print(f"{len(table)} estimates; report at {study.report}")
