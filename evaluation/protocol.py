"""The evaluation protocol, the same for every method (docs/ARCHITECTURE.md, "Evaluation").

On a seeded sample of test slices, each evaluated attribute (the oracle's schema, or `attrs`) is changed the
same way for every method (`change_for`): age by +10 or -10 years (random sign, kept in 55..95), a categorical
attribute to each other class, a binary one to the other value, another continuous one by +-1 train std. Each
method's manipulated images are then scored per pair (`_score`):

- effectiveness: the oracle's prediction vs the target (accuracy, or MAE in raw units), and its shift towards
  the target: for continuous attributes the predicted change signed by the requested direction, for binary and
  categorical ones the gain in the oracle's probability of the target class (less noisy than accuracy when the
  oracle is unsure);
- identity / minimality: MSE and SSIM against the source, over the whole image and inside the brain (the
  source's foreground: half of every image is background); reconstruction MSE at unchanged attributes;
- composition: the unchanged-attribute manipulation applied 5 times, mean L1 drift from the source;
- reversibility: source -> target -> source, mean L1 to the source;
- realism: the Kernel Inception Distance (`stats.kid`) between oracle features of the manipulated slices and
  of real test slices with the target attributes, one reference per pair drawn without replacement (at the
  source's slice position when one is left); the Fréchet distance only when the pairs number at least
  FD_MIN_RATIO times the feature dimension (below that its covariance estimate is noise);
- ground truth (synthetic stores): MSE and SSIM against the true counterfactual (whole image and brain), the
  cosine between the method's change and the true change inside the brain (`gt_change_cosine`: direction
  apart from size; undefined, so unscored, for a method that changes nothing), and the signed (bias) and
  absolute error of the measured ventricle and hippocampus area change (GroundTruth).

A method is told the source images, the source and target attributes and the slices' axial positions
(`told`), never their store indices: nothing leads it to the true counterfactual, which the evaluator renders
itself (GroundTruth, and the `truth` row: `is_reference`).

Every number gets a 95 % interval from a bootstrap over test *subjects* (`stats.SubjectBootstrap`), and every
method a paired difference to `meandiff` (when evaluated) and to `identity` (the no-change floor) on each
metric, with its interval; the verdict "better" / "worse" is given only when that interval excludes 0.
Scores a method reaches by construction (declared by its `by_construction` attribute, e.g. a residual mode's
zero reconstruction error) are marked and never ranked. A method that makes only some changes (its `supports`,
models/__init__.py: CycleGAN between two domains) is scored on the pairs it makes, their number reported, and
compared on the pairs both sides make; its other trajectory cells are blank.
"""
from dataclasses import dataclass
from functools import partial

import numpy as np

from mri import stats
from evaluation.metrics import above_background, cosine, frechet_distance, l1, mse, ssim
from evaluation.truth import STRUCTURES, GroundTruth
from models import supported
from models.baselines import FLOOR_BY_CONSTRUCTION
from mri.synthetic import is_synthetic


AGE_PROTOCOL = dict(shift=10.0, bounds=(55.0, 95.0), tolerance=5.0, sweep=tuple(range(60, 91, 5)))
REPEATS = 5            # composition: applications of the unchanged-attribute manipulation
FD_MIN_RATIO = 4       # Fréchet distance only with at least this many pairs per feature dimension
N_BOOT = 1000          # bootstrap resamples
# +1: higher is better, -1: lower is better; metrics not listed (MSE/SSIM to the source, area bias) have no
# better direction, so their paired differences get no verdict
DIRECTION = {"mae": -1, "oracle_shift": 1, "accuracy": 1, "target_prob_shift": 1, "reversibility_l1": -1,
             "kid": -1, "gt_mse": -1, "gt_change_cosine": 1, "gt_ssim": 1, "gt_mse_brain": -1, "gt_ssim_brain": 1,
             "ventricles_change_error_mm2": -1, "hippocampus_change_error_mm2": -1,
             "reconstruction_mse": -1, "composition_l1": -1,
             # the follow-up protocol (evaluation/followup.py)
             "fu_mse": -1, "fu_ssim": 1, "fu_mse_brain": -1, "fu_ssim_brain": 1, "fu_change_corr": 1,
             "gt_change_corr": 1}
