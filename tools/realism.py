"""Realism report: the synthetic cohort against real T1 brains cut by the same preprocessing.

    python tools/realism.py --store data/synthetic.h5 [--reference reference/real_slices.npz] [--n-subjects 20] \
        [--out reports/realism] [--figure docs/realism_slices.png]

Every statistic (mri/synthetic/realism.py defines them) is computed per brain: on one visit (the first stored) of each of
--n-subjects subjects spread evenly over the store's sorted subject ids, and on each real reference brain. Each
is reported as the synthetic-to-real distance (per subject, the mean of its distances to the real brains; mean
and 10th-90th percentile over subjects) against the real-to-real distance; the ratio is the headline (1: as
close as two real brains are). Because a ratio to the mean of the real-to-real distances hides an offset when the
real brains disagree, every row also says whether the synthetic value lies inside the real brains' range
("inside"), within the real-to-real distance of the nearer real brain ("near") or further ("out"), with that
offset in real-to-real distances (mri/synthetic/realism.py, `verdict`). Written to --out: report.md and realism.json. --figure: synthetic slices of three
subjects at five axial positions (columns left of the gap) beside the real brains at the same positions (right).
numpy and scipy only.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mri.synthetic import realism  # noqa: E402
from mri.data.io import exit_on, write_json  # noqa: E402
from mri.data.tissue import filled_foreground  # noqa: E402

DEFAULT_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference",
                                 "real_slices.npz")
FIGURE_LEVELS = 5
FIGURE_SUBJECTS = 3


def store_geometry(store):
    """(size, slices, spacing) of a store: its provenance, else the first volume's plan."""
    from mri.data.scans import store_geometry as recorded
    g = recorded(store)
    if g is not None:
        return store.size, int(g[0]), float(g[1])
    z = np.asarray(store.plan(int(store.volume[0]))["z_mm"])
    return store.size, len(z), float(z[1] - z[0]) if len(z) > 1 else 0.0


def pick_volumes(store, n_subjects, n_slices):
    """[(subject, visit, volume, slice indices inferior to superior)] for n subjects spread over the sorted ids."""
    subjects = sorted(set(store.subject))
    if n_subjects < 1:
        raise ValueError(f"--n-subjects {n_subjects}: give at least 1")
    chosen = [subjects[i] for i in sorted(set(np.linspace(0, len(subjects) - 1, min(n_subjects, len(subjects)))
                                              .round().astype(int)))]
    out = []
    for s in chosen:
        rows = np.flatnonzero(store.subject == s)
        volume = int(store.volume[rows[0]])
        idx = np.flatnonzero(store.volume == volume)
        idx = idx[np.argsort(store.slice[idx], kind="stable")]
        if len(idx) != n_slices:
            raise realism.ReferenceError(f"{store.path}: volume {volume} ({s}) has {len(idx)} slices, not the "
                                         f"{n_slices} its provenance records; rebuild the store with data_prep.py")
        out.append((s, str(store.visit[rows[0]]), volume, idx))
    return out


def figure(path, synthetic_slabs, reference, n_levels=FIGURE_LEVELS):
    """Rows: axial positions, inferior to superior; columns: synthetic subjects | gap | real brains."""
    from mri.data.grids import tile, to_uint8, write_png
    n = len(synthetic_slabs[0])
    levels = sorted(set(np.linspace(n / 8, n - 1 - n / 8, n_levels).round().astype(int)))
    left = tile([[to_uint8(s[k]) for s in synthetic_slabs] for k in levels])
    right = tile([[to_uint8(reference["brains"][r]["slices"][k]) for r in reference["names"]] for k in levels])
    gap = np.full((left.shape[0], 10), 255, np.uint8)
    write_png(path, np.concatenate([left, gap, right], axis=1))
    return levels


def _f(v, digits=3):
    return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"


