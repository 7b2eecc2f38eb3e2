"""The HDF5 slice store: layout, writing from per-volume parts, subject-level splits, reading.

Layout (README "The slice store" documents it for users):
    images        (N, S, S) float16 in [-1, 1], one slice per chunk, gzip; (N, S, S, C) for C > 1 channels
                  (2D image datasets in colour, mri/data/images.py)
    subject       (N,) str      visit (N,) str      slice (N,) int16 axial index (0 = most inferior)
    slice_mm      (N,) float32  axial offset from the brain's centre of mass, mm
    split         (N,) int8     0 train / 1 val / 2 test, assigned by subject
    volume        (N,) int32    row in volumes/
    attrs/<name>  (N,) float32  raw value: years/points, 0/1 (binary), class index (categorical)
    csv/<column>  (N,) float64  extra CSV columns kept verbatim (the synthetic cohort's ground-truth keys)
    volumes/path, volumes/plan  per volume: source file and preprocessing plan (JSON)
    file attrs:   schema (JSON), size, channels (absent in stores written before it: 1), provenance (JSON)
"""
import json

import h5py
import numpy as np

from mri.data.attributes import Attribute, Schema
from mri.data.io import atomic_path

SPLITS = {"train": 0, "val": 1, "test": 2}
VERSION = "0.1.0"


class StoreError(ValueError):
    """A store that cannot be read; the message names the file and the fix."""


def assign_splits(subjects, strata, fractions, seed):
    """Subject -> split id. Subjects are shuffled (seeded) within strata, then dealt out so that each
    split's share stays as close as possible to `fractions` along the ordered list (stratified)."""
    rng = np.random.default_rng(seed)
    by_stratum = {}
    for s, k in sorted(zip(subjects, strata)):
        by_stratum.setdefault(k, []).append(s)
    order = []
    for k in sorted(by_stratum):
        members = by_stratum[k]
        order += [members[i] for i in rng.permutation(len(members))]
    fractions = np.asarray(fractions, np.float64) / np.sum(fractions)
    counts = np.zeros(len(fractions))
    out = {}
    for i, s in enumerate(order):
        split = int(np.argmax(fractions * (i + 1) - counts))
        counts[split] += 1
        out[s] = split
    return out


def write_store(path, volumes, load, schema, size, provenance, keep_columns=(), channels=1):
    """Write the store atomically. `volumes` holds each volume's small metadata (subject, visit, split,
    attrs {name: value}, csv {column: value}, path, slice_mm); `load(i)` returns volume i's
    (slices (n, S, S) or (n, S, S, channels), plan), so only one volume is in memory at a time."""
    n = int(sum(len(v["slice_mm"]) for v in volumes))
    if n == 0:
        raise StoreError(f"{path}: no slices to write (every volume was skipped); see the summary above")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            pixel = (size, size) if channels == 1 else (size, size, channels)
            img = f.create_dataset("images", (n, *pixel), np.float16, chunks=(1, *pixel),
                                   compression="gzip", compression_opts=4, shuffle=True)
            text = h5py.string_dtype()
            per_slice = {"subject": text, "visit": text, "slice": np.int16, "slice_mm": np.float32,
                         "split": np.int8, "volume": np.int32}
            per_slice = {k: np.empty(n, object if t is text else t) for k, t in per_slice.items()}
            attrs = {a.name: np.empty(n, np.float32) for a in schema.attributes}
            kept = {c: np.empty(n, np.float64) for c in keep_columns}
            plans = []
            start = 0
            for i, v in enumerate(volumes):
                slices, plan = load(i)
                sl = slice(start, start + len(slices))
                img[sl] = slices.astype(np.float16)
                per_slice["subject"][sl], per_slice["visit"][sl] = v["subject"], v["visit"]
                per_slice["slice"][sl], per_slice["slice_mm"][sl] = np.arange(len(slices)), v["slice_mm"]
                per_slice["split"][sl], per_slice["volume"][sl] = v["split"], i
                for name in attrs:
                    attrs[name][sl] = v["attrs"][name]
                for c in kept:
                    kept[c][sl] = v["csv"][c]
                plans.append(json.dumps(plan))
                start = sl.stop
            for k, arr in per_slice.items():
                f.create_dataset(k, data=arr, dtype=text if arr.dtype == object else arr.dtype)
            for name, arr in attrs.items():
                f.create_dataset(f"attrs/{name}", data=arr)
            for c, arr in kept.items():
                f.create_dataset(f"csv/{c}", data=arr)
            f.create_dataset("volumes/path", data=np.array([v["path"] for v in volumes], object), dtype=text)
            f.create_dataset("volumes/plan", data=np.array(plans, object), dtype=text)
            f.attrs["schema"] = schema.to_json()
            f.attrs["size"] = size
            f.attrs["channels"] = channels
            f.attrs["provenance"] = json.dumps(dict(provenance, version=VERSION, volumes=len(volumes), slices=n))


