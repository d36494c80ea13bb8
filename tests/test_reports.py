"""Reports: rendered from audit.json alone, autoescaped, with aggregates only."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from privaudit.audit import run_audit
from privaudit.config import AuditConfig
from privaudit.errors import DataError
from privaudit.reports import render_html, write_report
from test_audit_engine import make_predictions


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_data_values_are_escaped_and_no_patient_rows_leak(tmp_path):
    df = make_predictions(n=600, seed=1)
    evil = "<script>alert(1)</script>"
    df["site"] = [evil if i % 2 else "B" for i in range(len(df))]
    rep = run_audit({evil: df}, config=AuditConfig(n_boot=20))
    html = render_html(rep)
    parser = _Collect()
    parser.feed(html)
    assert "script" not in parser.tags
    assert evil in "".join(parser.text)  # shown as text
    for sid in df["sample_id"].head(50):
        assert f">{sid}<" not in html
    for heading in ("Summary", "Data", "Privacy guarantee", "Utility", "Fairness", "Empirical privacy",
                    "Warnings and limitations", "Provenance"):
        assert f">{heading}<" in html


def test_report_errors(tmp_path):
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    rep.to_json(tmp_path / "audit.json")
    out = write_report(tmp_path / "audit.json")
    assert out.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(DataError, match="--template"):
        write_report(tmp_path / "audit.json", tmp_path / "r.html", template_dir=tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        write_report(tmp_path / "bad.json")
    assert not (tmp_path / "report.html.tmp").exists()


def test_figures_are_inline_svg_and_the_page_is_self_contained():
    import re

    df = make_predictions(n=800, seed=2)
    rep = run_audit({"a": df, "b": df.assign(p_a=1 - df["p_a"])}, config=AuditConfig(n_boot=30))
    html = render_html(rep)
    # one ROC per label, one forest plot per attribute, one log-log attack ROC
    assert html.count("<svg") == len(rep.data["study"]["labels"]) + len(rep.data["study"]["attributes"]) + 1
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", html)  # nothing points outside the file
    assert "url(http" not in html and "<script" not in html


def test_a_soundness_violation_is_shouted():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    canaries = pd.DataFrame({"included": included.astype(int), "loss": np.where(included, 0.01, 2.0)
                             + rng.normal(0, 0.001, 1000)})
    run = {"dp": True, "epsilon": 0.5, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 5.0,
           "sample_rate": 0.01, "steps": 10, "max_grad_norm": 1.0, "poisson_sampling": True}
    rep = run_audit({"m": make_predictions()}, runs={"m": run}, canaries={"m": canaries},
                    config=AuditConfig(n_boot=10))
    priv = rep.models["m"]["privacy"]
    assert priv["soundness"]["violated"] is True and priv["empirical_epsilon"]["estimate"] > 0.5
    assert any("SOUNDNESS VIOLATION" in w for w in rep.warnings)
    assert "Soundness violation" in render_html(rep)
