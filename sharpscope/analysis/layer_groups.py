r"""Which block and which kind of layer a parameter tensor belongs to, and whether ZSharp filters it.

A transformer has hundreds of parameter tensors; "which layers does ZSharp's filter select" reads at a
glance only when they are grouped by *block* (the index of the encoder/decoder layer) and by *kind*
(attention, MLP, embedding, ...). This module names both from the parameter names alone (optionally
helped by the owning module), for the conventions of

* sharpscope's ViT (``blocks.4.attn.qkv.weight``, ``blocks.4.mlp.0.weight``, ``pos_embed``, ``cls_token``),
  which are also timm's ViT names (``blocks.4.mlp.fc1.weight``, ``patch_embed.proj.weight``);
* ``torch.nn.TransformerEncoder``/``Decoder``/``Transformer`` (``layers.2.self_attn.in_proj_weight``,
  ``layers.2.linear1.weight``) and torchvision's ViT (``encoder.layers.encoder_layer_2.mlp.0.weight``);
* Hugging Face GPT-2 (``transformer.h.3.attn.c_attn.weight``), BERT
  (``encoder.layer.2.attention.self.query.weight``, ``encoder.layer.2.intermediate.dense.weight``),
  ViT (old and new names), T5, LLaMA-style (``model.layers.1.self_attn.q_proj.weight``,
  ``mlp.gate_proj``), CLIP and BART.

Wrapper prefixes (``module.`` of DDP, ``model.`` of Lightning, ``_orig_mod.`` of ``torch.compile``) do
not matter: patterns match whole dotted tokens anywhere in the name.

**Kinds** (:data:`KINDS`): ``embedding`` (token, patch and segment embeddings, class/distillation
tokens), ``position`` (absolute or relative position embeddings), ``attention`` (q/k/v/fused qkv/output
projections), ``mlp`` (the feed-forward layers), ``norm`` (LayerNorm/RMSNorm/BatchNorm weights and
biases), ``head`` (classifier, LM head, pooler), ``conv`` (convolutions outside a patch embedding),
``bias`` (every other bias) and ``other``. The finer **part** (:data:`PARTS`) says which projection:
``q, k, v, qkv, attn_out`` in attention, ``mlp_in, mlp_out`` in the MLP (``mlp.0`` is the input layer
of an ``nn.Sequential`` MLP, any later index its output layer), ``token, patch, segment, cls`` in the
embedding.

**Filtered**: ZSharp (:func:`sharpscope.optim.zscore.is_filtered`) filters every trainable tensor with
``ndim > 1``, so weights of embeddings, position embeddings (``(1, N, D)``: ``ndim`` 3), the class token,
attention and MLP projections, patch-embedding convolutions and the head; biases and normalisation
parameters (``ndim`` 1) keep SAM's direction. That needs the shapes: :func:`layer_groups` takes a model
or a mapping ``name -> shape``; from names alone ``filtered`` is unknown (``<NA>``).

The rules are the tables :data:`KIND_RULES`, :data:`ATTENTION_PARTS` and :data:`MLP_PARTS` (regular
expressions on the name wrapped in dots, case-insensitive; first match wins), so a new convention is
one more row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..errors import UserInputError

__all__ = ["KINDS", "PARTS", "KIND_RULES", "ATTENTION_PARTS", "MLP_PARTS", "layer_kind", "layer_part",
           "layer_block", "layer_groups"]

#: The kinds :func:`layer_kind` returns.
KINDS = ("embedding", "position", "attention", "mlp", "norm", "head", "conv", "bias", "other")
#: The parts :func:`layer_part` returns, in display order (embedding, attention, MLP, then the rest).
PARTS = ("token", "patch", "segment", "cls", "position", "q", "k", "v", "qkv", "attn_out", "attention", "mlp_in",
         "mlp_out", "mlp", "head", "pooler", "conv", "norm", "bias", "other")

# (kind, part, pattern): the first pattern found in "." + name.lower() + "." decides. Order matters:
# a LayerNorm's bias is a norm parameter, a position table inside attention (T5) is a position embedding.
KIND_RULES: tuple[tuple[str, str, str], ...] = (
    ("norm", "norm", r"\.(ln(_?\d+|_?f)?|[a-z0-9_]*norm[a-z0-9_]*|bn\d*)\.[^.]+\.$"),
    ("position", "position", r"\.(pos_embed|pos_embedding|pos_emb|position_embeddings?|wpe|positional_embedding"
                             r"|embed_positions|relative_attention_bias|relative_position\w*|rel_pos\w*)\."),
    ("embedding", "cls", r"\.(cls_token|class_token|dist_token|mask_token|register_tokens|reg_token)\.$"),
    ("bias", "bias", r"(\.|_)bias\.$"),
    ("embedding", "segment", r"\.token_type_embeddings\."),
    ("embedding", "patch", r"\.(patch_embed|patch_embeddings?|to_patch_embedding|conv_proj)\."),
    ("embedding", "token", r"\.(wte|word_embeddings|embed_tokens|tok_embeddings|token_embedding|tok_emb|shared"
                           r"|embed_in|embedding|embeddings|embed|emb)\."),
    ("attention", "attention", r"\.([a-z0-9_]*attn[a-z0-9_]*|[a-z0-9_]*attention[a-z0-9_]*|in_proj_weight"
                               r"|[qkv]_proj_weight|bias_[kv])\."),
    ("mlp", "mlp", r"\.(mlp|ffn|feed_forward|feedforward|densereludense|intermediate|fc1|fc2|linear1|linear2|c_fc"
                   r"|up_proj|gate_proj|down_proj|dense_h_to_4h|dense_4h_to_h|w1|w2|w3|wi|wi_0|wi_1|fc_in|fc_out"
                   r"|lin1|lin2)\.|\.output\.dense\."),
    ("head", "pooler", r"\.pooler\."),
    ("head", "head", r"\.(head|heads|classifier|lm_head|fc|score|qa_outputs|pre_logits|logits|cls)\."),
    ("conv", "conv", r"\.[a-z0-9_]*conv[a-z0-9_]*\."),
)
#: Which projection inside attention, searched from the first attention token on (first match wins).
ATTENTION_PARTS: tuple[tuple[str, str], ...] = (
    ("qkv", r"\.(qkv|c_attn|in_proj|in_proj_weight|query_key_value|wqkv|to_qkv|qkv_proj|w_pack)\."),
    ("q", r"\.(q|q_proj|q_proj_weight|query|to_q|wq|q_lin)\."),
    ("k", r"\.(k|k_proj|k_proj_weight|key|to_k|wk|k_lin|bias_k)\."),
    ("v", r"\.(v|v_proj|v_proj_weight|value|to_v|wv|v_lin|bias_v)\."),
    ("attn_out", r"\.(proj|out_proj|o_proj|c_proj|o|out|to_out|dense|wo|out_lin|output|dense_out)\."),
)
#: Input or output layer of the MLP, searched from the first MLP token on; ``mlp.0`` is the input layer
#: of an ``nn.Sequential`` MLP and any later index its output layer.
MLP_PARTS: tuple[tuple[str, str], ...] = (
    ("mlp_in", r"\.(fc1|linear1|c_fc|up_proj|gate_proj|w1|w3|wi|wi_0|wi_1|intermediate|dense_h_to_4h|fc_in|lin1"
               r"|0)\."),
    ("mlp_out", r"\.(fc2|linear2|c_proj|down_proj|w2|wo|dense_4h_to_h|fc_out|lin2|output|proj|\d+)\."),
)
# The containers whose numbered children are the blocks; torchvision names them encoder_layer_<i>.
_BLOCK = re.compile(
    r"(?:^|\.)(?P<stack>(?:[\w.]*?\.)?(?:blocks|layers|layer|h|block|resblocks|transformer_blocks))"
    r"\.(?P<index>\d+)(?:\.|$)"
    r"|(?:^|\.)(?P<tv>(?:[\w.]*?\.)?encoder_layer)_(?P<tv_index>\d+)(?:\.|$)")
_KIND_RULES = tuple((kind, part, re.compile(p, re.IGNORECASE)) for kind, part, p in KIND_RULES)
_ATTENTION_PARTS = tuple((part, re.compile(p, re.IGNORECASE)) for part, p in ATTENTION_PARTS)
_MLP_PARTS = tuple((part, re.compile(p, re.IGNORECASE)) for part, p in MLP_PARTS)
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def _checked_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UserInputError(f"a parameter name must be a non-empty string like 'blocks.0.attn.qkv.weight', "
                             f"got {name!r}")
    return name


def _is_norm(module: nn.Module | None) -> bool:
    """A normalisation layer (torch's, or any class named ``...Norm`` such as ``LlamaRMSNorm``)."""
    return isinstance(module, _NORM_MODULES) or type(module).__name__.lower().endswith("norm")


def _sub_part(name: str, table: tuple[tuple[str, re.Pattern[str]], ...], default: str,
              context: re.Pattern[str]) -> str:
    """The part from the first context token (``attn``, ``mlp``, ...) of the name on."""
    text = f".{name}."
    found = context.search(text)
    tail = text[found.start():] if found else text
    return next((part for part, pattern in table if pattern.search(tail)), default)


def _classify(name: str, module: nn.Module | None = None) -> tuple[str, str]:
    name = _checked_name(name)
    if module is not None and _is_norm(module):  # its weight and bias, whatever it is called
        return "norm", "norm"
    text = f".{name}."
    for kind, part, pattern in _KIND_RULES:
        if not pattern.search(text):
            continue
        if kind == "attention":
            return kind, _sub_part(name, _ATTENTION_PARTS, "attention", pattern)
        if kind == "mlp":
            return kind, _sub_part(name, _MLP_PARTS, "mlp", pattern)
        return kind, part
    if isinstance(module, nn.Embedding):
        return "embedding", "token"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv", "conv"
    return "other", "other"


def layer_kind(name: str, module: nn.Module | None = None) -> str:
    """The kind of the parameter ``name`` (one of :data:`KINDS`), e.g.
    ``"transformer.h.3.attn.c_attn.weight"`` -> ``"attention"``, ``"encoder.layer.2.output.dense.weight"``
    -> ``"mlp"``, ``"blocks.0.norm1.bias"`` -> ``"norm"``, ``"blocks.0.attn.qkv.bias"`` -> ``"bias"``.

    ``module``: the module owning the parameter (optional), used when the name does not say it (an
    ``nn.LayerNorm`` called ``g``, an ``nn.Embedding`` called ``table``).
    """
    return _classify(name, module)[0]


def layer_part(name: str, module: nn.Module | None = None) -> str:
    """The finer role of the parameter ``name`` (one of :data:`PARTS`): ``q``, ``k``, ``v``, ``qkv``,
    ``attn_out``, ``mlp_in``, ``mlp_out``, ``token``, ``patch``, ``cls``, ``position``, ``head``, ...;
    for kinds without parts (``norm``, ``bias``, ``conv``, ``other``) the kind itself."""
    return _classify(name, module)[1]


def _block_match(name: str) -> tuple[str, int] | None:
    found = _BLOCK.search(_checked_name(name))
    if found is None:
        return None
    if found.group("stack") is not None:
        return found.group("stack"), int(found.group("index"))
    return found.group("tv"), int(found.group("tv_index"))


def layer_block(name: str) -> int | None:
    """The index of the transformer block holding the parameter ``name``, or None outside the blocks.

    The block is the number after the first container token ``blocks``, ``layers``, ``layer``, ``h``,
    ``block``, ``resblocks`` or ``transformer_blocks`` (or torchvision's ``encoder_layer_<i>``):
    ``"bert.encoder.layer.2.attention.self.query.weight"`` -> 2, ``"pos_embed"`` -> None. An
    encoder-decoder numbers each stack from 0; :func:`layer_groups` says which stack in ``stack``.
    """
    found = _block_match(name)
    return None if found is None else found[1]


def _shapes(source: Any) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, bool], dict[str, nn.Module]]:
    """Names, shapes (where known), trainability and owning modules of ``source``."""
    if isinstance(source, nn.Module):
        owners = {f"{prefix}.{n}" if prefix else n: m for prefix, m in source.named_modules()
                  for n, _ in m.named_parameters(recurse=False)}
        named = list(source.named_parameters())
        return ([n for n, _ in named], {n: tuple(p.shape) for n, p in named},
                {n: bool(p.requires_grad) for n, p in named}, owners)
    if isinstance(source, Mapping):
        shapes = {}
        for n, s in source.items():
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) or hasattr(s, "shape") else s
            if not isinstance(shape, Iterable) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise UserInputError(f"the shape of {n!r} must be a tuple of sizes or a tensor, got {s!r}")
            shapes[_checked_name(n)] = tuple(int(d) for d in shape)
        return list(shapes), shapes, {}, {}
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return [_checked_name(n) for n in source], {}, {}, {}
    raise UserInputError(f"layer_groups needs a model, a mapping name -> shape or a list of parameter names, "
                         f"got {type(source).__name__}")