REFERENCES = ("meandiff", "identity")
# the no-change floor (and the identity method) is perfect on these by construction
# --- protocol -------------------------------------------------------------------------------------------
@dataclass
class Change:
    """How the protocol changes one attribute: continuous by +-shift kept inside bounds; a real slice "has"
    a continuous target within tolerance; sweep = the trajectory columns."""
    name: str
    kind: str
    shift: float = 0.0
    bounds: tuple = ()
    tolerance: float = 0.0
    sweep: tuple = ()


def change_for(attribute):
    a = attribute
    if a.kind != "continuous":
        return Change(a.name, a.kind, sweep=tuple(range(a.width if a.kind == "categorical" else 2)))
    if a.name == "age":
        return Change("age", "continuous", **AGE_PROTOCOL)
    q = np.asarray(a.quantiles or [a.mean - 2 * a.std, a.mean + 2 * a.std])
    pct = np.interp([5, 95], np.linspace(0, 100, len(q)), q)
    return Change(a.name, "continuous", a.std, (float(q[0]), float(q[-1])), a.std / 2,
                  tuple(np.linspace(pct[0], pct[1], 7).tolist()))


def draw_pairs(store, sample, change, rng):
    """(source indices, target raw values): continuous +-shift (random sign; the other sign if the first
    leaves the bounds), binary the other value, categorical every other class (so K-1 pairs per slice)."""
    v = store.attrs[change.name][sample].astype(np.float64)
    if change.kind == "continuous":
        sign = rng.choice([-1.0, 1.0], len(sample))
        lo, hi = change.bounds
        t = v + sign * change.shift
        out = (t < lo) | (t > hi)
        t[out] = v[out] - sign[out] * change.shift
        return sample, np.clip(t, lo, hi)
    if change.kind == "binary":
        return sample, 1.0 - v
    k = len(change.sweep)
    return np.repeat(sample, k - 1), ((v[:, None] + np.arange(1, k)) % k).ravel()


def matched_reference(store, test, src, targets, change, rng):
    """For each pair, a real test slice that has the target (continuous: within tolerance), drawn without
    replacement: at the source's slice position while one is left there, else at any position; -1 when every
    test slice with the target is taken. Pairs are served in a random order, so none is favoured."""
    values, pos = store.attrs[change.name][test], store.slice[test]
    out, free = np.full(len(src), -1, np.int64), np.ones(len(test), bool)
    for i in rng.permutation(len(src)):
        t = targets[i]
        ok = free & (np.abs(values - t) <= change.tolerance if change.kind == "continuous" else values == t)
        here = ok & (pos == store.slice[src[i]])
        candidates = np.flatnonzero(here if here.any() else ok)
        if candidates.size:
            j = rng.choice(candidates)
            out[i], free[j] = test[j], False
    return out


# --- ground truth (synthetic stores) ---------------------------------------------------------------------
FLOOR = "no change (source)"
TRUTH_ATTRS = ("age", "dx")   # what the synthetic phantom can re-render


def _score(change, x, y, back, source, target, oracle_src, oracle_out, truth=None):
    """Per-pair arrays of one batch: sources x, manipulated y, and y manipulated back to the source;
    oracle_* = (prediction in raw units, probability of the target class or None) of x and of y;
    truth = (true images, regions of interest, indices, GroundTruth) on synthetic stores."""
    (pred_src, p_src), (pred, p) = oracle_src, oracle_out
    brain = above_background(x)
    out = {"mse": mse(y, x), "ssim": ssim(y, x), "mse_brain": mse(y, x, brain), "ssim_brain": ssim(y, x, mask=brain),
           "reversibility_l1": l1(back, x)}
    if change.kind == "continuous":
        out["mae"] = np.abs(pred - target)
        out["oracle_shift"] = (pred - pred_src) * np.sign(target - source)
    else:
        out["accuracy"] = (pred == target).astype(np.float64)
        out["target_prob_shift"] = p - p_src
    if truth is not None:
        images, roi, idx, gt = truth
        out["gt_mse"], out["gt_ssim"] = mse(y[..., 0], images), ssim(y, images)
        out["gt_mse_brain"], out["gt_ssim_brain"] = mse(y[..., 0], images, brain), ssim(y, images, mask=brain)
        out["gt_change_cosine"] = cosine(y[..., 0] - x[..., 0], images - x[..., 0], brain)
        measured, true = gt.areas(y, roi, idx), gt.areas(images, roi, idx)
        for s in STRUCTURES:
            err = np.where(roi[s].any((1, 2)), measured[s] - true[s], np.nan)
            out[f"{s}_change_bias_mm2"], out[f"{s}_change_error_mm2"] = err, np.abs(err)
    return out


