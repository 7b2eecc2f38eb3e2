"""The realism statistics (mri/realism.py), the shipped reference brains and the report (tools/realism.py)."""
import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import RAS_AFFINE, brain
from mri.synthetic import realism
from mri.data import tissue
from mri.data.grids import read_png_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "reference", "real_slices.npz")


def script(folder, name):
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ring(kind, n=128, seed=0):
    """A bright disc whose outer ring (radius 36-48 px) is crossed by dark lines: 36 radial spokes, or the
    meandering zero lines of smooth isotropic noise."""
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    r, theta = np.hypot(y, x), np.arctan2(y, x)
    img = np.where(r < 50, 0.6, -1.0).astype(np.float32)
    if kind == "spokes":
        lines = np.abs((theta * 36 / (2 * np.pi) + 0.5) % 1 - 0.5) * (2 * np.pi / 36) * r < 1.0
    else:
        noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(n, n)), 3)
        lines = np.abs(noise / noise.std()) < 0.25
    img[(r > 36) & (r < 48) & lines] = -0.2
    return img[None]


def test_distance_of_a_brain_to_itself_is_zero():
    ref = realism.load_reference(SHIPPED)
    b = ref["brains"][ref["names"][1]]
    stats = realism.brain_statistics(b["slices"], b["px_mm"])
    for key in realism.STATISTICS:
        assert realism.distance(key, stats, stats) == 0, key
    for band in range(len(stats["bands"])):
        assert realism.distance(None, stats, stats, band) == 0
    rows = realism.compare([stats, stats], {"a": stats, "b": stats})
    assert all(r["synthetic_to_real"]["mean"] == 0 and r["real_to_real"] == 0 for r in rows)
    assert all(r["ratio"] == 0 and r["floor_used"] for r in rows)


def test_wasserstein_distances():
    q = realism.quantiles
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, 20000)
    assert realism.w1_quantiles(q(a), q(a + 0.3)) == pytest.approx(0.3, abs=1e-9)
    widths = np.full(9, 10.0)
    assert realism.w1_histograms(np.eye(9)[0], np.eye(9)[3], widths) == pytest.approx(30.0)
    assert realism.w1_histograms(np.ones(9), np.ones(9) * 5, widths) == 0


def test_orientation_separates_radial_spokes_from_meanders():
    out = {}
    for kind in ("spokes", "meander"):
        slab = ring(kind)
        mask = tissue.filled_foreground(slab)
        hist, out[kind] = realism.orientation(slab, mask, realism.depth_map(mask, 1.0))
        assert hist.sum() == pytest.approx(1.0)
    assert out["spokes"] < -0.8                 # gradients across radial spokes are tangential
    assert abs(out["meander"]) < 0.4            # meanders: no preferred orientation
    assert out["meander"] - out["spokes"] > 0.8


