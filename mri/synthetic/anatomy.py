"""A subject's anatomy: implicit surfaces in a template frame, subject identity (pose, warp, gyral
pattern, sizes), and the label volume at any age and disease time (versions 1 and 2; version 3 in
anatomy_v3.py)."""
import functools
import math

import numpy as np

from mri.synthetic.clock import REF_AGE, log_change

VOXEL_MM = 1.5
SHAPE = (112, 136, 112)

LABELS = ("background", "csf", "gm", "wm", "deep_gm", "hippocampus", "ventricle", "third_ventricle", "wmh",
          "brainstem")  # brainstem: version 2 only (WM in version 1)
INTENSITY = np.array([0.0, 0.30, 0.77, 1.0, 0.80, 0.78, 0.30, 0.30, 0.80], np.float32)
INTENSITY_V2 = np.array([0.0, 0.33, 0.79, 1.0, 0.81, 0.79, 0.33, 0.33, 0.81, 0.88], np.float32)
SULCAL_WAVELENGTH = 20.0  # version 2 folding (mm; see the module docstring): of the sulcal field,
SULCAL_DEPTH = 30.0  # mean depth below the smooth hull (x 0.5-1.5 by a slow field),
SULCAL_HALF_WIDTH = 0.1  # CSF slit at age 50,
SULCAL_MAX_COS = 0.75  # largest |cos| between sheet and surface normals (sheet leaning < ~50 degrees),
SULCAL_GATE_MM = 15.0  # over which a sheet fades beyond it
BRAIN_LABELS = (2, 3, 4, 5, 8, 9)
NOISE_SIGMA = 0.025
BLUR_VOXELS = 0.8
STORAGE_SLOPE = 2.0 ** -10  # int16 step of the stored volumes (exact in float32)
VERSIONS = (1, 2, 3)  # anatomy generations (see the module docstring); a cohort records its own
DEFAULT_VERSION = 2  # what a new cohort gets unless asked otherwise (version 1: the cohort before realism work)


_BRAIN_CENTRE = np.array([0.0, -17.0, 18.0], np.float32)  # template (MNI-like) point placed at _WORLD_CENTRE
_WORLD_CENTRE = np.array([0.0, 0.0, 3.0], np.float32)
# Polylines (x, y, z, radius) in template mm for the right hemisphere; mirrored for the left.
_VENTRICLE = [(6, 30, 12, 5.0), (9, 18, 16, 6.2), (11, 4, 19, 6.0), (13, -10, 21, 5.6), (17, -25, 20, 6.2),
              (24, -37, 14, 7.5), (30, -40, 4, 6.8), (34, -33, -5, 4.4), (35, -22, -12, 3.2), (33, -10, -17, 2.5)]
_OCCIPITAL_HORN = [(24, -37, 14, 6.2), (22, -52, 10, 4.4), (19, -62, 8, 2.5)]
_HIPPOCAMPUS = [(26, -8, -20, 6.5), (28, -18, -15, 6.2), (28, -28, -10, 5.4), (24, -36, -3, 4.2), (19, -40, 3, 3.0)]
_BRAINSTEM = [(0, -20, 2, 11.0), (0, -28, -25, 12.0), (0, -36, -55, 10.0), (0, -38, -72, 9.0)]
_DEEP_GM = [((11, -18, 6), (8, 14, 9)),  # thalamus: (centre, half axes) of ellipsoids
            ((14, 12, 10), (5, 9, 9)),  # caudate head
            ((25, 3, 2), (5, 14, 9))]  # putamen
_THIRD_VENTRICLE = ((-14.0, 2.0), (13.0, 9.0))  # (y, z) centre and half axes of the midline slit


def affine():
    """Voxel -> world (mm, RAS) with the world origin at the grid centre."""
    a = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    a[:3, 3] = -VOXEL_MM * (np.array(SHAPE) - 1) / 2.0
    return a



def _check_version(version):
    """The anatomy version as an int, or ValueError."""
    if int(version) not in VERSIONS:
        raise ValueError(f"unknown synthetic cohort version {version!r}; expected one of {VERSIONS}")
    return int(version)



