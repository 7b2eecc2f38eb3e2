"""Synthetic brain-aging cohort: 3D T1-like phantoms with exact ground-truth atrophy.

Each subject is a skull-stripped 3D brain (1.5 mm voxels, RAS) built from implicit surfaces in an MNI-like
template frame: cerebrum (with temporal lobes), cerebellum and brainstem; a ~2.8 mm cortical grey-matter
ribbon with radial sulci (version 1; folded in version 2, see below), the interhemispheric and Sylvian
fissures, white matter, deep grey nuclei (thalamus, caudate head, putamen), C-shaped lateral ventricles
(frontal/occipital/temporal horns), a third ventricle, two hippocampi and subarachnoid CSF up to a fixed
inner-skull hull. Subject identity = random
size, pose, smooth deformation, gyral pattern, ventricle and hippocampus size, ribbon thickness.

Aging and disease move surfaces, never cross-fade intensities: every structure is a level set whose level
is chosen so that its voxel count is exactly V(age-50 reference) * exp(log change), i.e. ventricles and
hippocampi grow/shrink by normal offsets of their surfaces and the brain shrinks from the pial surface
(sulci and subarachnoid space widen; the hull stays). Lost brain, including lost hippocampus, becomes CSF.
Masks: brain = cortical and deep GM + WM (with lesions) + hippocampi (no CSF of any kind); ventricles =
lateral ventricles (not the third); hippocampus. Annual volume changes (compounding, log-linear in time),
exact to the voxel in the masks (ventricles saturate at ~6x their age-50 volume):

    hippocampus  CN -1.4 %/yr, MCI -3.0 %/yr (literature 2.5-3.7), AD -4.7 %/yr
                 (Barnes et al. 2009, Neurobiol Aging meta-analysis; Jack et al. 2000, Neurology)
    whole brain  CN -0.45 %/yr, MCI -0.7 %/yr, AD -1.0 %/yr   (Fotenos et al. 2005, Neurology)
    ventricles   CN +20 %/decade (= +1.84 %/yr, Kaye et al. 1992), MCI +3.5 %/yr, AD +5 %/yr
    cortex       ribbon thickness shrinks at the whole-brain rate (an assumption, not a fitted value)
    WM lesions   periventricular T1-hypointensities whose extent grows with age (qualitative only)

Disease clock: tau = years since MCI onset (-inf for subjects who never convert); CN for tau < 0, MCI for
0 <= tau < T_MCI (4 years), Dementia after. Atrophy speeds up T_PRE (6) years before MCI onset, while the
subject is still CN (preclinical AD: hippocampal atrophy precedes symptoms). Log volume change = CN rate *
(age - 50) + (MCI - CN rate) * years in preclinical + MCI + (AD - CN rate) * years in Dementia; ages below
50 render as 50. T_PRE is set so that the cross-sectional hippocampal deficit against age-matched CN comes
out near the meta-analytic ~13 % for MCI and ~24 % for AD (Shi et al. 2009, Hum Brain Mapp); without it
the diagnoses differed by a few per cent and no slice classifier could tell them apart.

Contrast (version 1): WM 1.0, cortical GM 0.77 (median ~0.72 after partial volume), deep GM 0.80,
hippocampus 0.78, CSF 0.30, background 0; then a Gaussian partial-volume blur (sigma 0.8 voxel), a smooth
multiplicative bias field (about +-8 %; version 2 +-3 %) and Rician noise (sigma 0.025); bias and noise are
seeded per scan.

Anatomy versions (`VERSIONS`; a cohort records its own in the CSV column `synthetic_version`, and every
renderer takes it, so a store is always re-rendered with the anatomy it was built from). Everything above
holds for both; version 1 is the anatomy described above, kept bit for bit (the first phantom). Version 2,
the default (`DEFAULT_VERSION`) and the cohort of the published results, changes the anatomy and contrast
towards real T1 scans, each change chosen by the realism report (bench/realism.py against two real brains,
the ICBM152 2009a template and Colin27, reference/README.md):

    folding      sulci are the zero sheets of an isotropic band-limited 3D field (wavelength 20 mm; the real
                 references' dominant cortical wavelength is 20-23 mm), so they meander and branch instead of
                 pointing at the centre; kept where the sheet leans less than ~50 degrees from the surface normal,
                 down to 15-36 mm below the smooth hull (or to the envelope of the basal ganglia), 30 % deeper
                 at the base than at the vertex (measured: the GM share by slice position);
                 sulci closed at age 50 (0.2 mm CSF slit: real young sulci are mostly GM against GM) and
                 opened by atrophy. The ribbon lines the sulcal walls, so white matter reaches into the gyri.
    ribbon       3.2-3.6 mm at age 50 (real cortex 2.5-3 mm, Fischl & Dale 2000, PNAS; thicker here so that,
                 after 1.5 mm voxels and partial volume, the GM share of the brain comes out near the real
                 references' ~0.45, the ICBM152 tissue maps' 0.49)
    contrast     cortical GM 0.79, deep GM 0.81, hippocampus 0.79, CSF 0.33, brainstem 0.88 (own label;
                 pons darker than cerebral WM); measured class means after partial volume CSF / GM / WM
                 -0.36 / 0.37 / 0.79 on the [-1, 1] scale against the real references' -0.30 / 0.38 / 0.81
    CSF          0.0-0.5 mm of subarachnoid CSF outside the smooth hull (v1 2-3.5 mm; skull-stripped real
                 scans keep little), a 1 mm interhemispheric fissure (v1 2 mm), cerebellar folia 14 mm deep
                 with 0.4 mm slits (v1 8 mm, 1 mm): the CSF share at cohort ages near the real ~0.09
    shape        cerebrum half heights 60 / 46 mm above / below its centre (v1 64 / 40) and a larger cerebellum
                 reaching up to the tentorium (half axes 50, 33, 27 mm, z -63 to -9, about its extent in MNI
                 space; v1 46, 30, 19), so the slab centred on the brain's centre of mass cuts nearly the
                 anatomy it cuts in real scans (measured: the GM share of the inferior slices)
    pose         rotations sd 1.7 / 0.7 / 0.7 degrees (pitch / roll / yaw; v1 3.4 / 2.3 / 2.3): real scans in
                 canonical (MNI-like) orientation are tilted by about a degree; the smooth warp is mirror
                 symmetric up to 30 % of its antisymmetric part (hemispheres of one brain are near mirror images)
    bias         sd 1.5 % of the log (about +-3 %; v1 4 %, +-8 %): what N3 correction leaves in ADNI's
                 preprocessed MPRAGE

Volumes are stored as int16 with scl_slope 2**-10 (`quantise` is that round trip); version 2 files carry
"synthetic cohort v2" in the NIfTI description (version 1 files are unchanged, with none).

Not modelled: skull, scalp, eyes, vessels, dura/falx, choroid plexus, the fourth ventricle, cerebellar
and brainstem atrophy beyond the global surface offset, amyloid/tau, motion, scanner and protocol effects
beyond bias and noise, and any correlation between anatomy and sex or education.
"""
import csv
import functools
import math
import multiprocessing
import os

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from mri.grids import tile, to_uint8, write_png
from mri.io import atomic_path

