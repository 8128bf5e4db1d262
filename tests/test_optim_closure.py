"""step(closure): the davda54/sam convention (caller's backward, then step) and the torch convention.

The reference is the explicit first_step/second_step protocol on the same model, data and optimizer:
both closure conventions must give exactly its weights AND BatchNorm buffers (running_mean,
running_var, num_batches_tracked) after several steps, with two forward passes per step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharpscope.optim import ASAM, SAM, FriendlySAM, ZSharp

N_STEPS = 4
FACTORIES = {
    "sam": lambda ps: SAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    "zsharp": lambda ps: ZSharp(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
    "asam": lambda ps: ASAM(ps, torch.optim.SGD, lr=0.1),
    "fsam": lambda ps: FriendlySAM(ps, torch.optim.Adam, lr=1e-2),
}


class CountingCNN(nn.Module):
    """A small CNN with BatchNorm that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
        )
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.net(x)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    return [(torch.randn(6, 2, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(N_STEPS)]


def explicit_protocol(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def davda54_style(model, opt, x, y):
    """davda54/sam's README: the closure does not zero the grads; the caller runs pass 1 itself."""

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.step(closure) is None
    opt.zero_grad()


def torch_style(model, opt, x, y, set_to_none=True):
    """torch.optim's convention: the closure zeroes, runs forward and backward; step returns the loss."""

    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad(set_to_none=set_to_none)  # zeros (not None) must also read as "no pass-1 gradient"
    with torch.no_grad():
        expected = nn.functional.cross_entropy(copy.deepcopy(model.net)(x), y)  # loss at w; BN of a copy
    loss = opt.step(closure)
    assert torch.allclose(loss.detach(), expected)


def run(train_step, name, **kwargs):
    model = CountingCNN()
    opt = FACTORIES[name](model.named_parameters())
    for x, y in batches():
        train_step(model, opt, x, y, **kwargs)
    return model


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize(
    "style,kwargs",
    [(davda54_style, {}), (torch_style, {}), (torch_style, {"set_to_none": False})],
    ids=["davda54", "torch", "torch_zeros"],
)
def test_closure_conventions_equal_explicit_protocol(name, style, kwargs):
    """Weights and BN buffers bit for bit equal to first_step/second_step; two forwards per step."""
    reference = run(explicit_protocol, name)
    ours = run(style, name, **kwargs)
    assert ours.forwards == reference.forwards == 2 * N_STEPS
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert int(our_state["net.1.num_batches_tracked"]) == 2 * N_STEPS
    for key, value in ref_state.items():
        assert torch.equal(our_state[key], value), key


def test_step_clears_gradients_so_the_next_torch_style_step_runs_pass_1():
    """After step(closure) the gradients are None: a following torch-style step (closure without
    zero_grad, caller never zeroes) still runs pass 1 itself (three forwards would mean a stale g)."""
    model = CountingCNN()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batches()[0]

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        assert opt.step(closure) is not None
    assert model.forwards == 6
    assert all(p.grad is None for p in model.parameters())
