"""Tiny float64 models and the exact Hessian (torch.func.hessian) shared by the curvature tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.func import functional_call


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def tiny_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-Linear with running statistics made non-trivial (the Hessian is taken in eval mode)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 3)).double()
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 1, 6, 6, dtype=torch.float64))
    model.eval()
    return model


def mlp_data(n: int = 52, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def cnn_data(n: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def exact_hessian(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
                  names: list[str] | None = None) -> np.ndarray:
    """The Hessian of the mean loss on (x, y) in eval mode w.r.t. the named parameters (all by default),
    flattened in model order, by ``torch.func.hessian`` -- independent of sharpscope's HVP code."""
    was = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else names
    fixed = {n: p for n, p in params.items() if n not in names}
    buffers = dict(model.named_buffers())
    sizes = [params[n].numel() for n in names]
    shapes = [params[n].shape for n in names]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        tensors = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return loss_fn(functional_call(model, {**fixed, **tensors, **buffers}, (x,)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    H = torch.func.hessian(loss_of)(flat)
    model.train(was)
    return H.numpy()


def trained_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A tiny MLP trained near a minimum of a learnable task: its Hessian is nearly PSD with a few dominant
    eigenvalues, like a trained network's (the regime Hutch++ is made for)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = (x @ teacher + 0.5 * torch.randn(64, 3, generator=g, dtype=torch.float64)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, (x, y)


def parameters_from_flat(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """``name -> view of flat`` in the order of ``model.named_parameters()`` (for a loss of the flat vector)."""
    tensors, i = {}, 0
    for name, p in model.named_parameters():
        tensors[name] = flat[i:i + p.numel()].view(p.shape)
        i += p.numel()
    return tensors
