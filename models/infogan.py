"""InfoGAN (Chen et al., NeurIPS 2016) on 2D slices, as the report adapted it: codes learnt without labels, tied
to attributes after training, and an encoder to edit a given slice.

Codes: z ~ U(-1, 1)^z_dim, one categorical code k ~ U{0..cat_dim-1} (c_cat its one-hot) and cont_dim continuous
codes c_cont ~ U(-1, 1); c = [c_cat, c_cont]. Networks (f = filters, 32 by default; LeakyReLU 0.2 everywhere):
    G      [z, c] -> image       Dense to (S/16)^2 x 8f, BN; ConvTranspose 4x4 stride 2 to 4f, 2f, f (BN), then to
                                 1 with tanh (8->16->32->64->128 at 128 px).
    T      image -> h            the shared trunk: Conv 4x4 stride 2 to f (no BN), 2f, 4f, 8f (BN), Dense `hidden`
                                 without BN: D sees real and fake slices in separate batches, and a per-batch
                                 normalised dense layer gives both batches the same mean logit (D cannot learn;
                                 G then drifts to noise).
    D      h -> logit s          Dense 1.                Q  h -> (l, mu, log sigma)  Dense 128 + BN, Dense.
    E_z    image -> z            T's architecture (own weights), Dense z_dim.
Losses (batch means; x real slices; G = G(z, c); (l, mu, log sigma) = Q(T(G)); sigma(.) the sigmoid):
    L_D  = -log sigma(D(T(x))) - log(1 - sigma(D(T(G))))                          (BCE real / fake)
    L_MI = lambda_cat CE(l, k) + lambda_cont mean_j [log sigma_j + (c_j - mu_j)^2 / (2 sigma_j^2)]
    L_GQ = -log sigma(D(T(G))) + L_MI
Training has two phases, recorded in the non-trainable `phase` variable (as models/cgan.py):
    phase 0  T, D minimise L_D + L_MI (D's Adam, L_MI on the step's fakes); then G, Q minimise L_GQ (G/Q's Adam,
             fresh codes). The MI term trains the shared trunk, as the original does (its -MI is in both losses,
             the trunk in D's variables; a widely copied PyTorch version leaves it out, and its noise then has no
             effect once the codes are fixed). One optimizer per variable: the trunk moves only with D's Adam.
    phase 1  E_z minimises |E_z(G(z, c)) - z|^2 (G fixed).
After training, `write_codes` ties the codes to attributes on the train split (stored as the run's codes.json):
the categorical values to the diagnosis classes by optimal assignment on Q's predictions, each continuous code
to the attribute (continuous ones, or the slice position) mu_j correlates with best, by the fit mu_j = a + b v;
and it records what every code carries for every attribute (`associations`: Pearson r, correlation ratio eta,
Cramer's V), whether or not it is tied.
manipulate: c_hat = (argmax l, mu) of Q(T(x)) with every mapped code set from the attributes (k = the value
assigned to the class; c_j = clip(a + b v, -1, 1)); decode x' = G(E_z(x), c_hat(target)); residual
x' = x + G(E_z(x), c_hat(target)) - G(E_z(x), c_hat(source)), exactly x at unchanged attributes.
"""
import os

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops
from scipy.optimize import linear_sum_assignment
from scipy.stats.contingency import association

from models.cgan import bce
from models.layers import FusedAdam, batch_norm, down, up
from mri import training
from mri.data.io import read_json, write_json

MIN_CORRELATION = 0.3     # a weaker continuous code does not capture its best attribute
TINY = dict(filters=4, hidden=32)
CODES = "codes.json"
MODES = ("decode", "residual")


