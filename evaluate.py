"""Score methods alike on the test split: effectiveness, identity, composition, reversibility, realism and
(synthetic stores) ground truth; draws attribute trajectories.

    python evaluate.py --store data/synthetic.h5 --oracle runs/oracle \\
        --methods identity,meandiff,truth,runs/fader/default --out reports/default

Writes <out>/metrics.json, <out>/report.md and trajectory PNGs (sample sizes in their names and captions).

    python evaluate.py --followup --store data/synthetic.h5 \\
        --methods identity,meandiff,truth,runs/fader/default --out reports/followup

--followup scores the follow-up protocol instead (evaluation/followup.py; no oracle needed): for each test
subject with two or more visits, every earlier visit's slice is turned into a later visit's attributes and
scored against the real later slice at the same axial index (MSE and SSIM, whole and brain; the correlation of
the predicted with the observed change inside the brain), with subject-level intervals and paired differences
to identity and meandiff. Any store whose test subjects have follow-up visits (ADNI included); on synthetic
stores also a re-scan noise floor and the same pairs against the true counterfactual. --n caps the pairs of
slices; metrics.json's key "followup", a "Follow-up" section in report.md.
"""
import argparse
import os

from mri import runtime
from mri.data.io import atomic_path, exit_on, write_json
from mri.data.store import SliceStore, StoreError
from mri.training import add_verbose_arg


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="HDF5 slice store (its test split is evaluated)")
    p.add_argument("--oracle",
                   help="run directory of train_oracle.py; it may be trained on another store with the same "
                        "attributes and image size (recommended: one that shares no subjects with the methods); "
                        "required except with --followup, which does not use it")
    p.add_argument("--followup", action="store_true",
                   help="score the follow-up protocol instead: earlier visits turned into later visits' attributes "
                        "against the real later slices (test subjects with two or more visits)")
    p.add_argument("--attrs", default="",
                   help="comma-separated attributes to change and score (default: all the oracle predicts); "
                        "meandiff is fitted on them")
    p.add_argument("--methods", default="identity,meandiff",
                   help="comma-separated baselines (identity, meandiff, truth) and run directories")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--n", type=int, default=512, help="test slices sampled (--followup: pairs of slices)")
    p.add_argument("--subjects", type=int, default=4, help="test subjects (rows) in the trajectory figures")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of test subjects for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the sample, the changes, the bootstrap and the figures' subjects")
    add_verbose_arg(p)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.attrs = [a for a in args.attrs.split(",") if a]
    if not args.followup and not args.oracle:
        p.error("give --oracle (a train_oracle.py run), or --followup for the follow-up protocol, which needs none")
    if not args.methods or args.n < 2 or args.bootstrap < 100:
        p.error("give at least one method in --methods, --n >= 2 and --bootstrap >= 100")
    return args


def main(argv=None):
    args = parse_args(argv)
    runtime.start(argv)
    import keras
    from models import check_independent, load_method
    from models.baselines import make
    from models.oracle import load_oracle
    from mri.synthetic import is_synthetic
    import evaluation
    keras.utils.set_random_seed(args.seed)
    if args.followup:
        return followup(args)
    with exit_on(StoreError, FileNotFoundError, KeyError, ValueError):
        store = SliceStore(args.store)
        oracle = load_oracle(args.oracle)
        attrs = args.attrs or oracle.schema.names
        evaluation.check_oracle(store, oracle, attrs)
        for spec in args.methods:
            check_independent(spec, args.oracle)
        methods = inside_head({spec: load_method(spec, store, attrs=attrs) for spec in args.methods}, store)
        truth = make("truth", store) if is_synthetic(store) else None
        if truth is None:
            print(f"{store.path} is not a synthetic store: ground truth is unavailable; scoring effectiveness, "
                  "identity, reconstruction, composition, reversibility and KID")
        metrics = evaluation.evaluate(store, oracle, methods, args.n, args.seed, args.batch_size, attrs, args.bootstrap)
    metrics["oracle"] = args.oracle
    metrics["background_kept_beyond_px"] = background_kept(store)
    changes = [evaluation.change_for(store.schema[a]) for a in attrs]
    metrics["figures"] = evaluation.draw_trajectories(store, methods, changes, args.out, args.seed, args.subjects, truth)
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    with atomic_path(os.path.join(args.out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(evaluation.report_markdown(metrics, f"Evaluation of {', '.join(methods)}"))
    print(f"wrote {os.path.abspath(args.out)}/report.md")


def background_kept(store):
    """Pixels by which the source's head is grown before the background beyond it is kept (models.InsideHead),
    or None on a 2D image dataset (photographs have no background)."""
    from models import HEAD_GROW
    from mri.data.pipeline import IMAGE_PRESETS
    return None if store.provenance.get("preset") in IMAGE_PRESETS else HEAD_GROW


def inside_head(methods, store):
    """{spec: method} with every method's background kept (models.inside_head), except on 2D image datasets."""
    import models
    return methods if background_kept(store) is None else {k: models.inside_head(m) for k, m in methods.items()}


def followup(args):
    from models import load_method
    import evaluation
    with exit_on(StoreError, FileNotFoundError, KeyError, ValueError):
        store = SliceStore(args.store)
        attrs = args.attrs or store.schema.names
        missing = [a for a in attrs if a not in store.schema.names]
        if missing:
            raise ValueError(f"--attrs {missing} are not in {store.path} ({store.schema.names})")
        methods = inside_head({spec: load_method(spec, store, attrs=attrs) for spec in args.methods}, store)
        result = evaluation.evaluate_followup(store, methods, args.n, args.seed, args.batch_size, attrs,
                                              args.bootstrap)
    metrics = {"followup": result, "background_kept_beyond_px": background_kept(store)}
    write_json(os.path.join(args.out, "metrics.json"), metrics)
    with atomic_path(os.path.join(args.out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(evaluation.report_markdown(metrics, f"Follow-up evaluation of {', '.join(methods)}"))
    print(f"wrote {os.path.abspath(args.out)}/report.md")


if __name__ == "__main__":
    main()
