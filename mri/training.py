"""Shared pieces of every train_*.py: common flags, the run directory, exact-resume checkpoints,
callbacks (CSV log, TensorBoard scalars and attribute-sweep grids) and the fit loop.

Contract for a method model (a subclassed keras.Model):
- all sub-networks are built in __init__ (shapes are known from the config), and `compile()` builds every
  optimizer on its variables, so a checkpoint can be restored before the first step;
- a non-trainable `step` variable counts training iterations (schedules read it);
- randomness inside train_step comes from keras.random.SeedGenerator objects owned by the model, whose state
  is a model variable: the checkpoint holds it, so a resumed run draws the same numbers;
- `optimizers` property: {name: optimizer};
- `manipulate(images, source_attrs, target_attrs)` (models/__init__.py);
- optional `sample_columns(images, raw)`: the per-epoch grid's columns, instead of the attribute sweep.
"""
import json
import os
import sys

import numpy as np

from mri.data import grids
from mri.data.attributes import Schema
from mri.data.io import atomic_path, exit_on, read_json, weights_hash, write_json

# config.json arguments that name another run a method uses as a helper network (a pretrained regressor, a
# feature network): such a run must not be the evaluation oracle. Run stores them absolute, with the
# content hash of the helper's weights under "helpers"; these values name no run
AUXILIARY_ARGS = ("regressor", "features")

CHECKPOINT = "checkpoint.npz"


def add_common_args(p, method, epochs=10, batch_size=32, attrs="age,dx"):
    """The flags every train_*.py has."""
    p.add_argument("--store", default="data/synthetic.h5", help="HDF5 slice store from data_prep.py")
    p.add_argument("--attrs", default=attrs, help="comma-separated attributes to condition on")
    p.add_argument("--out", default=f"runs/{method}/default", help="run directory (config, checkpoint, logs)")
    p.add_argument("--epochs", type=int, default=epochs, help="epochs to train in total (a resumed run continues up to it)")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="iterations per epoch (0: one pass over the train split)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and every random draw")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--tiny", action="store_true", help="smallest architecture, for smoke runs and tests")
    p.add_argument("--jitter", type=float, default=0.05, help="brightness/contrast jitter amplitude (0: off)")
    p.add_argument("--jit", choices=["auto", "on", "off"], default="auto",
                   help="XLA compilation of train_step; auto: on with a GPU, off on CPU (XLA measured 4x slower "
                        "than graph mode on CPU)")
    add_verbose_arg(p)
    return p


def add_verbose_arg(p):
    """--verbose, which mri/runtime.py reads from the command line before TensorFlow is imported."""
    from mri.runtime import VERBOSE_FLAG, VERBOSE_HELP
    p.add_argument(VERBOSE_FLAG, action="store_true", help=VERBOSE_HELP)


def parse(p, argv=None):
    args = p.parse_args(argv)
    args.attrs = [a for a in args.attrs.split(",") if a]
    return args


def jit_compile(flag):
    """--jit auto|on|off -> bool; auto is on only when TensorFlow sees a GPU."""
    if flag != "auto":
        return flag == "on"
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def set_seed(seed):
    import keras
    keras.utils.set_random_seed(seed)


def make_batches(args, n_samples=4):
    """Train batches (shuffled, jittered) and fixed validation ones for the sample grids (None when the store
    has no validation split: fit then samples the train split). A missing store or an unknown attribute
    exits with a message naming the fix or the available attributes."""
    from mri.data.loader import Batches
    from mri.data.store import StoreError
    with exit_on(StoreError, KeyError, ValueError):
        train = Batches(args.store, "train", args.attrs, args.batch_size, args.seed, jitter=args.jitter)
    try:
        val = Batches(train.store, "val", args.attrs, batch_size=n_samples, shuffle=False)
    except (StoreError, ValueError):
        val = None
    return train, val


# arguments added after runs were made, with the value those runs had: a run's config.json without one is read
# with it (by `Run` when resuming; models read theirs with args.get(name, value))
LEGACY_ARGS = {"channels": 1}


def start_run(args, method, growable=("epochs",), legacy=None):
    """The opening of every train_*.py: seed, batches (setting args.size and args.channels from the store, so
    the run's config.json records them; a config without channels is of a one-channel store), then the run
    directory (`legacy`: the method's own LEGACY_ARGS). Returns (train batches, val batches or None, Run)."""
    set_seed(args.seed)
    batches, val = make_batches(args)
    args.size, args.channels = batches.store.size, batches.store.channels
    return batches, val, Run(args.out, method, args, batches.schema, args.resume, growable, legacy)


def helper_path(arg, value):
    """A helper run's argument (AUXILIARY_ARGS: VA-GAN's --regressor, DFI's --features) as an absolute
    path when it names a directory; any other value as given ("" for none, DFI's "imagenet")."""
    named = arg in AUXILIARY_ARGS and isinstance(value, str) and value and os.path.isdir(value)
    return os.path.abspath(value) if named else value


