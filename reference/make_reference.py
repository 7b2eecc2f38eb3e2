"""Build reference/real_slices.npz: real skull-stripped T1 brains cut exactly as data_prep.py cuts a volume.

    python reference/make_reference.py --store data/synthetic.h5 --out reference/real_slices.npz \\
        --brain icbm152_2009a=mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz \\
        --tissue icbm152_2009a:gm=mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz \\
        --tissue icbm152_2009a:wm=mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz \\
        --brain colin27=ch2bet.nii.gz

Each --brain NAME=PATH is preprocessed by the toolkit's own code for a user's scan (mri.data.scans.scan_from_file,
i.e. mri.data.volumes.process_file: canonical RAS, intensity scale, foreground crop, axial slices centred on the
brain) at the geometry (--size, --slices, --spacing) the store records in its provenance (or the given values
without --store). Tissue maps (--tissue NAME:CLASS=PATH, probabilities in [0, 1] or [0, 255]) are sampled at
the same world points with the brain's plan and stored as uint8 (255 = probability 1). reference/README.md says
where the files come from; the same files give the same arrays.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mri.data.io import atomic_path, exit_on  # noqa: E402
from mri.data.pipeline import _sha256 as sha256  # noqa: E402  (the checksum data_prep.py records for its CSV)
from mri.synthetic.realism import ReferenceError  # noqa: E402


def geometry(args):
    """(size, slices, spacing): the store's recorded geometry, else the command line's."""
    if not args.store:
        return args.size, args.slices, args.spacing
    from mri.data.scans import store_geometry
    from mri.data.store import SliceStore
    with SliceStore(args.store) as store:
        recorded = store_geometry(store)
        if recorded is None:
            raise ReferenceError(f"{args.store} records no slice geometry in its provenance: give --size, --slices "
                                 "and --spacing instead of --store")
        return store.size, int(recorded[0]), float(recorded[1])


def tissue_map(path, plan, size):
    """A probability map sampled at the plan's world points -> uint8 (255 = 1)."""
    from mri.data.volumes import apply_plan, load_canonical
    data, affine = load_canonical(path)
    top = 255.0 if data.max() > 1.5 else 1.0
    sampled = apply_plan(np.clip(data / top, 0, 1), dict(plan, affine=np.asarray(affine).tolist()), size)
    return np.round(np.clip(sampled, 0, 1) * 255).astype(np.uint8)


def build(brains, tissues, size, slices, spacing):
    """{npz key: array} for [(name, path)] and {name: [(class, path)]}."""
    from mri.data.scans import scan_from_file
    out = {"names": np.array([n for n, _ in brains]), "size": np.int32(size), "n_slices": np.int32(slices),
           "spacing": np.float32(spacing)}
    for name, path in brains:
        slab, plan = scan_from_file(path, size, slices, spacing)
        out[f"slices_{name}"] = slab.astype(np.float16)
        out[f"plan_{name}"] = np.array(json.dumps(plan))
        out[f"source_{name}"] = np.array(json.dumps({"file": os.path.basename(path), "sha256": sha256(path)}))
        for cls, tpath in tissues.get(name, []):
            out[f"{cls}_{name}"] = tissue_map(tpath, plan, size)
            out[f"source_{cls}_{name}"] = np.array(json.dumps({"file": os.path.basename(tpath),
                                                                "sha256": sha256(tpath)}))
    return out


def parse(args):
    brains, tissues = [], {}
    for item in args.brain:
        name, eq, path = item.partition("=")
        if not eq or not name.isidentifier():
            raise ReferenceError(f"--brain {item}: give NAME=PATH with NAME a plain identifier "
                                 "(e.g. colin27=ch2bet.nii.gz)")
        brains.append((name, path))
    for item in args.tissue:
        head, eq, path = item.partition("=")
        name, colon, cls = head.partition(":")
        if not (eq and colon) or cls not in ("gm", "wm", "csf") or name not in dict(brains):
            raise ReferenceError(f"--tissue {item}: give NAME:CLASS=PATH with NAME one of the --brain names and CLASS "
                                 "gm, wm or csf")
        tissues.setdefault(name, []).append((cls, path))
    if len(brains) < 2:
        raise ReferenceError("give at least two --brain NAME=PATH: the report compares against the real-to-real "
                             "distance")
    for path in [p for _, p in brains] + [p for v in tissues.values() for _, p in v]:
        if not os.path.isfile(path):
            raise ReferenceError(f"{path}: no such file")
    return brains, tissues


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--brain", action="append", default=[], metavar="NAME=PATH",
                   help="a skull-stripped real T1 volume (repeat; at least two)")
    p.add_argument("--tissue", action="append", default=[], metavar="NAME:CLASS=PATH",
                   help="a tissue probability map of brain NAME, CLASS gm, wm or csf (repeatable)")
    p.add_argument("--store", help="take size, slices and spacing from this store's provenance")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--out", default="reference/real_slices.npz")
    args = p.parse_args(argv)
    from mri.data.store import StoreError
    with exit_on(ReferenceError, StoreError, ValueError, FileNotFoundError):
        brains, tissues = parse(args)
        size, slices, spacing = geometry(args)
        arrays = build(brains, tissues, size, slices, spacing)
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    print(f"{args.out}: {', '.join(n for n, _ in brains)} at {size}x{size}, {slices} slices {spacing:g} mm apart "
          f"({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
