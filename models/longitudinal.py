"""A change model learnt from visit pairs: how one subject's slice changes between two of its visits.

Every other method learns aging from differences between subjects, which differ far more than two visits of
one subject. This one is supervised by the registered visits of a subject (data_prep cuts every visit with
the first visit's plan, so slice k of every visit shows the same anatomy): given a slice x_s of a visit with
attributes y_s, the target attributes y_t of another visit of the same subject and the age difference
dt = age_t - age_s (years), it predicts that visit's slice x_t.

Network (f = filters; c = [y_s, y_t without its age]: the source's attributes and the target's other ones):
    U  [x_s, tile(c)] -> (v_x, v_y, r, g)   the U-Net of models/vagan.py (no BatchNorm), 4 linear outputs: a
                                            displacement field v (pixels per year), an intensity rate r (per
                                            year) and a nuisance g (no unit of time)
Change, parameterised (`--parameterisation`):
    displacement   x' = clip(W(x_s, phi) + dt r)      W samples x_s at p + phi(p) (bilinear), with
                   phi = exp(dt v)  (`--integration squaring`: the flow of the velocity v for dt years, by
                                     scaling and squaring: dt v / 2^6 composed with itself 6 times)
                   phi = dt v       (`--integration linear`; runs made before the option)
    intensity      x' = clip(x_s + dt r)
The network never sees the target's age, so v and r do not depend on dt: the intensity change is exactly linear
in dt (before clipping) and the displacement is the flow of one velocity field, so +10 years is ten 1-year
steps composed and -dt undoes +dt (up to interpolation): what is learnt from 1-2-year pairs is a rate that
extrapolates to +-10 years, never a function of dt it was not trained at. Atrophy moves tissue borders; a displacement that
grows with dt extrapolates where a difference image only scales. A diagnosis change at the same age (dt = 0) is
no change: visit pairs rarely change diagnosis, and diagnosis enters as the rate's condition.

The nuisance g. Both visits are noisy scans: x_s = s + n_s, x_t = s + dt c + n_t. The pair MSE's optimum is
E[x_t | x_s] = x_s - E[n_s | x_s] + dt c: a denoising term that does not grow with time. A model x_s + dt r can
only write it as a rate, which dt = 10 multiplies tenfold (the first run was worse than identity at +-10 years).
So the follow-up is predicted in training as
    x_t^ = clip(x' + g)          (g(x_s, c): the dt-independent part of the pair difference)
and g is dropped by `manipulate`: the counterfactual of a scan keeps the scan's own noise (mri.synthetic
re-renders a slice at other attributes with its noise seed), so the change applied is x' alone.

Loss over a batch of pairs (M = the source's foreground grown by 2 pixels, means over pixels):
    L = sum M (x_t^ - x_t)^2 / sum M  +  lambda_smooth mean |grad v|^2  +  lambda_rate_smooth mean |grad r|^2
(the last, off by default, keeps pixel-to-pixel texture out of the rate, which dt multiplies)
The targets carry their own scan noise, so the model learns the expected change. Outside M nothing changes.
"""
import keras
import numpy as np
from keras import ops

from models.layers import FusedAdam, foreground
from models.vagan import map_generator
from mri import training

PARAMETERISATIONS = ("displacement", "intensity")
INTEGRATIONS = ("squaring", "linear")   # the displacement of dt years: exp(dt v), or dt v (runs before squaring)
SQUARINGS = 6         # scaling and squaring: dt v halved 6 times, then composed with itself 6 times
LEGACY_ARGS = {"integration": "linear", "lambda_rate_smooth": 0.0}   # runs made before these options had these
TINY_FILTERS = 4


def warp(x, displacement):
    """x (N, S, S, C) sampled at p + displacement(p) (N, S, S, 2: rows, columns; bilinear, edges repeated)."""
    n, s = ops.shape(x)[0], ops.shape(x)[1]
    b, i, j = ops.meshgrid(ops.arange(n, dtype="float32"), ops.arange(s, dtype="float32"),
                           ops.arange(s, dtype="float32"), indexing="ij")
    coords = ops.stack([b, i + displacement[..., 0], j + displacement[..., 1]])
    return ops.stack([ops.image.map_coordinates(x[..., c], coords, order=1, fill_mode="nearest")
                      for c in range(x.shape[-1])], axis=-1)


def squared_gradient(field):
    """The mean squared difference of neighbouring pixels of a (N, S, S, C) field, along rows plus along columns."""
    return (ops.mean(ops.square(field[:, 1:] - field[:, :-1])) +
            ops.mean(ops.square(field[:, :, 1:] - field[:, :, :-1])))


def integrate(velocity, squarings=SQUARINGS):
    """exp(velocity): the displacement after unit time of the flow of a stationary velocity field (pixels), by
    scaling and squaring: phi = velocity / 2^K, then K times phi <- phi + phi(p + phi(p)) (phi composed with itself)."""
    phi = velocity / 2.0 ** squarings
    for _ in range(squarings):
        phi = phi + warp(phi, phi)
    return phi


