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
- ground truth (synthetic stores): MSE and SSIM against the true counterfactual (whole image and brain), and
  the signed (bias) and absolute error of the measured ventricle and hippocampus area change (GroundTruth).

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
import os
import re
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import linalg, ndimage

from mri import grids, stats

AGE_PROTOCOL = dict(shift=10.0, bounds=(55.0, 95.0), tolerance=5.0, sweep=tuple(range(60, 91, 5)))
REPEATS = 5            # composition: applications of the unchanged-attribute manipulation
DIFF_SCALE = 0.5       # difference maps saturate at this intensity change ([-1, 1] images)
ROI_DILATION = 2       # pixels around the true structure masks: the reach of the renderer's blur (GroundTruth)
MOVED = 1e-4           # a change of a true mask fraction above this is a moved boundary (GroundTruth)
STRUCTURES = ("ventricles", "hippocampus")
FD_MIN_RATIO = 4       # Fréchet distance only with at least this many pairs per feature dimension
N_BOOT = 1000          # bootstrap resamples
BACKGROUND = -1.0 + 1e-3   # brain mask: source pixels above the background value (-1)
# +1: higher is better, -1: lower is better; metrics not listed (MSE/SSIM to the source, area bias) have no
# better direction, so their paired differences get no verdict
DIRECTION = {"mae": -1, "oracle_shift": 1, "accuracy": 1, "target_prob_shift": 1, "reversibility_l1": -1,
             "kid": -1, "gt_mse": -1, "gt_ssim": 1, "gt_mse_brain": -1, "gt_ssim_brain": 1,
             "ventricles_change_error_mm2": -1, "hippocampus_change_error_mm2": -1,
             "reconstruction_mse": -1, "composition_l1": -1}
REFERENCES = ("meandiff", "identity")
# the no-change floor (and the identity method) is perfect on these by construction
FLOOR_BY_CONSTRUCTION = ("mse", "ssim", "mse_brain", "ssim_brain", "reversibility_l1", "oracle_shift",
                         "target_prob_shift", "reconstruction_mse", "composition_l1")


# --- image metrics ------------------------------------------------------------------------------------
def ssim(x, y, data_range=2.0, size=11, sigma=1.5, k1=0.01, k2=0.03, mask=None):
    """Mean SSIM of each image pair (Wang et al. 2004, IEEE TIP 13:600), (N, H, W[, 1]) -> (N,).
    Gaussian window 11x11 with sigma 1.5, averaged over the window positions inside the image, or over those
    centred on `mask` (N, H, W) pixels (NaN for an empty mask)."""
    x = np.asarray(x, np.float64).reshape(len(x), *np.shape(x)[1:3])
    y = np.asarray(y, np.float64).reshape(x.shape)
    g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
    g /= g.sum()

    def blur(z):
        z = np.lib.stride_tricks.sliding_window_view(z, size, axis=1) @ g
        return np.lib.stride_tricks.sliding_window_view(z, size, axis=2) @ g

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    if mask is None:
        return s.mean(axis=(1, 2))
    h = size // 2
    m = np.asarray(mask, bool).reshape(x.shape)[:, h:h + s.shape[1], h:h + s.shape[2]]
    with np.errstate(invalid="ignore"):
        return (s * m).sum(axis=(1, 2)) / m.sum(axis=(1, 2))


def mse(x, y, mask=None):
    d = (np.asarray(x, np.float64) - np.asarray(y, np.float64).reshape(np.shape(x))) ** 2
    axes = tuple(range(1, np.ndim(x)))
    if mask is None:
        return d.mean(axis=axes)
    m = np.asarray(mask, bool).reshape(d.shape)
    with np.errstate(invalid="ignore"):
        return (d * m).sum(axis=axes) / m.sum(axis=axes)


def l1(x, y):
    return np.mean(np.abs(np.asarray(x, np.float64) - y), axis=tuple(range(1, np.ndim(x))))


def brain_mask(images):
    """The brain of each source image: its pixels above the background value, (N, S, S) bool."""
    x = np.asarray(images)
    return x.reshape(len(x), *x.shape[1:3]) > BACKGROUND


