"""Fader Networks (Lample et al., NIPS 2017) on 2D MRI slices, with the seed project's extensions: several
attribute kinds at once (continuous, binary, categorical; mri/attributes.py), dropout in the decoder and a
classifier discriminator.

Networks (S = image size, L = n_layers, widths f_i = min(n_filters * 2^i, max_filters)):
    E      x (S, S, C) -> z (S/2^L, S/2^L, f_L-1)   Conv 4x4 stride 2, BatchNorm from the 2nd layer, LeakyReLU 0.2
    D      (z, y) -> x                             ConvTranspose 4x4 stride 2, BatchNorm, ReLU; tanh out;
                                                   y tiled spatially and concatenated at EVERY layer input;
                                                   Dropout on the 3 lowest-resolution layers (as the paper's code)
    P_lat  z -> attribute logits                   E-like conv blocks with Dropout down to 1x1, Dense 512, Dense
    C      x -> attribute logits                   E's conv stack and the same head (only when lambda_clf > 0)
At 128x128 with the defaults: L = 6, widths 16..512, a 2x2x512 latent.

One training iteration (paper Sec. 3; l = schema.loss: MSE continuous, BCE binary, CE categorical;
y~ = schema.flip(y): 1 - y, another class, or a draw from the train distribution):
    P_lat  minimises  l(y, P_lat(E(x)))                                        discriminator, eq. (2)
    C      minimises  l(y, C(x))                                               on real images only
    E, D   minimise   |D(E(x), y) - x|^2 + lam_lat(t) l(y~, P_lat(E(x)))      eq. (3): the latent must fool
                      + lam_clf(t) l(y~, C(D(E(x), y~)))                       P_lat; a flipped decode must
                                                                               be classified as y~
lam(t) = lam * min(t / lambda_ramp_steps, 1), t the iteration (the paper ramps lam_lat over 500k iterations).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models.layers import FusedAdam, batch_norm, down, up, with_condition
from mri import training

# --tiny: the smallest architecture (a 32x32 store gives a 4x4x32 latent)
TINY = dict(n_layers=3, n_filters=8, max_filters=32, hidden=32)


def widths(n_layers, n_filters, max_filters):
    return [min(n_filters * 2 ** i, max_filters) for i in range(n_layers)]


def conv_stack(x, widths):
    """E's convolutions (also C's): BatchNorm on every layer but the first."""
    for i, f in enumerate(widths):
        x = down(x, f, norm=i > 0)
    return x


def encoder(size, widths, channels=1):
    x = keras.Input((size, size, channels), name="image")
    return keras.Model(x, conv_stack(x, widths), name="encoder")


def decoder(latent_shape, y_dim, widths, dropout, channels=1):
    """Mirror of the encoder; y is appended to the input of every layer."""
    z, y = keras.Input(latent_shape, name="latent"), keras.Input((y_dim,), name="attributes")
    h = z
    for i, f in enumerate(reversed(widths[:-1])):
        h = up(with_condition(h, y), f, dropout=dropout if i < 3 else 0.0)
    image = up(with_condition(h, y), channels, norm=False, activation="tanh")
    return keras.Model([z, y], image, name="decoder")


def head(h, y_dim, max_filters, hidden, dropout=0.0):
    """The discriminators' end: E-like conv blocks down to 1x1, then Dense(hidden), LeakyReLU, Dense(y_dim).
    The last block (2x2 -> 1x1) is a Dense on the flattened 2x2 map: the same function as a 4x4 stride-2 conv
    on a padded 2x2 input, whose taps outside the central 2x2 only ever see the padding."""
    while h.shape[1] > 2:
        h = down(h, min(2 * h.shape[-1], max_filters), dropout=dropout)
    h = layers.Dense(min(2 * h.shape[-1], max_filters), use_bias=False)(layers.Flatten()(h))
    h = layers.LeakyReLU(0.2)(batch_norm()(h))
    h = layers.Dropout(dropout)(h) if dropout else h
    return layers.Dense(y_dim)(layers.LeakyReLU(0.2)(layers.Dense(hidden)(h)))


def latent_discriminator(latent_shape, y_dim, max_filters, hidden, dropout):
    z = keras.Input(latent_shape, name="latent")
    return keras.Model(z, head(z, y_dim, max_filters, hidden, dropout), name="latent_discriminator")


def classifier(size, y_dim, widths, max_filters, hidden, channels=1):
    x = keras.Input((size, size, channels), name="image")
    return keras.Model(x, head(conv_stack(x, widths), y_dim, max_filters, hidden), name="classifier")


class Fader(keras.Model):
    """Fader Networks with a latent discriminator and an optional classifier discriminator (lambda_clf > 0)."""

    def __init__(self, schema, size=128, n_layers=6, n_filters=16, max_filters=512, hidden=512, dropout=0.3,
                 lat_dropout=0.3, lambda_lat=1e-4, lambda_clf=1e-4, lambda_ramp_steps=5000, seed=0, channels=1, **kwargs):
        super().__init__(**kwargs)
        if size % 2 ** n_layers:
            raise ValueError(f"image size {size} is not divisible by 2^{n_layers} (--n-layers {n_layers})")
        self.schema = schema
        self.mode = "decode"
        self.lambda_lat, self.lambda_clf, self.lambda_ramp_steps = lambda_lat, lambda_clf, lambda_ramp_steps
        w = widths(n_layers, n_filters, max_filters)
        self.encoder = encoder(size, w, channels)
        latent_shape = self.encoder.output.shape[1:]
        self.decoder = decoder(latent_shape, schema.width, w, dropout, channels)
        self.lat_dis = latent_discriminator(latent_shape, schema.width, max_filters, hidden, lat_dropout)
        self.classifier = classifier(size, schema.width, w, max_filters, hidden, channels) if lambda_clf else None
        self.step = keras.Variable(0, dtype="int64", trainable=False, name="step")
        self.flip_seed = keras.random.SeedGenerator(seed)
        names = ["loss", "rec", "lat_dis", "lat_adv", "lambda_lat"] + (["clf", "clf_adv"] if self.classifier else [])
        self.trackers = {n: keras.metrics.Mean(name=n) for n in names}
        self.built = True

    @property
    def ae_weights(self):
        return self.encoder.trainable_weights + self.decoder.trainable_weights

    def compile(self, ae_optimizer, lat_optimizer, clf_optimizer=None, jit_compile=False):
        """One optimizer per trained part; each is built now so a checkpoint can restore its state."""
        super().compile(optimizer=None, jit_compile=jit_compile)
        self.ae_optimizer, self.lat_optimizer, self.clf_optimizer = ae_optimizer, lat_optimizer, clf_optimizer
        ae_optimizer.build(self.ae_weights)
        lat_optimizer.build(self.lat_dis.trainable_weights)
        if self.classifier is not None:
            if clf_optimizer is None:
                raise ValueError("lambda_clf > 0: the classifier discriminator needs clf_optimizer")
            clf_optimizer.build(self.classifier.trainable_weights)

    @property
    def optimizers(self):
        out = {"ae": self.ae_optimizer, "lat_dis": self.lat_optimizer}
        return dict(out, clf=self.clf_optimizer) if self.classifier is not None else out

    @property
    def metrics(self):
        return list(self.trackers.values())

    def ramp(self, value, step):
        """value * min(step / lambda_ramp_steps, 1) (no ramp when lambda_ramp_steps is 0)."""
        if not self.lambda_ramp_steps:
            return ops.convert_to_tensor(value, "float32")
        return value * ops.minimum(ops.cast(step, "float32") / self.lambda_ramp_steps, 1.0)

    def call(self, inputs, training=False):
        """(images, encoded attributes) -> D(E(images), attributes)."""
        x, y = inputs
        return self.decoder([self.encoder(x, training=training), y], training=training)

    def _discriminator_step(self, net, optimizer, inputs, y):
        with tf.GradientTape() as tape:
            loss = self.schema.loss(y, net(inputs, training=True))
        optimizer.apply(tape.gradient(loss, net.trainable_weights), net.trainable_weights)
        return loss

    def train_step(self, data):
        x, y = data
        y_flip = self.schema.flip(y, self.flip_seed)
        lambda_lat, lambda_clf = self.ramp(self.lambda_lat, self.step), self.ramp(self.lambda_clf, self.step)
        logs = {"lambda_lat": lambda_lat}
        with tf.GradientTape() as tape:
            z = self.encoder(x, training=True)
            with tape.stop_recording():
                # E does not change in the discriminator steps: its forward pass serves P_lat's step too (the
                # paper's code encodes again, in inference mode, for that step).
                logs["lat_dis"] = self._discriminator_step(self.lat_dis, self.lat_optimizer, z, y)
                if self.classifier is not None:
                    logs["clf"] = self._discriminator_step(self.classifier, self.clf_optimizer, x, y)
            logs["rec"] = ops.mean(ops.square(self.decoder([z, y], training=True) - x))
            # P_lat and C judge in inference mode (no dropout, running BatchNorm statistics), as in the paper's code
            logs["lat_adv"] = self.schema.loss(y_flip, self.lat_dis(z, training=False))
            loss = logs["rec"] + lambda_lat * logs["lat_adv"]
            if self.classifier is not None:
                flipped = self.decoder([z, y_flip], training=True)
                logs["clf_adv"] = self.schema.loss(y_flip, self.classifier(flipped, training=False))
                loss += lambda_clf * logs["clf_adv"]
        self.ae_optimizer.apply(tape.gradient(loss, self.ae_weights), self.ae_weights)
        self.step.assign_add(1)
        logs["loss"] = loss
        for name, value in logs.items():
            self.trackers[name].update_state(value)
        return {name: t.result() for name, t in self.trackers.items()}

    def manipulate(self, images, source_attrs, target_attrs):
        """mode "decode" (the paper): D(E(x), y_target); E has learnt to drop the source attributes.
        mode "residual": x + (D(E(x), y_target) - D(E(x), y_source)): only the decoder's change is added, so
        what the autoencoder cannot reconstruct (noise, fine anatomy) is kept from the input. x is encoded once
        and both decodes run in one batch, so a slice whose target equals its source gets two bitwise-equal
        decodes, a zero change and exactly x back."""
        x = np.asarray(images, np.float32)
        y_target = self.schema.encode(target_attrs)
        if self.mode == "decode":
            return np.asarray(self((x, y_target), training=False))
        z = self.encoder(x, training=False)
        y = ops.convert_to_tensor(np.concatenate([y_target, self.schema.encode(source_attrs)]))
        both = np.asarray(self.decoder([ops.concatenate([z, z]), y], training=False))
        out, same = both[:len(x)], both[len(x):]
        return np.clip(x + (out - same), -1.0, 1.0)

    @property
    def by_construction(self):
        """Scores evaluate.py must not rank: the residual mode returns the input at unchanged attributes."""
        return ("reconstruction_mse", "composition_l1") if self.mode == "residual" else ()


def architecture(args):
    """The network sizes train_fader.py's arguments describe (--tiny overrides them; n_layers 0: down to 2x2)."""
    arch = dict(n_layers=args["n_layers"] or int(np.log2(args["size"])) - 1, n_filters=args["n_filters"],
                max_filters=args["max_filters"], hidden=args["hidden"])
    return dict(arch, **TINY) if args["tiny"] else arch


