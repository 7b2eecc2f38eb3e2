"""Train a cGAN / IcGAN (models/cgan.py): the conditional GAN for --epochs, then its encoders E_z, E_y for
--encoder-epochs, as two phases of one resumable run.

    python train_cgan.py --store data/synthetic.h5 --attrs age,dx,sex --out runs/cgan/default \\
        --epochs 25 --encoder-epochs 10 [--laplacian]
    python train_cgan.py ...same arguments... --resume     # continues whichever phase was running
"""
import argparse

from mri import runtime

runtime.start()   # imports TensorFlow quietly before anything else does; prints the device

from models import cgan  # noqa: E402
from mri import training  # noqa: E402
from mri.data.io import exit_on  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_args(p, "cgan", epochs=25, batch_size=64, attrs="age,dx,sex")
    p.add_argument("--encoder-epochs", type=int, default=10, help="encoder-phase epochs, after the --epochs of the GAN")
    p.add_argument("--z-dim", type=int, default=100, help="noise dimension")
    p.add_argument("--filters", type=int, default=64, help="feature maps at half size (64: up to 1024)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (D, G, encoders)")
    p.add_argument("--laplacian", action="store_true", help="give G a real slice's Laplacian (its shape)")
    p.add_argument("--wrong", choices=cgan.WRONG, default="real",
                   help="D's mismatched conditions: real, another train slice's attributes with another diagnosis; "
                        "group-means, another diagnosis with that group's mean attributes (models/cgan.py)")
    return training.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    batches, val, run = training.start_run(args, "cgan", growable=("epochs", "encoder_epochs"))
    with exit_on(ValueError):   # --wrong real on a train split with one diagnosis
        model = cgan.from_args(vars(args), batches.schema, train_y=batches.y)
    cgan.compile_from_args(model, vars(args))
    training.fit(model, batches, run, args, val, epochs=args.epochs + args.encoder_epochs,
                 callbacks=[cgan.PhaseSwitch(args.epochs)])
    return model


if __name__ == "__main__":
    main()
