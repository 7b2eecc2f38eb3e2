"""data_prep.py on small NIfTI cohorts: orientation invariance, bad input, splits, resume."""
import csv
import os
import subprocess
import sys

import numpy as np
import nibabel as nib
import pytest

from conftest import RAS_AFFINE, as_lps, as_permuted, brain, write_adni_cohort
from mri.data import cohorts, pipeline
from mri.data.volumes import BadVolume, load_canonical, process_file
from mri.data.store import SliceStore, assign_splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(img_dir, csv_path, out, **kw):
    base = dict(images=img_dir, csv=csv_path, out=out, preset="adni", attrs=("age", "dx", "sex"),
                size=32, slices=8, spacing=3.0, workers=1)
    base.update(kw)
    return pipeline.PrepConfig(**base)


def test_orientation_does_not_change_the_slices(tmp_path):
    data = brain()
    variants = {"ras": (data, RAS_AFFINE), "lps": as_lps(data, RAS_AFFINE),
                "perm": as_permuted(data, RAS_AFFINE), "perm+lps": as_permuted(*as_lps(data, RAS_AFFINE), (1, 2, 0))}
    out = {}
    for name, (d, a) in variants.items():
        path = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(d, a), path)
        out[name] = process_file(path, size=32, n_slices=6, spacing_mm=3.0)[0]
    for name in variants:
        np.testing.assert_array_equal(out[name], out["ras"], err_msg=name)
    # the slices really see the asymmetric blob: flipping the image left-right changes them
    flipped = str(tmp_path / "mirror.nii.gz")
    nib.save(nib.Nifti1Image(data[::-1].copy(), RAS_AFFINE), flipped)
    assert np.abs(process_file(flipped, 32, 6, 3.0)[0] - out["ras"]).max() > 0.3


def test_slices_are_normalised_and_centred(tmp_path):
    path = str(tmp_path / "b.nii.gz")
    nib.save(nib.Nifti1Image(brain(), RAS_AFFINE), path)
    slices, plan = process_file(path, size=32, n_slices=5, spacing_mm=2.0)
    assert slices.shape == (5, 32, 32) and slices.dtype == np.float32
    assert slices.min() == -1.0 and 0.9 < slices.max() <= 1.0
    assert np.allclose(np.diff(plan["z_mm"]), 2.0)
    assert all(s[16, 16] > 0 for s in slices)       # brain at the centre
    assert all(s[0, 0] == -1 for s in slices)       # background in the corner


@pytest.mark.parametrize("make,reason", [
    (lambda: nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), RAS_AFFINE), "not a 3D volume"),
    (lambda: nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), RAS_AFFINE), "empty volume"),
])
def test_bad_volumes_raise_clear_reasons(tmp_path, make, reason):
    path = str(tmp_path / "bad.nii.gz")
    nib.save(make(), path)
    with pytest.raises(BadVolume, match=reason):
        process_file(path, 32, 4, 2.0)


def test_build_store_skips_bad_files_and_keeps_subjects_apart(adni_cohort, tmp_path):
    img_dir, csv_path, bad = adni_cohort
    out = str(tmp_path / "store.h5")
    summary = pipeline.build(config(img_dir, csv_path, out), log=lambda *a: None)
    skipped = {os.path.basename(p): r for p, r in summary.skipped}
    assert set(skipped) == set(bad)
    assert "unreadable" in skipped[bad[0]] and "NaN" in skipped[bad[1]] and "not a 3D" in skipped[bad[2]]
    assert [os.path.basename(p) for p in summary.unmatched] == ["ADNI_002_S_0998_MR_x_I55555.nii.gz"]
    assert ("002_S_0999", "99999") in summary.orphans
    assert summary.volumes == 6 * 2 + 3                     # + int16-slope, 4D singleton, Analyze
    assert not os.path.exists(out + ".parts")
    with SliceStore(out) as s:
        assert len(s) == summary.volumes * 8 and s.images(np.arange(3)).shape == (3, 32, 32)
        splits_of = {}
        for subj, sp in zip(s.subject, s.split):
            splits_of.setdefault(subj, set()).add(int(sp))
        assert all(len(v) == 1 for v in splits_of.values())
        assert {0, 1, 2} <= {int(x) for x in s.split}
        assert s.schema.names == ["age", "dx", "sex"]
        assert s.schema["dx"].classes == ["CN", "MCI", "Dementia"]
        train = s.indices("train")
        assert abs(s.schema["age"].mean - s.attrs["age"][train].mean()) < 1e-3
        prov = s.provenance
        assert prov["volumes"] == summary.volumes and len(prov["csv_sha256"]) == 64
        # the age at the scan is AGE + Years_bl
        first = s.subject == "002_S_0001"
        assert set(np.round(s.attrs["age"][first], 3)) == {63.0, 64.0}


