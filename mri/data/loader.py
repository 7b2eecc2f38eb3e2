"""tf.data pipeline over a slice store: (images (B, S, S, C) float32 in [-1, 1], encoded attributes (B, width)),
C the store's channels (1 for MRI slices).

Images are read from disk batch by batch (a store larger than memory works). The order is a pure function
of (seed, step): epoch e is a permutation seeded by (seed, e), so a resumed run that starts at `start_step`
sees exactly the batches an uninterrupted run would have seen. Two groups of slices defined by one attribute
(`Domains`, CycleGAN's) are drawn in equal numbers by `Paired`; VA-GAN's source slices with real partners at
the same axial index, several draws per step, by `CriticDraws`.
"""
import re
from dataclasses import dataclass

import numpy as np

from mri.data.store import SliceStore


class Batches:
    """Deterministic, resumable batches of one split of a store (NumPy side)."""

    def __init__(self, store, split="train", attrs=None, batch_size=32, seed=0, shuffle=True, jitter=0.0,
                 subset=None, name=""):
        """`subset`: store indices to keep (e.g. one group of slices), intersected with the split; `name`
        names that subset in errors."""
        self.store = store if isinstance(store, SliceStore) else SliceStore(store)
        self.schema = self.store.schema.select(attrs) if attrs else self.store.schema
        self.index = self.store.indices(split)
        if subset is not None:
            self.index = self.index[np.isin(self.index, subset)]
        if len(self.index) < batch_size:
            need = f"{batch_size} a batch" if name else f"--batch-size {batch_size}"
            raise ValueError(f"{self.store.path}: the {split!r} split has {len(self.index)} slices"
                             f"{' of ' + name if name else ''}, fewer than {need}")
        self.y = self.store.encoded(self.index, self.schema)
        self.batch_size, self.seed, self.shuffle, self.jitter = batch_size, seed, shuffle, jitter
        self.steps_per_epoch = len(self.index) // batch_size

    def positions(self, step):
        """Positions (into this split) of the batch at global `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.index))
                 if self.shuffle else np.arange(len(self.index)))
        return order[k * self.batch_size:(k + 1) * self.batch_size]

    def batch(self, step):
        pos = self.positions(step)
        x = self.store.pixels(self.index[pos])
        if self.jitter:
            x = jitter(x, self.jitter, np.random.default_rng([self.seed, step, 1]))
        return x, self.y[pos]

    def __call__(self, start_step=0):
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


class Paired:
    """Batches of two groups of slices in equal numbers (CycleGAN's domains): batch(step) is a's batch at `step`
    followed by b's. Each group is its own seeded Batches, so a batch is still a pure function of the step;
    an epoch is one pass over the larger group (the smaller one starts its next permutation sooner)."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.store, self.schema = a.store, a.schema
        self.batch_size = a.batch_size + b.batch_size
        self.steps_per_epoch = max(a.steps_per_epoch, b.steps_per_epoch)

    def batch(self, step):
        (xa, ya), (xb, yb) = self.a.batch(step), self.b.batch(step)
        return np.concatenate([xa, xb]), np.concatenate([ya, yb])

    __call__ = Batches.__call__


class VisitPairs:
    """Batches of visit pairs of one split (the longitudinal model's): every ordered pair (s, t) of two visits
    of one subject at the same axial index (registered by data_prep, so the same anatomy). batch(step) is
    (images (B, S, S, 2C): source then target, conditions (B, 2 width + 1): encoded source attributes, encoded
    target attributes, age difference in years), a pure function of (seed, step) like Batches."""

    def __init__(self, store, split="train", attrs=None, batch_size=32, seed=0):
        self.store = store if isinstance(store, SliceStore) else SliceStore(store)
        self.schema = self.store.schema.select(attrs) if attrs else self.store.schema
        if "age" not in self.schema.names:
            raise ValueError(f"{self.store.path}: visit pairs need the 'age' attribute (the time between visits)")
        idx = self.store.indices(split)
        groups = {}
        for i in idx:
            groups.setdefault((self.store.subject[i], int(self.store.slice[i])), []).append(i)
        self.pairs = np.array([(a, b) for g in groups.values() for a in g for b in g if a != b], np.int64).reshape(-1, 2)
        if len(self.pairs) < batch_size:
            raise ValueError(f"{self.store.path}: the {split!r} split has {len(self.pairs)} visit pairs (subjects "
                             f"with two or more visits), fewer than --batch-size {batch_size}")
        self.y = {int(i): v for i, v in zip(idx, self.store.encoded(idx, self.schema))}
        self.age = self.store.attrs["age"]
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_epoch = len(self.pairs) // batch_size

    def batch(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        s, t = self.pairs[order[k * self.batch_size:(k + 1) * self.batch_size]].T
        x = np.concatenate([self.store.pixels(s), self.store.pixels(t)], axis=-1)
        cond = np.concatenate([np.stack([self.y[int(i)] for i in s]), np.stack([self.y[int(i)] for i in t]),
                               (self.age[t] - self.age[s])[:, None]], axis=1)
        return x, cond.astype(np.float32)

    __call__ = Batches.__call__


class CriticDraws:
    """VA-GAN's batches (models/vagan.py): generator step t gets draws(t) fresh draws (one per critic step, one for
    the generator), each a batch of `source` (a Batches, draw d being its batch at global step d) with, for every
    source slice, a real partner: a slice of the same split at the same axial index, uniform (seeded by (seed, d,
    2)), whose attributes are the target. batch(t) = (images (k, B, S, S, 2): source then partner, attributes (k,
    B, 2 width): the source's then the partner's encoded), k = draws(t); a pure function of (seed, t).
    `draws`: vectorised, an array of steps -> an array of counts >= 1. An epoch is one pass over the split."""
    varying = (True, True)   # dataset(): the leading dimension of both arrays changes with the step

    def __init__(self, source, draws):
        self.source, self.draws = source, draws
        self.store, self.schema, self.batch_size = source.store, source.schema, source.batch_size
        self.position = self.store.slice[source.index]
        self.band = {p: np.flatnonzero(self.position == p) for p in np.unique(self.position)}
        passes = np.cumsum(draws(np.arange(source.steps_per_epoch)))
        self.steps_per_epoch = int(np.searchsorted(passes, source.steps_per_epoch)) + 1

    def partners(self, d):
        """(store indices of draw d's source slices, store indices of their real partners)."""
        pos = self.source.positions(d)
        rng = np.random.default_rng([self.source.seed, d, 2])
        partner = np.array([rng.choice(self.band[p]) for p in self.position[pos]])
        return self.source.index[pos], self.source.index[partner]

    def draw(self, d):
        x, y = self.source.batch(d)
        partner = self.partners(d)[1]
        r = self.store.pixels(partner)
        if self.source.jitter:
            r = jitter(r, self.source.jitter, np.random.default_rng([self.source.seed, d, 3]))
        return np.concatenate([x, r], axis=-1), np.concatenate([y, self.store.encoded(partner, self.schema)], axis=1)

    def batch(self, step):
        first = int(np.sum(self.draws(np.arange(step))))
        images, attrs = zip(*(self.draw(first + j) for j in range(int(self.draws(np.array([step]))[0]))))
        return np.stack(images), np.stack(attrs)

    __call__ = Batches.__call__


class WithPairs:
    """VA-GAN's batches with visit pairs (`--pair-weight`): batch(step) = CriticDraws' (images, attributes) followed
    by VisitPairs' (images, conditions) at the same step, for the generator's pair loss. Epochs are the draws'."""

    def __init__(self, draws, pairs):
        self.draws, self.pairs = draws, pairs
        self.store, self.schema, self.batch_size = draws.store, draws.schema, draws.batch_size
        self.steps_per_epoch = draws.steps_per_epoch
        self.varying = draws.varying + (False, False)

    def batch(self, step):
        return (*self.draws.batch(step), *self.pairs.batch(step))

    __call__ = Batches.__call__


DOMAINS_USAGE = ("--domains takes ATTR=CLASS_A:CLASS_B (two classes, e.g. dx=CN:Dementia) or ATTR<V:ATTR>=W (two "
                 "disjoint ranges of one continuous attribute, e.g. age<65:age>=75; < <= > >=)")
SIDE = re.compile(r"^\s*(\w+)\s*(<=|>=|<|>|=)\s*(\S.*?)\s*$")
OPS = {"=": np.equal, "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


@dataclass(frozen=True)
class Domains:
    """Two disjoint groups of slices, A and B, by attribute `name`: each (operator, raw value), a class k ("=", k)."""
    name: str
    a: tuple
    b: tuple

    def which(self, raw):
        """(N,) 0 for raw values in A, 1 in B, -1 in neither (`raw`: {name: (N,) raw values})."""
        v = np.asarray(raw[self.name], np.float64)
        return np.where(OPS[self.a[0]](v, self.a[1]), 0, np.where(OPS[self.b[0]](v, self.b[1]), 1, -1))


def domain_attribute(spec):
    """The attribute a --domains value names (its first word)."""
    match = re.match(r"\s*(\w+)", spec)
    if not match:
        raise ValueError(f"{DOMAINS_USAGE}; got {spec!r}")
    return match[1]


def parse_domains(spec, schema):
    """Domains of a --domains value (DOMAINS_USAGE), checked against `schema`: known classes, disjoint ranges."""
    parts = spec.split(":")
    first = SIDE.match(parts[0]) if len(parts) == 2 else None
    second = SIDE.match(parts[1]) if first else None
    if not first or (first[2] == "=") == bool(second):
        raise ValueError(f"{DOMAINS_USAGE}; got {spec!r}")
    if second and second[1] != first[1]:
        raise ValueError(f"--domains {spec!r}: both ranges must be of one attribute")
    attribute, sides = schema[first[1]], [first.groups()[1:], second.groups()[1:] if second else ("=", parts[1])]
    if (attribute.kind == "continuous") == (first[2] == "="):
        raise ValueError(f"--domains {spec!r}: {attribute.name!r} is {attribute.kind}; {DOMAINS_USAGE}")
    try:
        sides = [(op, class_index(attribute, v.strip()) if op == "=" else float(v)) for op, v in sides]
    except ValueError as e:
        raise ValueError(f"--domains {spec!r}: {e}") from None
    # two one-sided ranges (or two points) meet, if at all, at a bound, between the bounds or beyond both
    bounds = np.array([sides[0][1], sides[1][1]])
    probes = np.concatenate([bounds, [bounds.mean(), bounds.min() - 1, bounds.max() + 1]])
    if (OPS[sides[0][0]](probes, sides[0][1]) & OPS[sides[1][0]](probes, sides[1][1])).any():
        raise ValueError(f"--domains {spec!r}: the two domains overlap")
    return Domains(attribute.name, *sides)


def class_index(attribute, label):
    labels = list(attribute.classes) or ["0", "1"]
    if label not in labels:
        raise ValueError(f"{attribute.name!r} has the classes {labels}, not {label!r}")
    return float(labels.index(label))


def domain_batches(store, domains, attrs, batch_size, seed, jitter=0.0, n_samples=2):
    """(train, samples): Paired batches of the domains' train slices, batch_size // 2 of each, seeded by 2 seed
    and 2 seed + 1; and fixed ones for sample grids, n_samples of each domain from the val split (from the train
    split if the val split has too few)."""
    which = domains.which(store.attrs)
    paired = lambda split, n, shuffle: Paired(*(
        Batches(store, split, attrs, n, 2 * seed + k, shuffle, jitter if shuffle else 0.0, np.flatnonzero(which == k),
                f"domain {'AB'[k]}") for k in (0, 1)))
    try:
        samples = paired("val", n_samples, False)
    except ValueError:
        samples = paired("train", n_samples, False)
    return paired("train", batch_size // 2, True), samples


def jitter(x, amount, rng):
    """Brightness/contrast jitter of [-1, 1] images: x -> clip(c * x + b) with c ~ U(1 +/- amount),
    b ~ U(+/- amount), per image."""
    n = x.shape[0]
    c = rng.uniform(1 - amount, 1 + amount, (n, 1, 1, 1)).astype(np.float32)
    b = rng.uniform(-amount, amount, (n, 1, 1, 1)).astype(np.float32)
    return np.clip(c * x + b, -1.0, 1.0)


def dataset(batches, start_step=0, prefetch=2):
    """Infinite tf.data.Dataset of `batches` from `start_step`, prefetched."""
    import tensorflow as tf
    first = batches.batch(start_step)
    varying = getattr(batches, "varying", (False,) * len(first))   # arrays whose leading dimension changes
    spec = tuple(tf.TensorSpec(((None,) + a.shape[1:]) if v else a.shape, tf.float32) for a, v in zip(first, varying))
    ds = tf.data.Dataset.from_generator(lambda: batches(start_step), output_signature=spec)
    return ds.prefetch(prefetch)


def make_dataset(store, split="train", attrs=None, batch_size=32, seed=0, shuffle=True, jitter=0.0, start_step=0):
    """Convenience: Batches + dataset in one call. Returns (dataset, batches)."""
    b = Batches(store, split, attrs, batch_size, seed, shuffle, jitter)
    return dataset(b, start_step), b
