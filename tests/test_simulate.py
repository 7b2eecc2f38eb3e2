"""simulate.py: a scan in, NIfTI slabs that overlay it, a picture and atrophy numbers out.

On the tiny store of conftest (32 px, 4 slices 2 mm apart) and a one-step tiny Fader run: the output affine
puts every voxel at the world position preprocess sampled, the axis order on disk does not matter, a residual
method returns exactly the source at unchanged attributes, meandiff uses its per-position models, and bad input stops
with a message naming the fix.
"""
import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import as_lps, as_permuted, brain, write_adni_cohort
import simulation
from models import head
from mri.data import tissue
from mri.data.volumes import (apply_plan, load_canonical, process_file, sample_grid, slab_to_volume, to_native,
                            volume_to_slab)
from mri.data.store import SliceStore

# anisotropic voxels, origin off-centre: the output grid (square pixels, 2 mm slices) differs from the input's
AFFINE = np.array([[1.2, 0, 0, -21.0], [0, 1.5, 0, -39.0], [0, 0, 1.8, -28.0], [0, 0, 0, 1]])
SOURCE = {"age": 70.0, "dx": "CN"}


def simulate(*argv):
    import simulate as script
    script.main([str(a) for a in argv])


def read(out, name):
    img = nib.load(os.path.join(out, name))
    return np.asarray(img.dataobj, np.float32), img.affine, img.header


def read_csv(out):
    with open(os.path.join(out, "changes.csv")) as f:
        return list(csv.DictReader(f))


def geometry(store_path):
    with SliceStore(store_path) as s:
        a = s.provenance["arguments"]
        return s.size, a["slices"], a["spacing"]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """One scan written three ways: RAS, flipped in x and y, and flipped with its axes permuted."""
    d = tmp_path_factory.mktemp("scans")
    data = brain(seed=7)
    variants = {"ras": (data, AFFINE), "lps": as_lps(data, AFFINE), "permuted": as_permuted(*as_lps(data, AFFINE), (1, 2, 0))}
    paths = {}
    for name, (v, a) in variants.items():
        paths[name] = str(d / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(v, a), paths[name])
    return paths


@pytest.fixture(scope="module")
def fader_run(store_path, tmp_path_factory):
    import train_fader
    out = str(tmp_path_factory.mktemp("sim_fader") / "run")
    train_fader.main(["--store", store_path, "--out", out, "--attrs", "age,dx", "--tiny", "--batch-size", "4",
                      "--steps-per-epoch", "1", "--epochs", "1", "--seed", "2"])
    return out


@pytest.fixture(scope="module")
def fader_outputs(scans, fader_run, tmp_path_factory):
    """fader@residual on each way of writing the scan: {variant: output folder}. Targets: age 70 (= the source),
    age 85, dx CN (= the source) and Dementia, in a batch smaller than the slab."""
    outs = {}
    for name, path in scans.items():
        outs[name] = str(tmp_path_factory.mktemp(f"sim_{name}"))
        simulate("--method", fader_run + "@residual", "--input", path, "--source", "age=70,dx=CN",
                 "--age", "70,85", "--dx", "CN,Dementia", "--out", outs[name], "--batch-size", 3)
    return outs


def test_affine_puts_every_voxel_where_preprocess_sampled(scans, store_path, tmp_path):
    size, slices, spacing = geometry(store_path)
    out = str(tmp_path / "identity")
    simulate("--method", "identity", "--store", store_path, "--input", scans["permuted"], "--source", "age=70",
             "--age", 80, "--out", out)
    data, affine, header = read(out, "source.nii.gz")
    expected, plan = process_file(scans["permuted"], size, slices, spacing)
    assert data.shape == (size, size, slices)
    np.testing.assert_array_equal(data, slab_to_volume(expected))
    # voxel centres -> world, against the coordinates sample_grid gave every sampled pixel
    ijk = np.indices(data.shape).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:]
    sampled = np.stack([slab_to_volume(c).ravel() for c in sample_grid(plan, size)])
    assert np.abs(world - sampled).max() < 1e-4
    np.testing.assert_allclose(header.get_zooms(), (plan["side_mm"] / size,) * 2 + (spacing,), rtol=1e-6)
    # independently of the canonical reorientation: sample the file as stored on disk at those world points
    disk = nib.load(scans["permuted"])
    vox = np.linalg.inv(disk.affine) @ np.vstack([world, np.ones(world.shape[1])])
    raw = ndimage.map_coordinates(np.maximum(np.asarray(disk.dataobj, np.float32), 0), vox[:3], order=1, cval=0.0)
    overlay = np.clip(raw / plan["scale"], 0, 1) * 2 - 1
    np.testing.assert_allclose(overlay, data.ravel(), atol=1e-4)
    assert int(header["sform_code"]) == int(disk.header["sform_code"]) > 0
    # identity at another age returns the source, and the difference is zero
    np.testing.assert_array_equal(read(out, "age_80.nii.gz")[0], data)
    assert not read(out, "difference_age_80.nii.gz")[0].any()


