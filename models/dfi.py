"""Deep Feature Interpolation (Upchurch et al. CVPR 2017) with neighbours in attribute space, as the report used it.

Nothing adversarial is trained: `DFI.fit` caches the feature vectors of the train split once, and `manipulate`
shifts a slice's deep features towards its target attributes, then reconstructs the image that has them.

    phi(x)      post-ReLU maps at three scales, flattened and concatenated: VGG19's conv3_1, conv4_1, conv5_1
                (`imagenet_features`), or the first conv of the last three pooling levels of a store-trained
                oracle-style network (`store_features`: the same scales, 1/4, 1/8 and 1/16 of a 128 px slice)
    S, T        the k train slices nearest to the source / the target attributes in Mahalanobis distance
                sqrt((a - b)^T VI (a - b)) over the schema codes (continuous z-scored, categorical one-hot),
                VI = pinv(covariance of the train codes), among other subjects' slices within `window`
                positions of the source slice
    w           = mean_T phi - mean_S phi
    z*(alpha)   = argmin_z 1/2 ||phi(z) - (phi(x) + alpha w)||^2 + tv_weight TV(z),  z in [-1, 1],
                  scipy L-BFGS-B from z = x for `iterations` iterations, every slice of a batch in one call
                  (their objectives are independent, so the batch minimises their sum)
    TV(z)       = sum_ij ((z[i+1,j] - z[i,j])^2 + (z[i,j+1] - z[i,j])^2 + TV_EPS)^(tv_beta / 2)
    manipulate  = z*(alpha)                         (mode "decode")
                = clip(x + z*(alpha) - z*(0))       (mode "residual": the reconstruction's own drift cancels)
"""
import json
import os
import re

import h5py
import numpy as np
import scipy.optimize
import tensorflow as tf
from keras import ops

from models.layers import single_blas_thread
from mri.attributes import Schema
from mri.io import atomic_path, read_json

MODES = ("decode", "residual")
IMAGENET_LAYERS = ("block3_conv1", "block4_conv1", "block5_conv1")
VGG19_NOTOP = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TV_EPS = 1e-8
FEATURES_FILE = "features.h5"


# --- feature networks ------------------------------------------------------------------------------------------
def imagenet_weights(path=""):
    """The local VGG19 no-top weights file: `path`, else the Keras cache; never downloaded."""
    path = path or os.path.join(os.path.expanduser("~"), ".keras", "models", VGG19_NOTOP)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ImageNet VGG19 weights not found at {path}. Nothing is downloaded at run time: on a machine with "
            f"network, `python -c \"import keras; keras.applications.VGG19(include_top=False)\"` saves {VGG19_NOTOP} "
            "to ~/.keras/models/; copy it here and pass --vgg-weights PATH (or use --features RUN, a train_oracle.py run)")
    return path


def imagenet_features(size, weights):
    """VGG19 to conv5_1 on grey [-1, 1] slices tiled to 3 channels with caffe preprocessing (255 scale, BGR
    mean removed). `weights`: the no-top .h5 file, or None for random weights (tests and benchmarks only)."""
    import keras
    from keras import layers
    vgg = keras.applications.VGG19(include_top=False, weights=weights, input_shape=(size, size, 3))
    x = keras.Input((size, size, 1), name="image")
    bgr = layers.Rescaling(127.5, offset=[127.5 - m for m in CAFFE_MEAN_BGR])(layers.Concatenate()([x, x, x]))
    trunk = keras.Model(vgg.inputs, [vgg.get_layer(n).output for n in IMAGENET_LAYERS])
    return keras.Model(x, trunk(bgr), name="vgg19_features")


