"""Hugging Face models built offline (:func:`sharpscope.models.hf_model`), ``save_pretrained`` folders and
safetensors files as checkpoints, and ``sharpscope analyze --hf PATH --data FILE`` on them.

Independent references: the model object that was saved (its weights and logits, bit for bit), the
model's own ``.loss`` against sharpscope's token cross-entropy on the same tokens, and the Python API
on the same batches for what the command line writes. Tiny configs keep every test under a few seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_model  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

from sharpscope.analysis.results import load_result  # noqa: E402
from sharpscope.cli import main  # noqa: E402
from sharpscope.errors import UserInputError  # noqa: E402
from sharpscope.models import hf_model  # noqa: E402
from sharpscope.train import load_checkpoint  # noqa: E402

GPT2 = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(**GPT2)).eval()


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2 written by save_pretrained (lm_head.weight is tied to the embedding and left out)."""
    folder = tmp_path_factory.mktemp("gpt2")
    model = _gpt2()
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    """12 sequences of 8 tokens, some padded: without labels, and with the labels Hugging Face expects."""
    folder = tmp_path_factory.mktemp("tokens")
    ids = torch.randint(0, 50, (12, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::3, -3:] = 0
    torch.save({"input_ids": ids, "attention_mask": mask}, folder / "lm.pt")
    torch.save({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)},
               folder / "lm_labels.pt")
    return folder


def _same_logits(a, b, **inputs) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(**inputs).logits, b(**inputs).logits, rtol=0, atol=0)


def test_save_pretrained_folders_load_bit_for_bit(tmp_path, gpt2_folder):
    """Causal LM (tied head), image classification (ViT) and sequence classification (BERT) folders."""
    folder, gpt2 = gpt2_folder
    ids = torch.randint(0, 50, (2, 8))
    _same_logits(hf_model(folder), gpt2, input_ids=ids)
    vit = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                              num_labels=3)).eval()
    vit.save_pretrained(tmp_path / "vit")
    _same_logits(hf_model(tmp_path / "vit"), vit, pixel_values=torch.randn(2, 3, 8, 8))
    bert = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=16, num_labels=4)).eval()
    bert.save_pretrained(tmp_path / "bert")
    loaded = hf_model(tmp_path / "bert")
    assert type(loaded).__name__ == "BertForSequenceClassification" and loaded.sharpscope_hf["pretrained"]
    _same_logits(loaded, bert, input_ids=torch.randint(0, 30, (2, 6)))


def test_folder_as_checkpoint_with_and_without_a_model(tmp_path, gpt2_folder):
    """load_checkpoint(folder) rebuilds the model; model= gets the weights, the tied head through its twin;
    a safetensors.torch.save_model file (tied duplicate dropped) loads the same way."""
    folder, gpt2 = gpt2_folder
    ids = torch.randint(0, 50, (2, 8))
    ckpt = load_checkpoint(folder)
    assert ckpt.source_format == "huggingface" and ckpt.spec is None
    _same_logits(ckpt.model, gpt2, input_ids=ids)
    into = GPT2LMHeadModel(GPT2Config(**GPT2))
    load_checkpoint(folder, model=into)
    _same_logits(into.eval(), gpt2, input_ids=ids)
    assert into.lm_head.weight.data_ptr() == into.transformer.wte.weight.data_ptr()  # still tied
    save_model(gpt2, str(tmp_path / "gpt2.safetensors"))
    other = GPT2LMHeadModel(GPT2Config(**GPT2))
    assert load_checkpoint(tmp_path / "gpt2.safetensors", model=other).source_format == "safetensors"
    _same_logits(other.eval(), gpt2, input_ids=ids)


def test_configs_build_offline(tmp_path, gpt2_folder):
    """config.json alone, a dict with model_type, or a config object: a fresh model, seeded reproducibly."""
    folder, _ = gpt2_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    a, b = hf_model(tmp_path / "config.json", seed=3), hf_model(tmp_path, seed=3)
    assert not a.sharpscope_hf["pretrained"] and type(a).__name__ == "GPT2LMHeadModel"
    assert torch.equal(a.transformer.h[0].attn.c_attn.weight, b.transformer.h[0].attn.c_attn.weight)
    model = hf_model({"model_type": "gpt2", **GPT2}, task="causal-lm", seed=0)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_embd == 16
    head = hf_model(GPT2Config(**GPT2), task="sequence-classification", num_labels=3)
    assert head.score.out_features == 3


