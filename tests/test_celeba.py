"""CelebA and any folder of 2D images with an attribute table: data_prep's celeba and image-folder presets
(mri/data/images.py), colour stores read by every method, the oracle and the baselines, evaluate.py end to
end on a store without ground truth. The dataset is made here in CelebA's layout: images whose `Eyeglasses`
attribute draws a red patch, so the attribute changes the image in a known place and colour."""
import os

import numpy as np
import pytest

PATCH = (slice(14, 22), slice(12, 28))    # rows, columns of the red patch in the crop (rows 20:-20 of an image)
NAMES = ["Eyeglasses", "Male", "Smiling"]
SPLIT_OF = {0: 1, 1: 2, 2: 0, 3: 0, 4: 0}   # number % 5 -> CelebA partition (0 train, 1 val, 2 test)


def face(rng, glasses, height=80, width=40):
    """uint8 (height, width, 3): a smooth random colour field, a red patch at PATCH of the crop where glasses = 1."""
    y, x = np.mgrid[:height, :width] / max(height, width)
    base = rng.uniform(60, 190, 3)
    img = base + 40 * np.stack([np.sin(2 * np.pi * (x + rng.uniform()) * f) for f in (1, 2, 3)], -1) * y[..., None]
    if glasses:
        img[20 + PATCH[0].start:20 + PATCH[0].stop, PATCH[1]] = (230, 20, 20)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_celeba(root, n=24, height=80, width=40, seed=0, bad=()):
    """CelebA's layout under root: img_align_celeba/NNNNNN.jpg (PNG content for exact pixels: TensorFlow
    decodes by content), list_attr_celeba.txt (+1/-1), list_eval_partition.txt (numbers 5k val, 5k + 1
    test, the others train). `bad`: 1-based numbers of images written as garbage bytes. Returns (image dir, attr file)."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "img_align_celeba")
    os.makedirs(folder, exist_ok=True)
    lines, parts = [str(n), " ".join(NAMES)], []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        values = [int(i % 2 == 0), int(i % 3 == 0), int(rng.uniform() < 0.5)]
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(b"not an image" if i in bad else tf.io.encode_png(face(rng, values[0], height, width)).numpy())
        lines.append(name + " " + " ".join("1" if v else "-1" for v in values))
        parts.append(f"{name} {SPLIT_OF[i % 5]}")
    attr = os.path.join(root, "list_attr_celeba.txt")
    with open(attr, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.write("\n".join(parts) + "\n")
    return folder, attr


def prep(root, out, *extra):
    """data_prep.py's main on a CelebA layout under root; returns the store path."""
    import data_prep
    data_prep.main(["--preset", "celeba", "--images", os.path.join(root, "img_align_celeba"),
                    "--csv", os.path.join(root, "list_attr_celeba.txt"), "--out", out, *extra])
    return out


def test_celeba_crop_and_resize_match_fader_networks_preprocess(tmp_path, capsys):
    """Rows 20:-20 of an 80x40 image (a 40x40 square) stored as is at --size 40 and as 2x2 block means at
    --size 20 (area resampling at an integer factor), colour kept, split and +1/-1 attributes read; a file
    that is not an image is skipped and named."""
    import tensorflow as tf
    from mri.data.store import SliceStore
    folder, _ = write_celeba(str(tmp_path), n=8, height=80, width=40, bad=(5,))
    for size in (40, 20):
        path = prep(str(tmp_path), str(tmp_path / f"s{size}.h5"), "--size", str(size))
        assert "000005.jpg: cannot decode" in capsys.readouterr().out
        with SliceStore(path) as s:
            assert len(s) == 7 and s.channels == 3 and s.images([0]).shape == (1, size, size, 3)
            assert list(s.subject) == [f"{i:06d}.jpg" for i in (1, 2, 3, 4, 6, 7, 8)]
            assert list(s.split) == [2, 0, 0, 0, 2, 0, 0]
            assert list(s.attrs["Eyeglasses"]) == [0, 1, 0, 1, 1, 0, 1]
            assert list(s.attrs["Male"]) == [0, 0, 1, 0, 1, 0, 0]
            for k, i in enumerate((1, 2, 3, 4, 6, 7, 8)):
                raw = tf.io.decode_png(open(os.path.join(folder, f"{i:06d}.jpg"), "rb").read()).numpy()
                ref = raw[20:60].astype(np.float64)
                f = 40 // size
                ref = ref.reshape(size, f, size, f, 3).mean(axis=(1, 3)) / 127.5 - 1
                np.testing.assert_allclose(s.images([k])[0], ref, atol=2e-3)   # float16 storage


