"""Train the longitudinal change model (models/longitudinal.py) on the visit pairs of a slice store.

    python train_longitudinal.py --store data/synthetic.h5 --attrs age,dx --out runs/longitudinal/default
    python train_longitudinal.py --store data/synthetic.h5 --out runs/longitudinal/default --resume --epochs 20

Every ordered pair of two visits of one train subject at the same axial index is a training example (the
store's visits are registered and cut with the first visit's plan by data_prep.py).
"""
import argparse

from mri import runtime

runtime.start()   # imports TensorFlow quietly before anything else does; prints the device

from mri import training  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_args(p, "longitudinal", batch_size=16)
    g = p.add_argument_group("longitudinal change model")
    g.add_argument("--parameterisation", default="displacement", choices=("displacement", "intensity"),
                   help="the change per year: a displacement field plus an intensity rate, or an intensity rate alone")
    g.add_argument("--integration", default="squaring", choices=("squaring", "linear"),
                   help="displacement: squaring warps by exp(dt v), the flow of v for dt years (scaling and "
                        "squaring, invertible: -dt undoes +dt); linear warps by dt v")
    g.add_argument("--filters", type=int, default=16, help="U-Net feature maps at full resolution")
    g.add_argument("--lambda-smooth", type=float, default=1.0, help="weight of the displacement's squared gradient")
    g.add_argument("--lambda-rate-smooth", type=float, default=0.0,
                   help="weight of the intensity rate's squared gradient (0: off)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    return training.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    from models import longitudinal
    from mri.data.io import exit_on
    from mri.data.loader import VisitPairs
    batches, val, run = training.start_run(args, "longitudinal", legacy=longitudinal.LEGACY_ARGS)
    with exit_on(ValueError):
        pairs = VisitPairs(batches.store, "train", args.attrs, args.batch_size, args.seed)
        model = longitudinal.compile_from_args(longitudinal.from_args(vars(args), pairs.schema), vars(args))
    return training.fit(model, pairs, run, args, val or batches)


if __name__ == "__main__":
    main()
