"""The evaluation protocol, the same for every method (ARCHITECTURE.md "Evaluation").

On a seeded sample of test slices, each attribute of the oracle's schema is changed the same way for every
method (`change_for`): age by +10 or -10 years (random sign, kept in 55..95), a categorical attribute to each
other class, a binary one to the other value, another continuous one by +-1 train std. Each method's
manipulated images are then scored by `evaluate`:

- effectiveness: the oracle's prediction vs the target (accuracy, or MAE in raw units), and its shift towards
  the target: for continuous attributes the predicted change signed by the requested direction, for binary and
  categorical ones the gain in the oracle's probability of the target class (less noisy than accuracy when the
  oracle is unsure);
- identity / minimality: MSE and SSIM against the source; reconstruction MSE at unchanged attributes;
- composition: the unchanged-attribute manipulation applied 5 times, mean L1 drift from the source;
- reversibility: source -> target -> source, mean L1 to the source;
- realism: Fréchet distance between oracle features of the manipulated slices and of real test slices with
  the target attributes (each pair matched with one real slice at the same slice position when possible);
- ground truth (synthetic stores): MSE and SSIM against the true counterfactual, and the error of the
  ventricle and hippocampus area change (see GroundTruth).

"floor" holds the same scores for the unmanipulated source images ("no change"); identity equals it.
"""
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage

from mri import grids

AGE_PROTOCOL = dict(shift=10.0, bounds=(55.0, 95.0), tolerance=5.0, sweep=tuple(range(60, 91, 5)))
REPEATS = 5            # composition: applications of the unchanged-attribute manipulation
DIFF_SCALE = 0.5       # difference maps saturate at this intensity change ([-1, 1] images)
ROI_DILATION = 2       # pixels around the true structure masks (GroundTruth)
STRUCTURES = ("ventricles", "hippocampus")


# --- image metrics ------------------------------------------------------------------------------------
def ssim(x, y, data_range=2.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Mean SSIM of each image pair (Wang et al. 2004, IEEE TIP 13:600), (N, H, W[, 1]) -> (N,).
    Gaussian window 11x11 with sigma 1.5, averaged over the window positions inside the image."""
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
    return s.mean(axis=(1, 2))


def mse(x, y):
    return np.mean((np.asarray(x, np.float64) - y) ** 2, axis=tuple(range(1, np.ndim(x))))


def l1(x, y):
    return np.mean(np.abs(np.asarray(x, np.float64) - y), axis=tuple(range(1, np.ndim(x))))


def frechet_distance(a, b, eps=1e-6):
    """Fréchet distance between Gaussians fitted to two feature sets (Dowson & Landau 1982; the FID of
    Heusel et al. 2017): |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)). When the product is singular
    (fewer samples than dimensions) eps*I is added to both covariances, as in pytorch-fid; the matrix square
    root's negligible imaginary part is dropped."""
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
    """For each pair, a random real test slice that has the target (continuous: within tolerance), at the
    source's slice position if one exists there; -1 if no test slice has the target."""
    values, pos = store.attrs[change.name][test], store.slice[test]
    out = np.full(len(src), -1, np.int64)
    for i, (s, t) in enumerate(zip(src, targets)):
        ok = np.abs(values - t) <= change.tolerance if change.kind == "continuous" else values == t
        here = ok & (pos == store.slice[s])
        candidates = test[here] if here.any() else test[ok]
        if candidates.size:
            out[i] = rng.choice(candidates)
    return out