class Longitudinal(keras.Model):
    """The change model: `fields(x, y_s, y_t)` gives the per-year fields, `change(...)` the changed slice."""

    def __init__(self, schema, size=128, filters=16, parameterisation="displacement", lambda_smooth=1.0, seed=0,
                 integration="squaring", lambda_rate_smooth=0.0, **kwargs):
        super().__init__(**kwargs)
        if size % 8:
            raise ValueError(f"image size must be a multiple of 8 (the U-Net pools 3 times), got {size}")
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {parameterisation!r}")
        if integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {INTEGRATIONS}, got {integration!r}")
        self.integration, self.lambda_rate_smooth = integration, lambda_rate_smooth
        self.schema, self.parameterisation, self.lambda_smooth = schema, parameterisation, lambda_smooth
        if "age" not in schema.names:
            raise ValueError("the longitudinal model needs the 'age' attribute (the time between visits)")
        self.target_columns = np.array([k for k in range(schema.width) if not
                                        schema.slices["age"].start <= k < schema.slices["age"].stop])
        self.net = map_generator(size, schema.width + len(self.target_columns), filters, channels=4, norm=False)
        out = self.net.layers[-1]
        out.kernel.assign(ops.zeros_like(out.kernel))   # the untrained model changes nothing
        self.step = keras.Variable(0, dtype="int64", trainable=False, name="step")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {n: keras.metrics.Mean(name=n) for n in ("loss", "pair_mse", "smooth", "rate_smooth",
                                                                "identity_mse")}
        self.built = True

    def compile(self, optimizer, jit_compile=False):
        super().compile(optimizer=None, jit_compile=jit_compile)
        self.u_optimizer = optimizer
        optimizer.build(self.net.trainable_weights)

    @property
    def optimizers(self):
        return {"u": self.u_optimizer}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def fields(self, x, y_s, y_t, training=False):
        """(displacement per year (N, S, S, 2), intensity rate per year (N, S, S, 1), nuisance (N, S, S, 1)),
        from the source's attributes and the target's without its age."""
        cond = ops.concatenate([y_s, ops.take(y_t, self.target_columns, axis=1)], axis=1)
        out = self.net([x, cond], training=training)
        v = ops.zeros_like(out[..., :2]) if self.parameterisation == "intensity" else out[..., :2]
        return v, out[..., 2:3], out[..., 3:]

    def change(self, x, y_s, y_t, dt, training=False, nuisance=False):
        """(x', per-year displacement v, per-year intensity rate r): x changed by dt years (dt (N,)) towards y_t,
        unchanged outside the grown foreground; with `nuisance` (training's prediction of the follow-up) plus g."""
        v, r, g = self.fields(x, y_s, y_t, training)
        dt = ops.reshape(ops.cast(dt, "float32"), (-1, 1, 1, 1))
        moved = warp(x, self.displacement(dt * v)) if self.parameterisation == "displacement" else x
        changed = ops.clip(moved + dt * r + (g if nuisance else 0.0), -1.0, 1.0)
        inside = foreground(x)
        return inside * changed + (1.0 - inside) * x, v, r

    def displacement(self, velocity):
        """The displacement of a velocity dt v: its flow exp(dt v) (`integrate`), or dt v itself (`linear`)."""
        return integrate(velocity) if self.integration == "squaring" else velocity

    def call(self, inputs, training=False):
        return self.change(*inputs, training=training)[0]

    def split(self, data):
        """A VisitPairs batch -> (x_s, y_s, y_t, dt, x_t)."""
        xx, cond = data
        w = self.schema.width
        return xx[..., :1], cond[:, :w], cond[:, w:2 * w], cond[:, 2 * w], xx[..., 1:]

    def losses_of(self, data, training=False):
        x, y_s, y_t, dt, target = self.split(data)
        changed, v, r = self.change(x, y_s, y_t, dt, training, nuisance=True)
        m = foreground(x)
        pair = ops.sum(m * ops.square(changed - target)) / ops.maximum(ops.sum(m), 1.0)
        ident = ops.sum(m * ops.square(x - target)) / ops.maximum(ops.sum(m), 1.0)
        return pair, squared_gradient(v), squared_gradient(r), ident

    def train_step(self, data):
        """One Adam step on L = pair MSE (with the nuisance) inside the brain + lambda_smooth |grad v|^2
        + lambda_rate_smooth |grad r|^2."""
        import tensorflow as tf
        with tf.GradientTape() as tape:
            pair, smooth, rate_smooth, ident = self.losses_of(data, training=True)
            loss = pair + self.lambda_smooth * smooth + self.lambda_rate_smooth * rate_smooth
        weights = self.net.trainable_weights
        self.u_optimizer.apply(tape.gradient(loss, weights), weights)
        for name, v in (("loss", loss), ("pair_mse", pair), ("smooth", smooth), ("rate_smooth", rate_smooth),
                        ("identity_mse", ident)):
            self.trackers[name].update_state(v)
        self.step.assign_add(1)
        return {name: t.result() for name, t in self.trackers.items()}

    def manipulate(self, images, source_attrs, target_attrs):
        """Each slice changed by (target age - source age) years towards the target attributes (no nuisance)."""
        x = np.asarray(images, np.float32)
        y_s, y_t = self.schema.encode(source_attrs), self.schema.encode(target_attrs)
        dt = np.asarray(target_attrs["age"], np.float32) - np.asarray(source_attrs["age"], np.float32)
        return np.asarray(self.change(ops.convert_to_tensor(x), ops.convert_to_tensor(y_s),
                                      ops.convert_to_tensor(y_t), ops.convert_to_tensor(dt))[0])


def from_args(args, schema):
    return Longitudinal(schema, args["size"], TINY_FILTERS if args["tiny"] else args["filters"],
                        args["parameterisation"], args["lambda_smooth"], args["seed"],
                        *(args.get(k, v) for k, v in LEGACY_ARGS.items()))


def compile_from_args(model, args):
    model.compile(FusedAdam(args["lr"]), jit_compile=training.jit_compile(args["jit"]))
    return model


def from_run(run_dir):
    """A trained run, ready for manipulate()."""
    return training.load_run(run_dir, from_args)
