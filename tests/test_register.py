"""Rigid registration of follow-ups (mri/register.py) and data_prep cutting every visit with the first visit's plan."""
import os

import nibabel as nib
import numpy as np
import pytest

from mri import synthetic
from mri.data import register

SEED = 4242


@pytest.fixture(scope="module")
def phantom():
    vol, _ = synthetic.render(SEED, 72.0, -np.inf, 7)
    return vol, synthetic.affine()


def displacement_error(estimate, truth, volume, affine):
    """(max displacement in mm over the foreground, rotation error in degrees) of estimate against truth."""
    fg = np.argwhere(volume > 0.05 * volume.max()).T
    x = affine[:3, :3] @ fg + affine[:3, 3:4]
    d = (estimate[:3, :3] @ x + estimate[:3, 3:4]) - (truth[:3, :3] @ x + truth[:3, 3:4])
    rel = np.linalg.inv(truth) @ estimate
    angle = np.degrees(np.arccos(np.clip((np.trace(rel[:3, :3]) - 1) / 2, -1, 1)))
    return float(np.linalg.norm(d, axis=0).max()), float(angle)


def noisy(volume, seed):
    rng = np.random.default_rng(seed)
    return np.sqrt((volume + rng.normal(0, 0.025, volume.shape)) ** 2 + rng.normal(0, 0.025, volume.shape) ** 2)


@pytest.mark.parametrize("degrees, shift", [((4.0, -3.0, 5.0), (4.0, -5.0, 3.0)), ((-2.0, 5.0, -1.0), (-3.0, 2.0, 6.0))])
def test_a_known_rigid_motion_is_recovered(phantom, degrees, shift):
    vol, affine = phantom
    truth = register.matrix(np.r_[np.radians(degrees), shift], np.array([3.0, -10.0, 5.0]))
    moved = noisy(register.move(vol, affine, truth), 1)
    estimate, ncc = register.register(noisy(vol, 2), affine, moved, affine)
    mm, angle = displacement_error(estimate, truth, vol, affine)
    assert mm <= 0.5 and angle <= 0.5 and ncc > 0.9
    unregistered, _ = displacement_error(np.eye(4), truth, vol, affine)
    assert unregistered > 5.0


def test_motion_between_grids_of_different_orientation(phantom):
    """The follow-up stored on another grid (axes flipped and shifted origin): the transform is in world mm."""
    vol, affine = phantom
    truth = register.matrix(np.r_[np.radians([0.0, 3.0, -4.0]), [2.0, 3.0, -4.0]], np.zeros(3))
    moved = register.move(vol, affine, truth)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = vol.shape[0] - 1
    estimate, _ = register.register(vol, affine, moved[::-1].copy(), affine @ flip)
    assert displacement_error(estimate, truth, vol, affine)[0] <= 0.5


def test_rotation_is_orthonormal_and_its_derivatives_match():
    a = np.radians([3.0, -7.0, 11.0])
    r, derivs = register.rotation(a)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(r), 1.0)
    for k in range(3):   # derivatives against central differences
        e = np.eye(3)[k] * 1e-6
        np.testing.assert_allclose(derivs[k], (register.rotation(a + e)[0] - register.rotation(a - e)[0]) / 2e-6, atol=1e-8)


def _two_visit_cohort(folder, truth):
    """One synthetic subject, two visits; the follow-up's volume moved by `truth` on disk."""
    csv_path = synthetic.write_cohort(1, folder, seed=3, visits=("bl", "m12"))
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".nii.gz"))
    rows = synthetic.make_cohort(1, seed=3, visits=("bl", "m12"))
    follow = [f for f in files if f"I{rows[1]['IMAGEUID']}." in f][0]
    img = nib.load(follow)
    moved = register.move(np.asarray(img.dataobj, np.float32), img.affine, truth)
    nib.save(nib.Nifti1Image(np.round(moved / synthetic.STORAGE_SLOPE).astype(np.int16), img.affine,
                             header=img.header), follow)
    return csv_path


