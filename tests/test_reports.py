"""Reports: rendered from audit.json alone, autoescaped, with aggregates only; HTML, PDF and a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke
from privaudit.audit import run_audit
from privaudit.config import AuditConfig
from privaudit.errors import ConfigError, DataError
from privaudit.reports import render_html, write_report
from test_audit_engine import make_predictions

SECTIONS = ("Summary", "Model and intended use", "Data", "Privacy guarantee", "Utility", "Fairness",
            "Empirical privacy", "Trade-offs", "Warnings and limitations", "Provenance",
            "Appendix: per-label fairness tables")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.h2 = [], [], []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        self._in_h2 = False if tag == "h2" else self._in_h2

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data.strip())


def _dp_run(eps: float, sigma: float = 1.0) -> dict:
    return {"dp": True, "epsilon": eps, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": sigma,
            "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0, "poisson_sampling": True,
            "backend": "opacus", "architecture": "resnet9-gn", "seed": 0}


@pytest.fixture(scope="module")
def sweep_audit(tmp_path_factory) -> Path:
    """A stored audit.json of an epsilon sweep: four DP models (weaker signal at smaller epsilon) and a
    non-private one, all scored on the same test samples."""
    base = make_predictions(n=600, seed=5)
    preds, runs = {}, {}
    rng = np.random.default_rng(0)
    for eps, noise in ((1.0, 2.0), (3.0, 1.2), (8.0, 0.7), (30.0, 0.4)):
        df = base.copy()
        for lab in ("a", "b"):
            df[f"p_{lab}"] = 1 / (1 + np.exp(-(np.log(df[f"p_{lab}"] / (1 - df[f"p_{lab}"]))
                                               + rng.normal(0, noise, len(df)))))
        preds[f"eps={eps:g}/seed=0"], runs[f"eps={eps:g}/seed=0"] = df, _dp_run(eps)
    preds["eps=inf/seed=0"] = base
    rep = run_audit(preds, runs=runs, reference="eps=inf/seed=0", config=AuditConfig(n_boot=50))
    out = tmp_path_factory.mktemp("sweep") / "audit.json"
    rep.to_json(out)
    return out


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
    for pid in df["patient_id"].head(50):
        assert f">{pid}<" not in html
    # every section, in the order
    assert [h.split(". ", 1)[-1] for h in parser.h2 if h != "Contents"] == list(SECTIONS)


def test_data_section_has_composition_flags_and_split_check():
    df = make_predictions(n=400, seed=3, patients="pairs")
    df.loc[df.index[:6], "sex"] = "X"  # a tiny group: 3 patients, suppressed (schema_version 2)
    rep = run_audit({"m": df}, config=AuditConfig(n_boot=10))
    comp = rep.data["study"]["data"]["composition"]["sex"]["groups"]
    assert comp["X"] == {"n": None, "suppressed": True}
    assert comp["F"]["n"] == int((df["sex"] == "F").sum())
    assert sum(comp[g]["n_test"] for g in ("F", "M")) == int(((df["split"] == "test") & (df["sex"] != "X")).sum())
    check = rep.data["study"]["data"]["patient_split_check"]
    # patients come in pairs with independently drawn splits, so some sit in two splits
    pairs = df.groupby("patient_id")["split"].nunique()
    assert check["patients_in_several_splits"] == int((pairs > 1).sum()) > 0
    assert any("more than one split" in w for w in rep.warnings)
    html = render_html(rep)
    assert "Composition by sex" in html and "appear in more than one split" in html
    assert html.count("<svg") >= 2  # a composition bar chart per attribute


def test_report_errors(tmp_path):
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    rep.to_json(tmp_path / "audit.json")
    [out] = write_report(tmp_path / "audit.json")
    assert out.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(DataError, match="--template"):
        write_report(tmp_path / "audit.json", tmp_path / "r.html", template_dir=tmp_path / "nope")
    (tmp_path / "empty_tpl").mkdir()
    with pytest.raises(DataError, match="no report.html.j2"):
        write_report(tmp_path / "audit.json", tmp_path / "r.html", template_dir=tmp_path / "empty_tpl")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        write_report(tmp_path / "bad.json")
    newer = json.loads((tmp_path / "audit.json").read_text())
    newer["schema_version"] = 99
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    with pytest.raises(DataError, match="newer"):
        write_report(tmp_path / "newer.json")
    with pytest.raises(ConfigError, match="--format"):
        write_report(tmp_path / "audit.json", fmt="docx")
    assert not (tmp_path / "r.html").exists() and not list(tmp_path.glob(".*.tmp"))


def test_model_card_is_validated_and_shown(tmp_path):
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    rep.to_json(tmp_path / "audit.json")
    card = tmp_path / "card.toml"
    card.write_text('description = "Flags <b>findings</b>"\nout_of_scope = ["children", "lateral views"]\n')
    [out] = write_report(tmp_path / "audit.json", model_card=card)
    html = out.read_text()
    assert "Flags &lt;b&gt;findings&lt;/b&gt;" in html and "<li>lateral views</li>" in html
    card.write_text('descripton = "typo"\n')
    before = out.read_text()
    with pytest.raises(ConfigError, match="unknown model-card key 'descripton'"):
        write_report(tmp_path / "audit.json", model_card=card)
    card.write_text('out_of_scope = 3\n')
    with pytest.raises(ConfigError, match="'out_of_scope' must be text or a list of texts"):
        write_report(tmp_path / "audit.json", model_card=card)
    assert out.read_text() == before  # a refused card leaves the existing report alone


def test_figures_are_inline_svg_and_the_page_is_self_contained():
    df = make_predictions(n=800, seed=2)
    rep = run_audit({"a": df, "b": df.assign(p_a=1 - df["p_a"])}, config=AuditConfig(n_boot=30))
    html = render_html(rep)
    study = rep.data["study"]
    # one ROC per label; one fairness heatmap, one composition chart and one exposure forest plot per attribute;
    # one log-log ROC per attack; no trade-off curves without several epsilons
    attacks = {a for m in rep.data["models"].values() for a, v in m["privacy"]["attacks"].items() if v}
    assert "loss" in attacks
    expected = len(study["labels"]) + 3 * len(study["attributes"]) + len(attacks)
    assert html.count("<svg") == expected
    assert "there is no trade-off" in html
    assert not re.search(r"""(src|href)\s*=\s*["'](?!#)""", html)  # nothing points outside the file
    assert "url(http" not in html and "<script" not in html


