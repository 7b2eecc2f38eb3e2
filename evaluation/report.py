"""The Markdown report of an evaluation's metrics (tables with intervals, paired differences and verdicts)."""


from evaluation.protocol import DIRECTION, FD_MIN_RATIO, FLOOR, REFERENCES, REPEATS
from evaluation.truth import STRUCTURES
from models.baselines import FLOOR_BY_CONSTRUCTION


def _fmt(v):
    return "–" if v is None else f"{v:.3g}"


def _cell(s, key, fixed=()):
    """"value [low, high]", marked † when the method reaches it by construction."""
    v, ci = s.get(key), s.get("ci", {}).get(key)
    text = _fmt(v) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
    return text + (" †" if key in fixed else "")


def _diff_cell(d):
    if d is None or d["diff"] is None:
        return "–"
    text = f"{d['diff']:+.3g} [{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]" if d["ci"] else f"{d['diff']:+.3g}"
    return text + {"better": " **better**", "worse": " worse", None: ""}.get(d["verdict"], "")


def _columns(floor):
    effect = [("accuracy ↑", "accuracy"), ("target prob. shift ↑", "target_prob_shift")] if "accuracy" in floor \
        else [("MAE ↓", "mae"), ("oracle shift ↑", "oracle_shift")]
    identity = [("MSE", "mse"), ("MSE brain", "mse_brain"), ("SSIM brain", "ssim_brain"),
                ("reversibility L1 ↓", "reversibility_l1"), ("KID ↓", "kid")]
    gt = []
    if "gt_mse" in floor:
        gt = [("GT MSE ↓", "gt_mse"), ("GT MSE brain ↓", "gt_mse_brain"), ("GT SSIM brain ↑", "gt_ssim_brain"),
              ("cosine to true change ↑", "gt_change_cosine")]
        for s in STRUCTURES:
            gt += [(f"Δ{s} bias mm²", f"{s}_change_bias_mm2"), (f"Δ{s} error mm² ↓", f"{s}_change_error_mm2")]
    return effect + identity, gt


def _paired_tables(rows, keys):
    """One table per reference: each method's paired differences on `keys` [(column, metric)]; `rows` are
    (name, summary, ...) with the floor first."""
    lines = []
    for ref in REFERENCES:
        compared = [(r, s["vs"][ref]) for r, s, _ in rows[1:] if ref in s.get("vs", {})]
        if compared:
            lines += [f"Paired difference to {ref} (method - {ref}; **better** / worse only where the interval "
                      "excludes 0):", ""]
            lines += _table(["method"] + [c for c, _ in keys],
                            [[r] + [_diff_cell(vs.get(k)) for _, k in keys] for r, vs in compared]) + [""]
    return lines


def _table(header, rows):
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


FOLLOWUP_COLUMNS = [("MSE ↓", "fu_mse"), ("MSE brain ↓", "fu_mse_brain"), ("SSIM ↑", "fu_ssim"),
                    ("SSIM brain ↑", "fu_ssim_brain"), ("change corr. ↑", "fu_change_corr")]
FOLLOWUP_GT_COLUMNS = [("GT MSE ↓", "gt_mse"), ("GT MSE brain ↓", "gt_mse_brain"), ("GT SSIM brain ↑", "gt_ssim_brain"),
                       ("GT change corr. ↑", "gt_change_corr")]