def test_missing_attribute_stops_with_the_columns_found(tmp_path):
    write_celeba(str(tmp_path), n=4)
    with pytest.raises(SystemExit, match=r"no attribute column\(s\) \['Blond_Hair'\].*'Eyeglasses', 'Male', 'Smiling'"):
        prep(str(tmp_path), str(tmp_path / "s.h5"), "--attrs", "Male,Blond_Hair")


def test_image_folder_preset_reads_a_csv_and_converts_channels(tmp_path):
    """Grey and colour PNGs of a plain folder joined to a CSV by file name (with or without extension), stored
    with --channels 1 (colour converted to grey) and --channels 3 (grey repeated); attributes of every kind."""
    import data_prep
    import tensorflow as tf
    from mri.data.store import SliceStore
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = ["file,smiling,age,hair"]
    for i in range(10):
        grey = rng.integers(0, 256, (24, 30, 1), dtype=np.uint8)
        image = grey if i % 2 else np.repeat(grey, 3, axis=-1)
        (folder / ("sub" if i % 3 == 0 else "") / f"p{i}.png").write_bytes(tf.io.encode_png(image).numpy())
        rows.append(f"p{i}{'.png' if i % 2 else ''},{'yes' if i % 2 else 'no'},{20 + i},{'abc'[i % 3]}")
    (tmp_path / "photos.csv").write_text("\n".join(rows) + "\n")
    args = ["--preset", "image-folder", "--images", str(folder), "--csv", str(tmp_path / "photos.csv"),
            "--id-column", "file", "--attr-columns", "smile:smiling:binary,age:age:continuous,hair:hair:categorical",
            "--size", "24", "--split", "0.6,0.2,0.2"]
    for channels in (1, 3):
        out = str(tmp_path / f"c{channels}.h5")
        data_prep.main(args + ["--channels", str(channels), "--out", out])
        with SliceStore(out) as s:
            assert len(s) == 10 and s.channels == channels and s.schema["hair"].classes == ["a", "b", "c"]
            order = [int(x[1:].split(".")[0]) for x in s.subject]   # ids as the CSV spells them
            assert sorted(order) == list(range(10)) and sorted(set(s.split)) == [0, 1, 2]
            np.testing.assert_array_equal(s.attrs["age"], [20 + i for i in order])
            np.testing.assert_array_equal(s.attrs["smile"], [i % 2 for i in order])
            x = s.pixels(np.arange(10))
            assert x.shape == (10, 24, 24, channels)
            k = order.index(1)     # a grey file: its centred 24x24 square, unresampled
            raw = tf.io.decode_png((folder / "p1.png").read_bytes()).numpy()[:, 3:27].astype(np.float64)
            np.testing.assert_allclose(x[k], np.repeat(raw / 127.5 - 1, channels, -1), atol=4e-3)


# --- every method on a colour store, evaluated end to end ------------------------------------------------------
ATTRS = "Eyeglasses,Male"
STEPS = ["--batch-size", "4", "--steps-per-epoch", "1", "--seed", "3", "--jitter", "0"]


@pytest.fixture(scope="session")
def celeba_store(tmp_path_factory):
    """32 CelebA-like 80x40 images (19 train, 6 val, 7 test) prepared at --size 32, in colour."""
    root = str(tmp_path_factory.mktemp("celeba"))
    write_celeba(root, n=32, height=80, width=40)
    return prep(root, os.path.join(root, "celeba32.h5"), "--size", "32")


def untrained_oracle(store_path, attrs, out):
    """A train_oracle.py-like run directory holding an untrained (non-tiny) oracle of the store's size and
    channels: DFI's feature network in these tests (DFI only needs its three pooling levels; training one costs
    more than the whole rest of a method's run)."""
    import json
    from models import oracle
    from mri.data.io import write_json
    from mri.data.store import SliceStore
    with SliceStore(store_path) as store:
        schema = store.schema.select(attrs)
        model = oracle.build(schema, store.size, channels=store.channels)
    os.makedirs(out)
    model.save(os.path.join(out, oracle.MODEL_FILE))
    write_json(os.path.join(out, "config.json"), {"method": "oracle", "args": {"store": store_path},
                                                  "schema": json.loads(schema.to_json())})
    return out