# --- ground truth (synthetic stores) ---------------------------------------------------------------------
class GroundTruth:
    """True counterfactuals (mri.synthetic.counterfactual) and structure areas measured from images.

    Area measure, applied alike to every method's image and to the true counterfactual (so `truth` has zero
    error): a pixel is CSF-like when its intensity is nearer the CSF level than the tissue level, where the
    CSF level is the median intensity of the sampled source slices inside their true ventricle masks and the
    tissue level the median inside their true brain (parenchyma) masks. Ventricle area = CSF-like pixels, hippocampus
    area = the other pixels, each counted inside a region of interest (the union of the structure's true masks
    at the source and at the target attributes, dilated by ROI_DILATION pixels) times the pixel area in mm².
    A method's change error is |area(method image) - area(true counterfactual)|: the source's area, measured
    in the same region, cancels. Pairs whose region is empty (structure absent from the slice) are left out.
    """

    def __init__(self, store, sample, batch_size):
        self.store, self.sample = store, sample
        masks, inside = {s: [] for s in STRUCTURES}, {"ventricles": [], "brain": []}
        for i in range(0, len(sample), batch_size):
            idx = sample[i:i + batch_size]
            truth = self._render(idx, {})
            x = store.images(idx)
            for s in STRUCTURES:
                masks[s].append(truth["masks"][s])
            for s in inside:
                inside[s].append(x[truth["masks"][s]])
        self.source_masks = {s: np.concatenate(masks[s]) for s in STRUCTURES}
        levels = {}
        for s in inside:
            values = np.concatenate(inside[s])
            if values.size == 0:
                raise ValueError(f"{store.path}: no {s} pixels in the {len(sample)} sampled test slices, so the "
                                 "area measure has no intensity level; evaluate more slices (--n)")
            levels[s] = float(np.median(values))
        self.csf_level, self.tissue_level = levels["ventricles"], levels["brain"]
        side = np.array([store.plan(v)["side_mm"] for v in range(int(store.volume.max()) + 1)])
        self.pixel_mm2 = (side / store.size) ** 2

    def _render(self, idx, target):
        from mri import synthetic
        out = synthetic.counterfactual(self.store, idx, age=target.get("age"), dx=target.get("dx"), masks=True)
        out["masks"] = {s: np.asarray(out["masks"][s]) > 0.5 for s in ("brain", *STRUCTURES)}
        return out

    def target(self, idx, target):
        """(true counterfactual images (N, S, S), regions of interest {structure: (N, S, S) bool})."""
        truth = self._render(idx, target)
        src = self.source_masks
        rows = np.searchsorted(self.sample, idx)
        grow = np.zeros((1, 3, 3), bool)
        grow[0] = ndimage.generate_binary_structure(2, 1)
        roi = {s: ndimage.binary_dilation(src[s][rows] | truth["masks"][s], grow, ROI_DILATION) for s in STRUCTURES}
        return np.asarray(truth["images"], np.float32), roi

    def areas(self, images, roi, idx):
        """{structure: (N,) area in mm²} measured from images inside the regions of interest."""
        x = np.asarray(images, np.float32).reshape(roi["ventricles"].shape)
        csf = np.abs(x - self.csf_level) < np.abs(x - self.tissue_level)
        px = self.pixel_mm2[self.store.volume[idx]]
        return {"ventricles": (csf & roi["ventricles"]).sum((1, 2)) * px,
                "hippocampus": (~csf & roi["hippocampus"]).sum((1, 2)) * px}


# --- the evaluation ----------------------------------------------------------------------------------------
FLOOR = "no change (source)"
TRUTH_ATTRS = ("age", "dx")   # what the synthetic phantom can re-render


def is_synthetic(store):
    """Whether the store was built from the synthetic cohort (it keeps the phantom's subject seeds)."""
    return "csv/subject_seed" in store.file


def _mean(parts):
    v = np.concatenate(parts) if parts else np.zeros(0)
    return float(v.mean()) if v.size else None


def _score(change, x, y, back, source, target, oracle_src, oracle_out, truth=None):
    """Per-pair arrays of one batch: sources x, manipulated y, and y manipulated back to the source;
    oracle_* = (prediction in raw units, probability of the target class or None) of x and of y;
    truth = (true images, regions of interest, indices, GroundTruth) on synthetic stores."""
    (pred_src, p_src), (pred, p) = oracle_src, oracle_out
    out = {"mse": mse(y, x), "ssim": ssim(y, x), "reversibility_l1": l1(back, x)}
    if change.kind == "continuous":
        out["mae"] = np.abs(pred - target)
        out["oracle_shift"] = (pred - pred_src) * np.sign(target - source)
    else:
        out["accuracy"] = (pred == target).astype(np.float64)
        out["target_prob_shift"] = p - p_src
    if truth is not None:
        images, roi, idx, gt = truth
        out["gt_mse"], out["gt_ssim"] = mse(y[..., 0], images), ssim(y, images)
        measured, true = gt.areas(y, roi, idx), gt.areas(images, roi, idx)
        for s in STRUCTURES:
            out[f"{s}_change_error_mm2"] = np.abs(measured[s] - true[s])[roi[s].any((1, 2))]
    return out


def _features(oracle, store, idx, batch_size):
    return np.concatenate([oracle.features(store.images(idx[i:i + batch_size]), batch_size)
                           for i in range(0, len(idx), batch_size)])