def test_sweep_report_draws_the_trade_off_curves_and_warns_about_selection(sweep_audit):
    from privaudit.audit.results import AuditReport
    from privaudit.reports.figures import tradeoff_fairness_figure, tradeoff_utility_figure

    doc = AuditReport.from_json(sweep_audit).data
    html = render_html(AuditReport.from_json(sweep_audit))
    assert "privacy-utility" in tradeoff_utility_figure(doc)
    for attr in doc["study"]["attributes"]:
        assert f"privacy-fairness: {attr}" in tradeoff_fairness_figure(doc, attr)
    assert html.count("privacy-fairness:") == len(doc["study"]["attributes"])
    assert "covers that model alone" in html
    # the r of log(epsilon) vs macro AUROC in the table is the audit's, which recomputes with scipy
    from scipy.stats import pearsonr

    names = [n for n in doc["models"] if n != "eps=inf/seed=0"]
    r = pearsonr(np.log([doc["models"][n]["privacy"]["accountant"]["epsilon"] for n in names]),
                 [doc["models"][n]["utility"]["macro_auroc"]["estimate"] for n in names])[0]
    assert doc["study"]["trade_offs"]["macro_auroc"]["r"] == pytest.approx(r, abs=1e-9)
    assert f"{r:.3f}" in html