def _features(oracle, store, idx, batch_size):
    return np.concatenate([oracle.features(store.pixels(idx[i:i + batch_size]), batch_size)
                           for i in range(0, len(idx), batch_size)])


def told(store, idx, raw):
    """All a method is told of the store's slices idx besides their images: their attributes `raw` and axial
    positions ("slice"), never their store indices (models/__init__.py)."""
    return dict(raw, slice=store.slice[idx])


def is_reference(method):
    """Whether `method` is the evaluator's own reference, the true counterfactual (`baselines.Truth`), which it
    renders from the slices' store indices; every other method goes through `manipulate` alone."""
    from models.baselines import Truth
    return isinstance(method, Truth)


def _apply(method, x, source, target, idx):
    y = method.render(idx, target) if is_reference(method) else method.manipulate(x, source, target)
    return np.asarray(y, np.float32).reshape(x.shape)


def manipulated(method, x, source, target, ok, idx):
    """The method's images (shaped like x) for the pairs `ok`, on which alone it is called; x elsewhere.
    source and target are what the method is told (`told`); idx, the slices' store indices, serve the
    evaluator's own reference only (`is_reference`)."""
    if ok.all():
        return _apply(method, x, source, target, idx)
    y = x.copy()
    if ok.any():
        pick = lambda raw: {k: np.asarray(v)[ok] for k, v in raw.items()}
        y[ok] = _apply(method, x[ok], pick(source), pick(target), idx[ok])
    return y


def score_change(store, oracle, methods, change, src, tgt, gt, batch_size, progress=None):
    """Per-pair scores {method: {metric: (P,) array}}, oracle features {method: (P, F)} and the pairs each
    makes {method: (P,) bool} of the floor and every method for one attribute's pairs (src[i] -> target
    tgt[i]); a pair a method does not make (`supported`) has NaN scores, its reversibility also when the
    method does not make the change back. `progress(method, k)`: k more slices manipulated (there and back)."""
    parts = {m: {} for m in [FLOOR, *methods]}
    feats, made = {m: [] for m in parts}, {m: [] for m in parts}
    for i in range(0, len(src), batch_size):
        idx, t = src[i:i + batch_size], tgt[i:i + batch_size]
        x = store.pixels(idx)
        s_raw = told(store, idx, store.raw(idx))
        t_raw = dict(s_raw, **{change.name: t})
        truth = (*gt.target(idx, t_raw), idx, gt) if gt else None

        def judge(images):
            f, logits = oracle.outputs(images, batch_size)
            p = None if change.kind == "continuous" else oracle.schema.probability(logits, change.name, t)
            return f, (oracle.schema.decode_logits(logits)[change.name], p)

        f_src, oracle_src = judge(x)
        every = np.ones(len(idx), bool)
        outputs = {FLOOR: (x, x, f_src, oracle_src, every, every)}
        for m, method in methods.items():
            ok = supported(method, s_raw, t_raw, len(idx))
            y = manipulated(method, x, s_raw, t_raw, ok, idx)
            back_ok = ok & supported(method, t_raw, s_raw, len(idx))
            back = manipulated(method, y, t_raw, s_raw, back_ok, idx)
            outputs[m] = (y, back, *judge(y), ok, back_ok)
            if progress:
                progress(m, 2 * len(idx))
        for m, (y, back, f, oracle_out, ok, back_ok) in outputs.items():
            scores = _score(change, x, y, back, s_raw[change.name], t, oracle_src, oracle_out, truth)
            if not back_ok.all():
                scores = {k: np.where(back_ok if k == "reversibility_l1" else ok, v, np.nan) for k, v in scores.items()}
            for k, v in scores.items():
                parts[m].setdefault(k, []).append(np.asarray(v, np.float64))
            feats[m].append(f)
            made[m].append(ok)
    return ({m: {k: np.concatenate(v) for k, v in p.items()} for m, p in parts.items()},
            {m: np.concatenate(f) for m, f in feats.items()}, {m: np.concatenate(v) for m, v in made.items()})


