"""Synthetic phantom cohort: determinism, prescribed atrophy rates, contrast, files and the disease clock, for
every anatomy version; version 1 stays bit for bit what it was."""
import csv
import hashlib
import math
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mri import synthetic as syn
from mri.data.grids import read_png_size

SEED = 11  # the subject most tests look at
# sha256 (first 16 hex digits) of render(*args) (volume bytes, then the masks in name order), computed with the
# generator as it was before anatomy versions existed: version 1 must keep rendering exactly these
V1_RENDERS = {(11, 70.0, 1.0, 3): "e4dc4ac74e34322b", (12, 80.0, -math.inf, 5): "8468287c03bcc308",
              (1234567, 66.5, -2.0, 9): "abcb1cbf956fc270"}
# the same for version 2, computed before version 3 existed: version 2 (the published results' cohort) must keep
# rendering exactly these
V2_RENDERS = {(11, 70.0, 1.0, 3): "bd4106b76d517389", (12, 80.0, -math.inf, 5): "6ed12d8e743e1a9c",
              (1234567, 66.5, -2.0, 9): "e8979f2ee286cfe4"}


def volumes(age, tau, seed=SEED, version=1):
    _, masks = syn.render(seed, age, tau, noise_seed=1, version=version)
    return {k: int(m.sum()) for k, m in masks.items()}


def render_hash(*args, **kwargs):
    vol, masks = syn.render(*args, **kwargs)
    h = hashlib.sha256(vol.tobytes())
    for k in sorted(masks):
        h.update(masks[k].tobytes())
    return h.hexdigest()[:16]


def test_version_1_and_2_renders_are_unchanged():
    syn.anatomy._anatomy.cache_clear()
    for version, renders in ((1, V1_RENDERS), (2, V2_RENDERS)):
        for args, digest in renders.items():
            assert render_hash(*args, version=version) == digest, (version, args)
    args, digest = next(iter(V2_RENDERS.items()))
    assert render_hash(*args) == render_hash(*args, version=syn.DEFAULT_VERSION) == digest  # the default is v2
    assert render_hash(*args, version=3) not in (digest, V1_RENDERS[args])
    with pytest.raises(ValueError, match="unknown synthetic cohort version"):
        syn.render(SEED, 70.0, 1.0, 3, version=4)


def test_version_3_has_a_white_matter_core_and_separate_deep_nuclei():
    """Version 2's sulci reach 15-36 mm below the hull, so grey matter fills the hemisphere; version 3's stop
    near 20 mm (x 0.6-1.4), leaving a white-matter core: the GM share of the brain tissue deeper than 25 mm
    from the hull's outside (EDT in 3D) falls from 0.16-0.17 to 0.11 (measured on subjects 11 and 12: 0.156 ->
    0.111, 0.167 -> 0.105; the ellipsoidal hull of version 3's first build gave about 0.08, its superellipsoid
    holds more tissue deep in its boxier base)."""
    def deep_gm_share(version, seed):
        lab = syn.render_labels(seed, syn.REF_AGE, -math.inf, version=version)
        depth = ndimage.distance_transform_edt(lab > 0) * syn.VOXEL_MM
        tissue = np.isin(lab, (2, 3, 8, 9)) & (depth > 25)
        return (lab == 2)[tissue].mean(), lab
    for seed in (SEED, SEED + 1):
        v2, _ = deep_gm_share(2, seed)
        v3, lab = deep_gm_share(3, seed)
        assert v3 < 0.12 < 0.14 < v2 and v3 < 0.75 * v2, (seed, v2, v3)
        # thalamus, caudate and putamen of both sides are not merged: white matter (the internal capsule) between
        assert ndimage.label(lab == syn.LABELS.index("deep_gm"))[1] >= 6