def store_features(run_dir):
    """The post-ReLU first conv of the last three pooling levels of a train_oracle.py run's network."""
    import keras
    from models.oracle import load_oracle
    model = load_oracle(run_dir).model
    names = sorted((l.name for l in model.layers if re.fullmatch(r"block\d+_relu1", l.name)),
                   key=lambda n: int(n[5:].split("_")[0]))
    if len(names) < 3:
        raise ValueError(f"{run_dir}: its network has {len(names)} pooling levels, DFI needs 3 "
                         "(train it without --tiny)")
    return keras.Model(model.input, [model.get_layer(n).output for n in names[-3:]], name="store_features")


def flat_features(net, z):
    return ops.concatenate([ops.reshape(f, (ops.shape(z)[0], -1)) for f in net(z, training=False)], axis=1)


def total_variation(z, beta):
    """TV(z) per image (N,) of (N, S, S, 1) images: sum over pixels of (dx^2 + dy^2 + TV_EPS)^(beta / 2)."""
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
            ok = self.subject != subject[i]
            if position is not None and self.window is not None:
                ok &= np.abs(self.position - position[i]) <= self.window
            rows = np.flatnonzero(ok)
            if len(rows) < k:
                raise ValueError(f"only {len(rows)} train slices within {self.window} positions of position "
                                 f"{position[i]} from other subjects; lower --k (now {k}) or widen --window")
            d = self.codes[rows] - q
            dist = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, self.vi, d), 0))
            out[i] = rows[np.lexsort((rows, dist))[:k]]
        return out


# --- reconstruction ----------------------------------------------------------------------------------------------
class Reconstructor:
    """z* of a batch: one scipy L-BFGS-B run over the summed objectives, value and gradient from one
    compiled TensorFlow function (float64 sum, so the line search sees small decreases)."""

    def __init__(self, net, tv_weight=0.0, tv_beta=2.0, iterations=150):
        self.net, self.iterations = net, iterations
        self.tv_weight, self.tv_beta = float(tv_weight), float(tv_beta)
        self._value_and_grad = tf.function(self._objective, reduce_retracing=True)
        self.last_result = None

    def features(self, images):
        return ops.convert_to_numpy(flat_features(self.net, ops.convert_to_tensor(images, "float32")))

    def _objective(self, z, target, tv_weight, tv_beta):
        with tf.GradientTape() as tape:
            tape.watch(z)
            diff = ops.cast(flat_features(self.net, z) - target, "float64")
            tv = ops.cast(total_variation(z, tv_beta), "float64")
            loss = 0.5 * ops.sum(diff ** 2) + tv_weight * ops.sum(tv)
        return loss, tape.gradient(loss, z)

    def __call__(self, x, target):
        """argmin over z of (N, S, S, 1) of the summed objectives, from z = x, within [-1, 1]."""
        shape = x.shape
        target = tf.constant(target, tf.float32)
        tv = (tf.constant(self.tv_weight, tf.float64), tf.constant(self.tv_beta, tf.float32))   # not baked in a trace

        def f(v):
            loss, grad = self._value_and_grad(tf.constant(v.reshape(shape), tf.float32), target, *tv)
            return float(loss), np.asarray(grad, np.float64).ravel()

        with single_blas_thread():
            self.last_result = scipy.optimize.minimize(
                f, np.asarray(x, np.float64).ravel(), jac=True, method="L-BFGS-B",
                bounds=scipy.optimize.Bounds(-1.0, 1.0), options={"maxiter": self.iterations})
        return self.last_result.x.reshape(shape).astype(np.float32)


