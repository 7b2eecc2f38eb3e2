"""cGAN / IcGAN: both training phases, exact resume across them, save/load, every attribute kind at once
(age continuous, dx categorical, sex binary), and the full-size architecture."""
import os

import numpy as np
import pytest

from conftest import read_checkpoint, read_log
from mri.attributes import Attribute, Schema

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
    assert sorted(os.listdir(os.path.join(out, "samples"))) == [f"epoch_00{i}.png" for i in range(1, 5)]
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


def test_both_phases_train_log_and_reload(straight, store_path):
    check_run(*straight, store_path)


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


def test_wrong_conditions_move_the_diagnosis_to_its_group_means():
    import keras
    from models import cgan
    s = schema("age", "dx", "sex")
    y = s.encode({"age": [60, 62, 70, 74, 80, 90], "dx": [0, 0, 1, 1, 2, 2], "sex": [0, 0, 0, 1, 1, 1]})
    means = cgan.group_means(s, y)
    age_72 = s.encode({"age": [72], "dx": [1], "sex": [0]})[0, 0]
    np.testing.assert_allclose(means[1], [age_72, 0, 1, 0, 0.5], rtol=1e-6)   # dx MCI: ages 70, 74; sexes 0, 1
    model = cgan.CGAN(s, size=16, z_dim=4, filters=2, wrong_means=means)
    wrong = np.asarray(model.wrong_conditions(keras.ops.convert_to_tensor(y)))
    dx = wrong[:, 1:4].argmax(1)
    assert (dx != y[:, 1:4].argmax(1)).all()
    np.testing.assert_allclose(wrong, means[dx])
    # no categorical attribute: schema.flip
    s = schema("age", "sex")
    assert cgan.group_means(s, s.encode({"age": [60, 80], "sex": [0, 1]})) is None
    model = cgan.CGAN(s, size=16, z_dim=4, filters=2)
    y = s.encode({"age": [60, 80], "sex": [0, 1]})
    np.testing.assert_array_equal(np.asarray(model.wrong_conditions(keras.ops.convert_to_tensor(y)))[:, 1], [1, 0])


def test_full_size_architecture():
    from models import cgan
    model = cgan.CGAN(schema("age", "dx", "sex"))   # defaults: 128x128, z 100, 64..1024 maps; condition width 5
    g, d = model.generator, model.discriminator
    z, y = np.zeros((2, 100), np.float32), np.zeros((2, 5), np.float32)
    assert g([z, y]).shape == (2, 128, 128, 1)
    assert d([np.zeros((2, 128, 128, 1), np.float32), y]).shape == (2, 1)
    for net in (g, d):
        assert max(l.output.shape[-1] for l in net.layers if len(l.output.shape) == 4) == 1024
    # G: Dense (100 + 5) * 4*4*1024 (no bias, BN follows) = 1,720,320; BN 4 * 1024 = 4,096;
    #    TransposeConv 4x4 without bias 16 * (1024*512 + 512*256 + 256*128 + 128*64) = 11,141,120;
    #    BN 4 * (512 + 256 + 128 + 64) = 3,840; output TransposeConv 16 * 64 + 1 = 1,025
    #    total 1,720,320 + 4,096 + 11,141,120 + 3,840 + 1,025 = 12,870,401
    assert g.count_params() == 12_870_401
    # D: first Conv 16 * 1 * 64 + 64 = 1,088; condition Conv 16 * 5 * 64 + 64 = 5,184;
    #    Conv 4x4 without bias 16 * (128*128 + 128*256 + 256*512 + 512*1024) = 11,272,192 (the first takes the
    #    64 image + 64 condition maps); BN 4 * (128 + 256 + 512 + 1024) = 7,680; logit Dense 4*4*1024 + 1 = 16,385
    #    total 1,088 + 5,184 + 11,272,192 + 7,680 + 16,385 = 11,302,529
    assert d.count_params() == 11_302_529