def frechet_distance(a, b, eps=1e-6):
    """Fréchet distance between Gaussians fitted to two feature sets (Dowson & Landau 1982; the FID of
    Heusel et al. 2017): |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)). When the product is singular
    (fewer samples than dimensions) eps*I is added to both covariances, as in pytorch-fid; the matrix square
    root's negligible imaginary part is dropped. Biased and noisy with few samples: see FD_MIN_RATIO."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():   # singular products are handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(ca @ cb)
        if not np.isfinite(root).all():
            offset = eps * np.eye(len(ca))
            root = linalg.sqrtm((ca + offset) @ (cb + offset))
    d = a.mean(0) - b.mean(0)
    return float(max(d @ d + np.trace(ca) + np.trace(cb) - 2 * np.trace(root.real), 0.0))


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
class GroundTruth:
    """True counterfactuals (mri.synthetic.counterfactual) and structure areas measured from images.

    Area measure, applied alike to every method's image and to the true counterfactual (so `truth` has zero
    error): a partial-volume estimate from three intensity levels of the sampled source slices, the medians
    inside their true ventricles (L_csf), brain parenchyma (L_brain) and hippocampus (L_hip). Intensities are
    clipped to [L_csf, L_brain]; a pixel then holds (L_brain - x) / (L_brain - L_csf) of ventricle and
    (x - L_csf) / (L_hip - L_csf) of hippocampus (linear in intensity, so the renderer's blur, which spreads
    a structure's change into brighter neighbours, is counted where it lands). Each area is summed over a
    region of interest, times the pixel area in mm²: the union of the structure's true masks at the source
    and at the target attributes, grown by ROI_DILATION pixels (the reach of the blur), without the pixels
    where another boundary moves (the true brain mask changes there other than by the structure itself:
    the other structure, sulci, the third ventricle), and for the hippocampus without the ventricles' union.
    Measured change against true mask change on rendered slices: slope 1 +- 0.1 for both structures in every
    direction the protocol changes (age -10, +10, -15, +15 years; diagnosis to each class; tests/test_evaluate.py).
    A method's change error is area(method image) - area(true counterfactual) (the source's area, measured in
    the same region, cancels): its mean is the bias, its mean absolute value the error. Pairs whose region is
    empty are left out.
    """

    def __init__(self, store, sample, batch_size):
        self.store, self.sample = store, sample
        masks, rest = {s: [] for s in STRUCTURES}, {s: [] for s in STRUCTURES}
        inside = {"ventricles": [], "brain": [], "hippocampus": []}
        for i in range(0, len(sample), batch_size):
            idx = sample[i:i + batch_size]
            truth = self._render(idx, {})
            x = store.images(idx)
            for s in STRUCTURES:
                masks[s].append(truth["masks"][s])
                rest[s].append(_rest_of_brain(truth["fractions"], s))
            for s in inside:
                inside[s].append(x[truth["fractions"][s] > 0.99])
        self.source_masks = {s: np.concatenate(masks[s]) for s in STRUCTURES}
        self.source_rest = {s: np.concatenate(rest[s]) for s in STRUCTURES}
        levels = {}
        for s in inside:
            values = np.concatenate(inside[s])
            if values.size == 0:
                raise ValueError(f"{store.path}: no pixels fully inside the {s} in the {len(sample)} sampled test "
                                 "slices, so the area measure has no intensity level; evaluate more slices (--n)")
            levels[s] = float(np.median(values))
        self.csf_level, self.brain_level, self.hippocampus_level = (levels[k] for k in ("ventricles", "brain", "hippocampus"))
        side = np.array([store.plan(v)["side_mm"] for v in range(int(store.volume.max()) + 1)])
        self.pixel_mm2 = (side / store.size) ** 2

    def _render(self, idx, target):
        from mri import synthetic
        out = synthetic.counterfactual(self.store, idx, age=target.get("age"), dx=target.get("dx"), masks=True)
        out["fractions"] = {s: np.asarray(out["masks"][s]) for s in ("brain", *STRUCTURES)}
        out["masks"] = {s: f > 0 for s, f in out["fractions"].items()}
        return out

    def target(self, idx, target):
        """(true counterfactual images (N, S, S), regions of interest {structure: (N, S, S) bool})."""
        truth = self._render(idx, target)
        rows = np.searchsorted(self.sample, idx)
        union = {s: self.source_masks[s][rows] | truth["masks"][s] for s in STRUCTURES}
        grow = np.zeros((3, 3, 3), bool)
        grow[1] = ndimage.generate_binary_structure(2, 1)
        roi = {}
        for s in STRUCTURES:
            moved = np.abs(_rest_of_brain(truth["fractions"], s) - self.source_rest[s][rows]) > MOVED
            roi[s] = (ndimage.binary_dilation(union[s], grow, ROI_DILATION) if ROI_DILATION else union[s]) & ~moved
        roi["hippocampus"] &= ~union["ventricles"]
        return np.asarray(truth["images"], np.float32), roi

    def areas(self, images, roi, idx):
        """{structure: (N,) area in mm²} measured from images inside the regions of interest."""
        x = np.clip(np.asarray(images, np.float64).reshape(roi["ventricles"].shape), self.csf_level, self.brain_level)
        share = {"ventricles": (self.brain_level - x) / (self.brain_level - self.csf_level),
                 "hippocampus": (x - self.csf_level) / (self.hippocampus_level - self.csf_level)}
        px = self.pixel_mm2[self.store.volume[idx]]
        return {s: (share[s] * roi[s]).sum((1, 2)) * px for s in STRUCTURES}


def _rest_of_brain(fractions, structure):
    """The true brain fraction with the structure's own part taken out (the brain mask holds the hippocampus,
    not the ventricles): where it changes, a boundary other than the structure's moves."""
    sign = -1.0 if structure == "hippocampus" else 1.0
    return (fractions["brain"] + sign * fractions[structure]).astype(np.float32)


