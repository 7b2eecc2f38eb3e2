"""CycleGAN (Zhu et al., ICCV 2017) between two groups of slices defined by one attribute, domains A and B (dx CN
and Dementia, or age < 65 and age >= 75): two generators translate each way, trained to undo each other.

Networks (f = filters, 64 in the reference; IN = instance normalisation without affine parameters; every
convolution has a bias and N(0, 0.02) weights):
    G_AB, G_BA  x -> x'  ResNet generator: reflect-pad 3, conv7x7 f, IN, ReLU; conv3x3 stride 2 to 2f, 4f (IN,
                         ReLU); `blocks` residual blocks x + [reflect-pad 1, conv3x3, IN, ReLU, reflect-pad 1,
                         conv3x3, IN](x) (6 at 128 px, the reference's choice there); ConvTranspose 3x3 stride 2
                         to 2f, f (IN, ReLU); reflect-pad 3, conv7x7 -> 1, tanh.
    D_A, D_B    x -> patch scores  70x70 PatchGAN: conv4x4 stride 2 to f (no IN), 2f, 4f, conv4x4 stride 1 to
                         8f (IN), LeakyReLU 0.2 after each; conv4x4 stride 1 -> 1 (14 x 14 at 128 px). D_A
                         judges A slices, D_B B slices.

One iteration on a batch of n A slices a and n B slices b (every term a mean; LSGAN; P_A, P_B: ImagePool):
    G_AB, G_BA minimise  (D_B(G_AB a) - 1)^2 + (D_A(G_BA b) - 1)^2
                         + lambda_cycle (|G_BA(G_AB a) - a| + |G_AB(G_BA b) - b|)
                         + lambda_cycle lambda_identity (|G_AB b - b| + |G_BA a - a|)
    then D_A minimises   ((D_A(a) - 1)^2 + D_A(P_A(G_BA b))^2) / 2,   D_B  ((D_B(b) - 1)^2 + D_B(P_B(G_AB a))^2) / 2
with the slices generated before the generators' update (the reference's order). Both optimisers: Adam, betas
(0.5, 0.999), learning rate lr (1 - max(0, e + 1 - constant) / (decay + 1)), floored at 0, e = the epoch of the
optimiser's iteration count (`Schedule`, the reference's rule; a checkpoint restores the count, so a resumed run
continues the schedule: the reference restarts it, its issue #1686).
"""
import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models.layers import FusedAdam
from mri import training
from mri.data.loader import parse_domains

TINY_FILTERS = 4


class ReflectionPad(layers.Layer):
    def __init__(self, pad, **kwargs):
        super().__init__(**kwargs)
        self.pad = pad

    def call(self, x):
        return ops.pad(x, [[0, 0], [self.pad, self.pad], [self.pad, self.pad], [0, 0]], mode="reflect")


def conv(h, filters, kernel, strides=1, padding="valid", transpose=False):
    kind = layers.Conv2DTranspose if transpose else layers.Conv2D
    return kind(filters, kernel, strides, padding, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02))(h)


def instance_norm(h):
    return layers.GroupNormalization(groups=-1, center=False, scale=False, epsilon=1e-5)(h)


def generator(size, filters=64, blocks=6, name="generator", channels=1):
    x = keras.Input((size, size, channels), name="image")
    h = layers.ReLU()(instance_norm(conv(ReflectionPad(3)(x), filters, 7)))
    for k in (2, 4):
        h = layers.ReLU()(instance_norm(conv(h, filters * k, 3, 2, "same")))
    for _ in range(blocks):
        r = layers.ReLU()(instance_norm(conv(ReflectionPad(1)(h), filters * 4, 3)))
        h = layers.Add()([h, instance_norm(conv(ReflectionPad(1)(r), filters * 4, 3))])
    for k in (2, 1):
        h = layers.ReLU()(instance_norm(conv(h, filters * k, 3, 2, "same", transpose=True)))
    return keras.Model(x, layers.Activation("tanh")(conv(ReflectionPad(3)(h), channels, 7)), name=name)


def patch_discriminator(size, filters=64, name="discriminator", channels=1):
    x = keras.Input((size, size, channels), name="image")
    h = x
    for i, (k, strides) in enumerate(((1, 2), (2, 2), (4, 2), (8, 1))):
        h = conv(layers.ZeroPadding2D(1)(h), filters * k, 4, strides)
        h = layers.LeakyReLU(0.2)(instance_norm(h) if i else h)
    return keras.Model(x, conv(layers.ZeroPadding2D(1)(h), 1, 4), name=name)


