"""InfoGAN: the MI loss trains the shared trunk, a toy where Q recovers the codes of generated shapes, the
code-to-attribute map on a constructed case, exact resume across the phases through train_infogan.main, and
the reloaded run's modes and supported changes."""
import numpy as np
import pytest

from conftest import read_checkpoint, read_log
from mri.data.attributes import Attribute, Schema


@pytest.fixture(scope="module")
def straight(store_path, tmp_path_factory):
    """A tiny run of 2 GAN + 2 encoder steps in one go, and the same in two calls, 2 GAN steps then --resume:
    (run dir, trained model, the resumed run's dir)."""
    import train_infogan
    root = tmp_path_factory.mktemp("infogan")
    flags = ["--store", store_path, "--attrs", "age,dx,sex", "--tiny", "--z-dim", "8", "--batch-size", "4",
             "--steps-per-epoch", "1", "--seed", "3", "--epochs", "2"]
    model = train_infogan.main([*flags, "--out", str(root / "straight"), "--encoder-epochs", "2"])
    for encoder_epochs, resume in (("0", []), ("2", ["--resume"])):
        train_infogan.main([*flags, "--out", str(root / "resumed"), "--encoder-epochs", encoder_epochs, *resume])
    return root / "straight", model, root / "resumed"


def dx_schema(classes=3):
    return Schema([Attribute("dx", "categorical", [f"c{i}" for i in range(classes)])])


def small(schema, size=16, **kwargs):
    import keras
    from models import infogan
    model = infogan.InfoGAN(schema, size, **dict(dict(z_dim=8, cont_dim=1, filters=8, hidden=64), **kwargs))
    adam = lambda lr: keras.optimizers.Adam(lr, beta_1=0.5, beta_2=0.99)
    model.compile(adam(2e-4), adam(1e-3), adam(1e-3))
    return model


def test_the_q_loss_trains_the_shared_trunk():
    """The MI term moves the trunk: a D step of two identical models, one with lambda_cat = lambda_cont = 0,
    leaves their trunks different and their D heads equal (D's head gradient does not involve L_MI); Q's head
    moves only in the G/Q step, and the G/Q step never moves the trunk or D's head."""
    import keras
    weights = lambda m, net: [w.numpy().copy() for w in getattr(m, net).trainable_weights]
    after = {}
    for lam in (1.0, 0.0):
        keras.utils.set_random_seed(3)                                  # two identical models
        model = small(dx_schema(), lambda_cat=lam, lambda_cont=lam, seed=3)
        x = np.asarray(model.generate(*model.sample_codes(8)[::2]))       # any images: the step's real batch
        q_before = weights(model, "q_head")
        model.d_step(x)
        after[lam] = {net: weights(model, net) for net in ("trunk", "d_head", "q_head")}
        assert all(np.array_equal(a, b) for a, b in zip(q_before, after[lam]["q_head"]))
        frozen = {net: weights(model, net) for net in ("trunk", "d_head")}
        model.g_step(8)
        for net in frozen:
            assert all(np.array_equal(a, b) for a, b in zip(frozen[net], weights(model, net))), net
        assert any(not np.array_equal(a, b) for a, b in zip(after[lam]["q_head"], weights(model, "q_head"))) == (lam > 0)
    assert any(not np.allclose(a, b) for a, b in zip(after[1.0]["trunk"], after[0.0]["trunk"]))
    assert all(np.array_equal(a, b) for a, b in zip(after[1.0]["d_head"], after[0.0]["d_head"]))


