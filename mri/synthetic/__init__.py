"""Synthetic brain-aging cohort: 3D T1-like phantoms with exact ground-truth atrophy.

Each subject is a skull-stripped 3D brain (1.5 mm voxels, RAS) built from implicit surfaces in an MNI-like
template frame: cerebrum (with temporal lobes), cerebellum and brainstem; a ~2.8 mm cortical grey-matter
ribbon with radial sulci (version 1; folded in version 2, see below), the interhemispheric and Sylvian
fissures, white matter, deep grey nuclei (thalamus, caudate head, putamen), C-shaped lateral ventricles
(frontal/occipital/temporal horns), a third ventricle, two hippocampi and subarachnoid CSF up to a fixed
inner-skull hull. Subject identity = random
size, pose, smooth deformation, gyral pattern, ventricle and hippocampus size, ribbon thickness.

Aging and disease move surfaces, never cross-fade intensities: every structure is a level set whose level
is chosen so that its voxel count is exactly V(age-50 reference) * exp(log change), i.e. ventricles and
hippocampi grow/shrink by normal offsets of their surfaces and the brain shrinks from the pial surface
(sulci and subarachnoid space widen; the hull stays). Lost brain, including lost hippocampus, becomes CSF.
Masks: brain = cortical and deep GM + WM (with lesions) + hippocampi (no CSF of any kind); ventricles =
lateral ventricles (not the third); hippocampus. Annual volume changes (compounding, log-linear in time),
exact to the voxel in the masks (ventricles saturate at ~6x their age-50 volume):

    hippocampus  CN -1.4 %/yr, MCI -3.0 %/yr (literature 2.5-3.7), AD -4.7 %/yr
                 (Barnes et al. 2009, Neurobiol Aging meta-analysis; Jack et al. 2000, Neurology)
    whole brain  CN -0.45 %/yr, MCI -0.7 %/yr, AD -1.0 %/yr   (Fotenos et al. 2005, Neurology)
    ventricles   CN +20 %/decade (= +1.84 %/yr, Kaye et al. 1992), MCI +3.5 %/yr, AD +5 %/yr
    cortex       ribbon thickness shrinks at the whole-brain rate (an assumption, not a fitted value)
    WM lesions   periventricular T1-hypointensities whose extent grows with age (qualitative only)

Disease clock: tau = years since MCI onset (-inf for subjects who never convert); CN for tau < 0, MCI for
0 <= tau < T_MCI (4 years), Dementia after. Atrophy speeds up T_PRE (6) years before MCI onset, while the
subject is still CN (preclinical AD: hippocampal atrophy precedes symptoms). Log volume change = CN rate *
(age - 50) + (MCI - CN rate) * years in preclinical + MCI + (AD - CN rate) * years in Dementia; ages below
50 render as 50. T_PRE is set so that the cross-sectional hippocampal deficit against age-matched CN comes
out near the meta-analytic ~13 % for MCI and ~24 % for AD (Shi et al. 2009, Hum Brain Mapp); without it
the diagnoses differed by a few per cent and no slice classifier could tell them apart.

Contrast (version 1): WM 1.0, cortical GM 0.77 (median ~0.72 after partial volume), deep GM 0.80,
hippocampus 0.78, CSF 0.30, background 0; then a Gaussian partial-volume blur (sigma 0.8 voxel), a smooth
multiplicative bias field (about +-8 %; version 2 +-3 %) and Rician noise (sigma 0.025); bias and noise are
seeded per scan.

Anatomy versions (`VERSIONS`; a cohort records its own in the CSV column `synthetic_version`, and every
renderer takes it, so a store is always re-rendered with the anatomy it was built from). Everything above
holds for both; version 1 is the anatomy described above, kept bit for bit (the first phantom). Version 2,
the default (`DEFAULT_VERSION`) and the cohort of the published results, changes the anatomy and contrast
towards real T1 scans, each change chosen by the realism report (tools/realism.py against two real brains,
the ICBM152 2009a template and Colin27, reference/README.md):

    folding      sulci are the zero sheets of an isotropic band-limited 3D field (wavelength 20 mm; the real
                 references' dominant cortical wavelength is 20-23 mm), so they meander and branch instead of
                 pointing at the centre; kept where the sheet leans less than ~50 degrees from the surface normal,
                 down to 15-36 mm below the smooth hull (or to the envelope of the basal ganglia), 30 % deeper
                 at the base than at the vertex (measured: the GM share by slice position);
                 sulci closed at age 50 (0.2 mm CSF slit: real young sulci are mostly GM against GM) and
                 opened by atrophy. The ribbon lines the sulcal walls, so white matter reaches into the gyri.
    ribbon       3.2-3.6 mm at age 50 (real cortex 2.5-3 mm, Fischl & Dale 2000, PNAS; thicker here so that,
                 after 1.5 mm voxels and partial volume, the GM share of the brain comes out near the real
                 references' ~0.45, the ICBM152 tissue maps' 0.49)
    contrast     cortical GM 0.79, deep GM 0.81, hippocampus 0.79, CSF 0.33, brainstem 0.88 (own label;
                 pons darker than cerebral WM); measured class means after partial volume CSF / GM / WM
                 -0.36 / 0.37 / 0.79 on the [-1, 1] scale against the real references' -0.30 / 0.38 / 0.81
    CSF          0.0-0.5 mm of subarachnoid CSF outside the smooth hull (v1 2-3.5 mm; skull-stripped real
                 scans keep little), a 1 mm interhemispheric fissure (v1 2 mm), cerebellar folia 14 mm deep
                 with 0.4 mm slits (v1 8 mm, 1 mm): the CSF share at cohort ages near the real ~0.09
    shape        cerebrum half heights 60 / 46 mm above / below its centre (v1 64 / 40) and a larger cerebellum
                 reaching up to the tentorium (half axes 50, 33, 27 mm, z -63 to -9, about its extent in MNI
                 space; v1 46, 30, 19), so the slab centred on the brain's centre of mass cuts nearly the
                 anatomy it cuts in real scans (measured: the GM share of the inferior slices)
    pose         rotations sd 1.7 / 0.7 / 0.7 degrees (pitch / roll / yaw; v1 3.4 / 2.3 / 2.3): real scans in
                 canonical (MNI-like) orientation are tilted by about a degree; the smooth warp is mirror
                 symmetric up to 30 % of its antisymmetric part (hemispheres of one brain are near mirror images)
    bias         sd 1.5 % of the log (about +-3 %; v1 4 %, +-8 %): what N3 correction leaves in ADNI's
                 preprocessed MPRAGE

Version 3 (`--synthetic-version 3`; mri/synthetic/anatomy_v3.py, a subclass of version 2, not the default: it
does not yet measure closer to the real references than version 2, see the README) keeps version 2's atrophy model,
rates, masks, ribbon, pose, bias and file format and changes the shape of the cortex and of the base:

    sulci        a band-limited field (wavelength 20 mm) read at each point's foot on the smooth hull (the point
                 moved out along the hull's normal by its depth, plus a sideways drift of 0.3 mm per mm of depth),
                 so every sulcus is a sheet that starts on the surface and runs inward, leaning and bending, down
                 to 12-28 mm below the hull (20 mm x 0.6-1.4 by a slow field); below that a white-matter core
    deep GM      thalamus, caudate head and body (along the ventricle's roof) and putamen as separate ellipsoids,
                 the internal capsule (4-5 mm of WM) between caudate / thalamus and putamen
    base         the cerebrum's lower half height varies from 44 mm (orbital frontal) to 28 mm (occipital lobe on
                 the tentorium); temporal lobes 108 mm long hang below on each side; the hull joins cerebrum,
                 cerebellum and brainstem over 3 mm (v2 6 mm), so less CSF fills the spaces between them
    shape        the cerebral hull a superellipsoid: exponent 5 below its centre (boxy, broad down to a flat
                 base), 1.8 above (a dome tapering to the vertex), upper half height 70 mm (v2 60); the cerebellum
                 (half axes 48, 30, 22 mm) tucked under the occipital lobe, the temporal lobes 5 mm higher; the
                 template stretched 1.1x vertically. So the slab centred on the centre of mass cuts the levels it
                 cuts in the real references (widest section at 0.44 of the slab, real 0.39-0.42, v2 0.59); no CSF
                 outside the smooth hull at age 50 (v2 0-0.5 mm)
    contrast     cortical GM 0.80, deep GM 0.83, hippocampus 0.80 (v2 0.79, 0.81, 0.79): the class contrast
                 WM-GM with the solid white-matter core

Volumes are stored as int16 with scl_slope 2**-10 (`quantise` is that round trip); version 2 files carry
"synthetic cohort v2" / "v3" in the NIfTI description (version 1 files are unchanged, with none).

Not modelled: skull, scalp, eyes, vessels, dura/falx, choroid plexus, the fourth ventricle, cerebellar
and brainstem atrophy beyond the global surface offset, amyloid/tau, motion, scanner and protocol effects
beyond bias and noise, and any correlation between anatomy and sex or education.
"""
from mri.synthetic.anatomy import (DEFAULT_VERSION, INTENSITY, INTENSITY_V2, LABELS, SHAPE, STORAGE_SLOPE, VERSIONS,
                                   VOXEL_MM, affine)
from mri.synthetic.clock import ANNUAL_CHANGE, DX, REF_AGE, T_MCI, T_PRE, disease_clock, log_change, stage, tau_of
from mri.synthetic.cohort import COLUMNS, VISITS, make_cohort, volume_name, write_cohort
from mri.synthetic.render import (STRUCTURES, TRUTH_COLUMNS, counterfactual, figure_aging, is_synthetic, quantise,
                                  render,
                                  render_labels, render_row, row_version)

__all__ = ["ANNUAL_CHANGE", "COLUMNS", "DEFAULT_VERSION", "DX", "INTENSITY", "INTENSITY_V2", "LABELS", "REF_AGE",
           "SHAPE", "STORAGE_SLOPE", "STRUCTURES", "TRUTH_COLUMNS", "T_MCI", "T_PRE", "VERSIONS", "VISITS", "VOXEL_MM",
           "affine", "counterfactual", "disease_clock", "figure_aging", "is_synthetic", "log_change", "make_cohort", "quantise",
           "render", "render_labels", "render_row", "row_version", "stage", "tau_of", "volume_name", "write_cohort"]
