"""Methods. Each is a subclassed keras.Model (or a plain object for the baselines) that answers

    manipulate(images, source_attrs, target_attrs) -> images

with images (N, S, S, 1) float32 in [-1, 1] and attributes as dicts of raw values {name: (N,) array}
(years, points, 0/1, class indices), the store's convention, plus "slice", the slices' axial positions (what
meandiff and DFI pick their per-position models and neighbours by). Each method encodes the attributes with its
own schema and ignores keys it does not know. That is all a method learns of a slice: the evaluator passes no
store index and no store, so nothing leads back to the slice's true counterfactual; `truth` is the evaluator's
own reference (models/baselines.py), not a method.

`load_method(spec, store)` turns an evaluate.py `--methods` item into such an object: a baseline name, or a run
directory whose config.json names its method, optionally followed by `@MODE` for a method with several ways
to manipulate (e.g. `runs/fader/default@residual`). `store` serves the baselines only (meandiff is fitted on
its train split through a `SplitView`; truth renders from it); a run is loaded from its directory alone.

A method that makes only some changes also answers

    supports(source_attrs, target_attrs) -> (N,) bool

True for each pair it can make (CycleGAN: from one of its two domains into the other). evaluate.py calls its
`manipulate` on those pairs only, scores it on them, reports how many, compares it with the references on the
pairs both make, and leaves the other cells of its trajectory figures blank. A method without `supports` makes
every change. At unchanged attributes (target = source) every method is scored.

evaluate.py (on slices of volumes) and simulate.py wrap every method but truth and identity in `InsideHead`:
outside the source's head grown by HEAD_GROW pixels the output is the source, so no method moves the background.
"""
import importlib
import inspect
import os

import numpy as np

from mri.training import AUXILIARY_ARGS, load_config   # AUXILIARY_ARGS: the arguments that name a helper run

BASELINES = ("identity", "meandiff", "truth")
# method name in a run's config.json -> module in models/ providing `from_run(run_dir)`
RUN_METHODS = {"fader": "models.fader", "cgan": "models.cgan", "vagan": "models.vagan", "dfi": "models.dfi",
               "cyclegan": "models.cyclegan", "infogan": "models.infogan", "longitudinal": "models.longitudinal"}
NOT_RUNS = ("", "imagenet")   # VA-GAN without a regressor, DFI on ImageNet VGG19 weights


def _config(spec):
    run_dir = spec.partition("@")[0]
    config = os.path.join(run_dir, "config.json")
    if not os.path.exists(config):
        raise FileNotFoundError(f"{run_dir} is neither a baseline {BASELINES} nor a run directory with config.json")
    return config, load_config(run_dir)


def auxiliary_runs(spec):
    """{argument: {"path", "weights"}} of the helper networks a method's run was trained with (none for
    baselines): the paths and weight hashes its config.json records, or for a run recorded without them, the
    helper directories as found now (a path that is not found is an error, never skipped)."""
    if spec in BASELINES:
        return {}
    config, c = _config(spec)
    if "helpers" in c:
        return c["helpers"]
    from mri.data.io import weights_hash
    out = {}
    for k in AUXILIARY_ARGS:
        run = c.get("args", {}).get(k)
        if not isinstance(run, str) or run in NOT_RUNS:
            continue
        if not os.path.isdir(run):
            raise FileNotFoundError(f"{config}: its helper --{k} {run} is not found from {os.getcwd()}, so it "
                                    "cannot be checked against the oracle; run evaluate.py from the directory "
                                    "the run was trained in, or give the helper's absolute path in that file")
        out[k] = {"path": os.path.abspath(run), "weights": weights_hash(run)}
    return out


def check_independent(spec, oracle_dir):
    """No method may be judged by its own helper: refuse a run whose auxiliary network has the oracle's
    weights (by content: mri.data.io.weights_hash, so a copy of the oracle's run is refused too) or is its run."""
    from mri.data.io import weights_hash
    helpers = auxiliary_runs(spec)
    oracle = weights_hash(oracle_dir) if helpers else None
    for arg, helper in helpers.items():
        if helper["weights"] == oracle or os.path.realpath(helper["path"]) == os.path.realpath(oracle_dir):
            raise ValueError(f"{spec} was trained with --{arg} {helper['path']}, whose weights are those of the "
                             f"evaluation oracle {oracle_dir}: a method cannot be scored by its own helper network; "
                             "evaluate it with an oracle trained separately (another run of train_oracle.py, "
                             "ideally on another store)")


def load_method(spec, store, attrs=None):
    """A method ready to manipulate images of `store`; `attrs` are the evaluated attributes (meandiff's fit)."""
    if spec in BASELINES:
        from models import baselines
        return baselines.make(spec, store, attrs=attrs)
    run_dir, _, mode = spec.partition("@")
    config, c = _config(spec)
    method = c["method"]
    if method not in RUN_METHODS:
        raise ValueError(f"{config}: unknown method {method!r}; known: {sorted(RUN_METHODS)}")
    module = importlib.import_module(RUN_METHODS[method])
    accepts = inspect.signature(module.from_run).parameters
    if mode and "mode" not in accepts:
        raise ValueError(f"{spec}: a {method} run has no manipulation modes; give the run directory alone")
    return module.from_run(run_dir, **({"mode": mode} if mode else {}))


HEAD_GROW = 3   # pixels the source's head is grown by: atrophy moves the outline inwards, so its rim may change


def head(images, grow=HEAD_GROW):
    """(N, S, S, 1) bool: each image's head, its pixels above the background in any channel (data_prep's 5 %
    threshold, mri.data.tissue.filled_foreground) with the holes filled, grown by `grow` pixels within the slice."""
    from scipy import ndimage
    from mri.data.tissue import filled_foreground
    x = np.asarray(images, np.float32)
    inside = filled_foreground(x.reshape(len(x), *x.shape[1:3], -1).max(-1))
    if grow:
        within_slice = np.zeros((3, 3, 3), bool)
        within_slice[1] = ndimage.generate_binary_structure(2, 1)
        inside = ndimage.binary_dilation(inside, within_slice, iterations=grow)
    return inside[..., None]


def keep_background(images, changed, grow=HEAD_GROW):
    """`changed` inside each source image's grown head (`head`), the source image outside it."""
    x = np.asarray(images, np.float32)
    return np.where(head(x, grow), np.asarray(changed, np.float32).reshape(x.shape), x)


class InsideHead:
    """A method whose changes stay inside the head: its `manipulate` followed by `keep_background`; every other
    attribute is the method's. evaluate.py (on slices of volumes) and simulate.py score and show methods through
    it, so no method moves the background far outside the head; the evaluator's reference (truth) and identity
    are left as they are."""

    def __init__(self, method, grow=HEAD_GROW):
        self.method, self.grow = method, grow

    def manipulate(self, images, source_attrs, target_attrs):
        return keep_background(images, self.method.manipulate(images, source_attrs, target_attrs), self.grow)

    def __getattr__(self, name):
        return getattr(self.method, name)


def inside_head(method, grow=HEAD_GROW):
    """`method` as an InsideHead, except the baselines whose output is no method's change (truth, identity)."""
    from models.baselines import Identity, Truth
    return method if isinstance(method, (Identity, Truth, InsideHead)) else InsideHead(method, grow)


def supported(method, source, target, n):
    """(n,) bool: the changes `method` makes (its `supports`; every change without one)."""
    supports = getattr(method, "supports", None)
    return np.ones(n, bool) if supports is None else np.asarray(supports(source, target), bool).reshape(n)