@pytest.fixture(scope="session")
def celeba_runs(celeba_store, tmp_path_factory):
    """One step of every trainable method (tiny), a tiny oracle for the evaluation, DFI on an untrained oracle's
    features (a method is never judged by its helper): {name: run dir}."""
    import train_cgan, train_cyclegan, train_dfi, train_fader, train_infogan, train_oracle, train_vagan
    root = tmp_path_factory.mktemp("celeba_runs")
    run = lambda name: str(root / name)
    common = ["--store", celeba_store, "--attrs", ATTRS, "--tiny", *STEPS, "--epochs", "1"]
    train_oracle.main(["--store", celeba_store, "--attrs", ATTRS, "--out", run("oracle"), "--tiny", "--epochs", "1",
                       "--steps-per-epoch", "2", "--batch-size", "4", "--seed", "1", "--calibration-batches", "2"])
    train_fader.main([*common, "--out", run("fader")])
    train_cgan.main([*common, "--z-dim", "8", "--encoder-epochs", "1", "--out", run("cgan")])
    train_vagan.main([*common, "--n-critic", "1", "--n-critic-long", "1", "--out", run("vagan")])
    train_infogan.main([*common, "--z-dim", "8", "--encoder-epochs", "1", "--out", run("infogan")])
    train_cyclegan.main([*common, "--domains", "Eyeglasses=-1:1", "--blocks", "1", "--out", run("cyclegan")])
    features = untrained_oracle(celeba_store, ATTRS.split(","), run("features"))
    train_dfi.main(["--store", celeba_store, "--attrs", ATTRS, "--features", features, "--k", "3",
                    "--iterations", "3", "--out", run("dfi")])
    return {n: run(n) for n in ("oracle", "fader", "cgan", "vagan", "infogan", "cyclegan", "dfi")}


def test_meandiff_learns_the_red_patch(celeba_store):
    """meandiff on the colour store: adding Eyeglasses makes PATCH (the 40x40 crop resized by 32/40) redder and
    less green and blue than the rest of the image changes (the rest: only the 19 random backgrounds' means)."""
    from models.baselines import MeanDiff
    from mri.data.store import SliceStore
    with SliceStore(celeba_store) as store:
        m = MeanDiff.fit(store, attrs=["Eyeglasses"])
        src = {"Eyeglasses": np.zeros(1), "slice": np.zeros(1, int)}
        d = m.difference(src, {"Eyeglasses": np.ones(1)})[0]
    assert d.shape == (32, 32, 3)
    rows, cols = (slice(int(p.start * 0.8) + 1, int(p.stop * 0.8) - 1) for p in PATCH)
    outside = np.ones((32, 32), bool)
    outside[int(PATCH[0].start * 0.8) - 1:int(PATCH[0].stop * 0.8) + 2, int(PATCH[1].start * 0.8) - 1:int(PATCH[1].stop * 0.8) + 2] = False
    contrast = d[rows, cols].reshape(-1, 3).mean(0) - d[outside].mean(0)
    assert contrast[0] > 0.5 and contrast[1] < -0.5 and contrast[2] < -0.5, contrast
    assert d[outside].std(0).max() < 0.1      # elsewhere one offset per channel: no other structure


@pytest.mark.slow   # trains every method one --tiny step on the colour store, then evaluate.py (96 CPU s with the fixtures)
def test_evaluate_scores_a_store_without_ground_truth(celeba_store, celeba_runs, tmp_path, capsys):
    """evaluate.py on the colour store with every method trained on it (each loaded through evaluate's loader and
    run on (N, 32, 32, 3) images): the report says ground truth is unavailable and holds effectiveness,
    identity, reconstruction, reversibility and KID; the trajectory figures and the runs' sample grids are RGB."""
    import json
    import evaluate
    methods = ["identity", "meandiff"] + [celeba_runs[n] for n in ("fader", "cgan", "vagan", "infogan", "cyclegan", "dfi")]
    evaluate.main(["--store", celeba_store, "--oracle", celeba_runs["oracle"], "--methods", ",".join(methods),
                   "--out", str(tmp_path / "report"), "--n", "8", "--batch-size", "8", "--subjects", "2",
                   "--bootstrap", "100"])
    assert "ground truth is unavailable" in capsys.readouterr().out
    m = json.load(open(tmp_path / "report" / "metrics.json"))
    assert m["synthetic"] is False and set(m["protocol"]) == {"Eyeglasses", "Male"}
    for spec in methods:
        scores = m["methods"][spec]
        assert {"accuracy", "mse", "ssim", "reversibility_l1", "kid"} <= set(scores["Eyeglasses"]), spec
        assert not any(k.startswith("gt_") for k in scores["Eyeglasses"]), spec
        assert "reconstruction_mse" in scores["unchanged"], spec
    report = open(tmp_path / "report" / "report.md").read()
    assert "Ground truth: unavailable" in report
    pngs = [tmp_path / "report" / "trajectories_all_n2.png"]
    pngs += [os.path.join(celeba_runs[n], "samples", "epoch_001.png") for n in ("fader", "cgan", "vagan", "infogan", "cyclegan")]
    for png in pngs:
        with open(png, "rb") as f:
            assert f.read(26)[25] == 2, f"{png} is not RGB"     # PNG colour type 2: truecolour
