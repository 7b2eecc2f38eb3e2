"""The cohort table (ADNI-like rows: visits, diagnoses, seeds) and writing it as NIfTI volumes."""
import csv
import functools
import math
import multiprocessing
import os

import nibabel as nib
import numpy as np
from tqdm import tqdm

from mri.data.io import atomic_path
from mri.synthetic.anatomy import DEFAULT_VERSION, STORAGE_SLOPE, _check_version, affine
from mri.synthetic.clock import REF_AGE, T_MCI, log_change, stage, tau_of
from mri.synthetic.render import _to_int16, render_row, row_version

VISITS = ("bl", "m12", "m24")   # the default visits of a synthetic subject

COLUMNS = ("PTID", "VISCODE", "AGE", "Years_bl", "DX", "DX_bl", "ADAS13", "MMSE", "FAQ", "PTGENDER",
           "PTEDUCAT", "IMAGEUID", "subject_seed", "onset_age", "noise_seed", "synthetic_version")

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



def volume_name(row):
    """ADNI-style file name; the series number is derived from IMAGEUID (S = IMAGEUID - 1)."""
    uid = int(float(row["IMAGEUID"]))
    return f"ADNI_{row['PTID']}_MR_MPRAGE_br_raw_S{uid - 1}_I{uid}.nii.gz"



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


