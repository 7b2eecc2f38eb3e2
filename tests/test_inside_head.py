"""Changes stay inside the head (models.head, keep_background, InsideHead): the background beyond the source's
head, grown by HEAD_GROW pixels, is the source's in every method's output that evaluate.py and simulate.py use."""
import numpy as np
import pytest
from scipy import ndimage

import evaluate
from models import HEAD_GROW, InsideHead, head, inside_head, keep_background
from models.baselines import Identity, MeanDiff, Truth

S = 32


def disc_with_hole(radius=8, centre=(16, 16)):
    """A bright disc on the -1 background with a background-dark hole at its centre (a ventricle below the threshold)."""
    i, j = np.mgrid[:S, :S]
    r = np.hypot(i - centre[0], j - centre[1])
    x = np.where(r <= radius, 0.5, -1.0)
    x[r <= 2] = -1.0
    return x.astype(np.float32), r


def test_head_is_the_filled_foreground_grown_within_each_slice():
    x, r = disc_with_hole()
    x2 = np.full_like(x, -1.0)                                   # an empty slice after the disc
    inside = head(np.stack([x, x2])[..., None])
    assert inside.shape == (2, S, S, 1) and inside.dtype == bool
    grown = ndimage.binary_dilation(r <= 8, iterations=HEAD_GROW)  # the disc, its hole filled, grown by a cross
    np.testing.assert_array_equal(inside[0, ..., 0], grown)
    assert inside[0, 16, 16, 0] and not inside[1].any()          # hole filled; nothing leaks into the next slice
    assert not head(x[None, ..., None], grow=0)[0, 16 - 8 - 1, 16, 0] and head(x[None, ..., None], grow=0)[0, 8, 16, 0]


def test_head_reads_any_channel():
    x, _ = disc_with_hole()
    rgb = np.full((1, S, S, 3), -1.0, np.float32)
    rgb[0, ..., 2] = x                                           # the head only in the blue channel
    np.testing.assert_array_equal(head(rgb), head(x[None, ..., None]))


def test_keep_background_keeps_the_source_outside_the_grown_head_only():
    x, r = disc_with_hole()
    x = x[None, ..., None]
    y = keep_background(x, x + 0.25)
    inside = head(x)
    np.testing.assert_array_equal(y[inside], (x + 0.25)[inside])
    np.testing.assert_array_equal(y[~inside], x[~inside])
    assert (~inside).sum() > 0.5 * S * S and inside.sum() > np.pi * 8 ** 2


class Brighter:
    """A method that brightens every pixel and declares what it makes."""
    by_construction = ("reconstruction_mse",)

    def manipulate(self, images, source, target):
        return np.asarray(images) + 0.25

    def supports(self, source, target):
        return np.asarray(source["age"]) < 80


def test_inside_head_wraps_methods_but_not_truth_or_identity():
    x, _ = disc_with_hole()
    x = x[None, ..., None]
    wrapped = inside_head(Brighter())
    assert isinstance(wrapped, InsideHead) and inside_head(wrapped) is wrapped
    np.testing.assert_array_equal(wrapped.manipulate(x, {}, {}), keep_background(x, x + 0.25))
    assert wrapped.by_construction == ("reconstruction_mse",)                     # the method's own attributes
    assert wrapped.supports({"age": np.array([70, 85])}, {}).tolist() == [True, False]
    identity, truth = Identity(), Truth.__new__(Truth)
    assert inside_head(identity) is identity and inside_head(truth) is truth
    assert isinstance(inside_head(MeanDiff.__new__(MeanDiff)), InsideHead)             # meandiff is kept inside too


class FakeStore:
    def __init__(self, preset):
        self.provenance = {"preset": preset, "arguments": {}}


@pytest.mark.parametrize("preset, kept", [("adni", HEAD_GROW), ("synthetic", HEAD_GROW), ("celeba", None),
                                          ("image-folder", None)])
def test_evaluate_keeps_the_background_of_volume_slices_not_of_photographs(preset, kept):
    methods = evaluate.inside_head({"b": Brighter(), "identity": Identity()}, FakeStore(preset))
    assert evaluate.background_kept(FakeStore(preset)) == kept
    assert isinstance(methods["b"], InsideHead) == (kept is not None) and isinstance(methods["identity"], Identity)