def test_axis_order_on_disk_does_not_change_the_outputs(fader_outputs):
    names = sorted(os.listdir(fader_outputs["ras"]))
    assert names == sorted(["source.nii.gz", "trajectory.png", "changes.csv", "simulation.json"]
                           + [f"{p}{t}.nii.gz" for t in ("age_70", "age_85", "dx_CN", "dx_Dementia")
                              for p in ("", "difference_")])
    for variant in ("lps", "permuted"):
        assert sorted(os.listdir(fader_outputs[variant])) == names
        for name in names:
            a, b = (os.path.join(fader_outputs[v], name) for v in ("ras", variant))
            if name.endswith(".nii.gz"):
                (da, aa, _), (db, ab, _) = read(*os.path.split(a)), read(*os.path.split(b))
                np.testing.assert_array_equal(da, db, err_msg=f"{variant}/{name}")
                np.testing.assert_allclose(aa, ab, atol=1e-9, err_msg=f"{variant}/{name}")
            elif not name.endswith(".json"):   # the JSON names its input file
                assert open(a, "rb").read() == open(b, "rb").read(), f"{variant}/{name}"


def test_a_residual_method_returns_the_source_at_its_own_attributes(fader_outputs, fader_run):
    from models import load_method
    out = fader_outputs["ras"]
    source = read(out, "source.nii.gz")[0]
    # what the methods compute, run over the slab like any target: the residual mode gives the source back
    # exactly (its declared by-construction identity); the decode mode reconstructs, and that shows
    slab = volume_to_slab(source)
    raw = {"age": np.full(len(slab), 70.0), "dx": np.zeros(len(slab))}
    residual, decode = load_method(fader_run + "@residual", None), load_method(fader_run, None)
    np.testing.assert_array_equal(residual.manipulate(slab[..., None], raw, raw)[..., 0], slab)
    assert "reconstruction_mse" in residual.by_construction and "reconstruction_mse" not in decode.by_construction
    unchanged = [("age_70", {"age": 70.0})]
    same = simulation.manipulate_slab(residual, slab, {"age": 70.0, "dx": 0.0}, unchanged, None, 3)["age_70"]
    np.testing.assert_array_equal(same, slab)
    kept = simulation.manipulate_slab(decode, slab, {"age": 70.0, "dx": 0.0}, unchanged, None, 4)["age_70"]
    np.testing.assert_allclose(kept, decode.manipulate(slab[..., None], raw, raw)[..., 0], atol=1e-6)
    assert np.abs(kept - slab).max() > 1e-3
    for same in ("age_70", "dx_CN"):
        np.testing.assert_array_equal(read(out, f"{same}.nii.gz")[0], source, err_msg=same)
        assert not read(out, f"difference_{same}.nii.gz")[0].any()
    for changed in ("age_85", "dx_Dementia"):
        y, diff = read(out, f"{changed}.nii.gz")[0], read(out, f"difference_{changed}.nii.gz")[0]
        assert np.abs(diff).max() > 1e-4 and np.abs(y).max() <= 1
        np.testing.assert_allclose(diff, y - source, atol=1e-6)
    rows = {r["target"]: r for r in read_csv(out)}
    assert list(rows) == ["source", "age_70", "age_85", "dx_CN", "dx_Dementia"]
    assert (rows["age_85"]["age"], rows["age_85"]["dx"], rows["dx_Dementia"]["age"]) == ("85", "CN", "70")
    for same in ("source", "age_70", "dx_CN"):
        assert float(rows[same]["bpf_change"]) == 0 and rows[same]["bpf"] == rows["source"]["bpf"]
    assert 0 < float(rows["source"]["bpf"]) < 1 and float(rows["source"]["brain_ml"]) > 0


