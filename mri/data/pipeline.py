"""The data_prep pipeline: volumes + CSV -> per-volume parts (resumable) -> one HDF5 slice store.

Each processed volume is saved as a small part file in `<out>.parts/` (written atomically), so a run that
is killed and started again with the same arguments skips finished volumes. The store is assembled from
the parts at the end, to a temporary file renamed onto `<out>`, and the parts are then removed. Temporary
stores `<out>.tmp-<pid>` left by killed runs (processes no longer running) are removed at the start and the end.
"""
import copy
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from mri.data import cohorts
from mri.data.attributes import Attribute, Schema
from mri.data.io import atomic_path, read_json, remove_stale_temporaries, write_json
from mri.data.volumes import BadVolume, apply_plan, intensity_scale, load_canonical, normalise, volume_to_slices
from mri.data.store import assign_splits, write_store


IMAGE_PRESETS = ("celeba", "image-folder")   # 2D image datasets (mri/data/images.py)


@dataclass
class PrepConfig:
    images: str
    csv: str
    out: str
    preset: str = "adni"
    attrs: tuple = ()
    size: int = 128
    slices: int = 32
    spacing: float = 2.0
    split: tuple = (0.8, 0.1, 0.1)
    seed: int = 0
    workers: int = 2
    keep_columns: tuple = ()
    label_maps: tuple = ()
    id_regex: str = ""
    id_column: str = ""
    attr_columns: str = ""
    register: bool = True                        # follow-ups registered to the subject's first visit
    channels: int = 0                            # 2D images: channels stored (0: the first image's)
    partition: str = ""                          # celeba: list_eval_partition.txt (default: beside --csv)
    extra: dict = field(default_factory=dict)   # provenance only (e.g. the synthetic cohort's arguments)


@dataclass
class Summary:
    skipped: list = field(default_factory=list)     # (path, reason)
    unmatched: list = field(default_factory=list)   # volumes with no CSV row
    orphans: list = field(default_factory=list)     # CSV rows with no volume
    stale: list = field(default_factory=list)       # temporary stores of killed runs, removed
    resumed: int = 0
    volumes: int = 0
    unit: str = "volumes"                           # 2D image datasets: "images"

    def lines(self, limit=20):
        out = [f"{self.unit} stored: {self.volumes}" + ("" if self.unit == "images" else
                                                        f" (resumed from a previous run: {self.resumed})")]
        for title, items in (("skipped", [f"{p}: {r}" for p, r in self.skipped]),
                             (f"{self.unit} with no CSV row", self.unmatched),
                             (f"CSV rows with no {self.unit[:-1]}", [str(k) for k in self.orphans]),
                             ("removed temporary stores of killed runs", self.stale)):
            if items:
                out.append(f"{title}: {len(items)}")
                out += [f"  {x}" for x in items[:limit]] + ([f"  ... and {len(items) - limit} more"] if len(items) > limit else [])
        return out


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _part_name(path):
    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(key.encode()).hexdigest() + ".npz"


def _process(job):
    """Worker: the volumes of one subject (first visit first) -> part files. Without registration each volume
    is cut with its own plan; with it, every later visit is registered rigidly to the first usable visit
    (mri/register.py) and cut with that visit's plan (geometry; the intensity scale stays the scan's own).
    Returns [(path, error or None, whether the part already existed)] in the job's order."""
    volumes, size, n_slices, spacing, registered = job
    if all(os.path.exists(part) for _, part in volumes):
        return [(path, None, True) for path, _ in volumes]
    out, base = [], None
    for path, part in volumes:
        if os.path.exists(part) and (base is not None or not registered or len(volumes) == 1):
            out.append((path, None, True))
            continue
        try:
            data, affine = load_canonical(path)
            if base is None:
                slices, plan = volume_to_slices(data, affine, size, n_slices, spacing)
                if registered:
                    base = (np.maximum(data, 0), affine, plan, path)
            else:
                slices, plan = _registered_slices(np.maximum(data, 0), affine, base, size)
        except BadVolume as e:
            out.append((path, str(e), False))
            continue
        existed = os.path.exists(part)
        if not existed:
            with atomic_path(part) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, slices=slices.astype(np.float16), plan=json.dumps(plan))
        out.append((path, None, existed))
    return out


