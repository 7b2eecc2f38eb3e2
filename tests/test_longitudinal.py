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


def test_integrated_displacement_is_a_flow():
    """exp(v) by scaling and squaring: a constant field is its own flow; exp(-v) undoes exp(v) (composed, the
    displacements cancel) far better than -v undoes v; at v = 0 nothing moves."""
    zero = np.zeros((1, 32, 32, 2), "float32")
    np.testing.assert_array_equal(longitudinal.integrate(zero), zero)
    const = zero + np.array([1.5, -0.75], "float32")
    np.testing.assert_allclose(longitudinal.integrate(const), const, atol=1e-5)
    i, j = np.mgrid[:32, :32] / 31.0
    v = zero.copy()
    v[0, ..., 0], v[0, ..., 1] = 3 * np.sin(np.pi * j), 2 * np.cos(np.pi * i)     # a smooth swirl of up to 3 px
    there, back = (np.asarray(longitudinal.integrate(s * v)) for s in (1.0, -1.0))
    inner = (slice(None), slice(6, -6), slice(6, -6))                               # away from the repeated edges
    composed = back + np.asarray(longitudinal.warp(there, back))                    # the displacement of exp(v) after exp(-v)
    linear = -v + np.asarray(longitudinal.warp(v, -v))
    assert np.abs(composed[inner]).max() < 0.1 < 0.5 < np.abs(linear[inner]).max()
    assert np.abs(there - v)[inner].max() > 0.2                                     # the flow is not v itself


def _model(schema, parameterisation="displacement", perturb=True, integration="squaring"):
    m = longitudinal.Longitudinal(schema, 32, filters=4, parameterisation=parameterisation, integration=integration)
    if perturb:   # weights away from the zero output layer, so the model changes slices
        rng = np.random.default_rng(1)
        for w in m.net.weights:
            w.assign(rng.normal(0, 0.05, w.shape).astype("float32"))
    return m


def _inputs(store, idx, schema):
    x = store.images(idx)[..., None]
    src = {"age": store.attrs["age"][idx], "dx": store.attrs["dx"][idx]}
    return x, src


def _tensors(schema, x, src, tgt):
    return ops.convert_to_tensor(x), ops.convert_to_tensor(schema.encode(src)), ops.convert_to_tensor(schema.encode(tgt))


def test_no_change_without_time_outside_the_head_or_untrained(planted):
    with SliceStore(planted) as store:
        schema = store.schema.select(["age", "dx"])
        x, src = _inputs(store, np.arange(8), schema)
        older = dict(src, age=src["age"] + 1.0)
        assert np.array_equal(_model(schema, perturb=False).manipulate(x, src, older), x)
        model = _model(schema)
        y = model.manipulate(x, src, older)
        inside = np.asarray(longitudinal.foreground(x)) > 0
        assert np.abs(y - x)[inside].max() > 1e-3 and np.array_equal(y[~inside], x[~inside])
        # dt = 0 (a diagnosis change at the same age): no change, although the nuisance g is far from 0
        g = np.asarray(model.fields(*_tensors(schema, x, src, older))[2])
        assert np.abs(g)[inside].mean() > 1e-2
        np.testing.assert_array_equal(model.manipulate(x, src, dict(src, dx=(src["dx"] + 1) % 3)), x)
        assert np.abs(model.manipulate(x, src, dict(src, age=src["age"] + 2.0)) - x)[inside].mean() > \
            np.abs(y - x)[inside].mean()
        v, r, _ = _model(schema, "intensity").fields(*_tensors(schema, x, src, older))
        assert not np.any(np.asarray(v)) and np.any(np.asarray(r))


def test_rate_does_not_see_the_target_age(planted):
    """The fields are functions of the slice, the source's attributes and the target's diagnosis only: the same
    for a target 1 or 10 years away (so the change is a rate times dt), different for another target diagnosis."""
    with SliceStore(planted) as store:
        schema = store.schema.select(["age", "dx"])
        x, src = _inputs(store, np.arange(6), schema)
        model = _model(schema)
        near, far = (model.fields(*_tensors(schema, x, src, dict(src, age=src["age"] + d))) for d in (1.0, 10.0))
        for a, b in zip(near, far):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        other = model.fields(*_tensors(schema, x, src, dict(src, dx=(src["dx"] + 1) % 3)))
        assert np.abs(np.asarray(other[1]) - np.asarray(near[1])).max() > 1e-6
        older_source = model.fields(*_tensors(schema, x, dict(src, age=src["age"] + 5.0), src))
        assert np.abs(np.asarray(older_source[1]) - np.asarray(near[1])).max() > 1e-6


@pytest.mark.parametrize("parameterisation, integration", [("displacement", "squaring"), ("displacement", "linear"),
                                                            ("intensity", "squaring")])