def followup_markdown(f):
    """The follow-up protocol's section (evaluation/followup.py): values with intervals, paired differences
    to meandiff and identity with verdicts, the noise floor and (synthetic) the ground truth of the same pairs
    and how the follow-up scores predict it."""
    from evaluation.followup import NOISE_FLOOR
    span = f.get("span_years")
    lines = ["## Follow-up: earlier visits turned into later visits' attributes, scored against the later scans", "",
             f"{f['pairs']} pairs of slices from {f['visit_pairs']} pairs of visits of {f['subjects']} test subjects "
             f"(seed {f['seed']})" + (f", {span['mean']:.2f} years apart on average ({span['min']:.2f}-{span['max']:.2f})"
                                      if span else "") + "; visits " + {True: "registered to the first visit by data_prep",
                                                                        False: "not registered (--register off)"}.get(
                 f.get("registered"), "of unknown registration") + ". Values: mean over pairs [95 % interval from "
             f"{f['bootstrap']['resamples']} resamples of test subjects]. MSE/SSIM: the method's image against the "
             "real later slice (brain = inside the earlier slice's brain); change corr.: Pearson correlation, inside "
             "the brain, of the predicted change (output - earlier) with the observed one (later - earlier), 0 for "
             "no predicted change.", ""]
    rows = [(FLOOR, f["floor"], ())] + [(k, v, v.get("by_construction", ())) for k, v in f["methods"].items()]
    if "noise_floor" in f:
        rows.append((NOISE_FLOOR, f["noise_floor"], ()))
    partial = [f"{k} {v['pairs']}" for k, v in f["methods"].items() if v["pairs"] < f["pairs"]]
    if partial:
        lines += [f"Pairs scored, of {f['pairs']}: {', '.join(partial)}.", ""]
    groups = [FOLLOWUP_COLUMNS] + ([FOLLOWUP_GT_COLUMNS] if f["synthetic"] else [])
    for cols in groups:
        lines += _table(["method"] + [c for c, _ in cols], [[r] + [_cell(s, k, fixed) for _, k in cols]
                                                            for r, s, fixed in rows]) + [""]
    if "noise_floor" in f:
        lines += [f"{NOISE_FLOOR}: the later visit re-rendered with another noise seed (another scan of the same "
                  "brain), scored as a prediction: what knowing the later anatomy exactly gives when the prediction "
                  "carries scan noise of its own. A reference, not a bound: a noise-free prediction of the later "
                  "anatomy halves its MSE, and any change that removes the earlier slice's noise (smoothing) "
                  "correlates with the observed change, which holds that noise with the opposite sign. GT: against "
                  "the true counterfactual of the earlier slice at the later attributes (GT change corr.: predicted "
                  "against true change).", ""]
    keys = [(c, k) for c, k in FOLLOWUP_COLUMNS + (FOLLOWUP_GT_COLUMNS if f["synthetic"] else []) if k in DIRECTION]
    lines += _paired_tables(rows, keys)
    a = f.get("agreement")
    if a:
        across = ", ".join(f"{k} {_fmt(v)}" for k, v in a["across_methods"].items())
        lines += [f"How the follow-up scores predict the ground-truth ones: rank correlation over the "
                  f"{len(a['rows'])} rows' means (fu_mse_brain with gt_mse_brain, fu_change_corr with "
                  f"gt_change_corr): {across}; Pearson correlation over each row's pairs:", ""]
        lines += _table(["method", "MSE brain: fu vs GT", "change corr.: fu vs GT"],
                        [[r, _fmt(v.get("fu_mse_brain")), _fmt(v.get("fu_change_corr"))]
                         for r, v in a["per_pair"].items()]) + [""]
    return lines


