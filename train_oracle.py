"""Train the evaluation oracle: a CNN predicting the attributes from a slice, each read at its best epoch.

    python train_oracle.py --store data/synthetic.h5 --attrs age,dx --out runs/oracle

After every epoch the BatchNorm statistics are re-estimated for the current weights and every attribute is
read on the val split in inference mode; each attribute keeps the weights of its best epoch (models/oracle.py).
Writes <out>/config.json, <out>/oracle.keras and <out>/val_metrics.json: per attribute and split (train on at
most 100 subjects, val),
MAE and bias (continuous) or accuracy and balanced accuracy, with subject-level 95 % intervals, the epoch each
attribute is read at and the per-epoch validation history; with --ceiling (synthetic stores) the diagnosis
ceiling on the same val split.
"""
import argparse
import json
import os
import sys

from mri import runtime
from mri.data.io import exit_on, write_json
from mri.data.store import SliceStore, StoreError
from mri.training import add_verbose_arg

TRAIN_SUBJECTS = 100   # the train split is read on this many seeded subjects at most (the val split whole)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="HDF5 slice store from data_prep.py")
    p.add_argument("--attrs", default="age,dx", help="comma-separated attributes to predict")
    p.add_argument("--out", default="runs/oracle", help="output directory")
    p.add_argument("--epochs", type=int, default=30, help="maximum epochs")
    p.add_argument("--patience", type=int, default=5, help="stop after this many epochs in which no attribute improved on val")
    p.add_argument("--calibration-batches", type=int, default=100,
                   help="train batches over which the BatchNorm statistics are re-estimated after each epoch (0: off)")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="iterations per epoch (0: one pass over train)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant: --lr throughout; cosine: the learning rate falls from --lr to 0 over --epochs")
    p.add_argument("--jitter", type=float, default=0.05, help="brightness/contrast jitter amplitude (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and dropout")
    p.add_argument("--ceiling", action="store_true",
                   help="synthetic stores: also score the diagnosis ceiling (a classifier on each val slice's true "
                        "structure areas, age and position; mri/ceiling.py) beside the oracle")
    p.add_argument("--tiny", action="store_true", help="smallest architecture, for smoke runs and tests")
    add_verbose_arg(p)
    args = p.parse_args(argv)
    args.attrs = [a for a in args.attrs.split(",") if a]
    return args


def main(argv=None):
    args = parse_args(argv)
    runtime.start(argv)
    import keras
    from models import oracle
    from mri.data.loader import Batches
    keras.utils.set_random_seed(args.seed)
    with exit_on(StoreError, KeyError, ValueError):
        store = SliceStore(args.store)
        train = Batches(store, "train", args.attrs, args.batch_size, args.seed, shuffle=True, jitter=args.jitter)
        if not len(store.indices("val")):
            raise ValueError(f"{args.store}: the val split is empty, and every attribute is read at its best "
                             "val epoch; rebuild the store with a val share (data_prep.py --split 0.8,0.1,0.1)")
        calibration = Batches(store, "train", args.attrs, args.batch_size, args.seed + 1, shuffle=True)
    schema = train.schema
    write_json(os.path.join(args.out, "config.json"),
               {"method": "oracle", "args": vars(args), "schema": json.loads(schema.to_json())})
    model = oracle.build(schema, store.size, **(oracle.TINY if args.tiny else {}), channels=store.channels)
    steps = args.steps_per_epoch or train.steps_per_epoch
    oracle.compile_for(model, schema, args.lr, steps * args.epochs if args.lr_schedule == "cosine" else 0)
    model, epochs, history = oracle.fit(model, train, args.epochs, args.steps_per_epoch, args.patience,
                                        calibration, args.calibration_batches,
                                        verbose=1 if sys.stdout.isatty() else 2)
    oracle.save(model, args.out)
    reader = oracle.Oracle(model, schema)
    metrics = {"epoch": epochs, "history": history, **{
        split: oracle.split_metrics(reader, store, split, batch_size=64, seed=args.seed, max_subjects=TRAIN_SUBJECTS
                                    if split == "train" else 0) for split in ("train", "val")}}
    if args.ceiling:
        from mri.synthetic.ceiling import describe, dx_ceiling
        with exit_on(ValueError):
            metrics["ceiling"] = dx_ceiling(store, "train", "val", seed=args.seed)
    write_json(os.path.join(args.out, "val_metrics.json"), metrics)
    print("each attribute read at epoch " + ", ".join(f"{n} {e}" for n, e in epochs.items()))
    for split in ("train", "val"):
        print("\n".join(f"{split} {line}" for line in oracle.describe_metrics(metrics[split])))
    if args.ceiling:
        print(describe(metrics["ceiling"]))
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
