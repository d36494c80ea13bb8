"""ms per training step of each backend, non-private and DP, on the default CXR model and batch: ResNet-9 (GroupNorm,
Mish), width 32, 1x64x64 inputs, batch 64, 5 labels, NAdam.

    python benchmarks/backends.py                 # both backends
    python benchmarks/backends.py --steps 10 --backends tf

A step is what each backend's training does per batch. opacus: zero_grad, forward, backward, NAdam step; under
DP through Opacus' PrivacyEngine (per-sample gradients by hooks, the backend's default ``--clipping``), noise
multiplier 1, C = 1. tf: the backend's ``PlainStep`` and ``DPStep`` (per-example gradients by
``tf.vectorized_map``, TF-Privacy's Gaussian sum query, NAdam), same settings. Every step sees a full batch of
64 (under Poisson sampling that is the expected size). The four runners take turns in rounds, so that a change in
the machine's load hits them alike; each line is the median of ``--steps`` timed steps after ``--warmup`` untimed
ones (which include tracing for tf), with the DP / non-DP ratio:

    opacus   non-dp    95.2 ms/step   dp   230.1 ms/step   ratio 2.42x
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np


def opacus_runners(x: np.ndarray, y: np.ndarray, args) -> tuple[dict, str]:
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from privaudit.backends.opacus_backend import masked_bce
    from privaudit.backends.torch_models import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    out = {}
    for mode in ("non-dp", "dp"):
        torch.manual_seed(0)
        model = create_model("resnet9-gn", in_channels=1, num_classes=y.shape[1], width=args.width,
                             spatial_dims=2).to(device)
        opt = torch.optim.NAdam(model.parameters(), lr=1e-3)
        if mode == "dp":
            loader = DataLoader(TensorDataset(xt.cpu(), yt.cpu()), batch_size=len(x))
            model, opt, _ = PrivacyEngine(accountant="prv").make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                poisson_sampling=False)  # fixed batches for timing; training uses Poisson sampling
        model.train()

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            (masked_bce(model(xt), yt).sum() / len(xt)).backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        out[mode] = step
    return out, f"{device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def tf_runners(x: np.ndarray, y: np.ndarray, args) -> tuple[dict, str]:
    import privaudit  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
    from privaudit.backends._tf_env import import_keras, import_tf
    from privaudit.backends._device import pick_device
    from privaudit.backends.tf_backend import DPStep, PlainStep, make_optimizer, to_channels_last
    from privaudit.backends.tf_models import create_model

    tf, keras = import_tf(), import_keras()
    device = pick_device("auto", framework="tf")
    xt, yt = tf.constant(to_channels_last(x)), tf.constant(y)
    out = {}
    for mode in ("non-dp", "dp"):
        with tf.device(device):
            keras.utils.set_random_seed(0)
            model = create_model("resnet9-gn", in_channels=1, num_classes=y.shape[1], width=args.width,
                                 spatial_dims=2, size=x.shape[-1])
            if mode == "dp":
                runner = DPStep(model, make_optimizer(1e-3), l2_norm_clip=1.0, noise_multiplier=1.0,
                                expected_batch_size=float(len(x)), physical_batch_size=len(x))
            else:
                runner = PlainStep(model, make_optimizer(1e-3))

        def step(runner=runner):
            with tf.device(device):
                runner(xt, yt)

        out[mode] = step
    return out, f"{device}, tensorflow {tf.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4, help="the timed steps are split into this many rounds")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backends", default="opacus,tf")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and backward-hook notes
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, args.size, args.size), dtype=np.float32)
    y = (rng.random((args.batch, 5)) < 0.3).astype(np.float32)
    runners, devices = {}, {}
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        steps, devices[name] = {"opacus": opacus_runners, "tf": tf_runners}[name](x, y, args)
        runners.update({(name, mode): fn for mode, fn in steps.items()})
    for fn in runners.values():  # warm-up (tf: tracing and graph optimisation)
        for _ in range(args.warmup):
            fn()
    # Interleaved rounds, so that a change in the machine's load hits every backend and mode alike.
    times = {k: [] for k in runners}
    per_round = -(-args.steps // args.rounds)
    for _ in range(args.rounds):
        for key, fn in runners.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in devices:
        nd, dp = med[(name, "non-dp")], med[(name, "dp")]
        print(f"{name:<8} non-dp {nd:7.1f} ms/step   dp {dp:7.1f} ms/step   ratio {dp / nd:.2f}x   ({devices[name]})",
              flush=True)
    print(f"# resnet9-gn 2D, width {args.width}, input 1x{args.size}x{args.size}, batch {args.batch}; median of "
          f"{per_round * args.rounds} steps after {args.warmup} warm-up, {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