@pytest.mark.parametrize("version", syn.VERSIONS)
def test_render_is_deterministic_and_well_formed(version):
    vol, masks = syn.render(SEED, 70.0, 1.0, noise_seed=3, version=version)
    syn.anatomy._anatomy.cache_clear()  # rebuild the subject from scratch
    again, _ = syn.render(SEED, 70.0, 1.0, noise_seed=3, version=version)
    assert vol.dtype == np.float32 and vol.shape == syn.SHAPE
    assert vol.tobytes() == again.tobytes()
    assert set(masks) == {"brain", "ventricles", "hippocampus"}
    assert all(m.dtype == bool and m.shape == syn.SHAPE for m in masks.values())
    assert not (masks["brain"] & masks["ventricles"]).any() and (masks["hippocampus"] <= masks["brain"]).all()
    assert vol.min() == 0.0 and vol[0, 0, 0] == 0.0  # skull-stripped: zero background
    assert 900 < masks["brain"].sum() * syn.VOXEL_MM ** 3 / 1e3 < 1600  # ml


def test_make_cohort_is_deterministic_and_adni_like():
    rows = syn.make_cohort(60, seed=3)
    assert rows == syn.make_cohort(60, seed=3)
    assert rows != syn.make_cohort(60, seed=4)
    assert syn.DEFAULT_VERSION == 2 and {r["synthetic_version"] for r in rows} == {2}
    v1 = syn.make_cohort(60, seed=3, version=1)  # the same table, another anatomy
    assert [dict(r, synthetic_version=2) for r in v1] == rows and {r["synthetic_version"] for r in v1} == {1}
    assert len(rows) == 180 and all(tuple(r) == syn.COLUMNS for r in rows)
    assert len({r["IMAGEUID"] for r in rows}) == 180 and len({r["PTID"] for r in rows}) == 60
    bl = [r for r in rows if r["VISCODE"] == "bl"]
    assert {r["DX_bl"] for r in bl} <= {"CN", "EMCI", "LMCI", "AD"} and {r["DX"] for r in rows} <= set(syn.DX)
    assert all(55 <= r["AGE"] <= 90 and 0 <= r["MMSE"] <= 30 and 0 <= r["ADAS13"] <= 85 and 0 <= r["FAQ"] <= 30
               for r in rows)
    for r in bl:  # DX_bl spells the baseline stage
        assert {"CN": "CN", "EMCI": "MCI", "LMCI": "MCI", "AD": "Dementia"}[r["DX_bl"]] == r["DX"]
    mmse = {dx: np.mean([r["MMSE"] for r in rows if r["DX"] == dx]) for dx in syn.DX}
    assert mmse["CN"] > mmse["MCI"] > mmse["Dementia"]
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["PTID"], []).append(r["DX"])
    assert any(dxs[0] == "MCI" and dxs[-1] == "Dementia" for dxs in by_subject.values())  # converters


@pytest.mark.parametrize("version", syn.VERSIONS)
@pytest.mark.parametrize("dx, age, tau, years", [("CN", 65.0, -math.inf, 10.0), ("MCI", 65.0, 0.5, 3.0),
                                                 ("Dementia", 70.0, 5.0, 10.0)])
def test_volumes_change_at_the_prescribed_rates(dx, age, tau, years, version):
    assert syn.stage(tau) == dx == syn.stage(tau + years - 1e-9)
    before, after = volumes(age, tau, version=version), volumes(age + years, tau + years, version=version)
    measured = {k: (after[k] / before[k]) ** (1 / years) - 1 for k in before}
    print(dx, {k: f"{100 * v:+.2f} %/yr" for k, v in measured.items()})
    for mask, structure in (("brain", "brain"), ("ventricles", "ventricles"), ("hippocampus", "hippocampus")):
        expected = syn.ANNUAL_CHANGE[structure][dx]
        assert measured[mask] == pytest.approx(expected, rel=0.10), (mask, measured[mask], expected)


@pytest.mark.parametrize("version", syn.VERSIONS)
def test_disease_accelerates_atrophy_at_the_same_age(version):
    cn, ad = volumes(80.0, -math.inf, version=version), volumes(80.0, 8.0, version=version)
    assert ad["hippocampus"] < cn["hippocampus"] and ad["brain"] < cn["brain"]
    assert ad["ventricles"] > cn["ventricles"]