def score_unchanged(store, method, sample, batch_size, repeats=REPEATS, progress=None):
    """Per-slice reconstruction MSE at target = source, and L1 drift after `repeats` such manipulations;
    `progress(k)`: k more slices manipulated."""
    recon, drift = [], []
    for i in range(0, len(sample), batch_size):
        idx = sample[i:i + batch_size]
        x = store.pixels(idx)
        raw = told(store, idx, store.raw(idx))
        y = x
        for k in range(repeats):
            y = _apply(method, y, raw, raw, idx)
            if k == 0:
                recon.append(mse(y, x))
        drift.append(l1(y, x))
        if progress:
            progress(repeats * len(idx))
    return {"reconstruction_mse": np.concatenate(recon), "composition_l1": np.concatenate(drift)}


# --- summaries with intervals ---------------------------------------------------------------------------------
def _verdict(metric, diff, ci, fixed):
    """"better" / "worse" when the paired interval excludes 0, by the side of 0 it lies on (not the sign of
    the point estimate `diff`, which a resampled statistic such as the KID may put outside its interval) and
    the metric's direction, else "no difference shown"; None for metrics without a direction or reached by
    construction (never ranked)."""
    if metric not in DIRECTION or fixed or ci is None:
        return None
    if ci[0] > 0 or ci[1] < 0:
        return "better" if (1 if ci[0] > 0 else -1) == DIRECTION[metric] else "worse"
    return "no difference shown"


def summarise(per_pair, groups, boot, references, by_construction, kid=None, made=None):
    """{method: {metric: mean, "ci": {metric: [low, high]}, "vs": {reference: {metric: {"diff", "ci",
    "verdict"}}}}} from per-pair arrays {method: {metric: (P,)}} (NaN: no score), pairs labelled by subject
    `groups`; paired differences over the pairs both sides scored. `kid(method, pairs)` ((value, (B,) resampled
    values) on a subset of pairs, or None) adds the KID with the same resamples, on the pairs each method
    makes (`made` {method: (P,) bool}) and, for a difference, on those both make."""
    out = {}
    for m, scores in per_pair.items():
        s = {"ci": {}, "vs": {}}
        for k, v in scores.items():
            s[k], s["ci"][k] = boot.interval(v, groups)
        if kid:
            own = kid(m, made[m])
            s["kid"], s["ci"]["kid"] = (own[0], stats.percentile_interval(own[1])) if own else (None, None)
        for ref in references if m != FLOOR else ():
            if ref == m or ref not in per_pair or (ref == FLOOR and m == "identity"):
                continue
            vs, fixed = {}, {*by_construction.get(m, ()), *by_construction.get(ref, ())}
            for k, v in scores.items():
                d, ci = boot.interval(v - per_pair[ref][k], groups)
                vs[k] = {"diff": d, "ci": ci, "verdict": _verdict(k, d, ci, k in fixed)}
            if kid:
                a, b = kid(m, made[m] & made[ref]), kid(ref, made[m] & made[ref])
                d, ci = (a[0] - b[0], stats.percentile_interval(a[1] - b[1])) if a and b else (None, None)
                vs["kid"] = {"diff": d, "ci": ci, "verdict": _verdict("kid", d, ci, False)}
            s["vs"]["identity" if ref == FLOOR else ref] = vs
        out[m] = s
    return out


