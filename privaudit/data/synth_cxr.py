"""Synthetic chest-radiograph cohort with known ground truth, for the ``cxr`` task.

Real chest radiograph cohorts cannot ship with a tool, yet every stage of privaudit (DP training, utility,
fairness and privacy audits) needs data with the shape of one. :func:`synthesize_cxr` writes such a cohort:
procedural frontal radiographs (8-bit greyscale PNGs), a manifest in the canonical format of
:mod:`privaudit.data.manifest`, and ``cohort.json``, which records every generating choice, so that an audit
run on the cohort can be checked against the truth that was planted in it.

How a cohort is made
--------------------
1. Patients: sex, age (18-95 years, every age group of :data:`privaudit.tasks.AGE_GROUPS` populated) and a
   0/1 comorbidity flag whose probability rises with age. About a quarter of patients have 2-3 images;
   follow-ups share sex and comorbidity, are 0-2 years older each and mostly repeat the findings.
2. Labels: one logistic model per finding, drawn in task-label order so that each finding may depend on
   those drawn before it (congestion on cardiomegaly; effusion on both; atelectasis on effusion), which
   gives the label correlations of real data. About 2% of label cells are left blank (unknown).
3. Splits: train/val/test about 70/10/20, drawn per patient.
4. Images: anatomy (body, spine, two lung fields over diaphragm domes, heart shadow, ribs) with random
   size, position, tilt, exposure and noise; each positive finding adds its sign (see :data:`LABEL_DOCS`)
   with a *sign strength* = base amplitude x visibility(age, sex) x per-positive severity. A fraction of
   positives have a near-invisible sign, which caps the attainable AUROC.

Planted subgroup effects (see :data:`PLANTED_EFFECTS`): older patients' images have lower contrast, more
noise and fainter signs (81+ worst); women's effusions are fainter and overlaid by breast shadows; patients
with comorbidity often carry monitoring leads and electrodes that mimic linear opacities.

Calibration: with the defaults (n=3000, 64 x 64), a small CNN (4 stride-2 conv layers of width 32 with
GroupNorm, global pooling) trained on the train split reaches a mean test AUROC of about 0.79 after 5
epochs, 0.82-0.84 after 8 and 0.88 after 20; every label is above 0.7, and the 81+ group is lowest.

Orientation follows the radiological convention of a PA film: the patient's left is on the image's right,
so the heart shadow lies below and to the right of the image centre.

The public cohort (``public=True``) is drawn from separate random streams, with a ``PUB`` patient prefix
and a younger, sex-balanced, less comorbid population; image physics and the label model are shared.
"""

from __future__ import annotations

import math
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
GENERATOR_VERSION = "1.0.0"

LABELS: tuple[str, ...] = create_task("cxr").labels
MANIFEST_COLUMNS: tuple[str, ...] = ("sample_id", "path", "split", "patient_id", *LABELS, "sex", "age", "comorbidity")

AGE_MIN, AGE_MAX = 18, 95
AGE_CENTRE = 60            # the label and comorbidity models use (age - 60) / 10
IMAGES_PER_PATIENT = {1: 0.74, 2: 0.18, 3: 0.08}
FOLLOWUP_SAME_FINDINGS = 0.8   # chance a follow-up image repeats the previous image's findings
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


PRIVATE = CohortDesign(
    role="private",
    stream=0,
    patient_prefix="PRV",
    p_male=0.58,
    age_beta=(1.8, 1.3),   # median about 65 years: an inpatient population
    comorbidity_logit={"intercept": -0.7, "age_per_decade": 0.45, "male": 0.2},
)
PUBLIC = CohortDesign(
    role="public",
    stream=1,
    patient_prefix="PUB",
    p_male=0.5,
    age_beta=(1.5, 1.5),   # median 57 years, wider spread: a screening-like population
    comorbidity_logit={"intercept": -1.3, "age_per_decade": 0.45, "male": 0.0},
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
    "atelectasis": {"intercept": -1.9, "age_per_decade": 0.15, "comorbidity": 0.2, "pleural_effusion": 0.9},
}

# How strongly each sign is drawn per unit of sign strength (attenuation units; lung vs soft tissue is 0.3).
SIGN_AMPLITUDE: dict[str, float] = {
    "cardiomegaly": 0.43,             # relative widening of the heart shadow
    "congestion": 0.13,               # perihilar haze
    "pleural_effusion": 0.38,         # fluid density (capped at strength 1)
    "pneumonic_infiltrates": 0.38,    # each patch
    "atelectasis": 0.75,              # plate-like band
}
ATELECTASIS_BAND_FRACTION = 0.65
ATELECTASIS_LIFT = 0.2    # hemidiaphragm elevation per unit strength for volume-loss atelectasis

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