def test_preclinical_phase_gives_literature_sized_diagnosis_differences():
    def rate(tau, structure="hippocampus"):
        return math.expm1(syn.log_change(structure, 71.0, tau + 1) - syn.log_change(structure, 70.0, tau))
    assert syn.stage(-3.0) == "CN" and rate(-3.0) == pytest.approx(syn.ANNUAL_CHANGE["hippocampus"]["MCI"])
    assert rate(-syn.T_PRE - 2.0) == pytest.approx(syn.ANNUAL_CHANGE["hippocampus"]["CN"])
    deficit = {}   # cross-sectional, against the same scan without disease (Shi et al. 2009: ~13 % MCI, ~24 % AD)
    for row in syn.make_cohort(300, seed=2):
        age, tau = row["AGE"] + row["Years_bl"], syn.tau_of(row)
        for s in ("hippocampus", "ventricles"):
            change = math.expm1(syn.log_change(s, age, tau) - syn.log_change(s, age, -math.inf))
            deficit.setdefault((s, row["DX"]), []).append(change)
    mean = {k: float(np.mean(v)) for k, v in deficit.items()}
    assert -0.16 < mean["hippocampus", "MCI"] < -0.09 and -0.27 < mean["hippocampus", "Dementia"] < -0.18
    assert mean["ventricles", "Dementia"] > mean["ventricles", "MCI"] > 0.08 > mean["ventricles", "CN"] >= 0


@pytest.mark.parametrize("version", syn.VERSIONS)
def test_subjects_differ_more_than_visits(version):
    a70, _ = syn.render(SEED, 70.0, -math.inf, noise_seed=1, version=version)
    a72, _ = syn.render(SEED, 72.0, -math.inf, noise_seed=2, version=version)
    b70, _ = syn.render(SEED + 1, 70.0, -math.inf, noise_seed=3, version=version)
    intra, inter = np.abs(a70 - a72).mean(), np.abs(a70 - b70).mean()
    assert inter > 2 * intra, (inter, intra)


@pytest.mark.parametrize("version, gm_wm, csf_wm", [(1, 0.75, 0.30), (2, 0.80, 0.33), (3, 0.81, 0.33)])
def test_tissue_contrast(version, gm_wm, csf_wm):
    vol, _ = syn.render(SEED, 70.0, -math.inf, noise_seed=4, version=version)
    lab = syn.render_labels(SEED, 70.0, -math.inf, version=version)
    wm = np.median(vol[lab == syn.LABELS.index("wm")])
    gm = np.median(vol[lab == syn.LABELS.index("gm")])
    csf = np.median(vol[ndimage.binary_erosion(lab == syn.LABELS.index("ventricle"), iterations=2)])  # no PV
    assert wm == pytest.approx(1.0, abs=0.05)
    assert gm / wm == pytest.approx(gm_wm, abs=0.07)
    assert csf / wm == pytest.approx(csf_wm, abs=0.07)


def test_disease_clock():
    for row in syn.make_cohort(40, seed=5):
        tau, age = syn.tau_of(row), row["AGE"] + row["Years_bl"]
        assert syn.disease_clock(tau, age, age, row["DX"]) == tau
        assert syn.stage(tau) == row["DX"]
    assert syn.disease_clock(2.0, 70, 70, "CN") == -math.inf  # diseased, asked for CN: no disease
    assert syn.disease_clock(9.0, 70, 80, "CN") == -math.inf
    assert syn.disease_clock(-math.inf, 70, 90, "CN") == -math.inf
    assert syn.disease_clock(-3.0, 70, 71, "CN") == -2.0  # still before onset: unchanged
    assert syn.disease_clock(-3.0, 70, 60, "CN") == -13.0
    # a CN subject on its way to MCI, kept CN past its onset, stays preclinical: 0.5 years before onset ...
    assert syn.disease_clock(-3.0, 70, 75, "CN") == -0.5
    assert syn.disease_clock(-8.0, 70, 90, "CN") == -0.5
    # ... or at its own clock if that is closer to onset (its own age keeps its own tau)
    assert syn.disease_clock(-0.3, 70, 70, "CN") == -0.3
    assert syn.disease_clock(-0.3, 70, 75, "CN") == -0.3
    assert syn.disease_clock(-0.3, 70, 69, "CN") == pytest.approx(-1.3)
    assert syn.disease_clock(-3.0, 70, 70, "MCI") == 0.5
    assert syn.disease_clock(-math.inf, 70, 75, "MCI") == 0.5
    assert syn.disease_clock(9.0, 70, 70, "MCI") == syn.T_MCI - 0.5
    assert syn.disease_clock(1.0, 70, 72, "MCI") == 3.0  # clock runs on inside the stage
    assert syn.disease_clock(1.0, 70, 70, "Dementia") == syn.T_MCI + 0.5
    assert syn.disease_clock(5.0, 70, 80, "Dementia") == 15.0


