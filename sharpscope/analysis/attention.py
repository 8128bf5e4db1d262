"""Attention that can be differentiated twice: the math kernel inside every second-order analysis.

PyTorch's fused attention kernels (flash and memory-efficient ``scaled_dot_product_attention``, on CPU
and CUDA, and the ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` inference "fast path") have
no double backward and no forward-mode derivative, so a Hessian-vector product through them fails
(``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``).
:func:`math_attention` runs a block with

- ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: SDPA as ``softmax(Q K^T / sqrt(d) + mask) V`` in
  plain differentiable operations;
- the ``nn.MultiheadAttention`` fast path disabled (``torch.backends.mha.set_fastpath_enabled``);
- a Hugging Face model whose attention implementation is a fused one (``flash_attention_2``, ``flex``,
  ...) switched to ``"sdpa"`` (which then takes the math kernel),

and restores all three afterwards.

Memory: the math path materialises the attention matrix, ``batch x heads x T x T`` numbers per layer
(and the double backward keeps a few such tensors per layer), where the fused kernels keep
``O(batch x heads x T)``. For ``T = 1024``, 12 heads, batch 8 in float32 that is 400 MB per layer per
copy; reduce the batch (analyses accept many small batches with exact weighting) or the sequence length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: Attention implementations of Hugging Face models that are differentiable twice.
_TWICE_DIFFERENTIABLE_HF = ("eager", "sdpa")


def _hf_attention(model: Any) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


@contextlib.contextmanager
def _hf_attention_switched(model: Any) -> Iterator[None]:
    current = _hf_attention(model)
    if current is None or current in _TWICE_DIFFERENTIABLE_HF or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def math_attention(model: Any = None) -> Iterator[None]:
    """Run the block with attention that supports double backward and forward-mode AD (module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), _mha_fastpath_disabled(), _hf_attention_switched(model):
        yield