# ---------------------------------------------------------------- implicit shapes (template mm)

def _smin(a, b, k):
    """Smooth minimum (union of two distance-like fields, blended over ~k mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _ellipsoid(p, centre, axes):
    """Radial distance (mm, negative inside) to an ellipsoid; axes may be arrays over points."""
    d = [p[i] - centre[i] for i in range(3)]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2 + 1e-6)
    rho = np.sqrt((d[0] / axes[0]) ** 2 + (d[1] / axes[1]) ** 2 + (d[2] / axes[2]) ** 2 + 1e-8)
    return r - r / rho


def _tube(p, nodes, metric=(1.0, 1.0, 1.0)):
    """Normalised distance (distance / local radius) to a polyline with linearly varying radius."""
    nodes = np.asarray(nodes, np.float32)
    best = np.full(p[0].shape, np.inf, np.float32)
    for a, b in zip(nodes[:-1], nodes[1:]):
        ab = b[:3] - a[:3]
        t = np.clip(sum((p[i] - a[i]) * ab[i] for i in range(3)) / float(ab @ ab), 0.0, 1.0)
        d2 = sum(((p[i] - a[i] - t * ab[i]) * metric[i]) ** 2 for i in range(3))
        np.minimum(best, np.sqrt(d2) / (a[3] + t * (b[3] - a[3])), out=best)
    return best


def _bilateral(p, tubes, sizes):
    """Normalised distance to mirrored pairs of tubes ((nodes, metric), ...), right side scaled by
    sizes[0] and left by sizes[1]."""
    out = np.full(p[0].shape, np.inf, np.float32)
    for sign, size in zip((1, -1), sizes):
        for nodes, metric in tubes:
            mirrored = np.asarray(nodes, np.float32) * np.array([sign, 1, 1, 1], np.float32)
            np.minimum(out, _tube(p, mirrored, metric) / size, out=out)
    return out


def _cerebrum(p, heights=(64.0, 40.0)):
    """Cerebral hull without sulci: egg-shaped ellipsoid (half heights above and below its centre; flatter
    below) joined with two temporal lobes."""
    x, y, z = p
    yn = np.clip(-(y - _BRAIN_CENTRE[1]) / 85.0, -1, 1)
    axes = (68.0 * (1 + 0.05 * yn), 85.0, np.where(z > _BRAIN_CENTRE[2], *heights))
    main = _ellipsoid(p, _BRAIN_CENTRE, axes)
    temporal = np.minimum(_ellipsoid(p, (42, -12, -18), (24, 44, 22)), _ellipsoid(p, (-42, -12, -18), (24, 44, 22)))
    return _smin(main, temporal, 4.0)


def _cerebellum(p, shape=((0, -58, -38), (46, 30, 19))):
    """Radial distance to the cerebellar hull (no folia): an ellipsoid (centre, half axes)."""
    return _ellipsoid(p, *shape)


def _brainstem(p):
    """Approximate distance (mm) to the brainstem tube."""
    return (_tube(p, _BRAINSTEM) - 1.0) * 10.0


def _deep_gm(p):
    """Signed field of the thalami, caudate heads and putamina (negative inside)."""
    return np.minimum.reduce([_ellipsoid(p, (sx * c[0], c[1], c[2]), axes) for c, axes in _DEEP_GM for sx in (1, -1)])


def _waves(rng, n, wavelength):
    """Random plane waves (unit-variance sum) as (directions * wavenumber, phases)."""
    v = rng.normal(size=(n, 3))
    k = v / np.linalg.norm(v, axis=1, keepdims=True) * (2 * np.pi / wavelength) * rng.uniform(0.85, 1.15, (n, 1))
    return k.astype(np.float32), rng.uniform(0, 2 * np.pi, n).astype(np.float32)


def _wave_field(s, waves):
    """Sum of the plane waves at points s, unit variance."""
    k, phase = waves
    out = np.zeros(s[0].shape, np.float32)
    for (kx, ky, kz), ph in zip(k, phase):
        out += np.cos(kx * s[0] + ky * s[1] + kz * s[2] + ph)
    return out * np.float32(np.sqrt(2.0 / len(phase)))


def _spline_field(coeffs, spacing):
    """Cubic B-spline field (control points `spacing` voxels apart, unit variance for unit coefficients)
    on the coarse grid (every second voxel of SHAPE plus one past the end; see _upsample)."""
    basis = []
    for n in SHAPE:
        t = np.arange(0, n + 1, 2)[:, None] / spacing - (np.arange(int(np.ceil(n / spacing)) + 3) - 1)
        u = np.abs(t)
        w = np.where(u < 1, 2 / 3 - u ** 2 + u ** 3 / 2, np.where(u < 2, (2 - u) ** 3 / 6, 0.0))
        basis.append((w / math.sqrt(151 / 315)).astype(np.float32))  # 151/315 = integral of B3^2
    bx, by, bz = basis  # separable contraction; plain einsum (no BLAS threads in the worker processes)
    return np.einsum("ia,ajk->ijk", bx, np.einsum("jb,abk->ajk", by, np.einsum("kc,abc->abk", bz, coeffs)))


def _spline_coeffs(rng, spacing):
    """Random control-point values for _spline_field."""
    return rng.standard_normal([int(np.ceil(n / spacing)) + 3 for n in SHAPE]).astype(np.float32)


def _upsample(c):
    """Linear interpolation from every second voxel (one sample past the end) to SHAPE."""
    for axis in range(3):
        c = np.moveaxis(c, axis, 0)
        out = np.empty((2 * c.shape[0] - 1,) + c.shape[1:], np.float32)
        out[0::2] = c
        out[1::2] = 0.5 * (c[:-1] + c[1:])
        c = np.moveaxis(out, 0, axis)
    return c[:SHAPE[0], :SHAPE[1], :SHAPE[2]]


def _symmetric(warp, asymmetry=0.3):
    """A coarse-grid displacement field (x, y, z components) made nearly mirror-symmetric about the grid's
    midline x = 0 (x component odd, y and z even), keeping `asymmetry` of its antisymmetric part."""
    def mirror(c):  # c at coarse voxel 2j is read at the mirror voxel SHAPE[0] - 1 - 2j (between samples)
        f = np.flip(c, 0)
        return np.concatenate([0.5 * (f[1:] + f[:-1]), f[-1:]], 0)
    out = []
    for axis, c in enumerate(warp):
        m = -mirror(c) if axis == 0 else mirror(c)
        out.append((0.5 * (1 + asymmetry) * c + 0.5 * (1 - asymmetry) * m).astype(np.float32))
    return out


def _rotation(ax, ay, az):
    """3x3 rotation by angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# ---------------------------------------------------------------- subject anatomy

