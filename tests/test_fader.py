"""Fader Networks: tiny training runs through train_fader.main, exact resume, save/load, manipulate with every
attribute kind at once (age continuous, dx categorical, sex binary), the lambda ramp, the classifier switch,
and the full-size architecture (built, not trained)."""
import os

import numpy as np
import pytest

from conftest import read_checkpoint, read_log
from mri.attributes import Attribute, Schema

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
    assert sorted(os.listdir(os.path.join(out, "samples"))) == [f"epoch_{e:03d}.png" for e in (1, 2, 3, 4)]
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
    from mri.store import SliceStore
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
    # residual mode: the input plus the decoder's change, so unchanged attributes give the input back
    residual = load_method(out + "@residual", None)
    np.testing.assert_allclose(residual.manipulate(images, raw, raw), images, atol=1e-6)
    older = dict(raw, age=raw["age"] + 20)
    change = loaded.manipulate(images, raw, older) - np.asarray(y)
    np.testing.assert_allclose(residual.manipulate(images, raw, older), np.clip(images + change, -1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="manipulate modes"):
        load_method(out + "@nonsense", None)


def test_lambda_ramp_and_classifier_switch(store_path):
    from models import fader
    from mri.loader import Batches, dataset
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


def test_default_architecture_at_128():
    from models import fader
    schema = Schema([Attribute("age", "continuous").fit([60, 70, 80]),
                     Attribute("dx", "categorical", ["CN", "MCI", "Dementia"]), Attribute("sex", "binary", ["F", "M"])])
    args = dict(size=128, tiny=False, n_layers=0, n_filters=16, max_filters=512, hidden=512, dropout=0.3,
                lat_dropout=0.3, lambda_lat=1e-4, lambda_clf=1e-4, lambda_ramp_steps=5000, seed=0)
    m = fader.from_args(args, schema)
    convs = lambda net: [tuple(l.output.shape[1:]) for l in net.layers if "conv" in l.name]
    assert convs(m.encoder) == [(64, 64, 16), (32, 32, 32), (16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512)]
    assert convs(m.decoder) == [(4, 4, 256), (8, 8, 128), (16, 16, 64), (32, 32, 32), (64, 64, 16), (128, 128, 1)]
    # y (width 5) is appended at every decoder layer input
    assert [l.input[0].shape[-1] for l in m.decoder.layers if "conv" in l.name] == [517, 261, 133, 69, 37, 21]
    assert m.lat_dis.output.shape[1:] == (5,) and m.classifier.output.shape[1:] == (5,)
    # Parameters, counted by hand (conv 4x4: 16 * in * out; BatchNorm: 4 per map incl. moving statistics):
    # E: 16*1*16 + 16 (bias, no BN)                        =       272
    #    16*16*32 + 4*32 = 8320;  16*32*64 + 4*64 = 33024;  16*64*128 + 4*128 = 131584;
    #    16*128*256 + 4*256 = 525312;  16*256*512 + 4*512 = 2099200         -> E total 2,797,712
    # D: 16*517*256 + 4*256 = 2118656;  16*261*128 + 4*128 = 535040;  16*133*64 + 4*64 = 136448;
    #    16*69*32 + 4*32 = 35456;  16*37*16 + 4*16 = 9536;  16*21*1 + 1 (bias, tanh) = 337  -> D total 2,835,473
    # head (P_lat; also C's end): Dense 2048->512 no bias 1048576 + BN 2048 + Dense 512->512 262656
    #    + Dense 512->5 2565                                                   -> 1,315,845
    # C: E's stack 2,797,712 + head 1,315,845                                -> 4,113,557
    assert m.encoder.count_params() == 2_797_712
    assert m.decoder.count_params() == 2_835_473
    assert m.lat_dis.count_params() == 1_315_845
    assert m.classifier.count_params() == 4_113_557


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