VOXEL_MM = 1.5
SHAPE = (112, 136, 112)
DX = ("CN", "MCI", "Dementia")
VISITS = ("bl", "m12", "m24")   # the default visits of a synthetic subject
T_MCI = 4.0  # years from MCI onset to dementia
T_PRE = 6.0  # years of faster (MCI-rate) atrophy before MCI onset
REF_AGE = 50.0  # anatomy is defined at this age; aging runs from here
ANNUAL_CHANGE = {  # fractional volume change per year, compounding
    "hippocampus": {"CN": -0.014, "MCI": -0.030, "Dementia": -0.047},
    "brain": {"CN": -0.0045, "MCI": -0.007, "Dementia": -0.010},
    "ventricles": {"CN": 1.2 ** 0.1 - 1.0, "MCI": 0.035, "Dementia": 0.05},
}
LABELS = ("background", "csf", "gm", "wm", "deep_gm", "hippocampus", "ventricle", "third_ventricle", "wmh",
          "brainstem")  # brainstem: version 2 only (WM in version 1)
INTENSITY = np.array([0.0, 0.30, 0.77, 1.0, 0.80, 0.78, 0.30, 0.30, 0.80], np.float32)
INTENSITY_V2 = np.array([0.0, 0.33, 0.79, 1.0, 0.81, 0.79, 0.33, 0.33, 0.81, 0.88], np.float32)
SULCAL_WAVELENGTH = 20.0  # version 2 folding (mm; see the module docstring): of the sulcal field,
SULCAL_DEPTH = 30.0  # mean depth below the smooth hull (x 0.5-1.5 by a slow field),
SULCAL_HALF_WIDTH = 0.1  # CSF slit at age 50,
SULCAL_MAX_COS = 0.75  # largest |cos| between sheet and surface normals (sheet leaning < ~50 degrees),
SULCAL_GATE_MM = 15.0  # over which a sheet fades beyond it
BRAIN_LABELS = (2, 3, 4, 5, 8, 9)
NOISE_SIGMA = 0.025
BLUR_VOXELS = 0.8
STORAGE_SLOPE = 2.0 ** -10  # int16 step of the stored volumes (exact in float32)
VERSIONS = (1, 2)  # anatomy generations (see the module docstring); a cohort records its own
DEFAULT_VERSION = 2  # what a new cohort gets unless asked otherwise (version 1: the cohort before realism work)
COLUMNS = ("PTID", "VISCODE", "AGE", "Years_bl", "DX", "DX_bl", "ADAS13", "MMSE", "FAQ", "PTGENDER",
           "PTEDUCAT", "IMAGEUID", "subject_seed", "onset_age", "noise_seed", "synthetic_version")

_BRAIN_CENTRE = np.array([0.0, -17.0, 18.0], np.float32)  # template (MNI-like) point placed at _WORLD_CENTRE
_WORLD_CENTRE = np.array([0.0, 0.0, 3.0], np.float32)
# Polylines (x, y, z, radius) in template mm for the right hemisphere; mirrored for the left.
_VENTRICLE = [(6, 30, 12, 5.0), (9, 18, 16, 6.2), (11, 4, 19, 6.0), (13, -10, 21, 5.6), (17, -25, 20, 6.2),
              (24, -37, 14, 7.5), (30, -40, 4, 6.8), (34, -33, -5, 4.4), (35, -22, -12, 3.2), (33, -10, -17, 2.5)]
_OCCIPITAL_HORN = [(24, -37, 14, 6.2), (22, -52, 10, 4.4), (19, -62, 8, 2.5)]
_HIPPOCAMPUS = [(26, -8, -20, 6.5), (28, -18, -15, 6.2), (28, -28, -10, 5.4), (24, -36, -3, 4.2), (19, -40, 3, 3.0)]
_BRAINSTEM = [(0, -20, 2, 11.0), (0, -28, -25, 12.0), (0, -36, -55, 10.0), (0, -38, -72, 9.0)]
_DEEP_GM = [((11, -18, 6), (8, 14, 9)),  # thalamus: (centre, half axes) of ellipsoids
            ((14, 12, 10), (5, 9, 9)),  # caudate head
            ((25, 3, 2), (5, 14, 9))]  # putamen
_THIRD_VENTRICLE = ((-14.0, 2.0), (13.0, 9.0))  # (y, z) centre and half axes of the midline slit


def affine():
    """Voxel -> world (mm, RAS) with the world origin at the grid centre."""
    a = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    a[:3, 3] = -VOXEL_MM * (np.array(SHAPE) - 1) / 2.0
    return a


# ---------------------------------------------------------------- disease clock and atrophy

def stage(tau):
    """'CN', 'MCI' or 'Dementia' from the disease clock."""
    return "CN" if not tau >= 0 else ("MCI" if tau < T_MCI else "Dementia")


def _stage_years(tau):
    """Years at the MCI rate (preclinical + MCI) and in Dementia by clock value tau."""
    if not tau >= -T_PRE:
        return 0.0, 0.0
    return min(tau + T_PRE, T_PRE + T_MCI), max(tau - T_MCI, 0.0)


def log_change(structure, age, tau):
    """log(volume / volume at age 50 without disease) of 'hippocampus', 'brain' or 'ventricles'."""
    r = {dx: math.log1p(p) for dx, p in ANNUAL_CHANGE[structure].items()}
    t_fast, t_ad = _stage_years(tau)
    return r["CN"] * max(age - REF_AGE, 0.0) + (r["MCI"] - r["CN"]) * t_fast + (r["Dementia"] - r["CN"]) * t_ad


def disease_clock(tau, age, target_age, target_dx):
    """Clock of the same subject seen at `target_age` with diagnosis `target_dx`.

    The clock runs on with age, then is moved into the target stage if it is not there already:
    MCI -> [0.5, T_MCI - 0.5], Dementia -> >= T_MCI + 0.5; CN -> -inf (no disease) for a subject whose own
    clock is MCI or Dementia, while a CN subject on its way to MCI (finite tau < 0) stays CN by stopping its
    clock 0.5 years before MCI onset (or at its own clock if that is later), so it keeps the preclinical
    atrophy it already has and its CN aging stays monotone. A subject's own (age, dx) returns its own tau.
    """
    t = tau + (target_age - age)
    if target_dx == "CN" and -math.inf < tau < 0:
        return min(t, max(tau, -0.5))
    if stage(t) == target_dx:
        return t
    if target_dx == "CN":
        return -math.inf
    if target_dx == "MCI":
        return min(max(t, 0.5), T_MCI - 0.5)
    if target_dx == "Dementia":
        return T_MCI + 0.5
    raise ValueError(f"unknown diagnosis {target_dx!r}; expected one of {DX}")


