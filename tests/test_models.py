"""Model zoo: parameter counts, shapes, option-A shortcuts, names and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.errors import UserInputError
from sharpscope.models import MODEL_NAMES, build_model, canonical_model_name, model_spec


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resnet_cifar_count(depth: int, num_classes: int) -> int:
    """Hand count of He et al.'s CIFAR ResNet with parameter-free (option A) shortcuts."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += c_in * c * 9 + 2 * c + c * c * 9 + 2 * c
            c_in = c
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_resnet_parameter_count_matches_hand_count(depth):
    """Checked against a hand count of the architecture (convs, BNs, head; no shortcut weights)."""
    model = build_model(f"resnet{depth}", 10)
    assert n_params(model) == resnet_cifar_count(depth, 10)


def test_resnet20_and_56_match_paper_counts():
    """He et al. 2016, Table 6: ResNet-20 has 0.27M and ResNet-56 0.85M parameters."""
    assert round(n_params(build_model("resnet20", 10)) / 1e6, 2) == 0.27
    assert round(n_params(build_model("resnet56", 10)) / 1e6, 2) == 0.85


def test_wrn28_10_parameter_count():
    """Zagoruyko & Komodakis: WRN-28-10 has 36.5M parameters (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model("wrn28_10", 10)
    assert round(n_params(model) / 1e6, 1) == 36.5


def test_vgg16_bn_has_13_convs_and_single_linear_head():
    """Checked against the VGG-16 definition: 13 conv layers, 13 BN, one Linear(512, C) head."""
    model = build_model("vgg16_bn", 100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 100)]


def test_vit_paper_configuration():
    """REFERENCE.md: 4x4 patches on 32x32 (64 tokens + cls), 7 pre-LN blocks, hidden 384, MLP 384, 12 heads."""
    model = build_model("vit", 10)
    assert model.pos_embed.shape == (1, 65, 384)
    assert len(model.blocks) == 7
    block = model.blocks[0]
    assert block.attn.heads == 12
    assert block.mlp[0].in_features == 384 and block.mlp[0].out_features == 384
    # Hand count: patch conv, cls, pos, per block (2 LN + qkv + proj + 2 MLP linears), final LN, head.
    d, m, c = 384, 384, 10
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    expected = (3 * 16 * d + d) + d + 65 * d + 7 * per_block + 2 * d + (d * c + c)
    assert n_params(model) == expected


def test_vit_pre_ln_matches_hand_written_forward():
    """One block against a hand-written pre-LN attention + MLP (independent multi-head attention)."""
    torch.manual_seed(1)
    model = build_model("vit", 5, dim=8, depth=1, heads=2, mlp_dim=16, image_size=8, patch_size=4).eval()
    x = torch.randn(3, 3, 8, 8)
    tok = model.patch_embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(3, -1, -1), tok], 1) + model.pos_embed
    blk = model.blocks[0]
    a = blk.norm1(h)
    q, k, v = (a @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(8, dim=-1)
    heads = []
    for i in range(2):
        sl = slice(4 * i, 4 * i + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., sl])
    h = h + blk.attn.proj(torch.cat(heads, -1))
    h = h + blk.mlp(blk.norm2(h))
    expected = model.head(model.norm(h)[:, 0])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_option_a_shortcut_is_subsample_plus_zero_channels():
    """The downsampling shortcut equals x[:, :, ::2, ::2] with zero channels appended on both sides."""
    model = build_model("resnet20", 10)
    block = model.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_logits_and_gradients(name):
    """Forward/backward on a small batch: logits of shape (batch, classes), finite gradients everywhere."""
    if name == "wrn28_10":
        model = build_model(name, 7)
        model = type(model)(depth=10, widen_factor=1, num_classes=7)  # same class, small instance
    else:
        kw = {"in_channels": 1} if name == "cnn" else {}
        model = build_model(name, 7, **kw)
    x = torch.randn(2, 1, 8, 8) if name in ("mlp", "cnn") else torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_tiny_imagenet_sizes():
    """64x64 inputs: ResNet and VGG pool globally; ViT takes image_size=64."""
    x = torch.randn(1, 3, 64, 64)
    assert build_model("resnet20", 200)(x).shape == (1, 200)
    assert build_model("vit", 200, image_size=64, depth=1)(x).shape == (1, 200)


def test_names_are_case_and_dash_insensitive():
    """'ResNet-20' and 'VGG16-BN' resolve to the canonical names."""
    assert canonical_model_name("ResNet-20") == "resnet20"
    assert canonical_model_name("VGG16-BN") == "vgg16_bn"
    assert canonical_model_name("WRN-28-10") == "wrn28_10"


def test_spec_rebuilds_identical_architecture():
    """model_spec -> build_model gives the same parameter names and shapes."""
    spec = model_spec("mlp", 10, hidden=(32, 16))
    assert spec == {"name": "mlp", "num_classes": 10, "kwargs": {"hidden": [32, 16]}}
    a = build_model("mlp", 10, hidden=(32, 16))
    b = build_model(spec["name"], spec["num_classes"], **spec["kwargs"])
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_model("resnet21", 10), "unknown model 'resnet21'; choose one of: resnet20"),
        (lambda: build_model("resnet20", 0), "num_classes must be an integer >= 1; got 0"),
        (lambda: build_model("cnn", 10, width=2.5), "width must be an integer >= 1; got 2.5"),
        (lambda: build_model("mlp", 10, hidden=(8, 0)), "each hidden width must be an integer >= 1; got 0"),
        (lambda: build_model("wrn28_10", 10, widen_factor=-1), "widen_factor must be an integer >= 1"),
        # 10^14 weights (400 TB): refused by the allocator at once, without touching memory
        (lambda: build_model("mlp", 10, in_features=10**7, hidden=(10**7,)), "too large to allocate here"),
        (lambda: build_model("resnet20", 10, colour=3), "bad keyword arguments for model 'resnet20'"),
        (lambda: build_model("vit", 10, image_size=30), "must be a multiple of patch_size"),
    ],
)
def test_bad_input_is_one_line_user_error(call, match):
    """Unknown names list the valid ones; bad arguments name the argument; a model that cannot be
    allocated is one line too (it was a RuntimeError traceback)."""
    with pytest.raises(UserInputError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_build_model_seed_is_reproducible_and_leaves_global_rng_alone():
    """Checks against a second build with the same seed and the global RNG state before the call."""
    import torch

    from sharpscope.models import build_model

    state = torch.random.get_rng_state()
    a = build_model("cnn", 10, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    b = build_model("cnn", 10, seed=7)
    c = build_model("cnn", 10, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
