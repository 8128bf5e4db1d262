"""math_attention: second-order analyses through attention, with the global switches restored.

Independent reference: the exact Hessian of a tiny float64 ``nn.TransformerEncoder`` classifier from
``torch.func.hessian`` over the flat parameters, with attention written out by hand
(``softmax(Q K^T / sqrt(d)) V``) so that the reference does not depend on any SDPA kernel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharpscope as ss
from sharpscope.analysis.attention import math_attention
from tests._curvature_models import parameters_from_flat


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Flatten(),
                         nn.Linear(12, 3)).double()


def _by_hand(model: nn.Module, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The post-norm encoder layer with ReLU, written out (PyTorch's documented computation)."""
    p = {k.replace("0.layers.0.", ""): v for k, v in tensors.items()}
    q, k, v = F.linear(x, p["self_attn.in_proj_weight"], p["self_attn.in_proj_bias"]).chunk(3, -1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], 2, 2).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(2), -1) @ v
    att = F.linear(att.transpose(1, 2).reshape(x.shape), p["self_attn.out_proj.weight"], p["self_attn.out_proj.bias"])
    h = F.layer_norm(x + att, (4,), p["norm1.weight"], p["norm1.bias"])
    ff = F.linear(F.relu(F.linear(h, p["linear1.weight"], p["linear1.bias"])), p["linear2.weight"], p["linear2.bias"])
    h = F.layer_norm(h + ff, (4,), p["norm2.weight"], p["norm2.bias"])
    return F.linear(h.flatten(1), p["2.weight"], p["2.bias"])


def test_transformer_encoder_top_eigenvalues_equal_the_exact_hessian():
    model = _encoder().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_by_hand(model, parameters_from_flat(model, flat), x), y)

    with torch.no_grad():  # the hand-written forward is the module's forward
        torch.testing.assert_close(loss_of(flat0), F.cross_entropy(model(x), y), rtol=0, atol=1e-12)
    # Reverse-over-reverse on the hand-written loss (torch.func.hessian's forward-over-reverse gave an
    # asymmetric matrix for this function on torch 2.13, off by 0.15 from finite differences).
    exact_matrix = torch.autograd.functional.hessian(loss_of, flat0)
    torch.testing.assert_close(exact_matrix, exact_matrix.T, rtol=0, atol=1e-12)
    exact = torch.linalg.eigvalsh(exact_matrix).flip(0)[:3]
    for hvp in ("func", "autograd", "cached"):
        result = ss.hessian_eigenvalues(model, nn.CrossEntropyLoss(), [(x[:2], y[:2]), (x[2:], y[2:])], k=3,
                                        tol=1e-12, hvp=hvp)
        torch.testing.assert_close(torch.as_tensor(result.eigenvalues), exact, rtol=0, atol=1e-9)


def test_math_attention_restores_the_global_switches():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.backends.mha.get_fastpath_enabled()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with math_attention():
            assert not torch.backends.mha.get_fastpath_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_math_attention_switches_a_fused_hugging_face_implementation_and_back():
    """A LLaMA model set to flex attention (a fused kernel) runs on "sdpa" inside the block, is set back
    after it, and its Hessian top eigenvalue is computed (the product goes through the switched model)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=30,
                                      max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("flex_attention")
    seen = []
    with math_attention(model):
        seen.append(model.config._attn_implementation)
    assert seen == ["sdpa"]
    assert model.config._attn_implementation == "flex_attention"
    ids = torch.randint(0, 30, (2, 6))
    top = ss.hessian_eigenvalues(model, "lm", {"input_ids": ids}, k=1)
    assert np.isfinite(top.eigenvalues).all() and top.n_hvp > 0
    assert model.config._attn_implementation == "flex_attention"