def tau_of(row):
    """Disease clock of a cohort row at its visit age (AGE + Years_bl)."""
    return float(row["AGE"]) + float(row["Years_bl"]) - float(row["onset_age"])


# ---------------------------------------------------------------- cohort table

_SITES = (2, 5, 6, 7, 11, 13, 18, 22, 23, 27, 31, 32, 33, 35, 36, 37, 41, 53, 67, 68, 70, 73, 82, 94, 98, 99,
          100, 114, 116, 123, 126, 127, 128, 129, 130, 131, 133, 135, 136, 137, 141, 153, 941)


def _severity(tau):
    """0 while CN, 0..1 through MCI, then +1 per 4 years of dementia."""
    if not tau >= 0:
        return 0.0
    return tau / T_MCI if tau < T_MCI else 1.0 + (tau - T_MCI) / 4.0


def _months(viscode):
    """'bl' -> 0, 'm24' -> 24."""
    return 0 if viscode == "bl" else int(viscode.lstrip("m"))


def make_cohort(n_subjects, seed=0, visits=VISITS, version=DEFAULT_VERSION):
    """ADNIMERGE-like rows (one per scan) of a phantom cohort, plus the ground-truth keys (the anatomy
    `version` included; the table itself is the same for every version).

    Baseline mix ~35 % CN (a quarter of them reach MCI some years later), ~45 % MCI (EMCI in the first
    1.5 years of the stage, LMCI after), ~20 % Dementia; MCI subjects convert when their clock reaches
    T_MCI. Scores depend on disease severity, hippocampal atrophy, education and a subject effect.
    """
    rng = np.random.default_rng(seed)
    numbers = rng.choice(9999, size=n_subjects, replace=False) + 1
    image_uid = 30000 + int(rng.integers(0, 10000))
    rows = []
    for number in numbers:
        group = rng.choice(3, p=(0.35, 0.45, 0.20))
        age = round(float(np.clip(rng.normal(73.5, 7.0), 55.0, 90.0)), 1)
        if group == 0:
            tau_bl = -rng.uniform(0.3, 12.0) if rng.random() < 0.25 else -math.inf
        elif group == 1:
            tau_bl = T_MCI * rng.beta(1.0, 1.6)  # skewed early: about a third convert within 2 years
        else:
            tau_bl = T_MCI + rng.gamma(1.5, 1.2)
        tau_bl = min(tau_bl, age - REF_AGE)
        onset = round(age - tau_bl, 3) if tau_bl > -math.inf else math.inf
        tau_bl = age - onset
        dx_bl = {"CN": "CN", "Dementia": "AD"}.get(stage(tau_bl), "EMCI" if tau_bl < 1.5 else "LMCI")
        subject = {"PTID": f"{rng.choice(_SITES):03d}_S_{number:04d}", "AGE": age, "DX_bl": dx_bl,
                   "PTGENDER": "Male" if rng.random() < 0.55 else "Female",
                   "PTEDUCAT": int(np.clip(round(rng.normal(16.0, 2.8)), 6, 20)),
                   "subject_seed": int(rng.integers(1, 2 ** 31 - 1)), "onset_age": onset,
                   "synthetic_version": _check_version(version)}
        reserve = rng.normal()
        for viscode in visits:
            months = _months(viscode)
            years = round(months / 12 + (float(np.clip(rng.normal(0, 0.03), -0.08, 0.08)) if months else 0.0), 3)
            image_uid += int(rng.integers(1, 4000))
            row = dict(subject, VISCODE=viscode, Years_bl=years, IMAGEUID=image_uid,
                       noise_seed=int(rng.integers(1, 2 ** 31 - 1)))
            tau = tau_of(row)
            row["DX"] = stage(tau)
            d = _severity(tau)
            hip_loss = -log_change("hippocampus", age + years, tau)
            educ = row["PTEDUCAT"] - 16
            mmse = 30.3 - 3.0 * d - 0.6 * d * d - 2.5 * hip_loss + 0.12 * educ + 0.8 * reserve + rng.normal(0, 0.9)
            adas = 8.5 + 7.0 * d + 2.0 * d * d + 6.0 * hip_loss - 0.3 * educ - 2.0 * reserve + rng.normal(0, 3.0)
            faq = -1.0 + 4.0 * d + 1.5 * d * d + 2.0 * hip_loss - 1.0 * reserve + rng.normal(0, 1.5)
            row["MMSE"] = int(np.clip(round(mmse), 0, 30))
            row["ADAS13"] = round(float(np.clip(round(adas * 3) / 3, 0, 85)), 2)
            row["FAQ"] = int(np.clip(round(faq), 0, 30))
            rows.append({k: row[k] for k in COLUMNS})
    return rows


def _check_version(version):
    """The anatomy version as an int, or ValueError."""
    if int(version) not in VERSIONS:
        raise ValueError(f"unknown synthetic cohort version {version!r}; expected one of {VERSIONS}")
    return int(version)


def row_version(row):
    """The anatomy version a cohort row was rendered with (rows and stores from before versions: 1)."""
    v = row.get("synthetic_version", 1)
    return 1 if v is None or v == "" or (isinstance(v, float) and math.isnan(v)) else _check_version(float(v))


def volume_name(row):
    """ADNI-style file name; the series number is derived from IMAGEUID (S = IMAGEUID - 1)."""
    uid = int(float(row["IMAGEUID"]))
    return f"ADNI_{row['PTID']}_MR_MPRAGE_br_raw_S{uid - 1}_I{uid}.nii.gz"


# ---------------------------------------------------------------- implicit shapes (template mm)