# --- the method ---------------------------------------------------------------------------------------------------
class DFI:
    """fit (cache the train features and the neighbour index) + manipulate, as models/baselines.py's MeanDiff."""

    def __init__(self, schema, net, cache, k=100, alpha=1.0, window=1, mode="decode", store=None,
                 tv_weight=0.0, tv_beta=2.0, iterations=150):
        if mode not in MODES:
            raise ValueError(f"unknown DFI mode {mode!r}; choose one of {MODES}")
        self.schema, self.cache, self.k, self.alpha, self.mode, self.store = schema, cache, k, alpha, mode, store
        self.neighbours = Neighbours(cache["codes"][:], cache["position"][:],
                                     cache["subject"][:].astype(str), window)
        self.reconstruct = Reconstructor(net, tv_weight, tv_beta, iterations)

    @staticmethod
    def fit(store, net, attrs, path, batch_size=64, log=print):
        """Write `path` (HDF5): phi of every train slice (float16), their schema codes, positions and subjects."""
        schema = store.schema.select(list(attrs))
        idx = store.indices("train")
        dim = flat_features(net, np.zeros((1, store.size, store.size, 1), np.float32)).shape[1]
        log(f"caching {len(idx)} x {dim} train features ({len(idx) * dim * 2 / 1e9:.2f} GB) in {path}")
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", (len(idx), dim), np.float16, chunks=(1, dim))
            for i in range(0, len(idx), batch_size):
                part = idx[i:i + batch_size]
                feats[i:i + len(part)] = ops.convert_to_numpy(flat_features(net, store.images(part)[..., None]))
            f["index"], f["position"] = idx, store.slice[idx]
            f["subject"] = store.subject[idx].astype(h5py.string_dtype())
            f["codes"] = schema.encode(store.raw(idx))
            f.attrs["schema"] = schema.to_json()
        return path

    def _where(self, attrs):
        """Slice positions and subjects of the queried slices (store indices, or a "slice" entry)."""
        n = len(next(iter(attrs.values())))
        if "index" in attrs and self.store is not None:
            idx = np.asarray(attrs["index"], np.int64)
            return self.store.slice[idx], self.store.subject[idx].astype(str)
        if "slice" in attrs:
            return np.asarray(attrs["slice"]), np.full(n, "")
        raise ValueError("DFI needs each slice's position: pass attrs['index'] with the store, or attrs['slice']")

    def shift(self, source_attrs, target_attrs):
        """w (N, F): mean phi of the k target neighbours - mean phi of the k source neighbours."""
        names = self.schema.names
        src = self.schema.encode({n: np.asarray(source_attrs[n]) for n in names})
        tgt = self.schema.encode({n: np.asarray(target_attrs.get(n, source_attrs[n])) for n in names})
        position, subject = self._where(source_attrs)
        rows_s, rows_t = (self.neighbours.query(c, position, subject, self.k) for c in (src, tgt))
        w = np.zeros((len(src), self.cache["features"].shape[1]), np.float32)
        for i, (s, t) in enumerate(zip(np.sort(rows_s), np.sort(rows_t))):
            if not np.array_equal(s, t):   # h5py reads rows in increasing order
                w[i] = np.asarray(self.cache["features"][t], np.float32).mean(0) - \
                    np.asarray(self.cache["features"][s], np.float32).mean(0)
        return w

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
            xm, n = x[moved], int(moved.sum())
            both = self.reconstruct(np.concatenate([xm, xm]), np.concatenate([phi[moved] + self.alpha * w[moved],
                                                                               phi[moved]]))
            out[moved] = np.clip(xm + both[:n] - both[n:], -1.0, 1.0)
        return out


def features_from_args(args, size):
    if args["features"] == "imagenet":
        return imagenet_features(size, imagenet_weights(args.get("vgg_weights", "")))
    return store_features(args["features"])


def from_run(run_dir, mode=None, store=None):
    """The DFI of a train_dfi.py run; `store`: the store whose indices manipulate receives (evaluate.py's)."""
    config = read_json(os.path.join(run_dir, "config.json"))
    a = config["args"]
    path = os.path.join(run_dir, FEATURES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: rerun train_dfi.py with --out {run_dir}")
    schema = Schema.from_json(json.dumps(config["schema"]))
    method = DFI(schema, features_from_args(a, a["size"]), h5py.File(path, "r"), a["k"], a["alpha"], a["window"],
               mode or a["mode"], store, a["tv_weight"], a["tv_beta"], a["iterations"])
    if method.mode == "residual":   # a zero shift returns the input
        method.by_construction = ("reconstruction_mse", "composition_l1")
    return method