def shapes(n, size, rng):
    """Three shapes (square, horizontal bar, vertical bar) at a random vertical position p in [-1, 1]."""
    x = np.full((n, size, size), -1.0, np.float32)
    kind, p = rng.integers(0, 3, n), rng.uniform(-1, 1, n)
    centre = np.round(size / 2 + p * (size / 2 - 4)).astype(int)
    half = [(3, 3), (1, 5), (4, 1)]
    for i in range(n):
        h, w = half[kind[i]]
        x[i, centre[i] - h:centre[i] + h + 1, size // 2 - w:size // 2 + w + 1] = 1.0
    return x[..., None], kind


@pytest.mark.slow   # 300 InfoGAN steps until Q reads the codes (19 CPU s)
def test_toy_q_recovers_the_codes_of_generated_shapes():
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    x, kind = shapes(1024, 16, np.random.default_rng(0))
    schema = dx_schema()
    model = small(schema, seed=0)
    data = tf.data.Dataset.from_tensor_slices((x, schema.encode({"dx": kind}))).shuffle(1024, seed=0).repeat().batch(32)
    model.fit(data, steps_per_epoch=300, epochs=1, verbose=0)
    z, k, c = (np.asarray(t) for t in model.sample_codes(512))
    cat, mu = model.predict_codes(np.asarray(model.generate(z, c)))
    assert (cat == k).mean() > 0.9, (cat == k).mean()
    r = np.corrcoef(mu[:, 0], c[:, 3])[0, 1]
    assert r > 0.8, r


def test_codes_are_tied_to_attributes_on_a_constructed_case():
    from scipy.stats import chi2_contingency
    from models import infogan
    rng = np.random.default_rng(0)
    n = 600
    dx, age, position = rng.integers(0, 3, n), rng.uniform(55, 90, n), rng.integers(0, 20, n).astype(float)
    value_of_class = np.array([2, 0, 1])          # the categorical value Q gives class dx (the truth to recover)
    cat = np.where(rng.uniform(size=n) < 0.9, value_of_class[dx], rng.integers(0, 3, n))
    cat[:5] = 3                                   # a fourth value no class needs
    mu = np.stack([0.1 * position - 1 + rng.normal(0, 0.1, n), -(age - 70) / 20 + rng.normal(0, 0.5, n)], 1)
    codes = infogan.assign_codes(cat, mu, 4, ("dx", dx, 3), {"age": age, "slice": position})
    assert codes["categorical"]["classes"] == [1, 2, 0, None]
    assert codes["categorical"]["accuracy"] == pytest.approx(np.mean(value_of_class[dx] == cat), abs=1e-12)
    (c0, c1) = codes["continuous"]
    assert (c0["code"], c0["attribute"], c1["code"], c1["attribute"]) == (0, "slice", 1, "age")
    assert c0["correlation"] > 0.95 and c0["slope"] == pytest.approx(0.1, abs=0.01)
    assert c1["correlation"] == pytest.approx(np.corrcoef(age, mu[:, 1])[0, 1]) and c1["correlation"] < -0.5
    assert c1["slope"] == pytest.approx(-1 / 20, abs=0.01)
    assert codes["categorical"]["majority"] == pytest.approx(np.bincount(dx).max() / n)
    # what each code carries, against definitions computed another way: eta^2 = R^2 of a least-squares fit on
    # the groups' one-hot columns, Cramer's V from the chi-square statistic
    carried = infogan.associations(cat, mu, {"age": age, "slice": position}, {"dx": dx})
    r2 = lambda groups, v: 1 - np.sum((v - np.eye(groups.max() + 1)[groups] @ np.linalg.lstsq(
        np.eye(groups.max() + 1)[groups], v, rcond=None)[0]) ** 2) / np.sum((v - v.mean()) ** 2)
    assert carried["categorical"]["slice"] == pytest.approx(np.sqrt(r2(cat, position)))
    assert carried["continuous 1"]["dx"] == pytest.approx(np.sqrt(r2(dx, mu[:, 1])))
    assert carried["continuous 0"]["slice"] == pytest.approx(c0["correlation"]) and carried["continuous 0"]["slice"] > 0.95
    table = np.zeros((4, 3))
    np.add.at(table, (cat, dx), 1)
    chi2 = chi2_contingency(table, correction=False)[0]
    assert carried["categorical"]["dx"] == pytest.approx(np.sqrt(chi2 / (n * 2))) and carried["categorical"]["dx"] > 0.8
    # weak codes capture nothing: a continuous code below MIN_CORRELATION, a categorical one at chance
    weak = infogan.assign_codes(rng.integers(0, 3, n), np.stack([mu[:, 0], rng.normal(0, 1, n)], 1), 3,
                                ("dx", dx, 3), {"age": age})
    model = infogan.InfoGAN.__new__(infogan.InfoGAN)
    model.codes, model.schema = weak, type("S", (), {"names": ["age", "dx"]})()
    assert abs(weak["continuous"][0]["correlation"]) < infogan.MIN_CORRELATION
    assert model.unsupported() == ["age", "dx"]


def test_codes_for_sets_each_tied_code_from_the_attributes():
    """A class becomes the categorical value assigned to it (a map that is not its own inverse), a tied continuous
    code clip(intercept + slope v); an untied code, and every code of an attribute not given, keep Q's reading."""
    from models import infogan
    value_class = [1, 2, 0, None]                       # value k is read as class value_class[k]
    model = infogan.InfoGAN.__new__(infogan.InfoGAN)
    model.cat_dim, model.codes = 4, {
        "categorical": {"attribute": "dx", "classes": value_class, "accuracy": 0.9, "majority": 0.4},
        "continuous": [{"code": 0, "attribute": "slice", "correlation": infogan.MIN_CORRELATION / 2, "slope": 1.0,
                        "intercept": 0.0},
                       {"code": 1, "attribute": "age", "correlation": -0.8, "slope": -0.05, "intercept": 3.5}]}
    rng = np.random.default_rng(0)
    cat, cont = np.array([3, 3, 3, 1]), rng.uniform(-1, 1, (4, 2)).astype(np.float32)
    dx, age = np.array([0, 1, 2, 2]), np.array([40.0, 60.0, 75.0, 100.0])
    got = model.codes_for(cat, cont, {"dx": dx, "age": age, "slice": np.arange(4)})
    np.testing.assert_array_equal(got[:, :4], np.eye(4)[[value_class.index(k) for k in dx]])
    np.testing.assert_allclose(got[:, 4], cont[:, 0])
    np.testing.assert_allclose(got[:, 5], np.clip(3.5 - 0.05 * age, -1, 1), atol=1e-6)
    assert sorted(np.round(got[:, 5], 6)) == [-1, -0.25, 0.5, 1]     # clipped at both ends and inside
    np.testing.assert_allclose(model.codes_for(cat, cont, {}), np.concatenate([np.eye(4)[cat], cont], 1))


def test_exact_resume_across_the_phase_boundary(straight):
    """2 GAN steps, then --resume with 2 encoder steps == 4 steps in one go (weights, optimizers, RNG state)."""
    want, got = read_checkpoint(straight[0]), read_checkpoint(straight[2])
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
    rows = read_log(straight[0])
    assert [float(r["phase"]) for r in rows] == [0, 0, 1, 1]
    assert all(float(r["ez_loss"]) == 0 for r in rows[:2]) and all(float(r["ez_loss"]) > 0 for r in rows[2:])


def test_reloaded_run_maps_codes_and_manipulates(straight, store_path):
    import json
    import os
    from models import load_method
    out, model, _ = straight
    with open(os.path.join(out, "codes.json")) as f:
        codes = json.load(f)
    assert codes["categorical"]["attribute"] == "dx" and len(codes["categorical"]["classes"]) == 3
    assert len(codes["continuous"]) == 2 and "sex" in codes["unsupported"]      # binary: no code captures it
    n = 4
    x = np.random.default_rng(0).uniform(-1, 1, (n, 32, 32, 1)).astype(np.float32)
    src = {"age": np.full(n, 70.0), "dx": np.zeros(n, int), "sex": np.zeros(n, int), "index": np.arange(n)}
    tgt = dict(src, dx=np.array([1, 2, 0, 0]), sex=np.array([0, 0, 0, 1]))
    decode, residual = load_method(str(out), store_path), load_method(f"{out}@residual", store_path)
    np.testing.assert_allclose(decode.manipulate(x, src, tgt), model.manipulate(x, src, tgt), atol=1e-6)
    dx_ok = "dx" in decode.captured()             # a 4-step run's categorical code may be at chance level
    assert decode.supports(src, tgt).tolist() == [dx_ok, dx_ok, True, False]
    np.testing.assert_array_equal(residual.manipulate(x, src, src), x)
    assert residual.by_construction and not decode.by_construction
    columns = model.sample_columns(x, src)
    assert [len(c) for c in columns] == [n] * 10                             # 2 codes x 5 steps
    cont = np.zeros((n, 2), np.float32)
    cont[:, 1] = -0.5                                                        # column 6: code 2 at its second step
    code = model.code_vector(np.arange(n) % model.cat_dim, cont)             # row r: categorical value r mod cat_dim
    np.testing.assert_allclose(columns[6], model.generate(np.repeat(model.figure_z, n, 0), code), atol=1e-5)


def test_help_has_seed(capsys):
    import train_infogan
    with pytest.raises(SystemExit):
        train_infogan.main(["--help"])
    assert "--seed" in capsys.readouterr().out