class _Anatomy:
    """A subject's template: level-set fields on the voxels inside its inner-skull hull (computed once).

    Smooth fields are evaluated on every second voxel and interpolated; sulci and thin structures are
    evaluated at full resolution only where needed.
    """

    version = 1
    intensity = INTENSITY
    bias = 0.04  # amplitude (sd of the log) of the multiplicative bias field
    angle_sd = (0.06, 0.04, 0.04)  # pose: pitch (about x), roll (y), yaw (z), radians
    shift_sd = (1.5, 2.0, 2.0)  # pose: world shift of the brain, mm
    mirror_warp = False  # hemispheres deformed independently
    hull_blend = 6.0  # mm over which the inner-skull hull joins cerebrum, cerebellum and brainstem (CSF between)
    height = 1.0  # world height of the brain over its template height (the template's z axis stretched)
    warp = (3.0, 14.0)  # smooth deformation: sd of each component (mm), control-point spacing (voxels)
    hull_margin = (2.0, 3.5)  # range of the subarachnoid CSF width outside the smooth brain hull, mm
    ribbon = (2.6, 3.0)  # range of the cortical ribbon thickness at age 50, mm
    folia = (0.5, 8.0)  # half-width of the CSF between cerebellar folia, depth of the folia (mm)
    cerebellum = ((0, -58, -38), (46, 30, 19))  # centre and half axes (template mm)
    heights = (64.0, 40.0)  # of the cerebral ellipsoid above and below its centre (template mm)
    fissure = 1.0  # half-width of the interhemispheric fissure (mm)

    def __init__(self, subject_seed):
        rng = np.random.default_rng([int(subject_seed), 7])
        lin, shift, warp = self._pose(rng)

        def template(x, w):
            """Template coordinates of world points x (mm, broadcastable per axis) displaced by w."""
            return [lin[i, 0] * x[0] + lin[i, 1] * x[1] + lin[i, 2] * x[2] + _BRAIN_CENTRE[i] - w[i]
                    for i in range(3)]

        g = [(np.arange(0, n + 1, 2, dtype=np.float32) - (n - 1) / 2) * VOXEL_MM - s for n, s in zip(SHAPE, shift)]
        coarse = template([g[0][:, None, None], g[1][None, :, None], g[2][None, None, :]], warp)
        cerebrum, cerebellum = self._cerebrum(coarse), _cerebellum(coarse, self.cerebellum)
        brainstem = _brainstem(coarse)
        k = self.hull_blend
        hull = _smin(_smin(cerebrum, cerebellum, k), brainstem, k)
        self.index = np.flatnonzero(_upsample(hull) < rng.uniform(*self.hull_margin))
        self.n = self.index.size
        x = [((i - (n - 1) / 2) * VOXEL_MM - s).astype(np.float32)
             for i, n, s in zip(np.unravel_index(self.index, SHAPE), SHAPE, shift)]
        p = template(x, [self._fine(w) for w in warp])
        smooth = {name: self._fine(f) for name, f in (("cerebrum", cerebrum), ("cerebellum", cerebellum),
                                                      ("brainstem", brainstem), ("deep_gm", self._deep_gm(coarse)))}
        self.pial, self.no_ribbon = self._pial_field(rng, p, smooth)
        self.thickness = rng.uniform(*self.ribbon)
        self._deep_structures(rng, p, coarse, smooth["deep_gm"] < 0)

    def _cerebrum(self, p):
        """Signed field of the cerebral hull without sulci (negative inside)."""
        return _cerebrum(p, self.heights)

    def _deep_gm(self, p):
        """Signed field of the deep grey nuclei (negative inside)."""
        return _deep_gm(p)

    def _pose(self, rng):
        """(world -> template linear map, world shift, ~3 mm smooth warp on the coarse grid) of a subject."""
        scale = np.exp(rng.normal(-0.05, 0.04) + rng.normal(0, 0.025, 3)).clip(0.86, 1.03)
        angles = rng.normal(0, self.angle_sd)
        lin = (_rotation(*angles) / scale[:, None]).astype(np.float32)  # world -> template (no warp)
        if self.height != 1.0:
            lin[2] /= np.float32(self.height)
        shift = _WORLD_CENTRE + rng.normal(0, self.shift_sd).astype(np.float32)
        mm, spacing = self.warp
        warp = [np.float32(mm) * _spline_field(_spline_coeffs(rng, spacing), spacing) for _ in range(3)]
        return lin, shift, _symmetric(warp) if self.mirror_warp else warp

    def _fine(self, coarse_field):
        """A field on every second voxel, interpolated at the hull voxels."""
        return np.ascontiguousarray(_upsample(coarse_field)).ravel()[self.index]

    def _pial_field(self, rng, p, smooth):
        """Signed distance (mm, negative inside tissue) to the nearest CSF: the outer surface or a sulcal
        slit (`_sulci`), a fissure or between cerebellar folia; plus the flag of brainstem voxels (no cortical
        ribbon)."""
        x, y, z = p
        depth_in = -smooth["cerebrum"]
        sulci = self._sulci(rng, p, depth_in)

        dy, dz = y + 4.0, z - 6.0  # the interhemispheric fissure stops at the corpus callosum
        r = np.sqrt(dy ** 2 + dz ** 2) + 1e-6
        callosum = r - r / (np.sqrt((dy / 38) ** 2 + (dz / 22) ** 2) + 1e-6)
        fissure = np.maximum(np.abs(x) - self.fissure, -callosum)
        sylvian_z = 4.0 - 0.28 * (y + 10.0) + rng.normal(0, 2.0)
        lateral = np.maximum(y - 22.0, -45.0 - y)
        sylvian = np.minimum(np.maximum.reduce([np.abs(z - sylvian_z) / 1.04 - 0.8, 38.0 - np.abs(x), lateral]),
                             np.maximum.reduce([np.abs(np.abs(x) - 38.0) - 0.8, np.abs(z - sylvian_z) - 12.0,
                                                lateral + 6.0]))  # + the cleft over the insula
        cerebrum = -np.minimum.reduce([depth_in, sulci, fissure, sylvian])

        cb_depth = -smooth["cerebellum"]
        u = (np.sqrt(x ** 2 + (y + 30) ** 2 + (z + 15) ** 2) + rng.uniform(0, 6.5)) % 6.5
        folia = np.maximum(np.minimum(u, 6.5 - u) - self.folia[0], cb_depth - self.folia[1])
        cerebellum = -np.minimum(cb_depth, folia)
        pial = np.minimum.reduce([cerebrum, cerebellum, smooth["brainstem"]])
        return pial.astype(np.float32), smooth["brainstem"] <= pial

    def _sulci(self, rng, p, depth_in):
        """Distance-like field (mm, negative inside) of the sulcal slabs. Each sulcus is a slab of half-width
        0.5 mm around the zero sheet of a random field, down to a random depth, so tissue lines its walls."""
        d = [p[i] - _BRAIN_CENTRE[i] for i in range(3)]
        rho = np.sqrt((d[0] / 68) ** 2 + (d[1] / 85) ** 2 + (d[2] / 52) ** 2) + 1e-6
        shell = np.flatnonzero(depth_in < 40.0)
        # mostly radial projection onto the ellipsoid, so sulci are sheets roughly normal to the surface
        ss = [(0.7 * c / rho + 0.3 * c)[shell] for c in d]
        field = _wave_field(ss, _waves(rng, 32, rng.uniform(16.0, 19.0)))
        grad = np.sqrt(sum(g ** 2 for g in self._gradient(np.zeros(self.n, np.float32), shell, field)))
        to_sheet = np.full(self.n, np.inf, np.float32)
        to_sheet[shell] = np.abs(field) / (grad + 1e-6)
        to_sheet[depth_in > 36.0] = np.inf  # the field's gradient is wrong at the shell's edge
        sulcus_depth = np.zeros(self.n, np.float32)
        sulcus_depth[shell] = 14.0 * (1.0 + 0.25 * _wave_field(ss, _waves(rng, 8, 80.0))).clip(0.5, 1.6)
        basal = -_ellipsoid(p, (0, -12, 6), (34, 48, 26))  # no sulci into the basal ganglia and ventricles
        return np.maximum.reduce([to_sheet - 0.5, depth_in - sulcus_depth, basal])

    def _gradient(self, values, shell, shell_values=None):
        """Gradient (3 arrays over the shell voxels, per mm of world space) of a field on the hull voxels,
        its shell part replaced by shell_values if given."""
        grid = np.zeros(SHAPE, np.float32)
        grid.flat[self.index] = values
        if shell_values is not None:
            grid.flat[self.index[shell]] = shell_values
        return [g.ravel()[self.index[shell]] for g in np.gradient(grid, VOXEL_MM)]

    def _deep_structures(self, rng, p, coarse, deep):
        """Ventricles, hippocampi, third ventricle, deep GM, WM-lesion field and the protected core."""
        x = p[0]
        ventricle = ((_VENTRICLE, (1.0, 1.0, 1.4)), (_OCCIPITAL_HORN, (1.0, 1.0, 1.3)))
        v_size = np.exp(rng.normal(0, 0.15)).clip(0.75, 1.35) * np.exp(rng.normal(0, 0.06, 2))
        h_size = np.exp(rng.normal(0, 0.05)).clip(0.9, 1.1) * np.exp(rng.normal(0, 0.04, 2))
        # coarse pass (inside a box that holds every envelope) to find the voxels worth a fine evaluation
        box = np.flatnonzero((np.abs(coarse[0]) < 58) & (np.abs(coarse[1] + 16) < 68) & (np.abs(coarse[2]) < 45))
        in_box = [c.ravel()[box] for c in coarse]
        fields = []
        for tubes, size, reach in ((ventricle, v_size, 3.6), (((_HIPPOCAMPUS, (1.0, 1.0, 1.3)),), h_size, 2.1)):
            rough = np.full(coarse[0].shape, np.inf, np.float32)
            rough.flat[box] = _bilateral(in_box, tubes, size)
            near = np.flatnonzero(self._fine(rough) < reach)
            f = np.full(self.n, np.inf, np.float32)
            f[near] = _bilateral([c[near] for c in p], tubes, size)
            fields.append(f)
        vent, hip = fields

        self.hip_env = hip < 1.0
        self.hip_order = np.flatnonzero(self.hip_env)[np.argsort(hip[self.hip_env], kind="stable")]
        self.hip0 = self.hip_order.size

        (yc, zc), (ya, za) = _THIRD_VENTRICLE
        q = 1.0 - ((p[1] - yc) / ya) ** 2 - ((p[2] - zc) / za) ** 2
        self.t3_width = 1.3
        t3 = np.where(q > 0, np.abs(x) / np.sqrt(np.maximum(q, 1e-6)), np.inf).astype(np.float32)
        self.t3_env = (t3 < self.t3_width * 2.5) & ~self.hip_env
        self.t3 = np.where(self.t3_env, t3, np.inf).astype(np.float32)

        vent_ok = (vent < 2.5) & ~self.hip_env & ~self.t3_env & (np.abs(x) > 0.7)  # room to grow ~6x
        self.vent_order = np.flatnonzero(vent_ok)[np.argsort(vent[vent_ok], kind="stable")]
        self.vent0 = int(np.count_nonzero(vent[vent_ok] < 1.0))

        self.deep = deep
        self.core = self.hip_env | self.t3_env | vent_ok | deep
        # Tissue deeper than 12 mm below the pial surface is never reached by atrophy: like the core, it
        # always stays brain; only the shallower voxels are ordered for the surface to move through.
        shallow = np.flatnonzero(~self.core & (self.pial > -12.0))
        self.pial_order = shallow[np.argsort(self.pial[shallow], kind="stable")]
        self.always = self.n - self.pial_order.size  # core + deep tissue + nothing else
        self.brain0 = (self.always + int(np.count_nonzero(self.pial[shallow] < 0)) - self.vent0
                       - int(np.count_nonzero(self.t3 < self.t3_width)))
        lesion = self._fine(_spline_field(_spline_coeffs(rng, 6.0), 6.0))
        self.lesion = (lesion + rng.normal(0, 0.3) - 1.5 * (vent - 1.0)).astype(np.float32)

    def labels(self, age, tau):
        """Label codes (see LABELS) on the hull voxels at (age, tau)."""
        age = max(float(age), REF_AGE)
        n_v = min(round(self.vent0 * math.exp(log_change("ventricles", age, tau))), self.vent_order.size)
        n_h = min(round(self.hip0 * math.exp(log_change("hippocampus", age, tau))), self.hip0)
        t3 = self.t3 < self.t3_width * min(math.sqrt(n_v / self.vent0), 2.5)
        brain_always = self.always - n_v - int(np.count_nonzero(t3)) - (self.hip0 - n_h)
        n_p = round(self.brain0 * math.exp(log_change("brain", age, tau))) - brain_always
        n_p = int(np.clip(n_p, 1, self.pial_order.size))

        lab = np.full(self.n, 3, np.int8)  # WM unless claimed below
        lab[self.pial_order[n_p:]] = 1  # CSF beyond the pial surface
        cortex = self.pial_order[:n_p]
        thickness = self.thickness * math.exp(log_change("brain", age, tau))
        ribbon = (self.pial[cortex] > self.pial[cortex[-1]] - thickness) & ~self.no_ribbon[cortex]
        lab[cortex[ribbon]] = 2
        lab[self.deep] = 4
        lab[(lab == 3) & (self.lesion > 3.0 - 0.055 * (age - REF_AGE))] = 8
        lab[self.hip_env] = 1  # the part of the hippocampus lost to atrophy becomes CSF
        lab[self.hip_order[:n_h]] = 5
        lab[self.vent_order[:n_v]] = 6
        lab[t3] = 7
        return lab


