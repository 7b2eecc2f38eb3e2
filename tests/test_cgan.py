"""cGAN / IcGAN: both training phases, exact resume across them, save/load, every attribute kind at once
(age continuous, dx categorical, sex binary), the wrong conditions, which network each step trains, and the
architecture's parameter counts."""
import json
import os

import numpy as np
import pytest

from conftest import read_checkpoint, read_log
from mri.data.attributes import Attribute, Schema

TINY = ["--attrs", "age,dx,sex", "--tiny", "--z-dim", "8", "--batch-size", "4", "--steps-per-epoch", "1", "--seed", "3"]


def train(store_path, out, *flags):
    import train_cgan
    return train_cgan.main(["--store", store_path, "--out", str(out), *TINY, *flags])


@pytest.fixture(scope="module")
def straight(store_path, tmp_path_factory):
    """2 GAN + 2 encoder steps in one go: (run dir, trained model)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, train(store_path, out, "--epochs", "2", "--encoder-epochs", "2")


def attrs(n):
    return {"age": np.linspace(60, 85, n), "dx": np.arange(n) % 3, "sex": np.arange(n) % 2, "index": np.arange(n)}


def check_run(out, model, store_path):
    rows = read_log(out)
    assert [float(r["phase"]) for r in rows] == [0, 0, 1, 1]
    for name, epochs in (("d_loss", (0, 1)), ("g_loss", (0, 1)), ("ez_loss", (2, 3)), ("ey_loss", (2, 3))):
        a, b = (float(rows[i][name]) for i in epochs)
        assert np.isfinite([a, b]).all() and a > 0 and a != b, (name, a, b)
    assert sorted(os.listdir(os.path.join(out, "samples"))) == sorted(f"epoch_00{i}{k}.png" for i in range(1, 5) for k in ("", "_change"))
    assert os.listdir(os.path.join(out, "tb", "samples")) and os.listdir(os.path.join(out, "tb", "train"))
    # save/load identity, through the method registry
    from models import load_method
    loaded = load_method(str(out), store_path)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
    a = model.manipulate(x, attrs(3), attrs(3))
    np.testing.assert_array_equal(a, loaded.manipulate(x, attrs(3), attrs(3)))
    assert a.shape == (3, 32, 32, 1) and np.abs(a).max() <= 1
    older = dict(attrs(3), age=np.full(3, 90.0), dx=np.full(3, 2))
    assert not np.allclose(a, loaded.manipulate(x, attrs(3), older))
    assert sorted(loaded.attributes(x)) == ["age", "dx", "sex"]
    with pytest.raises(ValueError, match="has no manipulation modes"):
        load_method(f"{out}@residual", store_path)


def test_both_phases_train_log_and_reload(straight, store_path):
    check_run(*straight, store_path)
    with open(os.path.join(straight[0], "config.json")) as f:
        assert json.load(f)["args"]["wrong"] == "real"


def test_laplacian_shape_input(store_path, tmp_path):
    out = tmp_path / "run"
    model = train(store_path, out, "--laplacian", "--epochs", "2", "--encoder-epochs", "2")
    check_run(out, model, store_path)
    # the Laplacian branch joins G at quarter size: 8x8 for 32x32 slices
    joins = [l for l in model.generator.layers if l.__class__.__name__ == "Concatenate" and len(l.output.shape) == 4]
    assert [tuple(l.output.shape[1:3]) for l in joins] == [(8, 8)]


def test_exact_resume_across_the_phase_boundary(straight, store_path, tmp_path):
    """2 GAN steps, then --resume with 2 encoder steps == 4 steps in one go (weights, optimizer and RNG states)."""
    out = tmp_path / "run"
    train(store_path, out, "--epochs", "2", "--encoder-epochs", "0")
    train(store_path, out, "--epochs", "2", "--encoder-epochs", "2", "--resume")
    want, got = read_checkpoint(straight[0]), read_checkpoint(out)
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
    assert [r["ey_loss"] for r in read_log(out)] == [r["ey_loss"] for r in read_log(straight[0])]
    with pytest.raises(SystemExit, match="only before the encoder phase begins"):
        train(store_path, out, "--epochs", "3", "--encoder-epochs", "2", "--resume")


def schema(*names):
    every = {"age": Attribute("age", "continuous").fit([60, 70, 80]), "sex": Attribute("sex", "binary", ["M", "F"]),
             "dx": Attribute("dx", "categorical", ["CN", "MCI", "Dementia"])}
    return Schema([every[n] for n in names])


def train_y(s):
    """Encoded 'train split' of 7 slices: dx 0 (3 slices, rows 0, 1, 6), 1 (rows 2, 3), 2 (rows 4, 5)."""
    raw = {"age": [60, 62, 70, 74, 80, 90, 65], "dx": [0, 0, 1, 1, 2, 2, 0], "sex": [0, 0, 0, 1, 1, 1, 1]}
    return s.encode({n: raw[n] for n in s.names})


def wrong(model, y):
    import keras
    return np.asarray(model.wrong_conditions(keras.ops.convert_to_tensor(y)))


def rows_of(table, vectors):
    """The row of `table` each vector equals (it must equal one)."""
    match = (vectors[:, None, :] == table[None, :, :]).all(-1)
    assert match.any(1).all(), "a wrong condition is not a train vector"
    return match.argmax(1)


def test_wrong_conditions_are_train_slices_of_another_diagnosis():
    """--wrong real: y_w is the whole vector of a train slice with another diagnosis, uniform over such slices
    (not over classes), reproducible from the seed."""
    from models import cgan
    s = schema("age", "dx", "sex")
    table = train_y(s)
    model = cgan.CGAN(s, size=16, z_dim=4, filters=2, train_y=table, seed=1)
    y = np.repeat(table, 600, axis=0)                      # every slice of the table, 600 times
    got = rows_of(table, wrong(model, y))
    dx = table[:, 1:4].argmax(1)
    assert (dx[got] != y[:, 1:4].argmax(1)).all()
    for i in range(7):                                     # each of the slices of another class: ~ 1 / their number
        others = np.flatnonzero(dx != dx[i])
        counts = np.bincount(got[i * 600:(i + 1) * 600], minlength=7)
        assert counts.sum() == counts[others].sum() and np.abs(counts[others] / 600 - 1 / len(others)).max() < 0.08
    same_seed = cgan.CGAN(s, size=16, z_dim=4, filters=2, train_y=table, seed=1)
    np.testing.assert_array_equal(wrong(same_seed, y), table[got])
    # no categorical attribute: the key is the first binary one
    s2 = schema("age", "sex")
    model = cgan.CGAN(s2, size=16, z_dim=4, filters=2, train_y=train_y(s2))
    y = np.repeat(train_y(s2), 50, axis=0)
    got = rows_of(train_y(s2), wrong(model, y))
    assert (train_y(s2)[got, 1] != y[:, 1]).all()
    # only continuous attributes: schema.flip (a fresh age); one diagnosis in the train split: a clear error
    s3 = schema("age")
    assert not np.allclose(wrong(cgan.CGAN(s3, size=16, z_dim=4, filters=2, train_y=train_y(s3)), train_y(s3)),
                           train_y(s3))
    with pytest.raises(ValueError, match="--wrong group-means"):
        cgan.CGAN(s, size=16, z_dim=4, filters=2, train_y=table[:2])


def test_wrong_conditions_group_means_option():
    from models import cgan
    s = schema("age", "dx", "sex")
    y = s.encode({"age": [60, 62, 70, 74, 80, 90], "dx": [0, 0, 1, 1, 2, 2], "sex": [0, 0, 0, 1, 1, 1]})
    means = cgan.group_means(s, y)
    age_72 = s.encode({"age": [72], "dx": [1], "sex": [0]})[0, 0]
    np.testing.assert_allclose(means[1], [age_72, 0, 1, 0, 0.5], rtol=1e-6)   # dx MCI: ages 70, 74; sexes 0, 1
    args = dict(size=16, z_dim=4, tiny=False, filters=2, laplacian=False, seed=0, wrong="group-means")
    model = cgan.from_args(args, s, train_y=y)
    w = wrong(model, y)
    dx = w[:, 1:4].argmax(1)
    assert (dx != y[:, 1:4].argmax(1)).all()
    np.testing.assert_allclose(w, means[dx])
    # no categorical attribute: schema.flip
    s = schema("age", "sex")
    assert cgan.group_means(s, s.encode({"age": [60, 80], "sex": [0, 1]})) is None
    y = s.encode({"age": [60, 80], "sex": [0, 1]})
    model = cgan.CGAN(s, size=16, z_dim=4, filters=2, wrong="group-means", train_y=y)
    np.testing.assert_array_equal(wrong(model, y)[:, 1], [1, 0])


def tiny_model():
    """A compiled 16x16 cGAN trained on the 7-slice table, random images x and the table as their y."""
    import keras
    from models import cgan
    s = schema("age", "dx", "sex")
    model = cgan.CGAN(s, size=16, z_dim=4, filters=4, train_y=train_y(s), seed=2)
    cgan.compile_from_args(model, dict(lr=1e-3, jit="off"))
    x = np.random.default_rng(0).uniform(-1, 1, (7, 16, 16, 1)).astype(np.float32)
    return model, keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(train_y(s))


class Spy:
    """Stands in for a network: records the inputs of every call, then runs it."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, inputs, training=False):
        self.calls.append([np.asarray(t) for t in inputs])
        return self.net(inputs, training=training)

    def __getattr__(self, name):
        return getattr(self.net, name)