def record_helpers(args):
    """Makes the helper runs' arguments in `args` absolute and returns {argument: {"path", "weights"}}, the
    content hash of each helper's weights (mri.data.io.weights_hash), which evaluate.py compares with the oracle's."""
    helpers = {}
    for k in AUXILIARY_ARGS:
        path = helper_path(k, getattr(args, k, None))
        if isinstance(path, str) and path and os.path.isdir(path):
            setattr(args, k, path)
            helpers[k] = {"path": path, "weights": weights_hash(path)}
    return helpers


class Run:
    """A run directory: config.json (arguments + schema + method + its helper runs' paths and weight hashes),
    checkpoint, log.csv, tb/, samples/."""

    def __init__(self, out, method, args, schema, resume=False, growable=("epochs",), legacy=None):
        self.out, self.method = out, method
        self.checkpoint = os.path.join(out, CHECKPOINT)
        config_path = os.path.join(out, "config.json")
        helpers = record_helpers(args)
        config = {"method": method, "args": {k: v for k, v in vars(args).items() if k != "resume"},
                  "schema": json.loads(schema.to_json()), "helpers": helpers}
        if resume:
            if not os.path.exists(self.checkpoint):
                raise SystemExit(f"--resume: no checkpoint in {out}; start it without --resume")
            old = read_json(config_path)
            before = {**LEGACY_ARGS, **(legacy or {})}     # what a run made before an argument existed had
            old_args = {**before, **{k: helper_path(k, v) for k, v in old["args"].items()}}
            new_args = {**before, **config["args"]}
            changed = {k for k in set(old_args) | set(new_args)
                       if k not in growable and old_args.get(k) != new_args.get(k)}
            if changed:
                flags = ", ".join("--" + k.replace("_", "-") for k in growable)
                raise SystemExit(f"--resume: arguments {sorted(changed)} differ from {config_path}; "
                                 f"a resumed run must use the same ones (only {flags} may grow)")
        elif os.path.exists(self.checkpoint):
            raise SystemExit(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        write_json(config_path, config)
        self.config = config


def load_config(run_dir):
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} has no config.json: not a run directory")
    return read_json(path)


def load_run(run_dir, from_args):
    """The trained model of a run directory, for inference: `from_args(config args, schema)` rebuilds it from
    config.json, then the checkpoint's weights are loaded."""
    config = load_config(run_dir)
    model = from_args(config["args"], Schema.from_records(config["schema"]))
    load_checkpoint(os.path.join(run_dir, CHECKPOINT), model)
    return model


# --- checkpoints ------------------------------------------------------------------------------------
def _state(model, optimizers):
    """Every variable that defines the training state, in a fixed order, under stable keys."""
    out = [(f"model/{i}", v) for i, v in enumerate(model.variables)]
    for name in sorted(optimizers):
        out += [(f"{name}/{i}", v) for i, v in enumerate(optimizers[name].variables)]
    return out


