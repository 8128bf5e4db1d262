"""Benchmark: cost of a 2-D loss-landscape grid point against one forward pass over the same data.

    python bench/landscape.py                 # 21 x 21 grid, ResNet-20, 256 CIFAR-shaped images, CPU
    python bench/landscape.py --grid 5 --n 64 # a quick check

Prints the wall time per grid point of ``sharpscope.landscape_2d`` divided by the time of one
evaluation pass (forward + loss, eval mode, no grad) over the same data: 1.0 is the floor, the
target is <= 1.2. The grid is timed in blocks of rows with forward passes timed in between (the
median of those is the floor), so that a machine shared with other jobs loads both alike. If the ``loss-landscapes`` package can be imported (it is not a dependency;
e.g. ``pip install --target /tmp/ll --no-deps loss-landscapes`` and ``PYTHONPATH=/tmp/ll``), its
``random_plane`` on the same grid is timed too. Its plane is not Li et al.'s: directions drawn from
U[0, 1), one all-positive, and with an odd number of steps the trained point is not on the grid.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.models import build_model


def forward_floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            float(F.cross_entropy(model(x), y))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--grid", type=int, default=21, help="points per axis")
    parser.add_argument("--n", type=int, default=256, help="number of images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=9, help="forward passes timed for the first floor")
    parser.add_argument("--blocks", type=int, default=7, help="blocks of rows timed between floor timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sharpscope.analysis.landscape import landscape_2d

    torch.manual_seed(0)
    model = build_model(args.model, 10)
    x = torch.randn(args.n, 3, 32, 32)
    y = torch.randint(0, 10, (args.n,))
    points = args.grid**2
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params} parameters, {args.n} images, {args.grid} x {args.grid} grid, "
          f"{torch.get_num_threads()} threads")

    # The machine may be shared: time the grid in blocks of rows with forward passes timed between
    # the blocks, so that the floor and the grid see the same load. Each block is a full
    # landscape_2d call (setup included), which counts against us.
    from sharpscope.analysis.directions import random_directions

    dirs = random_directions(model, 2, seed=0)
    xs = ys = np.linspace(-1, 1, args.grid)
    floors, ours_total, losses = [forward_floor(model, x, y, args.repeats)], 0.0, []
    for block in np.array_split(np.arange(args.grid), min(args.blocks, args.grid)):
        start = time.perf_counter()
        land = landscape_2d(model, F.cross_entropy, (x, y), directions=dirs, x=xs[block], y=ys, progress=False)
        ours_total += time.perf_counter() - start
        losses.append(land.loss)
        floors.append(forward_floor(model, x, y, max(2, args.repeats // 3)))
    ours = ours_total / points
    floor = statistics.median(floors)
    loss = np.concatenate(losses)
    print(f"forward pass (floor): {floor * 1e3:.1f} ms  (median of {len(floors)} interleaved timings, "
          f"range {min(floors) * 1e3:.1f}..{max(floors) * 1e3:.1f})")
    print(f"sharpscope landscape_2d: {ours * 1e3:.1f} ms/point  ratio to floor {ours / floor:.3f}"
          f"  (loss at the centre {loss[args.grid // 2, args.grid // 2]:.3f})")

    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        print("loss-landscapes not importable: comparison skipped")
        return
    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)
    model.eval()
    for normalization in ("filter", "model"):
        start = time.perf_counter()
        try:
            with torch.no_grad():
                loss_landscapes.random_plane(model, metric, distance=1, steps=args.grid,
                                             normalization=normalization, deepcopy_model=True)
        except ZeroDivisionError:
            # its filter normalisation divides by the norm of a direction filter that it has just
            # zeroed when the weight filter is zero (BatchNorm shifts at initialisation)
            print("loss-landscapes random_plane(normalization='filter') fails: ZeroDivisionError; "
                  "timing normalization='model' instead")
            continue
        theirs = (time.perf_counter() - start) / points
        floor = statistics.median([floor, forward_floor(model, x, y, args.repeats)])
        print(f"loss-landscapes random_plane({normalization!r}): {theirs * 1e3:.1f} ms/point  ratio to floor "
              f"{theirs / floor:.3f}  (sharpscope is {theirs / ours:.2f}x faster per point)")
        break


if __name__ == "__main__":
    main()
