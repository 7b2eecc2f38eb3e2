"""How real the slices of a store look: statistics of one brain's slab, their distances, and the reference file.

Every statistic is computed per brain from its slab (n_slices, S, S) in [-1, 1], cut by data_prep.py's code
(mri/data/volumes.py), and its pixel size in mm (the plan's side_mm / S). Definitions:

- brain mask: the foreground at preprocessing's threshold (5 % of the scale), holes filled slice by slice
  (mri.data.tissue.filled_foreground); depth = in-plane distance (mm) from a mask pixel to the nearest outside pixel.
- position bands: the slab's slices split into `n_bands` consecutive groups, inferior to superior.
- intensity distribution: the in-brain intensities of a band (or of the slab). Distance: the 1-D Wasserstein
  distance W1, the mean absolute difference of the two quantile functions (on the [-1, 1] scale); also the 10th,
  50th and 90th percentiles.
- tissue classes: 1-D 3-means of the slab's in-brain intensities (mri.data.tissue.tissue_levels, started at the
  10/50/90th percentiles), i.e. thresholds halfway between the class means; fractions = share of in-brain pixels
  nearest each class mean (CSF, GM, WM), no partial volume.
- contrast: of the class means u on the intensity-fraction scale u = (x + 1) / 2, which is proportional to the
  scan's own intensities: (WM - GM) / (WM + GM) and (GM - CSF) / (GM + CSF).
- cortex band: mask pixels with depth in (BAND_MM[0], BAND_MM[1]] = (3, 12] mm. The radial direction at a pixel is the
  gradient of the depth map smoothed with a 2-pixel Gaussian (the local inward normal of the brain outline).
- orientation: the structure tensor of the slice (Gaussian derivatives, sigma 1 pixel, integrated over 2 pixels;
  pixels outside the mask first take the nearest in-mask value, so the outline itself is no edge) gives each
  pixel's dominant gradient orientation; its angle to the radial direction, folded to [0, 90] degrees, is
  histogrammed over the cortex band (9 bins of 10 degrees) weighted by the tensor's anisotropy (the difference
  of its eigenvalues, i.e. oriented gradient energy). Radial alignment = weighted mean of cos(2 angle): +1 all
  gradients radial (layers parallel to the surface), -1 all tangential (spoke-like radial sulci), 0 isotropic.
  Distance between histograms: W1 in degrees.
- wavelength: for each slice with at least 30 % of the largest slice's brain area, the intensity is read along
  closed iso-depth curves at depths WAVE_DEPTHS_MM (rays from the mask's centroid, 720 angles); each curve's
  power spectrum is assigned to wavelengths (curve length / harmonic) and accumulated over curves and slices into
  log-spaced bins from 3 to 80 mm (power per unit log wavelength, normalised to sum 1). Dominant wavelength: the
  peak of that spectrum, smoothed over 3 bins, between 4 and 40 mm. Distance between spectra: W1 in octaves.
- folding index: length of the GM/WM iso-intensity line (halfway between the class means, Gaussian-smoothed
  image, sigma 1 pixel) inside the depth range (0, FOLD_DEPTH_MM = 15 mm] over the length of the mask's outline, summed
  over slices (each length = count of pixels within half a pixel of the line). A smooth white-matter surface
  gives about 1; white matter reaching into folded gyri gives more.
- GM by depth: each in-brain pixel's tissue class (as above) binned by its depth into DEPTH_EDGES_MM; the GM share
  of each bin over the slab is the profile (distance: mean |difference| over the bins both brains fill). Scalars:
  the GM share at depth (0, 6] mm (the ribbon) and (15, 30] mm (where a real slice shows the white-matter core and
  a marbled one shows grey matter).
- sulci along the outline: from every outline pixel (depth <= one pixel) a ray runs along the inward normal (the
  gradient of the smoothed depth map) over the image smoothed with a 0.5-pixel Gaussian, in half-pixel steps up to
  RAY_MM. WM depth = distance along the ray to the first sample at or above the GM/WM level (halfway between the
  class means; RAY_MM if none): the ribbon's thickness at a crown, a sulcus' depth where the ray runs down one.
  Its distribution over the slab's rays (W1, mm), its median and 90th percentile; CSF crossing = share of rays that
  meet a sample below the CSF/GM level between SULCUS_MM[0] and SULCUS_MM[1] mm, before reaching white matter.
- outline roughness: per slice with at least 30 % of the largest slice's area, the outline's radius r(angle) from
  the centroid (720 rays); its RMS deviation (mm) from its own first OUTLINE_HARMONICS Fourier harmonics (the oval
  and its poles), mean over slices. A smooth oval gives about 0, lumps give more.
- symmetry: Dice of the mask with its mirror image about the best midline, one vertical plane for the whole slab
  (through the mask's centroid, rotated by up to 20 degrees and shifted by up to 4 pixels, best by grid search).
- tilt: the angle (degrees, absolute) between the long principal axis of the slab's mask pixels and the image's
  anterior-posterior axis.
- area profile: the mask's area per slice over the largest slice's (inferior to superior; distance: mean |difference|
  over the slices); widest slice: the position of the largest area (the profile smoothed over 5 slices) as a fraction
  of the slab, 0 the lowest slice, 1 the top one. The slab is centred on the brain's centre of mass, so where its
  widest section falls tells whether the slab cuts the same anatomy as a real brain's.

Distances between two brains: W1 as above for distributions, histograms and spectra; |a - b| for scalars.
`compare` reports each statistic as synthetic-to-real distance (mean over synthetic subjects of the mean over
the real brains) against the real-to-real distance; the ratio's denominator is at least the statistic's
floor (STATISTICS: a resolution below which two brains count as equal), flagged when used. With two real brains
a scalar lying between them has a ratio of exactly 0.5.

A ratio to the mean real-to-real distance hides an offset when the real brains disagree, so every row also gets a
verdict against the real brains themselves (`verdict`): for a scalar, "inside" when the synthetic mean lies in the
real range [min, max], else "near" when its distance to the nearer real brain is at most the real-to-real distance
(floored), else "out"; for a distribution, histogram or profile (no range), "near" or "out" by the same rule on the
mean over subjects of the distance to the nearer real brain. `offset` is that nearer distance (0 inside the range)
over the floored real-to-real distance: above 1 is "out".
"""
import json
import os
import zipfile