def _smin(a, b, k):
    """Smooth minimum (union of two distance-like fields, blended over ~k mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _ellipsoid(p, centre, axes):
    """Radial distance (mm, negative inside) to an ellipsoid; axes may be arrays over points."""
    d = [p[i] - centre[i] for i in range(3)]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2 + 1e-6)
    rho = np.sqrt((d[0] / axes[0]) ** 2 + (d[1] / axes[1]) ** 2 + (d[2] / axes[2]) ** 2 + 1e-8)
    return r - r / rho


def _tube(p, nodes, metric=(1.0, 1.0, 1.0)):
    """Normalised distance (distance / local radius) to a polyline with linearly varying radius."""
    nodes = np.asarray(nodes, np.float32)
    best = np.full(p[0].shape, np.inf, np.float32)
    for a, b in zip(nodes[:-1], nodes[1:]):
        ab = b[:3] - a[:3]
        t = np.clip(sum((p[i] - a[i]) * ab[i] for i in range(3)) / float(ab @ ab), 0.0, 1.0)
        d2 = sum(((p[i] - a[i] - t * ab[i]) * metric[i]) ** 2 for i in range(3))
        np.minimum(best, np.sqrt(d2) / (a[3] + t * (b[3] - a[3])), out=best)
    return best


def _bilateral(p, tubes, sizes):
    """Normalised distance to mirrored pairs of tubes ((nodes, metric), ...), right side scaled by
    sizes[0] and left by sizes[1]."""
    out = np.full(p[0].shape, np.inf, np.float32)
    for sign, size in zip((1, -1), sizes):
        for nodes, metric in tubes:
            mirrored = np.asarray(nodes, np.float32) * np.array([sign, 1, 1, 1], np.float32)
            np.minimum(out, _tube(p, mirrored, metric) / size, out=out)
    return out


def _cerebrum(p, heights=(64.0, 40.0)):
    """Cerebral hull without sulci: egg-shaped ellipsoid (half heights above and below its centre; flatter
    below) joined with two temporal lobes."""
    x, y, z = p
    yn = np.clip(-(y - _BRAIN_CENTRE[1]) / 85.0, -1, 1)
    axes = (68.0 * (1 + 0.05 * yn), 85.0, np.where(z > _BRAIN_CENTRE[2], *heights))
    main = _ellipsoid(p, _BRAIN_CENTRE, axes)
    temporal = np.minimum(_ellipsoid(p, (42, -12, -18), (24, 44, 22)), _ellipsoid(p, (-42, -12, -18), (24, 44, 22)))
    return _smin(main, temporal, 4.0)


def _cerebellum(p, shape=((0, -58, -38), (46, 30, 19))):
    """Radial distance to the cerebellar hull (no folia): an ellipsoid (centre, half axes)."""
    return _ellipsoid(p, *shape)


def _brainstem(p):
    """Approximate distance (mm) to the brainstem tube."""
    return (_tube(p, _BRAINSTEM) - 1.0) * 10.0


def _deep_gm(p):
    """Signed field of the thalami, caudate heads and putamina (negative inside)."""
    return np.minimum.reduce([_ellipsoid(p, (sx * c[0], c[1], c[2]), axes) for c, axes in _DEEP_GM for sx in (1, -1)])


def _waves(rng, n, wavelength):
    """Random plane waves (unit-variance sum) as (directions * wavenumber, phases)."""
    v = rng.normal(size=(n, 3))
    k = v / np.linalg.norm(v, axis=1, keepdims=True) * (2 * np.pi / wavelength) * rng.uniform(0.85, 1.15, (n, 1))
    return k.astype(np.float32), rng.uniform(0, 2 * np.pi, n).astype(np.float32)


def _wave_field(s, waves):
    """Sum of the plane waves at points s, unit variance."""
    k, phase = waves
    out = np.zeros(s[0].shape, np.float32)
    for (kx, ky, kz), ph in zip(k, phase):
        out += np.cos(kx * s[0] + ky * s[1] + kz * s[2] + ph)
    return out * np.float32(np.sqrt(2.0 / len(phase)))


def _spline_field(coeffs, spacing):
    """Cubic B-spline field (control points `spacing` voxels apart, unit variance for unit coefficients)
    on the coarse grid (every second voxel of SHAPE plus one past the end; see _upsample)."""
    basis = []
    for n in SHAPE:
        t = np.arange(0, n + 1, 2)[:, None] / spacing - (np.arange(int(np.ceil(n / spacing)) + 3) - 1)
        u = np.abs(t)
        w = np.where(u < 1, 2 / 3 - u ** 2 + u ** 3 / 2, np.where(u < 2, (2 - u) ** 3 / 6, 0.0))
        basis.append((w / math.sqrt(151 / 315)).astype(np.float32))  # 151/315 = integral of B3^2
    bx, by, bz = basis  # separable contraction; plain einsum (no BLAS threads in the worker processes)
    return np.einsum("ia,ajk->ijk", bx, np.einsum("jb,abk->ajk", by, np.einsum("kc,abc->abk", bz, coeffs)))


def _spline_coeffs(rng, spacing):
    """Random control-point values for _spline_field."""
    return rng.standard_normal([int(np.ceil(n / spacing)) + 3 for n in SHAPE]).astype(np.float32)


def _upsample(c):
    """Linear interpolation from every second voxel (one sample past the end) to SHAPE."""
    for axis in range(3):
        c = np.moveaxis(c, axis, 0)
        out = np.empty((2 * c.shape[0] - 1,) + c.shape[1:], np.float32)
        out[0::2] = c
        out[1::2] = 0.5 * (c[:-1] + c[1:])
        c = np.moveaxis(out, 0, axis)
    return c[:SHAPE[0], :SHAPE[1], :SHAPE[2]]


def _symmetric(warp, asymmetry=0.3):
    """A coarse-grid displacement field (x, y, z components) made nearly mirror-symmetric about the grid's
    midline x = 0 (x component odd, y and z even), keeping `asymmetry` of its antisymmetric part."""
    def mirror(c):  # c at coarse voxel 2j is read at the mirror voxel SHAPE[0] - 1 - 2j (between samples)
        f = np.flip(c, 0)
        return np.concatenate([0.5 * (f[1:] + f[:-1]), f[-1:]], 0)
    out = []
    for axis, c in enumerate(warp):
        m = -mirror(c) if axis == 0 else mirror(c)
        out.append((0.5 * (1 + asymmetry) * c + 0.5 * (1 - asymmetry) * m).astype(np.float32))
    return out


def _rotation(ax, ay, az):
    """3x3 rotation by angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# ---------------------------------------------------------------- subject anatomy