# Age difficulty ramps from 0 at age 50 to 1 at age 90: old = clip((age - 50) / 40, 0, 1).
AGE_RAMP = (50, 90)
AGE_SIGN_FADE = 0.35        # visibility *= 1 - 0.35 * old
AGE_CONTRAST_LOSS = 0.3     # contrast *= 1 - 0.3 * old
NOISE_BASE, NOISE_AGE = 0.025, 0.035   # white-noise sd = 0.025 + 0.035 * old
FEMALE_EFFUSION_VISIBILITY = 0.7
FEMALE_BREAST_SHADOW = (0.03, 0.08)    # amplitude range of the breast-shadow overlay
DEVICE_PROB = {0: 0.05, 1: 0.5}        # chance of monitoring leads / electrodes, by comorbidity

PLANTED_EFFECTS: list[dict] = [
    {
        "name": "age_image_quality",
        "description": "older patients' radiographs have lower contrast, more noise and fainter finding "
                       "signs (poorer inspiration and positioning); difficulty ramps linearly from age 50 to 90",
        "parameters": {
            "ramp_ages": list(AGE_RAMP),
            "old": f"clip((age - {AGE_RAMP[0]}) / {AGE_RAMP[1] - AGE_RAMP[0]}, 0, 1)",
            "sign_visibility": f"1 - {AGE_SIGN_FADE} * old",
            "contrast_factor": f"1 - {AGE_CONTRAST_LOSS} * old",
            "noise_sd": f"{NOISE_BASE} + {NOISE_AGE} * old",
        },
        "attribute": "age_group",
        "labels": list(LABELS),
        "expected_lower_auroc": "81+",
        "expected_order": "81+ lowest; the groups under 61 highest",
    },
    {
        "name": "female_effusion_subtlety",
        "description": "women's pleural effusions are drawn fainter and their lung bases are overlaid by breast "
                       "shadows of similar density, so effusions are harder to see in women",
        "parameters": {
            "effusion_visibility_female": FEMALE_EFFUSION_VISIBILITY,
            "breast_shadow_amplitude": list(FEMALE_BREAST_SHADOW),
        },
        "attribute": "sex",
        "labels": ["pleural_effusion"],
        "expected_lower_auroc": "F",
        "note": "women's cardiomegaly and atelectasis are not harder, so the gap is specific to effusion",
    },
    {
        "name": "comorbidity_devices",
        "description": "patients with comorbidity often carry ECG leads and electrodes: thin bright lines and "
                       "discs that mimic plate-like atelectasis; they also have more co-occurring findings",
        "parameters": {"device_probability": {str(k): v for k, v in DEVICE_PROB.items()}},
        "attribute": "comorbidity",
        "labels": ["atelectasis"],
        "expected_lower_auroc": "1",
        "note": "comorbid patients are also older, so the age effect lowers their AUROC on every label too",
    },
]


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
    return _draw_cohort(n, seed, PUBLIC if public else PRIVATE)[0]


def _draw_cohort(n: int, seed: int, design: CohortDesign) -> tuple[pd.DataFrame, np.ndarray]:
    """The manifest table and the (n, labels) 0/1 truth, which still holds the labels blanked in the table."""
    rng = np.random.default_rng([seed, design.stream, 0])

    # Patients until n images: the last patient's image count is cut so the total is exactly n.
    counts = rng.choice(list(IMAGES_PER_PATIENT), size=n, p=list(IMAGES_PER_PATIENT.values()))
    n_patients = int(np.searchsorted(np.cumsum(counts), n)) + 1
    counts = counts[:n_patients]
    counts[-1] -= int(counts.sum()) - n

    male = (rng.random(n_patients) < design.p_male).astype(np.int64)
    age0 = AGE_MIN + np.floor((AGE_MAX - AGE_MIN + 1) * rng.beta(*design.age_beta, size=n_patients)).astype(np.int64)
    p_comorbidity = expit(_linear(design.comorbidity_logit, _terms(age0, male, np.zeros(n_patients))))
    comorbidity = (rng.random(n_patients) < p_comorbidity).astype(np.int64)

    patient = np.repeat(np.arange(n_patients), counts)
    visit = np.concatenate([np.arange(c) for c in counts])
    # Each follow-up is 0-2 years after the previous image.
    step = np.where(visit > 0, rng.integers(0, 3, size=n), 0)
    age = np.minimum(age0[patient] + _cumsum_within(step, visit), AGE_MAX)

    terms = _terms(age, male[patient], comorbidity[patient])
    labels = _draw_labels(rng, terms)
    # Follow-ups mostly repeat the previous image's findings (rows of a patient are consecutive).
    repeat = rng.random(n) < FOLLOWUP_SAME_FINDINGS
    for v in range(1, max(IMAGES_PER_PATIENT)):
        rows = np.flatnonzero((visit == v) & repeat)
        labels[rows] = labels[rows - 1]
    unknown = rng.random(labels.shape) < MISSING_LABEL_RATE

    patient_split = splits_from_order(rng.permutation(n_patients), tuple(SPLIT_FRACTIONS.values()))

    width = max(5, len(str(n_patients)))
    patient_id = np.array([f"{design.patient_prefix}{i:0{width}d}" for i in range(n_patients)], dtype=object)[patient]
    sample_id = [f"{pid}_{v + 1}" for pid, v in zip(patient_id, visit)]
    frame = pd.DataFrame({
        "sample_id": sample_id,
        "path": [f"images/{s}.png" for s in sample_id],
        "split": patient_split[patient],
        "patient_id": patient_id,
    })
    for j, label in enumerate(LABELS):
        frame[label] = pd.array(np.where(unknown[:, j], pd.NA, labels[:, j]), dtype="Int64")
    frame["sex"] = np.where(male[patient] == 1, "M", "F")
    frame["age"] = age.astype(np.int64)
    frame["comorbidity"] = comorbidity[patient]
    return frame[list(MANIFEST_COLUMNS)], labels


