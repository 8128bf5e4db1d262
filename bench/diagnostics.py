"""Cost of the ZSharp diagnostics on ResNet-20 with CIFAR-shaped images (CPU by default).

Each pass is put next to the floor it cannot beat: one gradient pass over the same
data (forward + backward of every batch, eval mode). Printed:

* ``gradient_zscores`` per batch and with ``full_data=True``: time / gradient pass (limit ~1);
* ``mask_statistics``: time / gradient pass (the filter runs three times per batch: the masks and
  ZSharp's ascent under both perturbation readings);
* ``perturbation_alignment``: time, split into the Lanczos top-k eigenvectors and the rest (one
  gradient, one Hessian-vector product per method, two loss evaluations per method), in gradient passes.

    python bench/diagnostics.py                 # ResNet-20, 1,024 images in batches of 128, k = 2
    python bench/diagnostics.py --quick         # 256 images, k = 1: checks that it all runs
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from sharpscope.analysis.gradients import gradient_zscores
from sharpscope.analysis.hessian import hessian_eigenvalues
from sharpscope.analysis.masks import mask_statistics, perturbation_alignment
from sharpscope.models.resnet_cifar import CifarResNet


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def gradient_pass(model: nn.Module, loss_fn, batches) -> None:
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for x, y in batches:
        torch.autograd.grad(loss_fn(model(x), y), params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=2, help="top eigenvectors for the alignment")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timings of the cheap passes (minimum kept)")
    parser.add_argument("--quick", action="store_true", help="256 images, k = 1")
    args = parser.parse_args()
    if args.quick:
        args.images, args.k, args.repeat = 256, 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = CifarResNet(depth=20, num_classes=10)
    x = torch.randn(args.images, 3, 32, 32)
    y = torch.randint(0, 10, (args.images,))
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, args.images, args.batch_size)]
    # Running statistics of these images, so that eval mode is a sensible network (not exploding).
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()
        for xb, _ in batches:
            model(xb)
    model.eval()
    loss_fn = nn.functional.cross_entropy
    print(f"ResNet-20 ({sum(p.numel() for p in model.parameters()):,} parameters), {args.images} images in "
          f"{len(batches)} batches of {args.batch_size}, {args.threads} threads, CPU")

    gradient_pass(model, loss_fn, batches[:1])  # warm-up
    # The cheap passes are timed args.repeat times, interleaved, and the minimum kept: on a shared
    # machine the minimum is the least disturbed run of each.
    passes = {
        "gradient pass (floor)": lambda: gradient_pass(model, loss_fn, batches),
        "gradient_zscores (per batch)": lambda: gradient_zscores(model, loss_fn, batches, progress=False),
        "gradient_zscores (full data)": lambda: gradient_zscores(model, loss_fn, batches, full_data=True,
                                                                 progress=False),
        "mask_statistics": lambda: mask_statistics(model, loss_fn, batches, progress=False),
    }
    best = {name: float("inf") for name in passes}
    results = {}
    for _ in range(args.repeat):
        for name, fn in passes.items():
            seconds, results[name] = _timed(fn)
            best[name] = min(best[name], seconds)
    t_grad = best["gradient pass (floor)"]
    for name, seconds in best.items():
        print(f"  {name:32s} {seconds:7.2f} s   ratio {seconds / t_grad:5.2f} x gradient pass")
    masks = results["mask_statistics"]
    t_eig, eigen = _timed(lambda: hessian_eigenvalues(model, loss_fn, batches, k=args.k, seed=args.seed,
                                                      max_iter=200, progress=False))
    print(f"  {f'top-{args.k} eigenvectors (Lanczos)':32s} {t_eig:7.2f} s   ratio {t_eig / t_grad:5.2f} x gradient "
          f"pass ({eigen.n_hvp} HVPs)")
    t_a, align = _timed(lambda: perturbation_alignment(model, loss_fn, batches, k=args.k, eigen=eigen,
                                                       progress=False))
    print(f"  {'perturbation_alignment (rest)':32s} {t_a:7.2f} s   ratio {t_a / t_grad:5.2f} x gradient pass "
          f"({len(align.methods)} methods: 1 gradient + 1 HVP and 1 loss pass each)")
    print(f"  {'alignment total':32s} {t_eig + t_a:7.2f} s   ratio {(t_eig + t_a) / t_grad:5.2f} x gradient pass")
    print()
    print(f"mean kept fraction {masks['kept_fraction'].mean():.4f}, total ||e|| tensor reading "
          f"{masks.attrs['total_perturbation_norm_tensor']:.4f} vs global {masks.attrs['total_perturbation_norm_global']:.4f}")
    print(align.to_dataframe().to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
