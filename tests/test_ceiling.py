"""The diagnosis ceiling: a classifier on each slice's true areas, age and position, on the planted store whose
areas follow diagnosis exactly (its counterfactual is the fake renderer of test_evaluate)."""
import numpy as np
import pytest

from mri.synthetic import ceiling
from mri.data.store import SliceStore
from test_evaluate import fake_counterfactual, write_planted_store


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import mri.synthetic
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mri.synthetic, "counterfactual", fake_counterfactual)
        yield write_planted_store(str(tmp_path_factory.mktemp("ceiling") / "planted.h5"))


def test_true_areas_follow_the_indices_in_any_order(planted):
    with SliceStore(planted) as store:
        idx = np.random.default_rng(0).permutation(len(store))[:40]   # volumes interleaved
        got = ceiling.true_areas(store, idx, batch_size=7)
        want = fake_counterfactual(store, idx)
        for s in ceiling.STRUCTURES:
            np.testing.assert_allclose(got[s], want[s])


def test_areas_that_carry_diagnosis_give_a_high_ceiling(planted):
    """On the planted store the areas are a function of age, diagnosis, position and a subject effect, so the
    classifier reads diagnosis well above chance, per slice and per volume."""
    with SliceStore(planted) as store:
        r = ceiling.dx_ceiling(store, "train", "val", n_boot=200)
        n_val = len(store.indices("val"))
        assert r["slice"]["n"] == n_val and r["volume"]["n"] == n_val // 4
        assert r["slice"]["balanced_accuracy"] >= 0.9 and r["volume"]["balanced_accuracy"] >= 0.9
        lo, hi = r["slice"]["ci"]
        assert lo <= r["slice"]["balanced_accuracy"] <= hi and r["slice"]["chance_balanced_accuracy"] == 1 / 3
        assert "dx ceiling" in ceiling.describe(r)


def test_fit_logistic_separates_classes_and_weights_them():
    """Three Gaussian classes, one rare: the class-balanced fit recalls the rare class as well as the others."""
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [400, 400, 40])
    x = np.c_[rng.normal(0, 1, (len(y), 2)) + np.array([[0, 0], [3, 0], [0, 3]])[y], np.ones(len(y))]
    pred = ceiling.log_probabilities(x, ceiling.fit_logistic(x, y, 3)).argmax(1)
    assert np.mean(pred[y == 2] == 2) >= 0.85 and np.mean(pred == y) >= 0.85


def test_a_store_without_ground_truth_is_refused(store_path):
    with SliceStore(store_path) as store, pytest.raises(ValueError, match="synthetic store.*--synthetic"):
        ceiling.dx_ceiling(store)
