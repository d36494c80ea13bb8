"""Synthetic chest-radiograph cohort with known ground truth, for the ``cxr`` task.

Real chest radiograph cohorts cannot ship with a tool, yet every stage of privaudit (DP training, utility,
fairness and privacy audits) needs data with the shape of one. :func:`synthesize_cxr` writes such a cohort:
procedural frontal radiographs (8-bit greyscale PNGs), a manifest in the canonical format of
:mod:`privaudit.data.manifest`, and ``cohort.json``, which records every generating choice, so that an audit
run on the cohort can be checked against the truth that was planted in it.

How a cohort is made
--------------------
1. Patients: sex, age (18-95 years, every age group of :data:`privaudit.tasks.AGE_GROUPS` populated) and a
   0/1 comorbidity flag whose probability rises with age. Each patient has several studies (1 + a geometric
   count of mean 1.4, capped at 12) and each study one frontal view, sometimes two (25%): about 3 images per
   patient, median 2, with a long tail (about 2% of patients have 10 or more). A patient's images share sex,
   comorbidity and anatomy; age grows by 0-2 years from one study to the next; a study mostly repeats the
   previous study's findings; the views of one study share age, findings, labels and signs.
2. Labels (per study): one logistic model per finding, drawn in task-label order so that each finding may
   depend on those drawn before it (congestion on cardiomegaly; effusion on both; atelectasis on effusion), which
   gives the label correlations of real data. About 2% of label cells are left blank (unknown).
3. Splits: train/val/test about 70/10/20 of the patients, drawn per patient.
4. Images: anatomy (body, spine, two lung fields over diaphragm domes, heart shadow, ribs, vessels), drawn
   once per patient, shifted per study (depth of inspiration, heart width) and per image (position, tilt,
   exposure and noise); each positive finding adds its sign (see :data:`LABEL_DOCS`)
   with a *sign strength* = base amplitude x visibility(age, sex) x per-positive severity. A fraction of
   positives have a near-invisible sign, which caps the attainable AUROC.

Planted subgroup effects (see :data:`PLANTED_EFFECTS`): older patients' images have lower contrast, more
noise and fainter signs (81+ worst by far); women's effusions are much fainter and overlaid by breast shadows;
patients with comorbidity often carry monitoring leads and electrodes, and a lead lying across a lung base looks
like plate-like atelectasis. Each effect names the audit.json gap that shows it (its ``audit`` entry), and
:func:`check_planted_effects` reads those gaps from an audit; ``benchmarks/planted_effects.py`` checks that a
model trained without DP at the default size shows each one (planted direction, patient-clustered CI
excluding zero).

Calibration: with the defaults (n=3000 images of about 1,020 patients, 64 x 64), the cxr task's default model
(ResNet-9 with GroupNorm, width 32) trained without DP for 5 epochs reaches a macro test AUROC of about 0.8.

Orientation follows the radiological convention of a PA film: the patient's left is on the image's right,
so the heart shadow lies below and to the right of the image centre.

The public cohort (``public=True``) is drawn from separate random streams, with a ``PUB`` patient prefix
and a younger, sex-balanced, less comorbid population with fewer repeat studies (about 2.3 images per
patient); image physics and the label model are shared.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from privaudit._version import __version__ as PRIVAUDIT_VERSION
from privaudit._fs import atomic_write_csv, write_json
from privaudit.data.manifest import splits_from_order
from privaudit.errors import ConfigError
from privaudit.limits import check_limit
from privaudit.tasks import AGE_GROUPS, age_group, create_task

GENERATOR = "privaudit.data.synth_cxr"
GENERATOR_VERSION = "2.0.0"

LABELS: tuple[str, ...] = create_task("cxr").labels
MANIFEST_COLUMNS: tuple[str, ...] = ("sample_id", "path", "split", "patient_id", *LABELS, "sex", "age", "comorbidity")

AGE_MIN, AGE_MAX = 18, 95
AGE_CENTRE = 60            # the label and comorbidity models use (age - 60) / 10
# Images per patient: 1 + Geometric studies (capped), each with one frontal view and sometimes a second one.
MAX_STUDIES = 12
SECOND_VIEW_PROB = 0.25
YEARS_BETWEEN_STUDIES = (0.5, 0.35, 0.15)   # P(0, 1, 2 years) from one study to the next
FOLLOWUP_SAME_FINDINGS = 0.8   # chance a follow-up study repeats the previous study's findings
STUDY_INSPIRATION_SD = 0.025   # study-to-study shift of the diaphragm (depth of inspiration)
STUDY_HEART_SD = 0.02          # study-to-study relative change of the heart shadow's width
MISSING_LABEL_RATE = 0.02
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


@dataclass(frozen=True)
class CohortDesign:
    """Population parameters that differ between the private and the public cohort."""

    role: str
    stream: int                  # keeps the two cohorts' random streams apart for the same seed
    patient_prefix: str
    p_male: float
    age_beta: tuple[float, float]  # age = 18 + (95 - 18) * Beta(a, b), rounded down
    comorbidity_logit: dict[str, float]
    mean_extra_studies: float      # studies per patient = 1 + Geometric(mean this), capped at MAX_STUDIES


PRIVATE = CohortDesign(
    role="private",
    stream=0,
    patient_prefix="PRV",
    p_male=0.58,
    age_beta=(1.8, 1.3),   # median about 65 years: an inpatient population
    comorbidity_logit={"intercept": -0.7, "age_per_decade": 0.45, "male": 0.2},
    mean_extra_studies=1.4,   # about 3 images per patient, as in CheXpert (3.4) and below MIMIC-CXR (5.8)
)
PUBLIC = CohortDesign(
    role="public",
    stream=1,
    patient_prefix="PUB",
    p_male=0.5,
    age_beta=(1.5, 1.5),   # median 57 years, wider spread: a screening-like population
    comorbidity_logit={"intercept": -1.3, "age_per_decade": 0.45, "male": 0.0},
    mean_extra_studies=0.8,   # screening: fewer repeat studies
)

# Logistic label model, logit P(label = 1) = intercept + sum(coef * term), where the terms are
# age_per_decade = (age - 60) / 10, male (0/1), comorbidity (0/1) and earlier labels (0/1). Labels are
# drawn in task order, so a label's parents always precede it.
LABEL_MODEL: dict[str, dict[str, float]] = {
    "cardiomegaly": {"intercept": -1.0, "age_per_decade": 0.45, "male": 0.25, "comorbidity": 0.5},
    "congestion": {"intercept": -2.6, "age_per_decade": 0.2, "comorbidity": 0.7, "cardiomegaly": 1.3},
    "pleural_effusion": {
        "intercept": -2.2, "age_per_decade": 0.3, "comorbidity": 0.5, "cardiomegaly": 0.6, "congestion": 1.0,
    },
    "pneumonic_infiltrates": {"intercept": -1.9, "age_per_decade": 0.1, "male": 0.15, "comorbidity": 0.5},
    "atelectasis": {"intercept": -1.0, "age_per_decade": 0.15, "comorbidity": 0.2, "pleural_effusion": 0.9},
}

# How strongly each sign is drawn per unit of sign strength (attenuation units; lung vs soft tissue is 0.3).
SIGN_AMPLITUDE: dict[str, float] = {
    "cardiomegaly": 0.43,             # relative widening of the heart shadow
    "congestion": 0.13,               # perihilar haze
    "pleural_effusion": 0.38,         # fluid density (capped at strength 1)
    "pneumonic_infiltrates": 0.38,    # each patch
    "atelectasis": 1.0,               # plate-like band
}
ATELECTASIS_BAND_FRACTION = 0.8
ATELECTASIS_LIFT = 0.3    # hemidiaphragm elevation per unit strength for volume-loss atelectasis

LABEL_DOCS: dict[str, str] = {
    "cardiomegaly": f"heart shadow widened: its half-width is scaled by 1 + {SIGN_AMPLITUDE['cardiomegaly']} x "
                    "strength, raising the cardiothoracic ratio (normal half-width varies 0.22-0.26)",
    "congestion": f"bilateral perihilar haze: Gaussian brightening around both hila (amplitude "
                  f"{SIGN_AMPLITUDE['congestion']} x strength) with faint lower-zone haze, over normal hilar "
                  "vessels of varying density",
    "pleural_effusion": "basal opacity in one (70%) or both lungs with a meniscus-shaped upper edge that climbs "
                        "laterally, blunting the costophrenic angle; height and density (up to "
                        f"{SIGN_AMPLITUDE['pleural_effusion']}) grow with strength",
    "pneumonic_infiltrates": "2-4 blurred, textured patchy opacities in one or both lung fields "
                             f"(amplitude {SIGN_AMPLITUDE['pneumonic_infiltrates']} x strength each)",
    "atelectasis": f"either a thin plate-like band in a lower/mid zone ({ATELECTASIS_BAND_FRACTION:.0%}; amplitude "
                   f"{SIGN_AMPLITUDE['atelectasis']} x strength) or volume loss: a hemidiaphragm raised by "
                   f"{ATELECTASIS_LIFT} x strength with a faint basal opacity",
}

# Sign strength = visibility(age, sex) * severity. Severity of a positive: with probability WEAK_FRACTION
# a near-invisible sign (uniform on WEAK_SEVERITY), else uniform on SEVERITY.
WEAK_FRACTION = 0.15
WEAK_SEVERITY = (0.0, 0.15)
SEVERITY = (0.45, 1.35)

# Age difficulty rises from 0 at age 50 to 1 at age 90, slowly at first: old = clip((age - 50) / 40, 0, 1) ** 2
# (0.14 at 65, 0.39 at 75, 0.77 at 85), so that the oldest stand apart.
AGE_RAMP = (50, 90)
AGE_SIGN_FADE = 0.7         # visibility *= 1 - 0.7 * old
AGE_CONTRAST_LOSS = 0.45    # contrast *= 1 - 0.45 * old
NOISE_BASE, NOISE_AGE = 0.025, 0.06   # white-noise sd = 0.025 + 0.06 * old
FEMALE_EFFUSION_VISIBILITY = 0.35
FEMALE_BREAST_SHADOW = (0.06, 0.15)    # density range of the breast-shadow overlay
LEAD_DENSITY = 0.3
LEADS_OVER_LUNG = (0, 4)               # studies with devices: 0-4 leads (uniform) lie across the lung bases
LEAD_OVER_LUNG_DENSITY = (0.5, 1.5)    # that lead's density, in units of the atelectasis band's amplitude
DEVICE_PROB = {0: 0.05, 1: 0.9}        # chance of monitoring leads / electrodes in a study, by comorbidity

# How an audit shows each planted effect: the performance-parity gap (the group's AUROC minus the n-weighted
# mean AUROC of the other groups; audit.json models.<m>.fairness.<attribute>.<label>.performance_parity.<group>)
# is negative, with a CI that excludes zero, for a model trained without DP at the default size.
PLANTED_EFFECTS: list[dict] = [
    {
        "name": "age_image_quality",
        "description": "older patients' radiographs have lower contrast, more noise and fainter finding "
                       "signs (poorer inspiration and positioning); difficulty rises from age 50 to 90, "
                       "slowly at first (quadratically), so that the oldest are hardest by far",
        "parameters": {
            "ramp_ages": list(AGE_RAMP),
            "old": f"clip((age - {AGE_RAMP[0]}) / {AGE_RAMP[1] - AGE_RAMP[0]}, 0, 1) ** 2",
            "sign_visibility": f"1 - {AGE_SIGN_FADE} * old",
            "contrast_factor": f"1 - {AGE_CONTRAST_LOSS} * old",
            "noise_sd": f"{NOISE_BASE} + {NOISE_AGE} * old",
        },
        "attribute": "age_group",
        "labels": list(LABELS),
        "expected_lower_auroc": "81+",
        "expected_order": "81+ lowest; the groups under 61 highest",
        "audit": {"attribute": "age_group", "label": "macro", "group": "81+", "metric": "performance_parity",
                  "direction": "negative"},
    },
    {
        "name": "female_effusion_subtlety",
        "description": "women's pleural effusions are drawn fainter and their lung bases are overlaid by breast "
                       "shadows of similar density, so effusions are harder to see in women",
        "parameters": {
            "effusion_visibility_female": FEMALE_EFFUSION_VISIBILITY,
            "breast_shadow_density": list(FEMALE_BREAST_SHADOW),
        },
        "attribute": "sex",
        "labels": ["pleural_effusion"],
        "expected_lower_auroc": "F",
        "note": "only effusion signs are drawn fainter in women; breast shadows lie over the bases in every "
                "woman's image, but effusion is the finding they resemble",
        "audit": {"attribute": "sex", "label": "pleural_effusion", "group": "F", "metric": "performance_parity",
                  "direction": "negative"},
    },
    {
        "name": "comorbidity_devices",
        "description": "patients with comorbidity often carry ECG leads and electrodes (bright lines and "
                       "discs); 0-4 leads lie across the lung bases, each just like plate-like atelectasis; "
                       "comorbid patients also have more co-occurring findings",
        "parameters": {"device_probability": {str(k): v for k, v in DEVICE_PROB.items()},
                       "lead_density": LEAD_DENSITY, "leads_over_lung_bases": list(LEADS_OVER_LUNG),
                       "lead_over_lung_base_density": [round(SIGN_AMPLITUDE["atelectasis"] * d, 4)
                                                       for d in LEAD_OVER_LUNG_DENSITY]},
        "attribute": "comorbidity",
        "labels": ["atelectasis"],
        "expected_lower_auroc": "1",
        "note": "comorbid patients are also older, so the age effect lowers their AUROC on every label too",
        "audit": {"attribute": "comorbidity", "label": "atelectasis", "group": "1", "metric": "performance_parity",
                  "direction": "negative"},
    },
]


def check_planted_effects(fairness: Mapping, effects: list[dict] | None = None) -> list[dict]:
    """For each planted effect, the audit's gap and whether it shows: planted direction, CI excluding zero.

    ``fairness`` is one model's fairness block of audit.json (``models.<name>.fairness``); ``effects`` the
    planted effects (default :data:`PLANTED_EFFECTS`, or the list read from a cohort.json). Returns one dict
    per effect: ``name``, ``attribute``, ``label``, ``group``, ``estimate``, ``ci_low``, ``ci_high`` and
    ``shown`` (False when the gap is missing: an attribute or group absent from the audit).
    """
    out = []
    for effect in PLANTED_EFFECTS if effects is None else effects:
        spec = effect["audit"]
        gap = (((fairness.get(spec["attribute"]) or {}).get(spec["label"]) or {}).get(spec["metric"]) or {}).get(
            spec["group"]) or {}
        est, low, high = (gap.get(k) for k in ("estimate", "ci_low", "ci_high"))
        if spec["direction"] not in ("negative", "positive"):
            raise ConfigError(f"planted effect {effect['name']!r}: direction {spec['direction']!r} must be "
                              "'negative' or 'positive'")
        shown = None not in (est, low, high) and (
            high < 0 if spec["direction"] == "negative" else low > 0)
        out.append({"name": effect["name"], **{k: spec[k] for k in ("attribute", "label", "group", "direction")},
                    "estimate": est, "ci_low": low, "ci_high": high, "shown": bool(shown)})
    return out


# ---------------------------------------------------------------------------------------------------------
# Cohort table (demographics, labels, splits): cheap, no images.
# ---------------------------------------------------------------------------------------------------------


def _terms(age: np.ndarray, male: np.ndarray, comorbidity: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "age_per_decade": (np.asarray(age, float) - AGE_CENTRE) / 10.0,
        "male": np.asarray(male, float),
        "comorbidity": np.asarray(comorbidity, float),
    }


def _linear(coefs: Mapping[str, float], values: Mapping[str, np.ndarray]) -> np.ndarray:
    z = np.full(len(values["male"]), coefs["intercept"], dtype=float)
    for term, coef in coefs.items():
        if term != "intercept":
            z = z + coef * values[term]
    return z


def _draw_labels(rng: np.random.Generator, terms: dict[str, np.ndarray]) -> np.ndarray:
    """Draw all labels, in task order, each conditional on the covariates and the labels before it."""
    values = dict(terms)
    out = np.zeros((len(terms["male"]), len(LABELS)), dtype=np.int64)
    for j, label in enumerate(LABELS):
        p = expit(_linear(LABEL_MODEL[label], values))
        out[:, j] = rng.random(len(p)) < p
        values[label] = out[:, j].astype(float)
    return out


def model_prevalence(age: np.ndarray, male: np.ndarray, comorbidity: np.ndarray) -> dict[str, float]:
    """Prevalence of each label implied by :data:`LABEL_MODEL` for the given covariates (exact).

    Marginalises over the parent labels by enumerating all 2**5 label combinations.
    """
    terms = _terms(age, male, comorbidity)
    n = len(terms["male"])
    marginal = np.zeros((n, len(LABELS)))
    for combo in range(2 ** len(LABELS)):
        bits = [(combo >> j) & 1 for j in range(len(LABELS))]
        values = dict(terms)
        joint = np.ones(n)
        for j, label in enumerate(LABELS):
            p = expit(_linear(LABEL_MODEL[label], values))
            joint *= p if bits[j] else 1.0 - p
            values[label] = np.full(n, float(bits[j]))
        marginal += joint[:, None] * np.asarray(bits, float)[None, :]
    return {label: float(marginal[:, j].mean()) for j, label in enumerate(LABELS)}


def sample_cohort(n: int, *, seed: int = 0, public: bool = False) -> pd.DataFrame:
    """Draw the manifest table of a cohort of ``n`` images (demographics, labels, splits), without images.

    Returns the manifest columns in order, labels as nullable integers (``<NA>`` = unknown). It is exactly
    the table :func:`synthesize_cxr` writes for the same arguments.
    """
    _check_args(n, seed)
    return _draw_cohort(n, seed, PUBLIC if public else PRIVATE).frame


def draw_studies(rng: np.random.Generator, n_patients: int, design: CohortDesign) -> list[np.ndarray]:
    """Each patient's studies, as the number of frontal views in each (1 or 2).

    Studies: 1 + a geometric count (a negative binomial with r = 1) of mean ``design.mean_extra_studies``,
    capped at :data:`MAX_STUDIES`; each study holds one frontal view and, with probability
    :data:`SECOND_VIEW_PROB`, a second one (an AP film or a repeat exposure).
    """
    extra = rng.negative_binomial(1, 1.0 / (1.0 + design.mean_extra_studies), size=n_patients)
    studies = np.minimum(1 + extra, MAX_STUDIES)
    second = (rng.random((n_patients, MAX_STUDIES)) < SECOND_VIEW_PROB).astype(np.int64)
    return [1 + second[i, :k] for i, k in enumerate(studies)]


@dataclass(frozen=True)
class _Cohort:
    frame: pd.DataFrame      # the manifest table
    truth: np.ndarray        # (n, labels) 0/1 findings, including the cells blanked in the table
    patient: np.ndarray      # per image: the patient's index
    study: np.ndarray        # per image: the study's number within its patient (0-based)
    drawn_per_patient: np.ndarray   # images each patient was drawn with, before the last one was cut to n


def _draw_cohort(n: int, seed: int, design: CohortDesign) -> _Cohort:
    """The manifest table, the truth behind it and each image's patient and study."""
    rng = np.random.default_rng([seed, design.stream, 0])

    # Patients until n images: the last patient's images are cut so that the total is exactly n.
    views = draw_studies(rng, n, design)
    drawn = np.array([int(v.sum()) for v in views])
    n_patients = int(np.searchsorted(np.cumsum(drawn), n)) + 1
    views, drawn = views[:n_patients], drawn[:n_patients]
    views[-1] = _cut(views[-1], n - int(drawn[:-1].sum()))
    n_studies = np.array([len(v) for v in views])

    male = (rng.random(n_patients) < design.p_male).astype(np.int64)
    age0 = AGE_MIN + np.floor((AGE_MAX - AGE_MIN + 1) * rng.beta(*design.age_beta, size=n_patients)).astype(np.int64)
    p_comorbidity = expit(_linear(design.comorbidity_logit, _terms(age0, male, np.zeros(n_patients))))
    comorbidity = (rng.random(n_patients) < p_comorbidity).astype(np.int64)

    # One row per study: the patient grows older between studies and mostly keeps the findings.
    s_patient = np.repeat(np.arange(n_patients), n_studies)
    s_index = np.concatenate([np.arange(c) for c in n_studies])
    years = np.where(s_index > 0, rng.choice(len(YEARS_BETWEEN_STUDIES), size=len(s_index),
                                             p=YEARS_BETWEEN_STUDIES), 0)
    s_age = np.minimum(age0[s_patient] + _cumsum_within(years, s_index), AGE_MAX)
    s_labels = _draw_labels(rng, _terms(s_age, male[s_patient], comorbidity[s_patient]))
    repeat = rng.random(len(s_index)) < FOLLOWUP_SAME_FINDINGS
    for v in range(1, int(n_studies.max())):
        rows = np.flatnonzero((s_index == v) & repeat)
        s_labels[rows] = s_labels[rows - 1]   # rows of a patient are consecutive
    # The report of a study labels all its views, so a blank (unknown) cell is blank in each of them.
    s_unknown = rng.random(s_labels.shape) < MISSING_LABEL_RATE

    patient_split = splits_from_order(rng.permutation(n_patients), tuple(SPLIT_FRACTIONS.values()))

    per_study_views = np.concatenate(views)
    study_row = np.repeat(np.arange(len(s_index)), per_study_views)
    view = np.concatenate([np.arange(c) for c in per_study_views])
    patient = s_patient[study_row]
    width = max(5, len(str(n_patients)))
    ids = np.array([f"{design.patient_prefix}{i:0{width}d}" for i in range(n_patients)], dtype=object)
    patient_id = ids[patient]
    sample_id = [f"{pid}_s{s + 1}_v{v + 1}" for pid, s, v in zip(patient_id, s_index[study_row], view)]
    frame = pd.DataFrame({
        "sample_id": sample_id,
        "path": [f"images/{s}.png" for s in sample_id],
        "split": patient_split[patient],
        "patient_id": patient_id,
    })
    labels, unknown = s_labels[study_row], s_unknown[study_row]
    for j, label in enumerate(LABELS):
        frame[label] = pd.array(np.where(unknown[:, j], pd.NA, labels[:, j]), dtype="Int64")
    frame["sex"] = np.where(male[patient] == 1, "M", "F")
    frame["age"] = s_age[study_row].astype(np.int64)
    frame["comorbidity"] = comorbidity[patient]
    return _Cohort(frame[list(MANIFEST_COLUMNS)], labels, patient, s_index[study_row], drawn)