def layer_groups(source: nn.Module | Mapping[str, Any] | Sequence[str]) -> pd.DataFrame:
    """One row per parameter tensor: its block, kind and part, and whether ZSharp filters it.

    Args:
        source: a model (its ``named_parameters()``; the owning modules help classify), a mapping
            ``name -> shape`` (a tuple, or a tensor such as a ``state_dict`` value), or a list of names.

    Returns:
        A DataFrame in the order given with columns ``layer, block`` (Int64, ``<NA>`` outside the blocks),
        ``stack`` (the container holding the block, e.g. ``"encoder.layers"`` or ``"transformer.h"``; ``""``
        outside), ``kind``, ``part``, ``ndim``, ``numel`` and ``filtered`` (``ndim > 1`` and trainable:
        exactly the tensors ``ZSharp`` filters; ``<NA>`` where the shape is unknown).
    """
    names, shapes, trainable, owners = _shapes(source)
    if not names:
        raise UserInputError("layer_groups got no parameter names: the model or mapping is empty")
    rows = []
    for name in names:
        kind, part = _classify(name, owners.get(name))
        block = _block_match(name)
        shape = shapes.get(name)
        filtered = pd.NA if shape is None else len(shape) > 1 and trainable.get(name, True)
        rows.append({"layer": name, "block": None if block is None else block[1],
                     "stack": "" if block is None else block[0], "kind": kind, "part": part,
                     "ndim": pd.NA if shape is None else len(shape),
                     "numel": pd.NA if shape is None else int(torch.Size(shape).numel()), "filtered": filtered})
    frame = pd.DataFrame(rows, columns=["layer", "block", "stack", "kind", "part", "ndim", "numel", "filtered"])
    return frame.astype({"block": "Int64", "ndim": "Int64", "numel": "Int64", "filtered": "boolean"})
