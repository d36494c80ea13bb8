"""Does the audit find what the synthetic CXR cohort plants? Train the default study's model without DP on a
fresh synthetic cohort, audit it (patient-clustered bootstrap, as the audit does by default), and print, for
each planted effect in the cohort's cohort.json, the performance-parity gap of the planted group with its CI,
and PASS when it has the planted direction and its CI excludes zero.

    python benchmarks/planted_effects.py                       # the defaults: 3000 images, 64x64, 5 epochs
    python benchmarks/planted_effects.py --n-samples 1500 --epochs 3 --out runs/planted
    python benchmarks/planted_effects.py --cohort runs/planted/data --train-seeds 0,1,2

The model and training settings are the cxr task's defaults (ResNet-9 with GroupNorm, width 32, batch 64,
NAdam at 2e-3); only DP is off, since the planted effects are a property of the data that a non-private model
must show before a private one can be compared with it. The exit status is 1 when any effect fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from privaudit.config import AuditConfig, DPConfig, TrainConfig
from privaudit.tasks import create_task


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main() -> int:
    task = create_task("cxr")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=task.default("n_samples"), help="images in the cohort")
    ap.add_argument("--image-size", type=int, default=task.input_size)
    ap.add_argument("--epochs", type=int, default=task.default("epochs"))
    ap.add_argument("--width", type=int, default=task.default("width"))
    ap.add_argument("--batch-size", type=int, default=task.default("batch_size"))
    ap.add_argument("--lr", type=float, default=task.default("lr"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the cohort and of the audit's bootstrap")
    ap.add_argument("--train-seeds", type=_seeds, default=None,
                    help="comma-separated training seeds, one model each (default: --seed)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--cohort", type=Path, default=None, help="reuse this synthetic cohort folder (manifest.csv, "
                    "cohort.json) instead of writing a new one")
    ap.add_argument("--out", type=Path, default=None, help="keep the cohort and runs here (default: a temporary "
                    "folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    import torch

    from privaudit.audit import run_audit
    from privaudit.backends import create_backend
    from privaudit.data.manifest import load_manifest
    from privaudit.data.synth_cxr import check_planted_effects, synthesize_cxr
    from privaudit.predictions import read_predictions

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.cohort is None:
            manifest_path = synthesize_cxr(root / "data", n=args.n_samples, image_size=args.image_size,
                                           seed=args.seed)
            print(f"cohort: {args.n_samples} images at {args.image_size}px in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        else:
            manifest_path = args.cohort / "manifest.csv"
        record = json.loads((manifest_path.parent / "cohort.json").read_text())
        per_patient = record["realised"]["images_per_patient"]
        print(f"cohort: {record['realised']['n_images']} images of {record['realised']['n_patients']} patients; "
              f"images per patient mean {per_patient['mean']}, median {per_patient['median']}, "
              f"max {per_patient['max']}", flush=True)
        manifest = load_manifest(manifest_path, task=task)
        results = {}
        for seed in args.train_seeds or [args.seed]:
            cfg = TrainConfig(width=args.width, image_size=args.image_size, epochs=args.epochs,
                              batch_size=args.batch_size, physical_batch_size=args.batch_size, lr=args.lr,
                              seed=seed, dp=DPConfig(enabled=False))
            run = root / f"non_private_seed{seed}"
            info = create_backend("opacus").train(manifest, cfg, run, quiet=True)
            print(f"seed {seed}: trained {info['steps']} steps in {info['train_seconds']:.0f} s "
                  f"({torch.get_num_threads()} threads)", flush=True)
            report = run_audit({"non_private": read_predictions(run / "predictions.csv")},
                               runs={"non_private": info}, config=AuditConfig(n_boot=args.n_boot, seed=args.seed))
            model = report.models["non_private"]
            checks = check_planted_effects(model["fairness"], record["planted_effects"])
            macro = model["utility"]["macro_auroc"]
            results[seed] = {"macro_auroc": macro["estimate"], "checks": checks}
            clustered = report.data["study"]["bootstrap"]["cluster"]
            print(f"seed {seed}: macro AUROC {macro['estimate']:.3f} (95% CI {macro['ci_low']:.3f} to "
                  f"{macro['ci_high']:.3f}); bootstrap resamples patients: {clustered}")
            for c in checks:
                groups = ((model["fairness"].get(c["attribute"]) or {}).get(c["label"]) or {}).get("groups", {})
                aurocs = ", ".join(f"{g} {v['auroc']['estimate']:.3f}" for g, v in groups.items()
                                   if v["auroc"]["estimate"] is not None)
                print(f"  {c['name']:<26} {c['attribute']}={c['group']:<4} {c['label']:<17} gap "
                      f"{_fmt(c['estimate'])} (95% CI {_fmt(c['ci_low'])} to {_fmt(c['ci_high'])})  "
                      f"{'PASS' if c['shown'] else 'FAIL'}   AUROC by group: {aurocs}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results}, indent=2))
    ok = all(c["shown"] for r in results.values() for c in r["checks"])
    print("all planted effects shown" if ok else "some planted effects are NOT shown")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
