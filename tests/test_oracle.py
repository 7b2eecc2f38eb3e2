"""The oracle: architecture, training CLI, Keras-format save/load, reproducibility, clear errors."""
import json
import math
import os

import numpy as np
import pytest

from conftest import train_tiny_oracle
from models import oracle
from mri import stats
from mri.data.io import write_json
from mri.data.store import SliceStore


@pytest.fixture(scope="module")
def runs(store_path, oracle_run, tmp_path_factory):
    """Two train_oracle.py runs with the same arguments and seed: the shared one and a second."""
    return [oracle_run, train_tiny_oracle(store_path, str(tmp_path_factory.mktemp("oracle_twin")))]


def test_heads_features_and_shapes(store_path):
    with SliceStore(store_path) as store:
        schema = store.schema.select(["age", "dx", "sex"])
        model = oracle.build(schema, store.size)
        assert model.get_layer("features").units == oracle.FEATURES == 256
        assert [model.get_layer(f"head_{n}").units for n in schema.names] == [1, 3, 1]
        assert [model.get_layer(f"block{i}_conv2").filters for i in (1, 2, 3, 4)] == list(oracle.FILTERS)
        o = oracle.Oracle(oracle.build(schema, store.size, **oracle.TINY), schema)
        feats, logits = o.outputs(store.images(np.arange(5)), batch_size=2)
        assert feats.shape == (5, oracle.TINY["features"]) and logits.shape == (5, schema.width)
        raw = o.predict_raw(store.images(np.arange(5)))
        assert set(raw) == {"age", "dx", "sex"} and raw["age"].dtype.kind == "f"
        assert set(raw["dx"]) <= {0, 1, 2} and set(raw["sex"]) <= {0, 1}


def test_run_files_and_val_metrics(runs):
    config = json.load(open(os.path.join(runs[0], "config.json")))
    assert config["method"] == "oracle" and config["args"]["seed"] == 5 and config["args"]["tiny"]
    assert [a["name"] for a in config["schema"]] == ["age", "dx", "sex"]
    metrics = json.load(open(os.path.join(runs[0], "val_metrics.json")))
    assert set(metrics["epoch"]) == {"age", "dx", "sex"} and set(metrics["epoch"].values()) <= {1, 2}
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    for split in ("train", "val"):
        m = metrics[split]
        assert set(m) == {"n", "subjects", "age", "dx", "sex"}
        lo, hi = m["age"]["ci"]["mae"]
        assert math.isfinite(m["age"]["mae"]) and lo <= m["age"]["mae"] <= hi
        assert m["age"]["ci"]["bias"][0] <= m["age"]["bias"] <= m["age"]["ci"]["bias"][1]
        for n in ("dx", "sex"):
            assert 0 <= m[n]["balanced_accuracy"] <= 1 and 0 <= m[n]["accuracy"] <= 1
    assert os.path.exists(os.path.join(runs[0], oracle.MODEL_FILE))


def _tiny(schema, size, **kw):
    return oracle.build(schema, size, **{**oracle.TINY, "dropout": 0.0, **kw})


def test_recalibrated_batchnorm_matches_the_weights(store_path):
    """One batch: inference mode then computes exactly what training mode computes on it (moving statistics =
    that batch's); several: the first BN's moving mean is the plain mean of the batch means, weights untouched."""
    import keras
    from mri.data.loader import Batches
    with SliceStore(store_path) as store:
        batches = Batches(store, "train", ["age", "dx"], batch_size=4, seed=0)
        model = _tiny(batches.schema, store.size)
        frozen = [w.numpy().copy() for w in model.trainable_weights]
        x = batches.batch(0)[0]
        assert not np.allclose(model(x, training=False), model(x, training=True), atol=1e-3)
        oracle.recalibrate_batchnorm(model, batches, steps=1)
        np.testing.assert_allclose(model(x, training=False), model(x, training=True), rtol=1e-4, atol=1e-5)
        oracle.recalibrate_batchnorm(model, batches, steps=3, start_step=1)
        conv = keras.Model(model.inputs, model.get_layer("block1_conv1").output)
        means = [np.asarray(conv(batches.batch(t)[0])).mean(axis=(0, 1, 2)) for t in (1, 2, 3)]
        np.testing.assert_allclose(model.get_layer("block1_bn1").moving_mean, np.mean(means, 0), rtol=1e-4, atol=1e-6)
        assert model.get_layer("block1_bn1").momentum == 0.9
        for a, b in zip(frozen, model.trainable_weights):
            np.testing.assert_array_equal(a, b)


