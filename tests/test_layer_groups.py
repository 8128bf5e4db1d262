"""Block / kind / part of transformer parameters, what ZSharp filters, and the block x kind heatmap.

Independent references: hand-written expectations read off each library's module structure (which
projection a name is, which block), the tensors' own ``ndim`` (ZSharp's rule, ``ndim > 1``), and cell
values recomputed here with plain numpy from the input table.
"""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import sharpscope as ss  # noqa: E402
from sharpscope import plot as ssplot  # noqa: E402
from sharpscope.analysis.layer_groups import (  # noqa: E402
    KINDS,
    PARTS,
    layer_block,
    layer_groups,
    layer_kind,
    layer_part,
)
from sharpscope.errors import UserInputError  # noqa: E402

# name -> (block, kind, part), read off the modules of each library by hand.
EXPECTED = {
    # sharpscope ViT (also timm's names)
    "blocks.4.attn.qkv.weight": (4, "attention", "qkv"),
    "blocks.4.attn.proj.weight": (4, "attention", "attn_out"),
    "blocks.4.mlp.0.weight": (4, "mlp", "mlp_in"),
    "blocks.4.mlp.2.weight": (4, "mlp", "mlp_out"),
    "blocks.4.norm1.bias": (4, "norm", "norm"),
    "blocks.4.attn.qkv.bias": (4, "bias", "bias"),
    "pos_embed": (None, "position", "position"),
    "cls_token": (None, "embedding", "cls"),
    "patch_embed.weight": (None, "embedding", "patch"),
    "head.weight": (None, "head", "head"),
    "blocks.11.mlp.fc1.weight": (11, "mlp", "mlp_in"),
    "patch_embed.proj.weight": (None, "embedding", "patch"),
    "blocks.0.ls1.gamma": (0, "other", "other"),
    # torch.nn.TransformerEncoder / Transformer
    "layers.1.self_attn.in_proj_weight": (1, "attention", "qkv"),
    "layers.1.self_attn.out_proj.weight": (1, "attention", "attn_out"),
    "layers.1.linear2.weight": (1, "mlp", "mlp_out"),
    "decoder.layers.0.multihead_attn.in_proj_weight": (0, "attention", "qkv"),
    # torchvision ViT
    "encoder.layers.encoder_layer_3.self_attention.in_proj_weight": (3, "attention", "qkv"),
    "encoder.layers.encoder_layer_3.mlp.3.weight": (3, "mlp", "mlp_out"),
    "encoder.pos_embedding": (None, "position", "position"),
    # Hugging Face GPT-2
    "transformer.h.3.attn.c_attn.weight": (3, "attention", "qkv"),
    "transformer.h.3.attn.c_proj.weight": (3, "attention", "attn_out"),
    "transformer.h.3.mlp.c_fc.weight": (3, "mlp", "mlp_in"),
    "transformer.h.3.mlp.c_proj.weight": (3, "mlp", "mlp_out"),
    "transformer.h.3.ln_2.weight": (3, "norm", "norm"),
    "transformer.wte.weight": (None, "embedding", "token"),
    "transformer.wpe.weight": (None, "position", "position"),
    "transformer.ln_f.bias": (None, "norm", "norm"),
    # Hugging Face BERT
    "bert.encoder.layer.2.attention.self.query.weight": (2, "attention", "q"),
    "bert.encoder.layer.2.attention.self.key.weight": (2, "attention", "k"),
    "bert.encoder.layer.2.attention.self.value.weight": (2, "attention", "v"),
    "bert.encoder.layer.2.attention.output.dense.weight": (2, "attention", "attn_out"),
    "bert.encoder.layer.2.attention.output.LayerNorm.weight": (2, "norm", "norm"),
    "bert.encoder.layer.2.intermediate.dense.weight": (2, "mlp", "mlp_in"),
    "bert.encoder.layer.2.output.dense.weight": (2, "mlp", "mlp_out"),
    "bert.embeddings.token_type_embeddings.weight": (None, "embedding", "segment"),
    "bert.pooler.dense.weight": (None, "head", "pooler"),
    "classifier.weight": (None, "head", "head"),
    # Hugging Face ViT, transformers 4 names and 5 names
    "vit.encoder.layer.5.attention.attention.key.weight": (5, "attention", "k"),
    "vit.encoder.layer.5.attention.output.dense.weight": (5, "attention", "attn_out"),
    "vit.encoder.layer.5.layernorm_before.weight": (5, "norm", "norm"),
    "vit.layers.5.attention.o_proj.weight": (5, "attention", "attn_out"),
    "vit.embeddings.position_embeddings": (None, "position", "position"),
    # LLaMA-style and T5
    "model.layers.7.self_attn.q_proj.weight": (7, "attention", "q"),
    "model.layers.7.mlp.gate_proj.weight": (7, "mlp", "mlp_in"),
    "model.layers.7.mlp.down_proj.weight": (7, "mlp", "mlp_out"),
    "model.layers.7.post_attention_layernorm.weight": (7, "norm", "norm"),
    "encoder.block.1.layer.0.SelfAttention.v.weight": (1, "attention", "v"),
    "encoder.block.1.layer.1.DenseReluDense.wo.weight": (1, "mlp", "mlp_out"),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (0, "position", "position"),
    # wrappers and a CNN
    "module.blocks.2.attn.proj.weight": (2, "attention", "attn_out"),
    "_orig_mod.model.blocks.2.mlp.2.bias": (2, "bias", "bias"),
    "layer1.0.conv1.weight": (None, "conv", "conv"),
}


