"""Choose DFI's step alpha, TV weight and mode on the validation split of a synthetic store (never the test split
evaluate.py scores): mean squared error to the exact counterfactual of age +-10 years, beside meandiff and
identity on the same slices.

    python tools/dfi_settings.py --run runs/dfi/synthetic --n 32 --ks 100,400 --windows 0,1 --alphas 0.5,1 \\
        --tv-weights 0,0.01

For each TV weight, z*(0) and z*(alpha) of the same slices are reconstructed once; decode = z*(alpha),
residual = x + z*(alpha) - z*(0). Prints one row per setting with the share of the feature shift the
reconstruction reached (1 - ||phi(z) - target|| / ||alpha w||) and seconds per reconstructed slice.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a train_dfi.py run directory")
    p.add_argument("--n", type=int, default=32, help="validation slices (middle positions, distinct subjects first)")
    p.add_argument("--ks", default="100")
    p.add_argument("--windows", default="1")
    p.add_argument("--alphas", default="0.5,1,2")
    p.add_argument("--tv-weights", default="0,0.01")
    p.add_argument("--iterations", type=int, default=0, help="0: the run's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from models import baselines, dfi
    from mri import synthetic
    from mri.training import load_config
    from mri.data.store import SliceStore
    config = load_config(args.run)["args"]
    store = SliceStore(config["store"])
    rng = np.random.default_rng(args.seed)
    val = store.indices("val")
    mid = val[np.abs(store.slice[val] - np.median(store.slice[val])) <= 4]
    idx = np.sort(rng.choice(mid, args.n, replace=False))
    x = store.images(idx)[..., None].astype(np.float32)
    src = dict(store.raw(idx), slice=store.slice[idx])
    sign = np.where(np.arange(args.n) % 2 == 0, 10.0, -10.0)
    tgt = dict(src, age=src["age"] + sign)
    truth = synthetic.counterfactual(store, idx, age=tgt["age"])["images"][..., None]

    def gt(y):
        return float(np.mean((y - truth) ** 2))

    meandiff = baselines.MeanDiff.fit(store, attrs=config["attrs"])
    print(f"{args.n} val slices, age +-10: identity GT MSE {gt(x):.5f}, meandiff {gt(meandiff.manipulate(x, src, tgt)):.5f}")
    method = dfi.from_run(args.run)
    if args.iterations:
        method.reconstruct.iterations = args.iterations
    phi = method.reconstruct.features(x)
    print("    k  window  alpha  tv_weight  decode   residual  reached  s/slice")
    for k in (int(v) for v in args.ks.split(",")):
        for window in (int(v) for v in args.windows.split(",")):
            method.k, method.neighbours.window = k, window
            w = method.shift(src, tgt)
            for tv in (float(v) for v in args.tv_weights.split(",")):
                method.reconstruct.tv_weight = tv
                z0 = method.reconstruct(x, phi)
                for alpha in (float(v) for v in args.alphas.split(",")):
                    t = time.perf_counter()
                    za = method.reconstruct(x, phi + alpha * w)
                    dt = (time.perf_counter() - t) / len(x)
                    left = np.linalg.norm(method.reconstruct.features(za) - phi - alpha * w) / np.linalg.norm(alpha * w)
                    print(f"{k:5d}  {window:6d}  {alpha:5g}  {tv:9g}  {gt(za):.5f}  {gt(np.clip(x + za - z0, -1, 1)):.5f}"
                          f"  {1 - left:7.2f}  {dt:.2f}", flush=True)


if __name__ == "__main__":
    main()