import numpy as np
from scipy import ndimage

from mri.data.tissue import filled_foreground

BAND_MM = (3.0, 12.0)
WAVE_DEPTHS_MM = (1.5, 2.25, 3.0, 3.75, 4.5, 5.25, 6.0)
FOLD_DEPTH_MM = 15.0
WAVE_BINS_MM = np.geomspace(3.0, 80.0, 31)
ORIENT_BINS = 9
DEPTH_EDGES_MM = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, np.inf)
RAY_MM = 30.0
SULCUS_MM = (2.0, 12.0)
OUTLINE_HARMONICS = 4
N_QUANTILES = 1000
# statistic key -> (label, group, unit, distance kind, floor of the real-to-real distance)
STATISTICS = {
    "intensity_w1": ("in-brain intensity distribution (all slices)", "intensity", "W1, [-1, 1] scale", "dist", 0.01),
    "p10": ("in-brain intensity, 10th percentile", "intensity", "[-1, 1]", "scalar", 0.01),
    "p50": ("in-brain intensity, median", "intensity", "[-1, 1]", "scalar", 0.01),
    "p90": ("in-brain intensity, 90th percentile", "intensity", "[-1, 1]", "scalar", 0.01),
    "frac_csf": ("tissue fraction CSF", "tissue", "fraction of brain mask", "scalar", 0.01),
    "frac_gm": ("tissue fraction GM", "tissue", "fraction of brain mask", "scalar", 0.01),
    "frac_wm": ("tissue fraction WM", "tissue", "fraction of brain mask", "scalar", 0.01),
    "contrast_wm_gm": ("contrast (WM-GM)/(WM+GM)", "contrast", "ratio", "scalar", 0.005),
    "contrast_gm_csf": ("contrast (GM-CSF)/(GM+CSF)", "contrast", "ratio", "scalar", 0.005),
    "orientation": ("cortex-band orientation histogram", "folding", "W1, degrees", "hist", 1.0),
    "radial_alignment": ("cortex-band radial alignment", "folding", "mean cos 2angle", "scalar", 0.02),
    "spectrum": ("cortex-band wavelength spectrum", "folding", "W1, octaves", "spectrum", 0.05),
    "wavelength_mm": ("dominant cortical wavelength", "folding", "mm", "scalar", 1.0),
    "folding_index": ("folding index (GM/WM line / outline)", "folding", "ratio", "scalar", 0.02),
    "gm_by_depth": ("GM share by depth from the outline", "depth", "mean |diff| over depth bins", "profile", 0.02),
    "gm_outer": ("GM share at depth 0-6 mm", "depth", "fraction", "scalar", 0.02),
    "gm_inner": ("GM share at depth 15-30 mm", "depth", "fraction", "scalar", 0.02),
    "wm_depth": ("WM depth along the inward normals", "sulci", "W1, mm", "quantiles", 0.3),
    "wm_depth_median": ("WM depth along the inward normals, median", "sulci", "mm", "scalar", 0.3),
    "wm_depth_p90": ("WM depth along the inward normals, 90th percentile", "sulci", "mm", "scalar", 0.5),
    "csf_crossing": ("rays crossing CSF 2-12 mm in, before WM", "sulci", "fraction of outline", "scalar", 0.02),
    "outline_roughness": ("outline roughness (RMS about 4 harmonics)", "shape", "mm", "scalar", 0.1),
    "symmetry_dice": ("left-right symmetry (Dice with mirror)", "shape", "Dice", "scalar", 0.005),
    "tilt_deg": ("tilt of the principal axis", "shape", "degrees", "scalar", 1.0),
    "area_profile": ("brain area by slice (over the largest)", "shape", "mean |diff| over slices", "profile", 0.01),
    "widest_slice": ("position of the widest slice (0 lowest, 1 top)", "shape", "fraction of the slab", "scalar", 0.03),
}