def test_split_is_stratified_and_seeded():
    subjects = [f"s{i}" for i in range(60)]
    strata = [i % 3 for i in range(60)]
    a = assign_splits(subjects, strata, (0.8, 0.1, 0.1), seed=1)
    assert a == assign_splits(subjects, strata, (0.8, 0.1, 0.1), seed=1)
    assert a != assign_splits(subjects, strata, (0.8, 0.1, 0.1), seed=2)
    for k in range(3):
        counts = np.bincount([a[s] for s, t in zip(subjects, strata) if t == k], minlength=3)
        assert counts.tolist() == [16, 2, 2]


def test_missing_column_names_the_columns(tmp_path):
    img_dir, csv_path, _ = write_adni_cohort(str(tmp_path), n_subjects=2, extra=False)
    rows = list(csv.DictReader(open(csv_path)))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c != "DX"])
        w.writeheader()
        w.writerows([{k: v for k, v in r.items() if k != "DX"} for r in rows])
    with pytest.raises(cohorts.CohortError, match=r"missing column\(s\) \['DX'\].*the CSV has"):
        pipeline.build(config(img_dir, csv_path, str(tmp_path / "s.h5")))


def test_unknown_label_lists_values_and_the_fix(tmp_path):
    img_dir, csv_path, _ = write_adni_cohort(str(tmp_path), n_subjects=2, extra=False)
    text = open(csv_path).read().replace(",CN,", ",Normal,")
    open(csv_path, "w").write(text)
    with pytest.raises(cohorts.CohortError, match=r"unknown 'dx' label\(s\) \['Normal'\].*--label-map dx:Normal="):
        pipeline.build(config(img_dir, csv_path, str(tmp_path / "s.h5")))
    summary = pipeline.build(config(img_dir, csv_path, str(tmp_path / "s.h5"), label_maps=("dx:Normal=CN",)))
    assert summary.volumes == 4


def test_nan_attribute_skips_the_volume(tmp_path):
    img_dir, csv_path, _ = write_adni_cohort(str(tmp_path), n_subjects=3, extra=False)
    rows = list(csv.DictReader(open(csv_path)))
    rows[0]["AGE"] = ""
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = pipeline.build(config(img_dir, csv_path, str(tmp_path / "s.h5")))
    assert summary.volumes == 5 and "missing value for ['age']" in summary.skipped[0][1]


@pytest.mark.slow   # end to end: data_prep.py run twice as a command (12 CPU s)
def test_resume_after_kill_reuses_finished_volumes(tmp_path):
    img_dir, csv_path, _ = write_adni_cohort(str(tmp_path), n_subjects=4, extra=False)
    out = str(tmp_path / "s.h5")
    cmd = [sys.executable, os.path.join(ROOT, "data_prep.py"), "--images", img_dir, "--csv", csv_path,
           "--out", out, "--attrs", "age,dx", "--size", "32", "--slices", "4", "--workers", "1"]
    # a complete reference run
    ref = str(tmp_path / "ref.h5")
    subprocess.run([c if c != out else ref for c in cmd], check=True, capture_output=True)
    # a run stopped before the store is written leaves its parts (each written atomically, so a kill -9
    # leaves whole parts only); keep 3 of them, as if killed after the third volume
    cfg = pipeline.PrepConfig(images=img_dir, csv=csv_path, out=out, attrs=("age", "dx"), size=32, slices=4, workers=1)
    original = pipeline.write_store
    pipeline.write_store = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.build(cfg)
    finally:
        pipeline.write_store = original
    parts = [p for p in os.listdir(out + ".parts") if p.endswith(".npz")]
    assert len(parts) == 8 and not os.path.exists(out)
    for p in parts[3:]:
        os.remove(os.path.join(out + ".parts", p))
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert "resumed from a previous run: 3" in r.stdout
    with SliceStore(out) as a, SliceStore(ref) as b:
        np.testing.assert_array_equal(a.images(np.arange(len(a))), b.images(np.arange(len(b))))


def dead_pid():
    """The id of a process that has ended (and been reaped)."""
    while True:
        p = subprocess.Popen([sys.executable, "-c", ""])
        p.wait()
        try:
            os.kill(p.pid, 0)
        except ProcessLookupError:
            return p.pid


