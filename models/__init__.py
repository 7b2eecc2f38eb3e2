"""Methods. Each is a subclassed keras.Model (or a plain object for the baselines) that answers

    manipulate(images, source_attrs, target_attrs) -> images

with images (N, S, S, 1) float32 in [-1, 1] and attributes as dicts of raw values {name: (N,) array}
(years, points, 0/1, class indices), the store's convention. Each method encodes them with its own schema and
ignores keys it does not know (the evaluator also passes "index", the slices' store indices, which only the
`truth` baseline uses).

`load_method(spec, store)` turns an evaluate.py `--methods` item into such an object: a baseline name, or a run
directory whose config.json names its method, optionally followed by `@MODE` for a method with several ways
to manipulate (e.g. `runs/fader/default@residual`).
"""
import importlib
import json
import os

BASELINES = ("identity", "meandiff", "truth")
# method name in a run's config.json -> module in models/ providing `from_run(run_dir)`
RUN_METHODS = {"fader": "models.fader", "cgan": "models.cgan"}


def load_method(spec, store):
    if spec in BASELINES:
        from models import baselines
        return baselines.make(spec, store)
    run_dir, _, mode = spec.partition("@")
    config = os.path.join(run_dir, "config.json")
    if not os.path.exists(config):
        raise FileNotFoundError(f"{run_dir} is neither a baseline {BASELINES} nor a run directory with config.json")
    with open(config) as f:
        method = json.load(f)["method"]
    if method not in RUN_METHODS:
        raise ValueError(f"{config}: unknown method {method!r}; known: {sorted(RUN_METHODS)}")
    module = importlib.import_module(RUN_METHODS[method])
    return module.from_run(run_dir, mode=mode) if mode else module.from_run(run_dir)
