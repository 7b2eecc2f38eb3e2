"""CycleGAN: the domains, the image pool, the learning-rate rule, a toy where G_AB must brighten squares, exact
resume through train_cyclegan.main (pools, their random state and the schedule included), manipulate and
supports of a reloaded run, the per-epoch grids, and the script's help."""
import os

import numpy as np
import pytest

from conftest import read_checkpoint, read_log
from mri.data import grids
from mri.data.attributes import Attribute, Schema

LR, CONSTANT, DECAY, POOL, STEPS, BATCH = 1e-3, 2, 2, 3, 2, 4
TINY = ["--domains", "dx=CN:Dementia", "--tiny", "--blocks", "1", "--batch-size", str(BATCH), "--seed", "3",
        "--steps-per-epoch", str(STEPS), "--pool-size", str(POOL), "--lr", str(LR)]
SCHEDULE = ["--constant-epochs", str(CONSTANT), "--decay-epochs", str(DECAY)]


def train(store_path, out, *flags):
    import train_cyclegan
    return train_cyclegan.main(["--store", store_path, "--out", str(out), *TINY, *flags])


@pytest.fixture(scope="module")
def run4(store_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cyclegan_run") / "four"
    return str(out), train(store_path, out, "--epochs", "4", *SCHEDULE).model


def schema():
    return Schema([Attribute("age", "continuous").fit(np.linspace(55, 90, 50)),
                   Attribute("dx", "categorical", ["CN", "MCI", "Dementia"])])


def test_domains_from_classes_or_ranges():
    from mri.data.loader import parse_domains
    dx = parse_domains("dx=CN:Dementia", schema())
    assert dx.which({"dx": np.array([0, 1, 2])}).tolist() == [0, -1, 1]
    age = parse_domains("age<65:age>=75", schema())
    assert age.which({"age": np.array([64.9, 65.0, 74.9, 75.0, 90.0])}).tolist() == [0, -1, -1, 1, 1]
    for spec, error in (("dx=CN:CN", "overlap"), ("age<70:age>=65", "overlap"), ("age<=65:age>=65", "overlap"),
                        ("dx=CN:AD", "has the classes"), ("age=60:70", "is continuous"),
                        ("dx<1:dx>1", "is categorical"),
                        ("age<65:dx>=2", "of one attribute"), ("age<65", "takes ATTR=")):
        with pytest.raises(ValueError, match=error):
            parse_domains(spec, schema())


def test_image_pool_capacity_swap_probability_and_seed():
    """Images 1, 2, ... of shape (1, 1, 1): the first `capacity` are stored and returned; then each comes back
    itself or, with probability 1/2, as an older stored image that it replaces; the same seed, the same draws."""
    import keras
    import tensorflow as tf
    from models.cyclegan import ImagePool
    capacity, batch, batches = 50, 100, 20

    def run(seed):
        pool, generator = ImagePool(capacity, (1, 1, 1)), keras.random.SeedGenerator(seed)
        query = tf.function(lambda x: pool.query(x, generator))
        ids = np.arange(1, batch * batches + 1, dtype=np.float32).reshape(batches, batch, 1, 1, 1)
        return ids.ravel(), np.concatenate([query(tf.constant(b)).numpy() for b in ids]).ravel(), pool

    ids, out, pool = run(1)
    np.testing.assert_array_equal(out[:capacity], ids[:capacity])
    assert int(pool.count.numpy()) == capacity
    # each image is returned or stored, and the first `capacity` were both
    stored = pool.images.numpy().ravel()
    np.testing.assert_array_equal(np.sort(np.concatenate([out, stored])),
                                  np.sort(np.concatenate([ids, ids[:capacity]])))
    swapped = out[capacity:] != ids[capacity:]
    assert (out[capacity:][swapped] < ids[capacity:][swapped]).all()
    assert abs(swapped.mean() - 0.5) < 4 * np.sqrt(0.25 / swapped.size), swapped.mean()
    np.testing.assert_array_equal(run(1)[1], out)
    assert not np.array_equal(run(2)[1], out)


def test_learning_rate_rule_at_the_edges():
    """lr for `constant` epochs, then lr (1 - (e + 1 - constant) / (decay + 1)) in epoch e, 0 after the decay."""
    from models.cyclegan import Schedule
    lr, steps, constant, decay = 2e-4, 5, 3, 4
    at = lambda step: float(Schedule(lr, steps, constant, decay)(step))
    assert at(0) == pytest.approx(lr) and at(constant * steps - 1) == pytest.approx(lr)
    first, last = constant, constant + decay - 1
    for e, factor in ((first, decay / (decay + 1)), (last, 1 / (decay + 1))):
        assert at(e * steps) == pytest.approx(lr * factor) and at((e + 1) * steps - 1) == pytest.approx(lr * factor)
    assert at((last + 1) * steps) == 0 and at(10 * (last + 1) * steps) == 0


def squares(n, level, rng, size=32):
    """Background -1 with one square of `level`, random side 8..14 and position: (images, square masks)."""
    x, mask = np.full((n, size, size, 1), -1.0, np.float32), np.zeros((n, size, size), bool)
    for i in range(n):
        side = rng.integers(8, 15)
        r, c = rng.integers(2, size - 2 - side, 2)
        mask[i, r:r + side, c:c + side] = True
    x[mask] = level
    return x, mask


@pytest.mark.slow   # 60 CycleGAN steps until G_AB has learned (29-39 CPU s)
def test_toy_squares_become_bright_and_come_back():
    """Squares at -0.5 in A and +0.5 in B (ngf = ndf = 8, 2 residual blocks, 8 slices of each domain): G_AB
    makes A's squares bright (mean > 0) and the cycle returns the slice (mean L1 < 0.1)."""
    import keras
    import tensorflow as tf
    from models import cyclegan
    from mri.data.loader import parse_domains
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    (a, _), (b, _) = squares(256, -0.5, rng), squares(256, 0.5, rng)
    s = Schema([Attribute("bright", "binary", ["dark", "bright"])])
    model = cyclegan.CycleGAN(s, parse_domains("bright=dark:bright", s), size=32, filters=8, blocks=2)
    cyclegan.compile_from_args(model, dict(lr=1e-3, constant_epochs=1, decay_epochs=0, jit="off"), 60)
    pairs = np.concatenate([a.reshape(-1, 8, 32, 32, 1), b.reshape(-1, 8, 32, 32, 1)], axis=1)
    data = tf.data.Dataset.from_tensor_slices(pairs.reshape(-1, 16, 32, 32, 1)).repeat()
    model.fit(data.map(lambda x: (x, tf.zeros((16, 1)))), steps_per_epoch=60, epochs=1, verbose=0, shuffle=False)
    test, mask = squares(64, -0.5, np.random.default_rng(1))
    src, tgt = {"bright": np.zeros(64)}, {"bright": np.ones(64)}
    bright = model.manipulate(test, src, tgt)
    assert bright[..., 0][mask].mean() > 0, bright[..., 0][mask].mean()
    back = model.manipulate(bright, tgt, src)
    assert np.abs(back - test).mean() < 0.1, np.abs(back - test).mean()


def test_one_step_logs_the_losses_of_its_equations():
    """One training step's logged losses are the module docstring's equations computed here from the networks
    before the step (D_A judges real A and G_BA's slices, D_B real B and G_AB's), and each pool, not yet full,
    stores its own domain's generated slices."""
    import keras
    from models import cyclegan
    from mri.data.loader import parse_domains
    keras.utils.set_random_seed(0)
    s, n = schema(), 2
    model = cyclegan.CycleGAN(s, parse_domains("dx=CN:Dementia", s), size=24, filters=2, blocks=1, pool_size=2 * n)
    cyclegan.compile_from_args(model, dict(lr=1e-3, constant_epochs=1, decay_epochs=0, jit="off"), 1)
    rng = np.random.default_rng(0)
    a, b = (rng.uniform(-1, 1, (n, 24, 24, 1)).astype(np.float32) for _ in range(2))
    g_ab, g_ba, d_a, d_b = (lambda v, net=net: np.asarray(net(v), np.float64)
                            for net in (model.g_ab, model.g_ba, model.d_a, model.d_b))
    square = lambda scores, target: np.mean((scores - target) ** 2)
    fake_b, fake_a = g_ab(a), g_ba(b)
    want = {"adversarial": square(d_b(fake_b), 1) + square(d_a(fake_a), 1),
            "cycle": np.mean(np.abs(g_ba(fake_b) - a)) + np.mean(np.abs(g_ab(fake_a) - b)),
            "identity": np.mean(np.abs(g_ab(b) - b)) + np.mean(np.abs(g_ba(a) - a)),
            "d_a": (square(d_a(a), 1) + square(d_a(fake_a), 0)) / 2,
            "d_b": (square(d_b(b), 1) + square(d_b(fake_b), 0)) / 2}
    logs = model.train_step((np.concatenate([a, b]), np.zeros((2 * n, 1), np.float32)))
    for name, value in want.items():
        assert float(logs[name]) == pytest.approx(value, rel=1e-4), name
    np.testing.assert_allclose(model.pool_a.images.numpy()[:n], fake_a, atol=1e-5)
    np.testing.assert_allclose(model.pool_b.images.numpy()[:n], fake_b, atol=1e-5)


def test_tiny_run_logs_the_schedule_and_resume_is_exact(store_path, run4, tmp_path):
    """4 steps == 2 + resume + 2: the weights, both optimizers, the pools, the seed generator and the schedule
    (which decays only after the resume)."""
    out, model = run4
    rows = read_log(out)
    expected = [LR * max(0.0, 1 - max(0, e + 1 - CONSTANT) / (DECAY + 1)) for e in range(4)]
    np.testing.assert_allclose([float(r["lr"]) for r in rows], expected, rtol=1e-6)
    assert int(model.step.numpy()) == 4 * STEPS
    fakes = 4 * STEPS * BATCH // 2
    assert int(model.pool_a.count.numpy()) == int(model.pool_b.count.numpy()) == min(POOL, fakes) < fakes
    two = tmp_path / "two_plus_two"
    train(store_path, two, "--epochs", "2", *SCHEDULE)
    with pytest.raises(SystemExit, match=r"\['constant_epochs', 'decay_epochs'\] differ"):
        train(store_path, two, "--epochs", "6", "--resume")   # the default schedule would follow --epochs
    train(store_path, two, "--epochs", "4", "--resume", *SCHEDULE)
    a, b = read_checkpoint(out), read_checkpoint(two)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    logged = lambda run: np.array([[float(r[k]) for k in ("d_a", "d_b", "adversarial", "cycle", "identity", "lr")]
                                   for r in read_log(run)])
    assert np.isfinite(logged(out)).all()
    np.testing.assert_allclose(logged(two), logged(out), atol=1e-5)


def test_reloaded_run_translates_between_the_domains_only(store_path, run4):
    """CN -> Dementia is G_AB, Dementia -> CN G_BA; a target in the source's domain, or a source or target outside
    both domains (MCI), returns the input and is not supported."""
    from models import load_method
    from mri.data.store import SliceStore
    out, trained = run4
    with SliceStore(store_path) as store:
        dx = store.attrs["dx"]
        idx = np.array([np.flatnonzero(dx == k)[0] for k in (0, 2, 0, 1, 0, 2)])
        x = store.images(idx)[..., None]
        src = store.raw(idx)
        tgt = dict(src, dx=np.array([2, 0, 1, 2, 0, 2]))
        model = load_method(out, store)
    np.testing.assert_array_equal(model.supports(src, tgt), [True, True, False, False, False, False])
    y = model.manipulate(x, src, tgt)
    np.testing.assert_allclose(y[0], np.asarray(model.g_ab(x[:1]))[0], atol=1e-6)
    np.testing.assert_allclose(y[1], np.asarray(model.g_ba(x[1:2]))[0], atol=1e-6)
    assert not np.array_equal(y[:2], x[:2])
    np.testing.assert_array_equal(y[2:], x[2:])
    np.testing.assert_allclose(y, trained.manipulate(x, src, tgt), atol=1e-6)
    older = dict(src, age=src["age"] + 10)   # an age change: not between dx domains
    assert not model.supports(src, older).any()
    np.testing.assert_array_equal(model.manipulate(x, src, older), x)
    assert model.by_construction == ("reconstruction_mse", "composition_l1")


def test_age_domains_choose_the_generator():
    from models import cyclegan
    from mri.data.loader import parse_domains
    s = schema()
    model = cyclegan.CycleGAN(s, parse_domains("age<65:age>=75", s), size=32, filters=2, blocks=1)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 1)).astype(np.float32)
    src, tgt = {"age": np.array([60.0, 80, 60, 70])}, {"age": np.array([80.0, 60, 62, 80])}
    np.testing.assert_array_equal(model.supports(src, tgt), [True, True, False, False])
    y = model.manipulate(x, src, tgt)
    np.testing.assert_allclose(y[:2], np.concatenate([model.g_ab(x[:1]), model.g_ba(x[1:2])]), atol=1e-6)
    np.testing.assert_array_equal(y[2:], x[2:])


def test_epoch_grids_show_both_cycles(run4):
    """Rows: 2 slices of each domain; columns: the slice, its translation, the cycle back (2-pixel gaps)."""
    out, model = run4
    size = model.g_ab.input_shape[1]
    for name in ("epoch_004.png", "epoch_004_change.png"):
        assert grids.read_png_size(os.path.join(out, "samples", name)) == (4 * (size + 2) + 2, 3 * (size + 2) + 2)


def test_script_help_has_seed_and_domains(script_help):
    out = script_help["train_cyclegan.py"]
    assert "--seed" in out and "--domains" in out