def score_change(store, oracle, methods, change, src, tgt, ref, gt, batch_size):
    """Scores of the floor and of every method for one attribute's pairs (src[i] -> target tgt[i])."""
    parts = {m: {} for m in [FLOOR, *methods]}
    feats = {m: [] for m in parts}
    for i in range(0, len(src), batch_size):
        idx, t = src[i:i + batch_size], tgt[i:i + batch_size]
        x = store.images(idx)[..., None]
        s_raw = dict(store.raw(idx), index=idx)
        t_raw = dict(s_raw, **{change.name: t})
        truth = (*gt.target(idx, t_raw), idx, gt) if gt else None

        def judge(images):
            f, logits = oracle.outputs(images, batch_size)
            p = None if change.kind == "continuous" else oracle.schema.probability(logits, change.name, t)
            return f, (oracle.schema.decode_logits(logits)[change.name], p)

        f_src, oracle_src = judge(x)
        outputs = {FLOOR: (x, x, f_src, oracle_src)}
        for m, method in methods.items():
            y = np.asarray(method.manipulate(x, s_raw, t_raw), np.float32).reshape(x.shape)
            back = np.asarray(method.manipulate(y, t_raw, s_raw), np.float32).reshape(x.shape)
            outputs[m] = (y, back, *judge(y))
        for m, (y, back, f, oracle_out) in outputs.items():
            for k, v in _score(change, x, y, back, s_raw[change.name], t, oracle_src, oracle_out, truth).items():
                parts[m].setdefault(k, []).append(v)
            feats[m].append(f)
    has_ref = ref >= 0
    ref_feats = _features(oracle, store, ref[has_ref], batch_size) if has_ref.sum() >= 2 else None
    out = {}
    for m in parts:
        s = {k: _mean(v) for k, v in parts[m].items()}
        if gt:
            s.update({f"{st}_pairs": int(sum(len(v) for v in parts[m][f"{st}_change_error_mm2"])) for st in STRUCTURES})
        s["fd"] = None if ref_feats is None else frechet_distance(np.concatenate(feats[m])[has_ref], ref_feats)
        s["fd_pairs"] = int(has_ref.sum())
        out[m] = s
    return out


def score_unchanged(store, method, sample, batch_size, repeats=REPEATS):
    """Reconstruction MSE at target = source, and mean L1 drift after `repeats` such manipulations."""
    recon, drift = [], []
    for i in range(0, len(sample), batch_size):
        idx = sample[i:i + batch_size]
        x = store.images(idx)[..., None]
        raw = dict(store.raw(idx), index=idx)
        y = x
        for k in range(repeats):
            y = np.asarray(method.manipulate(y, raw, raw), np.float32).reshape(x.shape)
            if k == 0:
                recon.append(mse(y, x))
        drift.append(l1(y, x))
    return {"reconstruction_mse": _mean(recon), "composition_l1": _mean(drift), "repeats": repeats}


def evaluate(store, oracle, methods, n=512, seed=0, batch_size=64, log=print):
    """Score {name: method} on n seeded test slices with the protocol above; returns a JSON-ready dict."""
    changes = [change_for(a) for a in oracle.schema.attributes]
    missing = [c.name for c in changes if c.name not in store.schema.names]
    if missing:
        raise ValueError(f"{store.path} has no attributes {missing}, which the oracle predicts; "
                         f"evaluate on a store with them (it has {store.schema.names})")
    rng = np.random.default_rng(seed)
    test = store.indices("test")
    sample = np.sort(rng.choice(test, min(n, len(test)), replace=False))
    gt = GroundTruth(store, sample, batch_size) if is_synthetic(store) else None
    result = {"n": len(sample), "seed": seed, "store": store.path, "synthetic": gt is not None,
              "protocol": {}, "floor": {}, "methods": {m: {} for m in methods}}
    for change in changes:
        src, tgt = draw_pairs(store, sample, change, rng)
        ref = matched_reference(store, test, src, tgt, change, rng)
        log(f"{change.name}: {len(src)} pairs, {len(methods)} methods")
        scores = score_change(store, oracle, methods, change, src, tgt, ref,
                              gt if change.name in TRUTH_ATTRS else None, batch_size)
        result["protocol"][change.name] = {"pairs": len(src), "change": describe(change, store.schema[change.name])}
        result["floor"][change.name] = scores.pop(FLOOR)
        for m, s in scores.items():
            result["methods"][m][change.name] = s
    for m, method in methods.items():
        result["methods"][m]["unchanged"] = score_unchanged(store, method, sample, batch_size)
    return result


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


def _sweep(method, x, raw, changes):
    """Columns (each (k, S, S) images, None = a gap between attributes) of every attribute's sweep."""
    cols = []
    for c in changes:
        if cols:
            cols.append(None)
        for v in c.sweep:
            target = dict(raw, **{c.name: np.full(len(x), v, np.float64)})
            cols.append(np.asarray(method.manipulate(x, raw, target), np.float32).reshape(x.shape[:3]))
    return cols


