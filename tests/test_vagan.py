"""VA-GAN: the gradient penalty, the output bounding, the critic schedule and its draws, the critic's real partners
under the target attributes, the map weight and the TV term, a toy where the map must learn a local change, exact
resume through train_vagan.main, every attribute kind, and the regressor's checks."""
import numpy as np
import pytest

from conftest import read_checkpoint, read_log
from mri.data.attributes import Attribute, Schema

TINY = ["--attrs", "age,dx,sex", "--tiny", "--batch-size", "4", "--steps-per-epoch", "1", "--seed", "3",
        "--n-critic", "2", "--n-critic-long", "3", "--critic-warmup", "1", "--critic-retune", "3"]


@pytest.fixture(scope="module")
def regressor(oracle_run):
    """The shared tiny oracle run (age, dx, sex) as VA-GAN's regressor."""
    return oracle_run


def train(store_path, regressor, out, *flags):
    import train_vagan
    return train_vagan.main(["--store", store_path, "--regressor", regressor, "--out", str(out), *TINY, *flags])


@pytest.fixture(scope="module")
def run4(store_path, regressor, tmp_path_factory):
    out = tmp_path_factory.mktemp("vagan_run") / "four"
    return str(out), train(store_path, regressor, out, "--epochs", "4").model


def schema1():
    return Schema([Attribute("score", "continuous").fit(np.linspace(0, 1, 11))])


def test_gradient_penalty_of_a_linear_critic(tmp_path):
    """D(x) = sum(w x): its gradient is w everywhere, so GP = (||w||_2 - 1)^2 over all image axes."""
    import keras
    from models import vagan
    model = vagan.VAGAN(schema1(), size=16, filters=2, critic_mode="unconditional")
    x = keras.Input((16, 16, 1))
    model.critic = keras.Model(x, keras.layers.Dense(1, use_bias=False)(keras.layers.Flatten()(x)))
    w = np.random.default_rng(0).normal(0, 0.05, (256, 1)).astype(np.float32)
    model.critic.set_weights([w])
    images = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 1)).astype(np.float32)
    changed = np.clip(images + 0.1, -1, 1)
    y = np.zeros((3, 1), np.float32)
    expected = (np.linalg.norm(w) - 1) ** 2
    for gp_at in vagan.GP_AT:
        model.gp_at = gp_at
        assert float(model.gradient_penalty(images, changed, y)) == pytest.approx(expected, rel=1e-4)


def test_zero_map_returns_the_input_and_the_map_reaches_the_whole_range():
    from models import vagan
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
    x[:, 0] = -1.0      # background
    np.testing.assert_array_equal(np.asarray(vagan.bound(x, np.zeros_like(x))), x)
    hi, lo = np.asarray(vagan.bound(x, np.full_like(x, 20.0))), np.asarray(vagan.bound(x, np.full_like(x, -20.0)))
    np.testing.assert_allclose(hi, 1.0, atol=1e-6)
    np.testing.assert_allclose(lo, -1.0, atol=1e-6)
    some = np.asarray(vagan.bound(x, np.random.default_rng(1).normal(0, 3, x.shape).astype(np.float32)))
    assert some.min() >= -1 and some.max() <= 1
    # a generator whose last layer is zero changes nothing
    model = vagan.VAGAN(schema1(), size=16, filters=2)
    last = model.generator.layers[-1]
    last.set_weights([np.zeros_like(v) for v in last.get_weights()])
    y = {"score": np.array([0.0, 1.0])}
    np.testing.assert_array_equal(model.manipulate(x, {"score": np.array([1.0, 0.0])}, y), x)


def test_critic_schedule():
    from models import vagan
    model = vagan.VAGAN(schema1(), size=16, filters=2, n_critic=5, n_critic_long=100, critic_warmup=25,
                        critic_retune=100)
    n = lambda s: int(model.n_critic(np.int64(s)))
    assert [n(s) for s in (0, 1, 24, 25, 26, 99, 100, 101, 200, 250)] == [100, 100, 100, 5, 5, 5, 100, 5, 100, 5]