class ReferenceError(ValueError):
    """A reference file that cannot be used; the message names the file and the fix."""


REBUILD = ("rebuild it with `python reference/make_reference.py --store STORE --out FILE --brain NAME=T1.nii.gz ...` "
           "from the source files named in reference/README.md")


# --- the reference file -------------------------------------------------------------------------------------
def load_reference(path):
    """{'names', 'size', 'n_slices', 'spacing', 'brains': {name: {'slices', 'px_mm', 'plan', 'tissue'}}}."""
    if not os.path.isfile(path):
        raise ReferenceError(f"reference {path}: no such file; {REBUILD}")
    if not zipfile.is_zipfile(path):
        raise ReferenceError(f"reference {path} is not a reference file (not an .npz archive); {REBUILD}")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            ref = {"path": str(path), "names": names, "size": int(z["size"]), "n_slices": int(z["n_slices"]),
                   "spacing": float(z["spacing"]), "brains": {}}
            for n in names:
                plan = json.loads(str(z[f"plan_{n}"]))
                tissue = {c: z[f"{c}_{n}"].astype(np.float32) / 255 for c in ("csf", "gm", "wm") if f"{c}_{n}" in z}
                ref["brains"][n] = {"slices": z[f"slices_{n}"].astype(np.float32), "plan": plan, "tissue": tissue,
                                    "px_mm": plan["side_mm"] / ref["size"],
                                    "source": json.loads(str(z[f"source_{n}"]))}
    except (OSError, ValueError, KeyError) as e:
        raise ReferenceError(f"reference {path} is not a reference file ({type(e).__name__}: {e}); {REBUILD}") from e
    if len(names) < 2:
        raise ReferenceError(f"reference {path} holds {len(names)} brain(s); the report needs two; {REBUILD}")
    return ref


def check_geometry(ref, size, n_slices, spacing, store_path):
    """Raise ReferenceError naming both files and the fix when the reference is cut another way than the store."""
    mine = (ref["size"], ref["n_slices"], round(ref["spacing"], 4))
    theirs = (int(size), int(n_slices), round(float(spacing), 4))
    if mine != theirs:
        raise ReferenceError(
            f"reference {ref['path']} holds {mine[0]}x{mine[0]} slices, {mine[1]} per brain {mine[2]:g} mm apart, but "
            f"the store {store_path} holds {theirs[0]}x{theirs[0]}, {theirs[1]} per volume {theirs[2]:g} mm apart: "
            f"compare like with like; rebuild the reference at the store's geometry with "
            f"`python reference/make_reference.py --store {store_path} --out OTHER.npz ...` (sources in "
            f"reference/README.md) and pass --reference OTHER.npz, or use a store built with "
            f"`data_prep.py --size {mine[0]} --slices {mine[1]} --spacing {mine[2]:g}`")


# --- per-brain statistics -----------------------------------------------------------------------------------
def depth_map(mask, px_mm):
    """Per slice, the distance in mm from each mask pixel to the nearest pixel outside the mask."""
    return np.stack([ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] * px_mm for m in mask])


