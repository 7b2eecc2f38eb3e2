"""DFI: the Mahalanobis neighbours, the TV gradient, alpha = 0 and a toy where alpha grows a disc, the run
directory through train_dfi.main and evaluate's loader, and the clear errors."""
import os

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from mri.data.attributes import Attribute, Schema


def test_mahalanobis_neighbours_equal_brute_force():
    from models.dfi import Neighbours
    rng = np.random.default_rng(0)
    schema = Schema([Attribute("age", "continuous").fit(rng.uniform(55, 90, 50)),
                     Attribute("dx", "categorical", ["CN", "MCI", "AD"]).fit(np.arange(50) % 3)])
    n = 400
    raw = {"age": np.round(rng.uniform(55, 90, n)), "dx": rng.integers(0, 3, n)}   # rounded ages: ties
    codes = schema.encode(raw).astype(np.float64)
    position, subject = rng.integers(0, 8, n), rng.integers(0, 40, n).astype(str)
    nb = Neighbours(codes, position, subject, window=1)
    q_raw = {"age": rng.uniform(55, 90, 12), "dx": rng.integers(0, 3, 12)}
    q, q_pos, q_sub = schema.encode(q_raw).astype(np.float64), rng.integers(0, 8, 12), rng.integers(0, 40, 12).astype(str)
    got = nb.query(q, q_pos, q_sub, k=7)
    vi = np.linalg.pinv(np.cov(codes, rowvar=False))    # one-hot columns make the covariance singular
    dist = cdist(q, codes, "mahalanobis", VI=vi)
    for i in range(len(q)):
        allowed = (np.abs(position - q_pos[i]) <= 1) & (subject != q_sub[i])
        d = np.where(allowed, dist[i], np.inf)
        order = sorted(range(n), key=lambda j: (round(d[j], 9), j))[:7]
        assert list(got[i]) == order
    with pytest.raises(ValueError, match="lower --k"):
        nb.query(q[:1], q_pos[:1], q_sub[:1], k=n)


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_tv_gradient_matches_finite_differences(beta):
    import tensorflow as tf
    from models.dfi import total_variation
    rng = np.random.default_rng(1)
    z0 = rng.uniform(-1, 1, (2, 6, 6, 1))
    z = tf.constant(z0)
    with tf.GradientTape() as tape:
        tape.watch(z)
        tv = tf.reduce_sum(total_variation(z, beta))
    grad = tape.gradient(tv, z).numpy()
    h, numeric = 1e-6, np.zeros_like(grad)
    for i in np.ndindex(z0.shape):
        e = np.zeros(z0.shape)
        e[i] = h
        numeric[i] = (np.sum(total_variation(z0 + e, beta)) - np.sum(total_variation(z0 - e, beta))) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)
    flat = np.full((1, 6, 6, 1), 0.3)
    assert float(np.sum(total_variation(tf.constant(flat), beta))) < 1e-5 * 25   # a flat image has (almost) none


