"""Brain tissue and CSF of a slab from intensity classes: the filled foreground, three tissue levels, the
tissue fraction of each voxel and volumes in ml."""

import numpy as np



def filled_foreground(slab):
    """The source's foreground (preprocess's threshold: 5 % of the scale), holes filled slice by slice."""
    from scipy import ndimage
    from mri.data.volumes import FOREGROUND
    fg = slab > 2.0 * FOREGROUND - 1.0
    return np.stack([ndimage.binary_fill_holes(s) for s in fg])


def tissue_levels(values, iterations=100):
    """CSF, grey- and white-matter intensity levels: 3-means in 1D, started at the 10/50/90th percentiles."""
    v = np.sort(np.asarray(values, np.float64))
    centres = np.percentile(v, [10, 50, 90])
    for _ in range(iterations):
        edges = (centres[:-1] + centres[1:]) / 2
        groups = np.split(v, np.searchsorted(v, edges))
        new = np.array([g.mean() if g.size else c for g, c in zip(groups, centres)])
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def tissue_fraction(slab, levels):
    """Per voxel, the brain-tissue fraction: 0 at the CSF level, 1 at the grey-matter level and above
    (partial volume linear in between)."""
    csf, gm = levels[0], levels[1]
    if gm - csf < 1e-6:
        return (slab > csf).astype(np.float64)
    return np.clip((slab - csf) / (gm - csf), 0.0, 1.0)


def measures(slab, mask, levels, voxel_ml):
    """brain tissue and CSF volume (ml, inside the mask of the slab) and the brain parenchymal fraction."""
    f = tissue_fraction(slab[mask], levels)
    brain, csf = f.sum() * voxel_ml, (1 - f).sum() * voxel_ml
    return {"brain_ml": brain, "csf_ml": csf, "bpf": brain / (brain + csf)}