def _row(x, cols, i, diff=False):
    blank = np.full(x.shape[1:3], 255, np.uint8)
    if diff:
        return [blank] + [blank if c is None else grids.diverging(c[i] - x[i, ..., 0], DIFF_SCALE) for c in cols]
    return [grids.to_uint8(x[i, ..., 0])] + [blank if c is None else grids.to_uint8(c[i]) for c in cols]


def slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def draw_trajectories(store, methods, changes, out_dir, seed=0, n_subjects=4, truth=None):
    """Write one PNG per method and a combined one; returns [{"file", "caption"}].

    Rows per subject: the method, its difference from the source, and (synthetic stores, given `truth`) the
    true counterfactual and its difference. Columns: the source, then each attribute's sweep (age 60..90 in
    steps of 5 at the subject's other attributes; every class of a categorical one), a blank between them."""
    idx = trajectory_slices(store, n_subjects, seed)
    k = len(idx)
    x = store.images(idx)[..., None]
    raw = dict(store.raw(idx), index=idx)
    sweeps = {m: _sweep(method, x, raw, changes) for m, method in methods.items()}
    true = sweeps.get("truth") or (_sweep(truth, x, raw, changes) if truth else None)
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
                              f"columns: {columns}; {scale}"))
    combined = ({"truth": true} if true is not None and "truth" not in sweeps else {}) | sweeps
    rows = [_row(x, cols, i) for i in range(k) for cols in combined.values()]
    figures.append(_write(out_dir, f"trajectories_all_n{k}.png", grids.tile(rows),
                          f"all methods: {k} test subjects (seed {seed}); rows per subject: {', '.join(combined)}; "
                          f"columns: {columns}"))
    return figures


def _write(out_dir, name, image, caption):
    grids.write_png(os.path.join(out_dir, name), image)
    return {"file": name, "caption": caption}


# --- report ---------------------------------------------------------------------------------------------------
def _fmt(v):
    return "–" if v is None else f"{v:.4g}"


def report_markdown(metrics, title="Evaluation"):
    """The metrics as markdown: one table per attribute (methods as rows), unchanged attributes, figures."""
    m = metrics
    lines = [f"# {title}", "",
             f"Store `{m['store']}`, oracle `{m.get('oracle', '?')}`: n = {m['n']} test slices (seed {m['seed']}).",
             "Effectiveness is the oracle's prediction on the manipulated slice vs the target (MAE in the "
             "attribute's raw units, e.g. years; oracle shift = predicted change in the requested direction; "
             "target prob. shift = gain in the oracle's probability of the target class). "
             "MSE/SSIM and reversibility L1 compare with the source; FD = Fréchet distance of oracle features to "
             "real test slices with the target attributes (pairs with such a slice in brackets)."]
    if m["synthetic"]:
        lines.append("GT: against the true counterfactual of the phantom; area errors = mean |measured area "
                     "change - true measured area change| in mm² (the no-change row gives the mean true change).")
    for name, proto in m["protocol"].items():
        floor = m["floor"][name]
        effect = "accuracy ↑" if "accuracy" in floor else "MAE ↓"
        cols = [(effect, "accuracy" if "accuracy" in floor else "mae")]
        cols += [("oracle shift ↑", "oracle_shift")] if "oracle_shift" in floor else []
        cols += [("target prob. shift ↑", "target_prob_shift")] if "target_prob_shift" in floor else []
        cols += [("MSE ↓", "mse"), ("SSIM ↑", "ssim"), ("reversibility L1 ↓", "reversibility_l1"), ("FD ↓", "fd")]
        if "gt_mse" in floor:
            cols += [("GT MSE ↓", "gt_mse"), ("GT SSIM ↑", "gt_ssim")]
            cols += [(f"Δ{s} error mm² ↓", f"{s}_change_error_mm2") for s in STRUCTURES]
        lines += ["", f"## {name}: {proto['pairs']} pairs", "", f"Change: {proto['change']}.", "",
                  "| method | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for method, s in [(FLOOR, floor)] + [(k, v[name]) for k, v in m["methods"].items()]:
            cells = [_fmt(s[key]) + (f" ({s['fd_pairs']})" if key == "fd" else "") for _, key in cols]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"## Unchanged attributes (target = source), n = {m['n']}", "",
              f"| method | reconstruction MSE ↓ | composition L1 after {REPEATS}× ↓ |", "|---|---|---|"]
    for method, v in m["methods"].items():
        u = v["unchanged"]
        lines.append(f"| {method} | {_fmt(u['reconstruction_mse'])} | {_fmt(u['composition_l1'])} |")
    if m.get("figures"):
        lines += ["", "## Trajectories", ""]
        for f in m["figures"]:
            lines += [f"![{f['file']}]({f['file']})", "", f"{f['file']}: {f['caption']}.", ""]
    return "\n".join(lines) + "\n"