def _cumsum_within(step: np.ndarray, visit: np.ndarray) -> np.ndarray:
    """Running sum of ``step`` that restarts at every patient's first image (visit 0)."""
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
    return float(np.clip((age - AGE_RAMP[0]) / (AGE_RAMP[1] - AGE_RAMP[0]), 0.0, 1.0))


def _severity(rng: np.random.Generator) -> float:
    lo, hi = WEAK_SEVERITY if rng.random() < WEAK_FRACTION else SEVERITY
    return float(rng.uniform(lo, hi))


def render_cxr(
    row: Mapping, truth: np.ndarray, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, dict[str, float]]:
    """Draw one radiograph; return it as uint8 and the sign strength of each positive finding.

    ``row`` gives the demographics (``sex``, ``age``, ``comorbidity``); ``truth`` the 0/1 findings in
    :data:`LABELS` order, including those whose label is blank in the manifest (unknown to the annotator,
    yet present in the patient). The patient's anatomy and the acquisition come from one random stream and
    each finding from its own, so the same ``rng`` seed with different ``truth`` draws the same person, and
    the same sign for each finding present in both.
    """
    body_rng, *streams = rng.spawn(1 + len(LABELS))
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

    # Patient positioning: scale, shift and a small tilt, applied to the coordinate grid.
    scale = body_rng.uniform(0.9, 1.06)
    tilt = body_rng.normal(0.0, 0.05)
    dx, dy = body_rng.normal(0.0, 0.04, size=2)
    cos, sin = math.cos(tilt), math.sin(tilt)
    x = (cos * (x0 - dx) + sin * (y0 - dy)) / scale
    y = (-sin * (x0 - dx) + cos * (y0 - dy)) / scale

    body = _ellipse(x, y, 0.0, 0.12, body_rng.uniform(0.82, 0.9), 1.15, 2 * edge)
    spine = expit((0.08 - np.abs(x)) / edge) * body_rng.uniform(0.04, 0.08)
    trachea = expit((0.035 - np.abs(x + 0.01)) / edge) * expit((-0.3 - y) / 0.05) * 0.1
    lungs = np.zeros_like(x)
    lung_side = {}
    for side in (-1.0, 1.0):   # -1: patient's right lung (image left), +1: left lung (image right)
        cx = side * (0.38 + body_rng.normal(0, 0.015))
        a = body_rng.uniform(0.25, 0.29)
        # The right hemidiaphragm sits a little higher than the left.
        base = (0.52 if side < 0 else 0.56) + body_rng.normal(0, 0.03) - lift[side]
        dome = base - body_rng.uniform(0.1, 0.16) * np.exp(-(((x - side * 0.38) / 0.22) ** 2))
        lungs = np.maximum(lungs, _ellipse(x, y, cx, -0.1, a, 0.66, edge) * expit((dome - y) / edge))
        lung_side[side] = (cx, a, base)

    widening = 1.0 + SIGN_AMPLITUDE["cardiomegaly"] * strength.get("cardiomegaly", 0.0)
    heart_w = body_rng.uniform(0.22, 0.26) * widening
    heart = _ellipse(x, y, 0.1 + body_rng.normal(0, 0.02), 0.2, heart_w, body_rng.uniform(0.2, 0.24), edge)
    aerated = lungs * (1.0 - heart)   # the heart silhouettes the lung in front of it

    rib_period, rib_phase = body_rng.uniform(0.15, 0.19), body_rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (y - 0.22 * np.abs(x)) / rib_period + rib_phase)
    image = 0.45 * body + spine - trachea - 0.3 * aerated + body_rng.uniform(0.015, 0.04) * ribs * aerated
    # Vascular markings: smooth random texture over the lungs, which patchy findings must stand out from.
    image += body_rng.uniform(0.02, 0.04) * gaussian_filter(_normal(body_rng, x), 1.2 * size / 64) * 2.0 * aerated
    # Normal hilar vessels vary between people, so congestion must beat this baseline.
    hila = sum(_ellipse(x, y, s * 0.2, -0.05, 0.12, 0.16, 0.08) for s in (-1.0, 1.0))
    image += body_rng.uniform(0.02, 0.06) * hila * lungs

    image += _finding_opacity(strength, sign_rngs, x, y, lung_side, atel_band, atel_side, edge) * aerated
    if female:   # breast shadows over the lung bases
        amp = body_rng.uniform(*FEMALE_BREAST_SHADOW)
        image += amp * sum(_ellipse(x, y, s * 0.5, 0.45, 0.3, 0.2, 0.05) for s in (-1.0, 1.0)) * body
    if body_rng.random() < DEVICE_PROB[int(row["comorbidity"])]:
        image += _devices(body_rng, x0, y0, px)

    # Acquisition: blur, exposure/contrast (lower for the old), smooth and white noise.
    image = gaussian_filter(image, 0.6 * size / 64)
    contrast = body_rng.uniform(0.8, 1.15) * (1.0 - AGE_CONTRAST_LOSS * old)
    image = body_rng.uniform(0.05, 0.12) + 1.4 * contrast * image
    image += body_rng.uniform(0.01, 0.03) * gaussian_filter(_normal(body_rng, x), 3.0 * size / 64) * 4.0
    image += (NOISE_BASE + NOISE_AGE * old) * _normal(body_rng, x)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), strength


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
            bx, by = cx + rng.uniform(-0.4, 0.4) * a, rng.uniform(0.05, 0.35)
            theta, half = rng.uniform(-0.35, 0.35), rng.uniform(0.1, 0.18)
            along = (x - bx) * math.cos(theta) + (y - by) * math.sin(theta)
            across = -(x - bx) * math.sin(theta) + (y - by) * math.cos(theta)
            dist = np.hypot(np.maximum(np.abs(along) - half, 0.0), across)
            opacity += SIGN_AMPLITUDE["atelectasis"] * s * np.exp(-0.5 * (dist / 0.03) ** 2)
        else:
            opacity += 0.25 * s * _ellipse(x, y, cx, base - 0.12, a, 0.16, 0.05)
    return opacity


