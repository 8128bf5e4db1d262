"""Second-order analyses on transformers: the ZSharp paper's ViT and a GPT-2-style language model.

For each model (synthetic data: CIFAR-shaped images for the ViT, random token ids for GPT-2) it prints
the top-5 Hessian eigenvalues (Lanczos, tol 1e-3), the Hutch++ trace at 30 products, the top-5 of the
Gauss-Newton matrix, with wall time and number of products of each; the cost of one Hessian-vector
product in gradients (``time(HVP) / time(gradient)``, CPU time of this process, median of alternating
runs, so that other processes on the machine disturb it less than the wall time); ``matmat``
throughput for blocks of 1, 4 and 8 vectors; and the peak memory of one HVP against one training step
(forward + backward), both on the math attention path.

Peak memory is the growth of the resident set (Linux ``VmHWM`` after resetting it, else
``ru_maxrss``) in a fresh subprocess per measurement: ``tracemalloc`` does not see PyTorch's tensor
allocations, which are not made through Python's allocator.

PyHessian runs on the same ViT twice: as is (fused attention: it fails, there is no double backward
through it) and inside :func:`sharpscope.analysis.attention.math_attention`.

    python bench/transformers.py            # ViT (384 wide, 7 blocks) on 256 images; GPT-2 12x256 on 8 x 128 tokens
    python bench/transformers.py --quick    # smaller: 32 images, GPT-2 4 x 128 on 2 x 64 tokens, top-1 PyHessian
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

# Run as a script, this file's folder comes first on sys.path and "transformers" would be this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import sharpscope as ss  # noqa: E402
from sharpscope.analysis.attention import math_attention  # noqa: E402
from sharpscope.analysis.curvature import HessianOperator  # noqa: E402
from sharpscope.analysis.objective import as_objective  # noqa: E402


def gpt2_config(quick: bool, layers: int | None = None) -> Any:
    """GPT-2-style: hidden 256, 8 heads, 12 layers (4 with --quick), an 8192-token vocabulary."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=8192, n_positions=128, n_embd=256, n_layer=layers or (4 if quick else 12),
                      n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def build_case(name: str, quick: bool, layers: int | None = None) -> tuple[nn.Module, Any, Any]:
    """``(model, loss_fn, batch)`` of a case, seeded."""
    torch.manual_seed(0)
    if name == "vit":
        n = 32 if quick else 256
        x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
        return ss.build_model("vit", num_classes=10), nn.CrossEntropyLoss(), (x, y)
    from transformers import GPT2LMHeadModel

    n, t = (2, 64) if quick else (8, 128)
    ids = torch.randint(0, 8192, (n, t))
    return GPT2LMHeadModel(gpt2_config(quick, layers)), "lm", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _cpu_time(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def gradients_per_hvp(op: HessianOperator, repeats: int = 3) -> float:
    """Median of ``time(HVP) / time(gradient)`` over alternating runs (after one warm-up of each)."""
    v = torch.randn(op.dim, dtype=op.dtype)
    op.gradient(), op.matvec(v)
    return statistics.median(_cpu_time(lambda: op.matvec(v)) / _cpu_time(op.gradient) for _ in range(repeats))


def block_throughput(op: HessianOperator, sizes=(1, 4, 8)) -> str:
    """HVPs per (wall) second of ``op.matmat`` on blocks of ``sizes`` vectors."""
    out = []
    for k in sizes:
        V = torch.randn(op.dim, k, dtype=op.dtype)
        start = time.perf_counter()
        op.matmat(V)
        out.append(f"{k}: {k / (time.perf_counter() - start):.2f}")
    return "HVP/s by block size " + ", ".join(out)


def _vm_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def probe(name: str, what: str, quick: bool, layers: int | None) -> None:
    """Subprocess body: print the peak memory growth (MiB) of one training step or one HVP as JSON."""
    model, loss_fn, batch = build_case(name, quick, layers)
    objective = as_objective(loss_fn, model)
    # The vector is an input (like the batch), allocated before the measurement starts.
    v = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad))
    before = _vm_kib("VmRSS") or 0
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM (the peak) to the current RSS
            fh.write("5")
        peak_field = "VmHWM"
    except OSError:
        peak_field = None
    start_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if what == "step":
        model.train()
        with math_attention(model):
            objective(model, batch).backward()
    else:
        with HessianOperator(model, loss_fn, batch, hvp=what) as op:
            op.matvec(v)
    peak = _vm_kib(peak_field) if peak_field else None
    if peak is None:  # ru_maxrss: only meaningful when this step raised the process's peak
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, start_peak)
    print(json.dumps({"mib": (peak - before) / 1024}))