def _cut(views: np.ndarray, keep: int) -> np.ndarray:
    """The first ``keep`` images of a patient's studies (in study order)."""
    ends = np.cumsum(views)
    last = int(np.searchsorted(ends, keep))
    out = views[:last + 1].copy()
    out[-1] -= int(ends[last]) - keep
    return out


def _cumsum_within(step: np.ndarray, visit: np.ndarray) -> np.ndarray:
    """Running sum of ``step`` that restarts at every patient's first row (visit 0)."""
    total = np.cumsum(step)
    start = np.maximum.accumulate(np.where(visit == 0, np.arange(len(step)), 0))
    return total - total[start]


# ---------------------------------------------------------------------------------------------------------
# Image rendering. Coordinates: x from -1 (image left = patient's right) to 1, y from -1 (top) to 1.
# Intensities are X-ray attenuation in arbitrary units: 0 air, ~0.45 soft tissue; bright = dense.
# ---------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    # float32 halves the cost of the many whole-image operations; 8-bit output needs no more precision.
    return x.astype(np.float32), y.astype(np.float32)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, edge: float) -> np.ndarray:
    """Soft 0..1 mask of an axis-aligned ellipse; ``edge`` is the width of the soft border."""
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return expit((1.0 - r) * min(a, b) / edge)


