"""The results tables of the docs, generated from evaluate.py's reports, so every number traces to a command.

An evaluation written by `evaluate.py --out reports/<name>` is committed as `docs/results/<name>.json`, a copy
of its `metrics.json` (`--add reports/<name>` copies it). Every table of README.md and docs/*.md that sits
between the markers

    <!-- results report=<name> attr=<attribute> measure=<metric> -->
    <!-- /results -->

is written from that report: the evaluate.py command that reproduces it, then one row per method with the
value and its 95 % subject-level interval and the paired differences to identity (the no-change floor) and
to meandiff with their intervals and verdicts. `measures=<m1>,<m2>,...` instead of `measure=` writes one
column per metric, the value and its interval, bold where the paired difference to meandiff is better
(its interval excluding 0): the README's headline table. Cells are formatted as report.md formats them.

    python -m evaluation.results                       # rewrite every table from docs/results/*.json
    python -m evaluation.results --check               # exit 1, naming each table that differs (CI)
    python -m evaluation.results --add reports/tiny    # copy reports/tiny/metrics.json, then rewrite
"""
import argparse
import glob
import os
import re
import shutil
import sys

from evaluation import report
from mri.data.io import atomic_path, read_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORTS = os.path.join("docs", "results")
BEGIN = re.compile(r"^<!-- results (?P<spec>[^>]*?) -->$")
END = "<!-- /results -->"
ORDER = ("identity", "meandiff", "truth")   # the baselines first, then the runs in the report's order


class ResultsError(ValueError):
    pass


def documents(root=ROOT):
    """The Markdown files that may hold generated tables."""
    return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def parse_spec(spec, where):
    """{'report', 'attr', 'measure' or 'measures'} of a begin marker."""
    fields = dict(item.split("=", 1) for item in spec.split() if "=" in item)
    if not {"report", "attr"} <= fields.keys() or ("measure" in fields) == ("measures" in fields):
        raise ResultsError(f"{where}: a results marker needs report=, attr= and one of measure= or measures=, "
                           f"got {spec!r}")
    return fields


def blocks(lines, where):
    """[(begin line index, end line index, spec)] of the generated tables in a document's lines."""
    out, start = [], None
    for i, line in enumerate(lines):
        m = BEGIN.match(line.strip())
        if m:
            if start is not None:
                raise ResultsError(f"{where}:{start[0] + 1}: results marker not closed with {END}")
            start = (i, parse_spec(m["spec"], f"{where}:{i + 1}"))
        elif line.strip() == END:
            if start is None:
                raise ResultsError(f"{where}:{i + 1}: {END} without a results marker")
            out.append((start[0], i, start[1]))
            start = None
    if start is not None:
        raise ResultsError(f"{where}:{start[0] + 1}: results marker not closed with {END}")
    return out


def load_report(name, root=ROOT):
    path = os.path.join(root, REPORTS, f"{name}.json")
    if not os.path.exists(path):
        raise ResultsError(f"no report {path}: run evaluate.py with --out reports/{name}, then "
                           f"python -m evaluation.results --add reports/{name}")
    return read_json(path)


def methods_in_order(metrics):
    names = list(metrics["methods"])
    return [m for m in ORDER if m in names] + [m for m in names if m not in ORDER]


def command(metrics, name):
    """The evaluate.py command that writes this report."""
    return (f"python evaluate.py --store {metrics['store']} --oracle {metrics['oracle']} "
            f"--attrs {','.join(metrics['attrs'])} --methods {','.join(methods_in_order(metrics))} "
            f"--n {metrics['n']} --seed {metrics['seed']} --bootstrap {metrics['bootstrap']['resamples']} "
            f"--out reports/{name}")


def labels(floor):
    """{metric: column label} as report.md names them."""
    main, gt = report._columns(floor)
    return {k: c for c, k in main + gt}


def scores(metrics, attr, method, where):
    if attr not in metrics["protocol"]:
        raise ResultsError(f"{where}: the report has no attribute {attr!r} (it has {list(metrics['protocol'])})")
    s = metrics["methods"][method][attr]
    for metric, ci in s.get("ci", {}).items():
        if ci is not None and ci[0] > ci[1]:
            raise ResultsError(f"{where}: {method} {attr} {metric}: interval [{ci[0]}, {ci[1]}] has its ends swapped")
    return s


def caption(metrics, name, attr):
    proto = metrics["protocol"][attr]
    return (f"`docs/results/{name}.json`, {attr}: {proto['pairs']} pairs on {metrics['n']} test slices of "
            f"{metrics['subjects']} subjects ({proto['change']}); written by `{command(metrics, name)}`")


