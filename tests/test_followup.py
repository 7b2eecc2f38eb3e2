"""The follow-up protocol (evaluation/followup.py, evaluate.py --followup) on a tiny planted longitudinal store.

Disc "brains" whose dark ventricle grows with age, each scan with its own noise (seeded by its noise seed);
subjects have one to three visits, written out of time order; a fake `mri.synthetic.counterfactual` re-renders
any slice at another age or noise seed, so the truth and the noise floor are known exactly.
"""
import json
import os

import numpy as np
import pytest

import evaluation
from evaluation import followup
from mri.data.attributes import Attribute, Schema
from mri.data.store import SliceStore, write_store
from models import baselines

SIZE, SLICES, NOISE = 24, 3, 0.03
# subject -> (split, baseline age, visits as (code, years after baseline) in the order they are written)
SUBJECTS = {"T0": (2, 70.0, [("m24", 2.0), ("bl", 0.0), ("m12", 1.0)]),
            "T1": (2, 64.0, [("bl", 0.0), ("m48", 4.0)]),
            "T2": (2, 77.0, [("m12", 1.0), ("bl", 0.0), ("m24", 2.0)]),
            "T3": (2, 81.0, [("bl", 0.0)]),
            **{f"R{i}": (0, 60.0 + 3 * i, [("bl", 0.0), ("m12", 1.0)]) for i in range(6)}}


def render(seed, age, position, noise_seed):
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    inside = np.hypot(yy, xx) < 10
    ventricle = np.hypot(yy, xx / 1.3) < 1.5 + 0.15 * (age - 60) + 0.3 * (seed % 3) + 0.2 * position
    img = np.where(ventricle, -0.4, np.where(inside, 0.6 + 0.05 * position, -1.0))
    img = img + np.random.default_rng([int(noise_seed), position]).normal(0, NOISE, img.shape) * inside
    return np.clip(img, -1, 1).astype(np.float32)


def fake_counterfactual(store, indices, age=None, dx=None, masks=False, noise_seed=None):
    idx = np.asarray(indices)
    age = store.attrs["age"][idx] if age is None else np.broadcast_to(age, idx.shape)
    noise = store.csv("noise_seed", idx) if noise_seed is None else np.broadcast_to(noise_seed, idx.shape)
    seeds = store.csv("subject_seed", idx)
    return {"images": np.stack([render(int(s), float(a), int(p), int(n))
                                for s, a, p, n in zip(seeds, age, store.slice[idx], noise)])}


def write_longitudinal_store(path, subjects=SUBJECTS, synthetic=True):
    volumes = []
    for k, (name, (split, age, visits)) in enumerate(subjects.items()):
        for code, years in visits:
            volumes.append({"subject": name, "visit": code, "split": split, "path": f"{name}_{code}",
                            "attrs": {"age": age + years, "dx": float(k % 2)},
                            "csv": {"subject_seed": k, "noise_seed": 100 * k + int(years * 10)},
                            "slice_mm": np.arange(SLICES, dtype=np.float32)})
    train = [v["attrs"]["age"] for v in volumes if v["split"] == 0]
    schema = Schema([Attribute("age", "continuous").fit(train), Attribute("dx", "categorical", ["CN", "MCI"])])

    def load(i):
        v = volumes[i]
        return np.stack([render(v["csv"]["subject_seed"], v["attrs"]["age"], p, v["csv"]["noise_seed"])
                         for p in range(SLICES)]), {"side_mm": 48.0}

    write_store(str(path), volumes, load, schema, SIZE, {"source": "planted longitudinal store"},
                keep_columns=("subject_seed", "noise_seed") if synthetic else ())
    return str(path)


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mri.synthetic
    monkeypatch.setattr(mri.synthetic, "counterfactual", fake_counterfactual)
    with SliceStore(write_longitudinal_store(tmp_path / "long.h5")) as s:
        yield s


class Cheat:
    """Returns the real later slice: it has the store (given in this test only) and finds the slice of the
    source's subject at the same position and the target age."""

    def __init__(self, store, outside=0.0):
        self.store, self.outside = store, outside

    def manipulate(self, images, source, target):
        s = self.store
        all_images = s.images(np.arange(len(s)))
        out = []
        for x, pos, age in zip(images[..., 0], source["slice"], target["age"]):
            subject = s.subject[np.flatnonzero((all_images == x).all((1, 2)))[0]]
            j = np.flatnonzero((s.subject == subject) & (s.slice == pos) & (np.abs(s.attrs["age"] - age) < 1e-3))
            y = all_images[j[0]].copy()
            y[x <= evaluation.metrics.BACKGROUND] += self.outside   # garbage outside the earlier brain
            out.append(y)
        return np.stack(out)[..., None]


def test_pairs_are_within_a_subject_and_ordered_by_time(store):
    earlier, later = followup.visit_pairs(store)
    assert (store.subject[earlier] == store.subject[later]).all()
    assert (store.slice[earlier] == store.slice[later]).all()
    assert (store.attrs["age"][later] > store.attrs["age"][earlier]).all()
    # every pair of visits of each test subject, at every slice: 3 + 1 + 3 + 0 visit pairs
    assert len(earlier) == 7 * SLICES
    spans = sorted(set(np.round(store.attrs["age"][later] - store.attrs["age"][earlier], 3)))
    assert spans == [1.0, 2.0, 4.0]
    assert set(store.split[earlier]) == {2}


