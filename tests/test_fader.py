"""Fader Networks: tiny training runs through train_fader.main, exact resume, save/load, manipulate with every
attribute kind at once (age continuous, dx categorical, sex binary), the lambda ramp, the classifier switch,
and the full-size architecture (built, not trained)."""
import os

import numpy as np
import pytest

from conftest import read_checkpoint, read_log
from mri.data.attributes import Attribute, Schema

TINY = ["--attrs", "age,dx,sex", "--tiny", "--batch-size", "4", "--steps-per-epoch", "1", "--seed", "5",
        "--lambda-ramp-steps", "2"]


def train(store_path, out, *flags):
    import train_fader
    return train_fader.main(["--store", store_path, "--out", str(out), *TINY, *flags])


@pytest.fixture(scope="module")
def run4(store_path, tmp_path_factory):
    """4 iterations in one go: (run directory, the trained model)."""
    out = tmp_path_factory.mktemp("fader_run") / "four"
    return str(out), train(store_path, out, "--epochs", "4").model


def test_tiny_run_trains_with_finite_moving_losses(run4):
    out, model = run4
    rows = read_log(out)
    assert len(rows) == 4
    for key in ("loss", "rec", "lat_dis", "lat_adv", "clf", "clf_adv"):
        values = [float(r[key]) for r in rows]
        assert np.isfinite(values).all(), key
        assert len(set(values)) > 1, f"{key} did not move: {values}"
    # the lambda ramp (2 iterations) went 0, 1/2, 1, 1 times lambda_lat
    np.testing.assert_allclose([float(r["lambda_lat"]) for r in rows], [0, 5e-5, 1e-4, 1e-4], rtol=1e-5)
    assert int(model.step.numpy()) == 4 and set(model.optimizers) == {"ae", "lat_dis", "clf"}
    assert sorted(os.listdir(os.path.join(out, "samples"))) == sorted(f"epoch_{e:03d}{k}.png" for e in (1, 2, 3, 4) for k in ("", "_change"))
    for events in ("train", "samples"):   # TensorBoard scalars and sweep grids
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb", events)))


