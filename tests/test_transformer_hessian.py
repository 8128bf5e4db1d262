"""Hessian of transformers (sharpscope's ViT, a Hugging Face GPT-2) against the exact float64 Hessian.

The independent reference is the exact Hessian of the full-data loss written out here by hand (the
objective's maths re-implemented, not imported) over the flat parameter vector, by
``torch.autograd.functional.hessian`` (one double-backward pass per row, no vmap), under PyTorch's own
math attention kernel (``sdpa_kernel(SDPBackend.MATH)``: the fused kernels have no second derivative),
and ``numpy.linalg.eigh`` of that matrix.

Why not ``torch.func.hessian``: with torch 2.13 (CPU) it returns a NON-symmetric, wrong matrix for the
tiny ViT below (entries off by 0.27, also with ``jacrev(jacrev)`` and with attention written out by
hand), while ``torch.autograd.functional.hessian`` is symmetric to 1e-16 -- a vmap problem, not one of
the operator (which never uses vmap).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import sharpscope as ss
from sharpscope.analysis.curvature import HessianOperator
from sharpscope.models.vit import ViT

CE = nn.CrossEntropyLoss()
METHODS = ("func", "cached", "autograd")


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = ViT(num_classes=3, image_size=4, patch_size=2, in_channels=1, dim=4, depth=1, heads=2,
                mlp_dim=4).double()
    with torch.no_grad():  # break the symmetric initialisation (zero biases, zero class token)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def vit_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=7, n_positions=6, n_embd=4, n_layer=1, n_head=2, n_inner=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def lm_batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of unequal lengths (5 and 3 tokens), the first with right padding."""
    g = torch.Generator().manual_seed(2)
    ids_a = torch.randint(0, 7, (2, 5), generator=g)
    mask_a = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids_b = torch.randint(0, 7, (3, 3), generator=g)
    return [{"input_ids": ids_a, "attention_mask": mask_a},
            {"input_ids": ids_b, "attention_mask": torch.ones_like(ids_b)}]


def _vit_loss_sum(logits: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return F.cross_entropy(logits, batch[1], reduction="sum"), len(batch[1])


def _lm_loss_sum(out, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over the real (unpadded) target tokens, and their number."""
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum"), int((targets != -100).sum())


def exact_hessian(model: nn.Module, batches: list, lm: bool) -> np.ndarray:
    """The exact Hessian of the mean loss over all targets of all batches w.r.t. the flat parameters."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    names, sizes = list(params), [p.numel() for p in params.values()]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors = {n: c.view(params[n].shape) for n, c in zip(names, torch.split(flat, sizes))}
        total, count = 0.0, 0
        for batch in batches:
            if lm:
                out = functional_call(model, {**tensors, **buffers}, (), dict(batch))
                s, c = _lm_loss_sum(out, batch)
            else:
                s, c = _vit_loss_sum(functional_call(model, {**tensors, **buffers}, (batch[0],)), batch)
            total, count = total + s, count + c
        return total / count

    with sdpa_kernel(SDPBackend.MATH):
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        return torch.autograd.functional.hessian(loss_of, flat).numpy()


def case(make: str) -> tuple[nn.Module, list, object]:
    """A fresh model, its batches and its loss: ``"vit"`` or ``"gpt2"``."""
    return (tiny_vit(), vit_batches(), CE) if make == "vit" else (tiny_gpt2(), lm_batches(), "lm")


@functools.cache
def exact(make: str) -> np.ndarray:
    """The exact Hessian of a case (computed once per test session: a few seconds each)."""
    model, batches, _ = case(make)
    H = exact_hessian(model, batches, lm=make == "gpt2")
    np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-12)
    return H


def _top3_check(make: str) -> None:
    model, batches, loss_fn = case(make)
    H = exact(make)
    top3 = np.sort(np.linalg.eigh(H)[0])[::-1][:3]
    res = ss.hessian_eigenvalues(model, loss_fn, batches, k=3, tol=1e-11, hvp="cached", max_iter=H.shape[0] + 50,
                                 dtype=torch.float64, eigenvectors=False, progress=False)
    np.testing.assert_allclose(np.sort(res.eigenvalues)[::-1], top3, rtol=0, atol=1e-8)


def test_vit_top3_eigenvalues_match_exact_hessian() -> None:
    """sharpscope's ViT (attention through SDPA), float64, two unequal batches: Lanczos top-3 == eigh."""
    _top3_check("vit")


def test_gpt2_top3_eigenvalues_match_exact_hessian() -> None:
    """HF GPT-2 (tied embeddings, SDPA attention), loss "lm" on dict batches of unequal lengths with padding:
    Lanczos top-3 == eigh of the exact Hessian of the token-weighted mean cross-entropy."""
    _top3_check("gpt2")


@pytest.mark.parametrize("make", ["vit", "gpt2"])
def test_every_method_and_matmat_equal_the_exact_hessian(make: str) -> None:
    """For each HVP method: matvec(v) == H v and matmat(V) == H V (V of 3 columns) with the exact H, and the
    model's weights, buffers, .grad and train flags are untouched (it was in train mode)."""
    model, batches, loss_fn = case(make)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    H = exact(make)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for hvp in METHODS:
        op = HessianOperator(model, loss_fn, batches, hvp=hvp)
        np.testing.assert_allclose(op.matvec(V[:, 0]).numpy(), H @ V[:, 0].numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(op.matmat(V[:, 1:]).numpy(), H @ V[:, 1:].numpy(), rtol=0, atol=1e-12)
        assert op.n_hvp == 4 and op.method == hvp
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k


def test_matmat_block_equals_stacked_matvecs_on_vit() -> None:
    """A (dim, 3) block through matmat equals three matvecs (same operator, each method)."""
    model, batches, _ = case("vit")
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    for hvp in METHODS:
        with HessianOperator(model, CE, batches, hvp=hvp) as op:
            block = op.matmat(V)
            cols = torch.stack([op.matvec(V[:, j]) for j in range(3)], dim=1)
        np.testing.assert_allclose(block.numpy(), cols.numpy(), rtol=0, atol=1e-13)
