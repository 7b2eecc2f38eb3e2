"""Build the HDF5 slice store from NIfTI/Analyze volumes and the cohort's CSV (or from the synthetic cohort),
or from 2D images: CelebA, or any folder of PNG/JPEG images with a CSV of attributes (docs/celeba.md).

    python data_prep.py --synthetic 200 --out data/synthetic.h5
    python data_prep.py --synthetic 200 --synthetic-version 1 --out data/synthetic_v1.h5
    python data_prep.py --images ADNI/ --csv ADNIMERGE.csv --preset adni --out data/adni.h5 --attrs age,dx
    python data_prep.py --preset celeba --images celeba/img_align_celeba --csv celeba/list_attr_celeba.txt \\
        --out data/celeba64.h5 --size 64
    python data_prep.py --preset image-folder --images photos/ --csv photos.csv --id-column file \\
        --attr-columns smile:smiling:binary,age:age:continuous --out data/photos.h5
"""
import argparse
import os
import re
import sys

from mri.data.cohorts import CohortError
from mri.data.pipeline import IMAGE_PRESETS, PrepConfig, build, synthetic_config
from mri.synthetic import DEFAULT_VERSION, VERSIONS, VISITS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source (real cohort or --synthetic)")
    src.add_argument("--images", help="folder searched recursively for .nii, .nii.gz and Analyze .img/.hdr "
                                      "(celeba, image-folder: .jpg, .jpeg, .png, .bmp, .gif)")
    src.add_argument("--csv", help="the cohort's attributes CSV (ADNIMERGE, OASIS-1 demographics, IXI.csv, ...; "
                                   "celeba: list_attr_celeba.txt)")
    src.add_argument("--preset", default="adni", choices=["adni", "oasis1", "ixi", "custom", *IMAGE_PRESETS],
                     help="how volumes are joined to CSV rows and which columns are attributes; celeba and "
                          "image-folder read 2D images (one store record per image)")
    src.add_argument("--synthetic", type=int, metavar="N", default=0,
                     help="generate N phantom subjects (NIfTI + cohort.csv) and build the store from them")
    src.add_argument("--synthetic-version", type=int, default=DEFAULT_VERSION, choices=VERSIONS,
                     help="anatomy of the synthetic cohort: 2 (default: folded cortex, T1 contrast and pose "
                          "measured against real scans), 3 (sulci from the surface over a white-matter core, "
                          "separate deep nuclei, temporal lobes at the base; not yet closer to real scans than 2) "
                          "or 1 (the first phantom); mri/synthetic/__init__.py")
    src.add_argument("--synthetic-visits", default=",".join(VISITS), metavar="bl,m12,...",
                     help="visit codes of every synthetic subject (ADNI-style: bl, mNN months after baseline), e.g. "
                          "bl,m12,m24,m48,m72 for longer spans; another list draws another cohort")
    src.add_argument("--volumes-dir", help="where --synthetic writes its NIfTI files (default: <out>.volumes/)")
    p.add_argument("--out", required=True, help="the store to write (.h5)")
    p.add_argument("--attrs", default="", help="comma-separated attributes to store (default: the preset's list)")
    p.add_argument("--size", type=int, default=128, help="slice size in pixels (square)")
    p.add_argument("--slices", type=int, default=32, help="axial slices per volume, centred on the brain")
    p.add_argument("--spacing", type=float, default=2.0, help="distance between stored slices in mm")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (by subject)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and of the synthetic cohort)")
    p.add_argument("--workers", type=int, default=2, help="processes used for the volumes")
    p.add_argument("--register", choices=("auto", "on", "off"), default="auto",
                   help="on: register each follow-up rigidly to its subject's first visit and cut it with that "
                        "visit's plan; off: cut every volume with its own plan (data already registered); auto "
                        "(default): on for scans, off for --synthetic, whose visits are rendered in one pose")
    p.add_argument("--no-register", dest="register", action="store_const", const="off", help="the same as --register off")
    p.add_argument("--label-map", action="append", default=[], metavar="ATTR:VALUE=CLASS",
                   help="map an unknown label, e.g. dx:SMC=CN (repeatable)")
    flat = p.add_argument_group("--preset celeba and image-folder (2D images)")
    flat.add_argument("--partition", default="",
                      help="celeba: list_eval_partition.txt, the train/val/test split (default: beside --csv); "
                           "image-folder splits images by --split")
    flat.add_argument("--channels", type=int, default=0, choices=[0, 1, 3],
                      help="channels stored: 1 grey, 3 RGB, 0 those of the first image (others are converted)")
    custom = p.add_argument_group("--preset custom (and image-folder: --id-column, --attr-columns)")
    custom.add_argument("--id-regex", default="", help="regex with one group capturing the id from the path")
    custom.add_argument("--id-column", default="", help="CSV column holding that id")
    custom.add_argument("--attr-columns", default="", help="name:column:kind,... (kind: continuous|binary|categorical)")
    from mri.runtime import VERBOSE_FLAG, VERBOSE_HELP
    p.add_argument(VERBOSE_FLAG, action="store_true", help=VERBOSE_HELP)
    args = p.parse_args(argv)
    args.synthetic_visits = tuple(v for v in args.synthetic_visits.split(",") if v)
    if any(not re.fullmatch(r"bl|m\d+", v) for v in args.synthetic_visits) or args.synthetic_visits[:1] != ("bl",):
        p.error(f"--synthetic-visits {','.join(args.synthetic_visits)!r}: start with bl, then mNN codes (e.g. bl,m12,m48)")
    if not args.synthetic and not (args.images and args.csv):
        p.error("give --images and --csv for a real cohort, or --synthetic N")
    args.register = {"on": True, "off": False}.get(args.register, not args.synthetic)   # auto: scans only
    return args


def main(argv=None):
    a = parse_args(argv)
    if a.preset in IMAGE_PRESETS:
        from mri import runtime
        runtime.start(argv)    # TensorFlow decodes the images: imported quietly, one device line
    try:
        split = tuple(float(x) for x in a.split.split(","))
        assert len(split) == 3 and min(split) >= 0 and sum(split) > 0
    except (ValueError, AssertionError):
        sys.exit(f"--split {a.split!r} must be three non-negative fractions, e.g. 0.8,0.1,0.1")
    cfg = PrepConfig(images=a.images, csv=a.csv, out=a.out, preset=a.preset,
                     attrs=tuple(x for x in a.attrs.split(",") if x), size=a.size, slices=a.slices,
                     spacing=a.spacing, split=split, seed=a.seed, workers=a.workers,
                     label_maps=tuple(a.label_map), id_regex=a.id_regex, id_column=a.id_column,
                     attr_columns=a.attr_columns, register=a.register, channels=a.channels,
                     partition=a.partition)
    try:
        if a.synthetic:
            cfg = synthetic_config(cfg, a.synthetic, a.volumes_dir or a.out + ".volumes", a.synthetic_version,
                                   a.synthetic_visits)
        summary = build(cfg)
    except CohortError as e:
        sys.exit(f"error: {e}")
    for line in summary.lines():
        print(line)
    print(f"wrote {os.path.abspath(cfg.out)}")


if __name__ == "__main__":
    main()
