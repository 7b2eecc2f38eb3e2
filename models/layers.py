"""Building blocks shared by the methods: DCGAN-style down/up blocks, spatial conditioning, a fixed Laplacian, the
grown-foreground mask of the visit-pair losses, and the fused kernels that make them fast on CPU. Functional style: each block takes a (symbolic) tensor and
returns one.

Batch normalisation uses PyTorch's defaults (momentum 0.1 there = 0.9 here, epsilon 1e-5), as the papers'
reference implementations do; a convolution followed by batch normalisation has no bias (it would cancel).

Speed (TensorFlow on CPU; each piece computes the same function as the plain keras one):
- BatchNorm and FusedAdam run TensorFlow's fused kernels: one op per variable or layer instead of ~10
  elementwise ones (measured: -20% time per Fader iteration);
- `single_blas_thread` pins numpy's and scipy's OpenBLAS to one thread around a scipy loop that calls
  TensorFlow (DFI's L-BFGS): their idle threads busy-wait against TensorFlow's (measured 1.7x slower);
- on tiny maps (a 4x4 input to `down`, 2x2 to `up`) the 4x4 stride-2 (transposed) convolution is computed as
  a matmul (MatmulConv2D, MatmulConv2DTranspose): oneDNN runs such shapes (e.g. 4x4x256 -> 2x2x512) at a
  few percent of its matmul speed, and a matmul does not.
"""
import contextlib
import ctypes
import os
import re

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops


def batch_norm():
    return BatchNorm(momentum=0.9, epsilon=1e-5)


class BatchNorm(layers.BatchNormalization):
    """BatchNormalization whose training pass is TensorFlow's fused kernel (forward and backward). As in
    PyTorch, the moving variance follows the unbiased batch variance; the kernel's epsilon is at least 1.001e-5."""

    def call(self, x, training=None):
        if not (training and self.trainable):
            return super().call(x, training=training)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            ops.reshape(x, (-1, 1, 1, x.shape[-1])) if len(x.shape) == 2 else x, self.gamma, self.beta,
            mean=self.moving_mean, variance=self.moving_variance, epsilon=self.epsilon,
            exponential_avg_factor=1 - self.momentum)
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        return ops.reshape(y, ops.shape(x))


class FusedAdam(keras.optimizers.Adam):
    """keras' Adam (same update, same state variables), each variable updated by TensorFlow's fused kernel."""

    def update_step(self, gradient, variable, learning_rate):
        i, cast = self._get_variable_index(variable), lambda v: ops.cast(v, variable.dtype)
        t = cast(self.iterations + 1)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[i].handle, v=self._velocities[i].handle,
            beta1_power=cast(self.beta_1) ** t, beta2_power=cast(self.beta_2) ** t, lr=cast(learning_rate),
            beta1=cast(self.beta_1), beta2=cast(self.beta_2), epsilon=cast(self.epsilon), grad=cast(gradient))


def down(h, filters, norm=True, dropout=0.0):
    """Conv 4x4 stride 2 (halves the size) [+ BatchNorm] + LeakyReLU(0.2) [+ Dropout]."""
    conv = MatmulConv2D if h.shape[1] <= 4 else Conv2D
    h = conv(filters, use_bias=not norm)(h)
    h = layers.LeakyReLU(0.2)(batch_norm()(h) if norm else h)
    return layers.Dropout(dropout)(h) if dropout else h


def up(h, filters, norm=True, dropout=0.0, activation="relu"):
    """ConvTranspose 4x4 stride 2 (doubles the size) [+ BatchNorm] + activation [+ Dropout]."""
    conv = MatmulConv2DTranspose if h.shape[1] <= 2 else Conv2DTranspose
    h = conv(filters, use_bias=not norm)(h)
    h = layers.Activation(activation)(batch_norm()(h) if norm else h)
    return layers.Dropout(dropout)(h) if dropout else h


class Conv2D(layers.Conv2D):
    """4x4, stride 2, 'same' padding (1 on each side of an even-sized map)."""

    def __init__(self, filters, use_bias=True, **kwargs):
        super().__init__(filters, 4, strides=2, padding="same", use_bias=use_bias, **kwargs)


class Conv2DTranspose(layers.Conv2DTranspose):
    """4x4, stride 2, 'same' padding: the output is twice the input's size."""

    def __init__(self, filters, use_bias=True, **kwargs):
        super().__init__(filters, 4, strides=2, padding="same", use_bias=use_bias, **kwargs)


