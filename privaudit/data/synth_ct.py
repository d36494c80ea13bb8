"""Synthetic abdominal CT cohort with known ground truth, for the ``pdac`` task.

:func:`synthesize_ct` writes NIfTI volumes in Hounsfield units with real affines and voxel spacing, a
manifest in the canonical format of :mod:`privaudit.data.manifest` and ``cohort.json``, which records every
generating choice so that an audit of a model trained on the cohort can be checked against what was planted.
``layout="msd"`` writes the same kind of cohort in the Medical Segmentation Decathlon layout instead
(``dataset.json``, ``imagesTr/``, ``labelsTr/`` with label maps, and a ``controls/`` folder of tumour-free
scans), so that the ``msd`` preset is exercised on real-format files.

How a cohort is made
--------------------
1. Patients (one portal-venous CT each): sex, age (25-90 years) and the label ``pdac``, whose probability
   rises with age (:data:`PREVALENCE_MODEL`). Splits are drawn per patient, about 70/10/20.
2. Site: each scan comes from one of three sites (:data:`SITES`), drawn *given the label*: the cancer centre
   ``A`` holds most tumour scans, the archive ``B`` most controls, and the hospital ``C`` both alike. This is
   the source shortcut of public pancreas data (tumour and control scans from different archives). Sites
   differ in scanner noise, intensity calibration, field of view, slice spacing and the voxel order they
   store (RAS or LPS, as DICOM converters write it), so a network can recognise the site from the pixels.
3. Volume: a body outline with skin and muscle wall, subcutaneous and visceral fat, liver, spleen, both
   kidneys, aorta, IVC, psoas muscles, the spine with its canal, gas-filled bowel loops and
   a curved pancreas (head right of the midline, body in front of the aorta, tail towards the spleen), each
   with a soft, partial-volume edge. Anatomy is jittered in size and position per patient.
4. PDAC: a hypodense mass in the head (60%), body (25%) or tail (15%), 30-55 mm across, 100-130 HU below
   young normal parenchyma; 60% of head and body tumours dilate the main duct upstream (a fluid tube towards
   the tail); 12% of tumours are small and faint (near invisible), which caps the attainable AUROC. Some
   controls (5%) have a mildly dilated duct as a confounder.

Planted subgroup effects (:data:`PLANTED_EFFECTS`): the pancreas of older patients is fatty (lower
attenuation, speckled), which leaves less contrast to a hypodense tumour; women's tumours are smaller at
diagnosis; and the site shortcut above.

Files: ``images/<sample_id>.nii.gz`` (int16 HU, qform and sform code 1, spacing in mm) in the manifest layout.
The same arguments give byte-identical files (gzip is written with a zero timestamp).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from scipy.special import expit

from privaudit._version import __version__ as PRIVAUDIT_VERSION
from privaudit._fs import atomic_write_bytes, atomic_write_csv, write_json
from privaudit.data.manifest import splits_from_order
from privaudit.errors import ConfigError
from privaudit.limits import check_limit
from privaudit.tasks import AGE_GROUPS, age_group

GENERATOR = "privaudit.data.synth_ct"
GENERATOR_VERSION = "1.0.0"
LAYOUTS = ("manifest", "msd")

MANIFEST_COLUMNS: tuple[str, ...] = ("sample_id", "path", "split", "patient_id", "pdac", "sex", "age", "site")
AGE_MIN, AGE_MAX = 25, 90
P_MALE = 0.55
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}

# logit P(pdac = 1) = intercept + age_per_decade * (age - 60) / 10 + male * [M]
PREVALENCE_MODEL = {"intercept": -0.25, "age_per_decade": 0.55, "male": 0.15}

# HU values of the portal-venous phase.
HU = {
    "air": -1000.0, "fat": -100.0, "muscle": 50.0, "liver": 110.0, "spleen": 118.0, "kidney": 175.0,
    "aorta": 175.0, "ivc": 140.0, "bone": 420.0, "canal": 20.0, "bowel_wall": 40.0,
    "pancreas": 120.0, "duct_fluid": 12.0,
}


@dataclass(frozen=True)
class SiteDesign:
    """One scanner / source: how its scans look and which patients it holds."""

    name: str
    description: str
    p_given_pdac: float        # P(site | pdac = 1)
    p_given_control: float     # P(site | pdac = 0)
    noise_hu: float            # sd of the (slightly correlated) image noise in HU
    hu_offset: float           # calibration: stored = hu_scale * true + hu_offset
    hu_scale: float
    fov_mm: float              # in-plane field of view (square), targeted on the pancreas
    z_extent_mm: float         # length covered along the body axis
    voxel_order: str           # "RAS" or "LPS": the order of the stored array axes
    outside_fov: float | None  # value stored outside the reconstruction circle (None: air)


SITES: tuple[SiteDesign, ...] = (
    SiteDesign("A", "tertiary cancer centre: most tumour scans; noisy low-dose protocol, calibration +25 HU",
               0.55, 0.15, 24.0, 25.0, 1.0, 230.0, 180.0, "LPS", -1024.0),
    SiteDesign("B", "archive of normal pancreas scans (e.g. kidney donors): mostly controls; smooth kernel",
               0.15, 0.55, 8.0, -15.0, 0.97, 210.0, 170.0, "RAS", None),
    SiteDesign("C", "community hospital: tumour and control scans alike", 0.30, 0.30, 15.0, 0.0, 1.03,
               250.0, 200.0, "LPS", None),
)

# Tumour: location along the gland (head, body, tail), size and contrast.
TUMOUR_LOCATION = {"head": 0.60, "body": 0.25, "tail": 0.15}
TUMOUR_T = {"head": (0.0, 0.25), "body": (0.35, 0.65), "tail": (0.72, 0.95)}   # centreline parameter ranges
TUMOUR_DIAMETER_MM = (30.0, 55.0)
TUMOUR_CONTRAST_HU = (100.0, 130.0)   # below young normal pancreas: a necrotic, near-fluid mass
FAINT_FRACTION = 0.12
FAINT_DIAMETER_MM = (10.0, 15.0)
FAINT_CONTRAST_HU = (30.0, 50.0)
DUCT_DILATION_P = 0.6                # head and body tumours
DUCT_RADIUS_MM = (3.0, 5.0)
CONTROL_DUCT_P = 0.05
CONTROL_DUCT_RADIUS_MM = (1.8, 2.8)

# Planted subgroup effects.
AGE_RAMP = (50, 90)                  # old = clip((age - 50) / 40, 0, 1)
FATTY_PANCREAS_HU = 30.0             # pancreas attenuation falls by 30 * old HU
FATTY_SPECKLE_HU = 18.0              # sd of fat speckle in the pancreas, times old
FEMALE_TUMOUR_SCALE = 0.8            # women's tumour diameters
FEMALE_HABITUS = 0.92                # women's body and organ scale

PLANTED_EFFECTS: list[dict] = [
    {
        "name": "site_shortcut",
        "description": "tumour scans come mostly from site A and controls mostly from site B (P(site | pdac) "
                       "below); sites differ in noise, calibration, field of view and voxel order, so the site "
                       "is visible in the pixels and predicts the label without looking at the pancreas",
        "parameters": {s.name: {"p_given_pdac": s.p_given_pdac, "p_given_control": s.p_given_control,
                                "noise_hu": s.noise_hu, "hu_offset": s.hu_offset, "hu_scale": s.hu_scale}
                       for s in SITES},
        "attribute": "site",
        "labels": ["pdac"],
        "expected": "selection rate (and mean predicted probability) highest at site A and lowest at site B, "
                    "far beyond their true prevalences' gap only if the model leans on the site; the within-site "
                    "AUROCs of A and B are lower than the pooled AUROC; site C, with both classes alike, shows "
                    "the honest tumour signal. The site alone gives an AUROC of about 0.76",
    },
    {
        "name": "age_fatty_pancreas",
        "description": "older patients' pancreas is fatty: its attenuation falls by up to "
                       f"{FATTY_PANCREAS_HU:g} HU and it is speckled, so a hypodense tumour stands out less",
        "parameters": {"ramp_ages": list(AGE_RAMP), "old": "clip((age - 50) / 40, 0, 1)",
                       "pancreas_hu": f"{HU['pancreas']:g} - {FATTY_PANCREAS_HU:g} * old",
                       "speckle_sd_hu": f"{FATTY_SPECKLE_HU:g} * old"},
        "attribute": "age_group",
        "labels": ["pdac"],
        "expected_lower_auroc": "81+",
        "note": "prevalence also rises with age, so older groups hold more positives",
    },
    {
        "name": "female_small_tumours",
        "description": f"women's tumours are {FEMALE_TUMOUR_SCALE:g} times the diameter of men's and their "
                       f"anatomy is {FEMALE_HABITUS:g} times the size, so their tumours cover fewer voxels",
        "parameters": {"tumour_diameter_scale": FEMALE_TUMOUR_SCALE, "habitus_scale": FEMALE_HABITUS},
        "attribute": "sex",
        "labels": ["pdac"],
        "expected_lower_auroc": "F",
    },
]


# ---------------------------------------------------------------------------------------------------------
# Cohort table
# ---------------------------------------------------------------------------------------------------------


def _check_args(n: int, seed: int, image_size: int | None = None, layout: str = "manifest") -> None:
    if int(n) < 10:
        raise ConfigError(f"n={n} is too small; a synthetic cohort needs at least 10 volumes for three splits")
    if int(seed) < 0:
        raise ConfigError(f"seed={seed} must be >= 0")
    if image_size is not None and int(image_size) < 16:
        raise ConfigError(f"image_size={image_size} is too small; use at least 16 voxels")
    check_limit("n", n)
    if image_size is not None:
        check_limit("image_size", image_size, const="MAX_VOLUME_SIZE")
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")


def prevalence_probability(age, male) -> np.ndarray:
    """P(pdac = 1) of the label model for ages in years and male 0/1."""
    age, male = np.asarray(age, dtype=float), np.asarray(male, dtype=float)
    m = PREVALENCE_MODEL
    return expit(m["intercept"] + m["age_per_decade"] * (age - 60.0) / 10.0 + m["male"] * male)


def sample_cohort(n: int, *, seed: int = 0) -> pd.DataFrame:
    """The manifest table of a cohort of ``n`` scans (demographics, label, site, split), without volumes.

    It is exactly the table :func:`synthesize_ct` writes for the same ``n`` and ``seed``.
    """
    _check_args(n, seed)
    rng = np.random.default_rng([seed, 0])
    male = rng.random(n) < P_MALE
    age = AGE_MIN + np.floor((AGE_MAX - AGE_MIN + 1) * rng.beta(2.2, 1.6, size=n)).astype(np.int64)
    pdac = (rng.random(n) < prevalence_probability(age, male)).astype(np.int64)
    names = [s.name for s in SITES]
    p_pos = np.array([s.p_given_pdac for s in SITES])
    p_neg = np.array([s.p_given_control for s in SITES])
    u = rng.random(n)
    site = np.where(pdac == 1, np.searchsorted(np.cumsum(p_pos), u * p_pos.sum()),
                    np.searchsorted(np.cumsum(p_neg), u * p_neg.sum()))
    split = splits_from_order(rng.permutation(n), tuple(SPLIT_FRACTIONS.values()))
    width = max(4, len(str(n)))
    ids = [f"CT{i:0{width}d}" for i in range(n)]
    frame = pd.DataFrame({
        "sample_id": ids,
        "path": [f"images/{s}.nii.gz" for s in ids],
        "split": split,
        "patient_id": ids,
        "pdac": pdac,
        "sex": np.where(male, "M", "F"),
        "age": age,
        "site": [names[k] for k in site],
    })
    return frame[list(MANIFEST_COLUMNS)]


# ---------------------------------------------------------------------------------------------------------
# Rendering. World coordinates are NIfTI's RAS+ millimetres (x grows towards the patient's Right, y towards
# Anterior, z towards Superior), origin near the centre of the abdomen.
# ---------------------------------------------------------------------------------------------------------


def _soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume occupancy from a signed depth in mm (positive inside)."""
    return expit(signed / edge)


