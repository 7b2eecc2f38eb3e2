"""Visual Attribution GAN (Baumgartner et al., CVPR 2018), conditioned on attributes, with the conditional critic
of Xia et al. (MedIA 2021): a U-Net M learns only the change of a slice towards target attributes, an additive
map, and a critic that knows what real slices with those attributes look like pushes it there.

Networks (f = filters, 16 in the reference):
    M  [x, tile(y_t, y_t - y_s)] -> map logits
                                     U-Net: (conv3x3-BN-ReLU x2) at f, 2f, 4f, 8f maps with 3 max-poolings;
                                     up: ConvTranspose 4x4 stride 2 to f maps + BN + ReLU, concatenated with the
                                     skip, conv3x3-BN-ReLU x2 at the skip's width; conv3x3 -> 1, linear. The target
                                     and the change of the attributes (Xia et al.: the age difference) enter at
                                     the input only.
    D  [x, tile(y)] -> score         WGAN critic, no normalisation: conv3x3-ReLU f | pool | 2f | pool | 4f,4f |
                                     pool | 8f,8f | pool | 16f x3, conv1x1 -> 1, spatial mean. `unconditional`:
                                     D sees x alone.
    R  x -> attribute logits         a frozen train_oracle.py run (inference mode), the auxiliary regressor.

Output bounding: t = tanh(m) in (-1, 1) moves each pixel the fraction t of the way to the range's end,
    x' = x + t (1 - x)  (t >= 0),   x' = x + t (1 + x)  (t < 0),
so x' stays in [-1, 1], reaches any value in it, and m = 0 returns x exactly. The map is x' - x.

Data (mri/data/loader.CriticDraws): generator step s gets n_critic(s) + 1 fresh draws, one per critic step and one
for M; a draw is B source slices x (attributes y_s) and, for each, a real train slice r at the same axial index
whose attributes are the target, y_t = y_r (Xia et al.'s two streams). Everything batch means; e uniform per
slice; l = schema.loss; d = ||y_t - y_s||_1 (encoded vectors: a continuous attribute in train-split SDs, a
class change 2 for categorical, 1 for binary):
    D  minimises  D(x', y_t) - D(r, y_t) + lambda_gp (||grad D(x^, y_t)||_2 - 1)^2   on draw i = 0 .. n_critic - 1
                  x^ = e r + (1 - e) x' (interpolates) or x' (--gp-at changed); the norm over all image axes
    M  minimises  -D(x', y_t) + lambda_map exp(-d / gap_scale) |x' - x| + lambda_tv TV(x' - x)
                  + lambda_aux l(y_t, R(x'))                                        on draw n_critic
With visit pairs (`--pair-weight` w_p > 0; mri/data/loader.WithPairs adds a batch of mri/data/loader.VisitPairs
to each step: a slice x_s and the same subject's slice x_t at another visit, same axial index, attributes y_s, y_t),
M also minimises
                  w_p sum(F (x_s' - x_t)^2) / sum(F),   x_s' = x_s changed from y_s to y_t,
F the source's foreground grown by 2 pixels (models/layers.foreground): the observed change of a subject
supervises the map, as train_longitudinal.py's pair loss (without its nuisance term).
TV(m) = mean |m[i+1, j] - m[i, j]| + mean |m[i, j+1] - m[i, j]| (a pattern that fools R pixel by pixel pays it
everywhere; an anatomical change pays it along its edges). exp(-d / gap_scale): larger changes may change more
(Xia et al.: exp(-gap / 60 years)). An unchanged source is no equilibrium: D has seen real slices with y_t.
n_critic(step) = n_critic_long for the first critic_warmup steps and every critic_retune-th, else n_critic.
"""
import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models.layers import FusedAdam, batch_norm, foreground, tile
from mri import training

CRITICS = ("conditional", "unconditional")
LEGACY_ARGS = {"pair_weight": 0.0}   # runs made before --pair-weight trained without visit pairs
GP_AT = ("interpolates", "changed")
TINY_FILTERS = 4