def _tiny_vit(depth: int) -> nn.Module:
    return ss.build_model("vit", num_classes=3, image_size=8, patch_size=4, in_channels=1, dim=8, depth=depth,
                          heads=2, mlp_dim=8, seed=0)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_names_map_to_the_hand_written_block_kind_and_part(name):
    """Each convention's names give the block, kind and part read off the library's module tree."""
    assert (layer_block(name), layer_kind(name), layer_part(name)) == EXPECTED[name]


def test_module_type_decides_where_the_name_is_silent():
    """A LayerNorm called ``g`` is a norm, an Embedding called ``table`` an embedding (owner type wins)."""
    assert layer_kind("g.weight", nn.LayerNorm(4)) == "norm"
    assert layer_kind("g.bias", nn.LayerNorm(4)) == "norm"
    assert layer_kind("table.weight", nn.Embedding(5, 4)) == "embedding"
    assert layer_kind("table.weight") == "other"  # the name alone does not say it
    assert layer_kind("stem.weight", nn.Conv2d(1, 2, 3)) == "conv"


_TORCH_PARTS = {"qkv", "attn_out", "mlp_in", "mlp_out"}
_HF_PARTS = {"q", "k", "v", "attn_out", "mlp_in", "mlp_out"}


def _tiny_model(which: str) -> tuple[nn.Module, set[str], set[str]]:
    """(model with 2 blocks, the parts of each block's filtered tensors, kinds of the filtered tensors outside)."""
    if which == "sharpscope_vit":
        return _tiny_vit(2), _TORCH_PARTS, {"embedding", "position", "head"}
    if which == "torch_encoder":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # enable_nested_tensor is irrelevant here
            return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2), _TORCH_PARTS, set()
    transformers = pytest.importorskip("transformers")
    hidden = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "num_hidden_layers": 2}
    if which == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config), _TORCH_PARTS, {"embedding", "position"}
    if which == "bert":
        config = transformers.BertConfig(vocab_size=40, max_position_embeddings=16, num_labels=3, **hidden)
        return transformers.BertForSequenceClassification(config), _HF_PARTS, {"embedding", "position", "head"}
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=3, **hidden)
    return transformers.ViTForImageClassification(config), _HF_PARTS, {"embedding", "position", "head"}


