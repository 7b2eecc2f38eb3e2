"""The method over a user's scan: the method's schema, image size and slice geometry before anything is loaded
(`describe_method`, `mri.data.scans.slab_geometry`); the scan (`mri.data.scans.scan_from_file`,
`scan_from_store`) and the targets (simulation/targets.py), which `prepare` gathers into a `Simulation`; the
method over the slab in batches (`load_method`, `run`, `manipulate_slab`). simulation/outputs.py writes the
results; simulate.py's docstring describes them.
"""
import os
import sys
from dataclasses import dataclass

import numpy as np

from models import BASELINES
from mri.training import load_config
from mri.data.scans import scan_from_file, scan_from_store, slab_geometry, store_geometry, xform_code
from simulation.targets import parse_pairs, parse_targets, warn_out_of_range


@dataclass
class Simulation:
    """What `prepare` resolved: the method's schema and image size, the targets and the preprocessed scan."""
    spec: str                 # the --method spec
    schema: object            # the method's mri.data.attributes.Schema
    size: int                 # its image size
    targets: list             # [(name, {attribute: raw value})], in the order asked
    changed: list             # the attributes some target changes (meandiff is fitted on them)
    source: dict              # the scan's raw attributes, in schema order
    slab: np.ndarray          # (slices, size, size) in [-1, 1], inferior to superior
    plan: dict                # its preprocessing plan (mri.data.volumes)
    index: np.ndarray = None  # store indices of the slab's slices (a stored subject), else None
    spacing: float = None     # mm between slices (None for a stored subject: the plan's z_mm give it)
    geometry_store: str = None  # the store whose recorded geometry the slab follows, if any
    input_path: str = ""      # the scan's name in the picture's caption and the record
    xform_code: int = 1       # the input's NIfTI sform/qform code, declared by the outputs


def describe_method(spec, store):
    """(schema, size, training store path or None, what to name in messages) of a method spec."""
    from mri.data.attributes import Schema
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
        c = load_config(run_dir)
        schema, size = Schema.from_records(c["schema"]), int(c["args"]["size"])
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
    models when it was cut with `store`'s geometry (`positional`). The background beyond the source's grown
    head stays the scan's (models.inside_head)."""
    from models import inside_head
    if sim.index is None:
        same = store is not None and store_geometry(store) == (len(sim.slab), sim.spacing)
        method = positional(method, len(sim.slab), same)
    return manipulate_slab(inside_head(method), sim.slab, sim.source, sim.targets, sim.index, batch_size)


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
    from models import supported
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