def test_lbfgs_solves_each_row_alone_within_the_box():
    """Box-constrained quadratics 1/2 (x - c)^T A_r (x - c), optima partly on the bounds: every row reaches scipy's
    L-BFGS-B optimum, a row started at its optimum stays there untouched, and each row's iterates are those it
    has alone (its own history and steps)."""
    from scipy.optimize import Bounds, minimize as scipy_minimize
    from models import lbfgs
    rng = np.random.default_rng(3)
    b, n = 4, 12
    q = np.linalg.qr(rng.normal(size=(b, n, n)))[0]
    A = np.einsum("bij,bj,bkj->bik", q, np.geomspace(1, 50, n)[None].repeat(b, 0), q)
    c = rng.uniform(-1.6, 1.6, (b, n))
    c[0] = np.clip(c[0], -0.9, 0.9)                          # row 0 starts at its (interior) optimum
    x0 = np.where(np.arange(b)[:, None] == 0, c, rng.uniform(-1, 1, (b, n))).astype(np.float32)

    def fun(x, rows):
        r = np.asarray(x, np.float64) - c[rows]
        grad = np.einsum("bij,bj->bi", A[rows], r)
        return 0.5 * np.einsum("bi,bi->b", r, grad), grad.astype(np.float32)

    x, info = lbfgs.minimize(fun, x0, -1.0, 1.0, 200, gtol=1e-6)
    for i in range(1, b):
        want = scipy_minimize(lambda v: (lambda f, g: (float(f[0]), g[0].astype(np.float64)))(*fun(v[None], [i])),
                              x0[i].astype(np.float64), jac=True, method="L-BFGS-B", bounds=Bounds(-1, 1),
                              options=dict(ftol=0, gtol=1e-10, maxiter=1000)).x
        np.testing.assert_allclose(x[i], want, atol=1e-4)
        assert np.any(np.abs(want) == 1)                      # bounds are active
        alone, _ = lbfgs.minimize(lambda z, rows: fun(z, np.full(len(rows), i)), x0[i:i + 1], -1.0, 1.0, 200, gtol=1e-6)
        np.testing.assert_array_equal(alone[0], x[i])
    np.testing.assert_array_equal(x[0], x0[0])
    assert info["iterations"][0] == 0 and info["iterations"][1:].min() > 0 and info["evaluations"][0] == 1


def discs(ages, size=32):
    """Bright discs of radius 4 + 8 age on a dark background, with a little texture."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(yy, xx)[None]
    radius = (4 + 8 * np.asarray(ages))[:, None, None]
    img = np.clip(radius - r + 0.5, 0, 1) * 1.6 - 0.8           # anti-aliased edge, -0.8 outside, 0.8 inside
    return img[..., None].astype(np.float32)


class ToyStore:
    """What DFI.fit and manipulate read of a slice store, over in-memory toy images (one position)."""

    def __init__(self, images, ages, schema):
        self.size, self._images, self.schema = images.shape[1], images[..., 0], schema
        self.attrs = {"age": ages}
        self.slice, self.subject = np.zeros(len(ages), np.int16), np.array([f"s{i}" for i in range(len(ages))])

    def indices(self, split):
        return np.arange(len(self._images))

    channels = 1

    def images(self, idx):
        return self._images[idx]

    def pixels(self, idx):
        return self._images[idx][..., None]

    def raw(self, idx):
        return {"age": self.attrs["age"][idx]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny VGG-style net regressing "age" from discs, its three-level feature model, and a fitted DFI."""
    import keras
    from keras import layers
    from models import dfi
    keras.utils.set_random_seed(0)
    ages = np.random.default_rng(0).uniform(0, 1, 384)
    x = discs(ages)
    inp = keras.Input((32, 32, 1))
    h, levels = inp, []
    for f in (8, 16, 16, 16):
        h = layers.Conv2D(f, 3, padding="same", activation="relu")(h)
        levels.append(h)
        h = layers.MaxPooling2D()(h)
    reg = keras.Model(inp, layers.Dense(1)(layers.GlobalAveragePooling2D()(h)))
    reg.compile(keras.optimizers.Adam(3e-3), "mse")
    reg.fit(x, ages - 0.5, batch_size=32, epochs=4, verbose=0)
    net = keras.Model(inp, levels[1:])
    schema = Schema([Attribute("age", "continuous").fit(ages)])
    store = ToyStore(x, ages, schema)
    path = str(tmp_path_factory.mktemp("dfi_toy") / dfi.FEATURES_FILE)
    dfi.DFI.fit(store, net, ["age"], path, log=lambda *a: None)
    import h5py
    return store, net, h5py.File(path, "r")


def test_alpha_zero_returns_the_input(toy):
    from models import dfi
    store, net, cache = toy
    x, ages = discs([0.3, 0.5]), np.array([0.3, 0.5])
    for tv in (0.0, 1e-5):
        method = dfi.DFI(store.schema, net, cache, k=20, alpha=0.0, tv_weight=tv, iterations=60)
        out = method.manipulate(x, {"age": ages, "slice": [0, 0]}, {"age": ages + 0.4})
        assert np.mean((out - x) ** 2) < 1e-4, tv