def quantiles(values, n=N_QUANTILES):
    """The quantile function at n mid-probabilities (i + 0.5) / n; W1 of two is the mean |difference|."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return np.full(n, np.nan)
    return np.quantile(values, (np.arange(n) + 0.5) / n)


def w1_quantiles(qa, qb):
    """1-D Wasserstein distance of two distributions given by their quantile functions at the same probabilities."""
    return float(np.mean(np.abs(np.asarray(qa) - np.asarray(qb))))


def w1_histograms(ha, hb, widths):
    """1-D Wasserstein distance of two histograms over the same ordered bins of the given widths."""
    ha, hb = np.asarray(ha, np.float64), np.asarray(hb, np.float64)
    ca, cb = np.cumsum(ha / ha.sum()), np.cumsum(hb / hb.sum())
    return float(np.sum(np.abs(ca - cb)[:-1] * (np.asarray(widths)[:-1] + np.asarray(widths)[1:]) / 2))


def position_bands(n_slices, n_bands):
    """Consecutive slice groups, inferior to superior."""
    return [b for b in np.array_split(np.arange(n_slices), min(n_bands, n_slices)) if b.size]


def tissue_classes(values):
    """(class means CSF, GM, WM on the [-1, 1] scale, fractions) from 1-D 3-means (halfway thresholds)."""
    from mri.data.tissue import tissue_levels
    levels = tissue_levels(values)
    edges = (levels[:-1] + levels[1:]) / 2
    labels = np.searchsorted(edges, values)
    fractions = np.bincount(labels, minlength=3) / max(len(values), 1)
    return levels, fractions


def contrast(a, b):
    """(a - b) / (a + b) of two class means given on the [-1, 1] scale, taken on u = (x + 1) / 2."""
    ua, ub = (a + 1) / 2, (b + 1) / 2
    return float((ua - ub) / (ua + ub)) if ua + ub > 0 else float("nan")


def _radial_angle(depth_slice):
    """Angle (radians) of the inward normal: the gradient of the smoothed depth map."""
    d = ndimage.gaussian_filter(depth_slice, 2.0)
    return np.arctan2(ndimage.sobel(d, 0), ndimage.sobel(d, 1))


def fill_outside(image, mask):
    """The image with every pixel outside the mask set to the nearest in-mask pixel's value (no outline edge)."""
    if mask.all() or not mask.any():
        return image
    idx = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
    return image[idx[0], idx[1]]


def orientation(slab, mask, depth, sigma=1.0, rho=2.0, band=BAND_MM):
    """(weighted histogram of the gradient-to-radial angle over 9 bins of 10 degrees, radial alignment). The
    outside of the mask is filled with the nearest in-mask intensity first, so the outline is no edge."""
    hist = np.zeros(ORIENT_BINS)
    num = den = 0.0
    for img, m, d in zip(slab, mask, depth):
        sel = m & (d > band[0]) & (d <= band[1])
        if not sel.any():
            continue
        img = fill_outside(img, m)
        gy = ndimage.gaussian_filter(img, sigma, order=(1, 0))
        gx = ndimage.gaussian_filter(img, sigma, order=(0, 1))
        jxx, jyy, jxy = (ndimage.gaussian_filter(a, rho) for a in (gx * gx, gy * gy, gx * gy))
        theta = 0.5 * np.arctan2(2 * jxy, jxx - jyy)
        anisotropy = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2)
        angle = np.abs((theta - _radial_angle(d) + np.pi / 2) % np.pi - np.pi / 2)[sel]
        w = anisotropy[sel]
        hist += np.histogram(np.degrees(angle), ORIENT_BINS, (0, 90), weights=w)[0]
        num += float(np.sum(w * np.cos(2 * angle)))
        den += float(np.sum(w))
    if den == 0:
        return np.full(ORIENT_BINS, np.nan), float("nan")
    return hist / hist.sum(), num / den


def _largest_component(m):
    lab, n = ndimage.label(m)
    if n <= 1:
        return m
    sizes = ndimage.sum(m, lab, range(1, n + 1))
    return lab == 1 + int(np.argmax(sizes))


def _large(mask, min_area):
    """Slices whose mask holds at least min_area of the largest slice's area (and something)."""
    areas = mask.sum(axis=(1, 2))
    return (areas > 0) & (areas >= min_area * areas.max())