def test_identity_scores_the_observed_change_and_a_cheat_scores_perfectly(store):
    methods = {"identity": baselines.Identity(), "cheat": Cheat(store), "outside": Cheat(store, outside=0.7)}
    r = followup.evaluate_followup(store, methods, n=10_000, n_boot=200, attrs=["age", "dx"])
    earlier, later = followup.visit_pairs(store)
    x, z = store.images(earlier), store.images(later)
    brain = x > evaluation.metrics.BACKGROUND
    change = (z - x).astype(np.float64) ** 2
    assert r["pairs"] == len(earlier) and r["subjects"] == 3 and r["visit_pairs"] == 7
    assert r["floor"]["fu_mse"] == pytest.approx(change.mean((1, 2)).mean(), rel=1e-6)
    assert r["floor"]["fu_mse_brain"] == pytest.approx(((change * brain).sum((1, 2)) / brain.sum((1, 2))).mean(),
                                                       rel=1e-6)
    assert r["floor"]["fu_mse_brain"] > 1.2 * r["floor"]["fu_mse"]   # the mask matters here
    assert r["methods"]["identity"]["fu_mse"] == r["floor"]["fu_mse"]
    assert r["floor"]["fu_change_corr"] == 0
    cheat = r["methods"]["cheat"]
    assert cheat["fu_mse"] == 0 and cheat["fu_mse_brain"] == 0
    assert cheat["fu_change_corr"] == pytest.approx(1.0) and cheat["fu_ssim"] == pytest.approx(1.0)
    assert cheat["vs"]["identity"]["fu_mse_brain"]["verdict"] == "better"
    assert cheat["vs"]["identity"]["fu_change_corr"]["verdict"] == "better"
    # outside the earlier brain the cheat adds garbage: whole-image MSE sees it, brain scores must not
    outside = r["methods"]["outside"]
    assert outside["fu_mse"] > 0.01 and outside["fu_mse_brain"] == 0
    assert outside["fu_change_corr"] == pytest.approx(1.0)


def test_synthetic_stores_get_the_truth_and_the_noise_floor(store):
    methods = {"identity": baselines.Identity(), "meandiff": baselines.make("meandiff", store, ["age", "dx"]),
               "truth": baselines.make("truth", store)}
    r = followup.evaluate_followup(store, methods, n=10_000, n_boot=200, attrs=["age", "dx"])
    truth, noise = r["methods"]["truth"], r["noise_floor"]
    assert truth["gt_mse"] == 0 and truth["gt_change_corr"] == pytest.approx(1.0)
    assert "gt_mse" in truth["by_construction"]
    # truth differs from the later scan by two scans' noise inside the brain, as does the re-scan
    for row in (truth, noise):
        assert row["fu_mse_brain"] == pytest.approx(2 * NOISE ** 2, rel=0.25)
    assert noise["fu_change_corr"] > 0.3 and "vs" not in noise or not noise["vs"]
    assert r["floor"]["gt_mse_brain"] > 0 and r["floor"]["gt_change_corr"] == 0
    assert set(r["agreement"]["per_pair"]) == {evaluation.FLOOR, "identity", "meandiff"}   # truth: exact
    assert r["agreement"]["across_methods"]["fu_change_corr"] is not None
    assert "meandiff" in truth["vs"] and "identity" in truth["vs"]


def test_methods_are_told_images_attributes_and_positions_only(store):
    seen = []

    class Spy:
        def manipulate(self, images, source, target):
            seen.append((set(source), set(target), np.asarray(target["age"]) - np.asarray(source["age"])))
            return images

    followup.evaluate_followup(store, {"spy": Spy()}, n=10_000, n_boot=200, attrs=["age"])
    assert all(s == t == {"age", "dx", "slice"} for s, t, _ in seen)
    assert np.all(np.concatenate([d for *_, d in seen]) > 0)


def test_a_real_store_without_truth_is_scored(tmp_path):
    with SliceStore(write_longitudinal_store(tmp_path / "real.h5", synthetic=False)) as s:
        r = followup.evaluate_followup(s, {"identity": baselines.Identity()}, n=10_000, n_boot=200)
    assert not r["synthetic"] and "noise_floor" not in r and "gt_mse" not in r["floor"]
    lines = "\n".join(evaluation.report.followup_markdown(r))
    assert "Follow-up" in lines and "GT" not in lines


def test_single_visit_store_is_refused_with_the_fix(tmp_path):
    single = {k: (v[0], v[1], v[2][:1]) for k, v in SUBJECTS.items()}
    with SliceStore(write_longitudinal_store(tmp_path / "single.h5", single)) as s:
        with pytest.raises(ValueError, match="two or more visits.*data_prep.py --synthetic"):
            followup.visit_pairs(s)


def test_correlation_inside_the_mask():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 8, 8)), rng.normal(size=(2, 8, 8))
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:6, 1:7] = True
    y[:, ~mask[0]] += 50 * x[:, ~mask[0]]   # outside the mask: perfectly correlated, must not count
    r = evaluation.correlation(x, y, mask)
    expected = [np.corrcoef(x[i][mask[i]], y[i][mask[i]])[0, 1] for i in range(2)]
    np.testing.assert_allclose(r, expected)
    assert evaluation.correlation(np.zeros_like(x), y, mask).tolist() == [0.0, 0.0]


def test_evaluate_followup_cli(tmp_path, monkeypatch):
    import evaluate
    import mri.synthetic
    monkeypatch.setattr(mri.synthetic, "counterfactual", fake_counterfactual)
    path = write_longitudinal_store(tmp_path / "long.h5")
    out = tmp_path / "report"
    evaluate.main(["--followup", "--store", path, "--methods", "identity,meandiff,truth", "--bootstrap", "100",
                   "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["followup"]["pairs"] == 7 * SLICES and "noise_floor" in metrics["followup"]
    report = (out / "report.md").read_text()
    assert "## Follow-up" in report and "noise floor (re-scan)" in report
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--store", path, "--out", str(out)])   # no --oracle and no --followup