def save_checkpoint(path, model, optimizers=None):
    """Weights, optimizer states, step counter and RNG states, written atomically."""
    arrays = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in _state(model, optimizers or {})}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_checkpoint(path, model, optimizers=None):
    """Restore what save_checkpoint wrote; optimizers=None restores the model only (inference)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with np.load(path) as z:
        for key, var in _state(model, optimizers or {}):
            if key not in z.files:
                raise ValueError(f"{path} has no {key}: it was written by another architecture or version")
            value = z[key]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{path}: {key} ({var.path}) has shape {value.shape}, model expects {tuple(var.shape)}; "
                                 "rebuild the model with the run's config.json")
            var.assign(value)


# --- callbacks --------------------------------------------------------------------------------------
CHANGE_SCALE = 0.25     # change-map grids saturate at this intensity change ([-1, 1] images)


def sweep_grids(manipulate, images, raw, schema, n_steps=5):
    """Two uint8 grids, one row per image: the attribute sweep (columns = the source, then a sweep of each
    attribute: continuous mean -2..+2 std, binary 0/1, categorical every class, others held) and its change
    maps (manipulated - source, red brighter, blue darker, saturating at +-CHANGE_SCALE: VA-GAN's maps)."""
    return column_grids(images, sweep_columns(manipulate, images, raw, schema, n_steps))


def sweep_columns(manipulate, images, raw, schema, n_steps=5):
    """The attribute sweep's columns, each (N, S, S, C) (sweep_grids), from one call of `manipulate` on every
    column's images and targets stacked (eager calls cost far more than their size)."""
    targets = []
    for a in schema.attributes:
        if a.kind == "continuous":
            values = [a.mean + a.std * z for z in np.linspace(-2, 2, n_steps)]
        else:
            values = list(range(a.width if a.kind == "categorical" else 2))
        targets += [dict(raw, **{a.name: np.full(len(images), v, np.float32)}) for v in values]
    stack = lambda dicts: {k: np.concatenate([np.asarray(d[k]) for d in dicts]) for k in dicts[0]}
    changed = manipulate(np.concatenate([images] * len(targets)), stack([raw] * len(targets)), stack(targets))
    return np.split(np.asarray(changed).reshape((len(targets) * len(images),) + images.shape[1:]), len(targets))


def column_grids(images, columns):
    """Two uint8 grids, one row per image: the image then its image in each column (grey, or RGB for 3
    channels), and the change maps (column - image averaged over the channels, red brighter, blue darker,
    saturating at +-CHANGE_SCALE)."""
    blank = np.full(images.shape[1:3] + (3,), 255, np.uint8)
    sweep = [[grids.to_uint8(grids.picture(images[i]))] + [grids.to_uint8(grids.picture(c[i])) for c in columns]
             for i in range(len(images))]
    change = [[blank] + [grids.diverging((c[i] - images[i]).mean(-1), CHANGE_SCALE) for c in columns]
              for i in range(len(images))]
    return grids.tile(sweep), grids.tile(change)


class Events:
    """TensorBoard event files written with TensorFlow alone: tf.summary.scalar/image and
    keras.callbacks.TensorBoard need the tensorboard package, which TensorFlow no longer installs."""

    def __init__(self, logdir):
        import tensorflow as tf
        self.writer = tf.summary.create_file_writer(logdir)

    def write(self, step, scalars=None, images=None):
        """scalars {tag: number}, images {tag: uint8 (H, W) or (H, W, 3)}, as one Summary at `step`."""
        import tensorflow as tf
        summary = tf.compat.v1.Summary
        values = [summary.Value(tag=k, simple_value=float(v)) for k, v in (scalars or {}).items()]
        values += [summary.Value(tag=k, image=summary.Image(height=im.shape[0], width=im.shape[1],
                                                             colorspace=1 if im.ndim == 2 else 3,
                                                             encoded_image_string=grids.png_bytes(im)))
                   for k, im in (images or {}).items()]
        with self.writer.as_default():
            tf.summary.experimental.write_raw_pb(summary(value=values).SerializeToString(), step=step)
        self.writer.flush()


class SampleGrids:
    """Each epoch: the attribute-sweep grid of fixed validation images and its change maps, as PNGs
    (samples/epoch_NNN.png, samples/epoch_NNN_change.png) and TensorBoard images. A model with a
    `sample_columns(images, raw)` method (a list of (N, S, S, C) images) shows those columns instead."""

    def __init__(self, run, batches, n=4):
        self.run = run
        x, y = batches.batch(0)
        self.images, self.raw = x[:n], batches.schema.decode(y[:n])
        self.schema = batches.schema
        self.events = Events(os.path.join(run.out, "tb", "samples"))
        self.callback = _on_epoch_end(lambda model, epoch, logs: self(model, epoch))

    def __call__(self, model, epoch):
        columns = getattr(model, "sample_columns", None)
        sweep, change = (column_grids(self.images, columns(self.images, self.raw)) if columns else
                         sweep_grids(model.manipulate, self.images, self.raw, self.schema))
        grids.write_png(os.path.join(self.run.out, "samples", f"epoch_{epoch + 1:03d}.png"), sweep)
        grids.write_png(os.path.join(self.run.out, "samples", f"epoch_{epoch + 1:03d}_change.png"), change)
        self.events.write(epoch + 1, images={"attribute_sweep": sweep, "change_maps": change})


def _on_epoch_end(fn):
    """A Keras callback calling fn(model, epoch, logs) at each epoch end."""
    import keras

    class _Cb(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            fn(self.model, epoch, logs)
    return _Cb()


def fit(model, batches, run, args, val_batches=None, epochs=None, callbacks=()):
    """Train `model` (compiled) with Model.fit from where its checkpoint stopped, up to `epochs` (default
    args.epochs; a method with phases passes their total and a callback switching them, run before the others).
    Saves the checkpoint at each epoch end, appends log.csv, writes TensorBoard scalars and sample grids."""
    import keras
    from mri.data.loader import dataset
    steps = args.steps_per_epoch or batches.steps_per_epoch
    epochs = args.epochs if epochs is None else epochs
    start_epoch = 0
    if args.resume:
        load_checkpoint(run.checkpoint, model, model.optimizers)
        start_epoch = int(model.step.numpy()) // steps
        if start_epoch >= epochs:
            print(f"{run.out}: already trained for {start_epoch} of {epochs} epochs; nothing to do")
            return None
    scalars = Events(os.path.join(run.out, "tb", "train"))
    callbacks = [
        *callbacks,
        _on_epoch_end(lambda model, epoch, logs: save_checkpoint(run.checkpoint, model, model.optimizers)),
        keras.callbacks.CSVLogger(os.path.join(run.out, "log.csv"), append=bool(args.resume)),
        _on_epoch_end(lambda model, epoch, logs: scalars.write(epoch + 1, scalars=logs)),
        SampleGrids(run, val_batches or batches).callback,
    ]
    return model.fit(dataset(batches, start_step=start_epoch * steps), epochs=epochs,
                     initial_epoch=start_epoch, steps_per_epoch=steps, callbacks=callbacks, shuffle=False,
                     verbose=1 if sys.stdout.isatty() else 2)