@pytest.mark.slow   # trains a regressor and 100 VA-GAN steps until the map has learned (112 CPU s)
def test_toy_map_learns_the_local_change():
    """32x32 smooth noise with a central 8x8 square of intensity s (the score). The frozen regressor reads s;
    VA-GAN must change the square to reach permuted target scores: the regressor's error on the changed images
    drops below half of that on the inputs, and the map is concentrated inside the square."""
    import keras
    import tensorflow as tf
    from scipy import ndimage
    from models import vagan
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = 512
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (n, 32, 32)), (0, 2.5, 2.5))
    x = np.clip(0.5 * noise / noise.std() - 0.5, -1, 1)
    s = rng.uniform(0, 1, n)
    inside = np.zeros((32, 32), bool)
    inside[12:20, 12:20] = True
    x[:, inside] = (2 * s - 1)[:, None]
    x = x[..., None].astype(np.float32)
    schema = Schema([Attribute("score", "continuous").fit(s)])
    y = schema.encode({"score": s})
    inp = keras.Input((32, 32, 1))
    h = inp
    for f in (8, 16, 16):
        h = keras.layers.MaxPooling2D()(keras.layers.Conv2D(f, 3, padding="same", activation="relu")(h))
    reg = keras.Model(inp, keras.layers.Dense(1)(keras.layers.Flatten()(h)))
    reg.compile(keras.optimizers.Adam(3e-3), "mse")
    reg.fit(x, y, batch_size=32, epochs=12, verbose=0)
    model = vagan.VAGAN(schema, size=32, filters=8, regressor=(reg, schema), n_critic=2, n_critic_long=2,
                        critic_warmup=1, critic_retune=1000, lambda_map=5.0, seed=0)
    model.compile(keras.optimizers.Adam(1e-3, beta_1=0.0, beta_2=0.9), keras.optimizers.Adam(1e-3, beta_1=0.0, beta_2=0.9))

    def draws():     # 3 draws a step (n_critic 2 + 1): 32 sources, each with a random real partner
        g = np.random.default_rng(1)
        while True:
            i, j = g.integers(0, n, (2, 3, 32))
            yield np.concatenate([x[i], x[j]], -1), np.concatenate([y[i], y[j]], -1)
    spec = (tf.TensorSpec((3, 32, 32, 32, 2), tf.float32), tf.TensorSpec((3, 32, 2), tf.float32))
    model.fit(tf.data.Dataset.from_generator(draws, output_signature=spec), steps_per_epoch=100, epochs=1, verbose=0)
    target = rng.permutation(s)
    changed = model.manipulate(x, {"score": s}, {"score": target})
    before = np.abs(schema.decode(reg.predict(x, verbose=0))["score"] - target).mean()
    after = np.abs(schema.decode(reg.predict(changed, verbose=0))["score"] - target).mean()
    assert after < 0.5 * before, (before, after)
    m = np.abs(changed - x)[..., 0]
    assert m[:, inside].mean() > 2 * m[:, ~inside].mean(), (m[:, inside].mean(), m[:, ~inside].mean())


def test_tiny_run_logs_and_resume_is_exact(store_path, regressor, run4, tmp_path):
    out, model = run4
    rows = read_log(out)
    assert [float(r["n_critic"]) for r in rows] == [3, 2, 2, 3]      # warm-up 1 step, re-tune every 3rd
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("critic", "gp", "generator", "map_l1", "aux"))
    assert float(rows[-1]["aux"]) > 0 and int(model.step.numpy()) == 4
    two = tmp_path / "two_plus_two"
    train(store_path, regressor, two, "--epochs", "2")
    train(store_path, regressor, two, "--epochs", "4", "--resume")
    a, b = read_checkpoint(out), read_checkpoint(two)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_reloaded_run_manipulates_every_attribute_kind(store_path, run4):
    from models import load_method
    from mri.data.store import SliceStore
    out, trained = run4
    with SliceStore(store_path) as store:
        idx = store.indices("test")[:4]
        x = store.images(idx)[..., None]
        src = store.raw(idx)
        model = load_method(out, store)
        assert model.frozen is None and model.schema.names == ["age", "dx", "sex"]
        for target in ({"age": src["age"] + 10}, {"dx": (src["dx"] + 1) % 3}, {"sex": 1 - src["sex"]}):
            t = dict(src, **target)
            y = model.manipulate(x, src, t)
            assert y.shape == x.shape and not np.array_equal(y, x) and y.min() >= -1 and y.max() <= 1
            np.testing.assert_allclose(y, trained.manipulate(x, src, t), atol=1e-6)
            np.testing.assert_allclose(model.maps(x, src, t), y - x, atol=1e-6)
        np.testing.assert_array_equal(model.manipulate(x, src, src), x)   # unchanged attributes: the input