def conv(h, filters, norm=True):
    h = layers.Conv2D(filters, 3, padding="same", use_bias=not norm, kernel_initializer="he_normal")(h)
    return layers.ReLU()(batch_norm()(h) if norm else h)


def map_generator(size, y_dim, filters=16, levels=3, channels=1, norm=True, image_channels=1):
    """M: the U-Net of the module docstring on (size, size, image_channels) images, `channels` linear outputs
    (models/longitudinal.py uses 3 and no BatchNorm)."""
    x, y = keras.Input((size, size, image_channels), name="image"), keras.Input((y_dim,), name="target")
    h, skips = layers.Concatenate()([x, tile(y, size)]), []
    for i in range(levels):
        h = conv(conv(h, filters * 2 ** i, norm), filters * 2 ** i, norm)
        skips.append(h)
        h = layers.MaxPooling2D()(h)
    h = conv(conv(h, filters * 2 ** levels, norm), filters * 2 ** levels, norm)
    for skip in reversed(skips):
        h = layers.Conv2DTranspose(filters, 4, 2, "same", use_bias=not norm)(h)
        h = layers.Concatenate()([layers.ReLU()(batch_norm()(h) if norm else h), skip])
        h = conv(conv(h, skip.shape[-1], norm), skip.shape[-1], norm)
    return keras.Model([x, y], layers.Conv2D(channels, 3, padding="same")(h), name="map_generator")


def critic(size, y_dim=0, filters=16, channels=1):
    x = keras.Input((size, size, channels), name="image")
    inputs, h = [x], x
    if y_dim:
        y = keras.Input((y_dim,), name="attributes")
        inputs, h = [x, y], layers.Concatenate()([x, tile(y, size)])
    for i, repeats in enumerate((1, 1, 2, 2, 3)):
        for _ in range(repeats):
            h = conv(h, filters * 2 ** i, norm=False)
        h = layers.MaxPooling2D()(h) if i < 4 else h
    score = layers.GlobalAveragePooling2D()(layers.Conv2D(1, 1)(h))
    return keras.Model(inputs, score, name="critic")


def bound(x, m):
    """x' = x + t(1 - x) for t = tanh(m) >= 0, x + t(1 + x) below: in [-1, 1], and x itself for m = 0."""
    t = ops.tanh(m)
    return x + ops.where(t >= 0, t * (1.0 - x), t * (1.0 + x))


def regressor_adapter(schema, regressor_schema):
    """(columns, scale, offset) turning the regressor's logits into logits of `schema`'s encoding:
    logits[:, columns] * scale + offset (continuous attributes re-standardised to this schema's mean and
    std; class logits unchanged). A clear error if the regressor does not predict an attribute."""
    missing = [n for n in schema.names if n not in regressor_schema.names]
    if missing:
        raise ValueError(f"the regressor does not predict {missing} (it predicts {regressor_schema.names}); "
                         "train one with train_oracle.py --attrs covering the conditioned attributes")
    columns, scale, offset = [], [], []
    for a in schema.attributes:
        r = regressor_schema[a.name]
        if r.kind != a.kind or list(r.classes or []) != list(a.classes or []):
            raise ValueError(f"attribute {a.name!r}: the regressor has {r.kind} {r.classes or ''}, the store "
                             f"{a.kind} {a.classes or ''}")
        s = regressor_schema.slices[a.name]
        columns += list(range(s.start, s.stop))
        k = r.std / a.std if a.kind == "continuous" else 1.0
        scale += [k] * a.width
        offset += [(r.mean - a.mean) / a.std if a.kind == "continuous" else 0.0] * a.width
    return np.array(columns), np.float32(scale), np.float32(offset)


class Frozen:
    """The frozen regressor and its adapter, held outside Keras' tracking: it is not part of the model's
    variables, so a checkpoint holds only M, D and the training state, and inference needs no regressor."""

    def __init__(self, model, adapter):
        self.model, self.adapter = model, adapter


