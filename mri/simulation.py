"""simulate.py's logic: one scan (a file, or a stored subject) preprocessed as data_prep.py cuts a volume, a
method run over its slab of slices at each target, and the results written as NIfTI slabs that overlay the
scan, a picture, tissue measures and a record. simulate.py's docstring describes the outputs.

Top to bottom: the method's schema, image size and slice geometry before anything is loaded
(`describe_method`, `slab_geometry`); attribute values and targets from the command line, checked against
the schema (`parse_value`, `parse_pairs`, `parse_targets`); the scan (`scan_from_file`, `scan_from_store`),
all of which `prepare` gathers into a `Simulation`; the method over the slab in batches (`load_method`, `run`,
`manipulate_slab`); brain tissue and CSF measures (`brain_mask`, `tissue_levels`, `measures`, `changes`); the
files (`write_nifti`, `picture`, `write_csv`, `write_outputs`).
"""
import csv
import gzip
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np

from models import BASELINES
from mri.io import atomic_path, write_json

PICTURE_SLICES = (0.25, 0.5, 0.75)   # trajectory.png rows: these fractions of the slab (the middle is mid-axial)


@dataclass
class Simulation:
    """What `prepare` resolved: the method's schema and image size, the targets and the preprocessed scan."""
    spec: str                 # the --method spec
    schema: object            # the method's mri.attributes.Schema
    size: int                 # its image size
    targets: list             # [(name, {attribute: raw value})], in the order asked
    changed: list             # the attributes some target changes (meandiff is fitted on them)
    source: dict              # the scan's raw attributes, in schema order
    slab: np.ndarray          # (slices, size, size) in [-1, 1], inferior to superior
    plan: dict                # its preprocessing plan (mri.preprocess)
    index: np.ndarray = None  # store indices of the slab's slices (a stored subject), else None
    spacing: float = None     # mm between slices (None for a stored subject: the plan's z_mm give it)
    geometry_store: str = None  # the store whose recorded geometry the slab follows, if any
    input_path: str = ""      # the scan's name in the picture's caption and the record
    xform_code: int = 1       # the input's NIfTI sform/qform code, declared by the outputs


# --- the method: its schema, image size and training store, before anything is loaded ----------------------
def describe_method(spec, store):
    """(schema, size, training store path or None, what to name in messages) of a method spec."""
    from mri.attributes import Schema
    if spec in BASELINES:
        if store is None:
            raise ValueError(f"--method {spec} is a baseline: give --store (its attributes, image size and, for "
                             "meandiff, the train split it is fitted on)")
        return store.schema, store.size, None, store.path
    run_dir = spec.partition("@")[0]
    config = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--method {spec}: {run_dir} is neither a baseline {BASELINES} nor a run directory "
                                "with config.json (train one, e.g. with train_fader.py)")
    try:
        with open(config) as f:
            c = json.load(f)
        schema, size = Schema.from_json(json.dumps(c["schema"])), int(c["args"]["size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--method {spec}: {config} is not a run's config.json ({type(e).__name__}: {e}); "
                         "rerun the training script") from e
    if store is not None and store.size != size:
        raise ValueError(f"--method {spec} takes {size}x{size} slices but the store {store.path} holds "
                         f"{store.size}x{store.size}: use a store built with `data_prep.py --size {size}`")
    return schema, size, c["args"].get("store"), run_dir


def load_method(spec, store, attrs):
    """The method object (models.load_method), with a run that cannot be loaded named."""
    import zipfile
    import models
    try:
        return models.load_method(spec, store, attrs=attrs)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, KeyError) as e:
        if spec in BASELINES:
            raise
        raise ValueError(f"--method {spec}: the run cannot be loaded ({type(e).__name__}: "
                         f"{e.args[0] if e.args else e}); check its config.json and checkpoint.npz, or train it "
                         "again with its train_*.py") from e


def store_geometry(store):
    """(slices, spacing) a store was built with, from its provenance (None when not recorded)."""
    a = store.provenance.get("arguments", {}) if store is not None else {}
    return (a.get("slices"), a.get("spacing")) if a.get("slices") and a.get("spacing") else None