def test_tv_weight_smooths_and_is_read_at_each_call(toy):
    from models.dfi import Reconstructor, total_variation
    _, net, _ = toy
    x = discs([0.5]) + np.random.default_rng(2).normal(0, 0.05, (1, 32, 32, 1)).astype(np.float32)
    rec = Reconstructor(net, tv_weight=0.0, iterations=30)
    phi = rec.features(x)
    np.testing.assert_array_equal(rec(x, phi), x)           # alpha = 0, no prior: already optimal
    rec.tv_weight = 10.0                                     # the compiled objective must see the new weight
    z = rec(x, phi)
    assert float(np.sum(total_variation(z, 2.0))) < 0.8 * float(np.sum(total_variation(x, 2.0)))


def test_increasing_alpha_grows_the_disc(toy):
    from models import dfi
    store, net, cache = toy
    x, src, tgt = discs([0.3]), {"age": np.array([0.3]), "slice": [0]}, {"age": np.array([0.8])}
    areas = []
    for alpha in (0.0, 1.0, 2.0):
        method = dfi.DFI(store.schema, net, cache, k=20, alpha=alpha, tv_weight=1e-3, iterations=60)
        areas.append(float(np.sum(method.manipulate(x, src, tgt) > 0)))
    assert areas[0] < areas[1] < areas[2], areas
    true_growth = np.sum(discs([0.8]) > 0) - np.sum(x > 0)
    assert areas[2] - areas[0] > 0.2 * true_growth, (areas, true_growth)


def test_residual_mode_returns_the_input_where_nothing_changes(toy):
    from models import dfi
    store, net, cache = toy
    x, ages = discs([0.2, 0.6]), np.array([0.2, 0.6])
    method = dfi.DFI(store.schema, net, cache, k=20, alpha=1.0, mode="residual", iterations=20)
    src = {"age": ages, "slice": [0, 0]}
    np.testing.assert_array_equal(method.manipulate(x, src, src), x)
    moved = method.manipulate(x, src, {"age": np.array([0.2, 0.9])})
    np.testing.assert_array_equal(moved[0], x[0])
    assert np.abs(moved[1] - x[1]).max() > 0.05
    with pytest.raises(ValueError, match="position"):
        method.manipulate(x, {"age": ages}, {"age": ages + 0.1})


def test_a_slice_is_reconstructed_alike_alone_and_in_a_batch(toy):
    """Each slice is its own optimisation: in a batch of 16 where half the slices are already optimal (their
    target is their own features) and stop at once, a moving slice gets what it gets alone, and the others x."""
    from models.dfi import Reconstructor
    _, net, _ = toy
    ages = np.linspace(0.1, 0.6, 16)
    x = discs(ages)
    rec = Reconstructor(net, iterations=15)
    target = np.where((np.arange(16) % 2 == 0)[:, None], rec.features(discs(ages + 0.3)), rec.features(x))
    batch = rec(x, target)
    np.testing.assert_array_equal(batch[1::2], x[1::2])
    for i in (0, 6):
        alone = rec(x[i:i + 1], target[i:i + 1])
        assert np.abs(alone - x[i]).max() > 0.1                 # it moves
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5)


def test_residual_adds_the_change_between_the_two_reconstructions(toy):
    """residual = clip(x + z*(alpha) - z*(0)), with a TV prior so that z*(0) is not x: each reconstruction as the
    decode mode and the Reconstructor give it for the slice alone."""
    from models import dfi
    store, net, cache = toy
    x, ages = discs([0.3, 0.5]), np.array([0.3, 0.5])
    src, tgt = {"age": ages, "slice": [0, 0]}, {"age": ages + 0.3}
    settings = dict(k=20, alpha=2.0, tv_weight=1e-3, iterations=10)
    decode = dfi.DFI(store.schema, net, cache, mode="decode", **settings)
    z_alpha = decode.manipulate(x, src, tgt)
    z_zero = np.concatenate([decode.reconstruct(x[i:i + 1], decode.reconstruct.features(x[i:i + 1])) for i in range(2)])
    assert np.abs(z_zero - x).max() > 0.05                      # the prior moves the slice
    residual = dfi.DFI(store.schema, net, cache, mode="residual", **settings)
    residual.reconstruct = decode.reconstruct                   # its compiled objective: one trace
    np.testing.assert_allclose(residual.manipulate(x, src, tgt), np.clip(x + z_alpha - z_zero, -1, 1), atol=1e-5)