def test_unconditional_critic_and_report_gp(store_path, regressor, tmp_path):
    run = train(store_path, regressor, tmp_path / "uncond", "--epochs", "1", "--critic", "unconditional",
                "--gp-at", "changed")
    model = run.model
    assert len(model.critic.inputs) == 1 and model.gp_at == "changed" and int(model.step.numpy()) == 1


def linear_critic_model(n_critic=2):
    """A 16 px model whose critic is D(x, y) = a.y + b sum(x) and whose map is zero (x' = x), neither trained
    (SGD at rate 0): its logged terms are computable by hand."""
    import keras
    from models import vagan
    schema = Schema([Attribute("score", "continuous").fit(np.linspace(0, 1, 11)), Attribute("sex", "binary")])
    model = vagan.VAGAN(schema, size=16, filters=2, n_critic=n_critic, n_critic_long=n_critic, critic_warmup=0)
    x, y = keras.Input((16, 16, 1)), keras.Input((schema.width,))
    s = keras.layers.Concatenate()([keras.layers.Flatten()(x), y])
    model.critic = keras.Model([x, y], keras.layers.Dense(1, use_bias=False)(s))
    a, b = np.array([3.0, -2.0], np.float32), np.float32(0.01)
    model.critic.set_weights([np.concatenate([np.full(256, b), a])[:, None].astype(np.float32)])
    last = model.generator.layers[-1]
    last.set_weights([np.zeros_like(v) for v in last.get_weights()])
    model.compile(keras.optimizers.SGD(0.0), keras.optimizers.SGD(0.0))
    d = lambda img, att: att @ a + b * img.reshape(len(img), -1).sum(1)
    return model, schema, d


def test_each_critic_step_has_its_own_draw_and_real_partners_carry_the_targets():
    """Critic step i sees draw i: (real partner, target) against (x', target); M sees the last draw. With a
    linear critic and a zero map the logged Wasserstein estimate is the mean over the critic steps of
    mean D(r_i, y_t,i) - mean D(x_i, y_t,i), the generator term -mean D(x_2, y_t,2). Reusing one draw, or
    scoring either side at the source attributes y_s, changes both."""
    model, schema, d = linear_critic_model(n_critic=2)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 4, 16, 16, 2)).astype(np.float32)
    images += np.arange(3, dtype=np.float32)[:, None, None, None, None]      # each draw its own level
    images = np.clip(images, -1, 1)
    y_s = schema.encode({"score": rng.uniform(0, 1, (3 * 4)), "sex": rng.integers(0, 2, 12)}).reshape(3, 4, -1)
    y_t = schema.encode({"score": rng.uniform(0, 1, (3 * 4)), "sex": rng.integers(0, 2, 12)}).reshape(3, 4, -1)
    import tensorflow as tf
    logs = model.train_step((tf.constant(images), tf.constant(np.concatenate([y_s, y_t], -1))))
    w = [d(images[i, ..., 1], y_t[i]).mean() - d(images[i, ..., 0], y_t[i]).mean() for i in range(2)]
    assert float(logs["wasserstein"]) == pytest.approx(np.mean(w), rel=1e-4, abs=1e-5)
    assert float(logs["generator"]) == pytest.approx(-d(images[2, ..., 0], y_t[2]).mean(), rel=1e-4, abs=1e-5)
    # the wiring bugs this rules out give other values
    assert abs(np.mean(w) - w[0]) > 0.05
    with_source = np.mean([d(images[i, ..., 1], y_s[i]).mean() - d(images[i, ..., 0], y_t[i]).mean() for i in range(2)])
    assert abs(np.mean(w) - with_source) > 0.05


def test_wrong_number_of_draws_is_refused():
    import tensorflow as tf
    model, schema, _ = linear_critic_model(n_critic=2)
    with pytest.raises(Exception, match="n_critic \\+ 1 draws"):
        model.train_step((tf.zeros((2, 4, 16, 16, 2)), tf.zeros((2, 4, 2 * schema.width))))