def test_compose_reads_each_attribute_with_its_own_weights(store_path):
    with SliceStore(store_path) as store:
        schema = store.schema.select(["age", "dx", "sex"])
        x = store.images(np.arange(6))[..., None]
        nets = [_tiny(schema, store.size) for _ in range(2)]   # two different initialisations
        w_a, w_b = (n.get_weights() for n in nets)
        composed = oracle.compose(schema, store.size, {"age": w_a, "dx": w_b, "sex": w_a}, **oracle.TINY, dropout=0.0)
        assert composed.get_layer("dx_block1_conv1") is not None
        want = np.concatenate([np.asarray(nets[k](x))[:, schema.slices[n]]
                               for n, k in (("age", 0), ("dx", 1), ("sex", 0))], axis=1)
        np.testing.assert_allclose(composed(x), want, rtol=1e-5, atol=1e-6)
        feats = oracle.Oracle(composed, schema).features(x)   # the first attribute's network gives the features
        first = keras_features(nets[0])(x)
        np.testing.assert_allclose(feats, first, rtol=1e-5, atol=1e-6)
        single = oracle.compose(schema, store.size, {n: w_b for n in schema.names}, **oracle.TINY, dropout=0.0)
        assert len(single.layers) == len(nets[1].layers)
        np.testing.assert_allclose(single(x), nets[1](x), rtol=1e-5, atol=1e-6)


def keras_features(model):
    import keras
    return keras.Model(model.inputs, model.get_layer("features").output)


def test_fit_keeps_each_attributes_best_epoch_and_stops_on_patience(store_path, monkeypatch):
    """Scripted validation scores: age is best at epoch 1, dx at epoch 3; training stops after two epochs
    without improvement, and the composed oracle reads age with epoch 1's weights and dx with epoch 3's."""
    from mri.data.loader import Batches
    script = [{"age": (2.0,), "dx": (-0.4, 1.0)}, {"age": (3.0,), "dx": (-0.5, 1.2)},
              {"age": (2.5,), "dx": (-0.6, 0.9)}, {"age": (2.2,), "dx": (-0.6, 0.95)}, {"age": (2.1,), "dx": (-0.55, 1.0)},
              {"age": (0.1,), "dx": (-0.9, 0.1)}]
    seen = []
    monkeypatch.setattr(oracle, "selection_scores", lambda schema, logits, attrs, idx: script[len(seen) - 1])
    real = oracle.split_logits
    monkeypatch.setattr(oracle, "split_logits", lambda model, *a, **k: (seen.append(model.get_weights()), real(model, *a, **k))[1])
    with SliceStore(store_path) as store:
        train = Batches(store, "train", ["age", "dx"], batch_size=4, seed=0)
        model = oracle.compile_for(_tiny(train.schema, store.size), train.schema)
        composed, epochs, history = oracle.fit(model, train, epochs=6, steps_per_epoch=2, patience=2,
                                               calibration=train, calibration_steps=1, verbose=0, log=lambda *a: None)
        assert epochs == {"age": 1, "dx": 3} and len(history) == 5 and len(seen) == 5
        x = store.images(np.arange(5))[..., None]
        for name, epoch in epochs.items():
            ref = _tiny(train.schema, store.size)
            ref.set_weights(seen[epoch - 1])
            s = train.schema.slices[name]
            np.testing.assert_allclose(np.asarray(composed(x))[:, s], np.asarray(ref(x))[:, s], rtol=1e-5, atol=1e-6)


def test_selection_scores_rank_lower_is_better():
    from mri.data.attributes import Attribute, Schema
    schema = Schema([Attribute("age", "continuous", mean=70.0, std=10.0), Attribute("dx", "categorical", ["CN", "MCI", "AD"])])
    truth = {"age": np.array([60.0, 70.0, 80.0, 90.0]), "dx": np.array([0, 0, 0, 1])}
    idx = np.arange(4)

    def logits(age, dx):
        return np.concatenate([((np.asarray(age) - 70.0) / 10.0)[:, None], 5.0 * np.eye(3)[dx]], axis=1)
    good = oracle.selection_scores(schema, logits([61, 70, 79, 90], [0, 0, 1, 1]), truth, idx)
    bad = oracle.selection_scores(schema, logits([65, 72, 75, 80], [0, 0, 0, 0]), truth, idx)
    np.testing.assert_allclose(good["age"][0], 0.5)
    assert good["age"] < bad["age"]
    # all-majority prediction: accuracy 0.75 but balanced accuracy 0.5; the other reads both classes (bal. 0.83)
    np.testing.assert_allclose(-bad["dx"][0], 0.5)
    np.testing.assert_allclose(-good["dx"][0], (2 / 3 + 1) / 2)
    assert good["dx"] < bad["dx"]


def test_balanced_accuracy_is_mean_recall_and_resamples_by_weight():
    t = np.array([0, 0, 0, 0, 1, 2, 2])
    p = np.array([0, 0, 0, 0, 0, 2, 1])
    np.testing.assert_allclose(stats.balanced_accuracy(p, t), (1 + 0 + 0.5) / 3)
    w = np.array([[2, 1, 1, 1, 1, 3, 0]])
    rep = np.repeat(np.arange(7), w[0])
    np.testing.assert_allclose(stats.balanced_accuracy(p, t, w), [stats.balanced_accuracy(p[rep], t[rep])])