class _Anatomy:
    """A subject's template: level-set fields on the voxels inside its inner-skull hull (computed once).

    Smooth fields are evaluated on every second voxel and interpolated; sulci and thin structures are
    evaluated at full resolution only where needed.
    """

    version = 1
    intensity = INTENSITY
    bias = 0.04  # amplitude (sd of the log) of the multiplicative bias field
    angle_sd = (0.06, 0.04, 0.04)  # pose: pitch (about x), roll (y), yaw (z), radians
    shift_sd = (1.5, 2.0, 2.0)  # pose: world shift of the brain, mm
    mirror_warp = False  # hemispheres deformed independently
    hull_margin = (2.0, 3.5)  # range of the subarachnoid CSF width outside the smooth brain hull, mm
    ribbon = (2.6, 3.0)  # range of the cortical ribbon thickness at age 50, mm
    folia = (0.5, 8.0)  # half-width of the CSF between cerebellar folia, depth of the folia (mm)
    cerebellum = ((0, -58, -38), (46, 30, 19))  # centre and half axes (template mm)
    heights = (64.0, 40.0)  # of the cerebral ellipsoid above and below its centre (template mm)
    fissure = 1.0  # half-width of the interhemispheric fissure (mm)

    def __init__(self, subject_seed):
        rng = np.random.default_rng([int(subject_seed), 7])
        lin, shift, warp = self._pose(rng)

        def template(x, w):
            """Template coordinates of world points x (mm, broadcastable per axis) displaced by w."""
            return [lin[i, 0] * x[0] + lin[i, 1] * x[1] + lin[i, 2] * x[2] + _BRAIN_CENTRE[i] - w[i]
                    for i in range(3)]

        g = [(np.arange(0, n + 1, 2, dtype=np.float32) - (n - 1) / 2) * VOXEL_MM - s for n, s in zip(SHAPE, shift)]
        coarse = template([g[0][:, None, None], g[1][None, :, None], g[2][None, None, :]], warp)
        cerebrum, cerebellum = _cerebrum(coarse, self.heights), _cerebellum(coarse, self.cerebellum)
        brainstem = _brainstem(coarse)
        hull = _smin(_smin(cerebrum, cerebellum, 6.0), brainstem, 6.0)
        self.index = np.flatnonzero(_upsample(hull) < rng.uniform(*self.hull_margin))
        self.n = self.index.size
        x = [((i - (n - 1) / 2) * VOXEL_MM - s).astype(np.float32)
             for i, n, s in zip(np.unravel_index(self.index, SHAPE), SHAPE, shift)]
        p = template(x, [self._fine(w) for w in warp])
        smooth = {name: self._fine(f) for name, f in (("cerebrum", cerebrum), ("cerebellum", cerebellum),
                                                      ("brainstem", brainstem), ("deep_gm", _deep_gm(coarse)))}
        self.pial, self.no_ribbon = self._pial_field(rng, p, smooth)
        self.thickness = rng.uniform(*self.ribbon)
        self._deep_structures(rng, p, coarse, smooth["deep_gm"] < 0)

    def _pose(self, rng):
        """(world -> template linear map, world shift, ~3 mm smooth warp on the coarse grid) of a subject."""
        scale = np.exp(rng.normal(-0.05, 0.04) + rng.normal(0, 0.025, 3)).clip(0.86, 1.03)
        angles = rng.normal(0, self.angle_sd)
        lin = (_rotation(*angles) / scale[:, None]).astype(np.float32)  # world -> template (no warp)
        shift = _WORLD_CENTRE + rng.normal(0, self.shift_sd).astype(np.float32)
        warp = [np.float32(3.0) * _spline_field(_spline_coeffs(rng, 14.0), 14.0) for _ in range(3)]  # ~3 mm
        return lin, shift, _symmetric(warp) if self.mirror_warp else warp

    def _fine(self, coarse_field):
        """A field on every second voxel, interpolated at the hull voxels."""
        return np.ascontiguousarray(_upsample(coarse_field)).ravel()[self.index]

    def _pial_field(self, rng, p, smooth):
        """Signed distance (mm, negative inside tissue) to the nearest CSF: the outer surface or a sulcal
        slit (`_sulci`), a fissure or between cerebellar folia; plus the flag of brainstem voxels (no cortical
        ribbon)."""
        x, y, z = p
        depth_in = -smooth["cerebrum"]
        sulci = self._sulci(rng, p, depth_in)

        dy, dz = y + 4.0, z - 6.0  # the interhemispheric fissure stops at the corpus callosum
        r = np.sqrt(dy ** 2 + dz ** 2) + 1e-6
        callosum = r - r / (np.sqrt((dy / 38) ** 2 + (dz / 22) ** 2) + 1e-6)
        fissure = np.maximum(np.abs(x) - self.fissure, -callosum)
        sylvian_z = 4.0 - 0.28 * (y + 10.0) + rng.normal(0, 2.0)
        lateral = np.maximum(y - 22.0, -45.0 - y)
        sylvian = np.minimum(np.maximum.reduce([np.abs(z - sylvian_z) / 1.04 - 0.8, 38.0 - np.abs(x), lateral]),
                             np.maximum.reduce([np.abs(np.abs(x) - 38.0) - 0.8, np.abs(z - sylvian_z) - 12.0,
                                                lateral + 6.0]))  # + the cleft over the insula
        cerebrum = -np.minimum.reduce([depth_in, sulci, fissure, sylvian])

        cb_depth = -smooth["cerebellum"]
        u = (np.sqrt(x ** 2 + (y + 30) ** 2 + (z + 15) ** 2) + rng.uniform(0, 6.5)) % 6.5
        folia = np.maximum(np.minimum(u, 6.5 - u) - self.folia[0], cb_depth - self.folia[1])
        cerebellum = -np.minimum(cb_depth, folia)
        pial = np.minimum.reduce([cerebrum, cerebellum, smooth["brainstem"]])
        return pial.astype(np.float32), smooth["brainstem"] <= pial

    def _sulci(self, rng, p, depth_in):
        """Distance-like field (mm, negative inside) of the sulcal slabs. Each sulcus is a slab of half-width
        0.5 mm around the zero sheet of a random field, down to a random depth, so tissue lines its walls."""
        d = [p[i] - _BRAIN_CENTRE[i] for i in range(3)]
        rho = np.sqrt((d[0] / 68) ** 2 + (d[1] / 85) ** 2 + (d[2] / 52) ** 2) + 1e-6
        shell = np.flatnonzero(depth_in < 40.0)
        # mostly radial projection onto the ellipsoid, so sulci are sheets roughly normal to the surface
        ss = [(0.7 * c / rho + 0.3 * c)[shell] for c in d]
        field = _wave_field(ss, _waves(rng, 32, rng.uniform(16.0, 19.0)))
        grad = np.sqrt(sum(g ** 2 for g in self._gradient(np.zeros(self.n, np.float32), shell, field)))
        to_sheet = np.full(self.n, np.inf, np.float32)
        to_sheet[shell] = np.abs(field) / (grad + 1e-6)
        to_sheet[depth_in > 36.0] = np.inf  # the field's gradient is wrong at the shell's edge
        sulcus_depth = np.zeros(self.n, np.float32)
        sulcus_depth[shell] = 14.0 * (1.0 + 0.25 * _wave_field(ss, _waves(rng, 8, 80.0))).clip(0.5, 1.6)
        basal = -_ellipsoid(p, (0, -12, 6), (34, 48, 26))  # no sulci into the basal ganglia and ventricles
        return np.maximum.reduce([to_sheet - 0.5, depth_in - sulcus_depth, basal])

    def _gradient(self, values, shell, shell_values=None):
        """Gradient (3 arrays over the shell voxels, per mm of world space) of a field on the hull voxels,
        its shell part replaced by shell_values if given."""
        grid = np.zeros(SHAPE, np.float32)
        grid.flat[self.index] = values
        if shell_values is not None:
            grid.flat[self.index[shell]] = shell_values
        return [g.ravel()[self.index[shell]] for g in np.gradient(grid, VOXEL_MM)]

    def _deep_structures(self, rng, p, coarse, deep):
        """Ventricles, hippocampi, third ventricle, deep GM, WM-lesion field and the protected core."""
        x = p[0]
        ventricle = ((_VENTRICLE, (1.0, 1.0, 1.4)), (_OCCIPITAL_HORN, (1.0, 1.0, 1.3)))
        v_size = np.exp(rng.normal(0, 0.15)).clip(0.75, 1.35) * np.exp(rng.normal(0, 0.06, 2))
        h_size = np.exp(rng.normal(0, 0.05)).clip(0.9, 1.1) * np.exp(rng.normal(0, 0.04, 2))
        # coarse pass (inside a box that holds every envelope) to find the voxels worth a fine evaluation
        box = np.flatnonzero((np.abs(coarse[0]) < 58) & (np.abs(coarse[1] + 16) < 68) & (np.abs(coarse[2]) < 45))
        in_box = [c.ravel()[box] for c in coarse]
        fields = []
        for tubes, size, reach in ((ventricle, v_size, 3.6), (((_HIPPOCAMPUS, (1.0, 1.0, 1.3)),), h_size, 2.1)):
            rough = np.full(coarse[0].shape, np.inf, np.float32)
            rough.flat[box] = _bilateral(in_box, tubes, size)
            near = np.flatnonzero(self._fine(rough) < reach)
            f = np.full(self.n, np.inf, np.float32)
            f[near] = _bilateral([c[near] for c in p], tubes, size)
            fields.append(f)
        vent, hip = fields

        self.hip_env = hip < 1.0
        self.hip_order = np.flatnonzero(self.hip_env)[np.argsort(hip[self.hip_env], kind="stable")]
        self.hip0 = self.hip_order.size

        (yc, zc), (ya, za) = _THIRD_VENTRICLE
        q = 1.0 - ((p[1] - yc) / ya) ** 2 - ((p[2] - zc) / za) ** 2
        self.t3_width = 1.3
        t3 = np.where(q > 0, np.abs(x) / np.sqrt(np.maximum(q, 1e-6)), np.inf).astype(np.float32)
        self.t3_env = (t3 < self.t3_width * 2.5) & ~self.hip_env
        self.t3 = np.where(self.t3_env, t3, np.inf).astype(np.float32)

        vent_ok = (vent < 2.5) & ~self.hip_env & ~self.t3_env & (np.abs(x) > 0.7)  # room to grow ~6x
        self.vent_order = np.flatnonzero(vent_ok)[np.argsort(vent[vent_ok], kind="stable")]
        self.vent0 = int(np.count_nonzero(vent[vent_ok] < 1.0))

        self.deep = deep
        self.core = self.hip_env | self.t3_env | vent_ok | deep
        # Tissue deeper than 12 mm below the pial surface is never reached by atrophy: like the core, it
        # always stays brain; only the shallower voxels are ordered for the surface to move through.
        shallow = np.flatnonzero(~self.core & (self.pial > -12.0))
        self.pial_order = shallow[np.argsort(self.pial[shallow], kind="stable")]
        self.always = self.n - self.pial_order.size  # core + deep tissue + nothing else
        self.brain0 = (self.always + int(np.count_nonzero(self.pial[shallow] < 0)) - self.vent0
                       - int(np.count_nonzero(self.t3 < self.t3_width)))
        lesion = self._fine(_spline_field(_spline_coeffs(rng, 6.0), 6.0))
        self.lesion = (lesion + rng.normal(0, 0.3) - 1.5 * (vent - 1.0)).astype(np.float32)

    def labels(self, age, tau):
        """Label codes (see LABELS) on the hull voxels at (age, tau)."""
        age = max(float(age), REF_AGE)
        n_v = min(round(self.vent0 * math.exp(log_change("ventricles", age, tau))), self.vent_order.size)
        n_h = min(round(self.hip0 * math.exp(log_change("hippocampus", age, tau))), self.hip0)
        t3 = self.t3 < self.t3_width * min(math.sqrt(n_v / self.vent0), 2.5)
        brain_always = self.always - n_v - int(np.count_nonzero(t3)) - (self.hip0 - n_h)
        n_p = round(self.brain0 * math.exp(log_change("brain", age, tau))) - brain_always
        n_p = int(np.clip(n_p, 1, self.pial_order.size))

        lab = np.full(self.n, 3, np.int8)  # WM unless claimed below
        lab[self.pial_order[n_p:]] = 1  # CSF beyond the pial surface
        cortex = self.pial_order[:n_p]
        thickness = self.thickness * math.exp(log_change("brain", age, tau))
        ribbon = (self.pial[cortex] > self.pial[cortex[-1]] - thickness) & ~self.no_ribbon[cortex]
        lab[cortex[ribbon]] = 2
        lab[self.deep] = 4
        lab[(lab == 3) & (self.lesion > 3.0 - 0.055 * (age - REF_AGE))] = 8
        lab[self.hip_env] = 1  # the part of the hippocampus lost to atrophy becomes CSF
        lab[self.hip_order[:n_h]] = 5
        lab[self.vent_order[:n_v]] = 6
        lab[t3] = 7
        return lab


