"""Utility parity of the two backends: the same synthetic cohort, seed and settings, trained non-privately with
opacus and with tf, audited together as one study; the macro AUROCs must differ by less than their combined CI
width.

    python benchmarks/backend_parity.py                     # the CLI defaults: 3000 images, 64x64, 5 epochs
    python benchmarks/backend_parity.py --n-samples 1500 --epochs 3 --out runs/parity

"Combined CI width" is read as the half-width of the difference of two independent estimates,
sqrt(h_opacus^2 + h_tf^2) with h the half-width of each 95% bootstrap CI (stricter than asking the two CIs to
overlap, whose bound is h_opacus + h_tf). The paired bootstrap difference from the study's comparison block is
printed too. Both prediction files are also checked with the same schema validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from pathlib import Path

import privaudit  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything loads TensorFlow)
from privaudit.config import AuditConfig, DPConfig, TrainConfig
from privaudit.predictions import read_predictions
from privaudit.study import DataSpec, RunDir
from privaudit.study.data import synthesize
from privaudit.study.runs import audit_runs, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=3000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        manifest = synthesize("cxr", root / "data", n=args.n_samples, image_size=args.image_size, seed=args.seed,
                              quiet=True)
        base = TrainConfig(width=args.width, image_size=args.image_size, epochs=args.epochs, seed=args.seed,
                           dp=DPConfig(enabled=False))
        runs = {}
        for backend in ("opacus", "tf"):
            info = train(dataclasses.replace(base, backend=backend), DataSpec(path=manifest, preset="manifest",
                                                                             seed=args.seed),
                         root / backend, force=True).train_info()
            read_predictions(root / backend / "predictions.csv")  # the same schema validation for both
            runs[backend] = RunDir(root / backend)
            print(f"{backend:<7} trained: {info['steps']} steps in {info['train_seconds']:.1f} s", flush=True)
        doc = audit_runs(runs, config=AuditConfig(n_boot=args.n_boot, seed=args.seed), reference="opacus").data
    m = {b: doc["models"][b]["utility"]["macro_auroc"] for b in runs}
    half = {b: (v["ci_high"] - v["ci_low"]) / 2 for b, v in m.items()}
    diff = m["tf"]["estimate"] - m["opacus"]["estimate"]
    combined = math.hypot(half["opacus"], half["tf"])
    paired = doc["comparisons"]["tf vs opacus"]["macro_auroc_difference"]
    n_test = doc["models"]["tf"]["utility"]["labels"][doc["study"]["labels"][0]]["n"]
    for b, v in m.items():
        print(f"{b:<7} macro AUROC {v['estimate']:.3f} (95% CI {v['ci_low']:.3f} to {v['ci_high']:.3f})")
    print(f"tf - opacus: {diff:+.3f}; combined CI half-width {combined:.3f} (overlap bound "
          f"{half['opacus'] + half['tf']:.3f}); paired bootstrap {paired['estimate']:+.3f} "
          f"({paired['ci_low']:+.3f} to {paired['ci_high']:+.3f}); n_test {n_test}")
    print(f"{'PASS' if abs(diff) < combined else 'FAIL'}: |difference| {'<' if abs(diff) < combined else '>='} "
          "combined CI width")


if __name__ == "__main__":
    main()