def _outlines(mask, theta, step, order):
    """Per slice: (centroid y, x of its largest component, outline radius in pixels along each angle theta), read
    on rays from the centroid in steps of `step` pixels (map_coordinates of the given order)."""
    radii = np.arange(0, 1.5 * mask.shape[1], step)
    for m in mask:
        m = _largest_component(m)
        cy, cx = ndimage.center_of_mass(m)
        ys, xs = cy - np.outer(np.cos(theta), radii), cx + np.outer(np.sin(theta), radii)
        inside = ndimage.map_coordinates(m.astype(np.float32), [ys, xs], order=order, cval=0) > 0.5
        last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)
        yield cy, cx, np.where(inside.any(axis=1), radii[last], 0.0)


def wavelength_spectrum(slab, mask, px_mm, depths=WAVE_DEPTHS_MM, n_angles=720, min_area=0.3):
    """Power per log wavelength over WAVE_BINS_MM (normalised) of the intensity along iso-depth curves."""
    acc = np.zeros(len(WAVE_BINS_MM) - 1)
    theta = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    for img, (cy, cx, edge) in zip(slab[_large(mask, min_area)], _outlines(mask[_large(mask, min_area)], theta, 0.5, 0)):
        for dmm in depths:
            r = np.maximum(edge - dmm / px_mm, 0)
            py, px = cy - np.cos(theta) * r, cx + np.sin(theta) * r
            profile = ndimage.map_coordinates(img, [py, px], order=1)
            length = np.sum(np.hypot(np.diff(np.r_[py, py[:1]]), np.diff(np.r_[px, px[:1]]))) * px_mm
            power = np.abs(np.fft.rfft(profile - profile.mean())) ** 2
            k = np.arange(1, len(power))
            acc += np.histogram(length / k, bins=WAVE_BINS_MM, weights=power[1:])[0]
    if acc.sum() == 0:
        return np.full(len(acc), np.nan)
    acc = acc / np.diff(np.log(WAVE_BINS_MM))
    return acc / acc.sum()


def dominant_wavelength(spectrum, lo=4.0, hi=40.0):
    """Peak (mm) of the spectrum smoothed over 3 log bins, between lo and hi mm."""
    centres = np.sqrt(WAVE_BINS_MM[:-1] * WAVE_BINS_MM[1:])
    smooth = np.convolve(np.asarray(spectrum, np.float64), np.ones(3) / 3, mode="same")
    sel = (centres >= lo) & (centres <= hi)
    if not np.isfinite(smooth[sel]).any():
        return float("nan")
    return float(centres[sel][np.nanargmax(smooth[sel])])


def _line_length(image, level, sigma=1.0):
    """Pixels within half a pixel of the iso-line `level` of the Gaussian-smoothed image (a length in pixels)."""
    sm = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma)
    g = np.hypot(ndimage.gaussian_filter(image, sigma, order=(1, 0)),
                 ndimage.gaussian_filter(image, sigma, order=(0, 1)))
    return np.abs(sm - level) < 0.5 * g


def folding_index(slab, mask, depth, gm_wm_level, max_depth=FOLD_DEPTH_MM):
    """GM/WM iso-line length within max_depth mm of the outline over the outline's length, over all slices."""
    inner = outer = 0
    for img, m, d in zip(slab, mask, depth):
        if not m.any():
            continue
        inner += int((_line_length(img, gm_wm_level) & m & (d <= max_depth)).sum())
        outer += int(_line_length(m.astype(np.float32), 0.5).sum())
    return inner / outer if outer else float("nan")


def gm_by_depth(slab, mask, depth, levels, edges=DEPTH_EDGES_MM):
    """GM share of the in-brain pixels in each depth bin (NaN for an empty bin) and the pixel count per bin."""
    levels = np.asarray(levels, np.float64)
    cls = np.searchsorted((levels[:-1] + levels[1:]) / 2, slab[mask])
    b = np.digitize(depth[mask], edges[1:-1], right=True)
    count = np.bincount(b, minlength=len(edges) - 1)
    gm = np.bincount(b, weights=(cls == 1), minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, gm / np.maximum(count, 1), np.nan), count


def _share(profile, counts, lo, hi, edges=DEPTH_EDGES_MM):
    """GM share over the depth bins inside (lo, hi] mm, weighted by their pixel counts."""
    sel = (np.asarray(edges[:-1]) >= lo) & (np.asarray(edges[1:]) <= hi) & (counts > 0)
    return float(np.sum(profile[sel] * counts[sel]) / counts[sel].sum()) if sel.any() else float("nan")