def generator(size, z_dim, c_dim, filters=32, channels=1):
    z = keras.Input((z_dim + c_dim,), name="z_c")
    h = layers.Dense((size // 16) ** 2 * 8 * filters, use_bias=False)(z)
    h = layers.LeakyReLU(0.2)(batch_norm()(layers.Reshape((size // 16, size // 16, 8 * filters))(h)))
    for k in (4, 2, 1):
        h = up(h, k * filters, activation="leaky_relu")
    return keras.Model(z, up(h, channels, norm=False, activation="tanh"), name="generator")


def trunk(size, filters=32, hidden=1024, out=None, name="trunk", channels=1):
    """T (out None: the features h) or E_z (out = z_dim: a linear layer on them)."""
    x = keras.Input((size, size, channels), name="image")
    h = x
    for k in (1, 2, 4, 8):
        h = down(h, k * filters, norm=k > 1)
    h = layers.LeakyReLU(0.2)(layers.Dense(hidden)(layers.Flatten()(h)))        # no BN here: module docstring
    return keras.Model(x, h if out is None else layers.Dense(out)(h), name=name)


def head(hidden, width, inner=0, name="head"):
    h = inp = keras.Input((hidden,))
    if inner:
        h = layers.LeakyReLU(0.2)(batch_norm()(layers.Dense(inner, use_bias=False)(h)))
    return keras.Model(inp, layers.Dense(width)(h), name=name)


def assign_codes(cat, mu, n_values, classes=None, candidates=None):
    """The code-to-attribute map from Q's predictions on labelled slices: `cat` (N,) categorical values (of
    n_values), `mu` (N, cont_dim) continuous means, `classes` (name, (N,) class indices, number of classes) or
    None, `candidates` {attribute: (N,) values}. Returns {"categorical": {attribute, classes (each value's class,
    or None), accuracy} or None, "continuous": [{code, attribute, correlation, slope, intercept} per code]}."""
    out = {"categorical": None, "continuous": []}
    if classes is not None:
        name, labels, n = classes
        confusion = np.zeros((n_values, n))
        np.add.at(confusion, (cat, labels), 1)
        rows, cols = linear_sum_assignment(-confusion)
        value_class = dict(zip(rows.tolist(), cols.tolist()))
        out["categorical"] = dict(attribute=name, classes=[value_class.get(k) for k in range(n_values)],
                                  accuracy=float(confusion[rows, cols].sum() / max(len(labels), 1)),
                                  majority=float(confusion.sum(0).max() / max(len(labels), 1)))
    for j in range(mu.shape[1]):
        fits = []
        for name, v in (candidates or {}).items():
            v, m = np.asarray(v, np.float64), mu[:, j]
            r = correlation(v, m)
            slope, intercept = np.polyfit(v, m, 1) if v.std() > 0 else (0.0, m.mean())
            fits.append(dict(code=j, attribute=name, correlation=float(r), slope=float(slope), intercept=float(intercept)))
        out["continuous"] += [max(fits, key=lambda f: abs(f["correlation"]))] if fits else []
    return out


def correlation(v, m):
    """Pearson r of two (N,) arrays, 0 when either is constant."""
    v, m = np.asarray(v, np.float64), np.asarray(m, np.float64)
    return float(np.corrcoef(v, m)[0, 1]) if v.std() > 0 and m.std() > 0 else 0.0


def correlation_ratio(groups, v):
    """eta = sqrt(SS_between / SS_total) of values v grouped by `groups`: the share of v's spread that the group
    means explain (0: none, 1: v is a function of the group)."""
    v = np.asarray(v, np.float64)
    total = np.sum((v - v.mean()) ** 2)
    between = sum(np.sum(groups == g) * (v[groups == g].mean() - v.mean()) ** 2 for g in np.unique(groups))
    return float(np.sqrt(between / total)) if total > 0 else 0.0


def cramers_v(a, b):
    """Cramer's V of two labelings (non-negative integers): 0 independent, 1 one determines the other."""
    table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
    np.add.at(table, (a, b), 1)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]            # values that never occur
    return float(association(table, method="cramer")) if min(table.shape) > 1 else 0.0


def associations(cat, mu, continuous, categorical):
    """What each code carries, for every attribute: {"categorical": {attribute: value}, "continuous j":
    {attribute: value}}. Categorical code: eta of each `continuous` attribute {name: (N,)} by its value, Cramer's
    V with each `categorical` one {name: (N,) class indices}; continuous code j: Pearson r of mu_j with each
    continuous attribute, eta of mu_j by class for a categorical one."""
    out = {"categorical": {**{n: correlation_ratio(cat, v) for n, v in continuous.items()},
                           **{n: cramers_v(cat, v) for n, v in categorical.items()}}}
    for j in range(mu.shape[1]):
        m = mu[:, j].astype(np.float64)
        out[f"continuous {j}"] = {**{n: correlation(v, m) for n, v in continuous.items()},
                                  **{n: correlation_ratio(v, m) for n, v in categorical.items()}}
    return out


class InfoGAN(keras.Model):
    """InfoGAN with a code encoder; `codes` is the code-to-attribute map (assign_codes), needed to manipulate."""

    def __init__(self, schema, size=128, z_dim=62, cat_dim=3, cont_dim=2, filters=32, hidden=1024,
                 lambda_cat=1.0, lambda_cont=0.1, seed=0, mode="decode", channels=1, **kwargs):
        super().__init__(**kwargs)
        if size < 16 or size % 16:
            raise ValueError(f"image size must be a multiple of 16, got {size}")
        if cat_dim < 1 or cont_dim < 1 or mode not in MODES:
            raise ValueError(f"cat_dim >= 1, cont_dim >= 1 and mode in {MODES}")
        self.schema, self.z_dim, self.cat_dim, self.cont_dim, self.mode = schema, z_dim, cat_dim, cont_dim, mode
        self.lambda_cat, self.lambda_cont, self.codes = lambda_cat, lambda_cont, None
        self.generator = generator(size, z_dim, cat_dim + cont_dim, filters, channels)
        self.trunk = trunk(size, filters, hidden, channels=channels)
        self.d_head = head(hidden, 1, name="d_head")
        self.q_head = head(hidden, cat_dim + 2 * cont_dim, inner=128, name="q_head")
        self.encoder_z = trunk(size, filters, hidden, out=z_dim, name="encoder_z", channels=channels)
        self.step = keras.Variable(0, dtype="int64", trainable=False, name="step")
        self.phase = keras.Variable(0, dtype="int32", trainable=False, name="phase")
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {n: keras.metrics.Mean(name=n) for n in ("d_loss", "g_loss", "cat_ce", "cont_nll", "ez_loss")}
        self.figure_z = np.random.default_rng(seed).uniform(-1, 1, (1, z_dim)).astype(np.float32)
        self.built = True

    def compile(self, d_optimizer, g_optimizer, e_optimizer, jit_compile=False):
        super().compile(optimizer=None, jit_compile=jit_compile)
        self.d_optimizer, self.g_optimizer, self.e_optimizer = d_optimizer, g_optimizer, e_optimizer
        d_optimizer.build(self.d_weights)
        g_optimizer.build(self.gq_weights)
        e_optimizer.build(self.encoder_z.trainable_weights)

    d_weights = property(lambda self: self.trunk.trainable_weights + self.d_head.trainable_weights)
    gq_weights = property(lambda self: self.generator.trainable_weights + self.q_head.trainable_weights)
    optimizers = property(lambda self: {"d": self.d_optimizer, "g": self.g_optimizer, "e": self.e_optimizer})
    metrics = property(lambda self: list(self.trackers.values()))

    def sample_codes(self, n):
        """(z, k, c): noise, categorical values and the code vector [one-hot(k), c_cont]."""
        z = keras.random.uniform((n, self.z_dim), -1.0, 1.0, seed=self.seed_generator)
        k = keras.random.randint((n,), 0, self.cat_dim, seed=self.seed_generator)
        cont = keras.random.uniform((n, self.cont_dim), -1.0, 1.0, seed=self.seed_generator)
        return z, k, ops.concatenate([ops.one_hot(k, self.cat_dim), cont], axis=1)

    def generate(self, z, c, training=False):
        return self.generator(ops.concatenate([z, c], axis=1), training=training)

    def q(self, h, training=False):
        """Q of trunk features h: (categorical logits, means, log-stds)."""
        out, n = self.q_head(h, training=training), self.cat_dim + self.cont_dim
        return out[:, :self.cat_dim], out[:, self.cat_dim:n], out[:, n:]

    def info_terms(self, q, k, c):
        """(CE(l, k), mean Gaussian NLL of c_cont under (mu, sigma)) of Q's outputs q."""
        logits, mu, log_std = q
        ce = ops.mean(ops.sparse_categorical_crossentropy(k, logits, from_logits=True))
        return ce, ops.mean(log_std + ops.square(c[:, self.cat_dim:] - mu) / (2.0 * ops.exp(2.0 * log_std)))

    def train_step(self, data):
        """One GAN step (a D step, then a G/Q step) in phase 0, one encoder step in phase 1; logs every loss."""
        x = data[0]
        ops.cond(self.phase == 0, lambda: self.gan_step(x), lambda: self.encoder_step(ops.shape(x)[0]))
        self.step.assign_add(1)
        return {"phase": self.phase, **{m.name: m.result() for m in self.metrics}}

    def gan_step(self, x):
        """A D step (L_D + L_MI on T, D), then a G/Q step (L_GQ) with fresh codes."""
        for name, v in zip(("d_loss", "g_loss", "cat_ce", "cont_nll"), (self.d_step(x), *self.g_step(ops.shape(x)[0]))):
            self.trackers[name].update_state(v)

    def mi_loss(self, h, k, c, training=True):
        """L_MI = lambda_cat CE + lambda_cont NLL of Q on trunk features h of fakes with codes (k, c); (L_MI, CE, NLL)."""
        ce, nll = self.info_terms(self.q(h, training=training), k, c)
        return self.lambda_cat * ce + self.lambda_cont * nll, ce, nll

    def d_step(self, x):
        """T and D minimise L_D + L_MI, L_D = BCE(D(T(x)), 1) + BCE(D(T(G(z, c))), 0), L_MI on the same fakes (Q's
        head is not moved here); returns L_D."""
        z, k, c = self.sample_codes(ops.shape(x)[0])
        fake = self.generate(z, c, training=True)
        with tf.GradientTape() as tape:
            h = self.trunk(fake, training=True)
            loss = bce(1.0, self.d_head(self.trunk(x, training=True))) + bce(0.0, self.d_head(h))
            total = loss + self.mi_loss(h, k, c)[0]
        self.d_optimizer.apply(tape.gradient(total, self.d_weights), self.d_weights)
        return loss

    def g_step(self, n):
        """G and Q minimise L_GQ = BCE(D(T(G)), 1) + lambda_cat CE + lambda_cont NLL (T and D fixed); fresh codes.
        Returns (BCE, CE, NLL)."""
        z, k, c = self.sample_codes(n)
        with tf.GradientTape() as tape:
            h = self.trunk(self.generate(z, c, training=True), training=True)
            adv = bce(1.0, self.d_head(h))
            mi, ce, nll = self.mi_loss(h, k, c)
            total = adv + mi
        self.g_optimizer.apply(tape.gradient(total, self.gq_weights), self.gq_weights)
        return adv, ce, nll

    def encoder_step(self, n):
        """E_z minimises |E_z(G(z, c)) - z|^2, G fixed."""
        z, _, c = self.sample_codes(n)
        fake = self.generate(z, c)
        with tf.GradientTape() as tape:
            loss = ops.mean(ops.square(self.encoder_z(fake, training=True) - z))
        w = self.encoder_z.trainable_weights
        self.e_optimizer.apply(tape.gradient(loss, w), w)
        self.trackers["ez_loss"].update_state(loss)

    def predict_codes(self, images, batch=256):
        """Q's reading of real or generated slices: (categorical values (N,), continuous means (N, cont_dim))."""
        cats, mus = [], []
        for i in range(0, len(images), batch):
            logits, mu, _ = self.q(self.trunk(np.asarray(images[i:i + batch], np.float32)))
            cats.append(np.asarray(ops.argmax(logits, axis=1)))
            mus.append(np.asarray(mu))
        return np.concatenate(cats), np.concatenate(mus)

    def code_vector(self, cat, cont):
        return np.concatenate([np.eye(self.cat_dim, dtype=np.float32)[cat], cont], axis=1).astype(np.float32)

    def captured(self):
        """{attribute: ...} the map ties a code to (the slice position included): a continuous code with
        |correlation| >= MIN_CORRELATION, the categorical code if its assignment beats the majority class."""
        if self.codes is None:
            raise ValueError("this InfoGAN has no code-to-attribute map (codes.json): finish its run with "
                             "train_infogan.py, which writes it after training")
        cat = self.codes["categorical"]
        cat = cat if cat and cat["accuracy"] > cat.get("majority", 0.0) else None          # better than a constant
        cont = sorted((f for f in self.codes["continuous"] if abs(f["correlation"]) >= MIN_CORRELATION),
                      key=lambda f: abs(f["correlation"]))
        return {**({cat["attribute"]: cat} if cat else {}), **{f["attribute"]: f for f in cont}}   # best code last

    def unsupported(self):
        """The schema's attributes no code captures: changing them is not supported."""
        return [n for n in self.schema.names if n not in self.captured()]

    def supports(self, source_attrs, target_attrs):
        """(N,) bool: every changed attribute is captured by a code (a class: by a categorical value)."""
        captured, ok = self.captured(), True
        for name in self.schema.names:
            t, m = np.asarray(target_attrs[name]), captured.get(name, {"classes": []})
            can = np.isin(t, [v for v in m["classes"] if v is not None]) if "classes" in m else True
            ok = ok & ((np.asarray(source_attrs[name]) == t) | can)
        return ok

    def codes_for(self, cat, cont, attrs):
        """The code vector of slices read as (cat, cont) by Q, with each mapped code set from `attrs`."""
        cat, cont, captured = cat.copy(), cont.copy(), self.captured()
        for name, m in captured.items():
            if name not in attrs:
                continue
            v = np.asarray(attrs[name])
            if "classes" in m:
                value = {c: i for i, c in enumerate(m["classes"]) if c is not None}
                cat = np.array([value.get(int(a), q) for a, q in zip(v, cat)])
            else:
                cont[:, m["code"]] = np.clip(m["intercept"] + m["slope"] * v, -1.0, 1.0)
        return self.code_vector(cat, cont)

    def manipulate(self, images, source_attrs, target_attrs):
        """decode: G(E_z(x), c_hat(target)); residual: x + G(E_z(x), c_hat(target)) - G(E_z(x), c_hat(source)),
        exactly x where the codes are unchanged."""
        x = np.asarray(images, np.float32)
        z = np.asarray(self.encoder_z(x, training=False))
        cat, cont = self.predict_codes(x)
        c_t = self.codes_for(cat, cont, target_attrs)
        if self.mode == "decode":
            return np.asarray(self.generate(z, c_t))
        c_s = self.codes_for(cat, cont, source_attrs)
        both = np.asarray(self.generate(np.concatenate([z, z]), np.concatenate([c_t, c_s])))
        same = np.all(c_t == c_s, axis=1).reshape(-1, 1, 1, 1)   # bitwise: a batched render may differ in ulps
        return np.where(same, x, np.clip(x + both[:len(x)] - both[len(x):], -1.0, 1.0))

    @property
    def by_construction(self):
        return ("reconstruction_mse", "composition_l1") if self.mode == "residual" else ()

    def sample_columns(self, images, raw, n_steps=5):
        """The classic InfoGAN figure for the per-epoch grid: row i the categorical value i mod cat_dim, columns a
        sweep of each continuous code over [-1, 1] (the others 0), one fixed z (the grid's first column: the
        validation slices)."""
        n, k = len(images), self.cont_dim * n_steps                 # k columns, generated in one call
        cont = np.zeros((k, n, self.cont_dim), np.float32)
        for j in range(self.cont_dim):
            cont[j * n_steps:(j + 1) * n_steps, :, j] = np.linspace(-1, 1, n_steps)[:, None]
        c = self.code_vector(np.tile(np.arange(n) % self.cat_dim, k), cont.reshape(k * n, self.cont_dim))
        return np.split(np.asarray(self.generate(np.repeat(self.figure_z, k * n, 0), c)), k)


def from_args(args, schema, mode="decode"):
    """The (uncompiled) model of a train_infogan.py argument dict (a run's config.json "args")."""
    arch = TINY if args["tiny"] else dict(filters=args["filters"], hidden=args["hidden"])
    cat_dim = args["cat_dim"] or next((a.width for a in schema.attributes if a.kind == "categorical"), 3)
    return InfoGAN(schema, args["size"], args["z_dim"], cat_dim, args["cont_dim"], **arch,
                   lambda_cat=args["lambda_cat"], lambda_cont=args["lambda_cont"], seed=args["seed"], mode=mode,
                   channels=args.get("channels", 1))


def compile_from_args(model, args):
    """Adam with betas (0.5, 0.99): D and the trunk (under L_D + L_MI) at lr_d, G and Q at lr_g, E_z at lr_g."""
    adam = lambda lr: FusedAdam(lr, beta_1=0.5, beta_2=0.99)
    model.compile(adam(args["lr_d"]), adam(args["lr_g"]), adam(args["lr_g"]), jit_compile=training.jit_compile(args["jit"]))
    return model


def write_codes(model, run_dir, store, index, n_max=4096):
    """Tie the codes to attributes (assign_codes) on Q's predictions of the train slices `index` (evenly thinned to
    n_max): the categorical code to the first categorical attribute, each continuous one to the continuous
    attributes or the slice position. Stored as the run's codes.json (with the unsupported attributes), printed."""
    idx = np.asarray(index)[np.linspace(0, len(index) - 1, min(n_max, len(index))).astype(int)]
    cat, mu = model.predict_codes(store.pixels(idx))
    raw = store.raw(idx, model.schema.names)
    dx = next((a for a in model.schema.attributes if a.kind == "categorical"), None)
    candidates = dict({a.name: raw[a.name] for a in model.schema.attributes if a.kind == "continuous"},
                      slice=store.slice[idx].astype(np.float64))
    model.codes = assign_codes(cat, mu, model.cat_dim, dx and (dx.name, raw[dx.name].astype(int), dx.width), candidates)
    classes = {a.name: raw[a.name].astype(int) for a in model.schema.attributes if a.kind == "categorical"}
    model.codes["associations"] = associations(cat, mu, candidates, classes)
    write_json(os.path.join(run_dir, CODES), dict(model.codes, unsupported=model.unsupported()))
    c = model.codes["categorical"]
    lines = [f"categorical code -> {c['attribute']}: value k is class {c['classes']} (train accuracy "
             f"{c['accuracy']:.3f}, majority class {c['majority']:.3f})"] if c else []
    lines += [f"continuous code {f['code']} -> {f['attribute']} (r = {f['correlation']:+.3f}, mu = "
              f"{f['intercept']:.4g} {f['slope']:+.4g} v)" for f in model.codes["continuous"]]
    measure = lambda code, n: ("eta", "V")[n in classes] if code == "categorical" else ("r", "eta")[n in classes]
    lines += [f"{code} code: " + ", ".join(f"{n} {measure(code, n)} {v:+.3f}" for n, v in values.items())
              for code, values in model.codes["associations"].items()]
    print("\n".join(lines + [f"unsupported (no code captures them): {', '.join(model.unsupported()) or 'none'}"]))
    return model.codes


def from_run(run_dir, mode="decode"):
    """A trained run with its code map (codes.json), ready for manipulate() in `mode` (decode or residual)."""
    if mode not in MODES:
        raise ValueError(f"{run_dir}@{mode}: InfoGAN's manipulate modes are {MODES}")
    model = training.load_run(run_dir, lambda args, schema: from_args(args, schema, mode))
    if os.path.exists(os.path.join(run_dir, CODES)):
        model.codes = {k: v for k, v in read_json(os.path.join(run_dir, CODES)).items() if k != "unsupported"}
    return model