@pytest.mark.parametrize("tau", [-9.0, -3.0, -0.3])
def test_cn_aging_of_a_preclinical_subject_is_monotone(tau):
    """Kept CN at older and older ages, a subject on its way to MCI never regains lost volume."""
    ages = np.arange(60.0, 95.01, 0.25)
    clocks = [syn.disease_clock(tau, 70.0, a, "CN") for a in ages]
    for structure, sign in (("hippocampus", -1), ("brain", -1), ("ventricles", 1)):
        step = sign * np.diff([syn.log_change(structure, a, t) for a, t in zip(ages, clocks)])
        assert (step >= 0).all(), f"{structure} recovers at ages {ages[1:][step < 0]}"
    assert all(syn.stage(t) == "CN" and t > -math.inf for t in clocks)
    # the preclinical atrophy it already had is kept: no older age looks healthier than its own
    own = syn.log_change("hippocampus", 70.0, tau)
    assert all(syn.log_change("hippocampus", a, t) <= own for a, t in zip(ages, clocks) if a >= 70)


@pytest.mark.parametrize("version", syn.VERSIONS)
def test_write_cohort_matches_render_row(tmp_path, version):
    out = str(tmp_path / "volumes")
    path = syn.write_cohort(2, out, seed=7, workers=2, visits=("bl", "m12"), version=version)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == syn.COLUMNS == ("PTID", "VISCODE", "AGE", "Years_bl", "DX", "DX_bl", "ADAS13", "MMSE",
                                             "FAQ", "PTGENDER", "PTEDUCAT", "IMAGEUID", "subject_seed",
                                             "onset_age", "noise_seed", "synthetic_version")
    assert {r["synthetic_version"] for r in rows} == {str(version)}
    assert len(rows) == 4 and sorted(os.listdir(out)) == sorted([syn.volume_name(r) for r in rows] + ["cohort.csv"])
    for row in rows:  # rows as read back from the CSV (strings)
        img = nib.load(os.path.join(out, syn.volume_name(row)))
        assert img.get_data_dtype() == np.int16 and img.shape == syn.SHAPE
        assert np.allclose(img.affine, syn.affine())
        vol, _ = syn.render_row(row)
        assert np.array_equal(img.get_fdata(dtype=np.float32), vol)
    own_age = float(rows[0]["AGE"]) + float(rows[0]["Years_bl"])
    same, _ = syn.render_row(rows[0], age=own_age, dx=rows[0]["DX"])
    assert same.tobytes() == syn.render_row(rows[0])[0].tobytes()
    assert np.array_equal(syn.quantise(vol), vol)

    stamp = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".nii.gz")}
    syn.write_cohort(2, out, seed=7, workers=1, visits=("bl", "m12"), version=version)  # nothing rewritten
    assert stamp == {n: os.path.getmtime(os.path.join(out, n)) for n in stamp}
    other = syn.VERSIONS[version % len(syn.VERSIONS)]  # same file names, other anatomy: refused
    with pytest.raises(ValueError, match="another synthetic cohort version"):
        syn.write_cohort(2, out, seed=7, workers=1, visits=("bl", "m12"), version=other)


def test_volume_name():
    row = {"PTID": "002_S_0001", "IMAGEUID": 40001}
    assert syn.volume_name(row) == "ADNI_002_S_0001_MR_MPRAGE_br_raw_S40000_I40001.nii.gz"