class _AnatomyV2(_Anatomy):
    """Version 2 of the anatomy (see the module docstring): folded cortex, T1 contrast and pose."""
    version = 2
    intensity = INTENSITY_V2
    bias = 0.015
    angle_sd = (0.03, 0.012, 0.012)
    shift_sd = (0.0, 2.0, 2.0)  # the warp's mirror plane stays the grid's midline
    mirror_warp = True
    hull_margin = (0.0, 0.5)
    ribbon = (3.2, 3.6)
    folia = (0.2, 14.0)
    cerebellum = ((0, -62, -36), (50, 33, 27))
    heights = (60.0, 46.0)
    fissure = 0.5

    def labels(self, age, tau):
        """Version 1's labels with the brainstem's white matter as its own label (a darker T1 level)."""
        lab = super().labels(age, tau)
        lab[(lab == 3) & self.no_ribbon] = 9
        return lab

    def _sulci(self, rng, p, depth_in):
        """Sulcal slabs (half-width SULCAL_HALF_WIDTH) around the zero sheets of an isotropic band-limited
        field in template space (SULCAL_WAVELENGTH; sheets meander and branch), kept where they stand roughly
        normal to the brain surface (|cos| of the two normals < SULCAL_MAX_COS, fading over SULCAL_GATE_MM),
        down to a random depth around SULCAL_DEPTH below the smooth hull (deeper at the base, shallower at the
        vertex)."""
        shell = np.flatnonzero(depth_in < 40.0)
        q = [c[shell] for c in p]
        field = _wave_field(q, _waves(rng, 48, SULCAL_WAVELENGTH * rng.uniform(0.93, 1.07)))
        grads = [self._gradient(depth_in, shell), self._gradient(np.zeros(self.n, np.float32), shell, field)]
        norms = [np.sqrt(sum(g ** 2 for g in v)) + 1e-6 for v in grads]
        cos = np.abs(sum(a * b for a, b in zip(*grads))) / (norms[0] * norms[1])
        depth = SULCAL_DEPTH * (1.0 + 0.25 * _wave_field(q, _waves(rng, 8, 80.0))).clip(0.5, 1.5)
        depth *= 1.0 - 0.3 * np.clip((q[2] - _BRAIN_CENTRE[2]) / 60.0, -1.0, 1.0)
        sheet = np.maximum.reduce([np.abs(field) / norms[1] - SULCAL_HALF_WIDTH,
                                   SULCAL_GATE_MM * (cos - SULCAL_MAX_COS), depth_in[shell] - depth])
        sheet[depth_in[shell] > 36.0] = np.inf  # the field's gradient is wrong at the shell's edge
        out = np.full(self.n, np.inf, np.float32)
        out[shell] = sheet
        basal = -_ellipsoid(p, (0, -12, 6), (34, 48, 26))  # no sulci into the basal ganglia and ventricles
        return np.maximum(out, basal)