def _devices(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, px: float) -> np.ndarray:
    """ECG leads (thin bright curves) and electrodes (small discs), drawn in image coordinates."""
    out = np.zeros_like(x)
    for _ in range(int(rng.integers(1, 3))):
        y0, curve, slope = rng.uniform(-0.3, 0.5), rng.uniform(-0.6, 0.6), rng.uniform(-0.4, 0.4)
        f = y0 + slope * x + curve * x ** 2
        dist = np.abs(y - f) / np.sqrt(1.0 + (slope + 2 * curve * x) ** 2)
        out += 0.22 * np.exp(-0.5 * (dist / max(0.012, 0.4 * px)) ** 2)
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


def _cohort_record(
    frame: pd.DataFrame, design: CohortDesign, params: dict, strengths: list[dict[str, float]]
) -> dict:
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
            "age": f"{AGE_MIN} + floor({AGE_MAX - AGE_MIN + 1} * Beta{design.age_beta}) at the first image; "
                   f"follow-ups capped at {AGE_MAX}",
            "comorbidity_model": "logit P(comorbidity=1) = intercept + age_per_decade * (age - 60) / 10 + male * [M]",
            "images_per_patient": {str(k): v for k, v in IMAGES_PER_PATIENT.items()},
            "followups": "same sex and comorbidity; age +0..2 years per follow-up; previous image's findings "
                         f"repeated with probability {FOLLOWUP_SAME_FINDINGS}, else drawn afresh",
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
    frame, truth = _draw_cohort(n, seed, design)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    from PIL import Image

    strengths = []
    for i, row in enumerate(frame.to_dict("records")):
        # One random stream per image: an image depends only on (seed, cohort, index).
        rng = np.random.default_rng([seed, design.stream, 1, i])
        pixels, strength = render_cxr(row, truth[i], rng, image_size)
        Image.fromarray(pixels).save(out / row["path"], format="PNG")
        strengths.append(strength)
        if progress is not None:
            progress(i + 1)

    manifest = out / "manifest.csv"
    atomic_write_csv(manifest, frame, mode=None, index=False, lineterminator="\n")
    params = {"n": int(n), "image_size": int(image_size), "seed": int(seed), "public": bool(public)}
    write_json(out / "cohort.json", _cohort_record(frame, design, params, strengths))
    return manifest
