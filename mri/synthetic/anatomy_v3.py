"""Anatomy version 3 (see mri/synthetic/__init__.py): version 2's atrophy model, contrast, pose and masks, with
a white-matter core under a cortex whose sulci start at the surface and run inward to realistic depths, deep grey
nuclei with an internal capsule between them, a lower cerebrum shaped so that the lowest slices cut temporal lobes,
brainstem and cerebellum apart, and smoother outlines.

The cerebral hull is a superellipsoid: below its centre the exponent LOWER_POWER makes it boxy (broad down to a
flat base, as real temporal and frontal lobes are), above it UPPER_POWER makes a dome that tapers to the vertex,
with the cerebellum tucked under the occipital lobe. So the brain's mass sits where a real brain's does: a slab
centred on the centre of mass has its widest section at 0.42 of its height (real brains: 0.39-0.42; the
ellipsoidal hull: 0.62, the slab cutting 12 mm lower anatomy) and an area-by-slice profile 0.018 from the real
brains' (theirs 0.013 apart; the ellipsoidal hull 0.12; tools/realism.py's `area_profile`)."""
import numpy as np

from mri.synthetic.anatomy import _BRAIN_CENTRE, _AnatomyV2, _ellipsoid, _smin, _wave_field, _waves

LOWER_POWER = 5.0  # superellipsoid exponent of the cerebral hull below its centre (2: an ellipsoid)
UPPER_POWER = 1.8  # and above it

# label intensities (LABELS order): version 2's, with cortical / deep GM and hippocampus 0.01-0.02 brighter (class
# contrast WM-GM measured against the real references once the white-matter core is solid)
INTENSITY_V3 = np.array([0.0, 0.33, 0.80, 1.0, 0.83, 0.80, 0.33, 0.33, 0.81, 0.88], np.float32)

SULCAL_WAVELENGTH = 17.0  # of the surface pattern (mm)
SULCAL_DEPTH = 20.0  # mean depth below the smooth hull (mm; x 0.6-1.4 by a slow field)
SULCAL_LEAN = 0.3  # sideways drift of a sulcus per mm of depth (a slow random direction field)
SULCAL_HALF_WIDTH = 0.1  # CSF slit at age 50, as version 2
# (y, lower half height) of the cerebral ellipsoid below its centre: the orbital frontal lobe reaches lowest, the
# occipital lobe rests on the tentorium above the cerebellum; the temporal lobes hang below on each side
_LOWER = ((-100.0, 28.0), (-45.0, 28.0), (-15.0, 37.0), (12.0, 40.0), (40.0, 44.0), (100.0, 44.0))
# deep grey nuclei: (centre, half axes) of ellipsoids, right side (mirrored); the internal capsule is the white
# matter left between the caudate / thalamus and the putamen (4-5 mm)
_DEEP_GM = [((10, -18, 6), (7.5, 14, 8.5)),  # thalamus
            ((12, 13, 9), (4.5, 9, 9)),  # caudate head
            ((14, -6, 19), (3.5, 14, 4)),  # caudate body, along the ventricle's roof
            ((26, 3, 1), (5.0, 15, 9.5))]  # putamen


def _superellipsoid(p, centre, axes, power):
    """Radial distance (mm, negative inside) to the surface (rho_h^power + |dz / c|^power)^(1 / power) = 1, rho_h the
    horizontal ellipse radius ((dx / a)^2 + (dy / b)^2)^(1/2); power 2 is _ellipsoid, larger is boxier in z."""
    d = [p[i] - centre[i] for i in range(3)]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2 + 1e-6)
    horizontal = (d[0] / axes[0]) ** 2 + (d[1] / axes[1]) ** 2
    rho = (horizontal ** (power / 2) + np.abs(d[2] / axes[2]) ** power + 1e-12) ** (1 / power)
    return r - r / np.maximum(rho, 1e-4)


class _AnatomyV3(_AnatomyV2):
    """Version 3 of the anatomy (see the module docstring)."""
    version = 3
    intensity = INTENSITY_V3
    hull_margin = (0.0, 0.0)
    height = 1.1
    heights = (70.0, 46.0)  # upper half height (the lower one: _LOWER)
    cerebellum = ((0, -60, -32), (48, 30, 22))  # centre and half axes (template mm)
    hull_blend = 3.0

    def _cerebrum(self, p):
        x, y, z = p
        yn = np.clip(-(y - _BRAIN_CENTRE[1]) / 85.0, -1, 1)
        below = np.interp(y.ravel(), *zip(*_LOWER)).reshape(np.shape(y)).astype(np.float32)
        upper = z > _BRAIN_CENTRE[2]
        axes = (68.0 * (1 + 0.05 * yn), 85.0, np.where(upper, self.heights[0], below))
        main = _superellipsoid(p, _BRAIN_CENTRE, axes, np.where(upper, UPPER_POWER, LOWER_POWER))
        temporal = np.minimum(_ellipsoid(p, (40, -24, -12), (24, 54, 20)), _ellipsoid(p, (-40, -24, -12), (24, 54, 20)))
        return _smin(main, temporal, 4.0)

    def _deep_gm(self, p):
        return np.minimum.reduce([_ellipsoid(p, (sx * c[0], c[1], c[2]), axes) for c, axes in _DEEP_GM
                                  for sx in (1, -1)])

    def _sulci(self, rng, p, depth_in):
        """Sulcal slabs (half-width SULCAL_HALF_WIDTH) around sheets that stand on the brain surface: a random
        band-limited field (SULCAL_WAVELENGTH) is read at each point's foot on the smooth hull (the point moved
        out along the hull's normal by its depth), shifted sideways by SULCAL_LEAN per mm of depth, so a sheet runs
        inward from a line on the surface, leaning and bending; it ends SULCAL_DEPTH (x 0.6-1.4) below the hull."""
        shell = np.flatnonzero(depth_in < 40.0)
        q = [c[shell] for c in p]
        d = depth_in[shell]
        inward = self._gradient(depth_in, shell)
        norm = np.sqrt(sum(g ** 2 for g in inward)) + 1e-6
        drift = [_wave_field(q, _waves(rng, 6, 70.0)) for _ in range(3)]
        foot = [q[i] - d * inward[i] / norm + SULCAL_LEAN * d * drift[i] for i in range(3)]
        field = _wave_field(foot, _waves(rng, 48, SULCAL_WAVELENGTH * rng.uniform(0.93, 1.07)))
        grad = np.sqrt(sum(g ** 2 for g in self._gradient(np.zeros(self.n, np.float32), shell, field))) + 1e-6
        depth = SULCAL_DEPTH * (1.0 + 0.3 * _wave_field(q, _waves(rng, 8, 80.0))).clip(0.6, 1.4)
        sheet = np.maximum(np.abs(field) / grad - SULCAL_HALF_WIDTH, d - depth)
        sheet[d > 36.0] = np.inf  # the field's gradient is wrong at the shell's edge
        out = np.full(self.n, np.inf, np.float32)
        out[shell] = sheet
        basal = -_ellipsoid(p, (0, -10, 8), (30, 44, 22))  # no sulci into the basal ganglia and ventricles
        return np.maximum(out, basal)