def test_manipulate_is_the_rate_times_dt_without_the_nuisance(planted, parameterisation, integration):
    """manipulate = clip(W(x, exp(dt v) or dt v) + dt r) inside the grown foreground, computed here from the
    fields, for dt = +3 and -7 years; the training prediction of the follow-up adds g; the intensity change
    doubles with dt."""
    with SliceStore(planted) as store:
        schema = store.schema.select(["age", "dx"])
        x, src = _inputs(store, np.arange(6), schema)
        model = _model(schema, parameterisation, integration=integration)
        flow = longitudinal.integrate if integration == "squaring" else (lambda d: d)
        inside = np.asarray(longitudinal.foreground(x)) > 0
        for dt in (3.0, -7.0):
            tgt = dict(src, age=src["age"] + dt)
            v, r, g = (np.asarray(a) for a in model.fields(*_tensors(schema, x, src, tgt)))
            moved = np.asarray(longitudinal.warp(x, flow(dt * v))) if parameterisation == "displacement" else x
            expected = np.where(inside, np.clip(moved + dt * r, -1, 1), x)
            np.testing.assert_allclose(model.manipulate(x, src, tgt), expected, atol=1e-5)
            dts = ops.convert_to_tensor(np.full(len(x), dt, np.float32))
            followup = np.asarray(model.change(*_tensors(schema, x, src, tgt), dts, nuisance=True)[0])
            np.testing.assert_allclose(followup, np.where(inside, np.clip(moved + dt * r + g, -1, 1), x), atol=1e-5)
        if parameterisation == "intensity":
            one, two = (model.manipulate(x, src, dict(src, age=src["age"] + d)) - x for d in (0.5, 1.0))
            free = inside & (np.abs(x + 2 * one) < 0.99)     # not clipped
            np.testing.assert_allclose(two[free], 2 * one[free], atol=1e-5)
            assert np.abs(one[free]).mean() > 1e-3


def test_pair_loss_is_the_followup_prediction_error(planted):
    """losses_of's pair MSE is the masked MSE of clip(W + dt r + g) against the follow-up (g included)."""
    with SliceStore(planted) as store:
        schema = store.schema.select(["age", "dx"])
        model = _model(schema)
        pairs = VisitPairs(store, "train", ["age", "dx"], batch_size=8, seed=1)
        batch = pairs.batch(0)
        x, y_s, y_t, dt, target = (np.asarray(a) for a in model.split(tuple(ops.convert_to_tensor(a) for a in batch)))
        v, r, g = (np.asarray(a) for a in model.fields(*(ops.convert_to_tensor(a) for a in (x, y_s, y_t))))
        d = dt.reshape(-1, 1, 1, 1)
        m = np.asarray(longitudinal.foreground(x))
        pred = np.where(m > 0, np.clip(np.asarray(longitudinal.warp(x, longitudinal.integrate(d * v))) + d * r + g,
                                       -1, 1), x)
        pair, smooth, rate_smooth, ident = (float(a) for a in model.losses_of(tuple(ops.convert_to_tensor(a)
                                                                                     for a in batch)))
        np.testing.assert_allclose(pair, (m * (pred - target) ** 2).sum() / m.sum(), rtol=1e-4)
        np.testing.assert_allclose(ident, (m * (x - target) ** 2).sum() / m.sum(), rtol=1e-4)
        grad2 = lambda f: np.mean((f[:, 1:] - f[:, :-1]) ** 2) + np.mean((f[:, :, 1:] - f[:, :, :-1]) ** 2)
        np.testing.assert_allclose([smooth, rate_smooth], [grad2(v), grad2(r)], rtol=1e-4)
        assert rate_smooth > 0 and smooth > 0
        # one step's logged loss is the weighted sum, at the weights before the step
        model.lambda_smooth, model.lambda_rate_smooth = 2.0, 50.0
        import keras
        model.compile(keras.optimizers.SGD(0.0))
        logs = model.train_step(tuple(ops.convert_to_tensor(a) for a in batch))
        np.testing.assert_allclose(float(logs["loss"]), pair + 2.0 * smooth + 50.0 * rate_smooth, rtol=1e-4)
        np.testing.assert_allclose(float(logs["rate_smooth"]), rate_smooth, rtol=1e-4)


def test_training_learns_the_change_and_resumes_exactly(planted, tmp_path):
    """On the planted store the visits differ by a deterministic growth: a short run predicts the follow-up
    better than the unchanged source does; a run split in two with --resume equals the uninterrupted one."""
    import train_longitudinal
    common = ["--store", planted, "--attrs", "age,dx", "--tiny", "--batch-size", "8", "--steps-per-epoch", "15",
              "--lr", "3e-3", "--seed", "2"]
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train_longitudinal.main(common + ["--out", full, "--epochs", "2"])
    train_longitudinal.main(common + ["--out", split, "--epochs", "1"])
    train_longitudinal.main(common + ["--out", split, "--epochs", "2", "--resume"])
    a, b = read_checkpoint(full), read_checkpoint(split)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    model = longitudinal.from_run(full)
    with SliceStore(planted) as store:
        pairs = VisitPairs(store, "val", ["age", "dx"], batch_size=8, seed=0)
        pair, _, _, ident = (float(v) for v in model.losses_of(tuple(ops.convert_to_tensor(a) for a in pairs.batch(0))))
    assert pair < ident
    assert json.load(open(os.path.join(full, "config.json")))["method"] == "longitudinal"


def test_runs_without_the_integration_option_warp_linearly():
    """A run's config.json from before --integration has no "integration": it loads as the linear warp it was
    trained with; new runs record theirs."""
    import train_longitudinal
    from mri.data.attributes import Attribute, Schema
    schema = Schema([Attribute("age", "continuous").fit(np.linspace(60, 90, 7))])
    args = dict(size=32, tiny=True, filters=4, parameterisation="displacement", lambda_smooth=1.0, seed=0)
    assert longitudinal.from_args(args, schema).integration == "linear"
    assert longitudinal.from_args(dict(args, integration="squaring"), schema).integration == "squaring"
    parsed = vars(train_longitudinal.parse_args(["--store", "s.h5"]))
    assert parsed["integration"] == "squaring"
    with pytest.raises(ValueError, match="integration must be one of"):
        longitudinal.Longitudinal(schema, 32, filters=4, integration="euler")