def markdown(result):
    """The report: headline table, per-band percentiles, notes."""
    names = result["reference"]["names"]
    lines = ["# Realism of the synthetic cohort", "",
             f"Store `{result['store']}`: {len(result['subjects'])} subjects (one visit each) against the real brains "
             f"{', '.join(names)} of `{result['reference']['path']}`, all cut by the same preprocessing "
             f"({result['geometry']['size']}x{result['geometry']['size']}, {result['geometry']['slices']} slices "
             f"{result['geometry']['spacing']:g} mm apart). Distances: synthetic-to-real = per subject the mean of its "
             "distances to the real brains, mean [10th-90th percentile over subjects], and beside it the mean distance "
             "to each real brain; real-to-real = between the real brains (mean over pairs). **Ratio** = "
             "synthetic-to-real / real-to-real (1: as close as two real brains are; its interval from the per-subject "
             "distances). With two real brains, a scalar lying between them has a ratio of exactly 0.5, so up to 0.5 "
             "means inside the real range. A real-to-real distance below the statistic's floor is replaced by the "
             "floor (marked *). Definitions: mri/synthetic/realism.py.", ""]
    header = ["statistic", "unit", "synthetic", *names, "synthetic-to-real", "to " + " / to ".join(names),
              "real-to-real", "ratio", "verdict (offset; subjects inside)"]
    lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in result["rows"]:
        v = r["values"]
        syn = f"{_f(v['synthetic']['mean'])} [{_f(v['synthetic']['p10'])}, {_f(v['synthetic']['p90'])}]" if v else "–"
        reals = [_f(v[n]) if v else "–" for n in names]
        d = r["synthetic_to_real"]
        lines.append("| " + " | ".join([
            r["label"], r["unit"], syn, *reals, f"{_f(d['mean'])} [{_f(d['p10'])}, {_f(d['p90'])}]",
            " / ".join(_f(r["synthetic_to_each"][n]) for n in names),
            _f(r["real_to_real"]) + ("*" if r["floor_used"] else ""),
            f"**{_f(r['ratio'], 2)}** [{_f(r['ratio_interval'][0], 2)}, {_f(r['ratio_interval'][1], 2)}]",
            _verdict_cell(r)]) + " |")
    lines += ["", summary(result["rows"])]
    lines += ["", "GM share by depth from the outline (mm; synthetic: mean over subjects):", "",
              "| depth | synthetic | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for i, (lo, hi) in enumerate(zip(result["depth_edges"][:-1], result["depth_edges"][1:])):
        cells = [_f(result["gm_by_depth"][src][i], 2) for src in ["synthetic", *names]]
        lines.append(f"| {lo:g}-{hi:g} | " + " | ".join(cells) + " |")
    lines += ["", "In-brain intensity percentiles (10th / 50th / 90th) by position band (synthetic: mean over "
              "subjects):",
              "", "| slices | synthetic | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for b, band in enumerate(result["bands"]):
        cells = [" / ".join(_f(x, 2) for x in result["band_percentiles"][src][b]) for src in ["synthetic", *names]]
        lines.append(f"| {band[0]}-{band[1]} ({band[2]:+.0f} to {band[3]:+.0f} mm) | " + " | ".join(cells) + " |")
    checks = result.get("tissue_map_check")
    if checks:
        lines += ["", "Check of the intensity classes against the tissue maps shipped with the reference (mean "
                  "probability over the brain mask): " + "; ".join(
                      f"{n}: maps GM {c['gm']:.2f}, WM {c['wm']:.2f}, rest {c['rest']:.2f}; intensity classes GM "
                      f"{c['classes'][1]:.2f}, WM {c['classes'][2]:.2f}, CSF {c['classes'][0]:.2f}"
                      for n, c in checks.items()) + "."]
    lines += ["", f"Ran in {result['seconds']:.1f} s."]
    if result.get("figure"):
        lines += ["", f"Figure: `{result['figure']}`: rows = slices {', '.join(map(str, result['figure_levels']))} "
                  f"(inferior to superior); left: synthetic subjects {', '.join(result['figure_subjects'])}; right: "
                  f"{', '.join(names)}."]
    return "\n".join(lines) + "\n"


def _verdict_cell(row):
    v = row["verdict"]
    cell = f"{'**out**' if v == 'out' else v} ({_f(row['offset'], 2)}"
    if row.get("share_inside") is not None:
        cell += f"; {row['share_inside']:.0%}"
    return cell + ")"


def summary(rows):
    """One line: how many statistics are inside / near / out, the mean ratio and the worst band's ratio."""
    counts = {k: sum(r["verdict"] == k for r in rows) for k in ("inside", "near", "out")}
    ratios = [r["ratio"] for r in rows if np.isfinite(r["ratio"])]
    bands = [r["ratio"] for r in rows if r["name"].startswith("intensity_w1_band")]
    outs = ", ".join(r["name"] for r in rows if r["verdict"] == "out") or "none"
    return (f"Summary: {counts['inside']} inside the real range, {counts['near']} near (within the real-to-real "
            f"distance of the nearer real brain), {counts['out']} out ({outs}); mean ratio {np.mean(ratios):.2f}, "
            f"lowest band's ratio {bands[0]:.2f}, largest band ratio {max(bands):.2f}.")


def shown(path):
    """A path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def run(store_path, reference_path, n_subjects=20, out=None, figure_path=None, n_bands=4, log=print):
    from mri.data.store import SliceStore
    started = time.time()
    reference_path = shown(reference_path)
    reference = realism.load_reference(reference_path)
    with SliceStore(store_path) as store:
        size, n_slices, spacing = store_geometry(store)
        realism.check_geometry(reference, size, n_slices, spacing, store_path)
        chosen = pick_volumes(store, n_subjects, n_slices)
        slabs = [store.images(idx) for _, _, _, idx in chosen]
        px = [store.plan(v)["side_mm"] / size for _, _, v, _ in chosen]
        z_mm = np.asarray(store.plan(chosen[0][2])["z_mm"])
        z_mm = z_mm - np.mean(z_mm)
    synthetic = [realism.brain_statistics(s, p, n_bands) for s, p in zip(slabs, px)]
    real = {n: realism.brain_statistics(b["slices"], b["px_mm"], n_bands) for n, b in reference["brains"].items()}
    rows = realism.compare(synthetic, real)
    bands = [[lo, hi, float(z_mm[lo]), float(z_mm[hi])] for lo, hi in synthetic[0]["bands"]]
    band_pct = {"synthetic": np.mean([s["band_percentiles"] for s in synthetic], axis=0).tolist(),
                **{n: real[n]["band_percentiles"] for n in real}}
    checks = {}
    for n, b in reference["brains"].items():
        if {"gm", "wm"} <= set(b["tissue"]):
            mask = filled_foreground(b["slices"])
            gm, wm = float(b["tissue"]["gm"][mask].mean()), float(b["tissue"]["wm"][mask].mean())
            checks[n] = {"gm": gm, "wm": wm, "rest": 1 - gm - wm,
                         "classes": [real[n]["frac_csf"], real[n]["frac_gm"], real[n]["frac_wm"]]}
    result = {
        "store": store_path, "geometry": {"size": size, "slices": n_slices, "spacing": spacing},
        "reference": {"path": reference_path, "names": reference["names"],
                      "sources": {n: b["source"] for n, b in reference["brains"].items()}},
        "subjects": [{"subject": s, "visit": v, "volume": vol} for s, v, vol, _ in chosen],
        "depth_edges": [float(e) for e in realism.DEPTH_EDGES_MM],
        "gm_by_depth": {"synthetic": _nanmean([s["gm_by_depth"] for s in synthetic]),
                        **{n: np.asarray(real[n]["gm_by_depth"]).tolist() for n in real}},
        "rows": rows, "bands": bands, "band_percentiles": band_pct, "tissue_map_check": checks,
        "per_source": {"synthetic": [_public(s) for s in synthetic], **{n: _public(real[n]) for n in real}},
    }
    if figure_path:
        picks = [0, len(slabs) // 2, len(slabs) - 1][:min(FIGURE_SUBJECTS, len(slabs))]
        picks = list(dict.fromkeys(picks))
        result["figure_levels"] = figure(figure_path, [slabs[i] for i in picks], reference)
        result["figure"] = figure_path
        result["figure_subjects"] = [chosen[i][0] for i in picks]
    result["seconds"] = time.time() - started
    if out:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "realism.json"), result)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(markdown(result))
        log(f"wrote {os.path.join(out, 'report.md')} and realism.json ({result['seconds']:.1f} s)")
    return result


def _nanmean(profiles):
    """Mean over brains per depth bin, NaN where no brain reaches the bin."""
    a = np.asarray(profiles, np.float64)
    n = np.isfinite(a).sum(axis=0)
    return np.where(n > 0, np.nansum(a, axis=0) / np.maximum(n, 1), np.nan).tolist()


def _public(stats):
    """A brain's statistics without the quantile functions (kept short in the JSON)."""
    return {k: v for k, v in stats.items() if k not in ("q", "q_bands", "wm_depth")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="the slice store to assess (e.g. data/synthetic.h5)")
    p.add_argument("--reference", default=DEFAULT_REFERENCE,
                   help="real brains cut at the store's geometry (reference/make_reference.py); default: the shipped one")
    p.add_argument("--n-subjects", type=int, default=20, help="synthetic subjects (one visit each)")
    p.add_argument("--bands", type=int, default=4, help="position bands of the intensity distribution")
    p.add_argument("--out", default="reports/realism", help="folder for report.md and realism.json")
    p.add_argument("--figure", help="also write the comparison figure (PNG) here, e.g. docs/realism_slices.png")
    args = p.parse_args(argv)
    from mri.data.store import StoreError
    with exit_on(realism.ReferenceError, StoreError, ValueError):
        result = run(args.store, args.reference, args.n_subjects, args.out, args.figure, args.bands)
    print(markdown(result))


if __name__ == "__main__":
    main()
