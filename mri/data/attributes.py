"""One attribute schema shared by every model.

Each attribute is one of three kinds:
- ``continuous`` (age, ADAS13, MMSE, ...): z-scored with train-split mean/std, one column, MSE loss;
- ``binary`` (sex, ...): 0/1, one column, binary cross-entropy on a logit;
- ``categorical`` (diagnosis CN/MCI/Dementia, CDR, ...): one-hot, one column per class, softmax cross-entropy.

Raw values are what the store holds: floats for continuous, 0/1 for binary, class indices for categorical.
The conditioning vector is the concatenation of the encoded attributes in schema order.
"""
import json
from dataclasses import dataclass, field

import numpy as np

KINDS = ("continuous", "binary", "categorical")
N_QUANTILES = 101


@dataclass
class Attribute:
    name: str
    kind: str
    classes: list = field(default_factory=list)   # categorical labels, or binary [label of 0, label of 1]
    mean: float = 0.0                              # continuous: train-split statistics
    std: float = 1.0
    quantiles: list = field(default_factory=list)  # continuous: train-split quantiles, for sampling

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attribute {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "categorical" and len(self.classes) < 2:
            raise ValueError(f"categorical attribute {self.name!r} needs at least two classes")

    @property
    def width(self):
        return len(self.classes) if self.kind == "categorical" else 1

    def fit(self, train_values):
        """Set the continuous statistics from train-split raw values."""
        if self.kind != "continuous":
            return self
        v = np.asarray(train_values, np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            raise ValueError(f"attribute {self.name!r} has no finite values in the train split")
        self.mean, self.std = float(v.mean()), float(v.std()) or 1.0
        self.quantiles = np.quantile(v, np.linspace(0, 1, N_QUANTILES)).tolist()
        return self

    def label(self, raw):
        """Human-readable value: a class name or a number."""
        if self.kind == "continuous":
            return f"{float(raw):.1f}"
        return str(self.classes[int(raw)]) if self.classes else str(int(raw))


class Schema:
    """Ordered attributes; encodes raw values to a conditioning vector and back."""

    def __init__(self, attributes):
        self.attributes = list(attributes)
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate attribute names in {names}")
        self.slices, start = {}, 0
        for a in self.attributes:
            self.slices[a.name] = slice(start, start + a.width)
            start += a.width
        self.width = start

    def __getitem__(self, name):
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(f"no attribute {name!r}; schema has {self.names}")

    @property
    def names(self):
        return [a.name for a in self.attributes]

    def select(self, names):
        """A schema with only `names`, in that order (clear error for unknown names)."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise KeyError(f"attributes {missing} not in the store; available: {self.names}")
        return Schema([self[n] for n in names])

    # --- raw <-> vector -------------------------------------------------------------------------
    def encode(self, raw):
        """dict name -> (N,) raw values  ->  (N, width) float32 conditioning vectors."""
        n = len(np.atleast_1d(raw[self.names[0]]))
        out = np.zeros((n, self.width), np.float32)
        for a in self.attributes:
            v = np.asarray(raw[a.name]).reshape(n)
            s = self.slices[a.name]
            if a.kind == "continuous":
                out[:, s] = ((v.astype(np.float64) - a.mean) / a.std)[:, None]
            elif a.kind == "binary":
                out[:, s] = v.astype(np.float32)[:, None]
            else:
                idx = v.astype(np.int64)
                if idx.min(initial=0) < 0 or idx.max(initial=0) >= a.width:
                    raise ValueError(f"attribute {a.name!r}: class index out of range 0..{a.width - 1}")
                out[np.arange(n), s.start + idx] = 1.0
        return out

    def decode(self, vectors):
        """(N, width) vectors (or model outputs: logits for binary/categorical) -> dict of raw values."""
        y = np.asarray(vectors, np.float32)
        out = {}
        for a in self.attributes:
            v = y[:, self.slices[a.name]]
            if a.kind == "continuous":
                out[a.name] = v[:, 0] * a.std + a.mean
            elif a.kind == "binary":
                out[a.name] = (v[:, 0] > 0.5).astype(np.int64)
            else:
                out[a.name] = v.argmax(axis=1)
        return out

    def decode_logits(self, logits):
        """Model predictions (logits) -> raw values: binary thresholded at logit 0."""
        z = np.asarray(logits, np.float32).copy()
        for a in self.attributes:
            if a.kind == "binary":
                s = self.slices[a.name]
                z[:, s] = (z[:, s] > 0).astype(np.float32)
        return self.decode(z)

    def probability(self, logits, name, values):
        """The probability model logits (N, width) give to the raw values (N,) of binary or categorical
        attribute `name` (sigmoid / softmax), e.g. an oracle's belief in a requested diagnosis."""
        a, z = self[name], np.asarray(logits, np.float64)[:, self.slices[name]]
        v = np.asarray(values, np.int64)
        if a.kind == "continuous":
            raise ValueError(f"attribute {name!r} is continuous: it has no class probabilities")
        if a.kind == "binary":
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.where(v == 1, p1, 1.0 - p1)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z[np.arange(len(v)), v] / z.sum(axis=1)

    # --- losses (keras ops, usable inside train_step) -------------------------------------------
    def losses(self, y_true, y_pred):
        """Per-attribute mean losses: MSE (continuous), BCE on logits (binary), softmax CE (categorical)."""
        from keras import ops
        out = {}
        for a in self.attributes:
            s = self.slices[a.name]
            t, p = y_true[:, s], y_pred[:, s]
            if a.kind == "continuous":
                out[a.name] = ops.mean(ops.square(t - p))
            elif a.kind == "binary":
                out[a.name] = ops.mean(ops.binary_crossentropy(t, p, from_logits=True))
            else:
                out[a.name] = ops.mean(ops.categorical_crossentropy(t, p, from_logits=True))
        return out

    def loss(self, y_true, y_pred):
        """Sum of the per-attribute losses."""
        return sum(self.losses(y_true, y_pred).values())

    # --- "other value" sampling -----------------------------------------------------------------
    def flip(self, y, seed):
        """Another value of every attribute (keras ops, `seed` a keras.random.SeedGenerator):
        binary 1-y, categorical a different class uniformly, continuous a fresh draw from the
        train distribution (inverse CDF of the stored quantiles)."""
        import keras
        from keras import ops
        n = ops.shape(y)[0]
        parts = []
        for a in self.attributes:
            s = self.slices[a.name]
            if a.kind == "binary":
                parts.append(1.0 - y[:, s])
            elif a.kind == "categorical":
                k = a.width
                current = ops.argmax(y[:, s], axis=1)
                shift = keras.random.randint((n,), 1, k, seed=seed)
                parts.append(ops.one_hot((current + ops.cast(shift, current.dtype)) % k, k))
            else:
                q = (np.asarray(a.quantiles or [a.mean - 2 * a.std, a.mean + 2 * a.std]) - a.mean) / a.std
                u = keras.random.uniform((n,), seed=seed) * (len(q) - 1)
                lo = ops.cast(ops.floor(u), "int32")
                hi = ops.minimum(lo + 1, len(q) - 1)
                frac = u - ops.cast(lo, u.dtype)
                qt = ops.convert_to_tensor(q.astype(np.float32))
                z = ops.take(qt, lo) * (1.0 - frac) + ops.take(qt, hi) * frac
                parts.append(z[:, None])
        return ops.cast(ops.concatenate(parts, axis=1), "float32")

    # --- (de)serialisation -----------------------------------------------------------------------
    def to_json(self):
        return json.dumps([a.__dict__ for a in self.attributes])

    @classmethod
    def from_json(cls, text):
        return cls.from_records(json.loads(text))

    @classmethod
    def from_records(cls, records):
        """The schema of `to_json`'s records once parsed (e.g. a run's config.json "schema")."""
        return cls([Attribute(**d) for d in records])