def test_stale_temporary_stores_of_killed_runs_are_removed(tmp_path):
    from mri.data.io import remove_stale_temporaries
    img_dir, csv_path, _ = write_adni_cohort(str(tmp_path), n_subjects=2, extra=False)
    out = str(tmp_path / "s.h5")
    stale, live, other = f"{out}.tmp-{dead_pid()}", f"{out}.tmp-{os.getppid()}", f"{out}.tmp-notes"
    os.makedirs(out + ".parts")
    part_tmp = os.path.join(out + ".parts", f"x.npz.tmp-{dead_pid()}")  # a worker killed mid-write
    other_store = str(tmp_path / f"t.h5.tmp-{dead_pid()}")
    for path in (stale, live, other, part_tmp, other_store):
        open(path, "wb").write(b"half a store")
    summary = pipeline.build(config(img_dir, csv_path, out), log=lambda *a: None)
    assert summary.stale == [stale] and "removed temporary stores of killed runs: 1" in summary.lines()
    assert not os.path.exists(stale) and not os.path.exists(out + ".parts")  # parts folder removed, as documented
    assert os.path.exists(live) and os.path.exists(other)  # a live process's, and no process id at all
    assert os.path.exists(other_store)  # another output's
    with SliceStore(out) as s:
        assert len(s) == summary.volumes * 8 == 32
    own = f"{out}.tmp-{os.getpid()}"
    open(own, "wb").close()
    assert remove_stale_temporaries(out) == [] and os.path.exists(own)


def test_cli_reports_csv_errors_without_traceback(tmp_path):
    img_dir, csv_path, _ = write_adni_cohort(str(tmp_path), n_subjects=2, extra=False)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data_prep.py"), "--images", img_dir, "--csv", csv_path,
                        "--out", str(tmp_path / "x.h5"), "--attrs", "age,dx,apoe"], capture_output=True, text=True)
    assert r.returncode != 0 and "not defined by preset 'adni'" in r.stderr and "Traceback" not in r.stderr


def test_other_presets_join_their_ids(tmp_path):
    d = tmp_path / "oasis"
    os.makedirs(d / "OAS1_0001_MR1")
    nib.save(nib.Nifti1Image(brain(), RAS_AFFINE), str(d / "OAS1_0001_MR1" / "OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.img"))
    with open(tmp_path / "oasis.csv", "w") as f:
        f.write("ID,M/F,Hand,Age,Educ,SES,MMSE,CDR\nOAS1_0001_MR1,F,R,74,2,3,29,0\n")
    s = pipeline.build(pipeline.PrepConfig(images=str(d), csv=str(tmp_path / "oasis.csv"), out=str(tmp_path / "o.h5"),
                                   preset="oasis1", attrs=("age", "sex", "cdr"), size=32, slices=4, workers=1,
                                   split=(1, 0, 0)))
    assert s.volumes == 1
    d = tmp_path / "ixi"
    os.makedirs(d)
    nib.save(nib.Nifti1Image(brain(), RAS_AFFINE), str(d / "IXI012-HH-1211-T1.nii.gz"))
    with open(tmp_path / "ixi.csv", "w") as f:
        f.write("IXI_ID,SEX_ID,AGE\n12,1,38.78\n13,2,46.71\n")
    s = pipeline.build(pipeline.PrepConfig(images=str(d), csv=str(tmp_path / "ixi.csv"), out=str(tmp_path / "i.h5"),
                                   preset="ixi", size=32, slices=4, workers=1, split=(1, 0, 0)))
    assert s.volumes == 1 and s.orphans == [("13",)]
    with SliceStore(str(tmp_path / "i.h5")) as st:
        assert st.subject[0] == "IXI012" and st.schema["sex"].kind == "binary"


def test_registration_is_on_for_scans_and_off_for_the_synthetic_cohort():
    """--register auto registers real follow-ups; the synthetic cohort's visits are rendered in one pose, so auto
    cuts them with their (identical) own plans; on and off (and --no-register) override it."""
    import data_prep
    real, synthetic = ["--images", "i", "--csv", "c.csv"], ["--synthetic", "3"]
    register = lambda *flags: data_prep.parse_args([*flags, "--out", "s.h5"]).register
    assert register(*real) is True and register(*synthetic) is False
    assert register(*real, "--register", "off") is False and register(*real, "--no-register") is False
    assert register(*synthetic, "--register", "on") is True and register(*real, "--register", "on") is True
