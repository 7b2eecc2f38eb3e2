"""Train Fader Networks (models/fader.py) on a slice store.

    python train_fader.py --store data/synthetic.h5 --attrs age,dx,sex --out runs/fader/default
    python train_fader.py --store data/synthetic.h5 --out runs/fader/default --resume --epochs 20
    python train_fader.py --store data/synthetic.h5 --tiny --epochs 1 --steps-per-epoch 20 --out runs/fader/smoke
"""
import argparse

from mri import runtime

runtime.start()   # imports TensorFlow quietly before anything else does; prints the device

from models import fader  # noqa: E402
from mri import training  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_args(p, "fader", attrs="age,dx,sex")
    g = p.add_argument_group("Fader Networks")
    g.add_argument("--lambda-lat", type=float, default=1e-4, help="final weight of the latent-adversarial term")
    g.add_argument("--lambda-clf", type=float, default=1e-4,
                   help="final weight of the classifier-discriminator term (0: no classifier is built or trained)")
    g.add_argument("--lambda-ramp-steps", type=int, default=5000,
                   help="iterations over which both weights grow linearly from 0 (paper: 500000; 0: no ramp)")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of every network (beta1 0.5)")
    g.add_argument("--clip-grad-norm", type=float, default=5.0, help="clip each network's gradient norm (0: off)")
    g.add_argument("--dropout", type=float, default=0.3,
                   help="dropout of the decoder's 3 lowest-resolution layers (the seed used 0.5)")
    g.add_argument("--lat-dropout", type=float, default=0.3, help="dropout of the latent discriminator")
    g.add_argument("--n-layers", type=int, default=0, help="encoder/decoder layers (0: down to a 2x2 latent)")
    g.add_argument("--n-filters", type=int, default=16, help="feature maps of the first layer, doubling per layer")
    g.add_argument("--max-filters", type=int, default=512, help="cap on the feature maps")
    g.add_argument("--hidden", type=int, default=512, help="hidden units of the discriminators' dense head")
    return training.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    batches, val, run = training.start_run(args, "fader")
    model = fader.compile_from_args(fader.from_args(vars(args), batches.schema), vars(args))
    return training.fit(model, batches, run, args, val)


if __name__ == "__main__":
    main()