class ImagePool(layers.Layer):
    """The reference's pool of generated images (util/image_pool.py) as non-trainable variables, so a checkpoint
    holds it. Each queried image, in order: while fewer than `capacity` are stored it is stored and returned;
    then, with probability 1/2, it replaces a uniformly drawn stored image, which is returned instead, else it
    is returned itself. Capacity 0: images are returned as they are."""

    def __init__(self, capacity, shape, **kwargs):
        super().__init__(**kwargs)
        self.capacity = capacity
        self.images = self.add_weight(shape=(max(capacity, 1), *shape), initializer="zeros", trainable=False,
                                      name="images")
        self.count = self.add_weight(shape=(), initializer="zeros", dtype="int32", trainable=False, name="count")
        self.built = True

    def query(self, images, seed):
        """The images the discriminator sees for `images`; draws from `seed` (a keras SeedGenerator)."""
        if not self.capacity:
            return images
        n = ops.shape(images)[0]
        u, slots = keras.random.uniform((n,), seed=seed), keras.random.randint((n,), 0, self.capacity, seed=seed)

        def body(i, stored, count, out):
            full = count >= self.capacity
            slot = tf.where(full, slots[i], count)
            swap = full & (u[i] > 0.5)
            out = out.write(i, tf.where(swap, stored[slot], images[i]))
            stored = tf.tensor_scatter_nd_update(stored, [[slot]], tf.where(full & ~swap, stored[slot], images[i])[None])
            return i + 1, stored, tf.minimum(count + 1, self.capacity), out

        out = tf.TensorArray(images.dtype, n, element_shape=images.shape[1:])
        _, stored, count, out = tf.while_loop(lambda i, *_: i < n, body, [0, self.images.value, self.count.value, out])
        self.images.assign(stored)
        self.count.assign(count)
        return out.stack()


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """lr (1 - max(0, e + 1 - constant) / (decay + 1)), floored at 0, e = step // steps_per_epoch: constant for
    `constant` epochs, then down by lr / (decay + 1) an epoch (the reference's rule)."""

    def __init__(self, lr, steps_per_epoch, constant, decay):
        self.lr, self.steps_per_epoch, self.constant, self.decay = lr, steps_per_epoch, constant, decay

    def __call__(self, step):
        e = ops.cast(ops.floor_divide(ops.cast(step, "int64"), self.steps_per_epoch), "float32")
        return self.lr * ops.maximum(1.0 - ops.maximum(0.0, e + 1.0 - self.constant) / (self.decay + 1.0), 0.0)


def weights(*networks):
    return [w for n in networks for w in n.trainable_weights]


def lsgan(scores, target):
    return ops.mean(ops.square(scores - target))


def l1(x, y):
    return ops.mean(ops.abs(x - y))


