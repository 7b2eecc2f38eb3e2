"""Throughput of one full training iteration of a method, and how close it gets to the machine's matmul speed.

    python bench/train_step.py --method fader [--batch-size 32 --size 128 --repeats 7 --clf off|on|both]
    python bench/train_step.py --method vagan [--n-filters 16]
    python bench/train_step.py --method cyclegan [--n-filters 64]
    python bench/train_step.py --method infogan [--n-filters 32]

Prints the machine, the fp32 matmul speed measured in this process (4096x4096 tf.matmul in a tf.function,
median of 7) and, per configuration, images/s of the compiled train step (Keras' own train function, the one
Model.fit runs, on an in-memory batch: no loader), the median and the best of --repeats timed runs of
--iterations iterations after warm-up, and the iteration's FLOPs with the fraction of the matmul speed they
reach at the median. FLOPs are counted analytically, per layer and per image, from the built Keras models
(`forward_flops`), then per network by what the iteration does with it: 3x forward for a network trained on
its weights (backward ~ 2x forward), 2x for one only back-propagated through (a discriminator in the
generator's loss), 1x for inference. Elementwise ops (BatchNorm, activations, Adam) are not counted.

A method joins with a builder in BUILDERS: args -> [(label, compiled model, (x, y) batch, FLOPs per image)].
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    import tensorflow as tf
    return (f"{os.cpu_count()} cores, {model}, TensorFlow {tf.__version__}, "
            f"load average {os.getloadavg()[0]:.2f} (other processes share these cores)")


def matmul_gflops(n=4096, repeats=7):
    import tensorflow as tf
    a, b = tf.random.normal((n, n)), tf.random.normal((n, n))
    f = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    f(a, b).numpy()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).numpy()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / np.median(times) / 1e9


def forward_flops(net):
    """Multiply-adds x 2 of one image through `net` (a built functional keras.Model): Conv2D
    2*H_out*W_out*k*k*C_in*C_out; Conv2DTranspose 2*H_in*W_in*k*k*C_in*C_out (each input pixel scatters a
    k x k x C_out patch); Dense 2*C_in*C_out."""
    import keras
    total = 0
    for layer in net.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            h, w, c_in = layer.input.shape[1:]
            total += 2 * h * w * np.prod(layer.kernel_size) * c_in * layer.filters
        elif isinstance(layer, keras.layers.Conv2D):
            h, w, c_out = layer.output.shape[1:]
            total += 2 * h * w * np.prod(layer.kernel_size) * layer.input.shape[-1] * c_out
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def fader(args):
    """Fader Networks at the default architecture: latent-discriminator step + autoencoder step, with the
    classifier discriminator off and/or on (its step, and the flipped decode it classifies)."""
    from models import fader
    schema, x, y = example_batch(args)
    out = []
    for clf in {"off": [False], "on": [True], "both": [False, True]}[args.clf]:
        config = dict(size=args.size, tiny=False, n_layers=0, n_filters=args.n_filters, max_filters=512, hidden=512,
                      dropout=0.3, lat_dropout=0.3, lambda_lat=1e-4, lambda_clf=1e-4 if clf else 0.0,
                      lambda_ramp_steps=5000, seed=0, lr=2e-4, clip_grad_norm=5.0, jit=args.jit)
        model = fader.compile_from_args(fader.from_args(config, schema), config)
        e, d, lat = (forward_flops(n) for n in (model.encoder, model.decoder, model.lat_dis))
        flops = 3 * e + 3 * d + 3 * lat + 2 * lat   # E, D trained; P_lat trained, then back-propagated through
        if clf:
            c = forward_flops(model.classifier)
            flops += 3 * c + 3 * d + 2 * c          # C trained; the flipped decode; C back-propagated through
        out.append((f"classifier {'on' if clf else 'off'}", model, (x, y), flops))
    return out


def example_batch(args):
    """A schema with every attribute kind (age continuous, dx categorical, sex binary) and a random batch."""
    from mri.data.attributes import Attribute, Schema
    schema = Schema([Attribute("age", "continuous").fit(np.linspace(55, 90, 200)),
                     Attribute("dx", "categorical", ["CN", "MCI", "Dementia"]), Attribute("sex", "binary", ["F", "M"])])
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch_size, args.size, args.size, 1)).astype(np.float32)
    y = schema.encode({"age": rng.uniform(55, 90, args.batch_size), "dx": rng.integers(0, 3, args.batch_size),
                       "sex": rng.integers(0, 2, args.batch_size)})
    return schema, x, y


def cgan(args):
    """cGAN / IcGAN at train_cgan's defaults (z 100, 64..1024 maps), one model per phase: the GAN step and the
    encoder step."""
    from models import cgan as method
    schema, x, y = example_batch(args)
    config = dict(size=args.size, z_dim=100, filters=64, tiny=False, laplacian=False, wrong="real", seed=0, lr=1e-4,
                  jit=args.jit)
    out = []
    for phase, label in enumerate(("GAN step", "encoder step")):
        model = method.compile_from_args(method.from_args(config, schema, train_y=y), config)
        model.phase.assign(phase)
        g, d, ez, ey = (forward_flops(n) for n in (model.generator, model.discriminator, model.encoder_z,
                                                   model.encoder_y))
        # GAN: G makes D's fakes (1x), D trained on real/right, real/wrong, fake/right (3 x 3x), then G trained
        # (3x) through D (2x). Encoders: G inference (1x), E_z and E_y trained (3x each).
        flops = 4 * g + 11 * d if phase == 0 else g + 3 * ez + 3 * ey
        out.append((label, model, (x, y), flops))
    return out


def vagan(args):
    """VA-GAN at train_vagan's defaults (U-Net 16..128, conditional critic 16..256, a default-size oracle as the
    frozen regressor): one generator iteration with its 5 critic steps (the schedule's steady state), each step
    on its own draw of source slices and real partners (6 draws, as mri/data/loader.CriticDraws feeds it)."""
    from models import oracle, vagan as method
    schema, x, y = example_batch(args)
    regressor = (oracle.build(schema, args.size), schema)
    model = method.VAGAN(schema, args.size, args.n_filters, regressor, n_critic=5, n_critic_long=5)
    method.compile_from_args(model, dict(lr=1e-4, jit=args.jit))
    g, d, r = (forward_flops(n) for n in (model.generator, model.critic, regressor[0]))
    rolled = lambda a, k: np.roll(a, k, axis=0)
    images = np.stack([np.concatenate([rolled(x, k), rolled(x, k + 1)], -1) for k in range(6)])
    attrs = np.stack([np.concatenate([rolled(y, k), rolled(y, k + 1)], -1) for k in range(6)])
    # per critic step: G forward (1x), D trained on real partners and changed slices (2 x 3x), the gradient
    # penalty (D forward, its input gradient and that gradient's back-propagation: ~5x); then G trained (3x)
    # through D and the regressor (2x each)
    return [("generator iteration (5 critic steps)", model, (images, attrs), 5 * (g + 11 * d) + 3 * g + 2 * d + 2 * r)]


def cyclegan(args):
    """CycleGAN at train_cyclegan's defaults (ResNet generator with 6 blocks, 70x70 PatchGAN, pools of 50): one
    iteration, both generators then both discriminators, on --batch-size / 2 slices of each domain."""
    from models import cyclegan as method
    from mri.data.loader import parse_domains
    schema, x, y = example_batch(args)
    model = method.CycleGAN(schema, parse_domains("dx=CN:Dementia", schema), args.size, args.n_filters)
    method.compile_from_args(model, dict(lr=2e-4, constant_epochs=1, decay_epochs=1, jit=args.jit), 100)
    g, d = forward_flops(model.g_ab), forward_flops(model.d_a)
    # per pair of slices (a, b): six generator passes, all trained (G_AB a, G_BA b, the two identity passes and
    # the two cycle passes, 3x each); D_A and D_B back-propagated through in the generators' loss (2x each),
    # then trained on a real and a pooled generated slice each (4 x 3x); per slice, half of that
    return [(f"iteration, {args.batch_size // 2} of each domain", model, (x, y), (18 * g + 16 * d) // 2)]


def infogan(args):
    """InfoGAN at train_infogan's defaults (z 62, a 3-valued categorical and 2 continuous codes, trunk 32..256
    maps and a 1024-unit layer), one model per phase: the GAN step and the encoder step."""
    from models import infogan as method
    schema, x, y = example_batch(args)
    config = dict(size=args.size, z_dim=62, cat_dim=0, cont_dim=2, filters=args.n_filters, hidden=1024, tiny=False,
                  lambda_cat=1.0, lambda_cont=0.1, seed=0, lr_g=1e-3, lr_d=2e-4, jit=args.jit)
    out = []
    for phase, label in enumerate(("GAN step", "encoder step")):
        model = method.compile_from_args(method.from_args(config, schema), config)
        model.phase.assign(phase)
        g, t, q, e = (forward_flops(n) for n in (model.generator, model.trunk, model.q_head, model.encoder_z))
        # GAN: G makes D's fakes (1x), T (+D) trained on real and fake (2 x 3x) with Q back-propagated into T on
        # the fakes (L_MI, 2x); then G trained (3x) through T (2x) and Q trained (3x). Encoder: G inference (1x),
        # E_z trained (3x).
        flops = g + 6 * t + 2 * q + 3 * g + 2 * t + 3 * q if phase == 0 else g + 3 * e
        out.append((label, model, (x, y), flops))
    return out


BUILDERS = {"fader": fader, "cgan": cgan, "vagan": vagan, "cyclegan": cyclegan, "infogan": infogan}
FILTERS = {"cyclegan": 64, "infogan": 32}   # --n-filters default per method (else 16)


def images_per_second(model, batch, repeats, iterations, warmup=3):
    """Per timed run of `iterations` train steps: images/s (the loss values are fetched at the end of each)."""
    import tensorflow as tf
    data = iter(tf.data.Dataset.from_tensors(batch).repeat())
    model.make_train_function()
    step = model.train_function
    for _ in range(warmup):
        step(data)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iterations):
            logs = step(data)
        tf.nest.map_structure(lambda v: v.numpy(), logs)
        rates.append(iterations * batch_images(batch) / (time.perf_counter() - t))
    return rates


def batch_images(batch):
    """Images per train step: the batch, or for VA-GAN's draws (k, B, ...) the generator's B."""
    return batch[0].shape[1] if batch[0].ndim == 5 else len(batch[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="fader", choices=sorted(BUILDERS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7, help="timed runs (at least 5); the median is reported")
    p.add_argument("--iterations", type=int, default=3, help="train steps per timed run")
    p.add_argument("--clf", choices=["off", "on", "both"], default="both", help="fader: classifier discriminator")
    p.add_argument("--n-filters", type=int, default=None,
                   help="fader, vagan (default 16), cyclegan (default 64), infogan (default 32): feature maps of "
                        "the first layer")
    p.add_argument("--jit", choices=["auto", "on", "off"], default="auto", help="XLA, as train_*.py --jit")
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be at least 5")
    if args.method == "cyclegan" and args.batch_size % 2:
        p.error("--batch-size must be even for cyclegan: half of it from each domain")
    args.n_filters = args.n_filters or FILTERS.get(args.method, 16)
    print(f"machine: {machine()}")
    peak = matmul_gflops()
    print(f"fp32 matmul 4096x4096 (tf.matmul in a tf.function, median of 7): {peak:.0f} GFLOP/s")
    print(f"{args.method}: batch {args.batch_size}, {args.size}x{args.size}; FLOPs counted analytically per layer "
          "(3x forward when trained, 2x when back-propagated through; elementwise ops not counted)")
    for label, model, batch, flops in BUILDERS[args.method](args):
        rates = images_per_second(model, batch, args.repeats, args.iterations)
        median = float(np.median(rates))
        gflops = flops * args.batch_size / 1e9
        print(f"  {label}: {median:6.1f} img/s median, {max(rates):6.1f} best of {args.repeats} | "
              f"{gflops:.1f} GFLOP/iteration, {flops * median / 1e9:.0f} GFLOP/s = {flops * median / 1e9 / peak:.0%} "
              f"of matmul (best run: {flops * max(rates) / 1e9 / peak:.0%}) | load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
