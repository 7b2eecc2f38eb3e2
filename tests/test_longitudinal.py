"""The longitudinal change model: visit pairs, the warp, the change's invariants, learning from pairs, resume."""
import json
import os

import numpy as np
import pytest
from keras import ops

from models import longitudinal
from mri.data.loader import VisitPairs
from mri.data.store import SliceStore
from conftest import read_checkpoint
from test_evaluate import write_planted_store


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Subjects with three visits 2 years apart whose ventricle grows and hippocampus shrinks with age."""
    return write_planted_store(str(tmp_path_factory.mktemp("longitudinal") / "planted.h5"))


def test_visit_pairs_join_two_visits_of_one_subject_at_one_position(planted):
    with SliceStore(planted) as store:
        pairs = VisitPairs(store, "train", ["age", "dx"], batch_size=8, seed=3)
        s, t = pairs.pairs.T
        assert np.all(store.subject[s] == store.subject[t]) and np.all(store.slice[s] == store.slice[t])
        assert np.all(store.visit[s] != store.visit[t]) and np.all(store.split[s] == 0)
        n_train_subjects = len(set(store.subject[store.indices("train")]))
        assert len(pairs.pairs) == n_train_subjects * 4 * 3 * 2      # 4 positions, 3 visits: 6 ordered pairs
        x, cond = pairs.batch(5)
        w = pairs.schema.width
        assert x.shape == (8, store.size, store.size, 2) and cond.shape == (8, 2 * w + 1)
        order = np.random.default_rng([3, 5 // pairs.steps_per_epoch]).permutation(len(pairs.pairs))
        k = 5 % pairs.steps_per_epoch
        s, t = pairs.pairs[order[k * 8:(k + 1) * 8]].T
        np.testing.assert_array_equal(x[..., 0], store.images(s))
        np.testing.assert_array_equal(x[..., 1], store.images(t))
        np.testing.assert_allclose(cond[:, -1], store.attrs["age"][t] - store.attrs["age"][s])
        np.testing.assert_allclose(cond[:, w:2 * w], store.encoded(t, pairs.schema))
        np.testing.assert_array_equal(pairs.batch(5)[0], x)


def test_warp_moves_by_the_displacement():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype("float32")
    zero = np.zeros((2, 8, 8, 2), "float32")
    np.testing.assert_allclose(longitudinal.warp(x, zero), x, atol=1e-6)
    down = zero.copy()
    down[..., 0] = 1.0      # sample one row below: the image moves up by one row
    np.testing.assert_allclose(np.asarray(longitudinal.warp(x, down))[:, :-1], x[:, 1:], atol=1e-6)
    half = zero.copy()
    half[..., 1] = 0.5
    np.testing.assert_allclose(np.asarray(longitudinal.warp(x, half))[:, :, :-1], (x[:, :, :-1] + x[:, :, 1:]) / 2, atol=1e-5)


def _model(schema, parameterisation="displacement", perturb=True):
    m = longitudinal.Longitudinal(schema, 32, filters=4, parameterisation=parameterisation)
    if perturb:   # weights away from the zero output layer, so the model changes slices
        rng = np.random.default_rng(1)
        for w in m.net.weights:
            w.assign(rng.normal(0, 0.05, w.shape).astype("float32"))
    return m


def test_no_change_without_time_outside_the_head_or_untrained(planted):
    with SliceStore(planted) as store:
        schema = store.schema.select(["age", "dx"])
        idx = np.arange(8)
        x = store.images(idx)[..., None]
        src = {"age": store.attrs["age"][idx], "dx": store.attrs["dx"][idx]}
        older = dict(src, age=src["age"] + 1.0)
        assert np.array_equal(_model(schema, perturb=False).manipulate(x, src, older), x)
        model = _model(schema)
        y = model.manipulate(x, src, older)
        inside = np.asarray(longitudinal.foreground(x)) > 0
        assert np.abs(y - x)[inside].max() > 1e-3 and np.array_equal(y[~inside], x[~inside])
        np.testing.assert_array_equal(model.manipulate(x, src, dict(src, dx=(src["dx"] + 1) % 3)), x)
        assert np.abs(model.manipulate(x, src, dict(src, age=src["age"] + 2.0)) - x)[inside].mean() > \
            np.abs(y - x)[inside].mean()
        v, r = _model(schema, "intensity").fields(ops.convert_to_tensor(x), *(ops.convert_to_tensor(schema.encode(a)) for a in (src, older)))
        assert not np.any(np.asarray(v)) and np.any(np.asarray(r))


def test_training_learns_the_change_and_resumes_exactly(planted, tmp_path):
    """On the planted store the visits differ by a deterministic growth: a short run predicts the follow-up
    better than the unchanged source does; a run split in two with --resume equals the uninterrupted one."""
    import train_longitudinal
    common = ["--store", planted, "--attrs", "age,dx", "--tiny", "--batch-size", "8", "--steps-per-epoch", "15",
              "--lr", "3e-3", "--seed", "2"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_longitudinal.main(common + ["--out", full, "--epochs", "4"])
    train_longitudinal.main(common + ["--out", split, "--epochs", "2"])
    train_longitudinal.main(common + ["--out", split, "--epochs", "4", "--resume"])
    a, b = read_checkpoint(full), read_checkpoint(split)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    model = longitudinal.from_run(full)
    with SliceStore(planted) as store:
        pairs = VisitPairs(store, "val", ["age", "dx"], batch_size=8, seed=0)
        pair, _, ident = (float(v) for v in model.losses_of(tuple(ops.convert_to_tensor(a) for a in pairs.batch(0))))
    assert pair < ident
    assert json.load(open(os.path.join(full, "config.json")))["method"] == "longitudinal"
