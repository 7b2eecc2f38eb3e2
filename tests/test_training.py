"""The shared training pieces (mri/training.py): checkpoints, the run directory, --jit, sweep grids, batches."""
import argparse

import numpy as np
import pytest

from mri import training
from mri.data.attributes import Attribute, Schema


def schema():
    return Schema([Attribute("age", "continuous").fit([60, 70, 80]),
                   Attribute("dx", "categorical", ["CN", "MCI", "Dementia"]), Attribute("sex", "binary", ["F", "M"])])


def tiny_model(seed):
    """A model with weights, BatchNorm statistics and a seed generator, and its Adam optimizer."""
    import keras
    keras.utils.set_random_seed(seed)
    x = keras.Input((3,))
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.BatchNormalization()(x)))
    model.noise = keras.random.SeedGenerator(seed)
    optimizer = keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def train_step(model, optimizer):
    import tensorflow as tf
    x = np.arange(12, dtype="float32").reshape(4, 3)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True)))
    optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    import keras
    path = str(tmp_path / "ck.npz")
    a, opt_a = tiny_model(0)
    for _ in range(3):
        train_step(a, opt_a)
    training.save_checkpoint(path, a, {"g": opt_a})
    next_draw = keras.random.uniform((4,), seed=a.noise).numpy()
    b, opt_b = tiny_model(1)
    training.load_checkpoint(path, b, {"g": opt_b})
    for va, vb in zip(a.variables + opt_a.variables, b.variables + opt_b.variables):
        if va is not a.noise.state:
            np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    assert int(opt_b.iterations.numpy()) == 3
    np.testing.assert_array_equal(keras.random.uniform((4,), seed=b.noise).numpy(), next_draw)
    # the same next step from both
    train_step(a, opt_a), train_step(b, opt_b)
    np.testing.assert_array_equal(a.layers[-1].kernel.numpy(), b.layers[-1].kernel.numpy())
    # weights only (inference), and clear errors for another architecture or a missing file
    c, _ = tiny_model(2)
    training.load_checkpoint(path, c)
    with pytest.raises(ValueError, match="has shape"):
        x = keras.Input((4,))
        training.load_checkpoint(path, keras.Model(x, keras.layers.Dense(2)(keras.layers.BatchNormalization()(x))))
    with pytest.raises(FileNotFoundError):
        training.load_checkpoint(str(tmp_path / "none.npz"), c)


def args(**kw):
    return argparse.Namespace(**dict(dict(store="s.h5", attrs=["age"], epochs=2, lr=1e-3, resume=False), **kw))


def test_run_refuses_to_overwrite_and_to_resume_with_other_arguments(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="no checkpoint"):
        training.Run(out, "fader", args(resume=True), schema(), resume=True)
    run = training.Run(out, "fader", args(), schema())
    assert training.load_config(out)["method"] == "fader" and "resume" not in run.config["args"]
    assert Schema.from_records(training.load_config(out)["schema"]).names == ["age", "dx", "sex"]
    open(run.checkpoint, "wb").close()
    with pytest.raises(SystemExit, match="already holds a run"):
        training.Run(out, "fader", args(), schema())
    with pytest.raises(SystemExit, match=r"\['lr'\] differ"):
        training.Run(out, "fader", args(lr=1e-4), schema(), resume=True)
    training.Run(out, "fader", args(epochs=5), schema(), resume=True)   # only --epochs may grow
    assert training.load_config(out)["args"]["epochs"] == 5
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        training.load_config(str(tmp_path))


def test_a_run_from_before_an_argument_resumes_with_its_legacy_value(tmp_path):
    """A config.json written before an argument existed reads it as the value those runs had (training's
    LEGACY_ARGS, e.g. channels 1, and the method's own): resuming with that value works, another is refused."""
    out = str(tmp_path / "old")
    run = training.Run(out, "longitudinal", args(), schema())      # no channels, no integration: an old run's config
    open(run.checkpoint, "wb").close()
    path = run.checkpoint.replace(training.CHECKPOINT, "config.json")
    old = open(path).read()

    def resume(**kw):
        with open(path, "w") as f:
            f.write(old)
        return training.Run(out, "longitudinal", args(**kw), schema(), resume=True, legacy={"integration": "linear"})
    resume(channels=1, integration="linear")
    with pytest.raises(SystemExit, match=r"\['integration'\] differ"):
        resume(channels=1, integration="squaring")
    with pytest.raises(SystemExit, match=r"\['channels'\] differ"):
        resume(channels=3, integration="linear")
    with pytest.raises(SystemExit, match=r"\['sweeps'\] differ"):                     # no legacy value: refused
        resume(channels=1, integration="linear", sweeps=2)


def test_jit_is_off_on_cpu_by_default():
    assert training.jit_compile("auto") is False
    assert training.jit_compile("on") is True and training.jit_compile("off") is False


def test_sweep_grids_shape_and_change_maps():
    s = schema()
    images = np.zeros((3, 16, 16, 1), np.float32)
    raw = {"age": np.array([60.0, 70, 80]), "dx": np.array([0, 1, 2]), "sex": np.array([0, 1, 0])}
    calls = []

    def manipulate(x, source, target):
        calls.append(target)
        return x + (target["dx"] == 1).reshape(-1, 1, 1, 1) * training.CHANGE_SCALE   # brighter at MCI only
    grid, change = training.sweep_grids(manipulate, images, raw, s, n_steps=5)
    columns = 1 + 5 + 3 + 2   # source, age -2..+2 std, each dx class, each sex
    assert grid.shape[:2] == change.shape[:2] == (3 * 18 + 2, columns * 18 + 2) and grid.dtype == np.uint8
    cell = lambda row, col: change[2 + row * 18:18 + row * 18, 2 + col * 18:18 + col * 18]
    for row in range(3):                                                # MCI saturated red, CN white, every row
        assert np.all(cell(row, 1 + 5 + 1) == [255, 0, 0]) and np.all(cell(row, 1 + 5) == 255)
    assert len(calls) == 1                                              # every column in one call, in order
    target = {k: v.reshape(columns - 1, 3) for k, v in calls[0].items()}
    np.testing.assert_allclose(target["age"][0], s["age"].mean - 2 * s["age"].std)
    np.testing.assert_allclose(target["age"][:5, 0], s["age"].mean + s["age"].std * np.linspace(-2, 2, 5), rtol=1e-6)
    assert target["dx"][5].tolist() == [0, 0, 0] and target["dx"][0].tolist() == raw["dx"].tolist()
    assert target["sex"][-1].tolist() == [1, 1, 1] and target["sex"][-2].tolist() == [0, 0, 0]


def test_make_batches_errors_are_clear(tmp_path):
    a = args(store=str(tmp_path / "missing.h5"), batch_size=4, seed=0, jitter=0.0)
    with pytest.raises(SystemExit, match="cannot open store"):
        training.make_batches(a)
