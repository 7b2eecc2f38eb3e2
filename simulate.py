"""Simulate aging or disease on one scan: a NIfTI/Analyze volume (or a stored subject) in, its manipulated
versions out as NIfTI volumes that overlay the input in any viewer, a picture and atrophy numbers.

    python simulate.py --method runs/fader/synthetic@residual --input scan.nii.gz --source age=72,dx=CN \\
        --age 60,80,90 --dx MCI,Dementia --out sim/
    python simulate.py --method meandiff --store data/synthetic.h5 --subject 002_S_0775 --age 85 --out sim/

The scan is preprocessed by data_prep.py's own code (mri/data/volumes.py: canonical RAS, intensity scale,
foreground crop, axial slices at the store's --slices and --spacing, recorded in the training store's
provenance). Each --age / --dx value changes that attribute alone (the others keep the source's values); each
--target NAME=VALUE[,NAME=VALUE] changes several at once. Writes into --out:

    source.nii.gz                        the preprocessed slab (intensities in [-1, 1], or --native-intensity)
    <attr>_<value>.nii.gz                one manipulated slab per target, on the same grid
    difference_<attr>_<value>.nii.gz     target - source
    trajectory.png                       3 axial slices: the source and every target, each with its difference
    changes.csv                          brain tissue, CSF and brain parenchymal fraction per slab
    simulation.json                      arguments, attributes, geometry, plan, files, the picture's caption

The slabs are (size, size, slices) RAS arrays whose affine (mri.data.volumes.slab_affine) puts each voxel at the
world position preprocessing sampled, so they overlay the input scan. changes.csv: inside the source's brain
mask (its foreground at preprocessing's 5 % threshold, holes filled), each voxel's tissue fraction runs
linearly from 0 at the CSF level to 1 at the grey-matter level of a 3-class intensity clustering of the source;
brain_ml and csf_ml sum it and its complement over the slab, bpf = brain / (brain + csf) (brain parenchymal
fraction), and bpf_change and brain_change_pct compare each target with the source. One mask and one set of
levels measure every slab. This is meant for skull-stripped T1 scans like the store's: with skull and scalp in
the foreground the mask is no longer the intracranial space.
"""
import argparse
import os
import time

import simulation
from models import BASELINES
from mri import runtime
from mri.data.io import exit_on
from mri.training import add_verbose_arg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True,
                   help="a method spec as evaluate.py takes it: a run directory (RUN or RUN@MODE, e.g. "
                        "runs/fader/synthetic@residual) or a baseline (identity, meandiff, truth; these need --store)")
    src = p.add_argument_group("the scan (--input, or --store with --subject)")
    src.add_argument("--input", help="a 3D NIfTI (.nii, .nii.gz) or Analyze (.img/.hdr) volume, any orientation")
    src.add_argument("--store", help="a slice store: the stored subject's source, meandiff's training data, and "
                                     "the slice geometry (default: the run's training store)")
    src.add_argument("--subject", help="take this stored subject's volume from --store instead of --input")
    src.add_argument("--visit", help="the stored visit of --subject (default: its first stored visit)")
    p.add_argument("--source", default="",
                   help="the scan's own attributes, NAME=VALUE,... (e.g. age=72,dx=CN); every attribute the method "
                        "conditions on is needed (a stored subject's come from the store)")
    tg = p.add_argument_group("targets (at least one)")
    tg.add_argument("--age", default="", help="comma-separated ages: one volume per age, other attributes kept")
    tg.add_argument("--dx", default="", help="comma-separated diagnoses (class names, e.g. MCI,Dementia)")
    tg.add_argument("--target", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="one volume with these attributes changed together (repeatable), e.g. age=80,dx=MCI")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slices", type=int, help="axial slices (default: as the store was built)")
    p.add_argument("--spacing", type=float, help="mm between slices (default: as the store was built)")
    p.add_argument("--native-intensity", action="store_true",
                   help="write intensities in the input's units (the plan's scale) instead of the store's [-1, 1]")
    p.add_argument("--batch-size", type=int, default=32, help="slices per call of the method")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds Keras for methods that draw random numbers at inference (none of the current ones)")
    add_verbose_arg(p)
    args = p.parse_args(argv)
    if bool(args.input) == bool(args.subject):
        p.error("give the scan with --input FILE, or a stored one with --store STORE --subject ID (not both)")
    if args.subject and not args.store:
        p.error("--subject needs --store")
    if args.subject and (args.slices or args.spacing):
        p.error("a stored subject keeps the store's geometry: drop --slices/--spacing")
    if not (args.age or args.dx or args.target):
        p.error("give at least one target: --age, --dx or --target")
    if args.batch_size < 1 or (args.slices is not None and args.slices < 1) or (args.spacing is not None and args.spacing <= 0):
        p.error("--batch-size and --slices must be >= 1 and --spacing > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    runtime.start(argv)
    from mri.data.store import SliceStore, StoreError
    started = time.time()
    with exit_on(StoreError, FileNotFoundError, KeyError, ValueError):
        store = SliceStore(args.store) if args.store else None
        sim = simulation.prepare(args.method, store, source=args.source, age=args.age, dx=args.dx,
                                 target=args.target, input_path=args.input, subject=args.subject,
                                 visit=args.visit, slices=args.slices, spacing=args.spacing)
        if args.method not in BASELINES:
            import keras
            keras.utils.set_random_seed(args.seed)
        method = simulation.load_method(args.method, store, sim.changed)
        outputs = simulation.run(sim, method, store, args.batch_size)
    caption = simulation.write_outputs(sim, outputs, args.out, vars(args), started, args.native_intensity)
    print(caption)
    print(f"wrote {os.path.abspath(args.out)}: source.nii.gz, {len(outputs)} targets with differences, "
          "trajectory.png, changes.csv, simulation.json")


if __name__ == "__main__":
    main()