def _registered_slices(data, affine, base, size):
    """A follow-up cut with its first visit's plan: the plan's affine maps the first visit's world to this
    scan's voxels through the rigid transform T (first visit world -> this scan's world)."""
    from mri.data.register import register
    base_data, base_affine, base_plan, base_path = base
    transform, ncc = register(base_data, base_affine, data, affine)
    plan = dict(base_plan, scale=intensity_scale(data), affine=(np.linalg.inv(transform) @ affine).tolist(),
                rigid=transform.tolist(), rigid_ncc=ncc, registered_to=os.path.basename(base_path))
    return normalise(apply_plan(data, plan, size), plan), plan


def visit_key(meta):
    """Order of a subject's visits: by age where the store has it, then by the visit label (months of
    ADNI's 'mNN' codes; 'bl', 'sc' and other labels first), then the path."""
    m = re.fullmatch(r"m(\d+)", meta["visit"].lower())
    age = meta["attrs"].get("age", math.inf)
    return (age if isinstance(age, float) and not math.isnan(age) else math.inf,
            int(m.group(1)) if m else -1, meta["visit"], meta["path"])


def subject_jobs(metas, parts_dir, cfg):
    """One job per subject (its volumes first visit first) with registration, else one per volume."""
    groups = {}
    for m in sorted(metas, key=visit_key):
        key = m["subject"] if cfg.register else m["path"]
        groups.setdefault(key, []).append((m["path"], os.path.join(parts_dir, _part_name(m["path"]))))
    return [(g, cfg.size, cfg.slices, cfg.spacing, cfg.register) for g in groups.values()]


def _load_part(part):
    with np.load(part) as z:
        return z["slices"].astype(np.float32), json.loads(str(z["plan"]))