@functools.lru_cache(maxsize=2)
def _anatomy(subject_seed, version=DEFAULT_VERSION):
    """The subject's template, cached (a worker renders all visits of a subject in a row)."""
    return {1: _Anatomy, 2: _AnatomyV2}[_check_version(version)](subject_seed)


# ---------------------------------------------------------------- rendering

def render_labels(subject_seed, age, tau, version=DEFAULT_VERSION):
    """Noise-free label volume (int8 codes indexed by LABELS) of a subject at (age, tau)."""
    anat = _anatomy(int(subject_seed), version)
    out = np.zeros(SHAPE, np.int8)
    out.flat[anat.index] = anat.labels(age, tau)
    return out


def render(subject_seed, age, tau, noise_seed, version=DEFAULT_VERSION):
    """T1-like float32 volume of SHAPE and masks {'brain', 'ventricles', 'hippocampus'} (bool) of the anatomy
    `version`."""
    anat = _anatomy(int(subject_seed), version)
    lab = anat.labels(age, tau)
    clean = np.zeros(SHAPE, np.float32)
    clean.flat[anat.index] = anat.intensity[lab]
    blurred = ndimage.gaussian_filter(clean, BLUR_VOXELS, truncate=3.0).ravel()[anat.index]
    rng = np.random.default_rng([int(noise_seed), 11])
    bias = np.exp(anat.bias * anat._fine(_spline_field(_spline_coeffs(rng, 40.0), 40.0)))
    signal = blurred * bias
    noise = rng.standard_normal((2, anat.n), dtype=np.float32) * np.float32(NOISE_SIGMA)
    vol = np.zeros(SHAPE, np.float32)
    vol.flat[anat.index] = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)
    masks = {}
    for name, codes in (("brain", BRAIN_LABELS), ("ventricles", (6,)), ("hippocampus", (5,))):
        m = np.zeros(SHAPE, bool)
        m.flat[anat.index] = np.isin(np.arange(len(LABELS)), codes)[lab]
        masks[name] = m
    return vol, masks


def quantise(volume):
    """The int16 * STORAGE_SLOPE round trip of the NIfTI writer, as float32."""
    return _to_int16(volume).astype(np.float32) * np.float32(STORAGE_SLOPE)


def _to_int16(volume):
    """Stored integers of a volume (value / STORAGE_SLOPE, rounded, clipped to int16)."""
    return np.clip(np.round(np.asarray(volume, np.float32) / np.float32(STORAGE_SLOPE)), 0, 32767).astype(np.int16)


def render_row(row, age=None, dx=None):
    """Render a cohort row at its visit, or at a target age and/or diagnosis via disease_clock; the volume
    is quantised exactly like the stored file."""
    visit_age = float(row["AGE"]) + float(row["Years_bl"])
    tau = tau_of(row)
    if age is not None or dx is not None:
        target_age = visit_age if age is None else float(age)
        tau = disease_clock(tau, visit_age, target_age, row["DX"] if dx is None else dx)
        visit_age = target_age
    vol, masks = render(int(float(row["subject_seed"])), visit_age, tau, int(float(row["noise_seed"])),
                        row_version(row))
    return quantise(vol), masks


# ---------------------------------------------------------------- writing