def _normal(rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
    return rng.standard_normal(like.shape, dtype=np.float32)


def _old(age: float) -> float:
    return float(np.clip((age - AGE_RAMP[0]) / (AGE_RAMP[1] - AGE_RAMP[0]), 0.0, 1.0)) ** 2


def _severity(rng: np.random.Generator) -> float:
    lo, hi = WEAK_SEVERITY if rng.random() < WEAK_FRACTION else SEVERITY
    return float(rng.uniform(lo, hi))


@dataclass(frozen=True)
class Anatomy:
    """A patient's own build, shared by all their images; sides are -1 (right lung, image left) and +1."""

    body_width: float                 # half-width of the body outline
    spine: float                      # density of the spine
    lung_x: tuple[float, float]       # lung centres' offset from +-0.38
    lung_width: tuple[float, float]   # lung half-widths
    lung_base: tuple[float, float]    # hemidiaphragm levels (right one higher) at normal inspiration
    dome: tuple[float, float]         # dome heights
    heart_x: float                    # heart centre's offset from x = 0.1
    heart_width: float
    heart_height: float
    rib_period: float
    rib_phase: float
    rib_density: float
    vessel_density: float
    vessel_seed: int                  # seeds the vascular texture, so it is the same in every image
    hila: float                       # density of the normal hilar vessels
    breast: float                     # density of the breast shadows (drawn for women only)


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy (the same number of draws whatever the patient's sex)."""
    lung_x, lung_width, lung_base, dome = [], [], [], []
    for side in (-1.0, 1.0):
        lung_x.append(float(rng.normal(0, 0.015)))
        lung_width.append(float(rng.uniform(0.25, 0.29)))
        lung_base.append((0.52 if side < 0 else 0.56) + float(rng.normal(0, 0.03)))
        dome.append(float(rng.uniform(0.1, 0.16)))
    return Anatomy(
        body_width=float(rng.uniform(0.82, 0.9)), spine=float(rng.uniform(0.04, 0.08)),
        lung_x=tuple(lung_x), lung_width=tuple(lung_width), lung_base=tuple(lung_base), dome=tuple(dome),
        heart_x=float(rng.normal(0, 0.02)), heart_width=float(rng.uniform(0.22, 0.26)),
        heart_height=float(rng.uniform(0.2, 0.24)), rib_period=float(rng.uniform(0.15, 0.19)),
        rib_phase=float(rng.uniform(0, 2 * np.pi)), rib_density=float(rng.uniform(0.015, 0.04)),
        vessel_density=float(rng.uniform(0.02, 0.04)), vessel_seed=int(rng.integers(2**31)),
        hila=float(rng.uniform(0.02, 0.06)), breast=float(rng.uniform(*FEMALE_BREAST_SHADOW)),
    )


def render_cxr(
    row: Mapping,
    truth: np.ndarray,
    rng: np.random.Generator,
    size: int,
    *,
    anatomy: Anatomy | None = None,
    study: np.random.Generator | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Draw one radiograph; return it as uint8 and the sign strength of each positive finding.

    ``row`` gives the demographics (``sex``, ``age``, ``comorbidity``); ``truth`` the 0/1 findings in
    :data:`LABELS` order, including those whose label is blank in the manifest (unknown to the annotator,
    yet present in the patient). Three things are drawn apart: the patient's ``anatomy`` (drawn from
    ``rng`` when not given); the ``study`` stream (depth of inspiration, heart size, devices, and one
    stream per finding for its sign), which a study's views share; and, from ``rng``, the acquisition of
    this image (positioning, exposure, noise). So the same ``rng`` seed with different ``truth`` draws the
    same person, and the same sign for each finding present in both.
    """
    acquisition, own_study, own_anatomy = rng.spawn(3)
    anatomy = anatomy if anatomy is not None else draw_anatomy(own_anatomy)
    # A Generator built afresh from the study's seed spawns the same children in every view.
    event_rng, *streams = (study if study is not None else own_study).spawn(1 + len(LABELS))
    sign_rngs = dict(zip(LABELS, streams))
    x0, y0 = _grid(size)
    px = 2.0 / size                       # one pixel in normalised units
    edge = 0.6 * px
    old = _old(float(row["age"]))
    female = row["sex"] == "F"

    strength: dict[str, float] = {}
    visibility = 1.0 - AGE_SIGN_FADE * old
    for label, present in zip(LABELS, truth):
        if present:
            factor = FEMALE_EFFUSION_VISIBILITY if (female and label == "pleural_effusion") else 1.0
            strength[label] = visibility * factor * _severity(sign_rngs[label])

    # Atelectasis is drawn either as a plate-like band or as volume loss of one lung.
    atel_band = sign_rngs["atelectasis"].random() < ATELECTASIS_BAND_FRACTION
    atel_side = float(sign_rngs["atelectasis"].choice([-1.0, 1.0]))
    lift = {-1.0: 0.0, 1.0: 0.0}   # hemidiaphragm elevation per side
    if "atelectasis" in strength and not atel_band:
        lift[atel_side] = ATELECTASIS_LIFT * strength["atelectasis"]
    # This study's depth of inspiration and heart size, and whether leads and electrodes are on the chest.
    inspiration = event_rng.normal(0.0, STUDY_INSPIRATION_SD)
    heart_change = 1.0 + event_rng.normal(0.0, STUDY_HEART_SD)
    has_devices = event_rng.random() < DEVICE_PROB[int(row["comorbidity"])]

    # Patient positioning: scale, shift and a small tilt, applied to the coordinate grid.
    scale = acquisition.uniform(0.9, 1.06)
    tilt = acquisition.normal(0.0, 0.05)
    dx, dy = acquisition.normal(0.0, 0.04, size=2)
    cos, sin = math.cos(tilt), math.sin(tilt)
    x = (cos * (x0 - dx) + sin * (y0 - dy)) / scale
    y = (-sin * (x0 - dx) + cos * (y0 - dy)) / scale

    body = _ellipse(x, y, 0.0, 0.12, anatomy.body_width, 1.15, 2 * edge)
    spine = expit((0.08 - np.abs(x)) / edge) * anatomy.spine
    trachea = expit((0.035 - np.abs(x + 0.01)) / edge) * expit((-0.3 - y) / 0.05) * 0.1
    lungs = np.zeros_like(x)
    lung_side = {}
    for k, side in enumerate((-1.0, 1.0)):   # -1: patient's right lung (image left), +1: left lung (image right)
        cx = side * (0.38 + anatomy.lung_x[k])
        a = anatomy.lung_width[k]
        base = anatomy.lung_base[k] + inspiration - lift[side]
        dome = base - anatomy.dome[k] * np.exp(-(((x - side * 0.38) / 0.22) ** 2))
        lungs = np.maximum(lungs, _ellipse(x, y, cx, -0.1, a, 0.66, edge) * expit((dome - y) / edge))
        lung_side[side] = (cx, a, base)

    widening = 1.0 + SIGN_AMPLITUDE["cardiomegaly"] * strength.get("cardiomegaly", 0.0)
    heart_w = anatomy.heart_width * heart_change * widening
    heart = _ellipse(x, y, 0.1 + anatomy.heart_x, 0.2, heart_w, anatomy.heart_height, edge)
    aerated = lungs * (1.0 - heart)   # the heart silhouettes the lung in front of it

    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (y - 0.22 * np.abs(x)) / anatomy.rib_period + anatomy.rib_phase)
    image = 0.45 * body + spine - trachea - 0.3 * aerated + anatomy.rib_density * ribs * aerated
    # Vascular markings: smooth random texture over the lungs, which patchy findings must stand out from. The
    # texture is the patient's: drawn on the image grid from the patient's seed, so it moves with positioning.
    vessels = gaussian_filter(_normal(np.random.default_rng(anatomy.vessel_seed), x), 1.2 * size / 64)
    image += anatomy.vessel_density * vessels * 2.0 * aerated
    # Normal hilar vessels vary between people, so congestion must beat this baseline.
    hila = sum(_ellipse(x, y, s * 0.2, -0.05, 0.12, 0.16, 0.08) for s in (-1.0, 1.0))
    image += anatomy.hila * hila * lungs

    image += _finding_opacity(strength, sign_rngs, x, y, lung_side, atel_band, atel_side, edge) * aerated
    if female:   # breast shadows over the lung bases
        image += anatomy.breast * _breasts(x, y) * body
    if has_devices:
        image += _devices(event_rng, x0, y0, px)
        # Leads lying across a lung base: each, on its own, a line that looks just like band atelectasis.
        for _ in range(int(event_rng.integers(LEADS_OVER_LUNG[0], LEADS_OVER_LUNG[1] + 1))):
            cx, a, _ = lung_side[float(event_rng.choice([-1.0, 1.0]))]
            density = SIGN_AMPLITUDE["atelectasis"] * event_rng.uniform(*LEAD_OVER_LUNG_DENSITY)
            image += density * _plate(event_rng, x, y, cx, a) * aerated

    # Acquisition: blur, exposure/contrast (lower for the old), smooth and white noise.
    image = gaussian_filter(image, 0.6 * size / 64)
    contrast = acquisition.uniform(0.8, 1.15) * (1.0 - AGE_CONTRAST_LOSS * old)
    image = acquisition.uniform(0.05, 0.12) + 1.4 * contrast * image
    image += acquisition.uniform(0.01, 0.03) * gaussian_filter(_normal(acquisition, x), 3.0 * size / 64) * 4.0
    image += (NOISE_BASE + NOISE_AGE * old) * _normal(acquisition, x)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), strength


def _breasts(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The two breast shadows over the lung bases, 0..1."""
    return sum(_ellipse(x, y, s * 0.5, 0.45, 0.3, 0.2, 0.05) for s in (-1.0, 1.0))


def _finding_opacity(
    strength: Mapping[str, float],
    rngs: Mapping[str, np.random.Generator],
    x: np.ndarray,
    y: np.ndarray,
    lung_side: Mapping[float, tuple[float, float, float]],
    atel_band: bool,
    atel_side: float,
    edge: float,
) -> np.ndarray:
    """Added density of the lung findings (congestion, effusion, infiltrates, atelectasis) before masking
    to the aerated lung. ``rngs`` holds each finding's random stream; ``lung_side`` maps each side to its
    lung's centre x, half-width and base."""
    opacity = np.zeros_like(x)
    if "congestion" in strength:
        s = strength["congestion"]
        haze = sum(np.exp(-(((x - h * 0.24) / 0.2) ** 2 + ((y + 0.02) / 0.26) ** 2)) for h in (-1.0, 1.0))
        opacity += SIGN_AMPLITUDE["congestion"] * s * (haze + 0.35 * expit((y - 0.1) / 0.1))
    if "pleural_effusion" in strength:
        s, rng = strength["pleural_effusion"], rngs["pleural_effusion"]
        sides = {0: (-1.0,), 1: (1.0,), 2: (-1.0, 1.0)}[int(rng.choice(3, p=[0.35, 0.35, 0.3]))]
        for side in sides:
            cx, a, base = lung_side[side]
            lateral = np.clip(side * (x - cx) / a * 0.5 + 0.5, 0.0, 1.0)   # 0 medial .. 1 lateral
            height = 0.12 + 0.25 * min(s, 1.3)
            level = base - height * (0.7 + 0.7 * lateral ** 2)      # meniscus: fluid climbs laterally
            fluid = expit((y - level) / (1.5 * edge)) * _ellipse(x, y, cx, -0.1, a * 1.05, 0.72, edge)
            opacity += SIGN_AMPLITUDE["pleural_effusion"] * min(s, 1.0) * fluid
    if "pneumonic_infiltrates" in strength:
        s, rng = strength["pneumonic_infiltrates"], rngs["pneumonic_infiltrates"]
        texture = 0.5 + 0.5 * np.tanh(gaussian_filter(_normal(rng, x), x.shape[0] / 64) * 2.0)
        for _ in range(int(rng.integers(2, 5))):
            cx, a, _ = lung_side[float(rng.choice([-1.0, 1.0]))]
            bx, by = cx + rng.uniform(-0.7, 0.7) * a, rng.uniform(-0.5, 0.35)
            radius = rng.uniform(0.11, 0.18)
            # A flat-topped patch (not a peaked nodule), mottled by the texture.
            patch = np.exp(-0.5 * (((x - bx) ** 2 + (y - by) ** 2) / radius ** 2) ** 2)
            opacity += SIGN_AMPLITUDE["pneumonic_infiltrates"] * s * texture * patch
    if "atelectasis" in strength:
        s, rng = strength["atelectasis"], rngs["atelectasis"]
        cx, a, base = lung_side[atel_side]
        if atel_band:
            opacity += SIGN_AMPLITUDE["atelectasis"] * s * _plate(rng, x, y, cx, a)
        else:
            opacity += 0.25 * s * _ellipse(x, y, cx, base - 0.12, a, 0.16, 0.05)
    return opacity


def _plate(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, cx: float, a: float) -> np.ndarray:
    """A plate-like line (peak 1) in the lower or mid zone of the lung centred at ``cx`` with half-width
    ``a``: the sign of band atelectasis, and what a lead crossing the lung base looks like."""
    bx, by = cx + rng.uniform(-0.4, 0.4) * a, rng.uniform(0.05, 0.35)
    theta, half = rng.uniform(-0.35, 0.35), rng.uniform(0.1, 0.18)
    along = (x - bx) * math.cos(theta) + (y - by) * math.sin(theta)
    across = -(x - bx) * math.sin(theta) + (y - by) * math.cos(theta)
    dist = np.hypot(np.maximum(np.abs(along) - half, 0.0), across)
    return np.exp(-0.5 * (dist / 0.03) ** 2)


def _devices(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """ECG leads (bright curves about as wide as a plate-like atelectasis band) and electrodes (small discs),
    drawn in image coordinates."""
    out = np.zeros_like(x)
    for _ in range(int(rng.integers(1, 3))):
        y0, curve, slope = rng.uniform(-0.3, 0.5), rng.uniform(-0.6, 0.6), rng.uniform(-0.4, 0.4)
        f = y0 + slope * x + curve * x ** 2
        dist = np.abs(y - f) / np.sqrt(1.0 + (slope + 2 * curve * x) ** 2)
        out += LEAD_DENSITY * np.exp(-0.5 * (dist / max(0.02, 0.6 * px)) ** 2)
    for _ in range(int(rng.integers(2, 5))):
        ex, ey = rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.6)
        out += 0.3 * expit((0.035 - np.hypot(x - ex, y - ey)) / (0.5 * px))
    return out


# ---------------------------------------------------------------------------------------------------------
# Writing a cohort.
# ---------------------------------------------------------------------------------------------------------


def _check_args(n: int, seed: int, image_size: int | None = None) -> None:
    if int(n) < 10:
        raise ConfigError(f"n={n} is too small; a synthetic cohort needs at least 10 images for three splits")
    if int(seed) < 0:
        raise ConfigError(f"seed={seed} must be >= 0")
    if image_size is not None and int(image_size) < 16:
        raise ConfigError(f"image_size={image_size} is too small; use at least 16 pixels")
    check_limit("n", n)
    if image_size is not None:
        check_limit("image_size", image_size, const="MAX_IMAGE_SIZE")


def _prevalence(frame: pd.DataFrame) -> dict[str, dict]:
    """Per label: positives, known cells and prevalence among known cells."""
    out = {}
    for label in LABELS:
        known = frame[label].dropna()
        n_pos, n_known = int((known == 1).sum()), int(len(known))
        out[label] = {
            "prevalence": round(n_pos / n_known, 6) if n_known else None,
            "n_positive": n_pos,
            "n_known": n_known,
        }
    return out


def _cohort_record(cohort: _Cohort, design: CohortDesign, params: dict, strengths: list[dict[str, float]]) -> dict:
    frame = cohort.frame
    groups = age_group(frame["age"])
    splits = {}
    for split in SPLIT_FRACTIONS:
        part = frame[frame["split"] == split]
        splits[split] = {
            "n_images": int(len(part)),
            "n_patients": int(part["patient_id"].nunique()),
            "prevalence": _prevalence(part),
        }
    mean_strength = {}
    for label in LABELS:
        by_group = {}
        for group in AGE_GROUPS:
            values = [s[label] for s, g in zip(strengths, groups) if g == group and label in s]
            by_group[group] = round(float(np.mean(values)), 4) if values else None
        mean_strength[label] = by_group
    images_per_patient = frame.groupby("patient_id").size()
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "privaudit_version": PRIVAUDIT_VERSION,
        "task": "cxr",
        "role": design.role,
        "parameters": params,
        "files": {"manifest": "manifest.csv", "images": "images/<sample_id>.png (8-bit greyscale)"},
        "columns": list(MANIFEST_COLUMNS),
        "conventions": {
            "orientation": "PA view, radiological convention: patient's left on the image's right",
            "intensity": "bright = dense (bone, heart, fluid); lungs dark",
            "unknown_label": "blank cell",
        },
        "population": {
            "design": asdict(design),
            "age": f"{AGE_MIN} + floor({AGE_MAX - AGE_MIN + 1} * Beta{design.age_beta}) at the first study; "
                   f"follow-ups capped at {AGE_MAX}",
            "comorbidity_model": "logit P(comorbidity=1) = intercept + age_per_decade * (age - 60) / 10 + male * [M]",
            "images_per_patient": _images_per_patient_doc(design),
            "followups": "a patient's studies share sex, comorbidity and anatomy; age grows by 0, 1 or 2 years "
                         f"(probabilities {', '.join(map(str, YEARS_BETWEEN_STUDIES))}) from one study to the "
                         f"next; a study repeats the previous study's findings with probability "
                         f"{FOLLOWUP_SAME_FINDINGS}, else they are drawn afresh; the views of a study share age, "
                         "findings (and their signs) and labels",
            "missing_label_rate": MISSING_LABEL_RATE,
            "split_fractions": SPLIT_FRACTIONS,
        },
        "prevalence_model": {
            "form": "logit P(label=1) = intercept + sum(coef * term); terms: age_per_decade = (age - 60) / 10, "
                    "male = 1 for M, comorbidity (0/1) and earlier labels (0/1); labels drawn in the order listed",
            "order": list(LABELS),
            "coefficients": LABEL_MODEL,
            "expected_prevalence": {k: round(v, 6) for k, v in model_prevalence(
                frame["age"], (frame["sex"] == "M").astype(int), frame["comorbidity"]).items()},
        },
        "realised": {
            "n_images": int(len(frame)),
            "n_patients": int(frame["patient_id"].nunique()),
            "n_patients_with_followups": int((images_per_patient > 1).sum()),
            "images_per_patient": _images_per_patient_realised(cohort, images_per_patient),
            "prevalence": _prevalence(frame),
            "splits": splits,
            "n_images_by_age_group": {g: int((groups == g).sum()) for g in AGE_GROUPS},
            "n_images_by_sex": {s: int((frame["sex"] == s).sum()) for s in ("F", "M")},
            "n_images_by_comorbidity": {str(c): int((frame["comorbidity"] == c).sum()) for c in (0, 1)},
            "mean_sign_strength_of_positives_by_age_group": mean_strength,
        },
        "sign_strength": {
            "form": "strength = visibility(age, sex) * severity; each label's sign scales with strength",
            "severity": {"weak_fraction": WEAK_FRACTION, "weak_range": list(WEAK_SEVERITY), "range": list(SEVERITY)},
            "amplitude_per_unit_strength": SIGN_AMPLITUDE,
            "note": "weak positives are near invisible, which caps the attainable AUROC",
        },
        "planted_effects": PLANTED_EFFECTS,
        "labels": LABEL_DOCS,
    }


def _images_per_patient_doc(design: CohortDesign) -> dict:
    p = 1.0 / (1.0 + design.mean_extra_studies)
    mean_studies = sum(min(1 + k, MAX_STUDIES) * p * (1 - p) ** k for k in range(10 * MAX_STUDIES))
    return {
        "studies": f"1 + Geometric (failures before a success, p = {p:.4g}: mean {design.mean_extra_studies}), "
                   f"capped at {MAX_STUDIES}",
        "views_per_study": f"1 frontal view, plus a second one (AP film or repeat) with probability "
                           f"{SECOND_VIEW_PROB}",
        "expected_mean": round(mean_studies * (1 + SECOND_VIEW_PROB), 4),
        "max": 2 * MAX_STUDIES,
        "sample_id": "<patient_id>_s<study>_v<view>, numbered from 1",
        "anatomy": "drawn once per patient; each study shifts the diaphragm (depth of inspiration, sd "
                   f"{STUDY_INSPIRATION_SD}) and the heart width (sd {STUDY_HEART_SD:.0%}); each image has its own "
                   "positioning, exposure and noise",
        "cut": "patients are drawn until n images; the last patient keeps only the images that fit",
    }


def _images_per_patient_realised(cohort: _Cohort, per_patient: pd.Series) -> dict:
    counts = per_patient.to_numpy()
    studies = pd.Series(cohort.study).groupby(cohort.patient).max().to_numpy() + 1
    return {
        "mean": round(float(counts.mean()), 4),
        "median": float(np.median(counts)),
        "max": int(counts.max()),
        "n_patients_with_10_or_more": int((counts >= 10).sum()),
        "histogram": {str(k): int(v) for k, v in sorted(Counter(counts.tolist()).items())},
        "studies_per_patient": {"mean": round(float(studies.mean()), 4), "max": int(studies.max())},
        "last_patient_cut_from": int(cohort.drawn_per_patient[-1]),
    }


def synthesize_cxr(
    out: Path,
    *,
    n: int = 3000,
    image_size: int = 64,
    seed: int = 0,
    public: bool = False,
    progress: Callable[[int], object] | None = None,
) -> Path:
    """Write a synthetic chest-radiograph cohort into ``out`` and return the path of its manifest.csv.

    ``out`` may exist; it receives ``images/<sample_id>.png``, ``manifest.csv`` and ``cohort.json``.
    ``progress`` is called with the number of images written so far. The same arguments give
    byte-identical files.
    """
    _check_args(n, seed, image_size)
    design = PUBLIC if public else PRIVATE
    cohort = _draw_cohort(n, seed, design)
    frame, truth = cohort.frame, cohort.truth
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    from PIL import Image

    strengths = []
    anatomy, anatomy_of = None, -1
    for i, row in enumerate(frame.to_dict("records")):
        # Random streams: one per patient (anatomy), one per study (shared by its views) and one per image,
        # so that an image depends only on (seed, cohort, patient, study, index).
        p, st = int(cohort.patient[i]), int(cohort.study[i])
        if p != anatomy_of:
            anatomy, anatomy_of = draw_anatomy(np.random.default_rng([seed, design.stream, 2, p])), p
        study = np.random.default_rng([seed, design.stream, 3, p, st])
        rng = np.random.default_rng([seed, design.stream, 1, i])
        pixels, strength = render_cxr(row, truth[i], rng, image_size, anatomy=anatomy, study=study)
        Image.fromarray(pixels).save(out / row["path"], format="PNG")
        strengths.append(strength)
        if progress is not None:
            progress(i + 1)

    manifest = out / "manifest.csv"
    atomic_write_csv(manifest, frame, mode=None, index=False, lineterminator="\n")
    params = {"n": int(n), "image_size": int(image_size), "seed": int(seed), "public": bool(public)}
    write_json(out / "cohort.json", _cohort_record(cohort, design, params, strengths))
    return manifest