def test_split_metrics_bias_mae_and_intervals(store_path, monkeypatch):
    """A reader 3 years too old and always saying the first class: bias +3, MAE 3, balanced accuracy = chance."""
    with SliceStore(store_path) as store:
        schema = store.schema.select(["age", "dx"])
        idx = store.indices("val")
        fake = {"age": store.attrs["age"][idx] + 3.0, "dx": np.zeros(len(idx))}
        monkeypatch.setattr(oracle, "split_predictions", lambda o, st, split, *a: (idx, fake))
        m = oracle.split_metrics(oracle.Oracle(_tiny(schema, store.size), schema), store, "val", n_boot=200)
        t = store.attrs["dx"][idx]
        assert m["n"] == len(idx) and m["subjects"] == len(set(store.subject[idx]))
        np.testing.assert_allclose([m["age"]["mae"], m["age"]["bias"]], [3.0, 3.0], rtol=1e-5)
        np.testing.assert_allclose(m["age"]["ci"]["bias"], [3.0, 3.0], rtol=1e-5)
        np.testing.assert_allclose(m["dx"]["balanced_accuracy"], 1.0 / len(np.unique(t)))
        np.testing.assert_allclose(m["dx"]["accuracy"], np.mean(t == 0))
        assert m["dx"]["chance_balanced_accuracy"] == 1.0 / len(np.unique(t))


def test_same_seed_same_oracle(runs, store_path):
    with SliceStore(store_path) as store:
        x = store.images(store.indices("test"))
    loaded = oracle.load_oracle(runs[0])
    assert loaded.schema.names == ["age", "dx", "sex"]
    twin = oracle.load_oracle(runs[1])
    for a, b in zip(loaded.outputs(x), twin.outputs(x)):
        np.testing.assert_array_equal(a, b)
    assert open(os.path.join(runs[0], "val_metrics.json")).read() == open(os.path.join(runs[1], "val_metrics.json")).read()


def test_save_load_gives_identical_predictions(store_path, tmp_path):
    from mri.data.loader import Batches
    with SliceStore(store_path) as store:
        train = Batches(store, "train", ["age", "dx"], batch_size=4, seed=0)
        model = oracle.compile_for(oracle.build(train.schema, store.size, **oracle.TINY), train.schema)
        model = oracle.fit(model, train, epochs=1, steps_per_epoch=2, verbose=0, log=lambda *a: None)[0]
        write_json(tmp_path / "config.json", {"method": "oracle", "schema": json.loads(train.schema.to_json())})
        oracle.save(model, str(tmp_path))
        x = store.images(np.arange(6))
        for a, b in zip(oracle.Oracle(model, train.schema).outputs(x), oracle.load_oracle(str(tmp_path)).outputs(x)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_clear_errors(store_path, tmp_path):
    import train_oracle
    with pytest.raises(FileNotFoundError, match="not a trained oracle.*train_oracle.py"):
        oracle.load_oracle(str(tmp_path / "missing"))
    write_json(tmp_path / "config.json", {"method": "fader", "schema": []})
    open(tmp_path / oracle.MODEL_FILE, "w").close()
    with pytest.raises(ValueError, match="not an oracle"):
        oracle.load_oracle(str(tmp_path))
    with pytest.raises(SystemExit, match="apoe.*not in the store"):
        train_oracle.main(["--store", store_path, "--attrs", "age,apoe", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="cannot open store"):
        train_oracle.main(["--store", str(tmp_path / "none.h5"), "--out", str(tmp_path / "o")])


def test_cosine_learning_rate(store_path):
    with SliceStore(store_path) as store:
        schema = store.schema.select(["age"])
        model = oracle.compile_for(_tiny(schema, store.size), schema, 1e-3, decay_steps=10)
        model.optimizer.build(model.trainable_weights)
        for step in (0, 5, 10):
            model.optimizer.iterations.assign(step)
            np.testing.assert_allclose(float(model.optimizer.learning_rate), 1e-3 * 0.5 * (1 + math.cos(math.pi * step / 10)), atol=1e-9)
        flat = oracle.compile_for(_tiny(schema, store.size), schema, 1e-3)
        flat.optimizer.build(flat.trainable_weights)
        flat.optimizer.iterations.assign(7)
        np.testing.assert_allclose(float(flat.optimizer.learning_rate), 1e-3)


def test_split_indices_keep_whole_subjects(store_path):
    with SliceStore(store_path) as store:
        everything = store.indices("train")
        assert np.array_equal(oracle.split_indices(store, "train"), everything)
        some = oracle.split_indices(store, "train", max_subjects=2, seed=1)
        kept = set(store.subject[some])
        assert len(kept) == 2 and np.array_equal(some, everything[np.isin(store.subject[everything], list(kept))])