def slab_geometry(spec, store, train_store_path, slices=None, spacing=None):
    """(slices, spacing, the path of the store whose geometry was recorded, or None): `slices` and `spacing`
    (--slices, --spacing), else the provenance of `store`, else of the run's training store. A geometry other
    than the store's is allowed, with a warning: the method then sees slice positions it was not trained at."""
    from mri.store import SliceStore, StoreError
    source = store
    if source is None and train_store_path:
        try:
            source = SliceStore(train_store_path)
        except StoreError:
            source = None
    recorded = store_geometry(source)
    if recorded is None and not (slices and spacing):
        where = source.path if source is not None else (train_store_path or "unknown")
        raise ValueError(f"the slice geometry of {spec}'s training store ({where}) is not known (store missing or "
                         "without provenance): give --slices and --spacing as that store was built "
                         "(data_prep.py defaults: --slices 32 --spacing 2), or --store")
    slices, spacing = slices or recorded[0], spacing or recorded[1]
    if recorded is not None and (slices, spacing) != tuple(recorded):
        print(f"warning: {slices} slices {spacing:g} mm apart differ from the {recorded[0]} slices {recorded[1]:g} mm "
              f"apart of {source.path}: the slab's slice positions are not the store's", file=sys.stderr)
    return slices, spacing, source.path if recorded is not None else None


# --- attributes ---------------------------------------------------------------------------------------------
def parse_value(attribute, text):
    """Raw value of one attribute from the command line: a number, or a class name (case-insensitive)."""
    text = text.strip()
    if attribute.kind == "continuous":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{attribute.name}={text}: {attribute.name} is continuous, give a number") from None
    classes = [str(c) for c in attribute.classes] or ["0", "1"]
    for exact in (True, False):
        for i, c in enumerate(classes):
            if c == text if exact else c.lower() == text.lower():
                return float(i)
    raise ValueError(f"{attribute.name}={text}: not a class of {attribute.name}; its classes are {', '.join(classes)}")


def parse_pairs(text, schema, flag):
    """'age=72,dx=CN' -> {name: raw value}, names checked against the method's schema."""
    out = {}
    for item in (x for x in text.split(",") if x.strip()):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not value.strip():
            raise ValueError(f"{flag} {text!r}: write NAME=VALUE pairs separated by commas, e.g. age=72,dx=CN")
        out[name] = parse_value(attribute_of(schema, name, flag), value)
    return out


def attribute_of(schema, name, flag):
    if name not in schema.names:
        raise KeyError(f"{flag}: unknown attribute {name!r}; the method knows {', '.join(schema.names)}")
    return schema[name]


def label(attribute, raw):
    return f"{float(raw):g}" if attribute.kind == "continuous" else attribute.label(raw)


def parse_targets(schema, age="", dx="", target=()):
    """[(name, {attribute: raw value})] in the order asked, duplicates dropped: each comma-separated `age` and
    `dx` value alone (--age, --dx), then each NAME=VALUE,... of `target` (--target)."""
    out = []
    for flag, name, values in (("--age", "age", age), ("--dx", "dx", dx)):
        values = [v for v in values.split(",") if v.strip()]
        if values:
            a = attribute_of(schema, name, flag)
            out += [{name: parse_value(a, v)} for v in values]
    out += [parse_pairs(t, schema, "--target") for t in target]
    named, seen = [], set()
    for change in out:
        name = "_".join(f"{n}_{label(schema[n], v)}" for n, v in change.items())
        name = re.sub(r"[^A-Za-z0-9.+-]+", "_", name)
        if change and name not in seen:
            seen.add(name)
            named.append((name, change))
    if not named:
        raise ValueError("no target given: use --age, --dx or --target NAME=VALUE")
    return named


def warn_out_of_range(schema, values, what, where):
    for n, v in values.items():
        a = schema[n]
        if a.kind == "continuous" and a.quantiles and not a.quantiles[0] <= v <= a.quantiles[-1]:
            print(f"warning: {what} {n}={v:g} is outside the training range {a.quantiles[0]:.1f}..{a.quantiles[-1]:.1f} "
                  f"of {where}; the method extrapolates there", file=sys.stderr)