def test_symmetry_dice_is_one_for_a_mirrored_mask_and_lower_for_a_lumpy_one():
    n = 96
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    rng = np.random.default_rng(1)
    lumps = ndimage.gaussian_filter(rng.normal(size=(n, n)), 4) * 40
    lumpy = (y / 40) ** 2 + (x / 32) ** 2 < 1 + lumps
    left = lumpy.copy()
    left[:, n // 2:] = left[:, :n // 2][:, ::-1]          # the left half and its mirror image
    dice, angle = realism.mirror_dice(left[None])
    assert dice == pytest.approx(1.0) and angle == pytest.approx(0.0)
    assert realism.mirror_dice(lumpy[None])[0] < 0.95
    # a tilted ellipse is symmetric about a tilted midline, which the search finds; tilt measures the angle
    tilted = ndimage.rotate(((y / 40) ** 2 + (x / 28) ** 2 < 1).astype(np.float32), 10, reshape=False, order=1) > 0.5
    dice, angle = realism.mirror_dice(tilted[None])
    assert dice > 0.97 and abs(abs(angle) - 10) <= 1.5
    assert realism.tilt(tilted[None]) == pytest.approx(10, abs=1.0)
    assert realism.tilt(left[None]) < 1.0


def test_shipped_reference_geometry_and_licences():
    ref = realism.load_reference(SHIPPED)
    assert (ref["size"], ref["n_slices"], ref["spacing"]) == (128, 32, 2.0)
    assert len(ref["names"]) == 2
    folder = os.path.dirname(SHIPPED)
    for name, b in ref["brains"].items():
        assert b["slices"].shape == (32, 128, 128)
        assert b["slices"].min() >= -1 and b["slices"].max() <= 1 and (b["slices"] > -1).mean() > 0.2
        assert 1.0 < b["px_mm"] < 2.0
        licence = os.path.join(folder, f"LICENSE-{name}.txt")
        assert os.path.isfile(licence) and os.path.getsize(licence) > 200, licence
        assert b["source"]["file"] in open(os.path.join(folder, "README.md")).read()
    assert os.path.getsize(SHIPPED) < 5e6


def write_reference(tmp_path, store_path):
    """Two small 'real' brains cut at the tiny store's geometry by reference/make_reference.py."""
    paths = []
    for seed in (11, 12):
        p = str(tmp_path / f"real{seed}.nii.gz")
        nib.save(nib.Nifti1Image(brain(seed=seed), RAS_AFFINE), p)
        paths.append(p)
    nib.save(nib.Nifti1Image((brain(seed=11) > 700).astype(np.float32), RAS_AFFINE), str(tmp_path / "wm.nii.gz"))
    out = str(tmp_path / "ref.npz")
    script("reference", "make_reference").main(["--store", store_path, "--out", out, "--brain", f"a={paths[0]}",
                                  "--brain", f"b={paths[1]}", "--tissue", f"a:wm={tmp_path / 'wm.nii.gz'}"])
    return out


def test_report_end_to_end_on_a_tiny_store(tmp_path, store_path, capsys):
    ref = write_reference(tmp_path, store_path)
    loaded = realism.load_reference(ref)
    assert (loaded["size"], loaded["n_slices"]) == (32, 4) and "wm" in loaded["brains"]["a"]["tissue"]
    out, fig = str(tmp_path / "report"), str(tmp_path / "fig.png")
    script("tools", "realism").main(["--store", store_path, "--reference", ref, "--n-subjects", "3", "--out", out,
                           "--figure", fig])
    result = json.load(open(os.path.join(out, "realism.json")))
    assert len(result["subjects"]) == 3 and len({s["subject"] for s in result["subjects"]}) == 3
    names = {r["name"] for r in result["rows"]}
    assert set(realism.STATISTICS) <= names and "intensity_w1_band0" in names
    for r in result["rows"]:
        assert set(r["synthetic_to_each"]) == {"a", "b"} and len(r["per_subject"]) == 3
        if np.isfinite(r["ratio"]):
            denominator = max(r["real_to_real"], r["floor"])
            assert r["ratio"] == pytest.approx(r["synthetic_to_real"]["mean"] / denominator)
    report = open(os.path.join(out, "report.md")).read()
    assert "| tissue fraction GM |" in report and "real-to-real" in report
    rows, cols = read_png_size(fig)
    assert cols > rows > 32                     # 3 synthetic + 2 real columns, up to 4 distinct levels


def test_clear_errors_for_missing_or_mismatched_inputs(tmp_path, store_path):
    realism_script = script("tools", "realism")
    with pytest.raises(SystemExit, match="no such file.*make_reference"):
        realism_script.main(["--store", store_path, "--reference", str(tmp_path / "none.npz"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="cannot open store.*data_prep.py"):
        realism_script.main(["--store", str(tmp_path / "none.h5"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"real_slices.npz holds 128x128.*32x32.*make_reference.py --store"):
        realism_script.main(["--store", store_path, "--reference", SHIPPED, "--out", str(tmp_path)])


def planted(ribbon=4.0, islands=False, slits=False, n=112, radius=45.0):
    """A disc (1 mm pixels): a GM ribbon (0.3) `ribbon` mm deep at the outside, a WM core (0.8), a CSF ventricle
    (-0.5, radius 16) at the centre; optionally GM islands 20 mm deep and 8 radial CSF slits 10 mm deep."""
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    r, theta = np.hypot(y, x), np.arctan2(y, x)
    img = np.where(r < radius, 0.8, -1.0).astype(np.float32)
    img[(r < radius) & (r >= radius - ribbon)] = 0.3
    img[r < 16] = -0.5
    if islands:
        img[(np.abs(r - (radius - 20)) < 2) & (np.cos(8 * theta) > 0.5)] = 0.3
    if slits:
        img[(r < radius) & (r > radius - 10) & (np.abs(((theta * 8 / (2 * np.pi)) + 0.5) % 1 - 0.5) * r * 2 * np.pi / 8
                                                 < 1.0)] = -0.5
    return np.repeat(img[None], 2, axis=0)


def planted_stats(slab):
    mask = tissue.filled_foreground(slab)
    depth = realism.depth_map(mask, 1.0)
    levels, _ = realism.tissue_classes(slab[mask])
    return mask, depth, levels


def test_gm_by_depth_finds_the_planted_ribbon_and_the_marbling():
    slab = planted()
    mask, depth, levels = planted_stats(slab)
    profile, counts = realism.gm_by_depth(slab, mask, depth, levels)
    edges = np.asarray(realism.DEPTH_EDGES_MM)
    ribbon = (slab == 0.3) & mask
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):  # the share of ribbon pixels in each bin, computed
        sel = mask & (depth > lo) & (depth <= hi) if lo > 0 else mask & (depth <= hi)
        assert counts[i] == sel.sum()
        if sel.any():
            assert profile[i] == pytest.approx(ribbon[sel].mean())
    assert profile[0] == 1.0 and profile[3] == 0.0      # 0-2 mm all ribbon; 6-8 mm all core
    assert realism._share(profile, counts, 15, 30) == 0.0
    marbled = planted(islands=True)
    m2, d2, l2 = planted_stats(marbled)
    p2, c2 = realism.gm_by_depth(marbled, m2, d2, l2)
    sel = m2 & (d2 > 15) & (d2 <= 30)
    assert realism._share(p2, c2, 15, 30) == pytest.approx((marbled[sel] == 0.3).mean()) and (marbled[sel] == 0.3).mean() > 0.05


def test_normal_rays_measure_the_ribbon_and_the_planted_sulci():
    for ribbon in (3.0, 5.0):
        slab = planted(ribbon)
        mask, depth, levels = planted_stats(slab)
        wm, crossed = realism.normal_rays(slab, mask, depth, 1.0, levels)
        assert wm.size > 200 and np.median(wm) == pytest.approx(ribbon, abs=1.0)  # inward: the core at `ribbon` mm
        assert not crossed.any()
    slab = planted(3.0, slits=True)
    mask, depth, levels = planted_stats(slab)
    wm, crossed = realism.normal_rays(slab, mask, depth, 1.0, levels)
    assert 0.02 < crossed.mean() < 0.2                   # the rays that start in one of 8 slits ~2 px wide
    assert np.percentile(wm, 99) >= 9.0                  # a ray down a slit meets WM at its bottom, 10 mm in
    stats = realism.brain_statistics(slab, 1.0, n_bands=1)
    assert stats["csf_crossing"] == pytest.approx(crossed.mean())


def test_outline_roughness_is_zero_for_an_oval_and_the_lumps_rms_otherwise():
    n = 128
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    r, theta = np.hypot(y, x), np.arctan2(y, x)
    oval = np.hypot(y / 1.2, x) < 40
    assert realism.outline_roughness(oval[None], 1.0) < 0.3
    lumpy = r < 40 + 2.0 * np.cos(16 * theta)          # RMS of a cosine of amplitude 2: sqrt(2) (pixels)
    assert realism.outline_roughness(lumpy[None], 1.5) == pytest.approx(1.5 * np.sqrt(2), rel=0.15)


def test_verdict_against_the_real_range():
    # a scalar inside the range is inside, whatever the ratio; outside, its offset is to the nearer real brain
    assert realism.verdict("scalar", [0.5, 0.7], [0.4, 0.8], None, 0.4, 0.01) == ("inside", 0.0, 1.0)
    assert realism.verdict("scalar", [0.9, 0.9], [0.4, 0.8], None, 0.4, 0.01) == ("near", pytest.approx(0.25), 0.0)
    assert realism.verdict("scalar", [0.2, 0.0], [0.4, 0.8], None, 0.1, 0.01) == ("out", pytest.approx(3.0), 0.0)
    assert realism.verdict("scalar", [0.2, 0.0], [0.4, 0.8], None, 0.0, 0.05)[1] == pytest.approx(6.0)  # the floor
    assert realism.verdict("dist", None, None, [0.1, 0.3], 0.25, 0.01)[:2] == ("near", pytest.approx(0.8))
    assert realism.verdict("dist", None, None, [0.4, 0.3], 0.25, 0.01)[0] == "out"
    # compare: the 'synthetic' brain is one of the real ones: every scalar inside, every distribution near (0)
    ref = realism.load_reference(SHIPPED)
    a, b = (realism.brain_statistics(ref["brains"][n]["slices"], ref["brains"][n]["px_mm"]) for n in ref["names"])
    rows = realism.compare([a], {"a": a, "b": b})
    assert all(r["verdict"] == ("inside" if r["values"] else "near") and r["offset"] == 0 for r in rows)
    shifted = dict(a, gm_inner=max(a["gm_inner"], b["gm_inner"]) + 3 * abs(a["gm_inner"] - b["gm_inner"]))
    row = next(r for r in realism.compare([shifted], {"a": a, "b": b}) if r["name"] == "gm_inner")
    assert row["verdict"] == "out" and row["offset"] == pytest.approx(3.0) and row["ratio"] > 1.5


def test_area_profile_finds_the_widest_slice_and_follows_a_shifted_slab():
    """A stack of discs whose radius peaks at slice 8 of 21: the profile is 1 there and the widest slice is at
    8 / 20; the same brain cut 4 slices higher has its widest slice 4 slices lower, and the profiles differ."""
    n, size = 21, 64
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = 25 - 1.5 * np.abs(np.arange(-8, 17) - 0)           # 25 slices of a brain, widest at index 8
    brain3d = np.stack([np.hypot(yy, xx) < r for r in radius])
    low, high = brain3d[:n], brain3d[4:4 + n]
    profile, widest = realism.area_profile(low)
    assert profile[8] == 1.0 and widest == pytest.approx(8 / (n - 1))
    assert realism.area_profile(high)[1] == pytest.approx(4 / (n - 1))
    a, b = ({"area_profile": realism.area_profile(m)[0]} for m in (low, high))
    assert realism.distance("area_profile", a, a) == 0 and realism.distance("area_profile", a, b) > 0.05