def measure_table(metrics, name, attr, metric, where):
    """One metric: value [interval], then the paired differences to identity and meandiff."""
    floor = metrics["floor"][attr]
    label = labels(floor).get(metric)
    if label is None or metric not in floor:
        raise ResultsError(f"{where}: no measure {metric!r} for {attr} (measures: {', '.join(labels(floor))})")
    rows = []
    for m in methods_in_order(metrics):
        s = scores(metrics, attr, m, where)
        fixed = metrics["methods"][m].get("by_construction", ())
        vs = s.get("vs", {})
        rows.append([m, report._cell(s, metric, fixed)] +
                    [report._diff_cell(vs[ref].get(metric)) if ref in vs else "–" for ref in ("identity", "meandiff")])
    return [caption(metrics, name, attr), ""] + report._table(
        ["method", f"{label} [95 % interval]", "− identity [interval]", "− meandiff [interval]"], rows)


def summary_table(metrics, name, attr, measures, where):
    """Several metrics, one column each: value [interval], bold where better than meandiff."""
    floor = metrics["floor"][attr]
    names = labels(floor)
    missing = [k for k in measures if k not in names or k not in floor]
    if missing:
        raise ResultsError(f"{where}: no measure {missing} for {attr} (measures: {', '.join(names)})")
    rows = []
    for m in methods_in_order(metrics):
        s = scores(metrics, attr, m, where)
        fixed = metrics["methods"][m].get("by_construction", ())
        cells = []
        for k in measures:
            cell = report._cell(s, k, fixed)
            better = s.get("vs", {}).get("meandiff", {}).get(k, {}).get("verdict") == "better"
            cells.append(f"**{cell}**" if better else cell)
        rows.append([m] + cells)
    return [caption(metrics, name, attr), ""] + report._table(["method"] + [names[k] for k in measures], rows)


def table(spec, where, root=ROOT, cache=None):
    """The lines of the table a marker asks for."""
    cache = {} if cache is None else cache
    name = spec["report"]
    if name not in cache:
        cache[name] = load_report(name, root)
    metrics = cache[name]
    if "measure" in spec:
        return measure_table(metrics, name, spec["attr"], spec["measure"], where)
    return summary_table(metrics, name, spec["attr"], spec["measures"].split(","), where)


def render(text, where, root=ROOT, cache=None):
    """(the document with every table regenerated, [specs of the tables that changed])."""
    lines = text.split("\n")
    out, changed, pos = [], [], 0
    for begin, end, spec in blocks(lines, where):
        new = table(spec, f"{where}:{begin + 1}", root, cache)
        out += lines[pos:begin + 1] + [""] + new + [""]
        if lines[begin + 1:end] != [""] + new + [""]:
            changed.append(spec)
        pos = end
    return "\n".join(out + lines[pos:]), changed


def describe(spec):
    return " ".join(f"{k}={v}" for k, v in spec.items())


def add(report_dir, root=ROOT):
    """Copy an evaluate.py report's metrics.json to docs/results/<its directory's name>.json."""
    src = os.path.join(report_dir, "metrics.json")
    if not os.path.exists(src):
        raise ResultsError(f"no {src}: give the --out directory of an evaluate.py run")
    name = os.path.basename(os.path.normpath(report_dir))
    dst = os.path.join(root, REPORTS, f"{name}.json")
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def main(argv=None, root=ROOT):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming each table that differs from what its report gives")
    p.add_argument("--add", metavar="REPORT_DIR", action="append", default=[],
                   help="copy REPORT_DIR/metrics.json to docs/results/<REPORT_DIR's name>.json first (repeatable)")
    args = p.parse_args(argv)
    try:
        for d in args.add:
            print(f"copied {add(d, root)}")
        cache, stale = {}, []
        for path in documents(root):
            where = os.path.relpath(path, root)
            with open(path) as f:
                text = f.read()
            new, changed = render(text, where, root, cache)
            stale += [f"{where}: table {describe(s)}" for s in changed]
            if changed and not args.check:
                with atomic_path(path) as tmp, open(tmp, "w") as f:
                    f.write(new)
    except ResultsError as e:
        raise SystemExit(f"error: {e}")
    if args.check and stale:
        print("\n".join(f"{s} differs from its report; run python -m evaluation.results" for s in stale),
              file=sys.stderr)
        return 1
    for s in stale:
        print(f"rewrote {s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
