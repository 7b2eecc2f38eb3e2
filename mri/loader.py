"""tf.data pipeline over a slice store: (images (B, S, S, 1) float32 in [-1, 1], encoded attributes (B, width)).

Images are read from disk batch by batch (a store larger than memory works). The order is a pure function
of (seed, step): epoch e is a permutation seeded by (seed, e), so a resumed run that starts at `start_step`
sees exactly the batches an uninterrupted run would have seen.
"""
import numpy as np

from mri.store import SliceStore


class Batches:
    """Deterministic, resumable batches of one split of a store (NumPy side)."""

    def __init__(self, store, split="train", attrs=None, batch_size=32, seed=0, shuffle=True, jitter=0.0):
        self.store = store if isinstance(store, SliceStore) else SliceStore(store)
        self.schema = self.store.schema.select(attrs) if attrs else self.store.schema
        self.index = self.store.indices(split)
        if len(self.index) < batch_size:
            raise ValueError(f"{self.store.path}: the {split!r} split has {len(self.index)} slices, "
                             f"fewer than --batch-size {batch_size}")
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
        x = self.store.images(self.index[pos])[..., None]
        if self.jitter:
            x = jitter(x, self.jitter, np.random.default_rng([self.seed, step, 1]))
        return x, self.y[pos]

    def __call__(self, start_step=0):
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


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
    s, w = batches.store.size, batches.schema.width
    spec = (tf.TensorSpec((batches.batch_size, s, s, 1), tf.float32), tf.TensorSpec((batches.batch_size, w), tf.float32))
    ds = tf.data.Dataset.from_generator(lambda: batches(start_step), output_signature=spec)
    return ds.prefetch(prefetch)


def make_dataset(store, split="train", attrs=None, batch_size=32, seed=0, shuffle=True, jitter=0.0, start_step=0):
    """Convenience: Batches + dataset in one call. Returns (dataset, batches)."""
    b = Batches(store, split, attrs, batch_size, seed, shuffle, jitter)
    return dataset(b, start_step), b