def _realism(feats, ref, ref_feats, groups, ref_groups, boot, made):
    """`kid(method, pairs)`: the KID value and resamples of a method's features on `pairs` (P,) bool with a
    reference (cached; None below 4 such pairs, or when the pairs and references do not span two subjects, as
    a subset of the changes may not), and each method's FD on the pairs it makes where samples suffice."""
    has = ref >= 0
    if has.sum() < 4:
        return None, {m: None for m in feats}
    w, g, h = boot.for_pairs(groups[has]), groups[has], ref_groups
    cache = {}

    def kid(m, pairs):
        sel = pairs[has]
        key = (m, sel.tobytes())
        if key not in cache:
            f, r = feats[m][has][sel], ref_feats[sel]
            value = stats.kid(f, r, None, g[sel], h[sel]) if sel.sum() >= 4 else np.nan
            cache[key] = (value, stats.kid(f, r, w[:, sel], g[sel], h[sel])) if np.isfinite(value) else None
        return cache[key]

    fd = {}
    for m, f in feats.items():
        sel = made[m][has]
        enough = sel.sum() >= FD_MIN_RATIO * f.shape[1]
        fd[m] = frechet_distance(f[has][sel], ref_feats[sel]) if enough else None
    return kid, fd


# --- the evaluation ----------------------------------------------------------------------------------------
def check_oracle(store, oracle, names):
    """The oracle must predict `names` as the store encodes them, at the store's image size (it may have been
    trained on another store: an oracle that shares no subjects with the methods)."""
    missing = [n for n in names if n not in store.schema.names or n not in oracle.schema.names]
    if missing:
        raise ValueError(f"attributes {missing} are not both in the store {store.path} ({store.schema.names}) "
                         f"and predicted by the oracle ({oracle.schema.names}); choose others with --attrs")
    for n in names:
        a, b = store.schema[n], oracle.schema[n]
        if a.kind != b.kind or list(a.classes or []) != list(b.classes or []):
            raise ValueError(f"attribute {n!r}: the store has {a.kind} {a.classes or ''}, the oracle was trained "
                             f"on {b.kind} {b.classes or ''}; train the oracle on a store with the same schema")
    size = getattr(oracle, "size", None)
    if size is not None and size != store.size:
        raise ValueError(f"the oracle takes {size}x{size} slices, {store.path} holds {store.size}x{store.size}; "
                         f"train the oracle on a store built with --size {store.size}")
    channels = int(oracle.model.inputs[0].shape[-1]) if hasattr(oracle, "model") else store.channels
    if channels != store.channels:
        raise ValueError(f"the oracle takes {channels}-channel images, {store.path} holds {store.channels}; "
                         "train the oracle on a store with the same channels")


def oracle_test_metrics(store, oracle, names, batch_size, n_boot, seed):
    """The oracle on the store's whole test split, with subject-bootstrap intervals (models.oracle.split_metrics):
    MAE, bias and that of predicting the train mean for continuous attributes; accuracy, balanced accuracy
    (mean per-class recall; chance = 1 / classes) and the majority-class accuracy for the others."""
    from models.oracle import split_metrics
    return split_metrics(oracle, store, "test", names, batch_size, n_boot, seed)