def _write_volume(row, path):
    """Render a row and write it as int16 NIfTI, atomically (temporary name, then rename)."""
    vol, _ = render_row(row)
    img = nib.Nifti1Image(_to_int16(vol), affine())
    img.header.set_slope_inter(STORAGE_SLOPE, 0.0)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine(), code=1)
    img.set_sform(affine(), code=1)
    descrip = _descrip(row_version(row))
    if descrip:  # empty for version 1, whose files stay byte for byte as they were
        img.header["descrip"] = descrip
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        img.to_filename(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _descrip(version):
    """The NIfTI description field of a version's volumes (empty for version 1)."""
    return b"" if version == 1 else f"synthetic cohort v{version}".encode()


def _check_existing(path, version):
    """Raise ValueError when an existing volume was written by another anatomy version (same file names)."""
    found = bytes(nib.load(path).header["descrip"]).rstrip(b"\0 ")
    if found != _descrip(version):
        raise ValueError(f"{path} was written by another synthetic cohort version ({found.decode() or 'v1'}), not "
                         f"v{version}: write version {version} to another folder (--volumes-dir)")


def _write_subject(rows, out_dir):
    """Write one subject's missing volumes (one task, so its anatomy is built once); returns the count."""
    for row in rows:
        _write_volume(row, os.path.join(out_dir, volume_name(row)))
    return len(rows)


def write_cohort(n_subjects, out_dir, seed=0, workers=2, visits=VISITS, version=DEFAULT_VERSION):
    """Write every volume of make_cohort(...) as int16 NIfTI (skipping existing files of the same anatomy
    version; ValueError for another version's) and then cohort.csv; returns the CSV path. The CSV is written
    last, so its presence means the cohort is complete."""
    rows = make_cohort(n_subjects, seed, visits, version)
    os.makedirs(out_dir, exist_ok=True)
    tasks = {}
    for row in rows:
        path = os.path.join(out_dir, volume_name(row))
        if os.path.exists(path):
            _check_existing(path, version)
        else:
            tasks.setdefault(row["PTID"], []).append(row)
    tasks = list(tasks.values())
    with tqdm(total=sum(map(len, tasks)), desc="synthetic volumes", unit="vol") as bar:
        if workers <= 1:
            for task in tasks:
                bar.update(_write_subject(task, out_dir))
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for n in pool.imap_unordered(functools.partial(_write_subject, out_dir=out_dir), tasks):
                    bar.update(n)
    path = os.path.join(out_dir, "cohort.csv")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return path


# ---------------------------------------------------------------- figure

def figure_aging(path, subject_seed=7, ages=(60, 65, 70, 75, 80, 85, 90), onset_age=60.0, version=DEFAULT_VERSION):
    """PNG grid of one subject's axial slice through the ventricles at each age (same scan noise): row 1
    cognitively normal throughout (tau = -inf); row 2 with the disease clock running from MCI onset at
    `onset_age` (MCI at 60, Dementia from onset_age + T_MCI = 64; a long course, to make it visible)."""
    anat = _anatomy(int(subject_seed), version)
    k = _axial_level(anat)
    rows = []
    for tau_at_age in (lambda a: -math.inf, lambda a: a - onset_age):
        cells = []
        for a in ages:
            vol, _ = render(subject_seed, a, tau_at_age(a), noise_seed=1, version=version)
            cell = to_uint8(np.rot90(vol[:, :, k]), 0.0, 1.15)  # anterior up
            cells.append(np.kron(cell, np.ones((2, 2), np.uint8)))  # 2x zoom
        rows.append(cells)
    write_png(path, tile(rows))
    return path


def _axial_level(anat):
    """Axial slice index with the most ventricle and hippocampus at age 50."""
    lab = np.zeros(SHAPE, np.int8)
    lab.flat[anat.index] = anat.labels(REF_AGE, -math.inf)
    return int(np.argmax(((lab == 6) | (lab == 5)).sum(axis=(0, 1))))


# ---------------------------------------------------------------- ground truth of stored slices

TRUTH_COLUMNS = ("AGE", "Years_bl", "subject_seed", "onset_age", "noise_seed")
STRUCTURES = ("brain", "ventricles", "hippocampus")


def counterfactual(store, indices, age=None, dx=None, masks=False):
    """The exact counterfactual of stored slices: each slice's subject re-rendered at the target age and/or
    diagnosis (same anatomy, same noise seed; disease clock by `disease_clock`), quantised as the stored
    files are, and cut with the slice's own preprocessing plan (same geometry; intensity scale recomputed
    from the new volume, as data_prep would). `age` (years) and `dx` (class indices of the store's `dx`
    attribute) are (N,) arrays or None (keep the slice's own).

    Returns {"images": (N, S, S) float32 in [-1, 1], "brain"/"ventricles"/"hippocampus": (N,) true areas in
    mm^2 from the structure masks} and, with masks=True, "masks": {structure: (N, S, S) float32 fractions}.
    The arrays are read-only: the store keeps the last result, because evaluate.py asks for the same
    counterfactual several times in a row (ground truth, then the `truth` method; repeated unchanged calls)."""
    idx = np.asarray(indices)
    key = tuple(None if a is None else np.asarray(a, np.float64).tobytes() for a in (idx, age, dx))
    last = getattr(store, "_last_counterfactual", None)
    if last is None or last[0] != key or (masks and "masks" not in last[1]):
        out = _render_counterfactual(store, idx, age, dx, masks)
        for a in [out["images"], *(out[s] for s in STRUCTURES), *out.get("masks", {}).values()]:
            a.setflags(write=False)
        store._last_counterfactual = last = (key, out)
    return {k: v for k, v in last[1].items() if masks or k != "masks"}


def _render_counterfactual(store, idx, age, dx, masks):
    from mri.preprocess import apply_plan, intensity_scale, normalise
    missing = [c for c in TRUTH_COLUMNS if f"csv/{c}" not in store.file]
    if missing:
        raise ValueError(f"{store.path} has no ground truth (csv/{missing[0]} missing): only stores built with "
                         "`data_prep.py --synthetic N` can be re-rendered")
    n, size = len(idx), store.size
    if not hasattr(store, "_truth_columns"):
        store._truth_columns = {c: store.csv(c) for c in TRUTH_COLUMNS}
        versioned = "csv/synthetic_version" in store.file  # stores from before versions hold version 1
        store._truth_columns["synthetic_version"] = (store.csv("synthetic_version") if versioned
                                                     else np.ones(len(store)))
    col = store._truth_columns
    classes = store.schema["dx"].classes if "dx" in store.schema.names else list(DX)
    own_dx = store.attrs["dx"][idx].astype(int) if "dx" in store.attrs else None
    if dx is not None and own_dx is None:
        raise ValueError(f"{store.path} stores no 'dx' attribute to change")
    target_dx = own_dx if dx is None else np.asarray(dx).astype(int).reshape(n)
    visit_age = col["AGE"][idx] + col["Years_bl"][idx]
    target_age = visit_age if age is None else np.asarray(age, np.float64).reshape(n)
    # the store's float32 age of a slice is its own visit age: re-render at the exact one, as the file was
    target_age = np.where(np.abs(target_age - visit_age) < 1e-4, visit_age, target_age)
    out = {"images": np.zeros((n, size, size), np.float32), **{s: np.zeros(n) for s in STRUCTURES}}
    if masks:
        out["masks"] = {s: np.zeros((n, size, size), np.float32) for s in STRUCTURES}
    groups = {}
    for i, j in enumerate(idx):
        key = (int(store.volume[j]), round(float(target_age[i]), 6),
               None if target_dx is None else int(target_dx[i]))
        groups.setdefault(key, []).append(i)
    for (volume, t_age, t_dx), rows in sorted(groups.items(), key=lambda kv: (col["subject_seed"][idx[kv[1][0]]], kv[0])):
        j = idx[rows[0]]
        row = {c: col[c][j] for c in (*TRUTH_COLUMNS, "synthetic_version")}
        row["DX"] = classes[own_dx[rows[0]]] if own_dx is not None else "CN"
        vol, m = render_row(row, age=t_age, dx=None if t_dx is None else classes[t_dx])
        plan = dict(store.plan(volume))
        plan["z_mm"] = [plan["z_mm"][store.slice[idx[r]]] for r in rows]
        plan["scale"] = intensity_scale(vol)
        out["images"][rows] = normalise(apply_plan(vol, plan, size), plan)
        pixel_mm2 = (plan["side_mm"] / size) ** 2
        for s in STRUCTURES:
            frac = apply_plan(m[s].astype(np.float32), plan, size)
            out[s][rows] = frac.sum(axis=(1, 2)) * pixel_mm2
            if masks:
                out["masks"][s][rows] = frac
    return out