@pytest.mark.parametrize("which", ["sharpscope_vit", "torch_encoder", "gpt2", "bert", "hf_vit"])
def test_every_parameter_of_real_models_is_grouped(which):
    """Every tensor gets a known kind (none falls through to "other"); ``filtered`` is exactly ``ndim > 1``
    of the tensor itself; LayerNorm and biases are never filtered; each block holds exactly the
    architecture's projections, and outside the blocks only embeddings, position embeddings and the head."""
    model, block_parts, outside = _tiny_model(which)
    groups = layer_groups(model).set_index("layer")
    params = dict(model.named_parameters())
    assert list(groups.index) == list(params)
    assert set(groups["kind"]) <= set(KINDS) - {"other"} and set(groups["part"]) <= set(PARTS)
    assert groups["filtered"].to_dict() == {n: p.ndim > 1 for n, p in params.items()}
    assert not groups.loc[groups["kind"].isin(["norm", "bias"]), "filtered"].any()
    assert (groups.loc[[n for n in params if n.endswith("bias")], "kind"].isin(["norm", "bias"])).all()
    kept = groups[groups["filtered"]]
    inside = kept[kept["block"].notna()]
    assert sorted(inside["block"].unique()) == [0, 1]
    for _, cell in inside.groupby("block"):
        assert sorted(cell["part"]) == sorted(block_parts)
    assert set(kept.loc[kept["block"].isna(), "kind"]) == outside


def test_shapes_mapping_names_only_and_frozen_tensors():
    """A state_dict-like mapping gives the same table as the model; from names alone ``filtered`` is
    unknown; a frozen tensor is not filtered (ZSharp only sees trainable ones)."""
    model = _tiny_vit(depth=1)
    from_model = layer_groups(model)
    from_shapes = layer_groups({n: tuple(p.shape) for n, p in model.named_parameters()})
    pd.testing.assert_frame_equal(from_model, from_shapes)
    assert layer_groups(list(from_model["layer"]))["filtered"].isna().all()
    model.pos_embed.requires_grad_(False)
    assert not layer_groups(model).set_index("layer").loc["pos_embed", "filtered"]


# --- the figure -------------------------------------------------------------------------------------------
def _vit_names(depth: int) -> list[str]:
    model = _tiny_vit(depth)
    return [n for n, p in model.named_parameters() if p.ndim > 1]


def _log(depth: int = 12, steps: int = 3, seed: int = 0) -> pd.DataFrame:
    """A masks.csv-like table: random statistics per (step, filtered tensor) of a 12-block ViT."""
    rng = np.random.default_rng(seed)
    names = _vit_names(depth)
    rows = [{"step": s, "layer": n, "kept_fraction": rng.uniform(0.04, 0.2), "energy_kept": rng.uniform(0.1, 0.9),
             "perturbation_norm": rng.uniform(0.01, 0.1), "threshold": rng.uniform(1, 3)}
            for s in range(steps) for n in names]
    return pd.DataFrame(rows)


def _panels(fig) -> dict[str, np.ndarray]:
    """The drawn cell values of each panel, keyed by the panel's first y tick label."""
    out = {}
    for ax in fig.axes[:-1]:  # the last one is the colour bar
        if not ax.collections or not ax.get_yticklabels():
            continue
        out[ax.get_yticklabels()[0].get_text()] = np.ma.filled(ax.collections[0].get_array(), np.nan)
    return out


def test_figure_cells_are_means_over_the_tensors_of_a_block_and_kind():
    """By kind, each drawn cell is the mean (over steps, then over the cell's tensors) of the input
    table's kept fraction in percent, recomputed here by hand from the tensor names."""
    log = _log()
    per_layer = log.groupby("layer")["kept_fraction"].mean() * 100
    fig = ssplot.plot_layer_selection(log, "kept_fraction", by="kind")
    panels = _panels(fig)
    block = panels["0"]
    assert block.shape == (12, 2)
    for b in range(12):
        attention = np.mean([per_layer[f"blocks.{b}.attn.qkv.weight"], per_layer[f"blocks.{b}.attn.proj.weight"]])
        mlp = np.mean([per_layer[f"blocks.{b}.mlp.0.weight"], per_layer[f"blocks.{b}.mlp.2.weight"]])
        np.testing.assert_allclose(block[b], [attention, mlp], rtol=1e-12)
    embedding = np.mean([per_layer["patch_embed.weight"], per_layer["cls_token"]])
    np.testing.assert_allclose(panels["input"], [[embedding, per_layer["pos_embed"]]], rtol=1e-12)
    np.testing.assert_allclose(panels["output"], [[per_layer["head.weight"]]], rtol=1e-12)
    block_ax = next(ax for ax in fig.axes if ax.get_yticklabels() and ax.get_yticklabels()[0].get_text() == "0")
    assert [t.get_text() for t in block_ax.get_yticklabels()] == [str(b) for b in range(12)]
    assert [t.get_text() for t in block_ax.get_xticklabels()] == ["attn", "MLP"]
    assert "Entries kept (%)" in fig.axes[-1].get_ylabel()  # the colour bar says what and in which unit
    plt.close(fig)


