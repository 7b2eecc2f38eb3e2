"""The oracle: a VGG-style CNN (Simonyan & Zisserman 2015) that predicts every schema attribute from a slice.

It scores manipulated images in evaluate.py (effectiveness), and its penultimate layer "features" (256-d)
is the embedding of the realism measures (KID; the Fréchet distance when samples suffice). Images larger
than 64x64 are first average-pooled to 64x64 ("downsample"): age and diagnosis show at that scale, and it
makes the oracle 4x cheaper at 128x128. Blocks are conv3x3-BN-ReLU, conv3x3-BN-ReLU, maxpool; then global
average pooling, the dense "features" layer and dropout, and one head per attribute ("head_<name>": one
linear output for continuous (z-scored value), one logit for binary, one logit per class for categorical),
concatenated in schema order into "logits" so that `schema.losses` applies directly.

Training minimises the sum of the per-attribute losses with Adam,

    L = sum_a L_a,   L_a = mean (z_a - zhat_a)^2 (continuous), BCE / softmax CE on the logits (the others),

and reads the attributes the way evaluate.py will, in inference mode:
- after every epoch the BatchNorm moving statistics are re-estimated for the current weights (the plain mean
  of the batch statistics over `calibration_steps` train batches): with momentum 0.9 under Adam they trail
  the weights, and inference-mode readings swing by years from one epoch to the next;
- every attribute is then scored on the val split (MAE; balanced accuracy, then cross-entropy) and keeps the
  weights of its own best epoch: the summed loss's best epoch is rarely every attribute's (the diagnosis
  cross-entropy overfits while the age head still improves).
`compose` joins the per-attribute snapshots into one functional model (one network per distinct epoch), so
the saved oracle is a single Keras file whose "logits" read each attribute with its own weights.
A functional model, saved in the Keras format; the schema travels in the run's config.json.
"""
import os

import numpy as np

from mri import stats
from mri.data.attributes import Schema
from mri.training import load_config

FILTERS = (16, 32, 64, 128)
WORKING_SIZE = 64
FEATURES = 256
TINY = dict(filters=(4, 8), features=16)
MODEL_FILE = "oracle.keras"


def _network(image, schema, names, size, filters, features, dropout, prefix=""):
    """The oracle's layers on the `image` tensor, every name prefixed by `prefix`: (features, {name: head})."""
    from keras import layers
    x = image
    if size > WORKING_SIZE:
        x = layers.AveragePooling2D(size // WORKING_SIZE, name=f"{prefix}downsample")(x)
    for i, f in enumerate(filters, 1):
        for j in (1, 2):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"{prefix}block{i}_conv{j}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"{prefix}block{i}_bn{j}")(x)
            x = layers.ReLU(name=f"{prefix}block{i}_relu{j}")(x)
        x = layers.MaxPooling2D(name=f"{prefix}block{i}_pool")(x)
    x = layers.GlobalAveragePooling2D(name=f"{prefix}gap")(x)
    feats = layers.Dense(features, activation="relu", name=f"{prefix}features")(x)
    x = layers.Dropout(dropout, name=f"{prefix}dropout")(feats)
    return feats, {n: layers.Dense(schema[n].width, name=f"{prefix}head_{n}")(x) for n in names}


def _logits(schema, heads):
    from keras import layers
    out = [heads[n] for n in schema.names]
    return layers.Concatenate(name="logits")(out) if len(out) > 1 else out[0]


def build(schema, size, filters=FILTERS, features=FEATURES, dropout=0.5, channels=1):
    """Uncompiled functional oracle for (size, size, channels) images; output (N, schema.width) logits."""
    import keras
    image = keras.Input((size, size, channels), name="image")
    _, heads = _network(image, schema, schema.names, size, filters, features, dropout)
    return keras.Model(image, _logits(schema, heads), name="oracle")


def compose(schema, size, snapshots, filters=FILTERS, features=FEATURES, dropout=0.5, channels=1):
    """One functional oracle that reads each attribute with the weights of its own epoch.

    `snapshots`: {name: weights (a `build` model's get_weights())}; attributes given the same list object
    share one network. The first attribute's network keeps the plain layer names (its "features" layer is
    the realism embedding, its convolutions DFI's features); another network's layers are prefixed with the
    names it reads ("dx_block1_conv1"). With one network this is `build` with those weights."""
    import keras
    groups = {}
    for n in schema.names:
        groups.setdefault(id(snapshots[n]), []).append(n)
    image = keras.Input((size, size, channels), name="image")
    heads, prefixes = {}, []
    for k, names in enumerate(groups.values()):
        prefixes.append("" if k == 0 else "_".join(names) + "_")
        heads.update(_network(image, schema, names, size, filters, features, dropout, prefixes[-1])[1])
    model = keras.Model(image, _logits(schema, heads), name="oracle")
    reference = build(schema, size, filters, features, dropout, channels)
    for prefix, names in zip(prefixes, groups.values()):
        reference.set_weights(snapshots[names[0]])
        for layer in reference.layers:
            if layer.weights and prefix + layer.name in {l.name for l in model.layers}:
                model.get_layer(prefix + layer.name).set_weights(layer.get_weights())
    return model


def compile_for(model, schema, learning_rate=1e-3, decay_steps=0):
    """Adam on the sum of the schema's per-attribute losses; each attribute's loss is also logged. With
    `decay_steps` the learning rate follows a cosine from `learning_rate` to 0 over that many steps."""
    import keras
    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)

    def attribute_loss(name):
        def fn(y_true, y_pred):
            return schema.losses(y_true, y_pred)[name]
        fn.__name__ = f"{name}_loss"
        return fn

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=schema.loss,
                  metrics=[attribute_loss(n) for n in schema.names], jit_compile=False)
    return model


