"""Train a VA-GAN (models/vagan.py): an additive change map conditioned on attributes, a WGAN-GP critic shown real
slices with the target attributes (mri/data/loader.CriticDraws) and a frozen auxiliary regressor (a
train_oracle.py run: never the evaluation oracle's).

    python train_oracle.py --store data/synthetic.h5 --attrs age,dx --out runs/regressor --seed 1
    python train_vagan.py --store data/synthetic.h5 --attrs age,dx --regressor runs/regressor --out runs/vagan/default
    python train_vagan.py ...same arguments... --resume --epochs 20
"""
import argparse

from mri import runtime

runtime.start()   # imports TensorFlow quietly before anything else does; prints the device

from models import vagan  # noqa: E402
from mri import training  # noqa: E402
from mri.data.io import exit_on  # noqa: E402
from mri.data.loader import CriticDraws, VisitPairs, WithPairs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_args(p, "vagan")
    g = p.add_argument_group("VA-GAN")
    g.add_argument("--regressor", default="", help="train_oracle.py run predicting --attrs (frozen); empty: no aux term")
    g.add_argument("--critic", choices=vagan.CRITICS, default="conditional",
                   help="conditional: real partner slices and changed ones, both under the target attributes "
                        "(Xia et al. 2021); unconditional: the same slices, no attributes")
    g.add_argument("--gp-at", choices=vagan.GP_AT, default="interpolates",
                   help="gradient penalty at real/changed interpolates (WGAN-GP) or at the changed slices (report)")
    g.add_argument("--lambda-gp", type=float, default=10.0)
    g.add_argument("--lambda-map", type=float, default=10.0,
                   help="weight of mean |x' - x| (the reference's 100 was for its one-axis gradient norm)")
    g.add_argument("--gap-scale", type=float, default=9.0,
                   help="the map weight is lambda_map exp(-||y_t - y_s||_1 / this) (encoded units; Xia et al.: 60 "
                        "years, about 9 age SDs of the synthetic cohort)")
    g.add_argument("--lambda-tv", type=float, default=0.0, help="weight of the map's total variation")
    g.add_argument("--lambda-aux", type=float, default=1.0, help="weight of the regressor's loss on x'")
    g.add_argument("--n-critic", type=int, default=5, help="critic steps per generator step")
    g.add_argument("--n-critic-long", type=int, default=100, help="critic steps in warm-up and re-tune steps")
    g.add_argument("--critic-warmup", type=int, default=25, help="first generator steps with --n-critic-long")
    g.add_argument("--critic-retune", type=int, default=100, help="every this many steps: --n-critic-long")
    g.add_argument("--filters", type=int, default=16, help="maps of the first level (U-Net 16..128, critic 16..256)")
    g.add_argument("--pair-weight", type=float, default=0.0,
                   help="weight of the visit-pair loss: each step also changes a batch of earlier visits to their "
                        "later visit's attributes and scores the MSE to the later slice (0: no pairs)")
    g.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate, betas (0, 0.9): the report's 1e-3 scored better than the reference's 1e-4")
    return training.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    batches, val, run = training.start_run(args, "vagan", legacy=vagan.LEGACY_ARGS)
    with exit_on(ValueError, FileNotFoundError):
        model = vagan.from_args(vars(args), batches.schema)
        draws = CriticDraws(batches, model.draws)
        if args.pair_weight:
            draws = WithPairs(draws, VisitPairs(batches.store, "train", args.attrs, args.batch_size, args.seed))
    vagan.compile_from_args(model, vars(args))
    return training.fit(model, draws, run, args, val or batches)


if __name__ == "__main__":
    main()