def test_resume_is_exact(store_path, run4, tmp_path):
    out = tmp_path / "two_plus_two"
    train(store_path, out, "--epochs", "2")
    with pytest.raises(SystemExit, match="already holds a run"):
        train(store_path, out, "--epochs", "4")
    train(store_path, out, "--epochs", "4", "--resume")
    a, b = read_checkpoint(run4[0]), read_checkpoint(out)
    assert a.keys() == b.keys() and any(k.startswith("clf/") for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    assert [r["epoch"] for r in read_log(out)] == ["0", "1", "2", "3"]


def test_from_run_gives_identical_outputs_and_manipulate_uses_every_kind(store_path, run4):
    from models import fader, load_method
    from mri.data.store import SliceStore
    out, trained = run4
    loaded = load_method(out, None)
    assert isinstance(loaded, fader.Fader) and loaded.classifier is not None
    s = SliceStore(store_path)
    idx = s.indices("test")[:6]
    images = s.images(idx)[..., None]
    raw = dict(s.raw(idx), index=idx)   # the evaluator's extra key is ignored
    y = trained((images, trained.schema.encode(raw)), training=False)
    np.testing.assert_allclose(loaded.manipulate(images, raw, raw), np.asarray(y), atol=1e-6)
    for name, other in (("age", raw["age"] + 20), ("dx", (raw["dx"] + 1) % 3), ("sex", 1 - raw["sex"])):
        moved = loaded.manipulate(images, raw, dict(raw, **{name: other}))
        assert moved.shape == (6, 32, 32, 1) and moved.dtype == np.float32
        assert np.abs(moved).max() <= 1 and np.abs(moved - np.asarray(y)).max() > 1e-4, name
    # residual mode: the input plus the decoder's change, so unchanged attributes give the input back exactly
    # (both decodes in one batch: equal rows decode bitwise alike), also next to changed slices in a batch
    residual = load_method(out + "@residual", None)
    np.testing.assert_array_equal(residual.manipulate(images, raw, raw), images)
    older = dict(raw, age=raw["age"] + 20)
    some = dict(raw, age=np.where(np.arange(6) % 2, older["age"], raw["age"]))
    np.testing.assert_array_equal(residual.manipulate(images, raw, some)[::2], images[::2])
    change = loaded.manipulate(images, raw, older) - np.asarray(y)
    np.testing.assert_allclose(residual.manipulate(images, raw, older), np.clip(images + change, -1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="manipulate modes"):
        load_method(out + "@nonsense", None)


def test_lambda_ramp_and_classifier_switch(store_path):
    from models import fader
    from mri.data.loader import Batches, dataset
    schema = Batches(store_path, "train", ["age", "dx", "sex"], batch_size=4).schema
    args = dict(size=32, tiny=True, n_layers=0, n_filters=16, max_filters=512, hidden=512, dropout=0.3,
                lat_dropout=0.3, lambda_lat=1e-4, lambda_clf=0.0, lambda_ramp_steps=100, seed=0, lr=2e-4,
                clip_grad_norm=5.0, jit="auto")
    model = fader.compile_from_args(fader.from_args(args, schema), args)
    assert [float(model.ramp(1e-4, t)) for t in (0, 50, 100, 10 ** 6)] == pytest.approx([0, 5e-5, 1e-4, 1e-4])
    assert float(fader.Fader(schema, 32, n_layers=3, lambda_ramp_steps=0).ramp(1e-4, 0)) == pytest.approx(1e-4)
    # --lambda-clf 0: no classifier is built, and none is trained
    assert model.classifier is None and set(model.optimizers) == {"ae", "lat_dis"}
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(dataset(Batches(store_path, "train", ["age", "dx", "sex"], batch_size=4)), epochs=1,
                        steps_per_epoch=2, shuffle=False, verbose=0)
    assert "clf" not in history.history and np.isfinite(history.history["loss"]).all()
    changed = [not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights)]
    assert all(changed) and int(model.step.numpy()) == 2


def test_clear_errors(store_path, tmp_path):
    with pytest.raises(SystemExit, match=r"\['apoe'\] not in the store; available: \['age', 'dx', 'sex'\]"):
        train(store_path, tmp_path / "a", "--attrs", "age,apoe")
    with pytest.raises(SystemExit, match="cannot open store .*data_prep.py"):
        train(str(tmp_path / "missing.h5"), tmp_path / "b")


def test_autoencoder_step_raises_the_latent_discriminators_loss(store_path):
    """The adversarial term's sign: one autoencoder update (train_step with P_lat's learning rate at 0, P_lat's
    state restored afterwards) makes P_lat worse at reading the TRUE attributes from E(x) on that batch.
    A small plain gradient step (SGD, lambda_lat * lr = 1e-3) keeps the change first order, so the
    reconstruction term and the step's curvature cannot mask it; P_lat first learns the batch for 10 steps (E
    frozen), else its loss on an untrained latent moves either way. dx and sex only: a continuous attribute's
    flipped target is a random draw, which pulls P_lat's prediction nowhere in particular. Checked with seeds
    0-7 (it rises by 0.006-0.1) and with the term's sign flipped (it falls, for every seed: this test fails)."""
    import keras
    from models import fader
    from mri.data.loader import Batches
    batches = Batches(store_path, "train", ["dx", "sex"], batch_size=8, seed=0)
    x, y = (keras.ops.convert_to_tensor(a) for a in batches.batch(0))
    args = dict(size=32, tiny=True, n_layers=0, n_filters=16, max_filters=512, hidden=512, dropout=0.3,
                lat_dropout=0.3, lambda_lat=100.0, lambda_clf=0.0, lambda_ramp_steps=0, seed=0)
    keras.utils.set_random_seed(0)
    model = fader.from_args(args, batches.schema)
    model.compile(keras.optimizers.SGD(0.0), keras.optimizers.Adam(1e-3))
    for _ in range(10):                                   # P_lat learns the batch; SGD(0) keeps E and D fixed
        model.train_step((x, y))
    model.ae_optimizer.learning_rate.assign(1e-5)
    model.lat_optimizer.learning_rate.assign(0.0)
    lat_loss = lambda: float(model.schema.loss(y, model.lat_dis(model.encoder(x, training=True), training=False)))
    encoder, lat_dis = model.encoder.get_weights(), model.lat_dis.get_weights()
    before = lat_loss()
    model.train_step((x, y))
    model.lat_dis.set_weights(lat_dis)                    # P_lat's BatchNorm statistics moved in its own step
    assert any(not np.array_equal(a, b) for a, b in zip(encoder, model.encoder.get_weights()))
    assert lat_loss() > before + 1e-3, (before, lat_loss())


def conv(c_in, c_out, bias):
    """Parameters of a 4x4 (transposed) convolution."""
    return 16 * c_in * c_out + (c_out if bias else 0)


def dense(n_in, n_out, bias=True):
    return n_in * n_out + (n_out if bias else 0)


def bn(c):
    """BatchNorm: gamma, beta and the two moving statistics."""
    return 4 * c


def fader_parameters(size, y_dim, n_layers, n_filters, max_filters, hidden):
    """Parameter counts of (E, D, P_lat, C) from the module docstring's description."""
    f = [min(n_filters * 2 ** i, max_filters) for i in range(n_layers)]
    e = conv(1, f[0], bias=True) + sum(conv(a, b, False) + bn(b) for a, b in zip(f, f[1:]))
    mirror = f[::-1]                                       # D: f_L-1 -> ... -> f_0, y appended to every input
    d = sum(conv(a + y_dim, b, False) + bn(b) for a, b in zip(mirror, mirror[1:])) + conv(f[0] + y_dim, 1, True)
    side, c, head = size // 2 ** n_layers, f[-1], 0        # P_lat: E-like blocks down to 2x2, then Dense layers
    while side > 2:
        wider = min(2 * c, max_filters)
        side, c, head = side // 2, wider, head + conv(c, wider, False) + bn(wider)
    wider = min(2 * c, max_filters)                        # the 2x2 -> 1x1 block, as a Dense on the flat map
    head += dense(4 * c, wider, False) + bn(wider) + dense(wider, hidden) + dense(hidden, y_dim)
    return e, d, head, e + head


def schema_age_dx_sex():
    return Schema([Attribute("age", "continuous").fit([60, 70, 80]),
                   Attribute("dx", "categorical", ["CN", "MCI", "Dementia"]), Attribute("sex", "binary", ["F", "M"])])


def test_default_architecture_at_128():
    from models import fader
    args = dict(size=128, tiny=False, n_layers=0, n_filters=16, max_filters=512, hidden=512, dropout=0.3,
                lat_dropout=0.3, lambda_lat=1e-4, lambda_clf=1e-4, lambda_ramp_steps=5000, seed=0)
    m = fader.from_args(args, schema_age_dx_sex())
    convs = lambda net: [tuple(l.output.shape[1:]) for l in net.layers if "conv" in l.name]
    assert convs(m.encoder) == [(64, 64, 16), (32, 32, 32), (16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512)]
    assert convs(m.decoder) == [(4, 4, 256), (8, 8, 128), (16, 16, 64), (32, 32, 32), (64, 64, 16), (128, 128, 1)]
    # y (width 5) is appended at every decoder layer input
    assert [l.input[0].shape[-1] for l in m.decoder.layers if "conv" in l.name] == [517, 261, 133, 69, 37, 21]
    assert m.lat_dis.output.shape[1:] == (5,) and m.classifier.output.shape[1:] == (5,)


@pytest.mark.parametrize("size,n_layers,tiny", [(128, 0, False), (128, 4, False), (32, 0, True)])
def test_parameter_counts_follow_the_architecture(size, n_layers, tiny):
    """Every network's parameters, counted from the description (the default; --n-layers 4, whose 8x8 latent
    gives P_lat two conv blocks; --tiny)."""
    from models import fader
    args = dict(size=size, tiny=tiny, n_layers=n_layers, n_filters=16, max_filters=512, hidden=512, dropout=0.3,
                lat_dropout=0.3, lambda_lat=1e-4, lambda_clf=1e-4, lambda_ramp_steps=5000, seed=0)
    arch = fader.architecture(args)
    m = fader.from_args(args, schema_age_dx_sex())
    want = fader_parameters(size, 5, arch["n_layers"], arch["n_filters"], arch["max_filters"], arch["hidden"])
    assert [net.count_params() for net in (m.encoder, m.decoder, m.lat_dis, m.classifier)] == list(want)


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (2, 2, 2, 3), (2, 8, 6, 3)])
def test_matmul_convolutions_equal_keras_layers(shape):
    """The tiny-map forms in models/layers.py: same outputs and gradients as keras' (transposed) convolutions."""
    import keras
    import tensorflow as tf
    from models.layers import MatmulConv2D, MatmulConv2DTranspose
    x = tf.random.stateless_normal(shape, seed=(1, 2))
    for fast, ref in ((MatmulConv2D(5), keras.layers.Conv2D(5, 4, strides=2, padding="same")),
                      (MatmulConv2DTranspose(5), keras.layers.Conv2DTranspose(5, 4, strides=2, padding="same"))):
        fast.build(shape), ref.build(shape)
        ref.bias.assign(tf.range(5, dtype="float32"))
        fast.set_weights(ref.get_weights())
        results = []
        for layer in (fast, ref):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(tf.sin(y))
            results.append([y] + tape.gradient(loss, [x] + layer.trainable_weights))
        for a, b in zip(*results):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


