"""Benchmark: the data-parallel analyses (and a DDP ZSharp step) on 1 vs 2 gloo processes, one thread each.

    python bench/distributed.py            # ResNet-20, 2,048 CIFAR-shaped images, 21 x 21 landscape
    python bench/distributed.py --quick    # 128 images, 3 x 3 landscape, shorter Lanczos: minutes on a CPU

For each world size (1, then 2 processes started with ``torch.multiprocessing.spawn`` and a gloo group on
this machine; every process pinned to one thread) it times, on the same seeded random images:

* one full-data Hessian-vector product (``HessianOperator.matvec``, the data split over the ranks);
* Lanczos top-5 (``hessian_eigenvalues(k=5)`` with a fixed budget of ``--lanczos-hvps`` products);
* a ``--grid`` x ``--grid`` landscape (``landscape_2d``, the points split over the ranks);
* one ZSharp training step (``sharpscope.train.fit`` for one epoch under DDP, wall time / steps; it
  includes the epoch's fixed costs), when DDP training can run here;

and the bytes every rank hands to ``all_reduce`` per HVP (counted by wrapping
``torch.distributed.all_reduce``: ``(dim + 1)`` numbers; a ring all-reduce then sends and receives about
``2 (N - 1) / N`` times that per rank). A DDP step all-reduces the gradient once per backward outside
``no_sync`` (ZSharp with ``--ascent local``: once per step, ``dim`` float32 numbers, in buckets). It prints
one table with the speed-up ratios ``t(1) / t(2)``, and the CPU time of rank 0 for the same work
(``time.process_time``): on a machine shared with other jobs the wall-time ratio shows the contention,
the CPU-time ratio how the work itself was divided.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from sharpscope import distributed as dist

#: CPU seconds of this process (rank 0) per measurement: immune to other jobs sharing the cores.
_CPU: dict[str, float] = {}


def _data(n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def _model() -> torch.nn.Module:
    from sharpscope.models import build_model

    return build_model("resnet20", 10, seed=0).eval()


def _timed_hvp(model: torch.nn.Module, batches: list, repeats: int) -> tuple[float, int, int]:
    """Seconds per HVP, parameters, bytes handed to all_reduce per HVP."""
    from sharpscope.analysis.curvature import HessianOperator

    with HessianOperator(model, F.cross_entropy, batches) as op:
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
        op.matvec(v)  # warm-up (and the func/cached choice)
        sent: list[int] = []
        real = torch.distributed.all_reduce

        def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            sent.append(tensor.numel() * tensor.element_size())
            return real(tensor, *args, **kwargs)

        torch.distributed.all_reduce = counting
        try:
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                op.matvec(v)
            seconds = (time.perf_counter() - start) / repeats
            _CPU["hvp"] = (time.process_time() - cpu) / repeats
        finally:
            torch.distributed.all_reduce = real
        return seconds, op.dim, sum(sent) // repeats


def _timed_lanczos(model: torch.nn.Module, batches: list, hvps: int) -> float:
    from sharpscope.analysis.hessian import hessian_eigenvalues

    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():  # the budget is fixed on purpose: "did not converge" is expected
        warnings.simplefilter("ignore", RuntimeWarning)
        hessian_eigenvalues(model, F.cross_entropy, batches, k=5, tol=1e-12, max_iter=hvps, progress=False)
    _CPU["lanczos"] = time.process_time() - cpu
    return time.perf_counter() - start


def _timed_landscape(model: torch.nn.Module, batches: list, grid: int) -> float:
    from sharpscope.analysis.landscape import landscape_2d

    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        landscape_2d(model, F.cross_entropy, batches, x=grid, y=grid, progress=False)
    _CPU["landscape"] = time.process_time() - cpu
    return time.perf_counter() - start


def _timed_train_step(batches: list, batch_size: int) -> float | str:
    """Seconds per ZSharp step of ``fit`` (one epoch, DDP when a group is active), or why it could not run."""
    try:
        from sharpscope.data import TensorData
        from sharpscope.train import fit

        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        data = TensorData(x, y, 10, "random/train", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), scale=1.0, augment=False)
        model = _model().train()
        steps = len(x) // batch_size
        with tempfile.TemporaryDirectory() as tmp:
            dist.barrier()
            start = time.perf_counter()
            fit(model, data, None, optimizer="zsharp", epochs=1, batch_size=batch_size, lr=0.05, device="cpu",
                progress=False, out=Path(tmp) / "run")
            return (time.perf_counter() - start) / max(steps, 1)
    except Exception as exc:  # noqa: BLE001 - reported in the table instead of failing the whole bench
        return f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    if world > 1:
        dist.init_process_group(rank, world, f"tcp://127.0.0.1:{port}", "gloo", timeout_s=1800)
    try:
        model, batches = _model(), _data(args.images, args.batch_size)
        hvp, dim, sent = _timed_hvp(model, batches, args.hvp_repeats)
        row = {"hvp": hvp, "dim": dim, "bytes_per_hvp": sent,
               "lanczos": _timed_lanczos(model, batches, args.lanczos_hvps),
               "landscape": _timed_landscape(model, batches, args.grid),
               "train_step": _timed_train_step(batches, args.batch_size) if not args.no_train else "skipped"}
        row["cpu"] = dict(_CPU)
        if rank == 0:
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy()


def _measure(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "row.json")
        mp.spawn(_worker, args=(world, dist.free_port(), args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def _cell(value: Any) -> str:
    return f"{value:10.3f}" if isinstance(value, float) else f"{str(value):>10}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 images, 3 x 3 grid, 6-product Lanczos, 4 timed HVPs")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--grid", type=int, default=21)
    parser.add_argument("--lanczos-hvps", type=int, default=20)
    parser.add_argument("--hvp-repeats", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="skip the training-step row")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch_size, args.grid, args.lanczos_hvps, args.hvp_repeats = 128, 32, 3, 6, 4
    rows = {world: _measure(world, args) for world in (1, 2)}
    one, two = rows[1], rows[2]
    print(f"ResNet-20 ({one['dim']:,} parameters), {args.images} images in batches of {args.batch_size}, "
          f"gloo, one thread per process")
    print(f"{'seconds per':<28}{'1 process':>10}{'2 processes':>12}{'speed-up':>10}")
    labels = {"hvp": "HVP", "lanczos": f"Lanczos top-5 ({args.lanczos_hvps} HVPs)",
              "landscape": f"{args.grid} x {args.grid} landscape", "train_step": "ZSharp training step (fit)"}
    for key, label in labels.items():
        a, b = one[key], two[key]
        ratio = f"{a / b:10.2f}" if isinstance(a, float) and isinstance(b, float) else f"{'-':>10}"
        print(f"{label:<28}{_cell(a)}{_cell(b):>12}{ratio}")
    print(f"{'CPU seconds of rank 0 per':<28}{'1 process':>10}{'2 processes':>12}{'ratio':>10}")
    for key in ("hvp", "lanczos", "landscape"):
        a, b = one["cpu"][key], two["cpu"][key]
        print(f"{labels[key]:<28}{_cell(a)}{_cell(b):>12}{a / b:10.2f}")
    ring = 2 * (2 - 1) / 2 * two["bytes_per_hvp"]
    print(f"bytes handed to all_reduce per HVP and rank: {two['bytes_per_hvp']:,} (= (dim + 1) x "
          f"{two['bytes_per_hvp'] // (two['dim'] + 1)} bytes); a ring all-reduce moves ~{ring:,.0f} per rank")
    print(f"bytes per DDP ZSharp step (local ascent): ~{4 * two['dim']:,} (the float32 gradient, once)")


if __name__ == "__main__":
    main()