def test_critic_draws_fresh_batches_with_partners_at_the_same_position(store_path):
    """Draws are consecutive batches of the source Batches (3, 2, 3, ... per step here); each source slice's
    partner is a slice at the same axial index whose encoded attributes are the target."""
    from mri.data.loader import Batches, CriticDraws
    source = Batches(store_path, "train", ["age", "dx", "sex"], batch_size=4, seed=5, jitter=0.0)
    draws = CriticDraws(source, lambda s: np.where(np.asarray(s) % 2 == 0, 3, 2))
    w, store = source.schema.width, source.store
    offset = 0
    for step in range(4):
        images, attrs = draws.batch(step)
        assert images.shape == ((3 if step % 2 == 0 else 2), 4, 32, 32, 2)
        for j in range(len(images)):
            x, y = source.batch(offset + j)
            np.testing.assert_array_equal(images[j, ..., :1], x)
            np.testing.assert_array_equal(attrs[j, :, :w], y)
            src_idx, partner = draws.partners(offset + j)
            assert (store.slice[partner] == store.slice[src_idx]).all()
            np.testing.assert_array_equal(images[j, ..., 1], store.images(partner))
            np.testing.assert_array_equal(attrs[j, :, w:], store.encoded(partner, source.schema))
        assert not np.array_equal(images[0], images[1])
        offset += len(images)
    np.testing.assert_array_equal(draws.batch(2)[0], CriticDraws(source, draws.draws).batch(2)[0])
    assert draws.steps_per_epoch == int(np.searchsorted(np.cumsum([3, 2] * 50), source.steps_per_epoch)) + 1


def test_map_weight_eases_with_the_size_of_the_change():
    from models import vagan
    model = vagan.VAGAN(schema1(), size=16, filters=2, gap_scale=4.0)
    y_s = np.array([[0.0], [1.0], [2.0]], np.float32)
    y_t = np.array([[0.0], [-1.0], [4.0]], np.float32)
    np.testing.assert_allclose(np.asarray(model.map_weights(y_s, y_t)), np.exp(-np.array([0, 2, 2]) / 4.0), rtol=1e-6)


def test_total_variation_and_its_pull_on_the_map():
    """TV of a single spike by hand, its gradient pushes the spike down; generator steps on lambda_tv alone
    (zero critic, no map weight, no regressor) make the maps smoother."""
    import keras
    import tensorflow as tf
    from models import vagan
    m = np.zeros((1, 8, 8, 1), np.float32)
    m[0, 3, 3] = 1.0
    spike = tf.constant(m)
    with tf.GradientTape() as tape:
        tape.watch(spike)
        tv = vagan.total_variation(spike)
    assert float(tv) == pytest.approx(4 / 56)
    assert float(tape.gradient(tv, spike)[0, 3, 3, 0]) == pytest.approx(4 / 56)
    model = vagan.VAGAN(schema1(), size=16, filters=2, lambda_map=0.0, lambda_tv=1.0, seed=1)
    model.critic.set_weights([np.zeros_like(v) for v in model.critic.get_weights()])
    model.compile(keras.optimizers.Adam(3e-3), keras.optimizers.SGD(0.0))
    x = tf.constant(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32))
    y_s, y_t = tf.zeros((4, 1)), tf.ones((4, 1))
    before = float(vagan.total_variation(model.change(x, y_s, y_t, training=True)[1]))
    for _ in range(15):
        model.generator_step(x, y_s, y_t)
    after = float(vagan.total_variation(model.change(x, y_s, y_t, training=True)[1]))
    assert after < 0.7 * before, (before, after)


def test_regressor_must_predict_the_attributes(store_path, regressor, tmp_path):
    import train_oracle
    only_age = str(tmp_path / "age_only")
    train_oracle.main(["--store", store_path, "--attrs", "age", "--out", only_age, "--tiny", "--epochs", "1",
                       "--steps-per-epoch", "1", "--calibration-batches", "1"])
    with pytest.raises(SystemExit, match=r"does not predict \['dx', 'sex'\]"):
        train(store_path, only_age, tmp_path / "bad", "--epochs", "1")
    with pytest.raises(SystemExit, match="not a trained oracle"):
        train(store_path, str(tmp_path / "nowhere"), tmp_path / "bad2", "--epochs", "1")


def pair_batch(schema, rng, n=4, size=16):
    """Visit pairs whose two slices have different foregrounds (the later one wider), conditions (y_s, y_t, dt)."""
    x_s = np.full((n, size, size, 1), -1.0, np.float32)
    x_t = np.full((n, size, size, 1), -1.0, np.float32)
    x_s[:, 5:11, 5:11] = rng.uniform(0, 1, (n, 6, 6, 1))
    x_t[:, 3:13, 3:13] = rng.uniform(-0.5, 0.5, (n, 10, 10, 1))
    y_s = schema.encode({"score": rng.uniform(0, 1, n), "sex": rng.integers(0, 2, n)})
    y_t = schema.encode({"score": rng.uniform(0, 1, n), "sex": rng.integers(0, 2, n)})
    cond = np.concatenate([y_s, y_t, np.full((n, 1), 2.0)], axis=1).astype(np.float32)
    return np.concatenate([x_s, x_t], axis=-1), cond