def _ellipsoid(p, centre, radii, edge) -> np.ndarray:
    q = np.sqrt(sum(((p[i] - centre[i]) / radii[i]) ** 2 for i in range(3)))
    return _soft((1.0 - q) * float(np.mean(radii)), edge)


def _cylinder_z(p, cx, cy, rx, ry, edge) -> np.ndarray:
    q = np.sqrt(((p[0] - cx) / rx) ** 2 + ((p[1] - cy) / ry) ** 2)
    return _soft((1.0 - q) * 0.5 * (rx + ry), edge)


def _paint(vol: np.ndarray, occ: np.ndarray, value) -> None:
    vol *= 1.0 - occ
    vol += occ * value


def _centreline(shift, scale, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Points (n, 3) along the pancreas from head (t=0) to tail (t=1), and their t."""
    t = np.linspace(0.0, 1.0, n)
    head, body, tail = np.array([38.0, 8.0, -18.0]), np.array([-5.0, 38.0, 5.0]), np.array([-88.0, -8.0, 22.0])
    pts = ((1 - t) ** 2)[:, None] * head + (2 * (1 - t) * t)[:, None] * body + (t ** 2)[:, None] * tail
    return pts * scale + shift, t


def _tube_depth(p, pts: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed depth (mm) inside a tube of varying radius around a polyline, and the nearest point's index.

    Only voxels within the tube's bounding box (plus a margin) are measured; the rest are far outside.
    """
    margin = float(radius.max()) + 30.0
    lo, hi = pts.min(axis=0) - margin, pts.max(axis=0) + margin
    inside = (p[0] >= lo[0]) & (p[0] <= hi[0]) & (p[1] >= lo[1]) & (p[1] <= hi[1]) & (p[2] >= lo[2]) & (p[2] <= hi[2])
    depth = np.full(p[0].shape, -margin)
    nearest = np.zeros(p[0].shape, dtype=np.int64)
    if inside.any():
        flat = np.stack([c[inside] for c in p], axis=1)                                  # (V, 3)
        d2 = (flat ** 2).sum(1)[:, None] - 2.0 * flat @ pts.T + (pts ** 2).sum(1)[None, :]  # (V, n)
        k = np.argmin(d2, axis=1)
        dist = np.sqrt(np.maximum(d2[np.arange(len(k)), k], 0.0))
        depth[inside] = radius[k] - dist
        nearest[inside] = k
    return depth, nearest


def _old(age: float) -> float:
    return float(np.clip((age - AGE_RAMP[0]) / (AGE_RAMP[1] - AGE_RAMP[0]), 0.0, 1.0))


def site_grid(site: SiteDesign, size: int) -> np.ndarray:
    """Voxel spacing (mm) of a site's scans at ``size`` voxels per edge."""
    return np.array([site.fov_mm / size, site.fov_mm / size, site.z_extent_mm / size])


def render_ct(row: dict, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """One scan in RAS voxel order: stored HU (float, before rounding), the label map (0 background,
    1 pancreas, 2 tumour) and what was drawn (tumour size, contrast, location, duct)."""
    site = SITES[[s.name for s in SITES].index(row["site"])]
    spacing = site_grid(site, size)
    female = row["sex"] == "F"
    old = _old(row["age"])
    habitus = rng.normal(FEMALE_HABITUS if female else 1.0, 0.05)
    shift = np.array([rng.normal(0, 8), rng.normal(0, 6), rng.normal(0, 12)])
    axes = [(np.arange(size) - (size - 1) / 2.0) * spacing[i] for i in range(3)]
    p = np.meshgrid(*axes, indexing="ij")
    edge = 0.35 * float(spacing.min())
    # Pancreas-protocol scans are reconstructed on a targeted field of view around the pancreas, so the
    # grid's centre sits left of and in front of the body's centre.
    target = np.array([-22.0, 12.0, 0.0]) * habitus
    local = [p[i] + target[i] - shift[i] for i in range(3)]

    vol = np.full((size,) * 3, HU["air"], dtype=np.float64)
    ax, ay = 150.0 * habitus, 108.0 * habitus
    fat_layer = rng.uniform(12, 22) * (1.35 if female else 1.0)
    _paint(vol, _cylinder_z(local, 0, 0, ax, ay, edge), HU["muscle"])                   # skin + wall
    _paint(vol, _cylinder_z(local, 0, 0, ax - 4, ay - 4, edge), HU["fat"])              # subcutaneous fat
    _paint(vol, _cylinder_z(local, 0, -5, ax - 4 - fat_layer, ay - 4 - fat_layer, edge), HU["muscle"])
    _paint(vol, _cylinder_z(local, 0, -5, ax - 12 - fat_layer, ay - 12 - fat_layer, edge), HU["fat"] + 10)

    def organ(centre, radii, hu, jitter=6.0):
        c = np.asarray(centre) * habitus + rng.normal(0, jitter, 3)
        _paint(vol, _ellipsoid(local, c, np.asarray(radii) * habitus, edge), hu)

    # Gas-filled bowel loops in the lower and anterior abdomen.
    for _ in range(int(rng.integers(3, 7))):
        c = [rng.uniform(-70, 70), rng.uniform(10, 70), rng.uniform(-120, -45)]
        r = rng.uniform(12, 22)
        organ(c, (r, r, r * 1.3), HU["bowel_wall"], jitter=0)
        organ(c, (r - 4, r - 4, r * 1.3 - 4), HU["air"], jitter=0)
    organ((-45, 45, 70), (40, 30, 35), HU["bowel_wall"])                                   # stomach
    organ((-50, 52, 80), (25, 18, 22), HU["air"])
    organ((88, 0, 58), (62, 82, 58), HU["liver"])                                          # liver (right)
    organ((-102, -42, 58), (28, 42, 38), HU["spleen"])                                      # spleen (left)
    for side in (1, -1):                                                                   # kidneys
        c = np.array([62.0 * side, -48.0, -10.0]) * habitus + rng.normal(0, 4, 3)
        _paint(vol, _ellipsoid(local, c, np.array([27, 28, 52]) * habitus, edge), HU["kidney"])
        _paint(vol, _cylinder_z(local, 38 * side * habitus, -58 * habitus, 16, 18, edge) *
               _soft(60 - np.abs(local[2] + 20), edge), HU["muscle"])                      # psoas
    _paint(vol, _cylinder_z(local, 0, -66 * habitus, 22, 19, edge), HU["bone"])          # vertebral bodies
    disc = 0.5 + 0.5 * np.cos(2 * np.pi * (local[2] - rng.uniform(0, 32)) / 32.0)
    _paint(vol, _cylinder_z(local, 0, -66 * habitus, 22, 19, edge) * _soft(disc - 0.85, 0.05), 90.0)
    _paint(vol, _cylinder_z(local, 0, -92 * habitus, 9, 8, edge), HU["canal"])           # spinal canal
    _paint(vol, _cylinder_z(local, -14, -34 * habitus, 11, 11, edge), HU["aorta"])      # aorta (left of midline)
    _paint(vol, _cylinder_z(local, 24, -30 * habitus, 13, 10, edge), HU["ivc"])

    # Pancreas: a tube around a curved centreline, thicker at the head.
    pts, t = _centreline(rng.normal(0, 4, 3), habitus)
    radius = (17.0 - 5.0 * np.minimum(t / 0.4, 1.0)) * habitus * rng.uniform(0.9, 1.1)
    depth, nearest = _tube_depth(local, pts, radius)
    panc = _soft(depth, edge) * _soft(np.minimum(t[nearest] + 0.02, 1.02 - t[nearest]) * 100, 0.5)
    panc_hu = HU["pancreas"] - FATTY_PANCREAS_HU * old
    speckle = gaussian_filter(rng.normal(0, 1, vol.shape), 0.7) * FATTY_SPECKLE_HU * old * 2.0
    _paint(vol, panc, panc_hu + speckle)
    labelmap = (panc > 0.5).astype(np.uint8)

    truth = {"tumour": False, "location": None, "diameter_mm": None, "contrast_hu": None, "faint": None,
             "duct": False}
    duct_from = None
    if int(row["pdac"]) == 1:
        where = rng.choice(list(TUMOUR_LOCATION), p=list(TUMOUR_LOCATION.values()))
        faint = rng.random() < FAINT_FRACTION
        diameter = rng.uniform(*(FAINT_DIAMETER_MM if faint else TUMOUR_DIAMETER_MM))
        diameter *= (FEMALE_TUMOUR_SCALE if female else 1.0)
        contrast = rng.uniform(*(FAINT_CONTRAST_HU if faint else TUMOUR_CONTRAST_HU))
        tt = rng.uniform(*TUMOUR_T[where])
        k = int(np.argmin(np.abs(t - tt)))
        centre = pts[k] + rng.normal(0, 2.5, 3)
        radii = 0.5 * diameter * rng.uniform(0.85, 1.15, 3)
        occ = _ellipsoid(local, centre, radii, edge)
        _paint(vol, occ, HU["pancreas"] - contrast)
        tumour = occ > 0.5
        if not tumour.any():  # a mass smaller than a voxel still marks its most covered voxel
            tumour = occ == occ.max()
        labelmap[tumour] = 2
        truth.update({"tumour": True, "location": str(where), "diameter_mm": round(float(diameter), 2),
                      "contrast_hu": round(float(contrast), 2), "faint": bool(faint)})
        if where != "tail" and rng.random() < DUCT_DILATION_P:
            duct_from, duct_r = tt, rng.uniform(*DUCT_RADIUS_MM)
    elif rng.random() < CONTROL_DUCT_P:
        duct_from, duct_r = 0.05, rng.uniform(*CONTROL_DUCT_RADIUS_MM)
    if duct_from is not None:
        sel = t >= duct_from
        ddepth, _ = _tube_depth(local, pts[sel], np.full(int(sel.sum()), duct_r))
        _paint(vol, _soft(ddepth, edge) * panc, HU["duct_fluid"])
        truth["duct"] = True

    # Site: correlated noise, calibration and the reconstruction circle.
    noise = gaussian_filter(rng.normal(0, 1, vol.shape), 0.6)
    noise *= site.noise_hu / max(float(noise.std()), 1e-9)
    vol = site.hu_scale * (vol + noise) + site.hu_offset
    if site.outside_fov is not None:
        outside = np.hypot(p[0], p[1]) > 0.5 * site.fov_mm
        vol[outside] = site.outside_fov
    return vol.astype(np.float32), labelmap, truth


def ras_affine(spacing, size: int, voxel_order: str, origin_shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Affine of a ``size``^3 grid centred on the origin (plus ``origin_shift`` mm), stored in ``voxel_order``."""
    spacing = np.asarray(spacing, dtype=float)
    sign = np.array([-1.0, -1.0, 1.0]) if voxel_order == "LPS" else np.ones(3)
    aff = np.diag(np.append(sign * spacing, 1.0))
    centre = (size - 1) / 2.0
    aff[:3, 3] = -sign * spacing * centre + np.asarray(origin_shift, dtype=float)
    return aff


def to_storage(ras: np.ndarray, voxel_order: str) -> np.ndarray:
    """Reorder a RAS-ordered array into the site's stored voxel order (LPS flips the first two axes)."""
    return np.ascontiguousarray(ras[::-1, ::-1, :]) if voxel_order == "LPS" else ras


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, dtype) -> None:
    """Write a NIfTI-1 file (.nii or .nii.gz) with mm units, qform/sform code 1, reproducibly."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_xyzt_units(xyz="mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if np.issubdtype(np.dtype(dtype), np.integer):
        img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    path = Path(path)
    atomic_write_bytes(path, gzip.compress(raw, compresslevel=6, mtime=0) if path.name.endswith(".gz") else raw,
                       mode=None)


def _scan(row: dict, seed: int, i: int, size: int):
    # One random stream per scan: a scan depends only on (seed, index).
    rng = np.random.default_rng([seed, 1, i])
    site = SITES[[s.name for s in SITES].index(row["site"])]
    hu, labelmap, truth = render_ct(row, rng, size)
    shift = rng.normal(0, 20, 3).round(1)   # scanner table position: origins differ between scans
    affine = ras_affine(site_grid(site, size), size, site.voxel_order, shift)
    return (to_storage(np.clip(np.rint(hu), -2048, 3071), site.voxel_order),
            to_storage(labelmap, site.voxel_order), affine, truth)


# ---------------------------------------------------------------------------------------------------------
# Writing a cohort
# ---------------------------------------------------------------------------------------------------------


def _summary(frame: pd.DataFrame, truths: list[dict]) -> dict:
    groups = age_group(frame["age"])
    pos = frame["pdac"] == 1
    tum = pd.DataFrame(truths)
    by_site = {}
    for s in SITES:
        part = frame[frame["site"] == s.name]
        by_site[s.name] = {"n": int(len(part)), "n_pdac": int(part["pdac"].sum()),
                           "prevalence": round(float(part["pdac"].mean()), 4) if len(part) else None}
    diam = {sx: (round(float(tum.loc[(pos & (frame["sex"] == sx)).to_numpy(), "diameter_mm"].mean()), 2)
                 if (pos & (frame["sex"] == sx)).any() else None) for sx in ("F", "M")}
    return {
        "n": int(len(frame)),
        "n_pdac": int(pos.sum()),
        "prevalence": round(float(pos.mean()), 4),
        "splits": {sp: {"n": int((frame["split"] == sp).sum()),
                        "n_pdac": int(((frame["split"] == sp) & pos).sum())} for sp in SPLIT_FRACTIONS},
        "by_site": by_site,
        "by_age_group": {g: {"n": int((groups == g).sum()), "n_pdac": int(((groups == g) & pos).sum())}
                         for g in AGE_GROUPS},
        "by_sex": {sx: {"n": int((frame["sex"] == sx).sum()), "n_pdac": int(((frame["sex"] == sx) & pos).sum())}
                   for sx in ("F", "M")},
        "mean_tumour_diameter_mm_by_sex": diam,
        "n_faint_tumours": int(tum["faint"].fillna(False).astype(bool).sum()) if len(tum) else 0,
        "n_dilated_duct": {"pdac": int(tum.loc[pos.to_numpy(), "duct"].sum()),
                           "control": int(tum.loc[(~pos).to_numpy(), "duct"].sum())},
    }


def _record(frame, truths, params, files) -> dict:
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "privaudit_version": PRIVAUDIT_VERSION,
        "task": "pdac",
        "parameters": params,
        "files": files,
        "columns": list(MANIFEST_COLUMNS),
        "conventions": {
            "intensity": "Hounsfield units, int16, scl_slope 1, scl_inter 0",
            "world": "NIfTI RAS+ millimetres (+x Right, +y Anterior, +z Superior), qform and sform code 1",
            "voxel_order": {s.name: s.voxel_order for s in SITES},
            "spacing_mm_at_this_size": {s.name: [round(float(v), 4) for v in site_grid(s, params["image_size"])]
                                        for s in SITES},
            "label_map": {"0": "background", "1": "pancreas", "2": "tumour"},
        },
        "population": {
            "age": f"{AGE_MIN} + floor({AGE_MAX - AGE_MIN + 1} * Beta(2.2, 1.6))",
            "p_male": P_MALE,
            "prevalence_model": {"form": "logit P(pdac=1) = intercept + age_per_decade * (age - 60) / 10 + "
                                         "male * [M]", "coefficients": PREVALENCE_MODEL},
            "site_given_label": {s.name: {"pdac": s.p_given_pdac, "control": s.p_given_control} for s in SITES},
            "split_fractions": SPLIT_FRACTIONS,
            "one_scan_per_patient": True,
        },
        "sites": [asdict(s) for s in SITES],
        "anatomy_hu": HU,
        "tumour": {
            "location": TUMOUR_LOCATION, "diameter_mm": list(TUMOUR_DIAMETER_MM),
            "contrast_below_normal_pancreas_hu": list(TUMOUR_CONTRAST_HU),
            "faint": {"fraction": FAINT_FRACTION, "diameter_mm": list(FAINT_DIAMETER_MM),
                      "contrast_hu": list(FAINT_CONTRAST_HU)},
            "dilated_duct": {"p_head_or_body_tumour": DUCT_DILATION_P, "radius_mm": list(DUCT_RADIUS_MM),
                             "p_control": CONTROL_DUCT_P, "control_radius_mm": list(CONTROL_DUCT_RADIUS_MM)},
        },
        "planted_effects": PLANTED_EFFECTS,
        "realised": _summary(frame, truths),
    }


def synthesize_ct(
    out: Path,
    *,
    n: int = 400,
    image_size: int = 32,
    seed: int = 0,
    layout: str = "manifest",
    progress: Callable[[int], object] | None = None,
) -> Path:
    """Write a synthetic CT cohort into ``out``; return its manifest.csv (or dataset.json for ``layout="msd"``).

    ``layout="manifest"``: ``images/<sample_id>.nii.gz``, ``manifest.csv`` and ``cohort.json``.
    ``layout="msd"``: the Decathlon layout at ``out`` (``dataset.json``, ``imagesTr/pancreas_NNN.nii.gz`` with
    ``labelsTr/`` label maps for the tumour scans), ``controls/PANCREAS_NNNN.nii.gz`` for the tumour-free scans,
    ``demographics.csv`` in both folders (``image``, ``sex``, ``age``) and ``cohort.json`` (whose per-scan
    table ``cohort.csv`` maps each file to its synthetic site and split). ``progress`` is called with the
    number of volumes written so far. The same arguments give byte-identical files.
    """
    _check_args(n, seed, image_size, layout)
    frame = sample_cohort(n, seed=seed)
    out = Path(out)
    msd = layout == "msd"
    if msd:
        for d in ("imagesTr", "labelsTr", "controls"):
            (out / d).mkdir(parents=True, exist_ok=True)
        n_pos = n_neg = 0
        paths = []
        for pdac in frame["pdac"]:
            if pdac == 1:
                n_pos += 1
                paths.append(f"imagesTr/pancreas_{n_pos:03d}.nii.gz")
            else:
                n_neg += 1
                paths.append(f"controls/PANCREAS_{n_neg:04d}.nii.gz")
        frame["path"] = paths
    else:
        (out / "images").mkdir(parents=True, exist_ok=True)

    truths = []
    for i, row in enumerate(frame.to_dict("records")):
        data, labelmap, affine, truth = _scan(row, seed, i, image_size)
        write_nifti(out / row["path"], data, affine, dtype=np.int16)
        if msd and row["pdac"] == 1:
            write_nifti(out / row["path"].replace("imagesTr/", "labelsTr/"), labelmap, affine, dtype=np.uint8)
        truths.append(truth)
        if progress is not None:
            progress(i + 1)

    params = {"n": int(n), "image_size": int(image_size), "seed": int(seed), "layout": layout}
    if not msd:
        manifest = out / "manifest.csv"
        atomic_write_csv(manifest, frame, mode=None, index=False, lineterminator="\n")
        files = {"manifest": "manifest.csv", "volumes": "images/<sample_id>.nii.gz (int16 HU)"}
        write_json(out / "cohort.json", _record(frame, truths, params, files))
        return manifest

    pos = frame[frame["pdac"] == 1]
    neg = frame[frame["pdac"] == 0]
    dataset = {
        "name": "Pancreas",
        "description": "privaudit synthetic pancreas tumour CT, in the Medical Segmentation Decathlon layout",
        "reference": f"{GENERATOR} {GENERATOR_VERSION} (seed {seed})",
        "licence": "synthetic data, no restrictions",
        "release": GENERATOR_VERSION,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": int(len(pos)),
        "numTest": 0,
        "training": [{"image": "./" + p, "label": "./" + p.replace("imagesTr/", "labelsTr/")} for p in pos["path"]],
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n", encoding="utf-8")
    for part, folder, prefix in ((pos, out, ""), (neg, out / "controls", "controls/")):
        demo = pd.DataFrame({"image": [p[len(prefix):] for p in part["path"]], "sex": part["sex"].to_numpy(),
                             "age": part["age"].to_numpy()})
        demo.to_csv(folder / "demographics.csv", index=False, lineterminator="\n")
    frame.to_csv(out / "cohort.csv", index=False, lineterminator="\n")
    files = {"dataset": "dataset.json", "images": "imagesTr/pancreas_NNN.nii.gz (tumour scans, int16 HU)",
             "labels": "labelsTr/pancreas_NNN.nii.gz (uint8: 0 background, 1 pancreas, 2 tumour)",
             "controls": "controls/PANCREAS_NNNN.nii.gz (tumour-free scans, no label maps)",
             "demographics": "demographics.csv and controls/demographics.csv (image, sex, age)",
             "truth": "cohort.csv: every scan's synthetic site, split and demographics"}
    write_json(out / "cohort.json", _record(frame, truths, params, files))
    return out / "dataset.json"