def evaluate(store, oracle, methods, n=512, seed=0, batch_size=64, attrs=None, n_boot=N_BOOT, log=None):
    """Score {name: method} on n seeded test slices with the protocol above; returns a JSON-ready dict. A
    progress bar counts the slices the methods manipulate (each pair there and back, then REPEATS unchanged
    manipulations of each sampled slice); `log` (default: above the bar) reports each attribute's pairs."""
    from tqdm import tqdm
    names = list(attrs or oracle.schema.names)
    check_oracle(store, oracle, names)
    rng = np.random.default_rng(seed)
    test = store.indices("test")
    sample = np.sort(rng.choice(test, min(n, len(test)), replace=False))
    boot = stats.SubjectBootstrap(store.subject[sample], n_boot, seed)
    gt = GroundTruth(store, sample, batch_size) if is_synthetic(store) else None
    fixed = {m: sorted(getattr(method, "by_construction", ())) for m, method in methods.items()}
    fixed[FLOOR] = FLOOR_BY_CONSTRUCTION
    references = [r for r in ("meandiff", FLOOR) if r in methods or r == FLOOR]
    result = {"n": len(sample), "subjects": len(boot.subjects), "seed": seed, "store": store.path,
              "synthetic": gt is not None, "attrs": names,
              "bootstrap": {"resamples": n_boot, "level": stats.LEVEL, "unit": "subject"},
              "protocol": {}, "floor": {}, "methods": {m: {"by_construction": fixed[m]} for m in methods}}
    drawn = []
    for change in (change_for(store.schema[a]) for a in names):
        src, tgt = draw_pairs(store, sample, change, rng)
        drawn.append((change, src, tgt, matched_reference(store, test, src, tgt, change, rng)))
    total = len(methods) * (sum(2 * len(src) for _, src, _, _ in drawn) + REPEATS * len(sample))
    with tqdm(total=total, desc="manipulations", unit="slice", dynamic_ncols=True) as bar:
        def progress(step):
            def advance(method, k):
                bar.set_postfix_str(f"{step}: {method}", refresh=False)
                bar.update(k)
            return advance

        for pairs in drawn:
            change, src = pairs[:2]
            (log or bar.write)(f"{change.name}: {len(src)} pairs, {len(methods)} methods")
            scores = score_attribute(store, oracle, methods, pairs, gt if change.name in TRUTH_ATTRS else None,
                                     boot, references, fixed, batch_size, progress(change.name))
            result["protocol"][change.name] = {"pairs": len(src), "change": describe(change, store.schema[change.name])}
            result["floor"][change.name] = scores.pop(FLOOR)
            for m, s in scores.items():
                result["methods"][m][change.name] = s
        unchanged = {m: score_unchanged(store, method, sample, batch_size, progress=partial(progress("unchanged"), m))
                     for m, method in methods.items()}
    groups = store.subject[sample]
    for m, s in summarise(unchanged, groups, boot, [r for r in references if r != FLOOR], fixed).items():
        result["methods"][m]["unchanged"] = dict(s, repeats=REPEATS)
    result["oracle_test"] = oracle_test_metrics(store, oracle, names, batch_size, n_boot, seed)
    return result


def score_attribute(store, oracle, methods, pairs, gt, boot, references, fixed, batch_size, progress=None):
    """{method, and FLOOR: summary with intervals, paired differences, KID and FD, pair counts} of one
    attribute's `pairs` (change, source indices, targets, matched references)."""
    change, src, tgt, ref = pairs
    per_pair, feats, made = score_change(store, oracle, methods, change, src, tgt, gt, batch_size, progress)
    groups = store.subject[src]
    ref_feats = _features(oracle, store, ref[ref >= 0], batch_size) if (ref >= 0).sum() >= 4 else None
    kid, fd = _realism(feats, ref, ref_feats, groups, store.subject[ref[ref >= 0]], boot, made)
    scores = summarise(per_pair, groups, boot, references, fixed, kid, made)
    for m in scores:   # pairs: those the method makes and is scored on
        scores[m].update(fd=fd[m], kid_pairs=int(((ref >= 0) & made[m]).sum()), pairs=int(made[m].sum()))
        if gt:
            scores[m].update({f"{s}_pairs": int(np.isfinite(per_pair[m][f"{s}_change_error_mm2"]).sum())
                              for s in STRUCTURES})
    return scores


def describe(change, attribute):
    if change.kind == "continuous":
        lo, hi = change.bounds
        return (f"{change.name} +-{change.shift:.3g} (random sign, kept in {lo:.3g}..{hi:.3g}); real slices within "
                f"+-{change.tolerance:.3g} count as having the target")
    if change.kind == "binary":
        return f"{change.name} to the other value"
    return f"{change.name} to each other class of {attribute.classes}"


# --- trajectories -------------------------------------------------------------------------------------------
