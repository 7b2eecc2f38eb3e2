"""2D image datasets (CelebA, any folder of PNG/JPEG images with a CSV of attributes) -> the slice store.

Each image is one record of the store: its own subject (the image id), visit "bl", slice 0, slice_mm 0,
its split, its attributes; `images` holds it as (S, S) for one channel or (S, S, C), with the file attribute
`channels`. Decoding is TensorFlow's (tf.io.decode_image: JPEG, PNG, BMP, GIF's first frame), as uint8 with
`channels` channels (0: those of the first readable image; 1 grey, 3 RGB: others are converted). Pixels map
to [-1, 1] as v / 127.5 - 1 (Fader Networks' normalize_images).

Geometry (`crop_box`):
- `celeba`: rows 20 .. H-20 of the aligned 218x178 images (Fader Networks' data/preprocess.py `[20:-20]`,
  178x178), then a centred square if that is not square;
- `image-folder`: the centred largest square.
The square is resized to `size` x `size` with TensorFlow's `area` method when shrinking (OpenCV's INTER_AREA,
which Fader Networks uses below 178 px: for an integer factor the mean of each block) and `lanczos3` when
enlarging (Fader Networks: Lanczos4). The plan stored per image records the box and the method.

Bad input: an image that cannot be decoded is skipped and named in the summary; a requested attribute that
is not a column stops at once with the columns found.
"""
import math
import os

import numpy as np
from tqdm import tqdm

from mri.data import cohorts
from mri.data.attributes import Attribute, Schema
from mri.data.io import remove_stale_temporaries
from mri.data.store import assign_splits, write_store

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
CELEBA_MARGIN = 20                      # rows cut at the top and at the bottom (Fader Networks)
CELEBA_PARTITION = "list_eval_partition.txt"


class BadImage(ValueError):
    """An image file that cannot be decoded."""


def crop_box(height, width, margin=0):
    """(top, left, side): rows `margin` .. height - margin, then the centred largest square."""
    top, rows = margin, height - 2 * margin
    if rows <= 0:
        raise BadImage(f"{height}x{width} pixels: nothing is left after cutting {margin} rows at the top and bottom")
    side = min(rows, width)
    return top + (rows - side) // 2, (width - side) // 2, side


def decode(path, channels=0):
    """uint8 (H, W, C) of an image file (C = `channels`, or the file's own with 0)."""
    import tensorflow as tf
    try:
        data = tf.io.read_file(path)
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    except (tf.errors.OpError, OSError, ValueError) as e:
        raise BadImage(f"cannot decode ({str(e).splitlines()[0][:120]})") from None
    return image.numpy()


def prepare(path, size, channels, margin=0):
    """(image (S, S, C) float32 in [-1, 1], plan) of one file: crop_box, then resize (area down, lanczos3 up)."""
    import tensorflow as tf
    image = decode(path, channels)
    top, left, side = crop_box(image.shape[0], image.shape[1], margin)
    square = image[top:top + side, left:left + side].astype(np.float32)
    method = "area" if size < side else "lanczos3"
    if size != side:
        square = tf.image.resize(square, (size, size), method=method, antialias=False).numpy()
    square = np.clip(square, 0.0, 255.0) / 127.5 - 1.0
    plan = {"box": [top, left, side], "resize": method if size != side else "none", "size": size}
    return square, plan


def find_images(root):
    """Image files under `root` (recursively), sorted; hidden files are ignored."""
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files
                  if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    return sorted(found)


def read_celeba_attributes(path):
    """list_attr_celeba.txt: a count line, the 40 names, then `<file> +-1 x 40` per image.
    Returns (names, {file name: (40,) int8 in {0, 1}})."""
    try:
        with open(path) as f:
            lines = [line.split() for line in f if line.strip()]
    except OSError as e:
        raise cohorts.CohortError(f"cannot read {path}: {e}") from e
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise cohorts.CohortError(f"{path} is not in CelebA's list_attr_celeba.txt layout (a count line, the "
                                  "attribute names, then one line per image: file name and +1/-1 values)")
    names, rows = lines[1], {}
    for i, parts in enumerate(lines[2:], 3):
        values = parts[1:]
        if len(values) != len(names) or any(v not in ("1", "-1") for v in values):
            raise cohorts.CohortError(f"{path} line {i}: expected a file name and {len(names)} values of +1/-1, "
                                      f"got {' '.join(parts)[:120]!r}")
        rows[parts[0]] = (np.array(values, np.int8) > 0).astype(np.int8)
    return names, rows


def read_partition(path):
    """list_eval_partition.txt: `<file> 0|1|2` (train, val, test) -> {file name: split}."""
    if not os.path.exists(path):
        raise cohorts.CohortError(f"no split file {path}: give CelebA's {CELEBA_PARTITION} with --partition")
    out = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise cohorts.CohortError(f"{path} line {i}: expected `<file> 0|1|2`, got {line.strip()[:80]!r}")
            out[parts[0]] = int(parts[1])
    return out


