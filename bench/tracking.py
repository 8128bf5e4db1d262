"""Cost of tracking sharpness during training: SharpnessTracker on a ZSharp run of a CIFAR ResNet-20.

ResNet-20 on synthetic 32x32 images (2,048 by default), ZSharp (base SGD momentum 0.9 or Adam), batch 128:

- ``lambda_max`` + ``masks`` every ``--every`` steps on ``--probe`` fixed probe samples: training wall
  time with tracking / without (target <= 1.10), and the Hessian-vector products per tracking event
  (the first event is a cold start; target about 3 after it), next to a cold Lanczos to the same
  tolerance on the same operator at every event (not counted in the ratio);
- ``update_curvature`` every step on ``--curvature-samples`` probe samples: the same ratio (<= 1.05).

Both trackers ride on one training run; the time of each ``tracker.step`` call and of the training
steps are summed separately, so ratio = 1 + tracker time / training time (machine noise hits both alike;
the machine's load average is printed with the result). To compare two versions of the tracker, run
them at the same time with the same arguments (e.g. one with ``PYTHONPATH`` pointing at the other tree).
``--quick`` shrinks everything for a smoke run; ``--digits`` runs a small CNN on the 8x8 digits (a run that
sharpens progressively, for the warm start's product count).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from sharpscope.analysis.curvature import HessianOperator
from sharpscope.analysis.lanczos import thick_restart_lanczos
from sharpscope.data import load_dataset
from sharpscope.data.synthetic import load_synthetic
from sharpscope.models import build_model
from sharpscope.optim import ZSharp
from sharpscope.track import LambdaMax, SharpnessTracker, UpdateCurvature


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--curvature-samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--digits", action="store_true",
                        help="a small CNN (width 8) on the 8x8 digits instead: fast, sharpens progressively")
    parser.add_argument("--tol", type=float, default=1e-2)
    parser.add_argument("--base", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="512 images, batch 64, 40 steps, every 10, 64 probe samples, 8 for update_curvature")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch, args.steps, args.every, args.probe, args.curvature_samples = 512, 64, 40, 10, 64, 8
    return args


def _optimizer(model: torch.nn.Module, base: str) -> ZSharp:
    if base == "adam":
        return ZSharp(model.named_parameters(), torch.optim.Adam, lr=1e-3)
    return ZSharp(model.named_parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _cold_hvps(model: torch.nn.Module, probe: tuple[torch.Tensor, torch.Tensor], tol: float, seed: int) -> int:
    """Products a random-start Lanczos needs for the same tolerance on the same probe Hessian."""
    with HessianOperator(model, F.cross_entropy, probe) as op:
        v0 = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed))
        return thick_restart_lanczos(op.matvec, v0, tol=tol, max_matvec=100).n_matvec


def main() -> None:
    args = _arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    data = load_dataset("digits") if args.digits else load_synthetic(num_examples=args.images)
    x_all, y_all = data.normalized(data.inputs), data.targets
    model = build_model("cnn", 10, seed=0, in_channels=1, width=8) if args.digits else build_model("resnet20", 10, seed=0)
    opt = _optimizer(model, args.base)
    probe = (x_all[: args.probe], y_all[: args.probe])
    sharp = SharpnessTracker(model, F.cross_entropy, probe, every=args.every,
                             measures=[LambdaMax(tol=args.tol), "masks"])
    curv = SharpnessTracker(model, F.cross_entropy, probe, measures=[UpdateCurvature(samples=args.curvature_samples)])
    gen = torch.Generator().manual_seed(0)
    times = {"train": 0.0, "sharp": 0.0, "curv": 0.0}
    warm, cold = [], []
    model.train()
    for step in range(args.steps):
        i = torch.randint(0, len(x_all), (args.batch,), generator=gen)
        start = time.perf_counter()
        F.cross_entropy(model(x_all[i]), y_all[i]).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x_all[i]), y_all[i]).backward()
        opt.second_step(zero_grad=True)
        times["train"] += time.perf_counter() - start
        for name, tracker in (("sharp", sharp), ("curv", curv)):
            start = time.perf_counter()
            rows = tracker.step(step, optimizer=opt)
            times[name] += time.perf_counter() - start
            for row in rows:
                if row.measure == "lambda_max":
                    warm.append(int(row.values["n_hvp"]))
                    cold.append(_cold_hvps(model, probe, args.tol, seed=step))
                    print(f"step {step:4d}  lambda_max {row.values['value']:9.3f}  residual "
                          f"{row.values['residual']:.1e}  HVPs {warm[-1]:2d} (cold {cold[-1]:2d})", flush=True)
    what = f"CNN on {len(x_all)} digits" if args.digits else f"ResNet-20, {args.images} synthetic images"
    print(f"\n{what}, ZSharp({args.base}), {args.steps} steps of {args.batch}, "
          f"{torch.get_num_threads()} threads; training {times['train']:.1f} s; machine load (1-min average) "
          f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores")
    print(f"lambda_max+masks every {args.every} steps on {args.probe} samples: wall ratio "
          f"{1 + times['sharp'] / times['train']:.3f} (target <= 1.10)")
    if len(warm) > 1:
        print(f"  HVPs per event: first {warm[0]} (cold start), after it mean {statistics.mean(warm[1:]):.1f} "
              f"{warm[1:]}; cold Lanczos at the same events: mean {statistics.mean(cold[1:]):.1f} {cold[1:]}")
    print(f"update_curvature every step on {args.curvature_samples} samples: wall ratio "
          f"{1 + times['curv'] / times['train']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
