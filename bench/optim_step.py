"""Step time of ZSharp against SAM and SGD, and ZSharp's filter against a torch.quantile filter.

On a CIFAR ResNet-20 with a random batch of 128 images (CPU by default), in one run:

- ZSharp / SAM step time (target <= 1.05: both are two forward-backward passes);
- ZSharp / SGD step time (about 2: the price of any SAM-type method);
- the Z-score filter alone (sharpscope.optim.zscore) against a reference filter that takes the
  threshold with torch.quantile, on gradients shaped like ResNet-56's weights (target >= 5x).

Repetitions are interleaved (A, B, C, A, B, C, ...) so that machine noise hits every method alike,
and medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sharpscope.models import build_model
from sharpscope.optim import SAM, ZSharp
from sharpscope.optim.zscore import layer_zscores, zscore_masks


def _train_step(model, opt, x, y, kind):
    loss_fn = nn.functional.cross_entropy
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    if kind == "sgd":
        opt.step()
        return
    opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)


def _reference_filter(grads, percentile):
    """The straightforward filter: per-tensor Z-score, torch.quantile threshold, strict mask."""
    masks = []
    for g in grads:
        abs_z = ((g - g.mean()) / (g.std() + 1e-12)).abs()
        masks.append(abs_z > torch.quantile(abs_z.reshape(-1), percentile))
    return masks


def _same_mask(g, ours, ref_mask) -> bool:
    """Equal masks, except possibly at entries within rounding distance of the threshold (torch.quantile's
    last bits vary between torch versions; see sharpscope.optim.zscore.selection_quantile)."""
    near = (layer_zscores(g).abs() - ours.threshold).abs() <= 1e-5 * ours.threshold.abs()
    return not bool(((ours.mask != ref_mask) & ~near).any())


def _interleaved(fns: dict, repeats: int, sync) -> dict:
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions and a small batch (smoke test)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--batch", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 15, quick 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: stable timings on a shared machine; 0 leaves torch's default)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    batch = 16 if args.quick else args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    setups = {}
    for kind in ("sgd", "sam", "zsharp"):
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10).to(device).train()
        sgd_kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
        if kind == "sgd":
            opt = torch.optim.SGD(model.parameters(), **sgd_kwargs)
        elif kind == "sam":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd_kwargs)
        else:
            opt = ZSharp(model.named_parameters(), torch.optim.SGD, rho=0.05, percentile=0.95, **sgd_kwargs)
        setups[kind] = (model, opt)
    for kind, (model, opt) in setups.items():  # warm-up
        _train_step(model, opt, x, y, kind)
    steps = _interleaved(
        {kind: (lambda m=m, o=o, k=kind: _train_step(m, o, x, y, k)) for kind, (m, o) in setups.items()},
        repeats,
        sync,
    )

    resnet56 = build_model("resnet56", num_classes=10)
    grads = [torch.randn_like(p, device=device) for p in resnet56.parameters() if p.ndim > 1]
    ours = zscore_masks(grads, 0.95)
    ref = _reference_filter(grads, 0.95)
    assert all(_same_mask(g, a, b) for g, a, b in zip(grads, ours, ref)), "filters disagree"
    filters = _interleaved(
        {
            "ours": lambda: zscore_masks(grads, 0.95),
            "quantile": lambda: _reference_filter(grads, 0.95),
        },
        repeats * 2,
        sync,
    )

    n_params = sum(p.numel() for p in setups["sgd"][0].parameters())
    n56 = sum(g.numel() for g in grads)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {batch}, {repeats} interleaved repeats")
    print(f"ResNet-20 ({n_params / 1e6:.2f}M params) median step: SGD {steps['sgd'] * 1e3:.1f} ms, "
          f"SAM {steps['sam'] * 1e3:.1f} ms, ZSharp {steps['zsharp'] * 1e3:.1f} ms")
    print(f"ZSharp / SAM step time: {steps['zsharp'] / steps['sam']:.3f}  (target <= 1.05)")
    print(f"ZSharp / SGD step time: {steps['zsharp'] / steps['sgd']:.3f}")
    print(f"filter on ResNet-56 weight gradients ({len(grads)} tensors, {n56 / 1e6:.2f}M entries): "
          f"ours {filters['ours'] * 1e3:.2f} ms, torch.quantile reference {filters['quantile'] * 1e3:.2f} ms")
    print(f"filter speed-up vs torch.quantile: {filters['quantile'] / filters['ours']:.2f}x  (target >= 5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