def peak_memory(name: str, what: str, quick: bool, layers: int | None = None) -> float:
    cmd = [sys.executable, __file__, "--probe", name, what] + (["--quick"] if quick else [])
    cmd += ["--layers", str(layers)] if layers else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["mib"])


def _timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def analyse(name: str, args: argparse.Namespace) -> list[str]:
    """The rows of one model's table."""
    model, loss_fn, batch = build_case(name, args.quick)
    n_params = sum(p.numel() for p in model.parameters())
    rows = [f"== {name}: {n_params / 1e6:.2f} M parameters"]
    with HessianOperator(model, loss_fn, batch) as op:
        rows.append(f"gradients per HVP ({op.method}): {gradients_per_hvp(op):.2f}   [target <= 2.0]")
        rows.append(block_throughput(op))
    common = {"progress": False, "seed": 0}
    eig, t = _timed(lambda: ss.hessian_eigenvalues(model, loss_fn, batch, k=5, tol=1e-3, eigenvectors=False,
                                                   **common))
    rows.append(f"Hessian top-5 {np.array2string(eig.eigenvalues, precision=4)}: {eig.n_hvp} HVPs, {t:.1f} s")
    tr, t = _timed(lambda: ss.hessian_trace(model, loss_fn, batch, n_samples=args.trace_budget, **common))
    rows.append(f"Hutch++ trace {tr.estimate:.4g} +- {tr.stderr:.2g}: {tr.n_hvp} HVPs, {t:.1f} s")
    try:
        ggn, t = _timed(lambda: ss.hessian_eigenvalues(model, loss_fn, batch, k=5, tol=1e-3, eigenvectors=False,
                                                       curvature="ggn", **common))
        rows.append(f"GGN top-5 {np.array2string(ggn.eigenvalues, precision=4)}: {ggn.n_hvp} GGN products, {t:.1f} s")
    except TypeError as exc:  # hessian_eigenvalues without curvature=
        rows.append(f"GGN top-5: missing ({exc})")
    step = peak_memory(name, "step", args.quick)
    for method in ("cached", "autograd"):
        hvp = peak_memory(name, method, args.quick)
        rows.append(f"peak memory: HVP ({method}) {hvp:.0f} MiB, training step {step:.0f} MiB: "
                    f"ratio {hvp / step:.2f}   [target <= 2.5]")
    return rows


def pyhessian_rows(args: argparse.Namespace) -> list[str]:
    """PyHessian's top-k power iteration on the ViT without and with the math attention switch."""
    model, loss_fn, batch = build_case("vit", args.quick)
    k = 1 if args.quick else 5
    rows = []
    try:
        ss.hessian_eigenvalues(model, loss_fn, batch, k=k, tol=1e-3, backend="pyhessian", progress=False)
        rows.append("PyHessian on the ViT without math_attention: works")
    except Exception as exc:  # noqa: BLE001 -- reporting what PyHessian raises is the point
        rows.append(f"PyHessian on the ViT without math_attention: FAILS ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:110]})")
    with math_attention(model):
        ph, t = _timed(lambda: ss.hessian_eigenvalues(model, loss_fn, batch, k=k, tol=1e-3, backend="pyhessian",
                                                      progress=False))
    ours, t_ours = _timed(lambda: ss.hessian_eigenvalues(model, loss_fn, batch, k=k, tol=1e-3, eigenvectors=False,
                                                         progress=False))
    rows.append(f"PyHessian top-{k} inside math_attention {np.array2string(ph.eigenvalues, precision=4)}: "
                f"{ph.n_hvp} HVPs, {t:.1f} s | sharpscope {ours.n_hvp} HVPs, {t_ours:.1f} s "
                f"(ratio {t_ours / t:.2f})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller models and data (see above)")
    parser.add_argument("--models", default="vit,gpt2", help="comma-separated: vit, gpt2")
    parser.add_argument("--trace-budget", type=int, default=30)
    parser.add_argument("--no-pyhessian", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory ratios")
    parser.add_argument("--layers", type=int, default=None, help="GPT-2 layers (default 12, 4 with --quick)")
    parser.add_argument("--probe", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(*args.probe, args.quick, args.layers)
        return
    warnings.simplefilter("ignore")
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")
    rows: list[str] = []
    for name in args.models.split(","):
        if args.memory_only:
            step = peak_memory(name, "step", args.quick, args.layers)
            hvp = peak_memory(name, "cached", args.quick, args.layers)
            rows.append(f"{name}: peak memory HVP {hvp:.0f} MiB / training step {step:.0f} MiB = {hvp / step:.2f}")
        else:
            rows += analyse(name, args)
        print("\n".join(rows[-8:]), flush=True)
    if not args.no_pyhessian and not args.memory_only and "vit" in args.models:
        rows += pyhessian_rows(args)
    print("\nSUMMARY\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
