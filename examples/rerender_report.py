"""Re-render a report from audit.json alone, with a release policy and a model card.

    python examples/rerender_report.py runs/example-study

Without a study folder it first audits a small simulated prediction table into one.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

import privaudit

here = Path(__file__).parent
ap = argparse.ArgumentParser()
ap.add_argument("study", nargs="?", help="a study or run directory with audit.json")
ap.add_argument("--tiny", action="store_true", help="audit a simulated table first (the tests use it)")
args = ap.parse_args()

study = args.study
if study is None:
    rng = np.random.default_rng(1)
    n = 400
    y = rng.integers(0, 2, n)
    df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                       "split": "test", "y_effusion": y, "p_effusion": np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1),
                       "sex": rng.choice(["F", "M"], n)})
    study = "audited-table"
    privaudit.audit({"private": df}, out=study, n_boot=100, force=True)

# the example policy checks the DP models; a table audited from predictions alone has none, so no policy then
policy = here / "policy.toml" if args.study else None
paths = privaudit.report(study, fmt="html", policy=policy, model_card=here / "model_card.toml")
print("written:", ", ".join(map(str, paths)))
print("warnings:", len(privaudit.load_audit(study).warnings))