@pytest.mark.parametrize("source, task, match", [
    ("missing", None, "does not exist"),
    ("no_type", None, "has no model_type"),
    ("remote", None, "never runs it"),
    ("bare", None, "give task="),
    ("bare", "translation", "unknown task 'translation'"),
])
def test_bad_sources_are_one_line_errors(tmp_path, source, task, match):
    """Nothing is downloaded and nothing shipped with a model runs: each bad source is one UserInputError."""
    configs = {"no_type": {"n_layer": 1}, "remote": {"model_type": "gpt2", "auto_map": {"AutoModel": "x.Y"}},
               "bare": {"model_type": "gpt2", **GPT2}}
    path = tmp_path / "config.json"
    if source in configs:
        path.write_text(json.dumps(configs[source]))
    with pytest.raises(UserInputError, match=match) as info:
        hf_model(path, task=task)
    assert "\n" not in str(info.value)


def _analyze(*args: str) -> int:
    return main(["analyze", *args, "--quiet", "--threads", "1"])


def test_cli_hf_folder_with_token_files(tmp_path, gpt2_folder, token_files):
    """Token cross-entropy on unlabelled tokens (--hf, default loss lm) and the model's own .loss on labelled
    ones (the folder given as a checkpoint, default loss hf) give the same gradient Z-scores (two independent
    loss paths); what the command writes equals the Python API's result on the same batches."""
    from sharpscope.analysis.gradients import gradient_zscores
    from sharpscope.analysis.objective import TokenCrossEntropy

    folder, gpt2 = gpt2_folder
    common = ["--zscores", "--batch-size", "5"]
    assert _analyze("--hf", str(folder), *common, "--data", str(token_files / "lm.pt"),
                    "--out", str(tmp_path / "lm")) == 0
    assert _analyze(str(folder), *common, "--data", str(token_files / "lm_labels.pt"),
                    "--out", str(tmp_path / "hf")) == 0
    lm = load_result(tmp_path / "lm" / f"{folder.name}__zscores.nc").to_dataframe()
    hf = load_result(tmp_path / "hf" / f"{folder.name}__zscores.nc").to_dataframe()
    numeric = lm.select_dtypes("number").columns
    assert len(lm) and len(numeric)
    torch.testing.assert_close(torch.tensor(lm[numeric].to_numpy()), torch.tensor(hf[numeric].to_numpy()),
                               rtol=1e-5, atol=1e-7)
    data = torch.load(token_files / "lm.pt")
    batches = [{k: v[i:i + 5] for k, v in data.items()} for i in range(0, 12, 5)]
    api = gradient_zscores(hf_model(folder), TokenCrossEntropy(), batches, progress=False).to_dataframe()
    torch.testing.assert_close(torch.tensor(api[numeric].to_numpy()), torch.tensor(lm[numeric].to_numpy()),
                               rtol=1e-5, atol=1e-7)


def test_cli_weights_file_with_hf_architecture(tmp_path, gpt2_folder, token_files):
    """A Lightning checkpoint of a GPT-2 ({"state_dict": {"model.…"}}), told its architecture by --hf config."""
    folder, gpt2 = gpt2_folder
    weights = {f"model.{k}": v for k, v in gpt2.state_dict().items()}
    torch.save({"state_dict": weights, "epoch": 1, "pytorch-lightning_version": "2.4.0"}, tmp_path / "lm.ckpt")
    code = _analyze(str(tmp_path / "lm.ckpt"), "--hf", str(folder / "config.json"), "--data",
                    str(token_files / "lm.pt"), "--zscores", "--out", str(tmp_path / "out"))
    assert code == 0 and (tmp_path / "out" / "lm__zscores.nc").is_file()


def test_tensor_files_as_data(tmp_path):
    """--data FILE: a .safetensors or .pt dict of tensors, a seeded subset in file order cut into dict batches;
    a file that is not such a dict is one line naming what is wrong."""
    from safetensors.torch import save_file

    from sharpscope.commands.analyze import TensorFile, sample_batches

    ids = torch.arange(40).reshape(10, 4)
    save_file({"input_ids": ids, "labels": ids.clone()}, str(tmp_path / "d.safetensors"))
    data = TensorFile.read(tmp_path / "d.safetensors")
    assert len(data) == 10 and torch.equal(data.tensors["input_ids"], ids)
    batches = sample_batches(data, samples=7, batch_size=3, seed=0)
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    rows = torch.cat([b["input_ids"][:, 0] for b in batches]) // 4
    assert torch.equal(rows, torch.sort(rows).values) and len(set(rows.tolist())) == 7  # distinct, in file order
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in batches)  # rows stay aligned across keys
    torch.save({"input_ids": ids, "labels": ids[:9]}, tmp_path / "ragged.pt")
    torch.save(ids, tmp_path / "tensor.pt")
    for name, match in [("ragged.pt", "same first dimension .* input_ids: 10, labels: 9"),
                        ("tensor.pt", "must hold a dict of named tensors"), ("none.pt", "does not exist")]:
        with pytest.raises(UserInputError, match=match):
            TensorFile.read(tmp_path / name)