class CycleGAN(keras.Model):
    """CycleGAN between `domains` (Domains). A batch is n A slices followed by n B slices (loader.Paired)."""

    def __init__(self, schema, domains, size=128, filters=64, blocks=6, pool_size=50, lambda_cycle=10.0,
                 lambda_identity=0.5, seed=0, channels=1, **kwargs):
        super().__init__(**kwargs)
        if size % 4 or size < 24:
            raise ValueError(f"image size must be a multiple of 4 and at least 24 (the PatchGAN), got {size}")
        self.schema, self.domains = schema, domains
        self.lambda_cycle, self.lambda_identity = lambda_cycle, lambda_identity
        self.g_ab, self.g_ba = (generator(size, filters, blocks, f"g_{d}", channels) for d in ("ab", "ba"))
        self.d_a, self.d_b = (patch_discriminator(size, filters, f"d_{d}", channels) for d in "ab")
        self.pool_a, self.pool_b = (ImagePool(pool_size, (size, size, channels), name=f"pool_{d}") for d in "ab")
        self.step = keras.Variable(0, dtype="int64", trainable=False, name="step")
        self.seed_generator = keras.random.SeedGenerator(seed)
        names = ("d_a", "d_b", "adversarial", "cycle", "identity", "lr")
        self.trackers = {n: keras.metrics.Mean(name=n) for n in names}
        self.built = True

    def compile(self, g_optimizer, d_optimizer, jit_compile=False):
        super().compile(optimizer=None, jit_compile=jit_compile)
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        g_optimizer.build(weights(self.g_ab, self.g_ba))
        d_optimizer.build(weights(self.d_a, self.d_b))

    optimizers = property(lambda self: {"g": self.g_optimizer, "d": self.d_optimizer})
    metrics = property(lambda self: list(self.trackers.values()))

    def generator_step(self, a, b):
        """G_AB, G_BA minimise (D_B(G_AB a) - 1)^2 + (D_A(G_BA b) - 1)^2 + lambda_cycle (|G_BA(G_AB a) - a| +
        |G_AB(G_BA b) - b|) + lambda_cycle lambda_identity (|G_AB b - b| + |G_BA a - a|); returns (G_BA b,
        G_AB a) and the three terms."""
        n = ops.shape(a)[0]
        with tf.GradientTape() as tape:
            ab = self.g_ab(ops.concatenate([a, b]), training=True)     # G_AB a, G_AB b: IN is per slice
            ba = self.g_ba(ops.concatenate([b, a]), training=True)     # G_BA b, G_BA a
            fake_b, fake_a = ab[:n], ba[:n]
            adv = lsgan(self.d_b(fake_b), 1.0) + lsgan(self.d_a(fake_a), 1.0)
            cycle = l1(self.g_ba(fake_b, training=True), a) + l1(self.g_ab(fake_a, training=True), b)
            identity = l1(ab[n:], b) + l1(ba[n:], a)
            loss = adv + self.lambda_cycle * (cycle + self.lambda_identity * identity)
        trained = weights(self.g_ab, self.g_ba)
        self.g_optimizer.apply(tape.gradient(loss, trained), trained)
        return fake_a, fake_b, adv, cycle, identity

    def discriminator_step(self, a, b, fake_a, fake_b):
        """D_A minimises ((D_A(a) - 1)^2 + D_A(P_A(G_BA b))^2) / 2, D_B ((D_B(b) - 1)^2 + D_B(P_B(G_AB a))^2) / 2;
        returns both losses."""
        n = ops.shape(a)[0]
        fakes = [pool.query(ops.stop_gradient(f), self.seed_generator)
                 for pool, f in ((self.pool_a, fake_a), (self.pool_b, fake_b))]
        with tf.GradientTape() as tape:
            losses = []
            for d, real, fake in zip((self.d_a, self.d_b), (a, b), fakes):
                scores = d(ops.concatenate([real, fake]), training=True)
                losses.append(0.5 * (lsgan(scores[:n], 1.0) + lsgan(scores[n:], 0.0)))
            loss = losses[0] + losses[1]
        trained = weights(self.d_a, self.d_b)
        self.d_optimizer.apply(tape.gradient(loss, trained), trained)
        return losses

    def train_step(self, data):
        """The generators' step, then the discriminators' (module docstring); the batch's first half is A."""
        x = data[0]
        n = ops.shape(x)[0] // 2
        lr = self.g_optimizer.learning_rate
        fake_a, fake_b, adv, cycle, identity = self.generator_step(x[:n], x[n:])
        d_a, d_b = self.discriminator_step(x[:n], x[n:], fake_a, fake_b)
        for name, v in zip(self.trackers, (d_a, d_b, adv, cycle, identity, lr)):
            self.trackers[name].update_state(v)
        self.step.assign_add(1)
        return {name: t.result() for name, t in self.trackers.items()}

    def supports(self, source_attrs, target_attrs):
        """(N,) bool: the changes this model makes, from one domain into the other."""
        s, t = self.domains.which(source_attrs), self.domains.which(target_attrs)
        return (s >= 0) & (t >= 0) & (s != t)

    def manipulate(self, images, source_attrs, target_attrs):
        """G_AB(x) for a source in A and a target in B, G_BA(x) for B -> A; any other slice (a target in its
        source's domain, or outside both domains) is returned unchanged."""
        x = np.asarray(images, np.float32)
        s, t, out = self.domains.which(source_attrs), self.domains.which(target_attrs), x.copy()
        for g, rows in ((self.g_ab, (s == 0) & (t == 1)), (self.g_ba, (s == 1) & (t == 0))):
            if rows.any():
                out[rows] = np.asarray(g(x[rows], training=False)).reshape(x[rows].shape)
        return out

    def sample_columns(self, images, raw):
        """The per-epoch grid (mri/training.py): each slice translated into the other domain and back (A -> B -> A
        for A slices and outside both, B -> A -> B for B slices)."""
        x = np.asarray(images, np.float32)
        in_b = (self.domains.which(raw) == 1).reshape(-1, 1, 1, 1)
        there = np.where(in_b, np.asarray(self.g_ba(x)), np.asarray(self.g_ab(x)))
        return [there, np.where(in_b, np.asarray(self.g_ab(there)), np.asarray(self.g_ba(there)))]

    by_construction = ("reconstruction_mse", "composition_l1")


def from_args(args, schema):
    """The (uncompiled) model of a train_cyclegan.py argument dict (a run's config.json "args")."""
    return CycleGAN(schema, parse_domains(args["domains"], schema), args["size"],
                    TINY_FILTERS if args["tiny"] else args["filters"], args["blocks"], args["pool_size"],
                    args["lambda_cycle"], args["lambda_identity"], args["seed"], channels=args.get("channels", 1))


def compile_from_args(model, args, steps_per_epoch):
    """Adam(Schedule, betas (0.5, 0.999)) for the generators and for the discriminators, as the reference."""
    lr = lambda: Schedule(args["lr"], steps_per_epoch, args["constant_epochs"], args["decay_epochs"])
    model.compile(FusedAdam(lr(), beta_1=0.5, beta_2=0.999), FusedAdam(lr(), beta_1=0.5, beta_2=0.999),
                  jit_compile=training.jit_compile(args["jit"]))
    return model


def from_run(run_dir):
    """A trained run, ready for manipulate()."""
    return training.load_run(run_dir, from_args)