def test_fused_batch_norm_and_adam_equal_keras():
    """models/layers.py's fused kernels: the same outputs, gradients and updates as keras' layers/optimizer."""
    import keras
    import tensorflow as tf
    from models.layers import BatchNorm, FusedAdam
    x = tf.random.stateless_normal((8, 4, 4, 3), seed=(3, 4)) * 3 + 1
    results = []
    for bn in (BatchNorm(momentum=0.9, epsilon=1e-5), keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)):
        bn.build(x.shape)
        bn.gamma.assign([1.0, 2.0, 3.0])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn(x, training=True)
            loss = tf.reduce_sum(tf.sin(y))
        results.append([y, *tape.gradient(loss, [x, bn.gamma, bn.beta]), bn.moving_mean])
    for a, b in zip(*results):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=2e-5)
    weights = []
    for make in (FusedAdam, keras.optimizers.Adam):
        optimizer = make(1e-2, beta_1=0.5, global_clipnorm=1.0)
        w = keras.Variable(np.linspace(-1, 1, 6).astype("float32"))
        optimizer.build([w])
        for _ in range(4):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(30 * tf.sin(w) ** 2)
            optimizer.apply(tape.gradient(loss, [w]), [w])
        weights.append([w.numpy()] + [v.numpy() for v in optimizer.variables])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