class MatmulConv2D(Conv2D):
    """Conv2D as one matmul over the patches. Padded by 1, the input is a grid of 2x2 cells; tap
    (ky, kx) = (2a + dy, 2b + dx) of output pixel (i, j) reads cell (i + a, j + b) at phase (dy, dx)."""

    def convolution_op(self, x, kernel):
        _, h, w, c = x.shape
        ho, wo = h // 2, w // 2
        cells = ops.reshape(ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), (-1, ho + 1, 2, wo + 1, 2, c))
        blocks = ops.stack([ops.slice(cells, [0, a, 0, b, 0, 0], [-1, ho, 2, wo, 2, c])
                            for a in (0, 1) for b in (0, 1)])
        patches = ops.transpose(ops.reshape(blocks, (2, 2, -1, ho, 2, wo, 2, c)), (2, 3, 5, 0, 4, 1, 6, 7))
        out = ops.matmul(ops.reshape(patches, (-1, 16 * c)), ops.reshape(kernel, (16 * c, self.filters)))
        return ops.reshape(out, (-1, ho, wo, self.filters))                    # patch rows: (ky, kx, c)


class MatmulConv2DTranspose(Conv2DTranspose):
    """Conv2DTranspose as one matmul and an overlap-add: input pixel (i, j) scatters a 4x4 patch whose tap
    (ky, kx) = (2a + dy, 2b + dx) lands on pixel (2(i + a) + dy, 2(j + b) + dx) of the output padded by 1.
    For each (a, b) the patches tile a (2H, 2W) map shifted by (2a, 2b); the four sum to the padded output."""

    def call(self, x):
        _, h, w, c = x.shape
        f = self.filters
        kernel = ops.reshape(self.kernel, (16 * f, c))                        # keras: (ky, kx, f, c)
        patches = ops.matmul(kernel, ops.transpose(ops.reshape(x, (-1, c))))  # (a, dy, b, dx, f) x (n, i, j)
        patches = ops.reshape(patches, (2, 2, 2, 2, f, -1, h, w))
        tiles = ops.reshape(ops.transpose(patches, (0, 2, 5, 6, 1, 7, 3, 4)), (4, -1, 2 * h, 2 * w, f))
        out = sum(ops.pad(tile, [[0, 0], [2 * a, 2 - 2 * a], [2 * b, 2 - 2 * b], [0, 0]])
                  for (a, b), tile in zip([(0, 0), (0, 1), (1, 0), (1, 1)], ops.unstack(tiles, 4)))
        out = ops.slice(out, [0, 1, 1, 0], [-1, 2 * h, 2 * w, f])
        return out + self.bias if self.use_bias else out


class Tile(layers.Layer):
    """(N, w) vectors -> (N, size, size, w): each vector repeated at every pixel."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    def call(self, y):
        return ops.tile(y[:, None, None, :], (1, self.size, self.size, 1))

    def compute_output_shape(self, shape):
        return (shape[0], self.size, self.size, shape[-1])

    def get_config(self):
        return dict(super().get_config(), size=self.size)


def tile(y, size):
    """The condition vector tiled spatially, to be concatenated with (size, size, C) feature maps."""
    return Tile(size)(y)


def with_condition(h, y):
    """Feature maps (N, S, S, C) and vectors (N, w) -> (N, S, S, C + w): the vector appended at every pixel."""
    return layers.Concatenate()([h, tile(y, h.shape[1])])


class Laplacian(layers.Layer):
    """Discrete Laplacian of (N, S, S, C) images, each channel on its own (4-neighbour 3x3 stencil, zero
    padding): edges, i.e. shape."""

    def call(self, x):
        k = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)[:, :, None, None]
        return ops.depthwise_conv(x, ops.convert_to_tensor(np.tile(k, (1, 1, x.shape[-1], 1)), x.dtype),
                                  padding="same")


def laplacian(x):
    return Laplacian()(x)


FOREGROUND = -0.9     # [-1, 1] images: the background is -1
GROW = 2              # pixels the foreground is grown by (atrophy moves the outline inwards)


def foreground(x, grow=GROW):
    """(N, S, S, 1) 0/1 in the graph: pixels above the background, grown by `grow` pixels (the visit-pair losses'
    mask; models.head is the evaluation's, in numpy, with holes filled)."""
    return ops.max_pool(ops.cast(x > FOREGROUND, "float32"), 2 * grow + 1, strides=1, padding="same")


def _openblas_libraries():
    with open("/proc/self/maps") as f:
        paths = sorted(set(re.findall(r"\S*openblas\S*\.so\S*", f.read())))
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getter = getattr(lib, name.replace("set_num", "get_num"), None)
                if getter is not None:
                    yield getattr(lib, name), getter
                break


@contextlib.contextmanager
def single_blas_thread():
    """numpy's and scipy's OpenBLAS on one thread inside the block: their idle threads busy-wait against
    TensorFlow's (an L-BFGS loop around a TF gradient measured 1.7x slower otherwise)."""
    libs = [] if not os.path.exists("/proc/self/maps") else list(_openblas_libraries())
    before = [get() for _, get in libs]
    for set_threads, _ in libs:
        set_threads(1)
    try:
        yield
    finally:
        for (set_threads, _), n in zip(libs, before):
            set_threads(n)