# --- the scan -----------------------------------------------------------------------------------------------
def scan_from_file(path, size, slices, spacing):
    """(slab (slices, size, size) in [-1, 1], plan), exactly as data_prep.py cuts a volume."""
    from mri.preprocess import BadVolume, process_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    try:
        return process_file(path, size, slices, spacing)
    except BadVolume as e:
        raise ValueError(f"--input {path}: {e}; give a 3D NIfTI (.nii, .nii.gz) or Analyze (.img/.hdr) volume") from e


def scan_from_store(store, subject, visit):
    """(slab, plan, store indices of its slices in slab order, raw attributes, visit) of a stored volume."""
    rows = np.flatnonzero(store.subject == subject)
    if rows.size == 0:
        some = ", ".join(sorted(set(store.subject))[:5])
        raise KeyError(f"--subject {subject} is not in {store.path} (subjects include {some})")
    visits = list(dict.fromkeys(store.visit[rows]))
    visit = visit or visits[0]
    if visit not in visits:
        raise KeyError(f"--visit {visit}: subject {subject} has visits {', '.join(visits)} in {store.path}")
    rows = rows[store.visit[rows] == visit]
    volume = int(store.volume[rows[0]])
    idx = np.flatnonzero(store.volume == volume)
    idx = idx[np.argsort(store.slice[idx], kind="stable")]
    return store.images(idx), store.plan(volume), idx, {n: float(store.attrs[n][idx[0]]) for n in store.schema.names}, visit


def xform_code(path):
    """The input's NIfTI sform (else qform) code, so outputs declare the same space (1, scanner, otherwise)."""
    import nibabel as nib
    try:
        header = nib.load(path).header
        for code in (int(header["sform_code"]), int(header["qform_code"])):
            if code > 0:
                return code
    except Exception:   # Analyze headers have no codes; an unreadable file was reported before
        pass
    return 1


# --- everything before the method runs ---------------------------------------------------------------------
def prepare(spec, store, source="", age="", dx="", target=(), input_path=None, subject=None, visit=None,
            slices=None, spacing=None):
    """The `Simulation` of method `spec` on a scan file (`input_path`, cut at `slices` and `spacing`, see
    `slab_geometry`) or on a stored `subject` (and `visit`) of `store`: the targets parsed, the source's
    attributes (`source`, NAME=VALUE,...; a stored subject's own complete it) checked to cover what the method
    conditions on, and out-of-range values warned about."""
    schema, size, train_store, where = describe_method(spec, store)
    targets = parse_targets(schema, age, dx, target)
    changed = list(dict.fromkeys(n for _, change in targets for n in change))
    needed = list(dict.fromkeys(([] if spec in BASELINES else schema.names) + changed))
    if spec == "truth" and not subject:
        raise ValueError("--method truth re-renders stored synthetic slices: use it with --store and --subject")
    if subject:
        slab, plan, index, stored, visit = scan_from_store(store, subject, visit)
        given = dict({n: v for n, v in stored.items() if n in schema.names}, **parse_pairs(source, schema, "--source"))
        stored_path = store.file["volumes/path"].asstr()[int(store.volume[index[0]])]
        scan = dict(slab=slab, plan=plan, index=index, spacing=None, geometry_store=store.path,
                   input_path=f"{store.path}:{subject}/{visit}",
                   xform_code=xform_code(stored_path) if os.path.isfile(stored_path) else 1)
    else:
        given = parse_pairs(source, schema, "--source")
    missing = [n for n in needed if n not in given]
    if missing:
        example = ",".join(f"{n}={schema[n].classes[0] if schema[n].classes else 70}" for n in needed)
        raise KeyError(f"--source lacks {', '.join(missing)}: the method conditions on {', '.join(needed)}; "
                       f"give the scan's own values, e.g. --source {example}")
    if not subject:
        slices, spacing, geometry_store = slab_geometry(spec, store, train_store, slices, spacing)
        slab, plan = scan_from_file(input_path, size, slices, spacing)
        scan = dict(slab=slab, plan=plan, spacing=spacing, geometry_store=geometry_store, input_path=input_path,
                    xform_code=xform_code(input_path))
    given = {n: given[n] for n in schema.names if n in given}
    warn_out_of_range(schema, given, "the source's", where)
    for _, change in targets:
        warn_out_of_range(schema, change, "the target", where)
    return Simulation(spec=spec, schema=schema, size=size, targets=targets, changed=changed, source=given, **scan)