@pytest.fixture(scope="module")
def features_run(store_path, tmp_path_factory):
    """A small (non-tiny: DFI needs three pooling levels) train_oracle.py run on the tiny store."""
    import train_oracle
    out = str(tmp_path_factory.mktemp("dfi_features") / "feat")
    train_oracle.main(["--store", store_path, "--attrs", "age,dx", "--out", out, "--epochs", "1",
                       "--steps-per-epoch", "2", "--batch-size", "8", "--seed", "5", "--calibration-batches", "2"])
    return out


@pytest.mark.slow   # end to end: train_oracle.py, train_dfi.py, evaluate's loader (34 CPU s)
def test_run_directory_loads_through_evaluate(store_path, features_run, tmp_path, capsys):
    import train_dfi
    from models import check_independent, load_method
    from models.dfi import FEATURES_FILE
    from mri.data.io import read_json
    from mri.data.store import SliceStore
    out = str(tmp_path / "dfi")
    train_dfi.main(["--store", store_path, "--attrs", "age,dx", "--features", features_run, "--out", out,
                    "--k", "5", "--iterations", "5", "--seed", "2"])
    config = read_json(os.path.join(out, "config.json"))
    assert config["method"] == "dfi" and config["args"]["features"] == features_run
    store = SliceStore(store_path)
    import h5py
    with h5py.File(os.path.join(out, FEATURES_FILE), "r") as f:
        assert f["features"].shape[0] == len(store.indices("train")) == len(f["codes"])
    idx = store.indices("test")[:3]
    x = store.images(idx)[..., None]
    src = dict(store.raw(idx), slice=store.slice[idx])
    tgt = dict(src, age=src["age"] + 10)
    for spec in (out, out + "@residual"):
        method = load_method(spec, store)
        y = method.manipulate(x, src, tgt)
        assert y.shape == x.shape and y.dtype == np.float32 and np.all(np.abs(y) <= 1)
        assert np.abs(y - x).max() > 0
    assert load_method(out + "@residual", store).by_construction
    np.testing.assert_array_equal(load_method(out + "@residual", store).manipulate(x, src, src), x)
    with pytest.raises(ValueError, match="evaluation oracle"):
        check_independent(out, features_run)
    with pytest.raises(SystemExit, match="VGG19 weights not found"):
        train_dfi.main(["--store", store_path, "--features", "imagenet", "--vgg-weights", str(tmp_path / "no.h5"),
                        "--k", "5", "--out", str(tmp_path / "dfi_imagenet")])
    with pytest.raises(SystemExit, match="fewer than k = 1000.*lower --k"):     # checked before anything is written
        train_dfi.main(["--store", store_path, "--features", features_run, "--k", "1000", "--out", str(tmp_path / "k")])
    assert not os.path.exists(tmp_path / "k")
    with pytest.raises(SystemExit, match="not in the store"):
        train_dfi.main(["--store", store_path, "--attrs", "age,nosuch", "--features", features_run,
                        "--out", str(tmp_path / "bad")])


def test_imagenet_features_have_the_three_vgg19_levels():
    from models.dfi import flat_features
    from models.feature_networks import imagenet_features
    net = imagenet_features(32, None)                 # random weights: tests only
    shapes = [tuple(o.shape[1:]) for o in net.outputs]
    assert shapes == [(8, 8, 256), (4, 4, 512), (2, 2, 512)]
    f = flat_features(net, np.zeros((2, 32, 32, 1), np.float32))
    assert f.shape == (2, sum(int(np.prod(s)) for s in shapes))


def test_help(script_help):
    out = script_help["train_dfi.py"]
    assert "--seed" in out and "--tv-weight" in out
