"""Reference methods every trained method is compared with (evaluate.py --methods identity,meandiff,truth).

- identity: changes nothing; its scores are the "no change" floor of effectiveness and the ceiling of identity.
- meandiff: a voxel-wise linear model of intensity on the attributes, fitted per slice position on the train
  split (through a `SplitView`, which reads no other split); it adds the predicted difference
  f(target) - f(source), i.e. the population-average effect of the change, the same for every subject (what
  a method must beat to claim subject-specific changes).
- truth: the exact counterfactual of the synthetic phantom, rendered at the target attributes. It is the
  evaluator's own reference, computed from the slices' store indices (`render`), which no method receives.
"""
import numpy as np

from mri.synthetic import is_synthetic

# the no-change floor (and the identity method) is perfect on these by construction
FLOOR_BY_CONSTRUCTION = ("mse", "ssim", "mse_brain", "ssim_brain", "reversibility_l1", "oracle_shift",
                         "target_prob_shift", "reconstruction_mse", "composition_l1")

NAMES = ("identity", "meandiff", "truth")


UNCHANGED_METRICS = ("reconstruction_mse", "composition_l1")
GROUND_TRUTH_METRICS = ("gt_mse", "gt_ssim", "gt_mse_brain", "gt_ssim_brain", "gt_change_cosine", "gt_change_corr",
                        "ventricles_change_bias_mm2", "ventricles_change_error_mm2", "hippocampus_change_bias_mm2",
                        "hippocampus_change_error_mm2")


def make(name, store, attrs=None):
    """A baseline by name, ready to `manipulate` images of `store`; meandiff is fitted on `attrs` (default:
    every store attribute), which should be the attributes the evaluation changes."""
    if name == "identity":
        return Identity()
    if name == "meandiff":
        return MeanDiff.fit(store, attrs=attrs)
    if name == "truth":
        return Truth(store)
    raise ValueError(f"unknown baseline {name!r}; choose one of {NAMES}")


def _entry(key, source_attrs, target_attrs):
    v = target_attrs.get(key, source_attrs.get(key))
    return None if v is None else np.asarray(v, np.int64)


class Identity:
    """Returns the input unchanged."""
    by_construction = FLOOR_BY_CONSTRUCTION

    def manipulate(self, images, source_attrs, target_attrs):
        return np.asarray(images, np.float32)


def design(schema, raw):
    """Regressors of the linear model: the schema's encoding (continuous z-scored, binary 0/1, categorical
    one-hot) with each categorical's first class dropped as the reference level. (N, d) float64."""
    x = schema.encode(raw).astype(np.float64)
    dropped = [schema.slices[a.name].start for a in schema.attributes if a.kind == "categorical"]
    return np.delete(x, dropped, axis=1)


