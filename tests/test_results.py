"""evaluation.results: the docs' results tables are written from evaluate.py's metrics.json, and --check names
each table that differs from its report. A hand-made report with distinct values in every cell, so a swapped
interval, a crossed reference or a dropped row shows."""
import json
import os

import pytest

from evaluation import results

METHODS = ["identity", "meandiff", "truth", "runs/x@residual"]   # the order the tables must keep
METRICS = ["mae", "oracle_shift", "mse", "gt_mse", "gt_mse_brain"]
BY_CONSTRUCTION = {"identity": ["mse", "oracle_shift"], "truth": ["gt_mse", "gt_mse_brain"]}
VERDICTS = ["better", "worse", "no difference shown"]


def value(i, j):
    return 0.0123 * (i + 1) + 0.417 * (j + 1)


def interval(i, j):
    v = value(i, j)
    return [v - 0.0011 * (i + 1), v + 0.0029 * (j + 2)]   # asymmetric: swapped ends change the text


def diff(i, j, ref):
    d = (-1) ** (i + j) * (0.0031 * (i + 1) + 0.05 * (j + 1)) + (0.7 if ref == "meandiff" else 0.0)
    return {"diff": d, "ci": [d - 0.002 * (j + 1), d + 0.003 * (i + 1)], "verdict": VERDICTS[(i + 2 * j + len(ref)) % 3]}


def make_report():
    methods = {}
    for i, m in enumerate(METHODS):
        s = {"ci": {}, "vs": {}, "pairs": 40}
        for j, k in enumerate(METRICS):
            s[k], s["ci"][k] = value(i, j), interval(i, j)
        for ref in ("identity", "meandiff"):
            if ref != m:
                s["vs"][ref] = {k: diff(i, j, ref) for j, k in enumerate(METRICS)}
        methods[m] = {"by_construction": BY_CONSTRUCTION.get(m, []), "age": s}
    # written as evaluate.py writes it (sorted keys), so the generator must restore the table order itself
    return json.loads(json.dumps({
        "n": 24, "subjects": 6, "seed": 3, "store": "data/s.h5", "oracle": "runs/o", "attrs": ["age"],
        "synthetic": True, "bootstrap": {"resamples": 200, "level": 0.95, "unit": "subject"},
        "protocol": {"age": {"pairs": 40, "change": "age +-10 years"}},
        "floor": {"age": {k: 0.0 for k in METRICS}}, "methods": methods}, sort_keys=True))


def fmt(v):
    return f"{v:.3g}"


def expected_cell(i, j):
    lo, hi = interval(i, j)
    dagger = " †" if METRICS[j] in BY_CONSTRUCTION.get(METHODS[i], []) else ""
    return f"{fmt(value(i, j))} [{fmt(lo)}, {fmt(hi)}]{dagger}"


def expected_diff(i, j, ref):
    if METHODS[i] == ref:
        return "–"
    d = diff(i, j, ref)
    suffix = {"better": " **better**", "worse": " worse"}.get(d["verdict"], "")
    return f"{d['diff']:+.3g} [{fmt(d['ci'][0])}, {fmt(d['ci'][1])}]{suffix}"


def rows(lines):
    """The table's body rows as lists of cells."""
    body = [line for line in lines if line.startswith("| ")][1:]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in body]


@pytest.mark.parametrize("j", range(len(METRICS)), ids=METRICS)
def test_a_measure_table_has_every_method_its_interval_and_both_paired_differences(j):
    lines = results.measure_table(make_report(), "r", "age", METRICS[j], "test")
    assert "--out reports/r" in lines[0] and "--n 24 --seed 3 --bootstrap 200" in lines[0]
    got = rows(lines)
    assert [r[0] for r in got] == METHODS
    for i, r in enumerate(got):
        assert r[1:] == [expected_cell(i, j), expected_diff(i, j, "identity"), expected_diff(i, j, "meandiff")], METHODS[i]


def test_the_summary_table_bolds_only_what_beats_meandiff():
    measures = ["gt_mse", "mae", "oracle_shift"]
    got = rows(results.summary_table(make_report(), "r", "age", measures, "test"))
    assert [r[0] for r in got] == METHODS
    for i, r in enumerate(got):
        for cell, k in zip(r[1:], measures):
            j = METRICS.index(k)
            better = METHODS[i] != "meandiff" and diff(i, j, "meandiff")["verdict"] == "better"
            assert cell == (f"**{expected_cell(i, j)}**" if better else expected_cell(i, j)), (METHODS[i], k)


def make_root(tmp_path, report=None):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "r.json").write_text(json.dumps(report or make_report()))
    (tmp_path / "README.md").write_text("# x\n\n<!-- results report=r attr=age measures=gt_mse,mae -->\n<!-- /results -->\n")
    (tmp_path / "docs" / "page.md").write_text("intro\n<!-- results report=r attr=age measure=gt_mse -->\nstale\n"
                                               "<!-- /results -->\nafter\n")
    return tmp_path


def test_check_names_each_stale_table_and_a_rewrite_fixes_it(tmp_path, capsys):
    root = make_root(tmp_path)
    assert results.main(["--check"], root=str(root)) == 1
    err = capsys.readouterr().err
    assert "README.md: table report=r attr=age measures=gt_mse,mae" in err
    assert "docs/page.md: table report=r attr=age measure=gt_mse" in err
    assert results.main([], root=str(root)) == 0
    page = (root / "docs" / "page.md").read_text()
    assert "stale" not in page and page.startswith("intro\n") and page.endswith("<!-- /results -->\nafter\n")
    assert results.main(["--check"], root=str(root)) == 0
    # a dropped row is caught
    lines = page.split("\n")
    (root / "docs" / "page.md").write_text("\n".join(l for l in lines if not l.startswith("| truth ")))
    assert results.main(["--check"], root=str(root)) == 1
    assert "docs/page.md: table report=r attr=age measure=gt_mse" in capsys.readouterr().err


def test_a_report_with_swapped_interval_ends_or_a_missing_report_is_refused(tmp_path):
    report = make_report()
    report["methods"]["meandiff"]["age"]["ci"]["gt_mse"].reverse()
    root = make_root(tmp_path, report)
    with pytest.raises(SystemExit, match="meandiff age gt_mse: interval .* swapped"):
        results.main(["--check"], root=str(root))
    (root / "docs" / "results" / "r.json").unlink()
    with pytest.raises(SystemExit, match="--add reports/r"):
        results.main(["--check"], root=str(root))


def test_add_copies_a_reports_metrics(tmp_path):
    root = make_root(tmp_path / "repo")
    report_dir = tmp_path / "reports" / "fresh"
    report_dir.mkdir(parents=True)
    (report_dir / "metrics.json").write_text(json.dumps(make_report()))
    assert results.main(["--add", str(report_dir)], root=str(root)) == 0
    assert json.loads((root / "docs" / "results" / "fresh.json").read_text()) == make_report()


def test_the_committed_tables_match_their_reports():
    assert results.main(["--check"]) == 0
