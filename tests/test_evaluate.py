"""Baselines and the evaluation protocol on a tiny store with planted effects and a known ground truth.

The store holds disc "brains" whose dark ventricle grows and whose hippocampus (inside a CSF pocket) shrinks
with age and diagnosis; a fake `mri.synthetic.counterfactual` re-renders any slice at other attributes, so
`truth` and the ground-truth metrics can be checked exactly (the real phantom is tested when present).
"""
import contextlib
import importlib
import json
import math
import os
import sys

import numpy as np
import pytest

from models import baselines, load_method
import evaluation
from mri import stats
from mri.data import grids
from mri.data.attributes import Attribute, Schema
from mri.data.io import write_json
from mri.data.store import SliceStore, write_store

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
                       "--steps-per-epoch", "40", "--batch-size", "16", "--seed", "1",
                       "--calibration-batches", "10"])
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
        (lo, hi), shift = age.bounds, age.shift
        src, t = evaluation.draw_pairs(store, test, age, np.random.default_rng(0))
        v = store.attrs["age"][src]
        assert np.allclose(np.abs(t - v), shift) and t.min() >= lo and t.max() <= hi
        # a random sign where both stay in range, else the one that does
        both = (v - shift >= lo) & (v + shift <= hi)
        assert (t[both] > v[both]).any() and (t[both] < v[both]).any()
        assert (t[v + shift > hi] < v[v + shift > hi]).all() and (t[v - shift < lo] > v[v - shift < lo]).all()
        again = evaluation.draw_pairs(store, test, age, np.random.default_rng(0))[1]
        np.testing.assert_array_equal(t, again)
        dx = evaluation.change_for(store.schema["dx"])
        src, t = evaluation.draw_pairs(store, test, dx, np.random.default_rng(0))
        assert len(src) == 2 * len(test) and (t != store.attrs["dx"][src]).all()
        ref = evaluation.matched_reference(store, test, src, t, dx, np.random.default_rng(0))
        ok = ref >= 0
        assert ok.any() and (store.attrs["dx"][ref[ok]] == t[ok]).all() and np.isin(ref[ok], test).all()
        # without replacement: no reference twice, and none missing while a test slice with the target is free
        assert len(np.unique(ref[ok])) == ok.sum()
        for k in np.unique(t[~ok]):
            assert (ok & (t == k)).sum() == (store.attrs["dx"][test] == k).sum()


def test_references_come_from_the_sources_slice_position(tmp_path):
    """With test slices of the target at the source's position left, every reference is at that position."""
    with SliceStore(write_planted_store(str(tmp_path / "s.h5"))) as store:
        test = store.indices("test")
        for name in ("age", "dx"):
            change = evaluation.change_for(store.schema[name])
            src, t = evaluation.draw_pairs(store, test[::10], change, np.random.default_rng(1))
            ref = evaluation.matched_reference(store, test, src, t, change, np.random.default_rng(1))
            assert (ref >= 0).all() and (store.slice[ref] == store.slice[src]).all(), name


class NoAreas:
    """A GroundTruth stand-in for `_score` when only its images matter."""

    def areas(self, images, roi, idx):
        return {s: np.zeros(len(images)) for s in evaluation.STRUCTURES}


