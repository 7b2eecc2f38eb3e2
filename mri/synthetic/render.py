"""Rendering: label volumes, T1-like intensities with blur, bias and noise, a cohort row at its visit or a
target, the aging figure, and the exact counterfactual of stored slices."""
import math

import numpy as np
from scipy import ndimage

from mri.data.grids import tile, to_uint8, write_png
from mri.synthetic.anatomy import (BLUR_VOXELS, BRAIN_LABELS, DEFAULT_VERSION, LABELS, NOISE_SIGMA, SHAPE,
                                     STORAGE_SLOPE, _anatomy, _check_version, _spline_coeffs, _spline_field)
from mri.synthetic.clock import DX, REF_AGE, disease_clock, tau_of

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



def row_version(row):
    """The anatomy version a cohort row was rendered with (rows and stores from before versions: 1)."""
    v = row.get("synthetic_version", 1)
    return 1 if v is None or v == "" or (isinstance(v, float) and math.isnan(v)) else _check_version(float(v))



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


def counterfactual(store, indices, age=None, dx=None, masks=False, noise_seed=None):
    """The exact counterfactual of stored slices: each slice's subject re-rendered at the target age and/or
    diagnosis (same anatomy, same noise seed; disease clock by `disease_clock`), quantised as the stored
    files are, and cut with the slice's own preprocessing plan (same geometry; intensity scale recomputed
    from the new volume, as data_prep would). `age` (years) and `dx` (class indices of the store's `dx`
    attribute) are (N,) arrays or None (keep the slice's own). `noise_seed` (N,) ints replace the scans'
    own noise seeds (bias field and noise): another scan of the same brain (the follow-up protocol's floor).

    Returns {"images": (N, S, S) float32 in [-1, 1], "brain"/"ventricles"/"hippocampus": (N,) true areas in
    mm^2 from the structure masks} and, with masks=True, "masks": {structure: (N, S, S) float32 fractions}.
    The arrays are read-only: the store keeps the last result, because evaluate.py asks for the same
    counterfactual several times in a row (ground truth, then the `truth` method; repeated unchanged calls)."""
    idx = np.asarray(indices)
    key = tuple(None if a is None else np.asarray(a, np.float64).tobytes() for a in (idx, age, dx, noise_seed))
    last = getattr(store, "_last_counterfactual", None)
    if last is None or last[0] != key or (masks and "masks" not in last[1]):
        out = _render_counterfactual(store, idx, age, dx, masks, noise_seed)
        for a in [out["images"], *(out[s] for s in STRUCTURES), *out.get("masks", {}).values()]:
            a.setflags(write=False)
        store._last_counterfactual = last = (key, out)
    return {k: v for k, v in last[1].items() if masks or k != "masks"}


def _render_counterfactual(store, idx, age, dx, masks, noise_seed=None):
    from mri.data.volumes import apply_plan, intensity_scale, normalise
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
    noise = col["noise_seed"][idx] if noise_seed is None else np.asarray(noise_seed, np.int64).reshape(n)
    out = {"images": np.zeros((n, size, size), np.float32), **{s: np.zeros(n) for s in STRUCTURES}}
    if masks:
        out["masks"] = {s: np.zeros((n, size, size), np.float32) for s in STRUCTURES}
    groups = {}
    for i, j in enumerate(idx):
        key = (int(store.volume[j]), round(float(target_age[i]), 6),
               None if target_dx is None else int(target_dx[i]), int(noise[i]))
        groups.setdefault(key, []).append(i)
    for (volume, t_age, t_dx, seed), rows in sorted(groups.items(), key=lambda kv: (col["subject_seed"][idx[kv[1][0]]], kv[0])):
        j = idx[rows[0]]
        row = dict({c: col[c][j] for c in (*TRUTH_COLUMNS, "synthetic_version")}, noise_seed=seed)
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


def is_synthetic(store):
    """Whether the store was built from the synthetic cohort (it keeps the phantom's subject seeds)."""
    return "csv/subject_seed" in store.file
