"""What simulate.py writes: the slabs as NIfTI, the trajectory picture, tissue measures as CSV, the record."""
import csv
import os
import time

import numpy as np

from mri.data.io import atomic_path, write_json
from mri.data.scans import write_nifti
from mri.data.tissue import filled_foreground, measures, tissue_levels
from simulation.targets import label


PICTURE_SLICES = (0.25, 0.5, 0.75)   # trajectory.png rows: these fractions of the slab (the middle is mid-axial)


def picture(slab, outputs, rows):
    """uint8 grid: per row slice, the source and every target, then the differences; and its scale."""
    from mri.data import grids
    diffs = [outputs[n] - slab for n in outputs]
    scale = float(max(0.05, np.percentile(np.abs(np.stack(diffs)), 99.9))) if diffs else 0.05
    scale = float(f"{scale:.2g}")
    blank = np.full(slab.shape[1:], 255, np.uint8)
    cells = []
    for k in rows:
        cells.append([grids.to_uint8(slab[k])] + [grids.to_uint8(outputs[n][k]) for n in outputs])
        cells.append([blank] + [grids.diverging(d[k], scale) for d in diffs])
    return grids.tile(cells), scale


def changes(slab, outputs, source, targets, schema, files, affine):
    """changes.csv rows (the source, then each target) and the tissue levels: one brain mask and one set of
    intensity levels, both from the source, measure every slab alike."""
    mask = filled_foreground(slab)
    levels = tissue_levels(slab[mask])
    voxel_ml = float(np.prod(np.diag(affine)[:3])) / 1000.0
    base = measures(slab, mask, levels, voxel_ml)
    rows = []
    for name, y in [("source", slab)] + list(outputs.items()):
        values = dict(source, **targets.get(name, {}))
        m = measures(y, mask, levels, voxel_ml)
        rows.append({"target": name, "file": files[name],
                     **{n: label(schema[n], values[n]) for n in schema.names if n in values},
                     "brain_ml": f"{m['brain_ml']:.3f}", "csf_ml": f"{m['csf_ml']:.3f}", "bpf": f"{m['bpf']:.5f}",
                     "bpf_change": f"{m['bpf'] - base['bpf']:+.5f}",
                     "brain_change_pct": f"{100 * (m['brain_ml'] / base['brain_ml'] - 1):+.3f}"})
    return rows, levels


def write_csv(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_outputs(sim, outputs, out, arguments, started, native_intensity=False):
    """Writes into folder `out` the source and every output slab with its difference (NIfTI), changes.csv,
    trajectory.png and simulation.json (recording `arguments`, the command line's, and the seconds since
    `started`, a time.time()); returns the picture's caption. `native_intensity`: the NIfTI files in the
    input's units instead of [-1, 1]."""
    from mri.data import grids
    from mri.data.volumes import slab_affine, to_native
    slab, schema, source, code = sim.slab, sim.schema, sim.source, sim.xform_code
    os.makedirs(out, exist_ok=True)
    affine = slab_affine(sim.plan, sim.size, sim.spacing)
    scale = (lambda x: to_native(x, sim.plan)) if native_intensity else (lambda x: x)
    files = {"source": "source.nii.gz"}
    write_nifti(os.path.join(out, "source.nii.gz"), scale(slab), affine, code)
    for name, y in outputs.items():
        files[name] = f"{name}.nii.gz"
        write_nifti(os.path.join(out, files[name]), scale(y), affine, code)
        write_nifti(os.path.join(out, f"difference_{name}.nii.gz"), scale(y) - scale(slab), affine, code)

    rows, levels = changes(slab, outputs, source, dict(sim.targets), schema, files, affine)
    write_csv(os.path.join(out, "changes.csv"), rows)

    k = len(slab)
    picture_rows = sorted({min(k - 1, int(f * k)) for f in PICTURE_SLICES})
    image, diff_scale = picture(slab, outputs, picture_rows)
    grids.write_png(os.path.join(out, "trajectory.png"), image)
    z = np.asarray(sim.plan["z_mm"])
    caption = (f"{sim.spec} on {sim.input_path} ({', '.join(f'{n} {label(schema[n], v)}' for n, v in source.items())}); "
               f"columns: source | {' | '.join(outputs)}; rows: axial slices {picture_rows} of {k} "
               f"(z = {', '.join(f'{z[r]:.1f}' for r in picture_rows)} mm), each above its difference from the "
               f"source (red brighter, blue darker, saturating at +-{diff_scale:g} of the [-1, 1] range)")
    write_json(os.path.join(out, "simulation.json"), {
        "method": sim.spec, "input": sim.input_path, "arguments": arguments,
        "source": {n: label(schema[n], v) for n, v in source.items()},
        "targets": [{"name": n, "changes": {a: label(schema[a], v) for a, v in c.items()}, "file": files[n],
                     "difference": f"difference_{n}.nii.gz"} for n, c in sim.targets],
        "geometry": {"size": sim.size, "slices": k, "spacing_mm": float(affine[2, 2]),
                     "pixel_mm": float(affine[0, 0]), "from_store": sim.geometry_store},
        "plan": sim.plan, "affine": affine, "intensity": "native (plan scale)" if native_intensity else "[-1, 1]",
        "tissue_levels": {"csf": levels[0], "gm": levels[1], "wm": levels[2]},
        "trajectory": {"file": "trajectory.png", "caption": caption, "difference_scale": diff_scale},
        "seconds": round(time.time() - started, 1)})
    return caption
