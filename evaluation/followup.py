"""The follow-up protocol (evaluate.py --followup): methods judged against real later scans.

On a real cohort the only truth of a change is the follow-up scan. For each test subject with two or more
visits, every pair of its visits in time order (`visit_pairs`: by age, then visit code, as data_prep orders
them) gives, at each axial index both hold, a pair (earlier slice x, later slice z): data_prep registers every
follow-up to the subject's first visit and cuts it with that visit's plan, so slice k of every visit shows the
same anatomy (stores built with --register off are only as aligned as the scans; the result records which).
Each method turns x into the later visit's attributes, y = M(x, earlier -> later), told the images, the two
visits' attributes (the evaluated ones; the others keep the earlier's) and the slice positions (`told`),
nothing else. Per pair, against the real later slice z, inside the earlier slice's brain (its pixels above
the background) or over the whole image:

- fu_mse, fu_ssim, fu_mse_brain, fu_ssim_brain: y against z;
- fu_change_corr: the Pearson correlation, inside the brain, of the predicted change y - x with the observed
  change z - x (0 for a method that predicts no change, so its difference to identity is the correlation).

The no-change floor (y = x, reported as identity; its fu_mse is the mean squared observed change) and every
method get subject-level intervals (stats.SubjectBootstrap) and paired differences to identity and meandiff
with verdicts, by evaluation.protocol's `summarise` and `_verdict`.

Two scans of one brain at one time differ (noise, bias field, intensity scale), so no method reaches 0. On
synthetic stores the **noise floor** re-renders the later visit with another noise seed (a re-scan,
`mri.synthetic.counterfactual(noise_seed=...)`; no method sees it) and scores it as a prediction: what
knowing the later anatomy exactly gives with scan noise of its own. A reference, not a bound: a noise-free
prediction halves its MSE, and the observed change z - x holds the earlier slice's noise with the opposite
sign, so any change that removes it (smoothing) correlates with the observed change without predicting any
anatomy (measured in the README). There the same pairs are also scored against the
**ground truth**, the true counterfactual of x at the later attributes (gt_mse, gt_mse_brain, gt_ssim_brain,
and gt_change_corr: the predicted change against the true one), and `agreement` says how well the follow-up
scores predict the ground-truth ones: per method the correlation over pairs, and over the methods (floor and
methods, not the noise floor nor `truth`, exact by construction) the rank correlation of their means.
"""
import numpy as np

from evaluation.metrics import above_background, correlation, mse, ssim
from evaluation.protocol import FLOOR, is_reference, manipulated, summarise, told
from models import supported
from mri import stats
from mri.data.pipeline import visit_key
from mri.synthetic import is_synthetic

NOISE_FLOOR = "noise floor (re-scan)"
RESCAN_SEED = 1_000_003   # the re-scan's noise seed: the later scan's own + this
AGREEMENT = (("fu_mse_brain", "gt_mse_brain"), ("fu_change_corr", "gt_change_corr"))


def visit_pairs(store, split="test"):
    """(earlier, later) store indices, (P,) each: for every subject of `split` with two or more visits, every
    pair of its visits in time order (pipeline.visit_key), at every axial index both visits hold."""
    visits = {}
    for i in store.indices(split):
        visits.setdefault(store.subject[i], {}).setdefault(int(store.volume[i]), {})[int(store.slice[i])] = int(i)
    paths = store.file["volumes/path"].asstr()[:]

    def key(volume, slices):
        i = next(iter(slices.values()))
        age = {"age": float(store.attrs["age"][i])} if "age" in store.attrs else {}
        return visit_key({"visit": str(store.visit[i]), "path": paths[volume], "attrs": age})

    earlier, later = [], []
    for subject in sorted(visits):
        order = sorted(visits[subject].items(), key=lambda kv: key(*kv))
        for a, (_, first) in enumerate(order):
            for _, second in order[a + 1:]:
                common = sorted(set(first) & set(second))
                earlier += [first[k] for k in common]
                later += [second[k] for k in common]
    if not earlier:
        raise ValueError(f"{store.path}: no subject of the {split} split has two or more visits "
                         f"({len(visits)} subjects, one visit each), so there is no follow-up scan to score "
                         "against; --followup needs a longitudinal store: build it from a cohort with follow-up "
                         "scans (every visit's volume under --images and its row in --csv, e.g. ADNIMERGE), or a "
                         "synthetic one (`python data_prep.py --synthetic 200 --out data/synthetic.h5` has visits "
                         "bl,m12,m24; --synthetic-visits for more)")
    return np.array(earlier, np.int64), np.array(later, np.int64)


