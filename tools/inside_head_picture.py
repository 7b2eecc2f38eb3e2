"""One scan through a method with and without models.inside_head: what the wrapper keeps from changing.

    python tools/inside_head_picture.py --method runs/fader/qs@residual --store data/quickstart.h5 \\
        --input ch2.nii.gz --source age=60,dx=CN --age 90 --out docs/inside_head_colin27.png

The scan is prepared as simulate.py prepares it (simulation.trajectory.prepare) and manipulated twice: by the
method alone and by the method inside models.inside_head (what simulate.py and evaluate.py use). The PNG has, per
row slice (simulation.outputs.PICTURE_SLICES), the source, the output without and with the wrapper, and below
them the two differences (output - source; loss blue, gain red, one scale: --scale, or simulate.py's; printed). It prints, for both, the
mean |change| inside the grown head and beyond it.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mri import runtime  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="a run directory (with @mode) or a baseline, as simulate.py's")
    p.add_argument("--store", required=True, help="the method's store (its geometry and attributes)")
    p.add_argument("--input", required=True, help="a NIfTI/Analyze scan")
    p.add_argument("--source", required=True, help="the scan's attributes, NAME=VALUE,...")
    p.add_argument("--age", default="", help="target ages (simulate.py's --age)")
    p.add_argument("--dx", default="", help="target diagnoses (simulate.py's --dx)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--scale", type=float, default=0.0,
                   help="difference that saturates the colours (0: simulate.py's, from the largest differences); "
                        "a small one shows faint changes in the background")
    p.add_argument("--zoom", type=int, default=1, help="enlarge every pixel to zoom x zoom")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    runtime.start()
    from models import head, inside_head
    from mri.data import grids
    from mri.data.store import SliceStore
    from simulation import outputs, trajectory
    store = SliceStore(args.store)
    sim = trajectory.prepare(args.method, store, source=args.source, age=args.age, dx=args.dx, input_path=args.input)
    method = trajectory.load_method(args.method, store, sim.schema.names)
    slab = sim.slab
    n = len(slab)
    name = sim.targets[-1][0]
    plain = trajectory.manipulate_slab(method, slab, sim.source, sim.targets, sim.index, args.batch_size)[name]
    kept = trajectory.manipulate_slab(inside_head(method), slab, sim.source, sim.targets, sim.index,
                                      args.batch_size)[name]
    inside = head(slab[..., None])[..., 0]
    for label, out in (("without inside_head", plain), ("with inside_head", kept)):
        change = np.abs(out - slab)
        print(f"{label}: mean |change| inside the grown head {change[inside].mean():.4f}, "
              f"beyond it {change[~inside].mean():.4f} (max {change[~inside].max():.3f})")
    rows = [int(f * (n - 1)) for f in outputs.PICTURE_SLICES]
    if args.scale:
        blank = np.full(slab.shape[1:], 255, np.uint8)
        cells = []
        for k in rows:
            cells.append([grids.to_uint8(slab[k]), grids.to_uint8(plain[k]), grids.to_uint8(kept[k])])
            cells.append([blank] + [grids.diverging(o[k] - slab[k], args.scale) for o in (plain, kept)])
        image, scale = grids.tile(cells), args.scale
    else:
        image, scale = outputs.picture(slab, {"without": plain, "with": kept}, rows)
    zoom = np.ones((args.zoom, args.zoom) + (1,) * (image.ndim - 2), np.uint8)
    grids.write_png(args.out, np.kron(image, zoom))
    print(f"wrote {args.out} (target {name}; difference scale +-{scale})")


if __name__ == "__main__":
    main()