def from_args(args, schema):
    """The (uncompiled) model of a train_fader.py argument dict, e.g. a run's config.json "args"."""
    return Fader(schema, args["size"], **architecture(args), dropout=args["dropout"],
                 lat_dropout=args["lat_dropout"], lambda_lat=args["lambda_lat"], lambda_clf=args["lambda_clf"],
                 lambda_ramp_steps=args["lambda_ramp_steps"], seed=args["seed"], channels=args.get("channels", 1))


def adam(args):
    """The paper's optimizer: Adam(lr, beta1 0.5), with the gradient's global norm clipped."""
    return FusedAdam(args["lr"], beta_1=0.5, global_clipnorm=args["clip_grad_norm"] or None)


def compile_from_args(model, args):
    model.compile(adam(args), adam(args), adam(args) if model.classifier is not None else None,
                  jit_compile=training.jit_compile(args["jit"]))
    return model


MODES = ("decode", "residual")


def from_run(run_dir, mode="decode"):
    """A trained run, ready for manipulate() in `mode` (see Fader.manipulate): rebuilt from config.json,
    weights from the checkpoint."""
    if mode not in MODES:
        raise ValueError(f"{run_dir}@{mode}: Fader's manipulate modes are {MODES}")
    model = training.load_run(run_dir, from_args)
    model.mode = mode
    return model
