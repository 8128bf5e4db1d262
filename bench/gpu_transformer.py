"""Transformer Hessian work on one device: the paper's ViT (and a GPT-2-style model when transformers is installed).

Prints, per model: one gradient and one HVP (wall time, their ratio), the top-1 eigenvalue with its HVP count
and time, and the peak memory of one HVP against one training step (CUDA: ``torch.cuda.max_memory_allocated``;
CPU: not measured here, see bench/transformers.py). Attention runs on the math kernel inside every product
(``sharpscope.math_attention``): the fused kernels have no double backward, on CUDA as on CPU.

    python bench/gpu_transformer.py --device cuda            # on a lent GPU (bench/gpu_check.sh runs it)
    python bench/gpu_transformer.py --device cpu --quick     # checks the script anywhere
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import sharpscope as ss

# bench/transformers.py sits next to this file: drop this folder from sys.path so that
# "import transformers" finds the Hugging Face package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]


def _seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _peak(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


def _report(name: str, model: torch.nn.Module, loss_fn: Any, batch: Any, device: torch.device) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    op = ss.HessianOperator(model, loss_fn, batch)
    v = torch.randn(op.dim, device=device, dtype=op.dtype)

    def train_step() -> None:
        loss = ss.as_objective(loss_fn, model)(model, batch)
        torch.autograd.grad(loss, params)

    grad_s, hvp_s = _seconds(train_step, device), _seconds(lambda: op.matvec(v), device)
    print(f"{name}: {op.dim / 1e6:.2f} M parameters, HVP method {op.method}: gradient {grad_s * 1e3:.1f} ms, "
          f"HVP {hvp_s * 1e3:.1f} ms, gradients per HVP {hvp_s / grad_s:.2f}")
    start = time.perf_counter()
    top = ss.hessian_eigenvalues(model, loss_fn, batch, k=1, tol=1e-3)
    print(f"  top-1 eigenvalue {top.eigenvalues[0]:.4g}: {top.n_hvp} HVPs, {time.perf_counter() - start:.1f} s")
    step_mib, hvp_mib = _peak(train_step, device), _peak(lambda: op.matvec(v), device)
    if step_mib is not None and hvp_mib is not None:
        print(f"  peak memory: HVP {hvp_mib:.0f} MiB, training step {step_mib:.0f} MiB, ratio {hvp_mib / step_mib:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a check of the script)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = 8 if args.quick else 256
    vit = ss.build_model("vit", num_classes=10).to(device)
    x, y = torch.randn(images, 3, 32, 32, device=device), torch.randint(0, 10, (images,), device=device)
    _report(f"ViT ({images} images)", vit, F.cross_entropy, (x, y), device)
    try:
        import transformers
    except ImportError:
        print("GPT-2-style model skipped: transformers is not installed (pip install 'sharpscope[hf]')")
        return
    layers, width, tokens, seqs = (2, 64, 32, 2) if args.quick else (12, 256, 128, 8)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=8192, n_positions=tokens,
                                     bos_token_id=0, eos_token_id=0)
    gpt = transformers.GPT2LMHeadModel(config).to(device)
    ids = torch.randint(0, 8192, (seqs, tokens), device=device)
    _report(f"GPT-2 {layers} x {width} ({seqs} x {tokens} tokens)", gpt, "lm",
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, device)


if __name__ == "__main__":
    main()