def normal_rays(slab, mask, depth, px_mm, levels, ray_mm=RAY_MM, sulcus=SULCUS_MM):
    """(WM depth in mm of every outline ray, whether each crossed CSF between sulcus[0] and sulcus[1] mm before WM);
    see the module docstring."""
    levels = np.asarray(levels, np.float64)
    csf_gm, gm_wm = (levels[0] + levels[1]) / 2, (levels[1] + levels[2]) / 2
    steps = np.arange(0, ray_mm / px_mm + 1e-9, 0.5)
    wm, crossed = [], []
    for img, m, d in zip(slab, mask, depth):
        start = m & (d <= px_mm + 1e-6)
        if not start.any():
            continue
        sm = ndimage.gaussian_filter(fill_outside(img, m), 0.5)
        smd = ndimage.gaussian_filter(d, 2.0)
        gy, gx = ndimage.sobel(smd, 0), ndimage.sobel(smd, 1)
        y0, x0 = np.nonzero(start)
        norm = np.hypot(gy[y0, x0], gx[y0, x0]) + 1e-9
        uy, ux = gy[y0, x0] / norm, gx[y0, x0] / norm
        ys, xs = y0[:, None] + uy[:, None] * steps, x0[:, None] + ux[:, None] * steps
        prof = ndimage.map_coordinates(sm, [ys, xs], order=1, mode="nearest")
        inside = ndimage.map_coordinates(m.astype(np.float32), [ys, xs], order=0, mode="constant") > 0.5
        is_wm = (prof >= gm_wm) & inside
        first = np.where(is_wm.any(axis=1), np.argmax(is_wm, axis=1), len(steps) - 1)
        dist = steps * px_mm
        wm.append(dist[first])
        window = (dist > sulcus[0]) & (dist <= sulcus[1])
        before = np.arange(len(steps))[None, :] < first[:, None]
        crossed.append(((prof < csf_gm) & inside & window[None, :] & before).any(axis=1))
    if not wm:
        return np.zeros(0), np.zeros(0, bool)
    return np.concatenate(wm), np.concatenate(crossed)


def outline_roughness(mask, px_mm, harmonics=OUTLINE_HARMONICS, n_angles=720, min_area=0.3):
    """Mean over slices of the RMS (mm) of the outline radius about its first `harmonics` Fourier harmonics."""
    theta = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    out = []
    for _, _, edge in _outlines(mask[_large(mask, min_area)], theta, 0.25, 1):
        r = edge * px_mm
        f = np.fft.rfft(r)
        f[harmonics + 1:] = 0
        out.append(float(np.sqrt(np.mean((r - np.fft.irfft(f, n_angles)) ** 2))))
    return float(np.mean(out)) if out else float("nan")