def rescan(store, idx):
    """(N, S, S) the slices idx of a synthetic store re-rendered with another noise seed: another scan of the
    same brain at the same time (mri.synthetic.counterfactual; looked up at call time)."""
    from mri import synthetic
    seeds = store.csv("noise_seed", idx).astype(np.int64) + RESCAN_SEED
    return np.asarray(synthetic.counterfactual(store, idx, noise_seed=seeds)["images"], np.float32)


def score_pair(x, y, z, truth=None):
    """Per-pair scores of predictions y of the later slices z from the earlier slices x (N, S, S[, 1]);
    truth: the true counterfactuals of x at the later attributes (synthetic stores) or None."""
    x, y, z = (np.asarray(a, np.float32).reshape(len(x), *np.shape(x)[1:3]) for a in (x, y, z))
    brain = above_background(x)
    out = {"fu_mse": mse(y, z), "fu_ssim": ssim(y, z), "fu_mse_brain": mse(y, z, brain),
           "fu_ssim_brain": ssim(y, z, mask=brain), "fu_change_corr": correlation(y - x, z - x, brain)}
    if truth is not None:
        t = np.asarray(truth, np.float32).reshape(x.shape)
        out.update(gt_mse=mse(y, t), gt_mse_brain=mse(y, t, brain), gt_ssim_brain=ssim(y, t, mask=brain),
                   gt_change_corr=correlation(y - x, t - x, brain))
    return out


def _chunks(store, earlier, later, batch_size):
    """Pairs in batches of at most batch_size, each within one pair of volumes (one render per batch)."""
    volumes = np.stack([store.volume[earlier], store.volume[later]], 1)
    _, first = np.unique(volumes, axis=0, return_index=True)
    starts = sorted(set(first.tolist()))
    for a, b in zip(starts, starts[1:] + [len(earlier)]):
        for i in range(a, b, batch_size):
            yield earlier[i:min(i + batch_size, b)], later[i:min(i + batch_size, b)]


def score_followup(store, methods, earlier, later, attrs, batch_size, synthetic, progress=None):
    """Per-pair scores {row: {metric: (P,)}} of the floor, every method and (synthetic) the noise floor, and
    the pairs each method makes {method: (P,) bool}; pairs sorted by volumes. `progress(method, k)`."""
    from models.baselines import Truth
    truth = Truth(store) if synthetic else None
    rows = [FLOOR, *methods] + ([NOISE_FLOOR] if synthetic else [])
    parts, made = {m: {} for m in rows}, {m: [] for m in methods}
    for e, l in _chunks(store, earlier, later, batch_size):
        x = store.pixels(e)
        z = store.images(l)
        source = told(store, e, store.raw(e))
        target = dict(source, **store.raw(l, attrs))
        true = truth.render(e, target) if truth else None
        outputs = {FLOOR: x}
        for m, method in methods.items():
            ok = supported(method, source, target, len(e))
            outputs[m] = manipulated(method, x, source, target, ok, e)
            made[m].append(ok)
            if progress:
                progress(m, len(e))
        if synthetic:
            outputs[NOISE_FLOOR] = rescan(store, l)
        for m, y in outputs.items():
            scores = score_pair(x, y, z, true)
            ok = made[m][-1] if m in methods else np.ones(len(e), bool)
            for k, v in scores.items():
                parts[m].setdefault(k, []).append(np.where(ok, v, np.nan))
    return ({m: {k: np.concatenate(v) for k, v in p.items()} for m, p in parts.items()},
            {m: np.concatenate(v) for m, v in made.items()})