def test_policy_verdict_lands_in_the_summary(sweep_audit, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text('[policy]\nmodels = ["eps=8/seed=0"]\nmax_epsilon = 10.0\nmin_auroc = 0.99\n')
    [out] = write_report(sweep_audit, tmp_path / "r.html", policy=policy)
    html = out.read_text()
    summary = html[html.index('id="summary"'):html.index('id="model"')]
    assert "Policy p.toml: <strong>FAIL</strong>" in summary and "(1 of 2 checks pass)" in summary


def test_pdf_has_pages_contents_and_the_figures(sweep_audit, tmp_path):
    pypdf = pytest.importorskip("pypdf")
    try:
        import weasyprint  # noqa: F401
    except OSError as e:  # pragma: no cover - the Pango libraries are missing
        pytest.skip(f"WeasyPrint cannot load Pango here: {e}")
    html, pdf = write_report(sweep_audit, tmp_path / "report.html", fmt="both")
    assert html.suffix == ".html" and pdf.suffix == ".pdf" and pdf.read_bytes().startswith(b"%PDF")
    reader = pypdf.PdfReader(str(pdf))
    assert 6 <= len(reader.pages) <= 60
    first = reader.pages[0].extract_text()
    assert "Contents" in first and "Summary" in first
    text = "".join(p.extract_text() for p in reader.pages)
    for heading in SECTIONS:
        assert heading in text
    last = reader.pages[-1].extract_text()
    assert f"page {len(reader.pages)} of {len(reader.pages)}" in last  # page numbers from @page


def test_report_cli_formats_and_bad_input(study: Path, tmp_path: Path):
    res = invoke("report", study, "--format", "pdf", "--out", tmp_path / "r.pdf")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
    res = invoke("report", study, "--format", "docx", "--out", tmp_path / "r.docx")
    assert res.exit_code == 2 and "--format" in res.stderr and "Traceback" not in res.output
    bad = tmp_path / "trunc.json"
    bad.write_text((study / "audit.json").read_text()[:500])
    res = invoke("report", bad, "--out", tmp_path / "t.html")
    assert res.exit_code == 2 and "not valid JSON" in res.stderr and not (tmp_path / "t.html").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_a_real_browser(sweep_audit, tmp_path):
    """Open the report in headless Chromium: it renders a full page, with no console errors."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here: install Debian's 'chromium' package (make test does, as root)")
    from PIL import Image

    [html] = write_report(sweep_audit, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
           "--window-size=412,2000", f"--screenshot={shot}", html.as_uri()]  # a phone-wide viewport
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not re.search(r"CONSOLE|Uncaught|Failed to load resource", proc.stderr), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (412, 2000)
        px = np.asarray(im.convert("L"), dtype=float)
    # a rendered page has text and figures: many dark pixels, not a blank screen
    assert (px < 128).mean() > 0.01 and px.std() > 20


def test_a_soundness_violation_is_shouted():
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
    html = render_html(rep)
    assert "SOUNDNESS VIOLATION" in html and "soundness violated" in html  # in the section and the summary


def test_each_section_is_its_own_include_in_the_report_order():
    from jinja2 import meta

    from privaudit.reports.render import SECTIONS as NAMES, environment

    env = environment()
    source = env.loader.get_source(env, "report.html.j2")[0]
    refs = [r for r in meta.find_referenced_templates(env.parse(source)) if r.startswith("sections/")]
    assert refs == [f"sections/{n}.html.j2" for n in NAMES]
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    html = render_html(rep)
    ctx_ids = []
    for name in NAMES:
        body = env.loader.get_source(env, f"sections/{name}.html.j2")[0]
        m = re.search(r'<section id="([a-z-]+)">', body)
        assert m and m.group(1) == name.replace("_", "-")
        ctx_ids.append(html.index(f'<section id="{m.group(1)}">'))
    assert ctx_ids == sorted(ctx_ids)  # shown in the contents' order
    assert html.count("<section ") == len(NAMES)


def test_a_custom_template_folder_includes_and_overrides_packaged_sections(tmp_path):
    rep = run_audit({"m": make_predictions()}, config=AuditConfig(n_boot=10))
    rep.to_json(tmp_path / "audit.json")
    tpl = tmp_path / "tpl"
    (tpl / "sections").mkdir(parents=True)
    (tpl / "report.html.j2").write_text('<!DOCTYPE html><h1>Our {{ title }}</h1>\n'
                                        '{% include "sections/privacy.html.j2" %}\n'
                                        '{% include "sections/warnings.html.j2" %}\n')
    (tpl / "sections" / "warnings.html.j2").write_text("<p>house warnings: {{ warnings|length }}</p>")
    [out] = write_report(tmp_path / "audit.json", tmp_path / "r.html", template_dir=tpl)
    html = out.read_text()
    default = render_html(rep)
    packaged_privacy = default[default.index('<section id="privacy">'):default.index("</section>", default.index(
        '<section id="privacy">'))]
    assert "<h1>Our privaudit report" in html and packaged_privacy in html  # the packaged section, as is
    assert f"<p>house warnings: {len(rep.warnings)}</p>" in html and "Warnings and limitations" not in html
    assert 'id="utility"' not in html  # only what the custom page includes
    (tpl / "report.html.j2").write_text('{% include "sections/nope.html.j2" %}')
    with pytest.raises(DataError, match="no sections/nope.html.j2 in that folder or among privaudit's templates"):
        write_report(tmp_path / "audit.json", tmp_path / "r2.html", template_dir=tpl)
    assert not (tmp_path / "r2.html").exists()


def test_public_formatting_helpers_write_what_the_report_shows():
    from privaudit.reports import format_ci, format_number, format_p_value, format_percent, format_sci
    from privaudit.reports.render import _ci, environment

    assert format_number(0.81234) == "0.812" and format_number(0.81234, 1) == "0.8"
    assert format_number(None) == format_number(float("nan")) == "n/a"
    assert format_number(7) == "7" and format_number("rdp") == "rdp"
    assert format_ci({"estimate": 0.8, "ci_low": 0.7512, "ci_high": 0.84999}) == "0.800 (0.751 to 0.850)"
    assert format_ci({"estimate": 0.8, "ci_low": 0.7512, "ci_high": 0.84999}, digits=2) == "0.80 (0.75 to 0.85)"
    assert format_ci({"estimate": 0.8, "ci_low": None, "ci_high": None}) == "0.800"  # no interval: estimate alone
    assert format_ci({"estimate": None, "ci_low": 0.1, "ci_high": 0.2}) == format_ci(None) == format_ci({}) == "n/a"
    assert format_p_value(0.0004) == "<0.001" and format_p_value(0.0123) == "0.012" and format_p_value(None) == "n/a"
    assert format_percent(0.1234) == "12.3%" and format_percent(0.5, 0) == "50%" and format_sci(1e-5) == "1.0e-05"
    assert _ci({"estimate": 0.8, "ci_low": 0.7, "ci_high": 0.9}) == format_ci({"estimate": 0.8, "ci_low": 0.7, "ci_high": 0.9})  # the report filter is the public helper (plus "suppressed")
    # the template filters are these functions, so CLI text and report text agree
    env = environment()
    assert env.filters["ci"].__name__ == "format_ci" and env.filters["fmt"].__name__ == "format_number"
    assert env.filters["ci"](block0 := {"estimate": 0.8, "ci_low": 0.7, "ci_high": 0.9}) == format_ci(block0)
    block = {"estimate": 0.5, "ci_low": 0.25, "ci_high": 0.75}
    assert env.from_string("{{ b|ci(2) }}").render(b=block) == format_ci(block, 2) == "0.50 (0.25 to 0.75)"


# ---- a report that leads with figures (issue 19) ------------------------------------------------------------
_TITLE = re.compile(r'<g id="(heatmap-[^"]+)"><title>([^<]*)</title>')
_CELL = re.compile(r"^(?P<model>[^|]+) \| (?P<metric>[^|]+) \| (?P<label>[^|]+) \| (?P<row>[^:]+): "
                   r"(?:(?P<est>-?[0-9.]+) \(95% CI (?P<lo>-?[0-9.]+|n/a) to (?P<hi>-?[0-9.]+|n/a)\)|(?P<other>.+))$")


def _heatmap_entry(doc: dict, model: str, metric: str, label: str, row: str) -> dict:
    """The audit.json entry a heatmap cell stands for, found by its title's fields."""
    block = doc["models"][model]["fairness"]
    for attr, per_label in block.items():
        if attr == "pearson_r" or label not in per_label:
            continue
        entry = per_label[label].get(metric)
        group, _, versus = row.partition(" vs ")
        if metric == "performance_parity":
            if group in entry and not versus:
                return entry[group]
        elif "estimate" in entry and versus == entry.get("privileged"):
            return entry
        elif group in entry and isinstance(entry[group], dict) and versus == entry[group].get("privileged"):
            return entry[group]
    raise KeyError((model, metric, label, row))


@pytest.fixture(scope="module")
def default_study(tmp_path_factory) -> Path:
    """audit.json of a study shaped like the default ``train-and-audit cxr`` (5 labels; sex, age group and
    comorbidity; private and non-private), from prediction tables (tests/study_data.py)."""
    from study_data import default_study_predictions

    preds, runs = default_study_predictions()
    rep = run_audit(preds, runs=runs, reference="non_private", config=AuditConfig(n_boot=50), task="cxr")
    out = tmp_path_factory.mktemp("default") / "audit.json"
    rep.to_json(out)
    return out


def test_heatmaps_carry_the_numbers_of_audit_json(default_study):
    """Every heatmap cell's tooltip (SVG <title>) names its model, metric, label and group, with the estimate
    and interval of audit.json; every non-suppressed selection and parity value of audit.json has one; the print
    table lists the same values."""
    from privaudit.audit.results import AuditReport

    doc = json.loads(default_study.read_text())
    html = render_html(AuditReport.from_json(default_study))
    fairness = html[html.index('<section id="fairness">'):html.index('<section id="empirical-privacy">')]
    titles = _TITLE.findall(fairness)
    assert titles and len({gid for gid, _ in titles}) == len(titles)
    seen = set()
    for _, text in titles:
        m = _CELL.match(text.replace("&amp;", "&"))
        assert m, text
        entry = _heatmap_entry(doc, m["model"], m["metric"], m["label"], m["row"])
        if m["est"] is None:
            assert entry.get("suppressed") or entry.get("estimate") is None, text
            continue
        assert float(m["est"]) == pytest.approx(entry["estimate"], abs=5e-4), text
        assert float(m["lo"]) == pytest.approx(entry["ci_low"], abs=5e-4)
        assert float(m["hi"]) == pytest.approx(entry["ci_high"], abs=5e-4)
        seen.add((m["model"], m["metric"], m["label"], m["row"]))
    n_values = 0
    for model, mb in doc["models"].items():
        for attr, per_label in mb["fairness"].items():
            if attr == "pearson_r":
                continue
            for label, block in per_label.items():
                for metric in ("performance_parity", "statistical_parity_difference", "disparate_impact",
                               "equal_opportunity_difference", "average_odds_difference"):
                    entry = block[metric]
                    values = [entry] if "estimate" in entry else [v for v in entry.values() if "estimate" in v]
                    n_values += sum(v["estimate"] is not None for v in values)
    assert len(seen) == n_values  # each value of audit.json is in exactly one cell
    # the print view: a table under each heatmap, hidden on screen, shown in print, with the same estimates
    assert '<table class="print-only tiny">' in fairness
    css = (Path(__file__).parents[1] / "privaudit/reports/templates/report.css").read_text()
    assert ".print-only { display: none; }" in css and "table.print-only { display: table; }" in css
    parity = doc["models"]["private"]["fairness"]["age_group"]["macro"]["performance_parity"]["81+"]
    assert f"{parity['estimate']:.3f} ({parity['ci_low']:.2f}, {parity['ci_high']:.2f})" in fairness


def test_the_report_leads_with_figures_and_both_verdicts(default_study):
    from privaudit.audit.results import AuditReport

    doc = json.loads(default_study.read_text())
    html = render_html(AuditReport.from_json(default_study))
    summary = html[html.index('<section id="summary">'):html.index('<section id="model">')]
    comp = doc["comparisons"]["private vs non_private"]
    assert "Does DP amplify unfairness?" in summary and "Does DP narrow or widen the privacy gap?" in summary
    for attr in ("sex", "age_group", "comorbidity"):
        row = summary[summary.index(f"<td>{attr}</td>"):].split("</tr>")[0]
        assert f"<strong>{comp['fairness_verdict'][attr]['answer']}</strong>" in row
        assert f"<strong>{comp['privacy_gap_verdict'][attr]['answer']}</strong>" in row
    fairness = html[html.index('<section id="fairness">'):html.index('<section id="empirical-privacy">')]
    for attr in ("sex", "age_group", "comorbidity"):  # each attribute opens with its figure, then the verdict
        part = fairness[fairness.index(f"<h3>{attr}</h3>"):]
        assert part.index("<svg") < part.index("Does DP amplify unfairness by")
        mdc = comp["fairness_verdict"][attr]["minimum_detectable_change"]["smallest"]
        assert f"a parity gap of {mdc:.3f} AUROC" in part.split("<h3>")[1]
    assert "Statistical parity difference</th>" not in fairness  # the long tables moved to the appendix
    appendix = html[html.index('<section id="appendix">'):]
    assert "Statistical parity difference</th>" in appendix and 'class="compact selection screen-only"' in appendix
    privacy = html[html.index('<section id="empirical-privacy">'):html.index('<section id="trade-offs">')]
    assert privacy.count(": who is served and who is exposed") == 3  # one forest plot per attribute
    assert "Does DP narrow or widen the privacy gap? (private vs non_private)" in privacy
    assert comp["privacy_gap_verdict"]["age_group"]["reason"].replace("±", "&plusmn;")[:40] in privacy.replace(
        "±", "&plusmn;")
    f = doc["models"]["non_private"]["privacy"]["attacks"]["loss"]["by_group"]["sex"]["F"]
    assert f"{f['fpr_at_global_threshold']['estimate']:.3f} ({f['fpr_at_global_threshold']['ci_low']:.3f}" in privacy


def test_the_default_study_pdf_is_shorter_with_every_section(default_study, tmp_path):
    """The same audit.json rendered by privaudit before this layout (main at 092a38a) took 19 A4 pages; the
    heatmaps and the appendix bring it to 17 here. Every section is there, the appendix last."""
    pypdf = pytest.importorskip("pypdf")
    try:
        import weasyprint  # noqa: F401
    except OSError as e:  # pragma: no cover - the Pango libraries are missing
        pytest.skip(f"WeasyPrint cannot load Pango here: {e}")
    [pdf] = write_report(default_study, tmp_path / "report.pdf", fmt="pdf")
    reader = pypdf.PdfReader(str(pdf))
    assert len(reader.pages) < 19
    text = "".join(p.extract_text() for p in reader.pages)
    for k, heading in enumerate(SECTIONS, start=1):
        assert f"{k}. {heading}" in text, heading
    assert "fairness by label and group" in text and "who is served and who is exposed" in text
    first = " ".join((reader.pages[0].extract_text() + reader.pages[1].extract_text()).split())
    assert "narrow or widen the privacy gap?" in first  # the summary's verdict table
