"""The oracle: architecture, training CLI, Keras-format save/load, reproducibility, clear errors."""
import json
import math
import os

import numpy as np
import pytest

from models import oracle
from mri.io import write_json
from mri.store import SliceStore


@pytest.fixture(scope="module")
def runs(store_path, tmp_path_factory):
    """Two train_oracle.py runs with the same arguments and seed."""
    import train_oracle
    out = []
    for k in range(2):
        out.append(str(tmp_path_factory.mktemp(f"oracle{k}")))
        train_oracle.main(["--store", store_path, "--attrs", "age,dx,sex", "--out", out[-1], "--tiny",
                           "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "8", "--seed", "5"])
    return out


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
    val = json.load(open(os.path.join(runs[0], "val_metrics.json")))
    assert set(val) == {"age", "dx", "sex"}
    assert math.isfinite(val["age"]["mae"]) and 0 <= val["dx"]["accuracy"] <= 1 and 0 <= val["sex"]["accuracy"] <= 1
    assert os.path.exists(os.path.join(runs[0], oracle.MODEL_FILE))


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
    from mri.loader import Batches
    with SliceStore(store_path) as store:
        train = Batches(store, "train", ["age", "dx"], batch_size=4, seed=0)
        val = Batches(store, "val", ["age", "dx"], batch_size=4, seed=0, shuffle=False)
        model = oracle.compile_for(oracle.build(train.schema, store.size, **oracle.TINY), train.schema)
        oracle.fit(model, train, val, epochs=1, steps_per_epoch=2, verbose=0)
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