def _pearson(a, b):
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def agreement(per_pair, summaries):
    """How the follow-up scores predict the ground-truth ones: {"per_pair": {row: {metric: r}}} (Pearson over
    the pairs of each row) and {"across_methods": {metric: rank correlation of the rows' means}, "rows": [their names]}."""
    from scipy.stats import spearmanr
    out = {"per_pair": {m: {fu: _pearson(s[fu], s[gt]) for fu, gt in AGREEMENT} for m, s in per_pair.items()},
           "across_methods": {}, "rows": [m for m in summaries]}
    for fu, gt in AGREEMENT:
        means = np.array([[s.get(fu), s.get(gt)] for s in summaries.values()], np.float64)
        ok = np.isfinite(means).all(1)
        rho = spearmanr(means[ok, 0], means[ok, 1])[0] if ok.sum() >= 3 else np.nan
        out["across_methods"][fu] = None if not np.isfinite(rho) else float(rho)
    return out


def evaluate_followup(store, methods, n=512, seed=0, batch_size=64, attrs=None, n_boot=1000):
    """The follow-up protocol on up to n seeded visit pairs of slices of the test split; a JSON-ready dict
    (metrics.json's "followup")."""
    from tqdm import tqdm
    names = list(attrs or store.schema.names)
    earlier, later = visit_pairs(store)
    rng = np.random.default_rng([seed, 3])
    pick = np.sort(rng.choice(len(earlier), min(n, len(earlier)), replace=False))
    order = np.lexsort((store.slice[earlier[pick]], store.volume[later[pick]], store.volume[earlier[pick]]))
    earlier, later = earlier[pick][order], later[pick][order]
    synthetic = is_synthetic(store)
    with tqdm(total=len(methods) * len(earlier), desc="follow-up", unit="slice", dynamic_ncols=True) as bar:
        def progress(method, k):
            bar.set_postfix_str(method, refresh=False)
            bar.update(k)
        per_pair, made = score_followup(store, methods, earlier, later, names, batch_size, synthetic, progress)
    groups = store.subject[earlier]
    boot = stats.SubjectBootstrap(groups, n_boot, seed)
    fixed = {m: sorted(getattr(method, "by_construction", ())) for m, method in methods.items()}
    references = [r for r in ("meandiff", FLOOR) if r in methods or r == FLOOR]
    noise = per_pair.pop(NOISE_FLOOR, None)
    scores = summarise(per_pair, groups, boot, references, fixed)
    for m in methods:
        scores[m].update(pairs=int(made[m].sum()), by_construction=fixed[m])
    span = store.attrs["age"][later] - store.attrs["age"][earlier] if "age" in store.attrs else None
    result = {"pairs": len(earlier), "visit_pairs": len({*zip(store.volume[earlier], store.volume[later])}),
              "subjects": len(boot.subjects), "seed": seed, "store": store.path, "attrs": names,
              "registered": store.provenance.get("arguments", {}).get("register"), "synthetic": synthetic,
              "span_years": None if span is None else {"mean": float(span.mean()), "min": float(span.min()),
                                                       "max": float(span.max())},
              "bootstrap": {"resamples": n_boot, "level": stats.LEVEL, "unit": "subject"},
              "floor": scores.pop(FLOOR), "methods": scores}
    if noise is not None:
        result["noise_floor"] = summarise({NOISE_FLOOR: noise}, groups, boot, [], {})[NOISE_FLOOR]
        rows = {FLOOR: result["floor"], **result["methods"]}
        rows = {m: s for m, s in rows.items() if m == FLOOR or not is_reference(methods[m])}   # truth: GT exact
        result["agreement"] = agreement({m: per_pair[m] for m in rows}, rows)
    return result
