"""One volume -> a stack of normalised axial slices.

Steps (the README describes them for users):
1. load with nibabel (.nii, .nii.gz, Analyze .img/.hdr); squeeze a singleton 4th axis; reject anything else not 3D;
2. reorient to the closest canonical RAS orientation, so the result does not depend on axis order or flips;
3. intensity: negative values -> 0, divide by the 99.5th percentile of the non-zero voxels, clip to [0, 1],
   then map to [-1, 1] (background -1, brightest tissue +1);
4. crop to the foreground box (voxels above 5 % of that percentile);
5. sample `n_slices` axial planes at a fixed physical spacing (mm) centred on the foreground's centre of mass,
   each over a square field of view (the larger of the in-plane box sides, plus a margin) resampled to
   size x size by trilinear interpolation.

`plan_volume` computes the geometry and the intensity scale; `apply_plan` samples any array defined on the
same canonical grid (the volume itself, or a ground-truth structure mask) with that geometry.

The sampling grid is axis-aligned in world (scanner) coordinates, so a slab of slices is itself a regular 3D
image: `slab_to_volume` lays it out as a RAS voxel array and `slab_affine` gives the affine that puts every
voxel at the world position `sample_grid` sampled (simulate.py writes the slabs as NIfTI with it, so they
overlay the original scan); `to_native` undoes `normalise` (up to its clipping at the scale).
"""
import numpy as np
import nibabel as nib
from nibabel import orientations
from scipy import ndimage

PERCENTILE = 99.5
FOREGROUND = 0.05
MARGIN = 1.04


class BadVolume(ValueError):
    """A volume that cannot be used; the message says why."""


def load_canonical(path):
    """Load a 3D volume reoriented to RAS: (float32 data, 4x4 affine of the canonical grid)."""
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as e:  # nibabel raises many kinds for a corrupt header
        raise BadVolume(f"unreadable ({type(e).__name__}: {e})") from e
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BadVolume(f"not a 3D volume (shape {img.shape}); only a singleton 4th axis is accepted")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as e:
        raise BadVolume(f"unreadable data ({type(e).__name__}: {e})") from e
    if not np.isfinite(data).all():
        raise BadVolume("contains NaN or infinite values")
    affine = img.affine
    ornt = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(ornt, orientations.axcodes2ornt("RAS"))
    data = orientations.apply_orientation(data, transform)
    affine = affine @ orientations.inv_ornt_aff(transform, shape)
    return np.ascontiguousarray(data), affine


def intensity_scale(data):
    """The value mapped to +1: the 99.5th percentile of the positive voxels."""
    positive = data[data > 0]
    if positive.size == 0:
        raise BadVolume("empty volume (no positive voxels)")
    return float(np.percentile(positive, PERCENTILE))


def plan_volume(data, affine, n_slices, spacing_mm):
    """Geometry and intensity scale of one canonical volume (JSON-serialisable)."""
    scale = intensity_scale(data)
    fg = data > FOREGROUND * scale
    if not fg.any():
        raise BadVolume("empty volume (no foreground)")
    idx = np.nonzero(fg)
    lo = np.array([i.min() for i in idx], np.float64)
    hi = np.array([i.max() for i in idx], np.float64)
    com_z = float(np.mean(idx[2]))
    corner_lo = affine[:3, :3] @ lo + affine[:3, 3]
    corner_hi = affine[:3, :3] @ hi + affine[:3, 3]
    centre = (corner_lo + corner_hi) / 2
    centre[2] = (affine[:3, :3] @ np.array([0, 0, com_z]) + affine[:3, 3])[2]
    side = float(max(abs(corner_hi[0] - corner_lo[0]), abs(corner_hi[1] - corner_lo[1])) * MARGIN)
    offsets = (np.arange(n_slices) - (n_slices - 1) / 2) * spacing_mm
    return {"scale": scale, "centre": centre.tolist(), "side_mm": side,
            "z_mm": (centre[2] + offsets).tolist(), "affine": np.asarray(affine).tolist()}


def sample_grid(plan, size):
    """World coordinates (3, n_slices, size, size) of every output pixel; rows run anterior->posterior."""
    cx, cy, _ = plan["centre"]
    half = plan["side_mm"] / 2
    step = plan["side_mm"] / size
    xs = cx - half + step * (np.arange(size) + 0.5)          # left -> right (columns)
    ys = cy + half - step * (np.arange(size) + 0.5)          # anterior at the top (rows)
    zs = np.asarray(plan["z_mm"])
    z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
    return np.stack([x, y, z])


def apply_plan(array, plan, size, order=1):
    """Sample a canonical-grid array with the plan's geometry -> (n_slices, size, size) float32."""
    world = sample_grid(plan, size).reshape(3, -1)
    inv = np.linalg.inv(np.asarray(plan["affine"]))
    vox = inv[:3, :3] @ world + inv[:3, 3:4]
    out = ndimage.map_coordinates(np.asarray(array, np.float32), vox, order=order, mode="constant", cval=0.0)
    return out.reshape(len(plan["z_mm"]), size, size)


def normalise(samples, plan):
    """Raw sampled intensities -> [-1, 1] with the plan's scale."""
    return np.clip(samples / plan["scale"], 0.0, 1.0) * 2.0 - 1.0


def volume_to_slices(data, affine, size=128, n_slices=32, spacing_mm=2.0):
    """Canonical volume -> (slices float32 (n_slices, size, size) in [-1, 1], plan)."""
    data = np.maximum(data, 0)
    plan = plan_volume(data, affine, n_slices, spacing_mm)
    return normalise(apply_plan(data, plan, size), plan), plan


def process_file(path, size=128, n_slices=32, spacing_mm=2.0):
    """Path -> (slices, plan); raises BadVolume with the reason."""
    data, affine = load_canonical(path)
    return volume_to_slices(data, affine, size, n_slices, spacing_mm)


def slab_to_volume(slices):
    """(n_slices, size, size) slab -> (size, size, n_slices) RAS voxel array: i = column (left -> right),
    j = row reversed (posterior -> anterior), k = slice (inferior -> superior). `slab_affine` is its affine."""
    return np.ascontiguousarray(np.transpose(np.asarray(slices), (2, 1, 0))[:, ::-1, :])


def volume_to_slab(volume):
    """The inverse of `slab_to_volume`."""
    return np.ascontiguousarray(np.transpose(np.asarray(volume)[:, ::-1, :], (2, 1, 0)))


def slab_affine(plan, size, spacing_mm=None):
    """4x4 voxel -> world affine of `slab_to_volume(apply_plan(..., plan, size))`: voxel (i, j, k) lies at the
    world coordinates `sample_grid(plan, size)[:, k, size - 1 - j, i]`. `spacing_mm` is only needed for a
    single-slice plan (whose z step is otherwise undefined; default: the in-plane pixel size)."""
    step = plan["side_mm"] / size
    cx, cy, _ = plan["centre"]
    z = np.asarray(plan["z_mm"], np.float64)
    dz = float(z[1] - z[0]) if len(z) > 1 else float(spacing_mm or step)
    affine = np.diag([step, step, dz, 1.0])
    affine[:3, 3] = [cx - plan["side_mm"] / 2 + step / 2, cy - plan["side_mm"] / 2 + step / 2, z[0]]
    return affine


def to_native(slices, plan):
    """[-1, 1] slices -> the input's intensity units with the plan's scale (the inverse of `normalise`; values
    the scan had above the scale were clipped to it)."""
    return (np.asarray(slices, np.float32) + 1.0) / 2.0 * np.float32(plan["scale"])