class _AnatomyV2(_Anatomy):
    """Version 2 of the anatomy (see the module docstring): folded cortex, T1 contrast and pose."""
    version = 2
    intensity = INTENSITY_V2
    bias = 0.015
    angle_sd = (0.03, 0.012, 0.012)
    shift_sd = (0.0, 2.0, 2.0)  # the warp's mirror plane stays the grid's midline
    mirror_warp = True
    hull_margin = (0.0, 0.5)
    ribbon = (3.2, 3.6)
    folia = (0.2, 14.0)
    cerebellum = ((0, -62, -36), (50, 33, 27))
    heights = (60.0, 46.0)
    fissure = 0.5

    def labels(self, age, tau):
        """Version 1's labels with the brainstem's white matter as its own label (a darker T1 level)."""
        lab = super().labels(age, tau)
        lab[(lab == 3) & self.no_ribbon] = 9
        return lab

    def _sulci(self, rng, p, depth_in):
        """Sulcal slabs (half-width SULCAL_HALF_WIDTH) around the zero sheets of an isotropic band-limited
        field in template space (SULCAL_WAVELENGTH; sheets meander and branch), kept where they stand roughly
        normal to the brain surface (|cos| of the two normals < SULCAL_MAX_COS, fading over SULCAL_GATE_MM),
        down to a random depth around SULCAL_DEPTH below the smooth hull (deeper at the base, shallower at the
        vertex)."""
        shell = np.flatnonzero(depth_in < 40.0)
        q = [c[shell] for c in p]
        field = _wave_field(q, _waves(rng, 48, SULCAL_WAVELENGTH * rng.uniform(0.93, 1.07)))
        grads = [self._gradient(depth_in, shell), self._gradient(np.zeros(self.n, np.float32), shell, field)]
        norms = [np.sqrt(sum(g ** 2 for g in v)) + 1e-6 for v in grads]
        cos = np.abs(sum(a * b for a, b in zip(*grads))) / (norms[0] * norms[1])
        depth = SULCAL_DEPTH * (1.0 + 0.25 * _wave_field(q, _waves(rng, 8, 80.0))).clip(0.5, 1.5)
        depth *= 1.0 - 0.3 * np.clip((q[2] - _BRAIN_CENTRE[2]) / 60.0, -1.0, 1.0)
        sheet = np.maximum.reduce([np.abs(field) / norms[1] - SULCAL_HALF_WIDTH,
                                   SULCAL_GATE_MM * (cos - SULCAL_MAX_COS), depth_in[shell] - depth])
        sheet[depth_in[shell] > 36.0] = np.inf  # the field's gradient is wrong at the shell's edge
        out = np.full(self.n, np.inf, np.float32)
        out[shell] = sheet
        basal = -_ellipsoid(p, (0, -12, 6), (34, 48, 26))  # no sulci into the basal ganglia and ventricles
        return np.maximum(out, basal)


@functools.lru_cache(maxsize=2)
def _anatomy(subject_seed, version=DEFAULT_VERSION):
    """The subject's template, cached (a worker renders all visits of a subject in a row)."""
    version = _check_version(version)
    if version == 3:
        from mri.synthetic.anatomy_v3 import _AnatomyV3  # a subclass of _AnatomyV2 (imports this module)
        return _AnatomyV3(subject_seed)
    return {1: _Anatomy, 2: _AnatomyV2}[version](subject_seed)