def weights(net):
    return [w.numpy().copy() for w in net.trainable_variables]


def changed(before, net):
    return [not np.array_equal(a, b) for a, b in zip(before, weights(net))]


def test_d_step_trains_d_on_right_wrong_and_fake_pairs(monkeypatch):
    """D's step updates D only, and its wrong pair is the right pair with y replaced by train vectors of
    another diagnosis."""
    model, x, y = tiny_model()
    g, d = weights(model.generator), weights(model.discriminator)
    spy = Spy(model.discriminator)
    monkeypatch.setattr(model, "discriminator", spy)
    model.d_step(x, y)
    assert all(changed(d, model.discriminator)) and not any(changed(g, model.generator))
    (x_r, y_r), (x_w, y_w), (x_f, y_f) = spy.calls
    np.testing.assert_array_equal(x_r, x)
    np.testing.assert_array_equal(x_w, x)                  # the same images ...
    np.testing.assert_array_equal(y_r, y)
    table = train_y(model.schema)                          # ... with another real slice's attributes
    assert (table[rows_of(table, y_w), 1:4].argmax(1) != np.asarray(y)[:, 1:4].argmax(1)).all()
    np.testing.assert_array_equal(y_f, y)                  # fakes are judged with the condition they were made for
    assert not np.allclose(x_f, x)