def test_perturbation_share_cells_sum_the_per_step_shares():
    """``perturbation_share`` from a log: each step's ``||e_t||^2 / sum ||e||^2``, averaged over steps, summed
    over a cell's tensors (recomputed with numpy); by part every block cell holds one tensor."""
    log = _log(depth=3)
    sq = log["perturbation_norm"] ** 2
    share = (sq / sq.groupby(log["step"]).transform("sum")).groupby(log["layer"]).mean() * 100
    table = ssplot.layer_selection_table(log, "perturbation_share", by="kind").set_index(["position", "column"])
    np.testing.assert_allclose(table.loc[("input", "embedding"), "value"],
                               share["patch_embed.weight"] + share["cls_token"], rtol=1e-12)
    fig = ssplot.plot_layer_selection(log, "perturbation_share", by="part")
    block = _panels(fig)["0"]
    expected = [[share[f"blocks.{b}.{t}.weight"] for t in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
                for b in range(3)]
    np.testing.assert_allclose(block, expected, rtol=1e-12)
    assert np.isclose(table["value"].sum(), 100.0)
    plt.close(fig)


def test_figure_from_mask_statistics_of_a_real_vit():
    """On a real mask_statistics result the drawn kept fraction per part equals the result's own column."""
    torch.manual_seed(0)
    model = _tiny_vit(depth=2)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    stats = ss.mask_statistics(model, F.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])], progress=False)
    fig = ssplot.plot_layer_selection(stats)
    by_layer = stats.set_index("layer")["kept_fraction"] * 100
    block = _panels(fig)["0"]
    np.testing.assert_allclose(block[1], [by_layer[f"blocks.1.{t}.weight"]
                                          for t in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")], rtol=1e-12)
    plt.close(fig)


def test_encoder_decoder_rows_are_labelled_by_stack():
    """nn.Transformer numbers encoder and decoder blocks from 0 each: rows say which stack."""
    model = nn.Transformer(8, 2, 2, 1, 16, batch_first=True)
    names = [n for n, p in model.named_parameters() if p.ndim > 1]
    fig = ssplot.plot_layer_selection(pd.DataFrame({"layer": names, "kept_fraction": 0.05}))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["encoder 0", "encoder 1", "decoder 0"]
    plt.close(fig)


@pytest.mark.parametrize("call", [
    lambda: ssplot.plot_layer_selection(_log(depth=1), "no_such_column"),
    lambda: ssplot.plot_layer_selection(_log(depth=1), by="block"),
    lambda: ssplot.plot_layer_selection(_log(depth=1), agg="median"),
    lambda: ssplot.plot_layer_selection({"a": _log(depth=1), "b": _log(depth=1)}),
    lambda: ssplot.plot_layer_selection(pd.DataFrame({"layer": ["conv1.weight", "fc.weight"],
                                                      "kept_fraction": [0.05, 0.05]})),
    lambda: ssplot.plot_layer_selection(_log(depth=1).assign(kept_fraction=np.nan)),
    lambda: layer_groups(42),
    lambda: layer_groups({}),
    lambda: layer_groups({"w": "big"}),
    lambda: layer_kind(""),
])
def test_bad_input_is_one_line_user_input_error(call):
    """Unknown value/by/agg, two runs at once, no transformer block, NaN values, bad sources or names."""
    with pytest.raises(UserInputError) as info:
        call()
    assert "\n" not in str(info.value)
    plt.close("all")
