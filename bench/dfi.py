"""Seconds per reconstructed 128x128 slice of DFI's L-BFGS (models/dfi.py), single and batched, and the fraction of
the machine's matmul speed that the feature network's passes reach.

    python bench/dfi.py --features store --iterations 150 --batches 1,16,64
    python bench/dfi.py --features imagenet --iterations 10 --batches 1,8      # ~35 GFLOP per slice-iteration

`store`: the oracle-style network train_dfi.py uses with --features RUN (random weights of the same shapes);
`imagenet`: VGG19 to conv5_1 with random weights (the shapes of --features imagenet). The target features are
the slice's own plus a random shift, so the optimiser really moves. One L-BFGS iteration is at least one
forward and one input-gradient pass of the network (2 forward FLOPs: the weights' gradients are not
computed), and line searches add evaluations: FLOPs are counted per evaluation (mean per slice). Also printed:
the share of the feature shift realised, 1 - ||phi(z*) - target|| / ||target - phi(x)|| (mean over the batch),
and the largest pixel difference between the first slice reconstructed in the batch and alone (each slice is its
own optimisation, so 0).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.train_step import forward_flops, machine, matmul_gflops  # noqa: E402


def networks(kind, size):
    from models import feature_networks, oracle
    from mri.data.attributes import Attribute, Schema
    out = {}
    if kind in ("store", "both"):
        schema = Schema([Attribute("age", "continuous").fit(np.linspace(55, 90, 10))])
        model = oracle.build(schema, size)
        levels = [l.name for l in model.layers if l.name.endswith("_relu1")][-3:]
        import keras
        out["store-trained (oracle-style)"] = keras.Model(model.input, [model.get_layer(n).output for n in levels])
    if kind in ("imagenet", "both"):
        out["VGG19 to conv5_1"] = feature_networks.imagenet_features(size, None)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", choices=["store", "imagenet", "both"], default="both")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--batches", default="1,16,64", help="slices per L-BFGS call")
    p.add_argument("--at", type=int, default=150, help="also report seconds per slice scaled to this many iterations")
    p.add_argument("--tv-weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from models import dfi
    print(machine())
    peak = matmul_gflops()
    print(f"fp32 matmul: {peak:.0f} GFLOP/s; {args.iterations} L-BFGS iterations per call")
    rng = np.random.default_rng(args.seed)
    for name, net in networks(args.features, args.size).items():
        flops = forward_flops(net) + sum(forward_flops(l) for l in net.layers if hasattr(l, "layers"))
        print(f"\n{name}: {flops / 1e9:.3f} GFLOP forward per slice")
        print(f"batch  s/slice  s/slice at {args.at} it.  iterations  evaluations  GFLOP/s  of matmul  "
              "shift realised  max |batched - alone|")
        batches = [int(v) for v in args.batches.split(",")]
        x = np.clip(rng.normal(0, 0.5, (max(batches), args.size, args.size, 1)), -1, 1).astype(np.float32)
        rec = dfi.Reconstructor(net, args.tv_weight, 2.0, iterations=2)
        phi = rec.features(x)
        target = phi + rng.normal(0, 0.1, phi.shape).astype(np.float32) * phi.std()
        rec(x[:2], target[:2])                                  # trace the function once
        rec.iterations, alone = args.iterations, None
        for b in batches:
            t = time.perf_counter()
            z = rec(x[:b], target[:b])
            dt = time.perf_counter() - t
            info = rec.last_result
            if alone is None:
                alone = z if b == 1 else rec(x[:1], target[:1])
            nit, nfev = info["iterations"].mean(), info["evaluations"].mean()
            rate = 2 * flops * b * nfev / dt / 1e9
            realised = 1 - np.linalg.norm(rec.features(z) - target[:b], axis=1) / np.linalg.norm(target[:b] - phi[:b], axis=1)
            print(f"{b:5d}  {dt / b:7.2f}  {dt / b / max(nit, 1) * args.at:16.2f}  {nit:10.0f}  {nfev:11.1f}  "
                  f"{rate:7.1f}  {rate / peak:8.0%}  {realised.mean():14.3f}  {np.abs(z[0] - alone[0]).max():.3g}",
                  flush=True)

if __name__ == "__main__":
    main()