# --- per-pair scores ---------------------------------------------------------------------------------------
FLOOR = "no change (source)"
TRUTH_ATTRS = ("age", "dx")   # what the synthetic phantom can re-render


def is_synthetic(store):
    """Whether the store was built from the synthetic cohort (it keeps the phantom's subject seeds)."""
    return "csv/subject_seed" in store.file


def _score(change, x, y, back, source, target, oracle_src, oracle_out, truth=None):
    """Per-pair arrays of one batch: sources x, manipulated y, and y manipulated back to the source;
    oracle_* = (prediction in raw units, probability of the target class or None) of x and of y;
    truth = (true images, regions of interest, indices, GroundTruth) on synthetic stores."""
    (pred_src, p_src), (pred, p) = oracle_src, oracle_out
    brain = brain_mask(x)
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
        measured, true = gt.areas(y, roi, idx), gt.areas(images, roi, idx)
        for s in STRUCTURES:
            err = np.where(roi[s].any((1, 2)), measured[s] - true[s], np.nan)
            out[f"{s}_change_bias_mm2"], out[f"{s}_change_error_mm2"] = err, np.abs(err)
    return out


def _features(oracle, store, idx, batch_size):
    return np.concatenate([oracle.features(store.images(idx[i:i + batch_size]), batch_size)
                           for i in range(0, len(idx), batch_size)])


def supported(method, source, target, n):
    """(n,) bool: the changes `method` makes (its `supports`, models/__init__.py; every change without one)."""
    supports = getattr(method, "supports", None)
    return np.ones(n, bool) if supports is None else np.asarray(supports(source, target), bool).reshape(n)


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
        x = store.images(idx)[..., None]
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
        x = store.images(idx)[..., None]
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
def trajectory_slices(store, k, seed):
    """One slice for each of k seeded test subjects: their first stored volume, at the middle slice position."""
    rng = np.random.default_rng([seed, 1])
    test = store.indices("test")
    subjects = np.unique(store.subject[test])
    mid = np.median(np.unique(store.slice[test]))
    out = []
    for s in np.sort(rng.choice(subjects, min(k, len(subjects)), replace=False)):
        rows = test[store.subject[test] == s]
        rows = rows[store.volume[rows] == store.volume[rows].min()]
        out.append(rows[np.argmin(np.abs(store.slice[rows] - mid))])
    return np.array(out)


def _sweep(method, x, raw, changes, idx):
    """Columns (each (k, S, S) images, None = a gap between attributes, NaN = a change the method does not
    make) of every attribute's sweep of the store's slices idx (images x, told `raw`)."""
    cols = []
    for c in changes:
        if cols:
            cols.append(None)
        for v in c.sweep:
            target = dict(raw, **{c.name: np.full(len(x), v, np.float64)})
            ok = supported(method, raw, target, len(x))
            cols.append(np.where(ok[:, None, None], manipulated(method, x, raw, target, ok, idx)[..., 0], np.nan))
    return cols


def _row(x, cols, i, diff=False):
    blank = np.full(x.shape[1:3], 255, np.uint8)
    gap = lambda c: c is None or np.isnan(c[i]).any()
    if diff:
        return [blank] + [blank if gap(c) else grids.diverging(c[i] - x[i, ..., 0], DIFF_SCALE) for c in cols]
    return [grids.to_uint8(x[i, ..., 0])] + [blank if gap(c) else grids.to_uint8(c[i]) for c in cols]


def slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def draw_trajectories(store, methods, changes, out_dir, seed=0, n_subjects=4, truth=None):
    """Write one PNG per method and a combined one; returns [{"file", "caption"}].

    Rows per subject: the method, its difference from the source, and (synthetic stores, given `truth`) the
    true counterfactual and its difference. Columns: the source, then each attribute's sweep (age 60..90 in
    steps of 5 at the subject's other attributes; every class of a categorical one), a blank between them.
    Cells of changes a method does not make (its `supports`) are blank."""
    idx = trajectory_slices(store, n_subjects, seed)
    k = len(idx)
    x = store.images(idx)[..., None]
    raw = told(store, idx, store.raw(idx))
    sweeps = {m: _sweep(method, x, raw, changes, idx) for m, method in methods.items()}
    true = sweeps.get("truth") or (_sweep(truth, x, raw, changes, idx) if truth else None)
    columns = "source | " + " | ".join(
        f"{c.name} " + ", ".join(store.schema[c.name].label(v) for v in c.sweep) for c in changes)
    scale = f"difference maps: red brighter, blue darker than the source, saturating at +-{DIFF_SCALE}"
    figures = []
    for m, cols in sweeps.items():
        rows = []
        for i in range(k):
            rows += [_row(x, cols, i), _row(x, cols, i, diff=True)]
            if true is not None and m != "truth":
                rows += [_row(x, true, i), _row(x, true, i, diff=True)]
        kinds = f"{m}, {m} - source" + (", truth, truth - source" if true is not None and m != "truth" else "")
        figures.append(_write(out_dir, f"trajectories_{slug(m)}_n{k}.png", grids.tile(rows),
                              f"{m}: {k} test subjects (seed {seed}); rows per subject: {kinds}; "
                              f"columns: {columns}; {scale}{blanks([m], methods)}"))
    combined = ({"truth": true} if true is not None and "truth" not in sweeps else {}) | sweeps
    rows = [_row(x, cols, i) for i in range(k) for cols in combined.values()]
    figures.append(_write(out_dir, f"trajectories_all_n{k}.png", grids.tile(rows),
                          f"all methods: {k} test subjects (seed {seed}); rows per subject: {', '.join(combined)}; "
                          f"columns: {columns}{blanks(methods, methods)}"))
    return figures


def blanks(names, methods):
    """The caption's note on the blank cells of methods that make only some changes ("" when none does)."""
    partial = [m for m in names if hasattr(methods[m], "supports")]
    return f"; blank cells: changes {', '.join(partial)} does not make" if partial else ""


def _write(out_dir, name, image, caption):
    grids.write_png(os.path.join(out_dir, name), image)
    return {"file": name, "caption": caption}


# --- report ---------------------------------------------------------------------------------------------------
def _fmt(v):
    return "–" if v is None else f"{v:.3g}"


def _cell(s, key, fixed=()):
    """"value [low, high]", marked † when the method reaches it by construction."""
    v, ci = s.get(key), s.get("ci", {}).get(key)
    text = _fmt(v) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
    return text + (" †" if key in fixed else "")


def _diff_cell(d):
    if d is None or d["diff"] is None:
        return "–"
    text = f"{d['diff']:+.3g} [{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]" if d["ci"] else f"{d['diff']:+.3g}"
    return text + {"better": " **better**", "worse": " worse", None: ""}.get(d["verdict"], "")


def _columns(floor):
    effect = [("accuracy ↑", "accuracy"), ("target prob. shift ↑", "target_prob_shift")] if "accuracy" in floor \
        else [("MAE ↓", "mae"), ("oracle shift ↑", "oracle_shift")]
    identity = [("MSE", "mse"), ("MSE brain", "mse_brain"), ("SSIM brain", "ssim_brain"),
                ("reversibility L1 ↓", "reversibility_l1"), ("KID ↓", "kid")]
    gt = []
    if "gt_mse" in floor:
        gt = [("GT MSE ↓", "gt_mse"), ("GT MSE brain ↓", "gt_mse_brain"), ("GT SSIM brain ↑", "gt_ssim_brain")]
        for s in STRUCTURES:
            gt += [(f"Δ{s} bias mm²", f"{s}_change_bias_mm2"), (f"Δ{s} error mm² ↓", f"{s}_change_error_mm2")]
    return effect + identity, gt