def test_trajectory_picture_and_record(fader_outputs, store_path):
    from mri.data.grids import read_png_size
    size, slices, _ = geometry(store_path)
    out = fader_outputs["ras"]
    rows = {min(slices - 1, int(f * slices)) for f in simulation.PICTURE_SLICES}
    assert read_png_size(os.path.join(out, "trajectory.png")) == (2 * len(rows) * (size + 2) + 2, (1 + 4) * (size + 2) + 2)
    record = json.load(open(os.path.join(out, "simulation.json")))
    assert record["source"] == {"age": "70", "dx": "CN"} and record["geometry"]["slices"] == slices
    assert [t["file"] for t in record["targets"]] == ["age_70.nii.gz", "age_85.nii.gz", "dx_CN.nii.gz", "dx_Dementia.nii.gz"]
    assert record["geometry"]["from_store"] == store_path   # the run's training store gave the geometry


def test_methods_get_the_slab_positions_in_batches(scans, store_path, tmp_path, monkeypatch):
    """Every manipulate call gets "slice", the slab's axial positions (a scan has no store index), and the
    source and target attributes of its batch."""
    _, slices, _ = geometry(store_path)
    calls = []

    class Recorder:
        def manipulate(self, images, source_attrs, target_attrs):
            calls.append((len(images), source_attrs, target_attrs))
            return images

    monkeypatch.setattr(simulation, "load_method", lambda *a: Recorder())
    simulate("--method", "identity", "--store", store_path, "--input", scans["ras"], "--source", "age=70,dx=MCI",
             "--target", "age=75,dx=Dementia", "--batch-size", 3, "--out", tmp_path / "o")
    assert [n for n, _, _ in calls] == [3, slices - 3]
    np.testing.assert_array_equal(np.concatenate([s["slice"] for _, s, _ in calls]), np.arange(slices))
    for n, src, tgt in calls:
        assert "index" not in src and src["dx"].tolist() == [1] * n and src["age"].tolist() == [70] * n
        assert tgt["dx"].tolist() == [2] * n and tgt["age"].tolist() == [75] * n


def test_the_background_beyond_the_grown_head_stays_the_scans(scans, store_path, tmp_path, monkeypatch):
    size, slices, spacing = geometry(store_path)

    class Brighter:
        def manipulate(self, images, source_attrs, target_attrs):
            return np.asarray(images) + 0.25

    monkeypatch.setattr(simulation, "load_method", lambda *a: Brighter())
    out = str(tmp_path / "o")
    simulate("--method", "identity", "--store", store_path, "--input", scans["ras"], "--source", "age=70",
             "--age", 80, "--out", out)
    source = process_file(scans["ras"], size, slices, spacing)[0]
    inside = head(source[..., None])[..., 0]
    assert 0 < inside.mean() < 1
    expected = np.where(inside, source + 0.25, source)
    np.testing.assert_allclose(read(out, "age_80.nii.gz")[0], slab_to_volume(expected), atol=1e-6)


def test_a_change_the_method_does_not_make_stops_before_any_work(scans, store_path, tmp_path, monkeypatch):
    calls = []

    class DxOnly:                     # makes diagnosis changes only, as a CycleGAN between two classes
        def supports(self, source_attrs, target_attrs):
            return source_attrs["age"] == target_attrs["age"]

        def manipulate(self, images, source_attrs, target_attrs):
            calls.append(len(images))
            return images

    monkeypatch.setattr(simulation, "load_method", lambda *a: DxOnly())
    with pytest.raises(SystemExit, match="does not make the change to age_80.*choose targets it supports"):
        simulate("--method", "identity", "--store", store_path, "--input", scans["ras"], "--source", "age=70,dx=CN",
                 "--dx", "Dementia", "--age", "80", "--out", tmp_path / "o")
    assert calls == [] and not os.path.exists(tmp_path / "o")