def _select(available, wanted, source):
    """The requested attribute names (all when none are), each one of `available`; else stop with the list."""
    missing = [a for a in wanted if a not in available]
    if missing:
        raise cohorts.CohortError(f"{source}: no attribute column(s) {missing}; the columns found are "
                                  f"{list(available)}. Choose --attrs among them.")
    return list(wanted or available)


def celeba_records(cfg):
    """(records, schema kinds) of the celeba preset: one record per image listed in the attribute file."""
    names, table = read_celeba_attributes(cfg.csv)
    attrs = _select(names, cfg.attrs, cfg.csv)
    column = {n: i for i, n in enumerate(names)}
    partition = read_partition(cfg.partition or os.path.join(os.path.dirname(cfg.csv), CELEBA_PARTITION))
    files = {os.path.basename(p): p for p in find_images(cfg.images)}
    records, unmatched = [], sorted(set(files) - set(table))
    for name in sorted(table):
        if name in files and name in partition:
            records.append({"path": files[name], "subject": name, "split": partition[name],
                            "attrs": {a: float(table[name][column[a]]) for a in attrs}})
    orphans = sorted(set(table) - set(files))
    kinds = {a: ("binary", ["-1", "1"]) for a in attrs}
    return records, kinds, unmatched, orphans, CELEBA_MARGIN


def folder_records(cfg):
    """(records, kinds, ...) of the image-folder preset: a CSV row per image, its --id-column holding the file
    name (with or without its extension); --attr-columns name:column:kind as for --preset custom."""
    if not cfg.id_column or not cfg.attr_columns:
        raise cohorts.CohortError("--preset image-folder needs --id-column and --attr-columns name:column:kind,...")
    preset = cohorts.custom_preset(r"([^/\\]+)$", cfg.id_column, cfg.attr_columns)
    attrs = _select(list(preset.attrs), cfg.attrs, "--attr-columns")
    rows = cohorts.read_csv(cfg.csv, preset, attrs)
    by_id = {}
    for row in rows:
        by_id.setdefault(row[cfg.id_column].strip(), row)
    records, unmatched, used = [], [], set()
    for path in find_images(cfg.images):
        name = os.path.basename(path)
        key = name if name in by_id else os.path.splitext(name)[0]
        if key not in by_id:
            unmatched.append(path)
            continue
        used.add(key)
        records.append({"path": path, "subject": key, "row": by_id[key]})
    pairs = [(r["path"], None, r["row"]) for r in records]
    cohorts.check_labels(pairs, preset, attrs, cfg.csv)
    for r in records:
        row = r.pop("row")
        r["attrs"] = {a: preset.attrs[a].parse(row) for a in attrs}
    strata = [0] * len(records)
    split_of = assign_splits([r["subject"] for r in records], strata, cfg.split, cfg.seed)
    for r in records:
        r["split"] = split_of[r["subject"]]
    kinds = {a: (preset.attrs[a].kind, list(preset.attrs[a].classes)) for a in attrs}
    return records, kinds, unmatched, sorted(set(by_id) - used), 0


def build(cfg, summary, log=print):
    """The store of a 2D image dataset (cfg.preset celeba or image-folder); fills `summary`."""
    if not os.path.isdir(cfg.images):
        raise cohorts.CohortError(f"--images {cfg.images} is not a folder")
    reader = celeba_records if cfg.preset == "celeba" else folder_records
    records, kinds, summary.unmatched, summary.orphans, margin = reader(cfg)
    summary.stale = remove_stale_temporaries(cfg.out)
    absent = [r for r in records if any(isinstance(v, float) and math.isnan(v) for v in r["attrs"].values())]
    summary.skipped += [(r["path"], "missing attribute value in the CSV row") for r in absent]
    records = [r for r in records if r not in absent]
    channels = cfg.channels
    kept = []
    for r in tqdm(records, desc="checking images", unit="img"):
        try:
            image = decode(r["path"], channels)
            crop_box(image.shape[0], image.shape[1], margin)
        except BadImage as e:
            summary.skipped.append((r["path"], str(e)))
            continue
        channels = channels or image.shape[-1]
        r.update(slice_mm=np.zeros(1), visit="bl", csv={})
        kept.append(r)
    summary.volumes = len(kept)
    if not kept:
        for line in summary.lines():
            log(line)
        raise cohorts.CohortError(f"no usable image under {cfg.images} (summary above)")
    train = {a: [r["attrs"][a] for r in kept if r["split"] == 0] for a in kinds}
    schema = Schema([Attribute(a, k, list(c)).fit(train[a] or [0.0]) for a, (k, c) in kinds.items()])
    provenance = {"arguments": dict(cfg.__dict__), "csv": os.path.abspath(cfg.csv), "preset": cfg.preset,
                  "skipped": len(summary.skipped), "channels": int(channels)}
    with tqdm(total=len(kept), desc="images", unit="img") as bar:
        def load(i):
            bar.update(1)
            image, plan = prepare(kept[i]["path"], cfg.size, channels, margin)
            return (image[None, ..., 0] if channels == 1 else image[None]), plan
        write_store(cfg.out, kept, load, schema, cfg.size, provenance, channels=int(channels))
    return summary