class SliceStore:
    """Read access to a store. Small per-slice arrays are loaded at once; images stay on disk."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.file = h5py.File(self.path, "r")
        except (OSError, FileNotFoundError) as e:
            raise StoreError(f"cannot open store {self.path} ({e}); build one with "
                             f"`python data_prep.py --synthetic 200 --out {self.path}`") from e
        f = self.file
        missing = [k for k in ("images", "split", "subject", "attrs") if k not in f] + \
                  [k for k in ("schema", "size") if k not in f.attrs]
        if missing:
            raise StoreError(f"{self.path} is not a slice store (missing {missing}); build it with data_prep.py")
        self.images_ds = f["images"]
        if self.images_ds.shape[0] == 0:
            raise StoreError(f"{self.path} is an empty store (0 slices); rebuild it with data_prep.py")
        self.schema = Schema.from_json(f.attrs["schema"])
        self.size = int(f.attrs["size"])
        self.channels = int(f.attrs.get("channels", 1))
        self.provenance = json.loads(f.attrs.get("provenance", "{}"))
        self.split = f["split"][:]
        self.subject = f["subject"].asstr()[:]
        self.visit = f["visit"].asstr()[:]
        self.slice = f["slice"][:]
        self.volume = f["volume"][:]
        self.attrs = {a.name: f[f"attrs/{a.name}"][:] for a in self.schema.attributes}

    def __len__(self):
        return self.images_ds.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.file.close()

    def indices(self, split):
        """Slice indices of a split ('train', 'val', 'test' or 'all')."""
        if split == "all":
            return np.arange(len(self))
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)} or 'all', got {split!r}")
        idx = np.flatnonzero(self.split == SPLITS[split])
        if idx.size == 0:
            raise StoreError(f"{self.path}: the {split!r} split is empty; rebuild with more subjects or other --split")
        return idx

    def images(self, idx):
        """float32 (n, S, S) for any order of indices (h5py needs increasing ones); (n, S, S, C) in a store
        of C > 1 channels."""
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        block = self.images_ds[uniq].astype(np.float32)
        out = np.empty((len(idx),) + self.images_ds.shape[1:], np.float32)
        out[order] = block[inverse]
        return out

    def pixels(self, idx):
        """float32 (n, S, S, C) at `idx`, whatever the channels: what the models take."""
        return channels_last(self.images(idx), self.channels)

    def raw(self, idx, names=None):
        """dict name -> raw attribute values at `idx`."""
        names = names or self.schema.names
        return {n: self.attrs[n][idx] for n in names}

    def encoded(self, idx, schema=None):
        """(n, width) conditioning vectors at `idx` for `schema` (default: the store's)."""
        schema = schema or self.schema
        return schema.encode(self.raw(idx, schema.names))

    def view(self, split):
        """A `SplitView` of one split: what a method may be fitted on."""
        return SplitView(self, split)

    def csv(self, column, idx=None):
        """An extra CSV column kept at build time (e.g. the synthetic cohort's ground-truth keys)."""
        if f"csv/{column}" not in self.file:
            raise StoreError(f"{self.path} has no csv/{column}: it was not built with that column kept")
        ds = self.file[f"csv/{column}"]
        return ds[:] if idx is None else ds[:][idx]

    def plan(self, volume):
        return json.loads(self.file["volumes/plan"][volume])


class SplitView:
    """One split of a store and nothing else: its slices' images, raw attributes and axial positions
    (`slice`), addressed by row 0..len-1 within the split. It keeps no file, path, plan or CSV column, so
    whatever is fitted through it can read no other split and cannot re-render a synthetic counterfactual."""

    def __init__(self, store, split):
        rows = store.indices(split)
        self.split, self.schema, self.size, self.channels = split, store.schema, store.size, store.channels
        self.slice = store.slice[rows]
        self._attrs = {n: v[rows] for n, v in store.attrs.items()}
        self._read = lambda r: store.images(rows[r])

    def __len__(self):
        return len(self.slice)

    def _rows(self, r):
        r = np.asarray(r, np.int64)
        if r.size and (r.min() < 0 or r.max() >= len(self)):
            raise IndexError(f"rows of the {self.split} split run from 0 to {len(self) - 1}")
        return r

    def images(self, r):
        """float32 (n, S, S) of split rows r."""
        return self._read(self._rows(r))

    def pixels(self, r):
        """float32 (n, S, S, C) of split rows r."""
        return channels_last(self.images(r), self.channels)

    def raw(self, r, names=None):
        """dict name -> raw attribute values at split rows r."""
        r = self._rows(r)
        return {n: self._attrs[n][r] for n in names or self.schema.names}


def channels_last(images, channels):
    """(n, S, S) images of a one-channel store as (n, S, S, 1); (n, S, S, C) as they are."""
    return images[..., None] if channels == 1 else images


def make_schema(kinds_classes, train_values):
    """Schema from {name: (kind, classes)} and train-split raw values {name: array}."""
    return Schema([Attribute(n, k, list(c)).fit(train_values[n]) for n, (k, c) in kinds_classes.items()])
