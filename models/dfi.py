"""Deep Feature Interpolation (Upchurch et al. CVPR 2017) with neighbours in attribute space, as the report used it.

Nothing adversarial is trained: `DFI.fit` caches the feature vectors of the train split once, and `manipulate`
shifts a slice's deep features towards its target attributes, then reconstructs the image that has them.

    phi(x)      post-ReLU maps at three scales, flattened and concatenated (models/feature_networks.py): VGG19's
                conv3_1, conv4_1, conv5_1, or the first conv of the last three pooling levels of a store-trained
                oracle-style network (the same scales, 1/4, 1/8 and 1/16 of a 128 px slice)
    S, T        the k train slices nearest to the source / the target attributes in Mahalanobis distance
                sqrt((a - b)^T VI (a - b)) over the schema codes (continuous z-scored, categorical one-hot),
                VI = pinv(covariance of the train codes), among other subjects' slices within `window`
                positions of the source slice
    w           = mean_T phi - mean_S phi, not normalised: alpha = 1 adds the neighbour sets' mean difference
                  itself, whatever the feature network's scale (a factor on phi scales w and phi(x) alike; the
                  reference code divides w by its mean square instead); tv_weight, weighed against a squared
                  feature error, does depend on that scale
    z*(alpha)   = argmin_z 1/2 ||phi(z) - (phi(x) + alpha w)||^2 + tv_weight TV(z),  z in [-1, 1], for each slice
                  on its own: box-constrained L-BFGS from z = x for `iterations` iterations, the batch's values
                  and gradients from one TensorFlow call (models/lbfgs.py; not scipy's L-BFGS-B, which has no
                  batched mode: one call over a batch's summed objectives couples its slices until convergence)
    TV(z)       = sum_ij ((z[i+1,j] - z[i,j])^2 + (z[i,j+1] - z[i,j])^2 + TV_EPS)^(tv_beta / 2)
    manipulate  = z*(alpha)                         (mode "decode")
                = clip(x + z*(alpha) - z*(0))       (mode "residual": the reconstruction's own drift cancels)
A DFI remembers neighbour-set means and each slice's z*(0) (up to 256 MB each): they recur, in a change and its
reverse, and for every target of one source.
"""
import collections
import functools
import hashlib
import os

import h5py
import numpy as np
import tensorflow as tf
from keras import ops

from models import lbfgs
from models.feature_networks import features_from_args
from models.layers import single_blas_thread
from mri.data.attributes import Schema
from mri.data.io import atomic_path
from mri.training import load_config

MODES = ("decode", "residual")
TV_EPS = 1e-8
FEATURES_FILE = "features.h5"
MEAN_CACHE_BYTES = UNSHIFTED_CACHE_BYTES = 2 ** 28


# --- features -----------------------------------------------------------------------------------------------
def flat_features(net, z):
    return ops.concatenate([ops.reshape(f, (ops.shape(z)[0], -1)) for f in net(z, training=False)], axis=1)


def total_variation(z, beta):
    """TV(z) per image (N,) of (N, S, S, C) images: sum over pixels of (dx^2 + dy^2 + TV_EPS)^(beta / 2)."""
    dx, dy = z[:, :-1, 1:, :] - z[:, :-1, :-1, :], z[:, 1:, :-1, :] - z[:, :-1, :-1, :]
    return ops.sum((dx ** 2 + dy ** 2 + TV_EPS) ** (beta / 2), axis=(1, 2, 3))


# --- neighbours in attribute space ------------------------------------------------------------------------------
class Neighbours:
    """k nearest pool slices (Mahalanobis over attribute codes), same position +- window, other subjects."""

    def __init__(self, codes, position, subject, window=1):
        self.codes, self.position, self.subject, self.window = np.asarray(codes, np.float64), position, subject, window
        self.vi = np.linalg.pinv(np.atleast_2d(np.cov(codes, rowvar=False)))

    def query(self, codes, position, subject, k):
        """(Q, k) pool rows, nearest first (ties by row). position None: any; subject "": none excluded."""
        out = np.empty((len(codes), k), np.int64)
        for i, q in enumerate(codes):
            rows = self.candidates(None if position is None else position[i], subject[i], k)
            d = self.codes[rows] - q
            dist = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, self.vi, d), 0))
            out[i] = rows[np.lexsort((rows, dist))[:k]]
        return out

    def candidates(self, position, subject, k):
        """Pool rows within `window` positions of `position`, not of `subject`; at least k of them."""
        ok = self.subject != subject
        if position is not None and self.window is not None:
            ok &= np.abs(self.position - position) <= self.window
        rows = np.flatnonzero(ok)
        if len(rows) < k:
            raise ValueError(f"only {len(rows)} train slices within {self.window} positions of position {position} "
                             f"from other subjects, fewer than k = {k} (train_dfi.py --k, in the run's config.json): "
                             "lower --k or widen --window")
        return rows

    def check(self, k):
        """The candidates' ValueError if a query at a pool position, from outside the pool, has fewer than k."""
        for p in np.unique(self.position):
            self.candidates(p, "", k)


