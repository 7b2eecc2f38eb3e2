"""A method's learning curve from evaluate.py reports of its checkpoints: ground-truth MSE and the cosine with the
true change per number of generator steps, as a Markdown table (with the subject-level intervals and the paired
differences to identity and meandiff) and a PNG.

    python tools/learning_curve.py --attr age --out docs/vagan_learning_curve.png \\
        250=reports/vagan_250/metrics.json 500=reports/vagan_500/metrics.json

Each report must score one run besides identity and meandiff (the run is the method that is neither). The PNG
has two panels, GT MSE (left) and cosine (right), steps on a linear x axis: the run's values as black dots with
their intervals as vertical bars, identity's GT MSE as a blue line, meandiff's as a red one, cosine 0 as a grey
line. No text: the caption beside it says what it shows.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mri.data import grids  # noqa: E402

BASELINES = ("identity", "meandiff", "truth")


def rows(points, attr):
    """[(steps, run metrics, metrics of every method)] from STEPS=metrics.json arguments."""
    out = []
    for p in points:
        steps, path = p.split("=", 1)
        methods = json.load(open(path))["methods"]
        run = [m for m in methods if m not in BASELINES]
        if len(run) != 1:
            raise SystemExit(f"{path}: expected one run besides {BASELINES}, found {run}")
        out.append((int(steps), methods[run[0]][attr], {m: methods[m][attr] for m in methods}))
    return sorted(out, key=lambda r: r[0])


def fmt(v, ci):
    return f"{v:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]"


def table(data):
    lines = ["| generator steps | GT MSE | vs identity | vs meandiff | cosine with the true change |",
             "|---|---|---|---|---|"]
    for steps, r, _ in data:
        vs = [fmt(r["vs"][b]["gt_mse"]["diff"], r["vs"][b]["gt_mse"]["ci"]) + f" {r['vs'][b]['gt_mse']['verdict'] or ''}"
              for b in ("identity", "meandiff")]
        lines.append(f"| {steps} | {fmt(r['gt_mse'], r['ci']['gt_mse'])} | {vs[0]} | {vs[1]} | "
                     f"{fmt(r['gt_change_cosine'], r['ci']['gt_change_cosine'])} |")
    ref = data[-1][2]
    for b in ("identity", "meandiff"):
        lines.append(f"| {b} | {fmt(ref[b]['gt_mse'], ref[b]['ci']['gt_mse'])} | | | "
                     + (fmt(ref[b]['gt_change_cosine'], ref[b]['ci']['gt_change_cosine'])
                        if ref[b].get("gt_change_cosine") is not None else "unscored") + " |")
    return "\n".join(lines)


def panel(steps, values, intervals, lines, size=(160, 240)):
    """A white RGB panel: dots with interval bars, and horizontal lines {value: colour}."""
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    lo = min([i[0] for i in intervals] + list(lines))
    hi = max([i[1] for i in intervals] + list(lines))
    pad = 0.08 * (hi - lo or 1.0)
    y = lambda v: int(round((h - 1) * (1 - (v - lo + pad) / (hi - lo + 2 * pad))))
    xs = [int(round(12 + (w - 24) * (s - min(steps)) / ((max(steps) - min(steps)) or 1))) for s in steps]
    for v, colour in lines.items():
        img[y(v), :] = colour
    for x, v, (a, b) in zip(xs, values, intervals):
        img[y(b):y(a) + 1, x] = 0
        img[max(y(v) - 2, 0):y(v) + 3, max(x - 2, 0):x + 3] = 0
    img[[0, -1], :], img[:, [0, -1]] = 128, 128
    return img


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("points", nargs="+", help="STEPS=path/to/metrics.json")
    p.add_argument("--attr", default="age")
    p.add_argument("--out", default="", help="PNG to write (none: the table only)")
    args = p.parse_args(argv)
    data = rows(args.points, args.attr)
    print(table(data))
    if args.out:
        steps = [d[0] for d in data]
        ref = data[-1][2]
        mse = panel(steps, [d[1]["gt_mse"] for d in data], [d[1]["ci"]["gt_mse"] for d in data],
                    {ref["identity"]["gt_mse"]: (0, 0, 255), ref["meandiff"]["gt_mse"]: (255, 0, 0)})
        cos = panel(steps, [d[1]["gt_change_cosine"] for d in data], [d[1]["ci"]["gt_change_cosine"] for d in data],
                    {0.0: (160, 160, 160)})
        grids.write_png(args.out, grids.tile([[mse, cos]]))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
