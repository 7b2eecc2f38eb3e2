"""Shared fixtures: tiny NIfTI cohorts written to a temporary folder, a tiny slice store built from one, a tiny
oracle run on it (each built once per test run and only read by the tests), and readers of a training run's
checkpoint and log."""
import csv
import os
import subprocess
import sys

import numpy as np
import nibabel as nib
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def brain(shape=(40, 48, 36), seed=0):
    """An asymmetric ellipsoid 'brain' (bright blob on the right-anterior side, so flips are visible)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2
    vol = np.where(r < 1, 600.0, 0.0) + np.where(r < 0.5, 300.0, 0.0)
    vol += np.where((x - 0.4) ** 2 + (y - 0.3) ** 2 + z ** 2 < 0.05, 200.0, 0.0)
    vol += np.where(r < 1, rng.normal(0, 5, shape), 0.0)
    return vol.astype(np.float32)


RAS_AFFINE = np.array([[1.5, 0, 0, -30], [0, 1.5, 0, -36], [0, 0, 1.5, -27], [0, 0, 0, 1]])


def as_lps(data, affine):
    """Same world image stored with x and y flipped."""
    flip = np.diag([-1, -1, 1, 1]).astype(float)
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    return data[::-1, ::-1, :].copy(), affine @ flip


def as_permuted(data, affine, order=(2, 0, 1)):
    """Same world image with the voxel axes permuted."""
    perm = np.eye(4)
    perm[:3, :3] = np.eye(3)[:, order]
    return np.transpose(data, order).copy(), affine @ perm


def write_adni_cohort(folder, n_subjects=6, visits=("bl", "m12"), extra=True):
    """ADNI-named volumes and an ADNIMERGE-like CSV. Returns (images dir, csv path, bad file names)."""
    img_dir = os.path.join(folder, "images")
    os.makedirs(img_dir, exist_ok=True)
    rows, uid = [], 1000
    dxs = ["CN", "MCI", "Dementia"]
    for s in range(n_subjects):
        ptid = f"002_S_{s:04d}"
        for v, visit in enumerate(visits):
            uid += 1
            data = brain(seed=s * 10 + v)
            affine = RAS_AFFINE
            if s % 3 == 1:
                data, affine = as_lps(data, affine)
            elif s % 3 == 2:
                data, affine = as_permuted(data, affine)
            name = os.path.join(img_dir, ptid, f"ADNI_{ptid}_MR_MPRAGE_br_raw_S{uid}_I{uid}.nii.gz")
            os.makedirs(os.path.dirname(name), exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), name)
            rows.append({"PTID": ptid, "VISCODE": visit, "AGE": 60 + 3 * s, "Years_bl": v, "DX": dxs[s % 3],
                         "DX_bl": ["CN", "LMCI", "AD"][s % 3], "ADAS13": 10 + 5 * (s % 3), "MMSE": 29 - s % 3,
                         "FAQ": s % 3, "PTGENDER": "Male" if s % 2 else "Female", "PTEDUCAT": 16,
                         "IMAGEUID": uid})
    bad = []
    if extra:
        uid += 1  # int16 with a scale slope
        hdr_img = nib.Nifti1Image(np.round(brain(seed=99) / 0.5).astype(np.int16), RAS_AFFINE)
        hdr_img.header.set_slope_inter(0.5, 0)
        p = f"ADNI_002_S_0100_MR_x_I{uid}.nii"
        nib.save(hdr_img, os.path.join(img_dir, p))
        rows.append(dict(rows[0], PTID="002_S_0100", IMAGEUID=uid))
        uid += 1  # 4D with a singleton 4th axis
        nib.save(nib.Nifti1Image(brain(seed=98)[..., None], RAS_AFFINE),
                 os.path.join(img_dir, f"ADNI_002_S_0101_MR_x_I{uid}.nii.gz"))
        rows.append(dict(rows[0], PTID="002_S_0101", IMAGEUID=uid))
        uid += 1  # Analyze pair
        nib.save(nib.AnalyzeImage(brain(seed=97), RAS_AFFINE), os.path.join(img_dir, f"ADNI_002_S_0102_MR_x_I{uid}.img"))
        rows.append(dict(rows[0], PTID="002_S_0102", IMAGEUID=uid))
        uid += 1  # corrupt file
        name = f"ADNI_002_S_0103_MR_x_I{uid}.nii.gz"
        with open(os.path.join(img_dir, name), "wb") as f:
            f.write(b"this is not a nifti file")
        rows.append(dict(rows[0], PTID="002_S_0103", IMAGEUID=uid))
        bad.append(name)
        uid += 1  # NaN volume
        d = brain(seed=96)
        d[5, 5, 5] = np.nan
        name = f"ADNI_002_S_0104_MR_x_I{uid}.nii.gz"
        nib.save(nib.Nifti1Image(d, RAS_AFFINE), os.path.join(img_dir, name))
        rows.append(dict(rows[0], PTID="002_S_0104", IMAGEUID=uid))
        bad.append(name)
        uid += 1  # true 4D volume
        name = f"ADNI_002_S_0105_MR_x_I{uid}.nii.gz"
        nib.save(nib.Nifti1Image(np.stack([brain(seed=95)] * 2, -1), RAS_AFFINE), os.path.join(img_dir, name))
        rows.append(dict(rows[0], PTID="002_S_0105", IMAGEUID=uid))
        bad.append(name)
        rows.append(dict(rows[0], PTID="002_S_0999", IMAGEUID=99999))  # a row with no volume
        nib.save(nib.Nifti1Image(brain(seed=94), RAS_AFFINE), os.path.join(img_dir, "ADNI_002_S_0998_MR_x_I55555.nii.gz"))
    csv_path = os.path.join(folder, "cohort.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return img_dir, csv_path, bad


@pytest.fixture
def adni_cohort(tmp_path):
    return write_adni_cohort(str(tmp_path))


def build_store(folder, attrs=("age", "dx", "sex")):
    """A tiny slice store built in `folder` (9 subjects, 32x32, 4 slices a volume, split 0.6/0.2/0.2): its path."""
    from mri.data import pipeline
    img_dir, csv_path, _ = write_adni_cohort(folder, n_subjects=9, extra=False)
    out = os.path.join(folder, "s.h5")
    pipeline.build(pipeline.PrepConfig(images=img_dir, csv=csv_path, out=out, attrs=tuple(attrs), size=32, slices=4,
                               workers=1, split=(0.6, 0.2, 0.2)), log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def store_path(tmp_path_factory):
    """The tiny age/dx/sex store, built once and only read by the tests."""
    return build_store(str(tmp_path_factory.mktemp("tiny_store")))


ORACLE_ARGS = ["--attrs", "age,dx,sex", "--tiny", "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "8",
               "--seed", "5", "--calibration-batches", "3"]


def train_tiny_oracle(store, out):
    """train_oracle.py with ORACLE_ARGS on `store`, written to `out`."""
    import train_oracle
    train_oracle.main(["--store", store, "--out", out, *ORACLE_ARGS])
    return out


@pytest.fixture(scope="session")
def oracle_run(store_path, tmp_path_factory):
    """A tiny oracle run (age, dx, sex; ORACLE_ARGS) on the tiny store, trained once and only read by the tests
    (test_oracle's runs, VA-GAN's regressor)."""
    return train_tiny_oracle(store_path, str(tmp_path_factory.mktemp("oracle_run")))


HELP_SCRIPTS = ("evaluate.py", "simulate.py", "train_cyclegan.py", "train_dfi.py", "train_oracle.py")
HELP_PROGRAM = """
import runpy, sys
for script in sys.argv[1:]:
    print(f"==== {script}", flush=True)
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
"""


@pytest.fixture(scope="session")
def script_help():
    """{script: what `python script.py --help` prints} for HELP_SCRIPTS, each run from the project folder as
    __main__ (a script that does nothing when run prints nothing), all in one interpreter: TensorFlow, which
    some scripts import before parsing their arguments, is imported once."""
    out = subprocess.run([sys.executable, "-c", HELP_PROGRAM, *HELP_SCRIPTS], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    parts = out.stdout.split("==== ")[1:]
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in parts}


def read_checkpoint(run_dir):
    """A run's checkpoint arrays: {key: array}."""
    from mri import training
    with np.load(os.path.join(run_dir, training.CHECKPOINT)) as z:
        return {k: z[k] for k in z.files}


def read_log(run_dir):
    """A run's log.csv rows, as dicts of strings."""
    with open(os.path.join(run_dir, "log.csv")) as f:
        return list(csv.DictReader(f))