# --- the method on the slab ---------------------------------------------------------------------------------
def positional(method, slices, same_geometry):
    """meandiff picks its per-position model by the slices' axial positions ("slice"). A slab cut with its
    store's geometry has position k at slab slice k; with another geometry meandiff falls back to its one
    model over all positions (`MeanDiff.pooled`)."""
    from models.baselines import MeanDiff
    if not isinstance(method, MeanDiff) or (same_geometry and len(method.coef) == slices):
        return method
    print("warning: meandiff's per-position models do not apply to this geometry; using its model over all "
          "positions", file=sys.stderr)
    return method.pooled()


def run(sim, method, store, batch_size):
    """{target name: manipulated slab} of `sim`'s targets; a scan file's slab gets meandiff's per-position
    models when it was cut with `store`'s geometry (`positional`)."""
    if sim.index is None:
        same = store is not None and store_geometry(store) == (len(sim.slab), sim.spacing)
        method = positional(method, len(sim.slab), same)
    return manipulate_slab(method, sim.slab, sim.source, sim.targets, sim.index, batch_size)


def manipulate_slab(method, slab, source, targets, index, batch_size):
    """{target name: manipulated slab (slices, S, S)} for each target, batched, with a progress bar. Besides
    the attributes, every call gets "slice", the slab's axial positions (0 = most inferior, as the store's
    `slice`; methods that need positions read it), and "index", store indices, for a stored subject (what
    `truth` re-renders it from).
    A target the method does not make (its `supports`, e.g. CycleGAN outside its domains) is refused before any
    slice is computed.

    A target equal to the source is run like any other: the methods that return their input at unchanged
    attributes by construction (identity, meandiff, Fader's and DFI's residual modes, VA-GAN) return the
    source exactly, and the others (Fader's decode mode, cGAN, truth's re-rendering) show their reconstruction."""
    from tqdm import tqdm
    from mri.evaluation import supported
    n = len(slab)
    x = slab[..., None].astype(np.float32)
    src = {k: np.full(n, v, np.float64) for k, v in source.items()}
    src["slice"] = np.arange(n)                                     # the slab's axial positions
    if index is not None:
        src["index"] = np.asarray(index)
    jobs = [(name, dict(src, **{k: np.full(n, v, np.float64) for k, v in change.items()})) for name, change in targets]
    for name, tgt in jobs:            # before any work: a method that makes only some changes (its `supports`)
        if not supported(method, src, tgt, n).all():
            raise ValueError(f"the method does not make the change to {name} from the source "
                             f"({', '.join(f'{k}={v}' for k, v in source.items())}): choose targets it supports "
                             "(a CycleGAN run: a target in the other domain of its --domains)")
    out = {}
    with tqdm(total=n * len(jobs), desc="slices", unit="slice") as bar:
        for name, tgt in jobs:
            parts = []
            for start in range(0, n, batch_size):
                b = slice(start, min(n, start + batch_size))
                y = np.asarray(method.manipulate(x[b], {k: v[b] for k, v in src.items()},
                                                 {k: v[b] for k, v in tgt.items()}), np.float32)
                parts.append(y.reshape(b.stop - b.start, *slab.shape[1:]))
                bar.update(b.stop - b.start)
            out[name] = np.concatenate(parts)
    return out


# --- numbers: brain tissue and CSF from intensity classes ---------------------------------------------------
def brain_mask(slab):
    """The source's foreground (preprocess's threshold: 5 % of the scale), holes filled slice by slice."""
    from scipy import ndimage
    from mri.preprocess import FOREGROUND
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


# --- outputs ------------------------------------------------------------------------------------------------
def write_nifti(path, slab, affine, code):
    """A slab as float32 NIfTI on the RAS grid of `slab_affine`, written atomically (gzip without a timestamp,
    so equal inputs give equal files)."""
    import nibabel as nib
    from mri.preprocess import slab_to_volume
    img = nib.Nifti1Image(slab_to_volume(slab).astype(np.float32), affine)
    img.header.set_sform(affine, code)
    img.header.set_qform(affine, code)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


def picture(slab, outputs, rows):
    """uint8 grid: per row slice, the source and every target, then the differences; and its scale."""
    from mri import grids
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
    mask = brain_mask(slab)
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
    from mri import grids
    from mri.preprocess import slab_affine, to_native
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