def check_k(store, schema, k, window):
    """train_dfi.py's check of --k against the store's train split, before anything is written."""
    idx = store.indices("train")
    Neighbours(schema.encode(store.raw(idx)), store.slice[idx], store.subject[idx].astype(str), window).check(k)


# --- reconstruction ----------------------------------------------------------------------------------------------
class Reconstructor:
    """z* of each slice of a batch by its own box-constrained L-BFGS (models/lbfgs.py): the values and gradients
    of the slices still searching come from one compiled TensorFlow call (float64 sums, so the line search sees
    small decreases). A slice's result does not depend on its batch mates."""

    def __init__(self, net, tv_weight=0.0, tv_beta=2.0, iterations=150):
        self.net, self.iterations = net, iterations
        self.tv_weight, self.tv_beta = float(tv_weight), float(tv_beta)
        self._value_and_grad = tf.function(self._objective, reduce_retracing=True)
        self.last_result = None

    def features(self, images):
        """phi (N, F); one image goes as a pair, as in the objective (below)."""
        x = np.asarray(images, np.float32)
        return ops.convert_to_numpy(flat_features(self.net, np.concatenate([x, x]) if len(x) == 1 else x))[:len(x)]

    def _objective(self, z, target, rows, tv_weight, tv_beta):
        """Each slice's objective (N,) and its gradient: that of their sum, since they are independent."""
        with tf.GradientTape() as tape:
            tape.watch(z)
            diff = ops.cast(flat_features(self.net, z) - tf.gather(target, rows), "float64")
            loss = 0.5 * ops.sum(diff ** 2, axis=1) + tv_weight * ops.cast(total_variation(z, tv_beta), "float64")
            total = ops.sum(loss)
        return loss, tape.gradient(total, z)

    def __call__(self, x, target):
        """Each slice's argmin over z of (N, S, S, C), from z = x, within [-1, 1]."""
        shape = (-1, *x.shape[1:])
        target = tf.constant(target, tf.float32)
        tv = (tf.constant(self.tv_weight, tf.float64), tf.constant(self.tv_beta, tf.float32))   # not baked in a trace

        def f(z, rows):
            """Values and gradients of the slices `rows` at z. One slice goes as a pair: TensorFlow's CPU kernels
            take another path for a batch of one (the last bits differ, and L-BFGS amplifies them); from two on,
            a slice's numbers do not depend on its batch mates."""
            n = len(rows)
            if n == 1:
                z, rows = np.concatenate([z, z]), np.concatenate([rows, rows])
            loss, grad = self._value_and_grad(tf.constant(z.reshape(shape), tf.float32), target,
                                              tf.constant(rows, tf.int32), *tv)
            return loss.numpy()[:n], grad.numpy()[:n].reshape(n, -1)

        with single_blas_thread():
            z, self.last_result = lbfgs.minimize(f, np.reshape(x, (len(x), -1)), -1.0, 1.0, self.iterations)
        return z.reshape(shape)


