"""IcGAN (Perarnau et al. 2016): a conditional DCGAN trained matching-aware (GAN-CLS, Reed et al. 2016),
then two encoders that invert it: E_z recovers the noise z, E_y the condition y. An image is edited as

    x' = G(E_z(x), y')

Widths follow DCGAN: `filters` maps at half the image size, doubling at each halving, capped at
`max_filters` (64, 128, 256, 512, 1024 at 128x128 and the defaults).
- G: [z, y] -> Dense to 4x4 -> (TransposeConv 4x4 stride 2, BatchNorm, ReLU) up to half size ->
  TransposeConv to the image, tanh (4->8->16->32->64->128 at 128).
- Optional shape input (`laplacian=True`): G also takes a real slice; its Laplacian goes through two
  strided Conv + LeakyReLU to quarter size and is concatenated with G's quarter-size features (32x32 at 128,
  the output of G's 4th block counting the projection; 8x8 at 32), so the generated brain keeps its shape.
- D: (Conv 4x4 stride 2, BatchNorm except on the first, LeakyReLU 0.2) from the image down to 4x4, then
  a logit. The condition, tiled to the image size, goes through Conv + ReLU to half size and is concatenated
  with D's first features.
- E_z, E_y: D's convolution stack without the condition, then a linear layer to z or to y's logits.

Training has two phases, recorded in the non-trainable `phase` variable (D outputs logits s, sigma the sigmoid;
s_r = D(x, y), s_w = D(x, y_w), s_f = D(G(z, y), y) for real slices x with their encoded attributes y):
    phase 0  D    minimises  -log sigma(s_r) - (log(1 - sigma(s_w)) + log(1 - sigma(s_f))) / 2     GAN-CLS
             G    minimises  -log sigma(D(G(z', y), y))                                            fresh z'
    phase 1  E_z  minimises  |E_z(G(z, y)) - z|^2        E_y minimises  l(y, E_y(x))   (l = schema.loss; G fixed)
The wrong conditions y_w (--wrong) are drawn with the model's seed generator inside the step:
    real         y_w = y_j, the encoded attributes of train slice j, drawn uniformly among the train slices
    (default)    whose key attribute differs from x's; key = the first categorical attribute (the diagnosis),
                 else the first binary one. y_w is a real, jointly plausible vector: D can only reject
                 (x, y_w) by matching it against the image, not from y_w alone.
    group-means  the diagnosis (first categorical attribute) moved to another class drawn uniformly, the other
                 attributes set to that class's train mean (fractional binary values: D can spot them from y_w).
With no key attribute (all continuous; for group-means, no categorical one) y_w = schema.flip(y).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models.layers import batch_norm, down, laplacian as laplacian_of, tile, up
from mri import training

TINY_FILTERS = 8   # --tiny: feature maps at half size (8..64 at 32x32)


def width(resolution, size, filters, max_filters):
    """Feature maps at `resolution`: `filters` at size/2, doubled at each halving, capped."""
    return min(max_filters, filters * size // (2 * resolution))


def generator(size, z_dim, y_dim, filters=64, max_filters=1024, laplacian=False, channels=1):
    n = lambda r: width(r, size, filters, max_filters)
    z, y = keras.Input((z_dim,), name="z"), keras.Input((y_dim,), name="y")
    inputs = [z, y]
    h = layers.Dense(4 * 4 * n(4), use_bias=False)(layers.Concatenate()([z, y]))
    h = layers.ReLU()(batch_norm()(layers.Reshape((4, 4, n(4)))(h)))
    if laplacian:
        shape = keras.Input((size, size, channels), name="shape")
        inputs.append(shape)
        s = down(down(laplacian_of(shape), n(size // 2), norm=False), n(size // 4), norm=False)
    r = 4
    while r < size // 2:
        if laplacian and r == size // 4:
            h = layers.Concatenate()([h, s])
        r *= 2
        h = up(h, n(r))
    image = up(h, channels, norm=False, activation="tanh")
    return keras.Model(inputs, image, name="generator")


def conv_stack(x, size, filters, max_filters, condition=None):
    """D's convolutions: the image down to 4x4 features; `condition` (N, w), if given, is tiled, convolved to
    half size and concatenated with the first features."""
    n = lambda r: width(r, size, filters, max_filters)
    h = down(x, n(size // 2), norm=False)
    if condition is not None:
        c = layers.Conv2D(n(size // 2), 4, 2, "same", activation="relu")(tile(condition, size))
        h = layers.Concatenate()([h, c])
    r = size // 2
    while r > 4:
        r //= 2
        h = down(h, n(r))
    return layers.Flatten()(h)


def discriminator(size, y_dim, filters=64, max_filters=1024, channels=1):
    x, y = keras.Input((size, size, channels), name="image"), keras.Input((y_dim,), name="y")
    logit = layers.Dense(1)(conv_stack(x, size, filters, max_filters, condition=y))
    return keras.Model([x, y], logit, name="discriminator")


def encoder(size, out_dim, filters=64, max_filters=1024, name="encoder", channels=1):
    x = keras.Input((size, size, channels), name="image")
    return keras.Model(x, layers.Dense(out_dim)(conv_stack(x, size, filters, max_filters)), name=name)


WRONG = ("real", "group-means")   # --wrong: how the mismatched conditions y_w are drawn (module docstring)


def diagnosis(schema):
    """The attribute whose classes group-means wrong conditions move between: the first categorical one, or None."""
    return next((a for a in schema.attributes if a.kind == "categorical"), None)


def key(schema):
    """The attribute real wrong conditions differ in: the first categorical one, else the first binary one,
    else None."""
    return diagnosis(schema) or next((a for a in schema.attributes if a.kind == "binary"), None)


def classes(schema, attribute, y):
    """The class of `attribute` (categorical or binary) in encoded vectors `y` (keras ops): (N,) int32."""
    s = schema.slices[attribute.name]
    c = ops.argmax(y[:, s], axis=1) if attribute.kind == "categorical" else y[:, s.start] > 0.5
    return ops.cast(c, "int32")


def real_table(schema, y):
    """The train split's encoded attributes `y` sorted by key class, with each class's first row and row count:
    (rows (M, width), starts (K,), counts (K,)). None if the schema has no key attribute."""
    a = key(schema)
    if a is None:
        return None
    labels = np.asarray(classes(schema, a, y))
    counts = np.bincount(labels, minlength=a.width if a.kind == "categorical" else 2).astype(np.int32)
    if (counts == len(y)).any():
        raise ValueError(f"every train slice has the same {a.name!r}: --wrong real needs two classes of it "
                         "(use --wrong group-means)")
    order = np.argsort(labels, kind="stable")
    return np.asarray(y, np.float32)[order], (np.cumsum(counts) - counts).astype(np.int32), counts


def group_means(schema, y):
    """(classes, width) mean condition vector of each diagnosis group in `y` (the train split's encoded
    attributes); a group with no slice gets the overall mean. None if the schema has no categorical attribute."""
    dx = diagnosis(schema)
    if dx is None:
        return None
    s = schema.slices[dx.name]
    labels = y[:, s].argmax(1)
    means = np.stack([y[labels == k].mean(0) if (labels == k).any() else y.mean(0) for k in range(dx.width)])
    means[:, s] = np.eye(dx.width)
    return means.astype(np.float32)


def bce(target, logits):
    return ops.mean(ops.binary_crossentropy(ops.full_like(logits, target), logits, from_logits=True))


class CGAN(keras.Model):
    """IcGAN on 2D slices. `train_y`: the train split's encoded attributes, from which the mismatched conditions
    are drawn as `wrong` says ("real" or "group-means", see the module docstring); only training uses them
    (None: schema.flip)."""

    def __init__(self, schema, size=128, z_dim=100, filters=64, max_filters=1024, laplacian=False,
                 wrong="real", train_y=None, seed=0, channels=1, **kwargs):
        super().__init__(**kwargs)
        if size < 16 or size & (size - 1):
            raise ValueError(f"image size must be a power of two >= 16, got {size}")
        if wrong not in WRONG:
            raise ValueError(f"wrong conditions must be one of {WRONG}, got {wrong!r}")
        self.schema, self.z_dim, self.laplacian, self.wrong = schema, z_dim, laplacian, wrong
        table = real_table if wrong == "real" else group_means
        self.wrong_table = None if train_y is None else table(schema, train_y)
        self.generator = generator(size, z_dim, schema.width, filters, max_filters, laplacian, channels)
        self.discriminator = discriminator(size, schema.width, filters, max_filters, channels)
        self.encoder_z = encoder(size, z_dim, filters, max_filters, "encoder_z", channels)
        self.encoder_y = encoder(size, schema.width, filters, max_filters, "encoder_y", channels)
        self.step = keras.Variable(0, dtype="int64", trainable=False, name="step")
        self.phase = keras.Variable(0, dtype="int32", trainable=False, name="phase")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.ez_loss_tracker = keras.metrics.Mean(name="ez_loss")
        self.ey_loss_tracker = keras.metrics.Mean(name="ey_loss")

    def compile(self, d_optimizer, g_optimizer, e_optimizer, **kwargs):
        super().compile(**kwargs)
        self.d_optimizer, self.g_optimizer, self.e_optimizer = d_optimizer, g_optimizer, e_optimizer
        d_optimizer.build(self.discriminator.trainable_variables)
        g_optimizer.build(self.generator.trainable_variables)
        e_optimizer.build(self.encoder_z.trainable_variables + self.encoder_y.trainable_variables)

    @property
    def optimizers(self):
        return {"d": self.d_optimizer, "g": self.g_optimizer, "e": self.e_optimizer}

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker, self.ez_loss_tracker, self.ey_loss_tracker]

    def generate(self, z, y, x, training=False):
        """G(z, y), given the real slices `x` whose shape (Laplacian) it keeps when `laplacian` is on."""
        return self.generator([z, y, x] if self.laplacian else [z, y], training=training)

    def noise(self, n):
        return keras.random.normal((n, self.z_dim), seed=self.seed_generator)

    def wrong_conditions(self, y):
        """Mismatched conditions y_w for the real slices of conditions `y` (module docstring)."""
        if self.wrong_table is None:
            return self.schema.flip(y, self.seed_generator)
        if self.wrong == "group-means":
            k = len(self.wrong_table)
            current = classes(self.schema, diagnosis(self.schema), y)
            shift = keras.random.randint(ops.shape(current), 1, k, seed=self.seed_generator, dtype="int32")
            return ops.take(ops.convert_to_tensor(self.wrong_table), (current + shift) % k, axis=0)
        rows, starts, counts = (ops.convert_to_tensor(t) for t in self.wrong_table)
        current = classes(self.schema, key(self.schema), y)
        start, count = ops.take(starts, current), ops.take(counts, current)
        # j uniform over the rows of the other classes: those before x's class block, then those after it
        others = len(self.wrong_table[0]) - count
        u = keras.random.uniform(ops.shape(current), seed=self.seed_generator)
        j = ops.minimum(ops.cast(u * ops.cast(others, u.dtype), "int32"), others - 1)
        return ops.take(rows, ops.where(j < start, j, j + count), axis=0)

    def train_step(self, data):
        """One GAN step in phase 0, one encoder step in phase 1. Logs every loss (the idle phase's are 0)."""
        x, y = data
        ops.cond(self.phase == 0, lambda: self.gan_step(x, y), lambda: self.encoder_step(x, y))
        self.step.assign_add(1)
        return {"phase": self.phase, **{m.name: m.result() for m in self.metrics}}

    def gan_step(self, x, y):
        """Matching-aware (GAN-CLS, module docstring): a D step, then a G step with fresh noise."""
        self.d_loss_tracker.update_state(self.d_step(x, y))
        self.g_loss_tracker.update_state(self.g_step(x, y))

    def d_step(self, x, y):
        """D minimises -log sigma(s_r) - (log(1 - sigma(s_w)) + log(1 - sigma(s_f))) / 2; returns that loss."""
        n = ops.shape(x)[0]
        y_wrong = self.wrong_conditions(y)
        fake = self.generate(self.noise(n), y, x, training=True)
        with tf.GradientTape() as tape:
            s_r = self.discriminator([x, y], training=True)
            s_w = self.discriminator([x, y_wrong], training=True)
            s_f = self.discriminator([fake, y], training=True)
            d_loss = bce(1.0, s_r) + (bce(0.0, s_w) + bce(0.0, s_f)) / 2
        weights = self.discriminator.trainable_variables
        self.d_optimizer.apply(tape.gradient(d_loss, weights), weights)
        return d_loss

    def g_step(self, x, y):
        """G minimises -log sigma(D(G(z, y), y)) for fresh noise z; returns that loss."""
        z = self.noise(ops.shape(x)[0])
        with tf.GradientTape() as tape:
            g_loss = bce(1.0, self.discriminator([self.generate(z, y, x, training=True), y], training=True))
        weights = self.generator.trainable_variables
        self.g_optimizer.apply(tape.gradient(g_loss, weights), weights)
        return g_loss

    def encoder_step(self, x, y):
        """IcGAN encoders, G frozen: E_z minimises ||E_z(G(z, y)) - z||^2 on generated pairs,
        E_y the schema losses of E_y(x) against y on real slices."""
        z = self.noise(ops.shape(x)[0])
        fake = self.generate(z, y, x)
        with tf.GradientTape() as tape:
            ez_loss = ops.mean(ops.square(self.encoder_z(fake, training=True) - z))
            ey_loss = self.schema.loss(y, self.encoder_y(x, training=True))
            e_loss = ez_loss + ey_loss
        weights = self.encoder_z.trainable_variables + self.encoder_y.trainable_variables
        self.e_optimizer.apply(tape.gradient(e_loss, weights), weights)
        self.ez_loss_tracker.update_state(ez_loss)
        self.ey_loss_tracker.update_state(ey_loss)

    def attributes(self, images):
        """E_y: the attributes of (N, S, S, C) images, as raw values {name: (N,)}."""
        return self.schema.decode_logits(self.encoder_y(np.asarray(images, np.float32), training=False))

    def manipulate(self, images, source_attrs, target_attrs):
        """x' = G(E_z(x), y_target): E_z recovers x's noise, G renders it at the target attributes (raw
        values; keys outside the schema are ignored). source_attrs is not needed: z carries the identity."""
        x = ops.convert_to_tensor(np.asarray(images, np.float32))
        y = ops.convert_to_tensor(self.schema.encode(target_attrs))
        return np.asarray(self.generate(self.encoder_z(x, training=False), y, x))


class PhaseSwitch(keras.callbacks.Callback):
    """Epochs [0, gan_epochs) train the GAN, the later ones its encoders (sets the model's `phase`). A resumed
    run must agree with the GAN epochs already taken: --epochs cannot change once the encoders have begun."""

    def __init__(self, gan_epochs):
        super().__init__()
        self.gan_epochs = gan_epochs

    def on_epoch_begin(self, epoch, logs=None):
        done = int(self.model.g_optimizer.iterations.numpy()) // self.params["steps"]
        if done != min(epoch, self.gan_epochs):
            raise SystemExit(f"--epochs {self.gan_epochs} does not fit this run: its GAN has trained {done} epochs by "
                             f"epoch {epoch + 1}; --epochs can only grow, and only before the encoder phase begins")
        self.model.phase.assign(int(epoch >= self.gan_epochs))


def from_args(args, schema, train_y=None):
    """The (uncompiled) model of a train_cgan.py argument dict, e.g. a run's config.json "args"; `train_y`, the
    train split's encoded attributes, is only needed to train. A config without "wrong" was written before
    --wrong existed, when the wrong conditions were group means."""
    return CGAN(schema, args["size"], args["z_dim"], TINY_FILTERS if args["tiny"] else args["filters"],
                laplacian=args["laplacian"], wrong=args.get("wrong", "group-means"), train_y=train_y,
                seed=args["seed"], channels=args.get("channels", 1))


def compile_from_args(model, args):
    """Adam(lr, betas (0.5, 0.999)) for D, G and the encoders, as in DCGAN."""
    model.compile(*[keras.optimizers.Adam(args["lr"], beta_1=0.5, beta_2=0.999) for _ in range(3)],
                  jit_compile=training.jit_compile(args["jit"]))
    return model


def from_run(run_dir):
    """A trained run, ready for manipulate(): rebuilt from config.json, weights from the checkpoint."""
    return training.load_run(run_dir, from_args)
