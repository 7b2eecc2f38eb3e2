"""Trajectory figures: each method's sweep of seeded test subjects' slices over an attribute's values, with
difference maps."""
import os
import re

import numpy as np

from mri.data import grids
from evaluation.protocol import manipulated, told
from models import supported


DIFF_SCALE = 0.5       # difference maps saturate at this intensity change ([-1, 1] images)
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
    """Columns (each (k, S, S, C) images, None = a gap between attributes, NaN = a change the method does not
    make) of every attribute's sweep of the store's slices idx (images x, told `raw`)."""
    cols = []
    for c in changes:
        if cols:
            cols.append(None)
        for v in c.sweep:
            target = dict(raw, **{c.name: np.full(len(x), v, np.float64)})
            ok = supported(method, raw, target, len(x))
            cols.append(np.where(ok[:, None, None, None], manipulated(method, x, raw, target, ok, idx), np.nan))
    return cols


def _row(x, cols, i, diff=False):
    blank = np.full(x.shape[1:3], 255, np.uint8)
    gap = lambda c: c is None or np.isnan(c[i]).any()
    if diff:
        return [blank] + [blank if gap(c) else grids.diverging((c[i] - x[i]).mean(-1), DIFF_SCALE) for c in cols]
    return [grids.to_uint8(grids.picture(x[i]))] + [blank if gap(c) else grids.to_uint8(grids.picture(c[i]))
                                                     for c in cols]


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
    x = store.pixels(idx)
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