def test_meandiff_uses_the_model_of_each_slab_position(scans, store_path, tmp_path, capsys):
    from models.baselines import MeanDiff, design
    size, slices, spacing = geometry(store_path)
    out = str(tmp_path / "meandiff")
    simulate("--method", "meandiff", "--store", store_path, "--input", scans["ras"], "--source", "age=70",
             "--age", 80, "--out", out)
    with SliceStore(store_path) as s:
        fit = MeanDiff.fit(s, attrs=["age"])
    assert fit.coef.shape[0] == slices and not np.allclose(fit.coef[0], fit.coef[-1])
    dx = (design(fit.schema, {"age": np.array([80.0])}) - design(fit.schema, {"age": np.array([70.0])}))[0]
    source = process_file(scans["ras"], size, slices, spacing)[0]
    expected = np.clip(source + np.einsum("d,kdp->kp", dx, fit.coef).reshape(source.shape), -1, 1)
    expected = np.where(head(source[..., None])[..., 0], expected, source)    # the background stays the scan's
    np.testing.assert_allclose(read(out, "age_80.nii.gz")[0], slab_to_volume(expected), atol=1e-6)
    # another geometry: the per-position models do not apply, the model over all positions does
    out3 = str(tmp_path / "meandiff3")
    simulate("--method", "meandiff", "--store", store_path, "--input", scans["ras"], "--source", "age=70",
             "--age", 80, "--slices", 3, "--out", out3)
    err = capsys.readouterr().err
    assert f"3 slices {spacing:g} mm apart differ from the {slices} slices" in err and "model over all positions" in err
    source3 = process_file(scans["ras"], size, 3, spacing)[0]
    expected3 = np.where(head(source3[..., None])[..., 0], np.clip(source3 + (dx @ fit.coef_all).reshape(size, size), -1, 1),
                         source3)
    np.testing.assert_allclose(read(out3, "age_80.nii.gz")[0], slab_to_volume(expected3), atol=1e-6)


def test_a_stored_subject_and_native_intensities(store_path, scans, tmp_path):
    size, slices, spacing = geometry(store_path)
    with SliceStore(store_path) as s:
        subject = s.subject[s.split == 2][0]
        idx = np.flatnonzero((s.subject == subject) & (s.visit == "m12"))
        images, plan, age = s.images(idx[np.argsort(s.slice[idx])]), s.plan(int(s.volume[idx[0]])), s.attrs["age"][idx[0]]
        dx = s.schema["dx"].classes[int(s.attrs["dx"][idx[0]])]
    out = str(tmp_path / "stored")
    simulate("--method", "meandiff", "--store", store_path, "--subject", subject, "--visit", "m12", "--dx", "MCI",
             "--out", out)
    data, affine, _ = read(out, "source.nii.gz")
    np.testing.assert_array_equal(data, slab_to_volume(images))
    world = affine[:3, :3] @ np.indices(data.shape).reshape(3, -1) + affine[:3, 3:]
    assert np.abs(world - np.stack([slab_to_volume(c).ravel() for c in sample_grid(plan, size)])).max() < 1e-4
    row = read_csv(out)[0]
    assert (float(row["age"]), row["dx"]) == (pytest.approx(float(age), abs=0.05), dx)
    # --native-intensity: the plan's scale back, i.e. the scan's own sampled intensities below that scale
    out = str(tmp_path / "native")
    simulate("--method", "identity", "--store", store_path, "--input", scans["ras"], "--source", "dx=CN",
             "--dx", "MCI", "--native-intensity", "--out", out)
    native = read(out, "source.nii.gz")[0]
    slab, plan = process_file(scans["ras"], size, slices, spacing)
    np.testing.assert_allclose(native, slab_to_volume(to_native(slab, plan)), rtol=1e-6)
    raw = slab_to_volume(apply_plan(np.maximum(load_canonical(scans["ras"])[0], 0), plan, size))
    below = raw < plan["scale"]
    assert below.mean() > 0.9
    np.testing.assert_allclose(native[below], raw[below], rtol=1e-5, atol=1e-3)


def test_tissue_measures_on_known_classes():
    """Three intensity classes in known proportions: the levels are found, the BPF is the tissue share, and
    turning grey-matter voxels into CSF lowers it by their share of the mask."""
    levels = (-0.4, 0.3, 0.8)
    slab = np.full((2, 20, 20), -1.0)
    inside = np.zeros(slab.shape, bool)
    inside[:, 2:18, 2:18] = True
    values = np.resize(np.repeat(levels, [60, 100, 96]), inside.sum())   # 256 voxels a slice
    slab[inside] = values
    mask = tissue.filled_foreground(slab)
    assert (mask == inside).all()
    found = tissue.tissue_levels(slab[mask])
    np.testing.assert_allclose(found, levels, atol=1e-12)
    m = tissue.measures(slab, mask, found, voxel_ml=0.002)
    n = mask.sum()
    assert m["bpf"] == pytest.approx((values != levels[0]).mean()) and m["brain_ml"] + m["csf_ml"] == pytest.approx(n * 0.002)
    atrophied = slab.copy()
    gm = np.flatnonzero(atrophied == levels[1])[:40]
    atrophied.flat[gm] = levels[0]
    assert tissue.measures(atrophied, mask, found, 0.002)["bpf"] - m["bpf"] == pytest.approx(-40 / n)
    halfway = slab.copy()
    halfway.flat[gm] = (levels[0] + levels[1]) / 2          # partial volume: half tissue
    assert tissue.measures(halfway, mask, found, 0.002)["bpf"] - m["bpf"] == pytest.approx(-20 / n)