# --- the method ---------------------------------------------------------------------------------------------------
class DFI:
    """fit (cache the train features and the neighbour index) + manipulate, as models/baselines.py's MeanDiff."""

    def __init__(self, schema, net, cache, k=100, alpha=1.0, window=1, mode="decode",
                 tv_weight=0.0, tv_beta=2.0, iterations=150):
        if mode not in MODES:
            raise ValueError(f"unknown DFI mode {mode!r}; choose one of {MODES}")
        self.schema, self.cache, self.k, self.alpha, self.mode = schema, cache, k, alpha, mode
        self.neighbours = Neighbours(cache["codes"][:], cache["position"][:],
                                     cache["subject"][:].astype(str), window)
        self.reconstruct = Reconstructor(net, tv_weight, tv_beta, iterations)
        dim = cache["features"].shape[1]       # the same sets recur (reversed changes, one source's targets)
        self.mean_features = functools.lru_cache(max(1, MEAN_CACHE_BYTES // (4 * dim)))(self._mean_features)
        self.unshifted = collections.OrderedDict()   # z*(0) by slice: each source recurs with every target

    @staticmethod
    def fit(store, net, attrs, path, batch_size=64, log=print):
        """Write `path` (HDF5): phi of every train slice (float16), their schema codes, positions and subjects."""
        schema = store.schema.select(list(attrs))
        idx = store.indices("train")
        dim = flat_features(net, np.zeros((1, store.size, store.size, store.channels), np.float32)).shape[1]
        log(f"caching {len(idx)} x {dim} train features ({len(idx) * dim * 2 / 1e9:.2f} GB) in {path}")
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", (len(idx), dim), np.float16, chunks=(1, dim))
            for i in range(0, len(idx), batch_size):
                part = idx[i:i + batch_size]
                feats[i:i + len(part)] = ops.convert_to_numpy(flat_features(net, store.pixels(part)))
            f["index"], f["position"] = idx, store.slice[idx]
            f["subject"] = store.subject[idx].astype(h5py.string_dtype())
            f["codes"] = schema.encode(store.raw(idx))
            f.attrs["schema"] = schema.to_json()
        return path

    def _where(self, attrs):
        """Slice positions of the queried slices (their "slice" entry), and no subject to exclude: a queried
        slice's subject is not known to a method (the evaluator's test subjects are not in the train pool)."""
        if "slice" not in attrs:
            raise ValueError("DFI needs each slice's axial position: pass attrs['slice']")
        return np.asarray(attrs["slice"]), np.full(len(attrs["slice"]), "")

    def shift(self, source_attrs, target_attrs):
        """w (N, F): mean phi of the k target neighbours - mean phi of the k source neighbours."""
        names = self.schema.names
        src = self.schema.encode({n: np.asarray(source_attrs[n]) for n in names})
        tgt = self.schema.encode({n: np.asarray(target_attrs.get(n, source_attrs[n])) for n in names})
        position, subject = self._where(source_attrs)
        rows_s, rows_t = (self.neighbours.query(c, position, subject, self.k) for c in (src, tgt))
        w = np.zeros((len(src), self.cache["features"].shape[1]), np.float32)
        for i, (s, t) in enumerate(zip(np.sort(rows_s), np.sort(rows_t))):
            if not np.array_equal(s, t):
                w[i] = self.mean_features(tuple(t)) - self.mean_features(tuple(s))
        return w

    def _mean_features(self, rows):
        """Mean phi (F,) of the cached train slices `rows`, read chunk by chunk (`fit` stores each slice's vector
        as one unfiltered chunk; h5py's fancy indexing read 400 rows 30 to 90 times slower). Remembered for the
        last MEAN_CACHE_BYTES of means (`mean_features`)."""
        feats = self.cache["features"]
        out = np.empty((len(rows), feats.shape[1]), feats.dtype)
        for k, i in enumerate(rows):
            out[k] = np.frombuffer(feats.id.read_direct_chunk((int(i), 0))[1], feats.dtype)
        return out.mean(0, dtype=np.float32)

    def manipulate(self, images, source_attrs, target_attrs):
        """decode: z*(alpha); residual: x + z*(alpha) - z*(0), and x itself where the shift is 0."""
        x = np.asarray(images, np.float32)
        x = x[..., None] if x.ndim == 3 else x
        phi = self.reconstruct.features(x)
        w = self.shift(source_attrs, target_attrs)
        if self.mode == "decode":
            return self.reconstruct(x, phi + self.alpha * w)
        out, moved = x.copy(), np.any(w != 0, axis=1)
        if moved.any():
            xm, n, phi = x[moved], int(moved.sum()), phi[moved]
            r = self.reconstruct
            keys = [(r.tv_weight, r.tv_beta, r.iterations, hashlib.sha256(v.tobytes()).digest()) for v in xm]
            todo = list({k: i for i, k in enumerate(keys) if k not in self.unshifted}.values())
            z = r(np.concatenate([xm, xm[todo]]), np.concatenate([phi + self.alpha * w[moved], phi[todo]]))
            for i, v in zip(todo, z[n:]):
                self.unshifted[keys[i]] = v
            zero = np.stack([self.unshifted[k] for k in keys])
            while len(self.unshifted) > UNSHIFTED_CACHE_BYTES // xm[0].nbytes:
                self.unshifted.popitem(last=False)
            out[moved] = np.clip(xm + z[:n] - zero, -1.0, 1.0)
        return out


def from_run(run_dir, mode=None):
    """The DFI of a train_dfi.py run."""
    config = load_config(run_dir)
    a = config["args"]
    path = os.path.join(run_dir, FEATURES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: rerun train_dfi.py with --out {run_dir}")
    schema = Schema.from_records(config["schema"])
    method = DFI(schema, features_from_args(a, a["size"]), h5py.File(path, "r"), a["k"], a["alpha"], a["window"],
               mode or a["mode"], a["tv_weight"], a["tv_beta"], a["iterations"])
    if method.mode == "residual":   # a zero shift returns the input
        method.by_construction = ("reconstruction_mse", "composition_l1")
    return method
