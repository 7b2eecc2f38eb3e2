"""Benchmark data_prep.py on 1 mm volumes (182 x 218 x 182, int16, gzip): volumes per second and peak RSS
for 10 and 40 volumes. Memory must not grow with the number of volumes.

    python bench/pipeline.py [--counts 10,40] [--workers 2] [--work /tmp/bench_data_prep]
"""
import argparse
import csv
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import nibabel as nib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (182, 218, 182)


def make_volume(seed):
    """A 1 mm head-sized ellipsoid with tissue classes and noise, as int16 (what scanners write)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[-1:1:SHAPE[0] * 1j, -1:1:SHAPE[1] * 1j, -1:1:SHAPE[2] * 1j]
    r = (x / 0.75) ** 2 + (y / 0.8) ** 2 + (z / 0.7) ** 2
    vol = np.where(r < 1, 400.0, 0.0) + np.where(r < 0.6, 300.0, 0.0) - np.where(r < 0.05, 500.0, 0.0)
    vol = np.maximum(vol + rng.normal(0, 10, SHAPE) * (r < 1), 0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -np.array(SHAPE) / 2
    return nib.Nifti1Image(vol.astype(np.int16), affine)


def make_cohort(folder, n):
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        ptid, uid = f"941_S_{i:04d}", 10000 + i
        path = os.path.join(folder, f"ADNI_{ptid}_MR_MPRAGE_I{uid}.nii.gz")
        if not os.path.exists(path):
            nib.save(make_volume(i), path)
        rows.append({"PTID": ptid, "VISCODE": "bl", "AGE": 60 + i % 30, "Years_bl": 0,
                     "DX": ["CN", "MCI", "Dementia"][i % 3], "IMAGEUID": uid})
    with open(os.path.join(folder, "cohort.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run(folder, n, workers):
    """Time one data_prep run in a fresh process; peak RSS of it and of its largest worker."""
    out = os.path.join(folder, "store.h5")
    if os.path.exists(out):
        os.remove(out)
    code = (
        "import resource, sys, time; sys.path.insert(0, %r)\n"
        "from mri.data.pipeline import PrepConfig, build\n"
        "t = time.perf_counter()\n"
        "build(PrepConfig(images=%r, csv=%r, out=%r, attrs=('age', 'dx'), workers=%d), log=lambda *a: None)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    ) % (ROOT, folder, os.path.join(folder, "cohort.csv"), out, workers)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, main_kb, worker_kb = r.stdout.split()[-3:]
    return float(seconds), int(main_kb) / 1024, int(worker_kb) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="10,40")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default="/tmp/bench_data_prep")
    p.add_argument("--seed", type=int, default=0, help="unused: the volumes are fixed; kept for a uniform CLI")
    a = p.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}, workers={a.workers}")
    print(f"volumes: {SHAPE} int16 gzip NIfTI, 1 mm; store 32 slices of 128x128 per volume")
    for n in [int(c) for c in a.counts.split(",")]:
        folder = os.path.join(a.work, f"n{n}")
        make_cohort(folder, n)
        seconds, main_mb, worker_mb = run(folder, n, a.workers)
        print(f"{n:3d} volumes: {seconds:6.1f} s  {n / seconds:5.2f} volumes/s  "
              f"peak RSS main {main_mb:6.0f} MB, largest worker {worker_mb:6.0f} MB")
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