def build(cfg, log=print):
    """Run the whole pipeline; returns the Summary. Raises CohortError for unusable CSV/arguments."""
    if cfg.preset in IMAGE_PRESETS:
        from mri.data import images
        return images.build(cfg, Summary(unit="images"), log)
    if cfg.preset == "custom":
        preset = cohorts.custom_preset(cfg.id_regex, cfg.id_column, cfg.attr_columns)
    elif cfg.preset in cohorts.PRESETS:
        preset = cohorts.PRESETS[cfg.preset]
    else:
        raise cohorts.CohortError(f"unknown --preset {cfg.preset!r}; choose one of {list(cohorts.PRESETS) + ['custom']}")
    preset = _copy_preset(preset)
    cohorts.apply_label_maps(preset, cfg.label_maps)
    attr_names = list(cfg.attrs or preset.default_attrs)
    if not os.path.isdir(cfg.images):
        raise cohorts.CohortError(f"--images {cfg.images} is not a folder")
    rows = cohorts.read_csv(cfg.csv, preset, attr_names)
    missing_keep = [c for c in cfg.keep_columns if rows and c not in rows[0]]
    if missing_keep:
        raise cohorts.CohortError(f"{cfg.csv}: columns to keep {missing_keep} are missing")
    volumes = cohorts.find_volumes(cfg.images)
    if not volumes:
        raise cohorts.CohortError(f"no .nii, .nii.gz or .img volumes under {cfg.images}")
    pairs, unmatched, orphans = cohorts.join(volumes, rows, preset)
    cohorts.check_labels(pairs, preset, attr_names, cfg.csv)
    summary = Summary(unmatched=unmatched, orphans=orphans, stale=remove_stale_temporaries(cfg.out))

    # attribute values first: a missing value skips the volume before any image work
    metas = []
    for path, match, row in pairs:
        values = {n: preset.attrs[n].parse(row) for n in attr_names}
        absent = [n for n, v in values.items() if isinstance(v, float) and math.isnan(v)]
        if absent:
            summary.skipped.append((path, f"missing value for {absent} in the CSV row"))
            continue
        metas.append({"path": path, "subject": str(preset.subject(match, row)), "visit": str(preset.visit(match, row)),
                      "attrs": values, "csv": {c: _float(row[c]) for c in cfg.keep_columns}})

    parts_dir = cfg.out + ".parts"
    args = {k: v for k, v in cfg.__dict__.items() if k not in ("workers", "extra")}
    args["csv_sha256"] = _sha256(cfg.csv)
    if os.path.isdir(parts_dir) and os.path.exists(os.path.join(parts_dir, "args.json")):
        if read_json(os.path.join(parts_dir, "args.json")) != json.loads(json.dumps(args)):
            log(f"{parts_dir} holds parts from a run with other arguments; starting afresh")
            shutil.rmtree(parts_dir)
    os.makedirs(parts_dir, exist_ok=True)
    write_json(os.path.join(parts_dir, "args.json"), args)

    jobs = subject_jobs(metas, parts_dir, cfg)
    errors, part_of = {}, {path: part for job in jobs for path, part in job[0]}
    with _pool(cfg.workers) as pool:
        imap = pool.imap(_process, jobs) if pool else map(_process, jobs)
        with tqdm(total=len(metas), desc="volumes", unit="vol") as bar:
            for results in imap:
                for path, error, resumed in results:
                    if error:
                        errors[path] = error
                    summary.resumed += resumed
                bar.update(len(results))
    summary.skipped += [(p, errors[p]) for p in sorted(errors)]
    kept = [(m, part_of[m["path"]]) for m in metas if m["path"] not in errors]
    summary.volumes = len(kept)
    if not kept:
        for line in summary.lines():
            log(line)
        raise cohorts.CohortError("no usable volume: every volume was skipped or unmatched (summary above)")

    # subject-level split, stratified by diagnosis where there is one
    strat = preset.stratify if preset.stratify in attr_names else ""
    first = {}
    for m, _ in kept:
        first.setdefault(m["subject"], m["attrs"][strat] if strat else 0)
    split_of = assign_splits(list(first), [first[s] for s in first], cfg.split, cfg.seed)
    train_values = {n: [m["attrs"][n] for m, _ in kept if split_of[m["subject"]] == 0] for n in attr_names}
    schema = Schema([Attribute(n, preset.attrs[n].kind, list(preset.attrs[n].classes)).fit(train_values[n] or [0.0])
                     for n in attr_names])
    for m, part in kept:
        m["split"] = split_of[m["subject"]]
        m["slice_mm"] = (np.arange(cfg.slices) - (cfg.slices - 1) / 2) * cfg.spacing
    provenance = {"arguments": {k: v for k, v in cfg.__dict__.items()}, "csv": os.path.abspath(cfg.csv),
                  "csv_sha256": args["csv_sha256"], "preset": preset.name, "skipped": len(summary.skipped)}
    write_store(cfg.out, [m for m, _ in kept], lambda i: _load_part(kept[i][1]), schema, cfg.size,
                provenance, cfg.keep_columns)
    shutil.rmtree(parts_dir)
    summary.stale += remove_stale_temporaries(cfg.out)
    return summary


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _copy_preset(preset):
    """Presets are module-level; label maps and discovered classes must not leak between runs."""
    return copy.deepcopy(preset)


class _pool:
    """A process pool for `workers > 1`, else None (in-process, easier to debug)."""

    def __init__(self, workers):
        self.workers = workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            self.pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self.pool

    def __exit__(self, *exc):
        if self.pool:
            self.pool.terminate()
            self.pool.join()


SYNTHETIC_TRUTH_COLUMNS = ("AGE", "Years_bl", "subject_seed", "onset_age", "noise_seed", "IMAGEUID",
                           "synthetic_version")


def synthetic_config(cfg, n_subjects, volumes_dir, version=None, visits=None):
    """Generate the phantom cohort (NIfTI + ADNIMERGE-style CSV) of anatomy `version` and point `cfg` at it: the
    store is then built through the same `adni` preset path as real data, keeping the ground-truth columns
    (the version included, so `mri.synthetic.counterfactual` re-renders with the store's own anatomy)."""
    from mri import synthetic
    version = synthetic.DEFAULT_VERSION if version is None else version
    try:
        csv_path = synthetic.write_cohort(n_subjects, volumes_dir, seed=cfg.seed, workers=cfg.workers,
                                          visits=tuple(visits or synthetic.VISITS), version=version)
    except ValueError as e:
        raise cohorts.CohortError(str(e)) from e
    return PrepConfig(**dict(cfg.__dict__, images=volumes_dir, csv=csv_path, preset="adni",
                             keep_columns=SYNTHETIC_TRUTH_COLUMNS,
                             extra={"synthetic": {"subjects": n_subjects, "seed": cfg.seed, "version": version,
                                                  "visits": list(visits or synthetic.VISITS)}}))