class VAGAN(keras.Model):
    """VA-GAN with a map generator conditioned on the target and the change, a WGAN-GP critic (conditional on the
    target, or not) fed real slices with the target attributes, and a frozen regressor. `regressor` = (keras
    model, its schema) or None (no auxiliary term). train_step takes mri/data/loader.CriticDraws' batches."""

    def __init__(self, schema, size=128, filters=16, regressor=None, critic_mode="conditional",
                 gp_at="interpolates", lambda_gp=10.0, lambda_map=10.0, lambda_aux=1.0, lambda_tv=0.0,
                 gap_scale=9.0, n_critic=5, n_critic_long=100, critic_warmup=25, critic_retune=100, seed=0, channels=1,
                 pair_weight=0.0, **kwargs):
        super().__init__(**kwargs)
        if size % 16:
            raise ValueError(f"image size must be a multiple of 16 (the critic pools 4 times), got {size}")
        if gp_at not in GP_AT or critic_mode not in CRITICS:
            raise ValueError(f"gp_at in {GP_AT}, critic_mode in {CRITICS}")
        self.schema, self.gp_at, self.conditional = schema, gp_at, critic_mode == "conditional"
        self.lambda_gp, self.lambda_map, self.lambda_aux, self.lambda_tv = lambda_gp, lambda_map, lambda_aux, lambda_tv
        self.gap_scale, self.pair_weight = gap_scale, pair_weight
        self.schedule = (n_critic, n_critic_long, critic_warmup, critic_retune)
        self.generator = map_generator(size, 2 * schema.width, filters, channels=channels, image_channels=channels)
        self.critic = critic(size, schema.width if self.conditional else 0, filters, channels)
        self.channels = channels     # a draw holds the source's channels, then its real partner's
        self.frozen = None
        if regressor is not None:
            regressor[0].trainable = False
            self.frozen = Frozen(regressor[0], regressor_adapter(schema, regressor[1]))
        self.step = keras.Variable(0, dtype="int64", trainable=False, name="step")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {n: keras.metrics.Mean(name=n) for n in
                         ("critic", "wasserstein", "gp", "generator", "map_l1", "tv", "aux", "pair", "n_critic")}
        self.built = True

    def compile(self, g_optimizer, d_optimizer, jit_compile=False):
        super().compile(optimizer=None, jit_compile=jit_compile)
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        g_optimizer.build(self.generator.trainable_weights)
        d_optimizer.build(self.critic.trainable_weights)

    @property
    def optimizers(self):
        return {"g": self.g_optimizer, "d": self.d_optimizer}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def n_critic(self, step):
        """Critic steps before generator step `step` (the reference's schedule; arrays of steps too)."""
        short, long, warmup, retune = self.schedule
        return ops.where((step < warmup) | (step % retune == 0), long, short)

    def draws(self, steps):
        """Draws of mri/data/loader.CriticDraws at generator steps `steps` (an array): n_critic + 1 each."""
        return np.asarray(self.n_critic(np.asarray(steps, np.int64))).astype(np.int64) + 1

    def change(self, x, y_s, y_t, training=False):
        """(x', map x' - x) of images x with encoded attributes y_s at encoded targets y_t."""
        x, y_s, y_t = (ops.convert_to_tensor(v) for v in (x, y_s, y_t))
        changed = bound(x, self.generator([x, ops.concatenate([y_t, y_t - y_s], axis=1)], training=training))
        return changed, changed - x

    def call(self, inputs, training=False):
        return self.change(*inputs, training=training)[0]

    def score(self, x, y):
        return self.critic([x, y] if self.conditional else x, training=True)

    def gradient_penalty(self, real, changed, y_t):
        """mean (||grad_x D(x^, y_t)||_2 - 1)^2, the norm over all image axes; x^ between real and x', or x'."""
        real, changed = ops.convert_to_tensor(real), ops.convert_to_tensor(changed)
        if self.gp_at == "changed":
            point = changed
        else:
            e = keras.random.uniform((ops.shape(real)[0], 1, 1, 1), seed=self.seed_generator)
            point = e * real + (1.0 - e) * changed
        with tf.GradientTape() as tape:
            tape.watch(point)
            d = self.score(point, y_t)
        g = tape.gradient(d, point)
        return ops.mean(ops.square(ops.sqrt(ops.sum(ops.square(g), axis=(1, 2, 3)) + 1e-12) - 1.0))

    def critic_step(self, x, y_s, real, y_t):
        """D minimises D(x', y_t) - D(r, y_t) + lambda_gp GP; returns (loss, Wasserstein estimate, GP)."""
        changed = ops.stop_gradient(self.change(x, y_s, y_t, training=True)[0])
        with tf.GradientTape() as tape:
            w = ops.mean(self.score(real, y_t)) - ops.mean(self.score(changed, y_t))
            gp = self.gradient_penalty(real, changed, y_t)
            loss = -w + self.lambda_gp * gp
        weights = self.critic.trainable_weights
        self.d_optimizer.apply(tape.gradient(loss, weights), weights)
        return loss, w, gp

    def aux_loss(self, changed, y_t):
        columns, scale, offset = self.frozen.adapter
        logits = ops.take(self.frozen.model(changed, training=False), columns, axis=1) * scale + offset
        return self.schema.loss(y_t, logits)

    def map_weights(self, y_s, y_t):
        """exp(-||y_t - y_s||_1 / gap_scale) per slice: the map penalty eases with the size of the change."""
        return ops.exp(-ops.sum(ops.abs(y_t - y_s), axis=1) / self.gap_scale)

    def pair_loss(self, x_s, y_s, x_t, y_t):
        """Mean squared error of x_s changed from y_s to y_t against the later visit x_t, inside F(x_s)."""
        changed = self.change(x_s, y_s, y_t, training=True)[0]
        mask = foreground(x_s[..., :1])
        return ops.sum(mask * ops.square(changed - x_t)) / (ops.sum(mask) * self.channels + 1e-6)

    def generator_step(self, x, y_s, y_t, pairs=None):
        """M minimises -D(x', y_t) + lambda_map w |x' - x| + lambda_tv TV + lambda_aux l(y_t, R(x'))
        [+ pair_weight pair_loss on `pairs` = (visit-pair images (B, S, S, 2C), conditions (B, 2 width + 1))];
        returns (adversarial term, mean |x' - x|, TV, aux, pair loss)."""
        with tf.GradientTape() as tape:
            changed, m = self.change(x, y_s, y_t, training=True)
            adv = -ops.mean(self.score(changed, y_t))
            l1 = ops.mean(ops.abs(m), axis=(1, 2, 3))
            tv = total_variation(m)
            aux = self.aux_loss(changed, y_t) if self.frozen is not None else ops.zeros(())
            loss = (adv + self.lambda_map * ops.mean(self.map_weights(y_s, y_t) * l1) + self.lambda_tv * tv
                    + self.lambda_aux * aux)
            pair = ops.zeros(())
            if pairs is not None:
                images, cond = pairs
                c, w = self.channels, self.schema.width
                pair = self.pair_loss(images[..., :c], cond[:, :w], images[..., c:], cond[:, w:2 * w])
                loss = loss + self.pair_weight * pair
        weights = self.generator.trainable_weights
        self.g_optimizer.apply(tape.gradient(loss, weights), weights)
        return adv, ops.mean(l1), tv, aux, pair

    def train_step(self, data):
        """data = (images (k, B, S, S, 2): source then real partner, attributes (k, B, 2 width): source's then
        the partner's = the target), k = n_critic(step) + 1 draws: draw i feeds critic step i, the last M;
        with pair_weight > 0 also a batch of visit pairs (images, conditions) for M (mri/data/loader.WithPairs)."""
        images, attrs = data[:2]
        if self.pair_weight and len(data) != 4:
            raise ValueError("pair_weight > 0: train_step needs visit pairs too (mri/data/loader.WithPairs)")
        pairs = tuple(data[2:]) if self.pair_weight else None
        n, w, c = self.n_critic(self.step), self.schema.width, self.channels
        tf.debugging.assert_equal(ops.shape(images)[0], ops.cast(n, "int32") + 1,
                                  message="VA-GAN needs n_critic + 1 draws per step (mri/data/loader.CriticDraws)")

        def critic_iteration(i):
            loss, wd, gp = self.critic_step(images[i][..., :c], attrs[i][:, :w], images[i][..., c:], attrs[i][:, w:])
            for name, v in (("critic", loss), ("wasserstein", wd), ("gp", gp)):
                self.trackers[name].update_state(v)
            return (i + 1,)

        tf.while_loop(lambda i: i < n, critic_iteration, [ops.zeros((), n.dtype)])
        adv, l1, tv, aux, pair = self.generator_step(images[n][..., :c], attrs[n][:, :w], attrs[n][:, w:], pairs)
        for name, v in (("generator", adv), ("map_l1", l1), ("tv", tv), ("aux", aux), ("pair", pair),
                        ("n_critic", ops.cast(n, "float32"))):
            self.trackers[name].update_state(v)
        self.step.assign_add(1)
        return {name: t.result() for name, t in self.trackers.items()}

    def manipulate(self, images, source_attrs, target_attrs):
        """x + M(x, target, target - source) (bounded); slices whose target equals their source are returned
        unchanged."""
        x = np.asarray(images, np.float32)
        y_s, y_t = self.schema.encode(source_attrs), self.schema.encode(target_attrs)
        out = np.asarray(self.change(x, y_s, y_t)[0])
        same = np.all(y_s == y_t, axis=1).reshape(-1, *[1] * (x.ndim - 1))
        return np.where(same, x, out)

    def maps(self, images, source_attrs, target_attrs):
        """The change maps x' - x at the target attributes (raw values)."""
        y_s, y_t = (self.schema.encode(a) for a in (source_attrs, target_attrs))
        return np.asarray(self.change(np.asarray(images, np.float32), y_s, y_t)[1])

    by_construction = ("reconstruction_mse", "composition_l1")