def recalibrate_batchnorm(model, batches, steps, start_step=0):
    """Re-estimate every BatchNorm layer's moving mean and variance for the current weights: their plain
    average over `steps` training batches (`batches`: a mri.data.loader.Batches), the weights frozen. During
    training the moving statistics trail the weights (momentum 0.9 under Adam), so inference-mode readings
    swing from epoch to epoch; this makes them those of the saved weights (cumulative average, as
    torch.optim.swa_utils.update_bn)."""
    from keras import layers
    bns = [l for l in model.layers if isinstance(l, layers.BatchNormalization)]
    momentum = [l.momentum for l in bns]
    try:    # a forward pass in training mode moves only the moving statistics: no gradient step is taken
        for k in range(steps):
            for l in bns:
                l.momentum = k / (k + 1.0)   # moving = the mean of the k + 1 batch statistics so far
            model(batches.batch(start_step + k)[0], training=True)
    finally:
        for l, m in zip(bns, momentum):
            l.momentum = m


def fit(model, train, epochs, steps_per_epoch=0, patience=5, calibration=None, calibration_steps=0,
        verbose=2, log=print):
    """Train on `train` (mri.data.loader.Batches); after every epoch re-estimate the BatchNorm statistics on
    `calibration_steps` batches of `calibration` (unjittered train batches) and read every attribute on
    the val split of the same store, in inference mode. Each attribute keeps the weights of its best epoch (MAE for
    continuous attributes, balanced accuracy then cross-entropy for the others); training stops when no
    attribute improved for `patience` epochs. Returns (the composed oracle model, {name: best epoch (1-based)},
    per-epoch validation history)."""
    import keras
    from mri.data.loader import dataset
    schema = train.schema
    best, snapshots, epochs_of, history = {}, {}, {}, []
    state = {"waited": 0}

    def on_epoch_end(epoch, logs=None):
        if calibration_steps:
            recalibrate_batchnorm(model, calibration, calibration_steps, start_step=epoch * calibration_steps)
        idx, logits = split_logits(model, train.store, "val")
        scores = selection_scores(schema, logits, train.store.attrs, idx)
        weights, improved = model.get_weights(), False
        for n, s in scores.items():
            if n not in best or s < best[n]:
                best[n], snapshots[n], epochs_of[n], improved = s, weights, epoch + 1, True
        history.append({"epoch": epoch + 1, **{n: list(s) for n, s in scores.items()}})
        log(f"epoch {epoch + 1} val (inference mode): " + ", ".join(_describe_score(schema[n], s)
                                                                   for n, s in scores.items()))
        state["waited"] = 0 if improved else state["waited"] + 1
        if state["waited"] >= patience:
            model.stop_training = True

    model.fit(dataset(train), epochs=epochs, steps_per_epoch=steps_per_epoch or train.steps_per_epoch,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)], shuffle=False,
              verbose=verbose)
    arch = _architecture(model)
    shared = {}
    by_epoch = {n: shared.setdefault(epochs_of[n], snapshots[n]) for n in schema.names}
    return (compose(schema, int(model.inputs[0].shape[1]), by_epoch, **arch, channels=int(model.inputs[0].shape[-1])),
            epochs_of, history)