def report_markdown(metrics, title="Evaluation"):
    """The metrics as markdown: per attribute, the values with their intervals and the paired differences to
    meandiff and identity with verdicts; unchanged attributes; the oracle on the test split; figures; the
    follow-up protocol (alone when only it was run)."""
    m = metrics
    if "protocol" not in m:
        return "\n".join([f"# {title}", "", f"Store `{m['followup']['store']}`.", ""] + followup_markdown(m["followup"]))
    boot = m.get("bootstrap", {})
    lines = [f"# {title}", "",
             f"Store `{m['store']}`, oracle `{m.get('oracle', '?')}`: n = {m['n']} test slices of {m.get('subjects', '?')} "
             f"subjects (seed {m['seed']}). Every value is the mean over pairs with its {boot.get('level', 0.95):.0%} "
             f"interval [low, high] from {boot.get('resamples', '?')} bootstrap resamples of test subjects. "
             "† = reached by construction (not a result, never ranked).",
             "Effectiveness: the oracle's prediction on the manipulated slice vs the target (MAE in raw units; oracle "
             "shift = predicted change in the requested direction; target prob. shift = gain in the oracle's "
             "probability of the target class). MSE/SSIM and reversibility L1 compare with the source (brain = "
             "inside the source's foreground); KID = Kernel Inception Distance of oracle features to real test "
             "slices with the target attributes (x 1, unbiased, can be < 0)."]
    if m["synthetic"]:
        lines.append("GT: against the true counterfactual of the phantom; Δ area bias / error = mean signed / absolute "
                     "(measured area change - true measured area change) in mm² (the no-change row gives minus "
                     "the true change).")
    else:
        lines.append("Ground truth: unavailable. This store is not a synthetic cohort, so no slice has a true "
                     "counterfactual; the scores above the GT columns (effectiveness by the oracle, identity, "
                     "reconstruction, composition, reversibility, KID) are what can be measured.")
    for name, proto in m["protocol"].items():
        floor = m["floor"][name]
        main, gt = _columns(floor)
        rows = [(FLOOR, floor, FLOOR_BY_CONSTRUCTION)] + [(k, v[name], v.get("by_construction", ()))
                                                          for k, v in m["methods"].items()]
        lines += ["", f"## {name}: {proto['pairs']} pairs", "", f"Change: {proto['change']}.", ""]
        partial = [f"{k} {v[name]['pairs']}" for k, v in m["methods"].items() if v[name]["pairs"] < proto["pairs"]]
        if partial:
            lines += [f"Pairs scored, of {proto['pairs']}: {', '.join(partial)}. A method that makes only some changes "
                      "is scored on those, and its paired differences use the pairs both sides make.", ""]
        for cols in (main, gt):
            if cols:
                lines += _table(["method"] + [c for c, _ in cols],
                                [[r] + [_cell(s, k, fixed) for _, k in cols] for r, s, fixed in rows]) + [""]
        fd = [(r, s["fd"]) for r, s, _ in rows if s.get("fd") is not None]
        if fd:
            lines += ["Fréchet distance: " + ", ".join(f"{r} {_fmt(v)}" for r, v in fd) + "", ""]
        else:
            lines += [f"Fréchet distance not reported: {floor.get('kid_pairs', 0)} pairs, fewer than {FD_MIN_RATIO}x the "
                      "feature dimension.", ""]
        keys = [(c, k) for c, k in main + gt if k in DIRECTION or k.endswith("bias_mm2")]
        lines += _paired_tables(rows, keys)
    lines += [f"## Unchanged attributes (target = source), n = {m['n']}", ""]
    lines += _table(["method", "reconstruction MSE ↓", f"composition L1 after {REPEATS}× ↓", "vs meandiff (recon., comp.)"],
                    [[k, _cell(v["unchanged"], "reconstruction_mse", v.get("by_construction", ())),
                      _cell(v["unchanged"], "composition_l1", v.get("by_construction", ())),
                      ", ".join(_diff_cell(v["unchanged"]["vs"]["meandiff"].get(x)) for x in ("reconstruction_mse", "composition_l1"))
                      if "meandiff" in v["unchanged"].get("vs", {}) else "–"] for k, v in m["methods"].items()])
    if m.get("oracle_test"):
        o = m["oracle_test"]
        lines += ["", f"## The oracle on this store's test split ({o['n']} slices, {o['subjects']} subjects)", ""]
        from models.oracle import describe_metrics
        lines += [f"- {line}" for line in describe_metrics(o, _cell)]
    if m.get("figures"):
        lines += ["", "## Trajectories", ""]
        for f in m["figures"]:
            lines += [f"![{f['file']}]({f['file']})", "", f"{f['file']}: {f['caption']}.", ""]
    if m.get("followup"):
        lines += [""] + followup_markdown(m["followup"])
    return "\n".join(lines) + "\n"
