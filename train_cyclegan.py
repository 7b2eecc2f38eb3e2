"""Train a CycleGAN (models/cyclegan.py) between two domains of one attribute: two generators translating each
way, 70x70 PatchGAN discriminators, LSGAN, cycle and identity losses, image pools.

    python train_cyclegan.py --store data/synthetic.h5 --domains dx=CN:Dementia --out runs/cyclegan/dx
    python train_cyclegan.py --store data/synthetic.h5 --domains "age<65:age>=75" --out runs/cyclegan/age
    python train_cyclegan.py ...same arguments... --resume
"""
import argparse

from mri import runtime

runtime.start()   # imports TensorFlow quietly before anything else does; prints the device

from models import cyclegan  # noqa: E402
from mri import training  # noqa: E402
from mri.data.io import exit_on  # noqa: E402
from mri.data.loader import DOMAINS_USAGE, domain_attribute, domain_batches, parse_domains  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_common_args(p, "cyclegan", batch_size=2, attrs="")
    g = p.add_argument_group("CycleGAN")
    g.add_argument("--domains", default="dx=CN:Dementia", help=DOMAINS_USAGE + "; --attrs defaults to ATTR. "
                   "--batch-size is split equally between the domains (2: the reference's one slice of each)")
    g.add_argument("--filters", type=int, default=64, help="maps of the first layer of G (64..256) and D (64..512)")
    g.add_argument("--blocks", type=int, default=6, help="residual blocks of the generators (6: reference at 128 px)")
    g.add_argument("--pool-size", type=int, default=50, help="generated slices kept per discriminator (0: none)")
    g.add_argument("--lambda-cycle", type=float, default=10.0)
    g.add_argument("--lambda-identity", type=float, default=0.5, help="identity loss weight, times --lambda-cycle")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate, betas (0.5, 0.999)")
    g.add_argument("--constant-epochs", type=int, default=-1, help="epochs at --lr (default: half of --epochs)")
    g.add_argument("--decay-epochs", type=int, default=-1,
                   help="epochs of linear decay after them, by lr/(decay+1) an epoch (default: the rest of --epochs)")
    args = training.parse(p, argv)
    if args.batch_size < 2 or args.batch_size % 2:
        p.error("--batch-size must be even: half of it from each domain")
    with exit_on(ValueError):
        args.attrs = args.attrs or [domain_attribute(args.domains)]
    if args.constant_epochs < 0:
        args.constant_epochs = args.epochs // 2
    if args.decay_epochs < 0:
        args.decay_epochs = args.epochs - args.constant_epochs
    return args


def main(argv=None):
    args = parse_args(argv)
    batches, _, run = training.start_run(args, "cyclegan")
    with exit_on(ValueError, KeyError):
        domains = parse_domains(args.domains, batches.schema)
        train, samples = domain_batches(batches.store, domains, args.attrs, args.batch_size, args.seed, args.jitter)
        model = cyclegan.from_args(vars(args), batches.schema)
    cyclegan.compile_from_args(model, vars(args), args.steps_per_epoch or train.steps_per_epoch)
    return training.fit(model, train, run, args, samples)


if __name__ == "__main__":
    main()
