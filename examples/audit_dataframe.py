"""Audit predictions you already have, straight from a pandas DataFrame (no training, no files).

    python examples/audit_dataframe.py

The table needs the predictions.csv columns: sample_id, split, patient_id, y_<label> and p_<label> per label,
and the sensitive attributes (sex, age, ...). Here a small table is simulated, with a model that is worse for
women on one label, so that the fairness audit has something to find.
"""

import argparse

import numpy as np
import pandas as pd

import privaudit

ap = argparse.ArgumentParser()
ap.add_argument("--tiny", action="store_true", help="a small table and few resamples (the tests use it)")
args = ap.parse_args()

rng = np.random.default_rng(0)
n = 600 if args.tiny else 4000
sex = rng.choice(["F", "M"], n)
y = rng.integers(0, 2, n)
signal = np.where(sex == "F", 0.6, 1.6)          # a weaker signal for women: a performance-parity gap
p = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1, n))))
df = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                   "split": "test", "y_effusion": y, "p_effusion": p, "sex": sex,
                   "age": rng.integers(20, 90, n)})

res = privaudit.audit({"my_model": df}, attributes=["sex", "age_group"], n_boot=200 if args.tiny else 1000)
table = res.to_frame()
print(table[(table.section == "fairness") & (table.metric == "performance_parity")]
      [["attribute", "group", "estimate", "ci_low", "ci_high", "n"]].to_string(index=False))
gap = res.models["my_model"]["fairness"]["sex"]["effusion"]["performance_parity"]["F"]
assert gap["ci_high"] < 0, gap   # the planted gap is found