def _table(header, rows):
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def report_markdown(metrics, title="Evaluation"):
    """The metrics as markdown: per attribute, the values with their intervals and the paired differences to
    meandiff and identity with verdicts; unchanged attributes; the oracle on the test split; figures."""
    m = metrics
    boot = m.get("bootstrap", {})
    lines = [f"# {title}", "",
             f"Store `{m['store']}`, oracle `{m.get('oracle', '?')}`: n = {m['n']} test slices of {m.get('subjects', '?')} "
             f"subjects (seed {m['seed']}). Every value is the mean over pairs with its {boot.get('level', 0.95):.0%} "
             f"interval [low, high] from {boot.get('resamples', '?')} bootstrap resamples of test subjects. "
             "† = reached by construction (not a result, never ranked).",
             "Effectiveness: the oracle's prediction on the manipulated slice vs the target (MAE in raw units; oracle "
             "shift = predicted change in the requested direction; target prob. shift = gain in the oracle's "
             "probability of the target class). MSE/SSIM and reversibility L1 compare with the source (brain = "
             "inside the source's foreground); KID = Kernel Inception Distance of oracle features to real test "
             "slices with the target attributes (x 1, unbiased, can be < 0)."]
    if m["synthetic"]:
        lines.append("GT: against the true counterfactual of the phantom; Δ area bias / error = mean signed / absolute "
                     "(measured area change - true measured area change) in mm² (the no-change row gives minus "
                     "the true change).")
    for name, proto in m["protocol"].items():
        floor = m["floor"][name]
        main, gt = _columns(floor)
        rows = [(FLOOR, floor, FLOOR_BY_CONSTRUCTION)] + [(k, v[name], v.get("by_construction", ()))
                                                          for k, v in m["methods"].items()]
        lines += ["", f"## {name}: {proto['pairs']} pairs", "", f"Change: {proto['change']}.", ""]
        partial = [f"{k} {v[name]['pairs']}" for k, v in m["methods"].items() if v[name]["pairs"] < proto["pairs"]]
        if partial:
            lines += [f"Pairs scored, of {proto['pairs']}: {', '.join(partial)}. A method that makes only some changes "
                      "is scored on those, and its paired differences use the pairs both sides make.", ""]
        for cols in (main, gt):
            if cols:
                lines += _table(["method"] + [c for c, _ in cols],
                                [[r] + [_cell(s, k, fixed) for _, k in cols] for r, s, fixed in rows]) + [""]
        fd = [(r, s["fd"]) for r, s, _ in rows if s.get("fd") is not None]
        if fd:
            lines += ["Fréchet distance: " + ", ".join(f"{r} {_fmt(v)}" for r, v in fd) + "", ""]
        else:
            lines += [f"Fréchet distance not reported: {floor.get('kid_pairs', 0)} pairs, fewer than {FD_MIN_RATIO}x the "
                      "feature dimension.", ""]
        keys = [(c, k) for c, k in main + gt if k in DIRECTION or k.endswith("bias_mm2")]
        for ref in REFERENCES:
            compared = [(r, s["vs"][ref]) for r, s, _ in rows[1:] if ref in s.get("vs", {})]
            if compared:
                lines += [f"Paired difference to {ref} (method - {ref}; **better** / worse only where the interval "
                          "excludes 0):", ""]
                lines += _table(["method"] + [c for c, _ in keys],
                                [[r] + [_diff_cell(vs.get(k)) for _, k in keys] for r, vs in compared]) + [""]
    lines += [f"## Unchanged attributes (target = source), n = {m['n']}", ""]
    lines += _table(["method", "reconstruction MSE ↓", f"composition L1 after {REPEATS}× ↓", "vs meandiff (recon., comp.)"],
                    [[k, _cell(v["unchanged"], "reconstruction_mse", v.get("by_construction", ())),
                      _cell(v["unchanged"], "composition_l1", v.get("by_construction", ())),
                      ", ".join(_diff_cell(v["unchanged"]["vs"]["meandiff"].get(x)) for x in ("reconstruction_mse", "composition_l1"))
                      if "meandiff" in v["unchanged"].get("vs", {}) else "–"] for k, v in m["methods"].items()])
    if m.get("oracle_test"):
        o = m["oracle_test"]
        lines += ["", f"## The oracle on this store's test split ({o['n']} slices, {o['subjects']} subjects)", ""]
        from models.oracle import describe_metrics
        lines += [f"- {line}" for line in describe_metrics(o, _cell)]
    if m.get("figures"):
        lines += ["", "## Trajectories", ""]
        for f in m["figures"]:
            lines += [f"![{f['file']}]({f['file']})", "", f"{f['file']}: {f['caption']}.", ""]
    return "\n".join(lines) + "\n"