def test_g_step_trains_g_only():
    model, x, y = tiny_model()
    g, d = weights(model.generator), weights(model.discriminator)
    model.g_step(x, y)
    assert all(changed(g, model.generator)) and not any(changed(d, model.discriminator))


def conv(c_in, c_out, bias):
    """Parameters of a 4x4 (transposed) convolution."""
    return 16 * c_in * c_out + (c_out if bias else 0)


def bn(c):
    """BatchNorm: gamma, beta and the two moving statistics."""
    return 4 * c


def cgan_parameters(size, z_dim, y_dim, filters, max_filters, laplacian):
    """Parameter counts of (G, D, E_z, E_y) from the module docstring's description."""
    n = lambda r: min(max_filters, filters * size // (2 * r))      # maps at resolution r
    log = int(np.log2(size))
    up, down = [2 ** i for i in range(3, log)], [2 ** i for i in range(log - 2, 1, -1)]   # 8..size/2; size/4..4
    shape = n(size // 4) if laplacian else 0                        # the Laplacian's maps, joining at size/4
    g = (z_dim + y_dim) * 16 * n(4) + bn(n(4))                      # projection to 4x4 (no bias: BatchNorm follows)
    g += sum(conv(n(r // 2) + (shape if r == size // 2 else 0), n(r), False) + bn(n(r)) for r in up)
    g += conv(n(size // 2), 1, True)                                # to the image, tanh
    if laplacian:
        g += conv(1, n(size // 2), True) + conv(n(size // 2), n(size // 4), True)

    def stack(maps_at_half):
        """The convolutions from the image down to 4x4; `maps_at_half`: the half-size maps (D's add the condition's)."""
        first = conv(1, n(size // 2), True)
        return first + sum(conv(maps_at_half if r == size // 4 else n(2 * r), n(r), False) + bn(n(r)) for r in down)
    d = stack(2 * n(size // 2)) + conv(y_dim, n(size // 2), True) + 16 * n(4) + 1    # + the condition's conv, logit
    e = lambda out: stack(n(size // 2)) + 16 * n(4) * out + out
    return g, d, e(z_dim), e(y_dim)


@pytest.mark.parametrize("size,z_dim,filters,laplacian", [(128, 100, 64, False), (32, 8, 8, True)])
def test_parameter_counts_follow_the_architecture(size, z_dim, filters, laplacian):
    """Every network's parameters, counted from the description: the defaults at 128x128, and --tiny with the
    Laplacian input."""
    from models import cgan
    model = cgan.CGAN(schema("age", "dx", "sex"), size, z_dim, filters, laplacian=laplacian)   # y width 5
    nets = (model.generator, model.discriminator, model.encoder_z, model.encoder_y)
    assert [net.count_params() for net in nets] == list(cgan_parameters(size, z_dim, 5, filters, 1024, laplacian))


def test_full_size_architecture():
    from models import cgan
    model = cgan.CGAN(schema("age", "dx", "sex"))   # defaults: 128x128, z 100, 64..1024 maps; condition width 5
    g, d = model.generator, model.discriminator
    z, y = np.zeros((2, 100), np.float32), np.zeros((2, 5), np.float32)
    assert g([z, y]).shape == (2, 128, 128, 1)
    assert d([np.zeros((2, 128, 128, 1), np.float32), y]).shape == (2, 1)
    for net in (g, d):
        assert max(l.output.shape[-1] for l in net.layers if len(l.output.shape) == 4) == 1024