@pytest.mark.slow   # end to end: renders a cohort, data_prep registers and cuts it twice (7 CPU s)
def test_data_prep_cuts_every_visit_with_the_first_visits_plan(tmp_path):
    from mri.data import pipeline
    from mri.data.store import SliceStore
    truth = register.matrix(np.r_[np.radians([3.0, -2.0, 4.0]), [3.0, -4.0, 2.0]], np.zeros(3))
    csv_path = _two_visit_cohort(str(tmp_path / "vols"), truth)
    mse = {}
    for registered in (True, False):
        out = str(tmp_path / f"s{registered}.h5")
        pipeline.build(pipeline.PrepConfig(images=str(tmp_path / "vols"), csv=csv_path, out=out, attrs=("age",), size=64,
                                   slices=8, spacing=6.0, workers=1, split=(1.0, 0.0, 0.0), register=registered),
                   log=lambda *a: None)
        with SliceStore(out) as store:
            bl, fu = (np.flatnonzero(store.visit == v) for v in ("bl", "m12"))
            plan_bl, plan_fu = store.plan(store.volume[bl[0]]), store.plan(store.volume[fu[0]])
            x, y = store.images(bl), store.images(fu)
            brain = (x > -0.9) | (y > -0.9)
            mse[registered] = float(np.mean((x - y)[brain] ** 2))
            if registered:
                assert plan_fu["centre"] == plan_bl["centre"] and plan_fu["z_mm"] == plan_bl["z_mm"]
                assert "rigid" not in plan_bl and plan_fu["registered_to"].endswith(".nii.gz")
                vol, _ = synthetic.render(1, 70.0, -np.inf, 1)
                mm, angle = displacement_error(np.asarray(plan_fu["rigid"]), truth, vol, synthetic.affine())
                assert mm <= 0.5 and angle <= 0.5
            else:
                assert "rigid" not in plan_fu
    assert mse[True] < 0.25 * mse[False]


@pytest.mark.slow   # end to end: renders, registers and re-renders a cohort (10 CPU s)
def test_synthetic_visits_align_and_differ_by_the_true_change(tmp_path):
    """The synthetic cohort's visits share a pose: registration finds the identity, and a follow-up's slices
    minus the first visit's follow the true change (the first visit re-rendered at the follow-up's age and
    diagnosis, same noise) far better than the same difference one pixel off."""
    from scipy import ndimage
    from mri.data import pipeline
    from mri.data.store import SliceStore
    cfg = pipeline.PrepConfig(images="", csv="", out=str(tmp_path / "s.h5"), size=64, slices=8, spacing=6.0, workers=1,
                          split=(1.0, 0.0, 0.0))
    pipeline.build(pipeline.synthetic_config(cfg, 2, str(tmp_path / "vols"), visits=("bl", "m72")), log=lambda *a: None)
    with SliceStore(cfg.out) as store:
        for subject in np.unique(store.subject):
            bl, fu = (np.flatnonzero((store.subject == subject) & (store.visit == v)) for v in ("bl", "m72"))
            rigid = np.asarray(store.plan(store.volume[fu[0]])["rigid"])
            vol, _ = synthetic.render(1, 70.0, -np.inf, 1)
            assert displacement_error(rigid, np.eye(4), vol, synthetic.affine())[0] <= 0.5
            x, y = store.images(bl), store.images(fu)
            true = synthetic.counterfactual(store, bl, age=store.attrs["age"][fu], dx=store.attrs["dx"][fu])["images"] - x
            brain = x > -0.9

            def corr(diff):
                return np.corrcoef(ndimage.gaussian_filter(diff, (0, 1, 1))[brain], true[brain])[0, 1]
            assert corr(y - x) > 0.6 and corr(np.roll(y, 1, axis=2) - x) < 0.5 * corr(y - x)