def _architecture(model):
    """build()'s keyword arguments of a built oracle, read off its layers."""
    convs = [l for l in model.layers if l.name.endswith("_conv2") and l.name.startswith("block")]
    return {"filters": tuple(l.filters for l in convs), "features": model.get_layer("features").units,
            "dropout": model.get_layer("dropout").rate}


def selection_scores(schema, logits, attrs, idx):
    """{name: score tuple, lower is better} of validation logits: (MAE,) for continuous attributes,
    (-balanced accuracy, cross-entropy) for the others."""
    preds = schema.decode_logits(logits)
    out = {}
    for a in schema.attributes:
        t = attrs[a.name][idx]
        if a.kind == "continuous":
            out[a.name] = (float(np.mean(np.abs(preds[a.name] - t))),)
        else:
            p = np.clip(schema.probability(logits, a.name, t), 1e-12, 1.0)
            out[a.name] = (-stats.balanced_accuracy(preds[a.name], t), float(-np.mean(np.log(p))))
    return out


def _describe_score(a, s):
    return f"{a.name} MAE {s[0]:.3g}" if a.kind == "continuous" else f"{a.name} bal. acc. {-s[0]:.3f} CE {s[1]:.3f}"


class Oracle:
    """A trained oracle with its schema: raw-unit predictions and features of image batches."""

    def __init__(self, model, schema):
        import keras
        self.model, self.schema = model, schema
        self.size = int(model.inputs[0].shape[1])
        self._both = keras.Model(model.inputs, [model.get_layer("features").output, model.outputs[0]])

    def outputs(self, images, batch_size=64):
        """(features (N, F), logits (N, width)) of images (N, S, S[, C]) in [-1, 1], batch by batch."""
        x = np.asarray(images, np.float32)
        x = x[..., None] if x.ndim == 3 else x
        parts = [self._both.predict_on_batch(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return tuple(np.concatenate([np.asarray(p[k]) for p in parts]) for k in (0, 1))

    def features(self, images, batch_size=64):
        """The penultimate "features" vectors (post-ReLU), the embedding of the realism measures (KID, FD)."""
        return self.outputs(images, batch_size)[0]

    def predict_raw(self, images, batch_size=64):
        """dict name -> (N,) predictions in raw units (years, points, 0/1, class index)."""
        return self.schema.decode_logits(self.outputs(images, batch_size)[1])


def split_indices(store, split, max_subjects=0, seed=0):
    """The split's slice indices; with `max_subjects`, those of that many seeded subjects at most."""
    idx = store.indices(split)
    subjects = np.unique(store.subject[idx])
    if max_subjects and len(subjects) > max_subjects:
        keep = np.random.default_rng([seed, 9]).choice(subjects, max_subjects, replace=False)
        idx = idx[np.isin(store.subject[idx], keep)]
    return idx


def split_logits(model, store, split, batch_size=64, max_subjects=0, seed=0):
    """(indices of the split's slices (`split_indices`), (N, width) logits of a keras oracle model in
    inference mode), read from the store a batch at a time."""
    idx = split_indices(store, split, max_subjects, seed)
    parts = [np.asarray(model.predict_on_batch(store.pixels(idx[i:i + batch_size])))
             for i in range(0, len(idx), batch_size)]
    return idx, np.concatenate(parts) if parts else np.zeros((0, int(model.outputs[0].shape[-1])), np.float32)


def split_predictions(oracle, store, split, batch_size=64, max_subjects=0, seed=0):
    """(indices of the split's slices, {name: (N,) raw predictions}), read from the store a batch at a time."""
    idx, logits = split_logits(oracle.model, store, split, batch_size, max_subjects, seed)
    return idx, oracle.schema.decode_logits(logits)


def split_metrics(oracle, store, split="val", names=None, batch_size=64, n_boot=1000, seed=0, max_subjects=0):
    """How the oracle reads each attribute (`names`, default all) on a split of `store`, in inference mode,
    with 95 % intervals from resampling the split's subjects: for continuous attributes MAE, bias (mean of
    prediction - truth) and Pearson r, beside the MAE of predicting the train mean; for the others accuracy,
    balanced accuracy (mean per-class recall; chance = 1 / classes present) and the majority class's accuracy.
    `max_subjects`: read that many seeded subjects of the split at most."""
    idx, preds = split_predictions(oracle, store, split, batch_size, max_subjects, seed)
    groups = store.subject[idx]
    boot = stats.SubjectBootstrap(groups, n_boot, seed)
    out = {"n": len(idx), "subjects": len(boot.subjects)}
    for n in names or oracle.schema.names:
        a, p, t = store.schema[n], preds[n], store.attrs[n][idx].astype(np.float64)
        if a.kind == "continuous":
            (mae, mae_ci), (bias, bias_ci) = boot.interval(np.abs(p - t), groups), boot.interval(p - t, groups)
            r = float(np.corrcoef(p, t)[0, 1]) if np.std(p) > 0 and np.std(t) > 0 else 0.0
            out[n] = {"mae": mae, "bias": bias, "r": r, "ci": {"mae": mae_ci, "bias": bias_ci},
                      "mae_predicting_train_mean": float(np.mean(np.abs(a.mean - t)))}
            continue
        acc, acc_ci = boot.interval((p == t).astype(np.float64), groups)
        train = store.attrs[n][store.indices("train")].astype(np.int64)
        out[n] = {"accuracy": acc, "balanced_accuracy": stats.balanced_accuracy(p, t),
                  "ci": {"accuracy": acc_ci, "balanced_accuracy": stats.percentile_interval(
                      stats.balanced_accuracy(p, t, boot.for_pairs(groups)))},
                  "chance_balanced_accuracy": 1.0 / len(np.unique(t)),
                  "majority_accuracy": float(np.mean(t == np.bincount(train, minlength=a.width).argmax()))}
    return out


def describe_metrics(metrics, cell=None):
    """One line per attribute of split_metrics(), "name: ..."; `cell(m, key)` formats a value with its interval."""
    def plain(m, k):
        lo, hi = m["ci"][k]
        return f"{m[k]:.3g} [{lo:.3g}, {hi:.3g}]"
    cell = cell or plain
    lines = []
    for n, m in metrics.items():
        if not isinstance(m, dict):
            continue
        if "mae" in m:
            lines.append(f"{n}: MAE {cell(m, 'mae')}, bias {cell(m, 'bias')}, r {m['r']:.3f} "
                         f"(predicting the train mean: MAE {m['mae_predicting_train_mean']:.3g})")
        else:
            lines.append(f"{n}: balanced accuracy {cell(m, 'balanced_accuracy')} (chance "
                         f"{m['chance_balanced_accuracy']:.3g}), accuracy {cell(m, 'accuracy')} (majority class "
                         f"{m['majority_accuracy']:.3g})")
    return lines


def save(model, out_dir):
    """Write <out_dir>/oracle.keras atomically (an uncompiled copy: loading needs no custom loss)."""
    import keras
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    tmp = os.path.join(out_dir, f"oracle.tmp-{os.getpid()}.keras")
    try:
        keras.Model(model.inputs, model.outputs, name=model.name).save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_oracle(run_dir):
    """The Oracle saved by train_oracle.py in `run_dir` (oracle.keras + config.json with its schema)."""
    import keras
    model_path, config_path = os.path.join(run_dir, MODEL_FILE), os.path.join(run_dir, "config.json")
    for p in (model_path, config_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} does not exist: {run_dir} is not a trained oracle; train one with "
                                    f"`python train_oracle.py --store STORE.h5 --out {run_dir}`")
    config = load_config(run_dir)
    if config.get("method") != "oracle":
        raise ValueError(f"{config_path} describes a {config.get('method')!r} run, not an oracle")
    schema = Schema.from_records(config["schema"])
    return Oracle(keras.models.load_model(model_path, compile=False), schema)
