"""Baselines and the evaluation protocol on a tiny store with planted effects and a known ground truth.

The store holds disc "brains" whose dark ventricle grows and whose hippocampus (inside a CSF pocket) shrinks
with age and diagnosis; a fake `mri.synthetic.counterfactual` re-renders any slice at other attributes, so
`truth` and the ground-truth metrics can be checked exactly (the real phantom is tested when present).
"""
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from models import baselines, load_method
from mri import evaluation, grids
from mri.attributes import Attribute, Schema
from mri.io import write_json
from mri.store import SliceStore, write_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_COUNTERFACTUAL = importlib.import_module("mri.synthetic").counterfactual   # before fake_truth patches it
SIZE, SLICES, SIDE_MM = 32, 4, 64.0
SPLITS = [2 if s % 4 == 3 else 1 if s % 4 == 1 and s < 12 else 0 for s in range(22)]  # train / val / test


def render(seed, age, dx, position):
    """(image, {structure: mask}) of one planted slice."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    level = 1.0 - 0.15 * abs(position - (SLICES - 1) / 2)
    ventricle = np.hypot(yy, xx / 1.4) < level * (2.0 + 0.12 * (age - 60) + 0.8 * dx + 0.3 * (seed % 3))
    pocket = np.hypot(np.abs(xx) - 8.0, yy - 5.0) < 4.5
    hippocampus = np.hypot(np.abs(xx) - 8.0, yy - 5.0) < 3.6 - 0.04 * (age - 60) - 0.5 * dx
    inside = np.hypot(yy, xx) < 14
    csf = (pocket | ventricle) & ~hippocampus
    img = np.select([csf, hippocampus, inside], [-0.4, 0.4, 0.8], -1.0)
    img = img + np.random.default_rng([seed, position]).normal(0, 0.03, img.shape) * inside
    masks = {"brain": inside & ~csf, "ventricles": ventricle, "hippocampus": hippocampus}
    return np.clip(img, -1, 1).astype(np.float32), masks


def fake_counterfactual(store, indices, age=None, dx=None, masks=False):
    """The signature of mri.synthetic.counterfactual, on the planted store."""
    idx = np.asarray(indices)
    age = store.attrs["age"][idx] if age is None else np.broadcast_to(age, idx.shape)
    dx = store.attrs["dx"][idx] if dx is None else np.broadcast_to(dx, idx.shape)
    seeds = store.csv("subject_seed", idx)
    out = [render(int(s), float(a), int(d), int(p)) for s, a, d, p in zip(seeds, age, dx, store.slice[idx])]
    area = (SIDE_MM / SIZE) ** 2
    res = {"images": np.stack([o[0] for o in out])}
    for s in ("brain", *evaluation.STRUCTURES):
        res[s] = np.array([o[1][s].sum() * area for o in out])
    if masks:
        res["masks"] = {s: np.stack([o[1][s] for o in out]).astype(np.float32) for s in res if s != "images"}
    return res


def write_planted_store(path, synthetic=True):
    volumes = []
    for s, split in enumerate(SPLITS):
        for v in range(3):
            volumes.append({"subject": f"S{s:02d}", "visit": f"m{12 * v:02d}", "split": split, "path": f"S{s}_{v}",
                            "attrs": {"age": 58.0 + 1.5 * s + 2 * v, "dx": float(s % 3)}, "csv": {"subject_seed": s},
                            "slice_mm": np.arange(SLICES, dtype=np.float32)})
    train = [m["attrs"] for m in volumes if m["split"] == 0]
    schema = Schema([Attribute("age", "continuous").fit([a["age"] for a in train]),
                     Attribute("dx", "categorical", ["CN", "MCI", "Dementia"])])

    def load(i):
        m = volumes[i]
        return np.stack([render(m["csv"]["subject_seed"], m["attrs"]["age"], int(m["attrs"]["dx"]), p)[0]
                         for p in range(SLICES)]), {"side_mm": SIDE_MM}

    write_store(path, volumes, load, schema, SIZE, {"source": "planted test store"},
                keep_columns=("subject_seed",) if synthetic else ())
    return path


@pytest.fixture(scope="module")
def fake_truth():
    import mri.synthetic
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mri.synthetic, "counterfactual", fake_counterfactual, raising=False)
        yield


@pytest.fixture(scope="module")
def planted(tmp_path_factory, fake_truth):
    """(store path, oracle dir, report dirs of two identical evaluate.py runs)."""
    import evaluate
    import train_oracle
    d = tmp_path_factory.mktemp("planted")
    store = write_planted_store(str(d / "planted.h5"))
    train_oracle.main(["--store", store, "--out", str(d / "oracle"), "--tiny", "--epochs", "4",
                       "--steps-per-epoch", "40", "--batch-size", "16", "--seed", "1"])
    reports = []
    for k in range(2):
        reports.append(str(d / f"report{k}"))
        evaluate.main(["--store", store, "--oracle", str(d / "oracle"), "--methods", "identity,meandiff,truth",
                       "--out", reports[-1], "--n", "24", "--batch-size", "16", "--subjects", "2", "--seed", "3"])
    return store, str(d / "oracle"), reports


def metrics(planted):
    with open(os.path.join(planted[2][0], "metrics.json")) as f:
        return json.load(f)


def test_ssim_and_frechet_distance_match_references():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    np.testing.assert_allclose(evaluation.ssim(x, y), tf.image.ssim(x[..., None], y[..., None], 2.0).numpy(), atol=1e-5)
    np.testing.assert_array_equal(evaluation.ssim(x, x), 1.0)
    # 1D Gaussians: FD = (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    a, b = rng.normal(0, 1, (50000, 1)), rng.normal(2, 3, (50000, 1))
    assert abs(evaluation.frechet_distance(a, b) - 8.0) < 0.2
    few = rng.normal(0, 1, (10, 16))   # fewer samples than dimensions: singular covariances
    assert evaluation.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)
    assert evaluation.frechet_distance(few, few + 1) == pytest.approx(16.0, rel=1e-3)


def test_protocol_changes_are_seeded_and_in_range(tmp_path):
    with SliceStore(write_planted_store(str(tmp_path / "s.h5"))) as store:
        test = store.indices("test")
        age = evaluation.change_for(store.schema["age"])
        src, t = evaluation.draw_pairs(store, test, age, np.random.default_rng(0))
        assert np.allclose(np.abs(t - store.attrs["age"][src]), 10) and t.min() >= 55 and t.max() <= 95
        again = evaluation.draw_pairs(store, test, age, np.random.default_rng(0))[1]
        np.testing.assert_array_equal(t, again)
        dx = evaluation.change_for(store.schema["dx"])
        src, t = evaluation.draw_pairs(store, test, dx, np.random.default_rng(0))
        assert len(src) == 2 * len(test) and (t != store.attrs["dx"][src]).all()
        ref = evaluation.matched_reference(store, test, src, t, dx, np.random.default_rng(0))
        ok = ref >= 0
        assert ok.any() and (store.attrs["dx"][ref[ok]] == t[ok]).all() and np.isin(ref[ok], test).all()


def test_meandiff_fits_the_planted_change(tmp_path, fake_truth):
    """Streaming per-position least squares: the predicted change of +10 years correlates with the true one."""
    with SliceStore(write_planted_store(str(tmp_path / "s.h5"))) as store:
        full = baselines.MeanDiff.fit(store)
        chunked = baselines.MeanDiff.fit(store, chunk=7)
        np.testing.assert_allclose(chunked.coef, full.coef, atol=1e-4)
        idx = store.indices("test")
        src = dict(store.raw(idx), index=idx)
        tgt = dict(src, age=src["age"] + 10)
        pred = full.difference(src, tgt)
        true = fake_counterfactual(store, idx, age=tgt["age"])["images"] - store.images(idx)
        assert np.corrcoef(pred.ravel(), true.ravel())[0, 1] > 0.3
        no_index = full.difference({k: v for k, v in src.items() if k != "index"}, {"age": tgt["age"]})
        assert no_index.shape == pred.shape and np.corrcoef(no_index.ravel(), true.ravel())[0, 1] > 0.2


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(tree, (int, float)) or tree is None:
        yield path, tree


def test_metrics_are_complete_finite_and_reproducible(planted):
    m = metrics(planted)
    numbers = [(p, v) for p, v in _numbers({"floor": m["floor"], "methods": m["methods"]})]
    bad = [p for p, v in numbers if v is None or not math.isfinite(v)]
    assert not bad, bad
    assert set(m["methods"]) == {"identity", "meandiff", "truth"} and m["synthetic"] and m["n"] == 24
    assert m["protocol"]["age"]["pairs"] == 24 and m["protocol"]["dx"]["pairs"] == 48
    with open(os.path.join(planted[2][0], "metrics.json"), "rb") as a, open(os.path.join(planted[2][1], "metrics.json"), "rb") as b:
        assert a.read() == b.read()
    report = open(os.path.join(planted[2][0], "report.md")).read()
    assert "n = 24" in report and "| meandiff |" in report and "trajectories_truth_n2.png" in report


def test_identity_equals_the_floor_and_truth_has_no_ground_truth_error(planted):
    m = metrics(planted)
    for attr in ("age", "dx"):
        ident = m["methods"]["identity"][attr]
        assert ident == m["floor"][attr]
        assert ident["mse"] == 0 and ident["ssim"] == 1 and ident["reversibility_l1"] == 0
        assert ident.get("target_prob_shift", 0) == 0 and ident.get("oracle_shift", 0) == 0
        truth = m["methods"]["truth"][attr]
        assert truth["gt_mse"] == 0 and truth["gt_ssim"] == pytest.approx(1.0, abs=1e-12)
        assert truth["ventricles_change_error_mm2"] == 0 and truth["hippocampus_change_error_mm2"] == 0
        assert ident["ventricles_change_error_mm2"] > 0 and ident["ventricles_pairs"] > 0
    assert m["methods"]["identity"]["unchanged"] == {"reconstruction_mse": 0.0, "composition_l1": 0.0, "repeats": 5}


def test_meandiff_moves_towards_the_target(planted):
    m = metrics(planted)
    mean, ident = m["methods"]["meandiff"], m["methods"]["identity"]
    for attr in ("age", "dx"):
        assert mean[attr]["gt_mse"] < ident[attr]["gt_mse"]
        assert mean[attr]["ventricles_change_error_mm2"] < ident[attr]["ventricles_change_error_mm2"]
    assert mean["age"]["oracle_shift"] > 0 == ident["age"]["oracle_shift"]
    assert mean["age"]["mae"] < ident["age"]["mae"]


def test_trajectory_pngs_have_the_expected_size(planted):
    figures = metrics(planted)["figures"]
    names = [f["file"] for f in figures]
    assert names == ["trajectories_identity_n2.png", "trajectories_meandiff_n2.png", "trajectories_truth_n2.png",
                     "trajectories_all_n2.png"]
    cols = 1 + 7 + 1 + 3            # source | 7 ages | gap | 3 classes
    rows = {"identity": 2 * 4, "meandiff": 2 * 4, "truth": 2 * 2, "all": 2 * 3}
    for name in names:
        h, w = grids.read_png_size(os.path.join(planted[2][0], name))
        assert (h, w) == (rows[name.split("_")[1]] * (SIZE + 2) + 2, cols * (SIZE + 2) + 2), name


def test_clear_errors(planted, tmp_path, capsys):
    import evaluate
    store, oracle, _ = planted
    common = ["--store", store, "--out", str(tmp_path / "r"), "--n", "8"]
    with pytest.raises(SystemExit, match="not a trained oracle.*train_oracle.py"):
        evaluate.main(common + ["--oracle", str(tmp_path / "nowhere"), "--methods", "identity"])
    with pytest.raises(SystemExit, match="nosuch is neither a baseline"):
        evaluate.main(common + ["--oracle", oracle, "--methods", "identity,nosuch"])
    plain = SliceStore(write_planted_store(str(tmp_path / "plain.h5"), synthetic=False))
    with pytest.raises(ValueError, match="not a synthetic store.*data_prep.py --synthetic"):
        load_method("truth", plain)
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.make("nosuch", plain)


def test_truth_on_the_real_phantom(tmp_path):
    """data_prep's synthetic store: truth has zero ground-truth error, identity is the floor."""
    import evaluate
    import mri.synthetic
    from models import oracle
    from mri import prep
    cfg = prep.PrepConfig(images=None, csv=None, out=str(tmp_path / "syn.h5"), attrs=("age", "dx"), size=32,
                          slices=4, split=(0.5, 0.2, 0.3), workers=1, seed=2)
    prep.build(prep.synthetic_config(cfg, 6, str(tmp_path / "volumes")), log=lambda *a: None)
    with SliceStore(cfg.out) as store:   # an untrained oracle is enough here
        oracle.save(oracle.build(store.schema, store.size, **oracle.TINY), str(tmp_path / "oracle"))
        write_json(tmp_path / "oracle" / "config.json", {"method": "oracle", "schema": json.loads(store.schema.to_json())})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mri.synthetic, "counterfactual", REAL_COUNTERFACTUAL)
        evaluate.main(["--store", cfg.out, "--oracle", str(tmp_path / "oracle"), "--methods", "identity,truth",
                       "--out", str(tmp_path / "report"), "--n", "12", "--subjects", "1"])
    m = json.load(open(tmp_path / "report" / "metrics.json"))
    for attr in ("age", "dx"):
        truth = m["methods"]["truth"][attr]
        assert truth["gt_mse"] == 0 and truth["ventricles_change_error_mm2"] == 0
        assert truth["hippocampus_change_error_mm2"] in (0, None)
        assert m["methods"]["identity"][attr] == m["floor"][attr]


@pytest.mark.parametrize("script", ["evaluate.py", "train_oracle.py"])
def test_scripts_have_help_and_seed(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "--seed" in out