def mirror_dice(mask, angles=np.arange(-20, 20.1, 2.0), shifts=np.arange(-4, 4.1, 1.0)):
    """(Dice of the mask with its mirror about the best midline, the midline's angle in degrees from vertical).

    One line for the whole slab, through the centroid shifted by `shifts` pixels across, rotated by `angles`;
    the best of the grid is refined once on a grid four times finer (the search on a regular subsample of the
    mask's pixels, the Dice of the line found on all of them)."""
    z_all, y_all, x_all = np.nonzero(mask)
    if z_all.size == 0:
        return float("nan"), float("nan")
    cy, cx = y_all.mean(), x_all.mean()
    shape = mask.shape

    def dice(angle, shift, step):
        z, y, x = z_all[::step], y_all[::step], x_all[::step]
        ry, rx = y - cy, x - cx
        a = np.radians(angle)
        dy, dx = np.cos(a), np.sin(a)          # the line's direction (vertical when angle = 0)
        oy, ox = -dx * shift, dy * shift       # its offset across
        py, px = ry - oy, rx - ox
        along = py * dy + px * dx
        my = np.rint(cy + oy + 2 * along * dy - py).astype(np.int64)
        mx = np.rint(cx + ox + 2 * along * dx - px).astype(np.int64)
        ok = (my >= 0) & (my < shape[1]) & (mx >= 0) & (mx < shape[2])
        hits = np.count_nonzero(mask[z[ok], my[ok], mx[ok]])
        return 2.0 * hits / (z.size + z.size)

    step = max(1, z_all.size // 30000)       # the search runs on a regular subsample of the mask's pixels
    best = max((dice(a, s, step), a, s) for a in angles for s in shifts)
    step_a, step_s = np.diff(angles[:2])[0] / 4, np.diff(shifts[:2])[0] / 4
    fine = max((dice(a, s, step), a, s) for a in best[1] + step_a * np.arange(-4, 5)
               for s in best[2] + step_s * np.arange(-4, 5))
    return float(dice(fine[1], fine[2], 1)), float(fine[1])


def tilt(mask):
    """Absolute angle (degrees) between the long principal axis of the mask pixels and the image's vertical."""
    _, y, x = np.nonzero(mask)
    if y.size < 3:
        return float("nan")
    cov = np.cov(np.stack([y - y.mean(), x - x.mean()]))
    w, v = np.linalg.eigh(cov)
    vy, vx = v[:, np.argmax(w)]
    return float(np.degrees(np.arctan2(abs(vx), abs(vy))))


def area_profile(mask):
    """The mask's area per slice over the largest slice's, and the widest slice's position in [0, 1] (the
    profile smoothed over 5 slices; 0 = the lowest slice)."""
    area = mask.reshape(len(mask), -1).sum(1).astype(np.float64)
    profile = area / area.max()
    widest = np.argmax(ndimage.uniform_filter1d(profile, 5, mode="nearest")) / max(len(profile) - 1, 1)
    return [float(v) for v in profile], float(widest)


def brain_statistics(slab, px_mm, n_bands=4):
    """Every statistic of one brain's slab (see the module docstring); a JSON-serialisable dict plus the
    quantile functions ('q', 'q_bands') used for W1."""
    slab = np.asarray(slab, np.float32)
    mask = filled_foreground(np.asarray(slab))
    if not mask.any():
        raise ValueError("empty brain mask (no foreground)")
    depth = depth_map(mask, px_mm)
    values = slab[mask]
    levels, fractions = tissue_classes(values)
    bands = position_bands(len(slab), n_bands)
    hist, alignment = orientation(slab, mask, depth)
    spectrum = wavelength_spectrum(slab, mask, px_mm)
    dice, midline = mirror_dice(mask)
    profile, counts = gm_by_depth(slab, mask, depth, levels)
    wm_depth, crossed = normal_rays(slab, mask, depth, px_mm, levels)
    areas, widest = area_profile(mask)
    q = quantiles(values)
    q_bands = [quantiles(slab[b][mask[b]]) for b in bands]
    pct = lambda v: [float(x) for x in np.percentile(v, [10, 50, 90])] if v.size else [float("nan")] * 3  # noqa: E731
    return {
        "q": q, "q_bands": q_bands, "bands": [[int(b[0]), int(b[-1])] for b in bands],
        "p10": pct(values)[0], "p50": pct(values)[1], "p90": pct(values)[2],
        "band_percentiles": [pct(slab[b][mask[b]]) for b in bands],
        "levels": [float(v) for v in levels],
        "frac_csf": float(fractions[0]), "frac_gm": float(fractions[1]), "frac_wm": float(fractions[2]),
        "contrast_wm_gm": contrast(levels[2], levels[1]), "contrast_gm_csf": contrast(levels[1], levels[0]),
        "orientation": hist, "radial_alignment": float(alignment),
        "spectrum": spectrum, "wavelength_mm": dominant_wavelength(spectrum),
        "folding_index": float(folding_index(slab, mask, depth, (levels[1] + levels[2]) / 2)),
        "gm_by_depth": profile, "depth_counts": counts,
        "gm_outer": _share(profile, counts, 0.0, 6.0), "gm_inner": _share(profile, counts, 15.0, 30.0),
        "wm_depth": quantiles(wm_depth, 200),
        "wm_depth_median": float(np.median(wm_depth)) if wm_depth.size else float("nan"),
        "wm_depth_p90": float(np.percentile(wm_depth, 90)) if wm_depth.size else float("nan"),
        "csf_crossing": float(crossed.mean()) if crossed.size else float("nan"),
        "outline_roughness": outline_roughness(mask, px_mm),
        "symmetry_dice": dice, "midline_deg": midline, "tilt_deg": tilt(mask),
        "area_profile": areas, "widest_slice": widest,
        "px_mm": float(px_mm),
    }


def distance(key, a, b, band=None):
    """Distance between two brains' statistics `a` and `b` for statistic `key` (or a band's intensity W1)."""
    if band is not None:
        return w1_quantiles(a["q_bands"][band], b["q_bands"][band])
    kind = STATISTICS[key][3]
    if kind == "dist":
        return w1_quantiles(a["q"], b["q"])
    if kind == "hist":
        return w1_histograms(a[key], b[key], np.full(ORIENT_BINS, 90.0 / ORIENT_BINS))
    if kind == "spectrum":
        return w1_histograms(a[key], b[key], np.diff(np.log2(WAVE_BINS_MM)))
    if kind == "quantiles":
        return w1_quantiles(a[key], b[key])
    if kind == "profile":
        both = np.isfinite(a[key]) & np.isfinite(b[key])
        return float(np.mean(np.abs(np.asarray(a[key])[both] - np.asarray(b[key])[both]))) if both.any() else 0.0
    return float(abs(a[key] - b[key]))


# --- synthetic against real ---------------------------------------------------------------------------------
def _interval(values):
    v = np.asarray(values, np.float64)
    return {"mean": float(np.mean(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90))}


def verdict(kind, synthetic_values, real_values, nearer, real_to_real, floor):
    """(verdict, offset, share of subjects inside the real range) of one statistic (see the module docstring).
    synthetic_values: per subject (scalars; None otherwise); real_values: per real brain (scalars; None
    otherwise); nearer: per subject, the distance to the nearer real brain."""
    denominator = max(real_to_real, floor)
    if kind == "scalar":
        lo, hi, value = min(real_values), max(real_values), float(np.mean(synthetic_values))
        share = float(np.mean([lo <= v <= hi for v in synthetic_values]))
        if lo <= value <= hi:
            return "inside", 0.0, share
        offset = min(abs(value - lo), abs(value - hi)) / denominator
    else:
        share, offset = None, float(np.mean(nearer)) / denominator
    if not np.isfinite(offset):
        return "–", offset, share
    return ("near" if offset <= 1.0 else "out"), float(offset), share


def compare(synthetic, real):
    """Rows of the report: for every statistic (and every position band's intensity W1), the values per source,
    the synthetic-to-real distance over subjects (mean over the real brains), the real-to-real distance (mean
    over pairs) and their ratio. `synthetic`: list of brain_statistics; `real`: {name: brain_statistics}."""
    names = list(real)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    rows = []
    n_bands = len(synthetic[0]["bands"])
    keys = ["intensity_w1"] + [("band", i) for i in range(n_bands)] + [k for k in STATISTICS if k != "intensity_w1"]
    for key in keys:
        band = key[1] if isinstance(key, tuple) else None
        if band is None:
            label, group, unit, kind, floor = STATISTICS[key]
            name = key
        else:
            first, last = synthetic[0]["bands"][band]
            label, group, unit, kind, floor = (f"in-brain intensity distribution, slices {first}-{last}", "intensity",
                                               "W1, [-1, 1] scale", "dist", STATISTICS["intensity_w1"][4])
            name = f"intensity_w1_band{band}"
        each = {r: [distance(key if band is None else None, s, real[r], band) for s in synthetic] for r in names}
        per_subject = [float(np.mean([each[r][i] for r in names])) for i in range(len(synthetic))]
        real_real = float(np.mean([distance(key if band is None else None, real[a], real[b], band) for a, b in pairs]))
        denominator = max(real_real, floor)
        values = None
        if kind == "scalar":
            values = {"synthetic": _interval([s[key] for s in synthetic]), **{r: float(real[r][key]) for r in names}}
        syn_real = _interval(per_subject)
        nearer = [min(each[r][i] for r in names) for i in range(len(synthetic))]
        scalar = kind == "scalar"
        judged = verdict(kind, [s[key] for s in synthetic] if scalar else None,
                         [real[r][key] for r in names] if scalar else None, nearer, real_real, floor)
        rows.append({
            "verdict": judged[0], "offset": judged[1], "share_inside": judged[2],
            "real_range": [float(min(real[r][key] for r in names)), float(max(real[r][key] for r in names))]
            if scalar else None,
            "name": name, "label": label, "group": group, "unit": unit, "values": values,
            "synthetic_to_real": syn_real, "per_subject": per_subject,
            "synthetic_to_each": {r: float(np.mean(v)) for r, v in each.items()},
            "real_to_real": real_real, "floor": floor,
            "floor_used": real_real < floor, "ratio": syn_real["mean"] / denominator,
            "ratio_interval": [syn_real["p10"] / denominator, syn_real["p90"] / denominator],
        })
    return rows
