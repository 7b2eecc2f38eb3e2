"""Train the evaluation oracle: a CNN predicting the attributes from a slice, early-stopped on the val split.

    python train_oracle.py --store data/synthetic.h5 --attrs age,dx --out runs/oracle

Writes <out>/config.json, <out>/oracle.keras and <out>/val_metrics.json (accuracy / MAE in raw units).
"""
import argparse
import json
import os
import sys

from mri.io import exit_on, write_json
from mri.store import SliceStore, StoreError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="HDF5 slice store from data_prep.py")
    p.add_argument("--attrs", default="age,dx", help="comma-separated attributes to predict")
    p.add_argument("--out", default="runs/oracle", help="output directory")
    p.add_argument("--epochs", type=int, default=30, help="maximum epochs (early stopping on the val loss)")
    p.add_argument("--patience", type=int, default=5, help="epochs without val improvement before stopping")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="iterations per epoch (0: one pass over train)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--jitter", type=float, default=0.05, help="brightness/contrast jitter amplitude (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and dropout")
    p.add_argument("--tiny", action="store_true", help="smallest architecture, for smoke runs and tests")
    args = p.parse_args(argv)
    args.attrs = [a for a in args.attrs.split(",") if a]
    return args


def main(argv=None):
    args = parse_args(argv)
    import keras
    from models import oracle
    from mri.loader import Batches
    keras.utils.set_random_seed(args.seed)
    with exit_on(StoreError, KeyError, ValueError):
        store = SliceStore(args.store)
        train = Batches(store, "train", args.attrs, args.batch_size, args.seed, shuffle=True, jitter=args.jitter)
        n_val = len(store.indices("val"))
        val = Batches(store, "val", args.attrs, min(args.batch_size, n_val), args.seed, shuffle=False)
    schema = train.schema
    write_json(os.path.join(args.out, "config.json"),
               {"method": "oracle", "args": vars(args), "schema": json.loads(schema.to_json())})
    model = oracle.build(schema, store.size, **(oracle.TINY if args.tiny else {}))
    oracle.compile_for(model, schema, args.lr)
    oracle.fit(model, train, val, args.epochs, args.steps_per_epoch, args.patience,
               verbose=1 if sys.stdout.isatty() else 2)
    oracle.save(model, args.out)
    metrics = oracle.split_metrics(oracle.Oracle(model, schema), store, "val", args.batch_size)
    write_json(os.path.join(args.out, "val_metrics.json"), metrics)
    for name, m in metrics.items():
        print(f"val {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
