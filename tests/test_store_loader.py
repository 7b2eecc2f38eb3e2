"""Attribute schema, store reading and the tf.data loader."""
import numpy as np
import pytest

from mri.data.attributes import Attribute, Schema
from mri.data.loader import Batches, make_dataset
from mri.data.store import SliceStore, StoreError
from conftest import build_store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """Overrides conftest's store_path: the same tiny store, with adas13 as a fourth attribute."""
    return build_store(str(tmp_path_factory.mktemp("store")), attrs=("age", "dx", "sex", "adas13"))


def schema():
    return Schema([Attribute("age", "continuous").fit([60, 70, 80]), Attribute("sex", "binary", ["M", "F"]),
                   Attribute("dx", "categorical", ["CN", "MCI", "Dementia"])])


def test_encode_decode_round_trip_and_json():
    s = schema()
    raw = {"age": np.array([60.0, 75.5]), "sex": np.array([0, 1]), "dx": np.array([2, 0])}
    y = s.encode(raw)
    assert y.shape == (2, 5) and s.width == 5
    np.testing.assert_allclose(y[:, 0], (raw["age"] - 70) / np.std([60, 70, 80]), rtol=1e-6)
    back = s.decode(y)
    np.testing.assert_allclose(back["age"], raw["age"], rtol=1e-5)
    assert back["dx"].tolist() == [2, 0] and back["sex"].tolist() == [0, 1]
    s2 = Schema.from_json(s.to_json())
    np.testing.assert_array_equal(s2.encode(raw), y)
    with pytest.raises(ValueError, match="class index out of range"):
        s.encode(dict(raw, dx=np.array([3, 0])))
    with pytest.raises(KeyError, match="not in the store"):
        s.select(["apoe"])


def test_class_probabilities_of_logits():
    s = schema()
    logits = np.array([[0.3, 0.0, 0.0, np.log(2), 0.0], [0.3, np.log(3), 5.0, 5.0, 5.0]])
    np.testing.assert_allclose(s.probability(logits, "sex", [0, 1]), [0.5, 0.75])
    np.testing.assert_allclose(s.probability(logits, "dx", [1, 2]), [0.5, 1 / 3])
    with pytest.raises(ValueError, match="continuous"):
        s.probability(logits, "age", [0, 0])


def test_losses_per_kind_and_flip():
    import keras
    s = schema()
    y = s.encode({"age": np.array([60.0, 80.0] * 8), "sex": np.array([0, 1] * 8), "dx": np.array([0, 1, 2, 1] * 4)})
    losses = s.losses(y, y * 0)
    assert set(losses) == {"age", "sex", "dx"}
    np.testing.assert_allclose(float(losses["sex"]), np.log(2), rtol=1e-5)
    np.testing.assert_allclose(float(losses["dx"]), np.log(3), rtol=1e-5)
    np.testing.assert_allclose(float(losses["age"]), np.mean(y[:, 0] ** 2), rtol=1e-5)
    f = np.asarray(s.flip(y, keras.random.SeedGenerator(0)))
    assert f.shape == y.shape
    np.testing.assert_array_equal(f[:, 1], 1 - y[:, 1])
    assert (f[:, 2:].argmax(1) != y[:, 2:].argmax(1)).all() and np.allclose(f[:, 2:].sum(1), 1)
    age = f[:, 0] * s["age"].std + s["age"].mean
    assert age.min() >= 60 - 1e-3 and age.max() <= 80 + 1e-3 and len(set(np.round(age, 3))) > 1


def test_store_reads_and_rejects_non_stores(store_path, tmp_path):
    with SliceStore(store_path) as s:
        idx = np.array([5, 1, 5, 3])
        imgs = s.images(idx)
        np.testing.assert_array_equal(imgs[0], imgs[2])
        np.testing.assert_array_equal(imgs[1], s.images([1])[0])
        assert s.encoded(idx).shape == (4, s.schema.width)
    bogus = tmp_path / "x.h5"
    bogus.write_bytes(b"nope")
    with pytest.raises(StoreError, match="cannot open store .*data_prep.py"):
        SliceStore(str(bogus))
    import h5py
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("images", (0, 32, 32), "f2")
        for k in ("split", "subject"):
            f.create_dataset(k, (0,), "i1")
        f.create_group("attrs")
        f.attrs["schema"], f.attrs["size"] = "[]", 32
    with pytest.raises(StoreError, match="empty store"):
        SliceStore(str(tmp_path / "empty.h5"))


def test_loader_shapes_determinism_and_resume(store_path):
    ds, b = make_dataset(store_path, "train", ["age", "dx"], batch_size=4, seed=3, jitter=0.1)
    x, y = next(iter(ds))
    assert x.shape == (4, 32, 32, 1) and y.shape == (4, 4) and x.dtype.name == "float32"
    b2 = Batches(store_path, "train", ["age", "dx"], batch_size=4, seed=3, jitter=0.1)
    steps = [b2.batch(k) for k in range(b2.steps_per_epoch + 2)]
    np.testing.assert_array_equal(steps[0][0], x.numpy())
    resumed = next(iter(make_dataset(store_path, "train", ["age", "dx"], 4, seed=3, jitter=0.1,
                                     start_step=b2.steps_per_epoch + 1)[0]))
    np.testing.assert_array_equal(resumed[0].numpy(), steps[-1][0])
    other = Batches(store_path, "train", ["age", "dx"], batch_size=4, seed=4).batch(0)[0]
    assert not np.array_equal(other, Batches(store_path, "train", ["age", "dx"], 4, seed=3).batch(0)[0])
    # one epoch visits every train slice once
    seen = np.concatenate([b2.positions(k) for k in range(b2.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == b2.steps_per_epoch * 4
    assert x.numpy().min() >= -1 and x.numpy().max() <= 1