@pytest.mark.parametrize("version", syn.VERSIONS)
def test_figure_aging(tmp_path, version):
    path = syn.figure_aging(str(tmp_path / "aging.png"), subject_seed=SEED, ages=(60, 90), version=version)
    assert read_png_size(path) == (2 * (2 * syn.SHAPE[1] + 2) + 2, 2 * (2 * syn.SHAPE[0] + 2) + 2)


@pytest.fixture(scope="module", params=syn.VERSIONS)
def synthetic_store(tmp_path_factory, request):
    from mri.data import pipeline
    d = tmp_path_factory.mktemp("synstore")
    cfg = pipeline.PrepConfig(images="", csv="", out=str(d / "s.h5"), size=32, slices=6, spacing=8.0, workers=1,
                          split=(0.5, 0.25, 0.25))
    cfg = pipeline.synthetic_config(cfg, 4, str(d / "vols"), version=request.param)
    pipeline.build(cfg, log=lambda *a: None)
    return cfg.out, request.param


@pytest.mark.slow   # data_prep of the real cohort: renders and registers 12 volumes a version (37-40 CPU s each)
def test_counterfactual_at_own_attributes_is_the_stored_slice(synthetic_store):
    from mri.data.store import SliceStore
    path, version = synthetic_store
    with SliceStore(path) as st:
        assert st.schema.names == ["age", "dx", "adas13", "mmse", "faq", "sex", "educ"]
        assert (st.csv("synthetic_version") == version).all()
        idx = np.arange(len(st))
        own = syn.counterfactual(st, idx)
        np.testing.assert_array_equal(own["images"].astype(np.float16), st.images(idx).astype(np.float16))
        same = syn.counterfactual(st, idx, age=st.attrs["age"][idx], dx=st.attrs["dx"][idx])
        np.testing.assert_array_equal(same["images"], own["images"])
        # ten years later: ventricles larger, hippocampus and brain smaller (summed over the slab)
        older = syn.counterfactual(st, idx, age=st.attrs["age"][idx] + 10, masks=True)
        assert older["ventricles"].sum() > own["ventricles"].sum() * 1.15
        assert older["hippocampus"].sum() < own["hippocampus"].sum()
        assert older["brain"].sum() < own["brain"].sum()
        assert older["masks"]["ventricles"].shape == (len(idx), 32, 32)
        again = syn.counterfactual(st, idx, age=st.attrs["age"][idx] + 10)   # served from the last result
        assert "masks" not in again and again["images"] is older["images"] and not again["images"].flags.writeable
        demented = syn.counterfactual(st, idx, dx=np.full(len(idx), 2))
        assert demented["hippocampus"].sum() < own["hippocampus"].sum()
        # another scan of the same brain (the follow-up protocol's noise floor): the own seeds give the stored
        # slices; other seeds the same anatomy (true areas) with other noise
        seeds = st.csv("noise_seed", idx).astype(np.int64)
        np.testing.assert_array_equal(syn.counterfactual(st, idx, noise_seed=seeds)["images"], own["images"])
        rescan = syn.counterfactual(st, idx, noise_seed=seeds + 1)
        np.testing.assert_array_equal(rescan["ventricles"], own["ventricles"])
        brain = own["images"] > -0.99
        d = (rescan["images"] - own["images"])[brain]
        assert 0.02 < d.std() < 0.2 and abs(d.mean()) < 0.05


@pytest.mark.slow   # the version-1 store of the test above (7 CPU s)
@pytest.mark.parametrize("synthetic_store", [1], indirect=True)
def test_counterfactual_of_a_store_from_before_versions_is_version_1(synthetic_store):
    """A store without csv/synthetic_version (built before versions existed) re-renders with version 1."""
    import h5py
    from mri.data.store import SliceStore
    path, _ = synthetic_store
    old = path.replace(".h5", "-unversioned.h5")
    with h5py.File(path) as src, h5py.File(old, "w") as dst:
        for k in src:
            src.copy(k, dst)
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        del dst["csv/synthetic_version"]
    with SliceStore(old) as st, SliceStore(path) as new:
        idx = np.arange(0, len(st), 3)
        np.testing.assert_array_equal(syn.counterfactual(st, idx)["images"], syn.counterfactual(new, idx)["images"])
