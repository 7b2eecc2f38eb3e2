"""How much of a longitudinal run's change is denoising: the change it applies at dt = 0.5, 2 and +-10 years on
seeded test slices of a synthetic store, against the source slice's own scan noise and the true change.

    python tools/longitudinal_noise.py --store data/synthetic.h5 --run runs/longitudinal/synthetic [--volumes 4]

The noise of a stored slice is the slice minus its subject re-rendered at the same visit without noise
(mri.synthetic.render's NOISE_SIGMA set to 0: same anatomy, bias field and plan). Inside the brain, per dt:
mean |change|, the change's correlation with the noise and its least-squares slope on it (centred; a denoiser of the
source reads a negative slope near -1 where it removes all of the noise), and the correlation with the
true change (counterfactual minus source). A rate has |change| proportional to dt and a noise slope that
scales with dt too, while the true change has neither (its noise slope is 0). For a run with the nuisance g
(training's dt-independent term, never applied), g's correlation and slope on the noise.
Reads the truth: a diagnostic of a run, never part of a method.
"""
import argparse
import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def slope(a, b):
    """Least-squares slope of a on b (both centred)."""
    return np.cov(a, b)[0, 1] / np.var(b, ddof=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="data/synthetic.h5")
    p.add_argument("--run", required=True, help="a train_longitudinal.py run directory")
    p.add_argument("--volumes", type=int, default=4, help="test volumes (all their slices; each dt re-renders each)")
    p.add_argument("--dts", default="0.5,2,10,-10", help="age changes in years")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    synthetic = importlib.import_module("mri.synthetic.render")   # the module (the package exports a function render)
    from keras import ops
    from models import longitudinal
    from mri.data.store import SliceStore
    model = longitudinal.from_run(args.run)
    with SliceStore(args.store) as store:
        test = store.indices("test")
        volumes = np.random.default_rng(args.seed).choice(np.unique(store.volume[test]), args.volumes, replace=False)
        idx = test[np.isin(store.volume[test], volumes)]
        x = store.images(idx)
        names = model.schema.names
        src = {a: store.attrs[a][idx] for a in names}
        sigma = synthetic.NOISE_SIGMA
        synthetic.NOISE_SIGMA = 0.0
        try:
            clean = np.array(synthetic.counterfactual(store, idx)["images"])
        finally:
            synthetic.NOISE_SIGMA = sigma
        store._last_counterfactual = None
        noise = x - clean
        inside = x > -0.9
        print(f"{args.run}: {len(idx)} test slices of {args.volumes} volumes; scan noise inside the brain: "
              f"SD {noise[inside].std():.4f}")
        y = ops.convert_to_tensor(model.schema.encode(src))
        fields = model.fields(ops.convert_to_tensor(x[..., None]), y, y)
        if len(fields) == 3:   # the nuisance g of the follow-up prediction (not applied by manipulate)
            g, n = np.asarray(fields[2])[..., 0][inside], noise[inside]
            print(f"nuisance g: mean|g| {np.abs(g).mean():.5f}, corr(g, noise) {np.corrcoef(g, n)[0, 1]:+.3f}, "
                  f"slope on noise {slope(g, n):+.3f}")
        print("dt\tmean|change|\tcorr(change, noise)\tslope on noise\tcorr(change, true change)\tMSE to truth\t"
              "identity's")
        for dt in (float(d) for d in args.dts.split(",")):
            tgt = dict(src, age=src["age"] + dt)
            change = model.manipulate(x[..., None], src, tgt)[..., 0] - x
            truth = np.array(synthetic.counterfactual(store, idx, age=tgt["age"])["images"]) - x
            c, n, t = change[inside], noise[inside], truth[inside]
            print(f"{dt:+g}\t{np.abs(c).mean():.5f}\t{np.corrcoef(c, n)[0, 1]:+.3f}\t{slope(c, n):+.3f}\t"
                  f"{np.corrcoef(c, t)[0, 1]:+.3f}\t{np.mean((c - t) ** 2):.5f}\t{np.mean(t ** 2):.5f}")


if __name__ == "__main__":
    main()
