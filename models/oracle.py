"""The oracle: a VGG-style CNN (Simonyan & Zisserman 2015) that predicts every schema attribute from a slice.

It scores manipulated images in evaluate.py (effectiveness), and its penultimate layer "features" (256-d)
is the embedding of the realism measures (KID; the Fréchet distance when samples suffice). Images larger
than 64x64 are first average-pooled to 64x64 ("downsample"): age and diagnosis show at that scale, and it makes the oracle 4x cheaper at 128x128
(about 1 minute per epoch of the default synthetic store on 2 CPU cores). Blocks are conv3x3-BN-ReLU,
conv3x3-BN-ReLU, maxpool;
then global average pooling, the dense "features" layer and dropout, and one head per attribute
("head_<name>": one linear output for continuous (z-scored value), one logit for binary, one logit per class
for categorical), concatenated in schema order into "logits" so that `schema.losses` applies directly.
A functional model, saved in the Keras format; the schema travels in the run's config.json.
"""
import json
import os

import numpy as np

from mri.attributes import Schema
from mri.io import read_json

FILTERS = (16, 32, 64, 128)
WORKING_SIZE = 64
FEATURES = 256
TINY = dict(filters=(4, 8), features=16)
MODEL_FILE = "oracle.keras"


def build(schema, size, filters=FILTERS, features=FEATURES, dropout=0.5):
    """Uncompiled functional oracle for (size, size, 1) images; output (N, schema.width) logits."""
    import keras
    from keras import layers
    image = keras.Input((size, size, 1), name="image")
    x = image
    if size > WORKING_SIZE:
        x = layers.AveragePooling2D(size // WORKING_SIZE, name="downsample")(x)
    for i, f in enumerate(filters, 1):
        for j in (1, 2):
            x = layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"block{i}_conv{j}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"block{i}_bn{j}")(x)
            x = layers.ReLU(name=f"block{i}_relu{j}")(x)
        x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    feats = layers.Dense(features, activation="relu", name="features")(x)
    x = layers.Dropout(dropout, name="dropout")(feats)
    heads = [layers.Dense(a.width, name=f"head_{a.name}")(x) for a in schema.attributes]
    logits = layers.Concatenate(name="logits")(heads) if len(heads) > 1 else heads[0]
    return keras.Model(image, logits, name="oracle")


def compile_for(model, schema, learning_rate=1e-3):
    """Adam on the sum of the schema's per-attribute losses; each attribute's loss is also logged."""
    import keras

    def attribute_loss(name):
        def fn(y_true, y_pred):
            return schema.losses(y_true, y_pred)[name]
        fn.__name__ = f"{name}_loss"
        return fn

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=schema.loss,
                  metrics=[attribute_loss(n) for n in schema.names], jit_compile=False)
    return model


def fit(model, train, val, epochs, steps_per_epoch=0, patience=5, verbose=2):
    """Train on `train` (mri.loader.Batches), early-stopped on the validation loss of `val` (a Batches
    without shuffling), restoring the best epoch's weights. Returns the Keras history."""
    import keras
    from mri.loader import dataset
    stop = keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True)
    return model.fit(dataset(train), epochs=epochs, steps_per_epoch=steps_per_epoch or train.steps_per_epoch,
                     validation_data=dataset(val), validation_steps=val.steps_per_epoch,
                     callbacks=[stop], shuffle=False, verbose=verbose)


class Oracle:
    """A trained oracle with its schema: raw-unit predictions and features of image batches."""

    def __init__(self, model, schema):
        import keras
        self.model, self.schema = model, schema
        self.size = int(model.inputs[0].shape[1])
        self._both = keras.Model(model.inputs, [model.get_layer("features").output, model.outputs[0]])

    def outputs(self, images, batch_size=64):
        """(features (N, F), logits (N, width)) of images (N, S, S[, 1]) in [-1, 1], batch by batch."""
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


def split_predictions(oracle, store, split, batch_size=64):
    """(indices of the split's slices, {name: (N,) raw predictions}), read from the store a batch at a time."""
    idx = store.indices(split)
    preds = {n: [] for n in oracle.schema.names}
    for i in range(0, len(idx), batch_size):
        for n, v in oracle.predict_raw(store.images(idx[i:i + batch_size]), batch_size).items():
            preds[n].append(v)
    return idx, {n: np.concatenate(v) if v else np.zeros(0) for n, v in preds.items()}


def split_metrics(oracle, store, split="val", batch_size=64):
    """Per attribute on a split, in raw units: accuracy (binary/categorical) or MAE (continuous), beside the
    trivial reference (majority class / predicting the train mean) so the numbers can be judged."""
    idx, preds = split_predictions(oracle, store, split, batch_size)
    out = {}
    for a in oracle.schema.attributes:
        p, t = preds[a.name], store.attrs[a.name][idx]
        if a.kind == "continuous":
            out[a.name] = {"mae": float(np.mean(np.abs(p - t))), "mae_predicting_train_mean": float(np.mean(np.abs(a.mean - t))), "n": len(idx)}
        else:
            train = store.attrs[a.name][store.indices("train")].astype(np.int64)
            majority = np.bincount(train, minlength=a.width).argmax()
            out[a.name] = {"accuracy": float(np.mean(p == t)), "majority_accuracy": float(np.mean(t == majority)), "n": len(idx)}
    return out


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
    config = read_json(config_path)
    if config.get("method") != "oracle":
        raise ValueError(f"{config_path} describes a {config.get('method')!r} run, not an oracle")
    schema = Schema.from_json(json.dumps(config["schema"]))
    return Oracle(keras.models.load_model(model_path, compile=False), schema)