def total_variation(m):
    """mean |m[i+1, j] - m[i, j]| + mean |m[i, j+1] - m[i, j]| of maps (N, S, S, C)."""
    return ops.mean(ops.abs(m[:, 1:] - m[:, :-1])) + ops.mean(ops.abs(m[:, :, 1:] - m[:, :, :-1]))


def load_regressor(run_dir, size):
    """A train_oracle.py run as the frozen auxiliary regressor: (keras model, schema)."""
    from models.oracle import load_oracle
    oracle = load_oracle(run_dir)
    if oracle.size != size:
        raise ValueError(f"the regressor {run_dir} takes {oracle.size}x{oracle.size} slices, the store {size}x{size}")
    return oracle.model, oracle.schema


def from_args(args, schema, regressor=True):
    """The (uncompiled) model of a train_vagan.py argument dict (a run's config.json "args"); the regressor is
    loaded from args["regressor"] only to train (regressor=False for inference)."""
    reg = load_regressor(args["regressor"], args["size"]) if regressor and args.get("regressor") else None
    return VAGAN(schema, args["size"], TINY_FILTERS if args["tiny"] else args["filters"], reg, args["critic"],
                 args["gp_at"], args["lambda_gp"], args["lambda_map"], args["lambda_aux"], args["lambda_tv"],
                 args["gap_scale"], args["n_critic"], args["n_critic_long"], args["critic_warmup"],
                 args["critic_retune"], args["seed"],
                 channels=args.get("channels", 1), pair_weight=args.get("pair_weight", LEGACY_ARGS["pair_weight"]))


def compile_from_args(model, args):
    """Adam(lr, betas (0, 0.9)) for M and D, as the reference."""
    model.compile(FusedAdam(args["lr"], beta_1=0.0, beta_2=0.9), FusedAdam(args["lr"], beta_1=0.0, beta_2=0.9),
                  jit_compile=training.jit_compile(args["jit"]))
    return model


def from_run(run_dir):
    """A trained run, ready for manipulate() (the regressor is not needed)."""
    return training.load_run(run_dir, lambda args, schema: from_args(args, schema, regressor=False))