def masked_mse(x_s, x_t):
    """The pair loss of an unchanged source by hand: the source's foreground grown by 2 pixels."""
    from scipy import ndimage
    mask = np.stack([ndimage.binary_dilation(m, np.ones((5, 5), bool)) for m in x_s[..., 0] > -0.9])[..., None]
    return float((mask * (x_s - x_t) ** 2).sum() / mask.sum())


def test_visit_pairs_are_scored_inside_the_sources_foreground_at_the_later_visit():
    """train_step with a pair batch logs the pair loss: for a zero map, the MSE of the source to the later visit
    inside the source's grown foreground (the later visit's foreground, or the unchanged source as target, give
    other values); a pair weight without pairs is refused."""
    import tensorflow as tf
    model, schema, _ = linear_critic_model(n_critic=2)
    model.pair_weight = 1.0
    rng = np.random.default_rng(1)
    images = np.clip(rng.uniform(-1, 1, (3, 4, 16, 16, 2)), -1, 1).astype(np.float32)
    attrs = np.zeros((3, 4, 2 * schema.width), np.float32)
    pairs, cond = pair_batch(schema, rng)
    logs = model.train_step(tuple(tf.constant(a) for a in (images, attrs, pairs, cond)))
    x_s, x_t = pairs[..., :1], pairs[..., 1:]
    expected = masked_mse(x_s, x_t)
    assert float(logs["pair"]) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - masked_mse(x_t, x_s)) > 0.01 and expected > 0.01
    with pytest.raises(Exception, match="visit pairs"):
        model.train_step((tf.constant(images), tf.constant(attrs)))


def test_the_pair_loss_pulls_the_map_towards_the_later_visit():
    """Generator steps on the pair loss alone (zero critic, no map weight, no regressor) bring the changed source
    closer to the later visit."""
    import keras
    from models import vagan
    schema = Schema([Attribute("score", "continuous").fit(np.linspace(0, 1, 11)), Attribute("sex", "binary")])
    model = vagan.VAGAN(schema, size=16, filters=2, lambda_map=0.0, pair_weight=1.0, seed=1)
    model.critic.set_weights([np.zeros_like(v) for v in model.critic.get_weights()])
    model.compile(keras.optimizers.Adam(3e-3), keras.optimizers.SGD(0.0))
    pairs, cond = pair_batch(schema, np.random.default_rng(2))
    w = schema.width
    x_s, x_t, y_s, y_t = pairs[..., :1], pairs[..., 1:], cond[:, :w], cond[:, w:2 * w]
    before = float(model.pair_loss(x_s, y_s, x_t, y_t))
    import tensorflow as tf
    x, y = tf.zeros((4, 16, 16, 1)), tf.zeros((4, w))
    for _ in range(20):
        model.generator_step(x, y, y, (tf.constant(pairs), tf.constant(cond)))
    assert float(model.pair_loss(x_s, y_s, x_t, y_t)) < 0.8 * before


def test_with_pairs_joins_draws_and_visit_pairs_and_a_tiny_run_logs_the_pair_loss(store_path, regressor, tmp_path):
    from mri.data.loader import Batches, CriticDraws, VisitPairs, WithPairs, dataset
    source = Batches(store_path, "train", ["age", "dx", "sex"], batch_size=4, seed=5, jitter=0.0)
    draws = CriticDraws(source, lambda s: np.where(np.asarray(s) % 2 == 0, 3, 2))
    visits = VisitPairs(source.store, "train", ["age", "dx", "sex"], batch_size=4, seed=5)
    joined = WithPairs(draws, visits)
    for step in (0, 1):
        got = joined.batch(step)
        for a, b in zip(got, (*draws.batch(step), *visits.batch(step))):
            np.testing.assert_array_equal(a, b)
    first = [tuple(t.shape) for t in next(iter(dataset(joined, start_step=1)))]
    assert first == [a.shape for a in joined.batch(1)] and first[0][0] == 2
    train(store_path, regressor, tmp_path / "pairs", "--epochs", "1", "--pair-weight", "1")
    assert float(read_log(tmp_path / "pairs")[-1]["pair"]) > 0
