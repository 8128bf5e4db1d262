"""Thread policy benchmark: ms per Hessian-vector product and per ZSharp training step, 1 vs 2 threads.

For the digits MLP (all 1,437 training examples), ResNet-20 (128 images) and the paper's ViT (64
images), on an idle machine and with one busy background process that this script starts and stops
itself (a pure-Python spin loop: one core taken, as by another kernel or a training job).

For each cell it prints the median time at 1 and at 2 threads (interleaved repetitions), the
count :func:`sharpscope.threads.choose_threads` picks for that work, the time at the picked count
over the best of the two (target <= 1.10), and the decision's own cost. Not part of the test suite.

    python bench/threads.py [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharpscope as ss
from sharpscope.analysis.curvature import HessianOperator
from sharpscope.threads import choose_threads, forward_backward_trial


def _workloads(quick: bool) -> list[tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    digits = ss.load_dataset("digits", train=True)
    x, y = next(iter(digits.batches(len(digits), shuffle=False, augment=False)))
    out = [("digits MLP (1437)", ss.build_model("mlp", num_classes=10, seed=0), (x, y))]
    n_r, n_v = (32, 16) if quick else (128, 64)
    out.append((f"ResNet-20 ({n_r})", ss.build_model("resnet20", num_classes=10, seed=0),
                (torch.randn(n_r, 3, 32, 32, generator=g), torch.randint(0, 10, (n_r,), generator=g))))
    out.append((f"ViT ({n_v})", ss.build_model("vit", num_classes=10, seed=0),
                (torch.randn(n_v, 3, 32, 32, generator=g), torch.randint(0, 10, (n_v,), generator=g))))
    return out


def _hvp_unit(model: nn.Module, batch) -> Callable[[], None]:
    op = HessianOperator(model.eval(), nn.CrossEntropyLoss(), batch)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(1))
    return lambda: op.matvec(v)


def _step_unit(model: nn.Module, batch) -> Callable[[], None]:
    model.train()
    opt = ss.ZSharp(model.named_parameters(), torch.optim.SGD, rho=0.05, percentile=0.95, lr=1e-3)
    x, y = batch
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return step


def _median_ms(unit: Callable[[], None], threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    unit()
    return 1e3 * (time.perf_counter() - start)


def _cell(unit: Callable[[], None], trial: Callable[[], None], repeats: int) -> dict[str, float]:
    unit()  # warm-up
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for n in (1, 2):
            times[n].append(_median_ms(unit, n))
    torch.set_num_threads(2)
    start = time.perf_counter()
    chosen = choose_threads(trial, 2)
    decide_ms = 1e3 * (time.perf_counter() - start)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"t1": med[1], "t2": med[2], "chosen": chosen, "ratio": med[chosen] / min(med.values()),
            "decide_ms": decide_ms}


def _busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats (a smoke run)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    saved = torch.get_num_threads()
    rows = []
    for load in ("idle", "busy"):
        busy = _busy_process() if load == "busy" else None
        try:
            time.sleep(0.5 if busy else 0.0)
            for name, model, batch in _workloads(args.quick):
                trial = forward_backward_trial(model, nn.CrossEntropyLoss(), batch)
                with sdpa_kernel(SDPBackend.MATH):  # the ViT's HVP needs attention with double backward
                    for work, unit in (("HVP", _hvp_unit(model, batch)), ("ZSharp step", _step_unit(model, batch))):
                        rows.append((load, name, work, _cell(unit, trial, repeats)))
                        r = rows[-1][3]
                        print(f"{load:5s} {name:20s} {work:12s} 1 thr {r['t1']:8.1f} ms  2 thr {r['t2']:8.1f} ms  "
                              f"policy {r['chosen']} ({r['ratio']:.2f} x best, decided in {r['decide_ms']:.0f} ms)",
                              flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    torch.set_num_threads(saved)
    worst = max(r["ratio"] for *_, r in rows)
    print(f"\nworst policy / best ratio over {len(rows)} cells: {worst:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
