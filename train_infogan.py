"""Train an InfoGAN (models/infogan.py): the GAN with its categorical and continuous codes for --epochs, then the
encoder E_z for --encoder-epochs, as two phases of one resumable run; then the codes are tied to attributes on
the train split (codes.json in the run, printed).

    python train_infogan.py --store data/synthetic.h5 --attrs age,dx --out runs/infogan/default \\
        --epochs 25 --encoder-epochs 10
    python train_infogan.py ...same arguments... --resume     # continues whichever phase was running
"""
import argparse

from mri import runtime

runtime.start()   # imports TensorFlow quietly before anything else does; prints the device

from models import cgan, infogan  # noqa: E402
from mri import training  # noqa: E402
from mri.data.io import exit_on  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_args(p, "infogan", epochs=25, batch_size=64)
    g = p.add_argument_group("InfoGAN")
    g.add_argument("--encoder-epochs", type=int, default=10, help="encoder-phase epochs, after the --epochs of the GAN")
    g.add_argument("--z-dim", type=int, default=62, help="noise dimension")
    g.add_argument("--cat-dim", type=int, default=0,
                   help="values of the categorical code (0: the classes of the first categorical attribute, or 3)")
    g.add_argument("--cont-dim", type=int, default=2, help="continuous codes, uniform in [-1, 1]")
    g.add_argument("--filters", type=int, default=32, help="maps of the trunk's first layer (32..256; G 256..32)")
    g.add_argument("--hidden", type=int, default=1024, help="units of the trunk's dense layer")
    g.add_argument("--lambda-cat", type=float, default=1.0, help="weight of the categorical code's cross-entropy")
    g.add_argument("--lambda-cont", type=float, default=0.1, help="weight of the continuous codes' Gaussian NLL")
    g.add_argument("--lr-g", type=float, default=1e-3, help="Adam learning rate of G, Q and E_z, betas (0.5, 0.99)")
    g.add_argument("--lr-d", type=float, default=2e-4, help="Adam learning rate of D and the trunk (report: 5e-4)")
    return training.parse(p, argv)


def main(argv=None):
    args = parse_args(argv)
    batches, val, run = training.start_run(args, "infogan", growable=("epochs", "encoder_epochs"))
    with exit_on(ValueError):   # a slice size that is not a multiple of 16
        model = infogan.from_args(vars(args), batches.schema)
    infogan.compile_from_args(model, vars(args))
    training.fit(model, batches, run, args, val, epochs=args.epochs + args.encoder_epochs,
                 callbacks=[cgan.PhaseSwitch(args.epochs)])
    infogan.write_codes(model, args.out, batches.store, batches.index)
    return model


if __name__ == "__main__":
    main()