def test_brain_scores_look_inside_the_source_brain_only():
    """MSE, SSIM and the ground-truth MSE "brain" average over the source's foreground: a change in the
    background farther from the brain than the SSIM window reaches leaves them perfect, and a change inside
    the brain gives its mean over the brain's pixels."""
    yy, xx = np.mgrid[:48, :48] - 23.5
    x = np.where(np.hypot(yy, xx) < 10, 0.3, -1.0)[None, :, :, None].repeat(2, 0).astype(np.float32)
    brain = evaluation.above_background(x)
    outside, inside = x.copy(), x.copy()
    outside[:, :6, :6] = 0.5                       # >= 16 pixels from the brain, the window reaches 5
    inside[brain] += 0.2
    change, oracle = evaluation.Change("age", "continuous"), (np.zeros(2), None)
    score = lambda y: evaluation.protocol._score(change, x, y, x, np.zeros(2), np.ones(2), oracle, oracle,
                                        (x[..., 0], {s: brain for s in evaluation.STRUCTURES}, np.arange(2), NoAreas()))
    out, ins = score(outside), score(inside)
    assert (out["mse"] > 0).all() and (out["ssim"] < 1).all() and (out["gt_mse"] > 0).all()
    assert (out["mse_brain"] == 0).all() and (out["gt_mse_brain"] == 0).all()
    np.testing.assert_allclose(out["ssim_brain"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(ins["mse_brain"], 0.2 ** 2, rtol=1e-5)
    np.testing.assert_allclose(ins["gt_mse_brain"], 0.2 ** 2, rtol=1e-5)
    np.testing.assert_allclose(ins["mse"], 0.2 ** 2 * brain[0].mean(), rtol=1e-5)
    assert (ins["ssim_brain"] < ins["ssim"]).all()


class Discs:
    """A store for GroundTruth alone: slice i a disc brain with a central ventricle disc and, apart from it, a
    hippocampus disc inside a CSF pocket, sharp edges, no noise; its raw "age" and "dx" are the ventricle and hippocampus
    radii in pixels, so a counterfactual "at age r" has a ventricle of radius r."""
    size, path, side_mm = 48, "discs", 96.0

    def __init__(self, ventricle, hippocampus):
        self.attrs = {"age": np.asarray(ventricle, float), "dx": np.asarray(hippocampus, float)}
        self.volume = np.zeros(len(ventricle), int)

    def plan(self, volume):
        return {"side_mm": self.side_mm}

    def images(self, idx):
        return self.render(idx)["images"]

    def render(self, idx, age=None, dx=None, masks=False):
        idx = np.asarray(idx)
        rv = self.attrs["age"][idx] if age is None else np.broadcast_to(age, idx.shape)
        rh = self.attrs["dx"][idx] if dx is None else np.broadcast_to(dx, idx.shape)
        yy, xx = np.mgrid[:self.size, :self.size] - (self.size - 1) / 2
        out = {"images": [], "masks": {s: [] for s in ("brain", *evaluation.STRUCTURES)}}
        for v, h in zip(rv, rh):
            ventricle, hippocampus = np.hypot(yy, xx) < v, np.hypot(yy - 13, xx) < h
            csf = ventricle | (np.hypot(yy - 13, xx) < 5) & ~hippocampus
            inside = np.hypot(yy, xx) < 21
            out["images"].append(np.select([csf, hippocampus, inside], [-0.4, 0.4, 0.8], -1.0))
            for s, m in (("brain", inside & ~csf), ("ventricles", ventricle), ("hippocampus", hippocampus)):
                out["masks"][s].append(m.astype(np.float32))
        res = {"images": np.stack(out["images"]).astype(np.float32)}
        res["masks"] = {s: np.stack(m) for s, m in out["masks"].items()}
        res.update({s: m.sum((1, 2)) * (self.side_mm / self.size) ** 2 for s, m in res["masks"].items()})
        return res


def test_area_change_is_the_true_change_both_ways(monkeypatch):
    """On sharp discs the measured area change is the true one, as a structure grows and as it shrinks by more
    than the region's margin (the region holds the source's masks as well as the target's)."""
    import mri.synthetic
    store = Discs(ventricle=[1.5, 2.0, 5.0, 5.5], hippocampus=[4.5, 4.0, 1.0, 1.5])
    monkeypatch.setattr(mri.synthetic, "counterfactual", lambda st, idx, **kw: st.render(idx, **kw))
    idx = np.arange(4)
    gt = evaluation.GroundTruth(store, idx, 4)
    target = {"age": store.attrs["age"][::-1], "dx": store.attrs["dx"][::-1]}   # grow, and shrink by 3 px
    images, roi = gt.target(idx, target)
    measured = {s: gt.areas(images, roi, idx)[s] - gt.areas(store.images(idx), roi, idx)[s] for s in roi}
    true = {s: store.render(idx, **target)[s] - store.render(idx)[s] for s in roi}
    for s in evaluation.STRUCTURES:
        assert (true[s] > 0).any() and (true[s] < 0).any()
        np.testing.assert_allclose(measured[s], true[s], rtol=1e-6)


def test_meandiff_fits_the_planted_change(tmp_path, fake_truth):
    """Streaming per-position least squares: the predicted change of +10 years correlates with the true one."""
    with SliceStore(write_planted_store(str(tmp_path / "s.h5"))) as store:
        full = baselines.MeanDiff.fit(store)
        chunked = baselines.MeanDiff.fit(store, chunk=7)
        np.testing.assert_allclose(chunked.coef, full.coef, atol=1e-4)
        idx = store.indices("test")
        src = evaluation.told(store, idx, store.raw(idx))
        tgt = dict(src, age=src["age"] + 10)
        pred = full.difference(src, tgt)
        true = fake_counterfactual(store, idx, age=tgt["age"])["images"] - store.images(idx)
        assert np.corrcoef(pred.ravel(), true.ravel())[0, 1] > 0.3
        no_position = full.difference({k: v for k, v in src.items() if k != "slice"}, {"age": tgt["age"]})
        assert no_position.shape == pred.shape and np.corrcoef(no_position.ravel(), true.ravel())[0, 1] > 0.2
        np.testing.assert_array_equal(full.pooled().difference(src, tgt), no_position)


def test_meandiff_sees_only_the_train_split(tmp_path, monkeypatch):
    """meandiff is fitted through a view of the train split: it reads train images alone, and the view has
    no file, path, plan or CSV column, so no other split and no counterfactual can be reached through it."""
    with SliceStore(write_planted_store(str(tmp_path / "s.h5"))) as store:
        train, view = store.indices("train"), store.view("train")
        rows = np.arange(len(view))
        np.testing.assert_array_equal(view.images(rows), store.images(train))
        np.testing.assert_array_equal(view.slice, store.slice[train])
        assert all(np.array_equal(view.raw(rows)[n], store.raw(train)[n]) for n in store.schema.names)
        with pytest.raises(IndexError, match="rows of the train split run from 0"):
            view.images([len(view)])
        assert not any(hasattr(view, name) for name in ("file", "path", "plan", "csv", "indices"))
        with pytest.raises(AttributeError):
            REAL_COUNTERFACTUAL(view, [0])
        read, images = [], store.images
        monkeypatch.setattr(store, "images", lambda idx: read.append(np.asarray(idx)) or images(idx))
        baselines.MeanDiff.fit(store)
        assert read and np.isin(np.concatenate(read), train).all()


class Peeker:
    """A method that reaches for the truth: store indices among its attributes, the store from load_method."""

    def __init__(self, store=None):
        self.store, self.seen = store, []

    def manipulate(self, images, source_attrs, target_attrs):
        self.seen += [set(source_attrs), set(target_attrs)]
        idx = source_attrs.get("index")
        if idx is None or self.store is None:
            return images
        from mri import synthetic
        return synthetic.counterfactual(self.store, idx, age=target_attrs["age"], dx=target_attrs["dx"])["images"]


def test_no_method_can_peek_at_the_truth(planted, tmp_path, monkeypatch):
    """A run whose from_run asks for the store gets none, and every call (the protocol, the unchanged
    attributes, the trajectories) tells it the images, the attributes and the slice positions only: it cannot
    render the truth, so its ground-truth error is the no-change floor's."""
    import types
    import models
    from models.oracle import load_oracle
    store_path, oracle_dir, _ = planted
    module = types.ModuleType("peeking_method")
    module.from_run = lambda run_dir, store=None: Peeker(store)
    monkeypatch.setitem(sys.modules, "peeking_method", module)
    monkeypatch.setitem(models.RUN_METHODS, "peek", "peeking_method")
    write_json(tmp_path / "peek" / "config.json", {"method": "peek"})
    with SliceStore(store_path) as store:
        peek = load_method(str(tmp_path / "peek"), store)
        m = evaluation.evaluate(store, load_oracle(oracle_dir), {"peek": peek}, n=12, seed=3, batch_size=16,
                                n_boot=100, log=lambda *a: None)
        changes = [evaluation.change_for(store.schema[a]) for a in ("age", "dx")]
        evaluation.draw_trajectories(store, {"peek": peek}, changes, str(tmp_path / "fig"), seed=3, n_subjects=1)
        told = set(store.schema.names) | {"slice"}
    assert peek.store is None and peek.seen and all(keys <= told for keys in peek.seen)
    for attr in ("age", "dx"):
        assert m["methods"]["peek"][attr]["gt_mse"] == m["floor"][attr]["gt_mse"] > 0


def _numbers(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) or tree is None:
        yield path, tree


def test_metrics_are_complete_finite_and_reproducible(planted):
    m = metrics(planted)
    numbers = list(_numbers({"floor": m["floor"], "methods": m["methods"], "oracle": m["oracle_test"]}))
    # None only where documented: the FD below FD_MIN_RATIO pairs per dimension, verdicts of undirected metrics,
    # the cosine to the true change of what changes nothing (the floor, identity) and differences to it
    no_change = lambda p: "gt_change_cosine" in p and ("/floor/" in p or "identity" in p)
    bad = [p for p, v in numbers if (v is None and not p.endswith(("/fd", "/verdict")) and not no_change(p))
           or (v is not None and not math.isfinite(v))]
    assert not bad, bad
    assert math.isfinite(m["methods"]["meandiff"]["age"]["gt_change_cosine"])
    assert set(m["methods"]) == {"identity", "meandiff", "truth"} and m["synthetic"] and m["n"] == 24
    from models import HEAD_GROW
    assert m["background_kept_beyond_px"] == HEAD_GROW
    assert m["protocol"]["age"]["pairs"] == 24 and m["protocol"]["dx"]["pairs"] == 48
    # every metric has its interval, and the interval holds the point estimate's neighbourhood
    for method, attrs in m["methods"].items():
        for attr in ("age", "dx", "unchanged"):
            s = attrs[attr]
            values = {k: v for k, v in s.items() if isinstance(v, float) and k not in ("fd",)}
            assert set(values) <= set(s["ci"]), (method, attr, set(values) - set(s["ci"]))
            for k, ci in s["ci"].items():
                assert ci is not None or (k == "gt_change_cosine" and method == "identity"), (method, attr, k)
                assert ci is None or ci[0] <= ci[1], (method, attr, k)
        for ref in ("meandiff", "identity"):
            if ref != method:
                assert "gt_mse" in attrs["age"]["vs"][ref] and "kid" in attrs["age"]["vs"][ref]
    assert m["floor"]["age"]["fd"] is None and m["floor"]["age"]["kid"] is not None   # 22 pairs < 4 x 16 dims
    assert m["bootstrap"] == {"resamples": 1000, "level": 0.95, "unit": "subject"}
    with open(os.path.join(planted[2][0], "metrics.json"), "rb") as a, open(os.path.join(planted[2][1], "metrics.json"), "rb") as b:
        assert a.read() == b.read()
    report = open(os.path.join(planted[2][0], "report.md")).read()
    assert "n = 24" in report and "| meandiff |" in report and "trajectories_truth_n2.png" in report
    assert "Paired difference to meandiff" in report and " †" in report


def test_identity_equals_the_floor_and_truth_has_no_ground_truth_error(planted):
    m = metrics(planted)
    for attr in ("age", "dx"):
        ident = {k: v for k, v in m["methods"]["identity"][attr].items() if k != "vs"}
        assert ident == {k: v for k, v in m["floor"][attr].items() if k != "vs"}
        assert ident["mse"] == 0 and ident["ssim"] == 1 and ident["reversibility_l1"] == 0 and ident["mse_brain"] == 0
        assert ident.get("target_prob_shift", 0) == 0 and ident.get("oracle_shift", 0) == 0
        truth = m["methods"]["truth"][attr]
        assert truth["gt_mse"] == 0 and truth["gt_ssim"] == pytest.approx(1.0, abs=1e-12) and truth["gt_mse_brain"] == 0
        for s in evaluation.STRUCTURES:
            assert truth[f"{s}_change_error_mm2"] == 0 and truth[f"{s}_change_bias_mm2"] == 0 and truth[f"{s}_pairs"] > 0
        assert ident["ventricles_change_error_mm2"] > 0 and ident["ventricles_pairs"] > 0
    u = m["methods"]["identity"]["unchanged"]
    assert (u["reconstruction_mse"], u["composition_l1"], u["repeats"]) == (0.0, 0.0, 5)


def test_by_construction_scores_are_marked_and_never_ranked(planted):
    m = metrics(planted)
    assert "gt_mse" in m["methods"]["truth"]["by_construction"]
    # meandiff clips to [-1, 1], so there and back is not the source: its reversibility is scored
    assert "reversibility_l1" not in m["methods"]["meandiff"]["by_construction"]
    assert m["methods"]["meandiff"]["age"]["reversibility_l1"] > 0
    # the floor's perfect scores carry their mark in the report too
    report = open(os.path.join(planted[2][0], "report.md")).read()
    floor = [line for line in report.splitlines() if line.startswith(f"| {evaluation.FLOOR} |")]
    assert floor and all(line.count(" †") >= 4 for line in floor[::2])
    # truth's ground-truth scores are perfect by construction: a difference, but no verdict
    vs = m["methods"]["truth"]["age"]["vs"]["meandiff"]["gt_mse"]
    assert vs["diff"] < 0 and vs["ci"][1] < 0 and vs["verdict"] is None
    # identity's reversibility (0) against meandiff's (additive): both by construction, not ranked
    assert m["methods"]["identity"]["dx"]["vs"]["meandiff"]["reversibility_l1"]["verdict"] is None
    assert evaluation.protocol._verdict("gt_mse", -1.0, [-2.0, -0.5], False) == "better"
    assert evaluation.protocol._verdict("gt_mse", 1.0, [0.5, 2.0], False) == "worse"
    assert evaluation.protocol._verdict("gt_ssim", 1.0, [0.5, 2.0], False) == "better"
    assert evaluation.protocol._verdict("gt_mse", -1.0, [-2.0, 0.5], False) == "no difference shown"
    assert evaluation.protocol._verdict("mse", -1.0, [-2.0, -0.5], False) is None
    assert evaluation.protocol._verdict("gt_mse", -1.0, [-2.0, -0.5], True) is None
    # the interval, not the point estimate, gives the side: a resampled statistic may lie outside its interval
    assert evaluation.protocol._verdict("kid", 0.1, [-0.3, -0.05], False) == "better"
    assert evaluation.protocol._verdict("gt_mse", -0.1, [0.05, 0.3], False) == "worse"


def test_meandiff_moves_towards_the_target(planted):
    m = metrics(planted)
    mean, ident = m["methods"]["meandiff"], m["methods"]["identity"]
    for attr in ("age", "dx"):
        assert mean[attr]["gt_mse"] < ident[attr]["gt_mse"]
        assert mean[attr]["vs"]["identity"]["gt_mse"]["verdict"] == "better"
        assert mean[attr]["ventricles_change_error_mm2"] < ident[attr]["ventricles_change_error_mm2"]
    assert mean["age"]["oracle_shift"] > 0 == ident["age"]["oracle_shift"]
    assert mean["age"]["mae"] < ident["age"]["mae"]


def test_meandiff_is_fitted_on_the_evaluated_attributes(tmp_path, planted):
    with SliceStore(planted[0]) as store:
        only_age = load_method("meandiff", store, attrs=["age"])
        both = baselines.MeanDiff.fit(store)
        assert only_age.schema.names == ["age"] and both.schema.names == ["age", "dx"]
        assert only_age.coef.shape[1] == 1 and both.coef.shape[1] == 1 + 2   # age, and dx without its reference class
        with pytest.raises(KeyError, match="nosuch.*not in the store"):
            baselines.MeanDiff.fit(store, attrs=["nosuch"])
    m = metrics(planted)
    assert m["attrs"] == ["age", "dx"]


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


@pytest.fixture(scope="module")
def phantom_store(tmp_path_factory):
    """A small store of the real synthetic cohort at the default geometry (128 px, 32 slices 2 mm apart)."""
    from mri.data import pipeline
    d = tmp_path_factory.mktemp("phantom")
    cfg = pipeline.PrepConfig(images=None, csv=None, out=str(d / "syn.h5"), attrs=("age", "dx"), size=128,
                          split=(0.34, 0.0, 0.66), workers=2, seed=2)
    pipeline.build(pipeline.synthetic_config(cfg, 3, str(d / "volumes")), log=lambda *a: None)
    return cfg.out


# every direction the protocol changes an attribute in: age by -10 or +10 years, -15 and +15 for larger changes,
# diagnosis to each class
DIRECTIONS = [("age", -10), ("age", 10), ("age", -15), ("age", 15), ("dx", "CN"), ("dx", "MCI"), ("dx", "Dementia")]
HIPPOCAMPUS_POSITIONS = 16   # the phantom's hippocampus lies in the lower half of the 32 slice positions


@pytest.fixture(scope="module")
def phantom_changes(phantom_store):
    """{direction: {structure: (true area changes, measured area changes)}} over the phantom's slices in the
    lower half of the slab (every hippocampus slice), each slice changed in every direction that changes it
    (age kept in the protocol's bounds), rendered subject by subject (a subject's anatomy is built once)."""
    import mri.synthetic
    with pytest.MonkeyPatch.context() as mp, SliceStore(phantom_store) as store:
        mp.setattr(mri.synthetic, "counterfactual", REAL_COUNTERFACTUAL)
        idx = np.flatnonzero(store.slice < HIPPOCAMPUS_POSITIONS)
        true_source = REAL_COUNTERFACTUAL(store, idx, masks=True)
        gt = evaluation.GroundTruth(store, idx, len(idx))
        out = {d: {s: ([], []) for s in evaluation.STRUCTURES} for d in DIRECTIONS}
        for subject in np.unique(store.subject[idx]):
            rows = idx[store.subject[idx] == subject]
            for attr, value in DIRECTIONS:
                own = store.attrs[attr][rows].astype(np.float64)
                target = (np.clip(own + value, *evaluation.AGE_PROTOCOL["bounds"]) if attr == "age" else
                          np.full(len(rows), store.schema["dx"].classes.index(value), np.float64))
                images, roi = gt.target(rows, {attr: target})
                true_target = REAL_COUNTERFACTUAL(store, rows, **{attr: target})
                measured = {s: gt.areas(images, roi, rows)[s] - gt.areas(store.images(rows), roi, rows)[s]
                            for s in roi}
                for s in evaluation.STRUCTURES:
                    has = (target != own) & roi[s].any((1, 2))
                    true = true_target[s] - true_source[s][np.searchsorted(idx, rows)]
                    out[(attr, value)][s][0].append(true[has])
                    out[(attr, value)][s][1].append(measured[s][has])
    return {d: {s: tuple(np.concatenate(v) for v in pair) for s, pair in c.items()} for d, c in out.items()}


@pytest.mark.slow   # the real phantom at 128 px, 32 slices: renders and registers whole volumes (68 CPU s)
@pytest.mark.parametrize("direction", DIRECTIONS, ids=[f"{a}{v:+d}" if a == "age" else f"{a}-{v}" for a, v in DIRECTIONS])
def test_area_measure_is_calibrated_in_every_direction(phantom_changes, direction):
    """The measured change of each structure against its true mask change, for slices of the real phantom
    changed in one direction of the protocol: slope 1 +- 0.1, correlation above 0.9."""
    for s in evaluation.STRUCTURES:
        true, measured = phantom_changes[direction][s]
        assert len(true) >= 10 and np.abs(true).mean() > 0, (s, len(true))
        slope = np.polyfit(true, measured, 1)[0]
        assert abs(slope - 1) < 0.1, (s, slope, len(true))
        assert np.corrcoef(true, measured)[0, 1] > 0.9, s


@pytest.mark.slow   # the real phantom at 128 px, 32 slices, through evaluate.py (24 CPU s)
def test_truth_on_the_real_phantom(tmp_path, phantom_store):
    """data_prep's synthetic store: truth has zero ground-truth error, identity is the floor."""
    import evaluate
    import mri.synthetic
    from models import oracle
    with SliceStore(phantom_store) as store:   # an untrained oracle is enough here
        oracle.save(oracle.build(store.schema, store.size, **oracle.TINY), str(tmp_path / "oracle"))
        write_json(tmp_path / "oracle" / "config.json", {"method": "oracle", "schema": json.loads(store.schema.to_json())})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mri.synthetic, "counterfactual", REAL_COUNTERFACTUAL)
        evaluate.main(["--store", phantom_store, "--oracle", str(tmp_path / "oracle"), "--methods", "identity,truth",
                       "--out", str(tmp_path / "report"), "--n", "24", "--subjects", "1", "--bootstrap", "200"])
    m = json.load(open(tmp_path / "report" / "metrics.json"))
    for attr in ("age", "dx"):
        truth = m["methods"]["truth"][attr]
        assert truth["gt_mse"] == 0 and truth["ventricles_change_error_mm2"] == 0
        assert truth["hippocampus_change_error_mm2"] == 0 and truth["hippocampus_pairs"] > 0


def test_refuses_a_method_judged_by_its_own_helper_and_a_mismatched_oracle(planted, tmp_path):
    import evaluate
    store, oracle_dir, _ = planted
    run = tmp_path / "runs" / "vagan"
    write_json(run / "config.json", {"method": "fader", "args": {"regressor": oracle_dir}})
    common = ["--store", store, "--out", str(tmp_path / "r"), "--n", "8"]
    with pytest.raises(SystemExit, match=f"{run}.*--regressor.*weights are those of the evaluation oracle.*own helper"):
        evaluate.main(common + ["--oracle", oracle_dir, "--methods", f"identity,{run}"])
    with pytest.raises(SystemExit, match="not both in the store"):
        evaluate.main(common + ["--oracle", oracle_dir, "--methods", "identity", "--attrs", "age,nosuch"])
    small = write_planted_store(str(tmp_path / "other.h5"))
    from models import oracle
    with SliceStore(small) as s:
        oracle.save(oracle.build(s.schema, 16, **oracle.TINY), str(tmp_path / "o16"))
        write_json(tmp_path / "o16" / "config.json", {"method": "oracle", "schema": json.loads(s.schema.to_json())})
    with pytest.raises(SystemExit, match="takes 16x16 slices.*--size 32"):
        evaluate.main(common + ["--oracle", str(tmp_path / "o16"), "--methods", "identity"])


def test_a_helper_with_the_oracles_weights_is_refused_by_content(planted, tmp_path, monkeypatch):
    """A run records its helper's absolute path and weight hash; evaluate refuses a helper whose weights are the
    oracle's: a copy of the oracle's run, a re-saved copy (other bytes, same weights), a relative path
    recorded without a hash; a helper path it cannot find is an error, and a helper with other weights passes."""
    import argparse
    import shutil
    import keras
    from models import check_independent
    from mri import training
    from mri.data.io import read_json, weights_hash
    store, oracle_dir, _ = planted
    monkeypatch.chdir(tmp_path)
    shutil.copytree(oracle_dir, "runs/regressor")
    with SliceStore(store) as s:
        training.Run("runs/vagan", "vagan", argparse.Namespace(regressor="runs/regressor", epochs=1), s.schema)
    config = read_json("runs/vagan/config.json")
    helper = config["helpers"]["regressor"]
    assert config["args"]["regressor"] == helper["path"] == str(tmp_path / "runs" / "regressor")
    assert helper["weights"] == weights_hash(oracle_dir)
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    keras.models.load_model(os.path.join(oracle_dir, "oracle.keras"), compile=False).save(resaved / "oracle.keras")
    with open(os.path.join(oracle_dir, "oracle.keras"), "rb") as f:
        assert (resaved / "oracle.keras").read_bytes() != f.read()      # the zip records when it was saved
    assert weights_hash(resaved) == helper["weights"]
    write_json("runs/legacy/config.json", {"method": "vagan", "args": {"regressor": "runs/regressor"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for oracle in (oracle_dir, str(resaved)):
        with pytest.raises(ValueError, match="whose weights are those of the evaluation oracle"):
            check_independent(str(tmp_path / "runs" / "vagan"), oracle)
        with pytest.raises(ValueError, match="whose weights are those of the evaluation oracle"):
            check_independent(str(tmp_path / "runs" / "legacy"), oracle)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError, match="whose weights are those of the evaluation oracle"):
        check_independent(str(tmp_path / "runs" / "vagan"), oracle_dir)    # recorded absolute, with its hash
    with pytest.raises(FileNotFoundError, match="runs/regressor is not found from .*run evaluate.py from"):
        check_independent(str(tmp_path / "runs" / "legacy"), oracle_dir)
    other = tmp_path / "other"
    other.mkdir()
    model = keras.models.load_model(resaved / "oracle.keras", compile=False)
    model.set_weights([w + 1 for w in model.get_weights()])
    model.save(other / "oracle.keras")
    check_independent(str(tmp_path / "runs" / "vagan"), str(other))


def test_oracle_is_scored_on_the_test_split(planted):
    o = metrics(planted)["oracle_test"]
    assert o["n"] > 0 and o["subjects"] == SPLITS.count(2)
    assert 0 <= o["dx"]["balanced_accuracy"] <= 1 and o["dx"]["chance_balanced_accuracy"] == pytest.approx(1 / 3)
    lo, hi = o["dx"]["ci"]["balanced_accuracy"]
    assert lo <= hi and o["age"]["mae"] > 0 and o["age"]["ci"]["mae"][0] <= o["age"]["ci"]["mae"][1]
    from models.oracle import load_oracle
    with SliceStore(planted[0]) as store:
        test = store.indices("test")
        pred = load_oracle(planted[1]).predict_raw(store.images(test)[..., None])["dx"]
        true = store.attrs["dx"][test]
    recall = [np.mean(pred[true == k] == k) for k in np.unique(true)]
    assert o["dx"]["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert o["dx"]["accuracy"] == pytest.approx(np.mean(pred == true))
    assert abs(np.mean(recall) - np.mean(pred == true)) > 0.01   # the classes are unbalanced: they differ


@pytest.mark.parametrize("script", ["evaluate.py", "train_oracle.py"])
def test_scripts_have_help_and_seed(script, script_help):
    assert "--seed" in script_help[script]


@contextlib.contextmanager
def drawn_pairs():
    """Records the pairs the evaluation draws, {attribute: (source indices, target values)}, and their
    references under "<attribute> references"."""
    drawn, draw, match = {}, evaluation.draw_pairs, evaluation.matched_reference

    def spy(store, sample, change, rng):
        drawn[change.name] = draw(store, sample, change, rng)
        return drawn[change.name]

    def references(store, test, src, targets, change, rng):
        drawn[f"{change.name} references"] = match(store, test, src, targets, change, rng)
        return drawn[f"{change.name} references"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation.protocol, "draw_pairs", spy)
        mp.setattr(evaluation.protocol, "matched_reference", references)
        yield drawn


class Partial:
    """meandiff making only some changes (`supports`): dx into Dementia, age upwards; it refuses to be called on
    any other change than these or none."""

    def __init__(self, inner):
        self.inner = inner

    def supports(self, source, target):
        return np.where(target["dx"] != source["dx"], target["dx"] == 2, target["age"] > source["age"])

    def manipulate(self, images, source, target):
        same = (source["dx"] == target["dx"]) & (source["age"] == target["age"])
        assert (self.supports(source, target) | same).all()
        return self.inner.manipulate(images, source, target)


def test_a_method_is_scored_and_compared_on_the_changes_it_supports(planted, capsys):
    """On the pairs it makes, Partial is meandiff: its pair counts are those `supports` accepts, its paired
    differences to meandiff (on the common pairs) are 0, to identity its own MSE (the floor's is 0); it makes no
    change back (reversibility unscored); its trajectory cells are blank exactly where it supports nothing.
    The floor's KID is that of the source slices against their references, slices of one subject never
    compared; the progress bar counts every manipulated slice."""
    from models.oracle import load_oracle
    store_path, oracle_dir, _ = planted
    with SliceStore(store_path) as store, drawn_pairs() as drawn:
        meandiff = load_method("meandiff", store, attrs=["age", "dx"])
        partial = Partial(meandiff)
        oracle = load_oracle(oracle_dir)
        m = evaluation.evaluate(store, oracle, {"meandiff": meandiff, "partial": partial}, n=24,
                                seed=3, batch_size=16, n_boot=200, log=lambda *a: None)
        manipulated = 2 * (sum(2 * p["pairs"] for p in m["protocol"].values()) + evaluation.REPEATS * m["n"])
        assert f"{manipulated}/{manipulated}" in capsys.readouterr().err
        for name in ("age", "dx"):
            (src, _), ref = drawn[name], drawn[f"{name} references"]
            ok = ref >= 0
            feats = [oracle.features(store.images(i)[..., None]) for i in (src[ok], ref[ok])]
            kid = stats.kid(*feats, None, store.subject[src[ok]], store.subject[ref[ok]])
            assert m["floor"][name]["kid"] == pytest.approx(kid, rel=1e-4, abs=1e-9)
        for name in ("age", "dx"):
            src, tgt = drawn[name]
            source = store.raw(src)
            made = int(partial.supports(source, dict(source, **{name: tgt})).sum())
            s, pairs = m["methods"]["partial"][name], m["protocol"][name]["pairs"]
            assert 0 < s["pairs"] == made < pairs == m["methods"]["meandiff"][name]["pairs"]
            assert 4 <= s["kid_pairs"] <= s["pairs"] and s["reversibility_l1"] is None
            for k, d in s["vs"]["meandiff"].items():   # the KID needs pairs and references of two subjects
                unscored = k == "reversibility_l1" or (k == "kid" and s["kid"] is None)
                assert d["diff"] is None if unscored else d["diff"] == pytest.approx(0, abs=1e-6), k
            assert s["vs"]["identity"]["mse"]["diff"] == pytest.approx(s["mse"], rel=1e-9) and s["mse"] > 0
        assert m["methods"]["partial"]["age"]["kid"] is not None
        report = evaluation.report_markdown(m)
        dx = f"Pairs scored, of {m['protocol']['dx']['pairs']}: partial {m['methods']['partial']['dx']['pairs']}."
        assert dx in report
        idx = evaluation.trajectory_slices(store, 2, 3)
        x, raw = store.images(idx)[..., None], evaluation.told(store, idx, store.raw(idx))
        changes = [evaluation.change_for(store.schema[a]) for a in ("age", "dx")]
        cols = evaluation.figures._sweep(partial, x, raw, changes, idx)
        targets = [dict(raw, **{c.name: np.full(len(idx), v, np.float64)}) for c in changes for v in c.sweep]
        for i in range(len(idx)):
            cells = evaluation.figures._row(x, cols, i)[1:]
            blank = [bool((cell == 255).all()) for cell, col in zip(cells, cols) if col is not None]
            assert blank == [not partial.supports(raw, t)[i] for t in targets]
            assert not all(blank)


@pytest.mark.slow   # end to end: train_cyclegan.py, then evaluate.py on its run
def test_evaluate_scores_a_cyclegan_run_on_its_domains(planted, tmp_path):
    """A tiny CycleGAN between CN and Dementia through evaluate.py: no age pair, the dx pairs between its domains."""
    import evaluate
    import train_cyclegan
    store, oracle, _ = planted
    run, out = str(tmp_path / "cyclegan"), tmp_path / "report"
    train_cyclegan.main(["--store", store, "--out", run, "--domains", "dx=CN:Dementia", "--tiny", "--blocks", "1",
                         "--batch-size", "4", "--epochs", "1", "--steps-per-epoch", "1"])
    with drawn_pairs() as drawn:
        evaluate.main(["--store", store, "--oracle", oracle, "--methods", f"identity,{run}", "--out", str(out),
                       "--n", "24", "--batch-size", "16", "--subjects", "2", "--bootstrap", "100", "--seed", "3"])
    m = json.load(open(out / "metrics.json"))
    age, dx = m["methods"][run]["age"], m["methods"][run]["dx"]
    assert age["pairs"] == 0 and age["mse"] is None and age["kid"] is None
    src, tgt = drawn["dx"]
    with SliceStore(store) as s:
        between = np.isin(s.attrs["dx"][src], [0, 2]) & np.isin(tgt, [0, 2])
    assert 0 < dx["pairs"] == between.sum() < m["protocol"]["dx"]["pairs"] and dx["mse"] > 0
    assert dx["reversibility_l1"] > 0 and dx["vs"]["identity"]["gt_mse"]["diff"] is not None
    report = open(out / "report.md").read()
    assert f"Pairs scored, of 24: {run} 0." in report and "blank cells: changes" in report


def test_change_cosine_reads_direction_inside_the_brain_only():
    """The cosine to the true change: 1 for half the true change, -1 for its opposite, whatever a method does
    outside the source's brain; unscored (NaN) for no change."""
    yy, xx = np.mgrid[:32, :32] - 15.5
    x = np.where(np.hypot(yy, xx) < 9, 0.3, -1.0)[None, :, :, None].repeat(3, 0).astype(np.float32)
    brain = evaluation.above_background(x)
    true = x[..., 0] + np.where(brain, np.random.default_rng(0).normal(0, 0.1, brain.shape), 0.0)
    half, opposite = x.copy(), x.copy()
    half[..., 0] += 0.5 * (true - x[..., 0])
    opposite[..., 0] -= true - x[..., 0]
    for y in (half, opposite):
        y[:, :3, :3, 0] = 0.9                      # outside the brain: no weight
    change, oracle = evaluation.Change("age", "continuous"), (np.zeros(3), None)
    truth = (true, {s: brain for s in evaluation.STRUCTURES}, np.arange(3), NoAreas())
    score = lambda y: evaluation.protocol._score(change, x, y, x, np.zeros(3), np.ones(3), oracle, oracle, truth)
    np.testing.assert_allclose(score(half)["gt_change_cosine"], 1.0, rtol=1e-9)
    np.testing.assert_allclose(score(opposite)["gt_change_cosine"], -1.0, rtol=1e-9)
    assert np.isnan(score(x)["gt_change_cosine"]).all()
    assert evaluation.protocol.DIRECTION["gt_change_cosine"] == 1


@pytest.mark.parametrize("followup", [False, True])
def test_evaluate_scores_every_method_but_truth_and_identity_inside_the_head(planted, tmp_path, monkeypatch, followup):
    """evaluate.py hands the evaluator (both protocols) meandiff wrapped in models.InsideHead, truth and identity
    as they are."""
    import evaluate
    import models

    class Stop(Exception):
        pass
    seen = {}

    def capture(store, *args, **kwargs):
        seen.update(next(a for a in args if isinstance(a, dict)))
        raise Stop
    monkeypatch.setattr(evaluation, "evaluate_followup" if followup else "evaluate", capture)
    store, oracle, _ = planted
    with pytest.raises(Stop):
        evaluate.main(["--store", store, "--oracle", oracle, "--methods", "identity,meandiff,truth", "--n", "4",
                       "--out", str(tmp_path / "r")] + (["--followup"] if followup else []))
    assert isinstance(seen["meandiff"], models.InsideHead)
    assert not isinstance(seen["identity"], models.InsideHead) and not isinstance(seen["truth"], models.InsideHead)
