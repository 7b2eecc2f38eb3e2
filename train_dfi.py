"""Prepare a Deep Feature Interpolation run (models/dfi.py): nothing is trained; the feature network's vectors of
every train slice and the attribute-space neighbour index are cached once in <out>/features.h5.

    python train_oracle.py --store data/synthetic.h5 --attrs age,dx --out runs/regressor --seed 1
    python train_dfi.py --store data/synthetic.h5 --attrs age,dx --features runs/regressor --out runs/dfi/synthetic
    python evaluate.py ... --methods meandiff,runs/dfi/synthetic,runs/dfi/synthetic@residual --n 64

--features is a train_oracle.py run (never the evaluation oracle's) or `imagenet` with a local VGG19 weights file.
"""
import argparse
import os

from mri import runtime

runtime.start()   # imports TensorFlow quietly before anything else does; prints the device

from models import dfi, feature_networks  # noqa: E402
from mri import training  # noqa: E402
from mri.data.io import exit_on, remove_stale_temporaries  # noqa: E402
from mri.data.store import SliceStore, StoreError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="data/synthetic.h5", help="HDF5 slice store from data_prep.py")
    p.add_argument("--attrs", default="age,dx", help="comma-separated attributes of the neighbour space")
    p.add_argument("--out", default="runs/dfi/default", help="run directory (config.json, features.h5)")
    p.add_argument("--features", required=True, help="a train_oracle.py run directory, or `imagenet` (VGG19)")
    p.add_argument("--vgg-weights", default="", help="--features imagenet: VGG19 no-top .h5 file "
                                                     "(default: the Keras cache, ~/.keras/models/)")
    p.add_argument("--k", type=int, default=100, help="neighbours in each of the source and target sets (checked "
                   "against the train split here, recorded in config.json, used whenever the run manipulates)")
    p.add_argument("--window", type=int, default=1, help="neighbours within this many slice positions")
    p.add_argument("--alpha", type=float, default=1.0, help="step along w (1: the neighbour sets' mean difference)")
    p.add_argument("--tv-weight", type=float, default=0.0, help="weight of the total-variation prior")
    p.add_argument("--tv-beta", type=float, default=2.0, help="exponent of the total variation")
    p.add_argument("--iterations", type=int, default=150, help="L-BFGS iterations per reconstruction")
    p.add_argument("--mode", choices=dfi.MODES, default="decode", help="default manipulation (RUN@MODE overrides)")
    p.add_argument("--batch-size", type=int, default=64, help="slices per feature batch")
    p.add_argument("--seed", type=int, default=0, help="recorded for uniformity: DFI draws no random numbers")
    training.add_verbose_arg(p)
    return training.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    with exit_on(StoreError, KeyError, ValueError, FileNotFoundError):
        store = SliceStore(args.store)
        schema = store.schema.select(args.attrs)
        args.size, args.channels = store.size, store.channels
        dfi.check_k(store, schema, args.k, args.window)
        net = feature_networks.features_from_args(vars(args), store.size)
    run = training.Run(args.out, "dfi", args, schema)
    path = os.path.join(run.out, dfi.FEATURES_FILE)
    for tmp in remove_stale_temporaries(path):
        print(f"removed {tmp}, left by an interrupted run")
    dfi.DFI.fit(store, net, args.attrs, path, args.batch_size)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