class MeanDiff:
    """y(pixel) = b0 + x . b per slice position (least squares with intercept, a tiny ridge on b so a class
    absent at some position gets b = 0). `coef[p]` holds b (d, S*S) of position p, picked by the attributes'
    "slice" entry (the slices' axial positions); `coef_all` is one model over every position, used when no
    positions are given (and by `pooled`). Additive, so its reconstruction and composition are exact by
    construction; its reversibility is not (the output is clipped to [-1, 1]) and is scored.

    Fit it on the attributes the evaluation changes: with the clinical scores in the model too, the diagnosis
    coefficient becomes a partial effect given scores that disease itself drives, not the population effect
    of the diagnosis (the protocol changes the diagnosis and keeps the scores at the source's values)."""
    by_construction = UNCHANGED_METRICS

    def __init__(self, schema, size, coef, coef_all):
        self.schema, self.size = schema, size
        self.coef, self.coef_all = coef, coef_all

    @classmethod
    def fit(cls, store, split="train", chunk=256, ridge=1e-3, attrs=None):
        """Fitted on `store.view(split)` alone: streams its slices in chunks, accumulating X^T X and X^T Y
        per position (normal equations), so memory stays O(positions * d * S^2) whatever the store's size.
        `attrs`: the regressors (default: every store attribute)."""
        schema = store.schema.select(list(attrs)) if attrs else store.schema
        data = store.view(split)
        positions = int(store.slice.max()) + 1
        d = design(schema, data.raw([0])).shape[1] + 1
        xtx = np.zeros((positions, d, d))
        xty = np.zeros((positions, d, data.size ** 2 * data.channels))
        for start in range(0, len(data), chunk):
            part = np.arange(start, min(start + chunk, len(data)))
            x = np.concatenate([np.ones((len(part), 1)), design(schema, data.raw(part))], axis=1)
            y = data.images(part).reshape(len(part), -1).astype(np.float64)
            for p in np.unique(data.slice[part]):
                m = data.slice[part] == p
                xtx[p] += x[m].T @ x[m]
                xty[p] += x[m].T @ y[m]
        penalty = np.diag([0.0] + [ridge] * (d - 1))

        def solve(a, b):
            return np.linalg.solve(a + penalty, b)[1:].astype(np.float32)

        coef_all = solve(xtx.sum(0), xty.sum(0))
        coef = np.stack([solve(xtx[p], xty[p]) if xtx[p, 0, 0] > 0 else coef_all for p in range(positions)])
        return cls(schema, data.size, coef, coef_all)

    def pooled(self):
        """A copy that uses its one model over all positions whatever positions it is given (slices cut with
        another geometry than the store's)."""
        return MeanDiff(self.schema, self.size, None, self.coef_all)

    def difference(self, source_attrs, target_attrs):
        """f(target) - f(source), (N, S, S) ((N, S, S, C) for C > 1 channels); attributes missing from the target
        keep the source's value."""
        names = self.schema.names
        dx = (design(self.schema, {n: target_attrs.get(n, source_attrs[n]) for n in names})
              - design(self.schema, {n: source_attrs[n] for n in names})).astype(np.float32)
        position = _entry("slice", source_attrs, target_attrs)
        if position is None or self.coef is None:
            delta = dx @ self.coef_all
        else:
            delta = np.einsum("nd,ndp->np", dx, self.coef[position])
        channels = delta.shape[-1] // self.size ** 2
        return delta.reshape(len(delta), self.size, self.size, *([channels] if channels > 1 else []))

    def manipulate(self, images, source_attrs, target_attrs):
        """images + f(target) - f(source), clipped to the [-1, 1] intensity range."""
        x = np.asarray(images, np.float32)
        return np.clip(x + self.difference(source_attrs, target_attrs).reshape(x.shape), -1.0, 1.0)


class Truth:
    """The synthetic phantom re-rendered at the target age and diagnosis (mri.synthetic.counterfactual), from
    the slices' store indices and a store built with `data_prep.py --synthetic`. The evaluator calls `render`
    with the indices of the slices it samples; `manipulate` reads them from the attributes' "index" entry,
    which simulate.py passes for a stored subject (no method receives it from the evaluator)."""
    by_construction = GROUND_TRUTH_METRICS + UNCHANGED_METRICS

    def __init__(self, store):
        if not is_synthetic(store):
            raise ValueError(f"{store.path} is not a synthetic store (no csv/subject_seed), so it has no true "
                             "counterfactual: drop `truth` from --methods, or build one with "
                             "`python data_prep.py --synthetic 200 --out data/synthetic.h5`")
        self.store = store

    def render(self, idx, target_attrs):
        """(N, S, S, 1) true counterfactuals of the store's slices idx at the target age and diagnosis."""
        from mri import synthetic
        out = synthetic.counterfactual(self.store, idx, age=target_attrs.get("age"), dx=target_attrs.get("dx"))
        return np.asarray(out["images"], np.float32)[..., None]

    def manipulate(self, images, source_attrs, target_attrs):
        idx = _entry("index", source_attrs, target_attrs)
        if idx is None:
            raise ValueError("truth needs the slices' store indices: pass attrs['index']")
        return self.render(idx, target_attrs)