def test_bad_input_stops_with_the_fix(fader_run, store_path, scans, tmp_path, capsys):
    common = ["--input", scans["ras"], "--out", str(tmp_path / "o")]
    method = ["--method", fader_run + "@residual"]
    with pytest.raises(SystemExit, match="unknown attribute 'apoe'; the method knows age, dx"):
        simulate(*method, *common, "--source", "age=70,dx=CN", "--target", "age=80,apoe=1")
    with pytest.raises(SystemExit, match="dx=Demented: not a class of dx; its classes are CN, MCI, Dementia"):
        simulate(*method, *common, "--source", "age=70,dx=CN", "--dx", "Demented")
    with pytest.raises(SystemExit, match="--source lacks dx.*e.g. --source age=70,dx=CN"):
        simulate(*method, *common, "--source", "age=70", "--age", "80")
    with pytest.raises(SystemExit, match="age=old: age is continuous"):
        simulate(*method, *common, "--source", "age=old,dx=CN", "--age", "80")
    # a value outside the training range runs, with a warning giving the range
    with SliceStore(store_path) as s:
        q = s.schema["age"].quantiles          # the run's schema: fitted on the same train split
    simulate(*method, *common, "--source", "age=70,dx=CN", "--age", "150")
    assert f"age=150 is outside the training range {q[0]:.1f}..{q[-1]:.1f}" in capsys.readouterr().err
    # an unreadable scan, a run that cannot be loaded, a mismatched image size
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a volume")
    with pytest.raises(SystemExit, match=f"--input {bad}: unreadable.*give a 3D NIfTI"):
        simulate(*method, "--input", bad, "--out", tmp_path / "o", "--source", "age=70,dx=CN", "--age", "80")
    with pytest.raises(SystemExit, match="runs/nowhere is neither a baseline.*nor a run directory"):
        simulate("--method", "runs/nowhere", *common, "--source", "age=70,dx=CN", "--age", "80")
    broken = tmp_path / "broken"
    shutil.copytree(fader_run, broken)
    os.remove(broken / "checkpoint.npz")
    with pytest.raises(SystemExit, match="the run cannot be loaded.*no checkpoint at"):
        simulate("--method", broken, *common, "--source", "age=70,dx=CN", "--age", "80")
    (broken / "checkpoint.npz").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="the run cannot be loaded"):
        simulate("--method", broken, *common, "--source", "age=70,dx=CN", "--age", "80")
    config = json.load(open(broken / "config.json"))
    config["args"]["store"] = str(tmp_path / "gone.h5")
    json.dump(config, open(broken / "config.json", "w"))
    with pytest.raises(SystemExit, match="slice geometry .* is not known.*give --slices and --spacing"):
        simulate("--method", broken, *common, "--source", "age=70,dx=CN", "--age", "80")
    from mri.data import pipeline
    img_dir, csv_path, _ = write_adni_cohort(str(tmp_path / "c16"), n_subjects=2, extra=False)
    small = str(tmp_path / "s16.h5")
    pipeline.build(pipeline.PrepConfig(images=img_dir, csv=csv_path, out=small, attrs=("age", "dx"), size=16, slices=4,
                               workers=1, split=(1, 0, 0)), log=lambda *a: None)
    with pytest.raises(SystemExit, match=r"takes 32x32 slices but the store .*s16.h5 holds 16x16.*--size 32"):
        simulate(*method, "--store", small, "--subject", "002_S_0000", "--age", "80", "--out", tmp_path / "o")
    with pytest.raises(SystemExit, match="--subject 002_S_9999 is not in"):
        simulate("--method", "identity", "--store", small, "--subject", "002_S_9999", "--age", "80", "--out", tmp_path / "o")
    with pytest.raises(SystemExit, match="truth re-renders stored synthetic slices"):
        simulate("--method", "truth", "--store", small, *common, "--source", "age=70", "--age", "80")
    with pytest.raises(SystemExit, match="meandiff is a baseline: give --store"):
        simulate("--method", "meandiff", *common, "--source", "age=70", "--age", "80")
    with pytest.raises(SystemExit):   # no target: an argparse usage error
        simulate(*method, *common, "--source", "age=70,dx=CN")
    assert "give at least one target" in capsys.readouterr().err


def test_help(script_help):
    out = script_help["simulate.py"]
    assert "--seed" in out and "--method" in out and "--native-intensity" in out
