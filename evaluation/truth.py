"""Ground truth on synthetic stores: the true counterfactual of sampled slices and the ventricle and
hippocampus areas measured alike from any image (GroundTruth)."""

import numpy as np
from scipy import ndimage



ROI_DILATION = 2       # pixels around the true structure masks: the reach of the renderer's blur (GroundTruth)
MOVED = 1e-4           # a change of a true mask fraction above this is a moved boundary (GroundTruth)
STRUCTURES = ("ventricles", "hippocampus")
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
