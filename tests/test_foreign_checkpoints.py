"""Checkpoints written by other tools, each file written the way that tool writes it, loaded by
:func:`sharpscope.train.load_checkpoint` into the architecture they hold.

The independent reference in every test is the model that was saved: after loading, every tensor of
the rebuilt model equals the saved model's tensor bit for bit (and its outputs on the same input).
Lightning and timm are not installed here: their files are written with the dict layout their saving
code produces (``pytorch_lightning``'s ``_dump_checkpoint``, timm's ``CheckpointSaver``), which is what
the loader sees; DDP's ``module.`` keys come from ``nn.DataParallel``, which names them identically.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sharpscope.errors import UserInputError
from sharpscope.models import build_model
from sharpscope.train import load_checkpoint
from sharpscope.train.checkpoint import MissingModelError, Opaque, _read, read_checkpoint

SPEC = {"name": "mlp", "num_classes": 10, "kwargs": {"hidden": [16]}}


class LitNet(nn.Module):
    """What a LightningModule's state_dict looks like: the network under an attribute (``self.model``
    in the official ZSharp code, ``self.net`` in others), plus a loss module without state."""

    def __init__(self, net: nn.Module, attribute: str = "model") -> None:
        super().__init__()
        setattr(self, attribute, net)
        self.criterion = nn.CrossEntropyLoss()


@pytest.fixture
def trained():
    """A zoo model with non-default weights (so a loader that silently kept fresh weights would fail)."""
    model = build_model("mlp", 10, hidden=(16,))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def _assert_same(loaded: nn.Module, saved: nn.Module) -> None:
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), saved.eval()(x), rtol=0, atol=0)


def _lightning_ckpt(module: nn.Module) -> dict:
    """The keys of ``pytorch_lightning.trainer.connectors.checkpoint_connector.dump_checkpoint`` (2.x)."""
    return {"epoch": 4, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": module.state_dict(),
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"completed": 4}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_acc'}": {"best_model_score": torch.tensor(0.91)}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}],
            "lr_schedulers": [{"last_epoch": 4}], "hparams_name": "hparams",
            "hyper_parameters": {"lr": 1e-3, "model_name": "mlp"}}


def _lightning_1_2_ckpt(module: nn.Module) -> dict:
    """What pytorch-lightning 1.2 (the official ZSharp code's pin) writes: the hparams class and the state of
    warmup_scheduler.GradualWarmupScheduler, which holds its after_scheduler object (and that its optimizer)."""
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    return {"epoch": 199, "global_step": 78000, "pytorch-lightning_version": "1.2.1", "state_dict": module.state_dict(),
            "optimizer_states": [opt.state_dict()], "hparams_type": argparse.Namespace,
            "lr_schedulers": [{"multiplier": 1.0, "total_epoch": 1, "after_scheduler": cosine, "finished": True}],
            "hyper_parameters": {"lr": 1e-3, "model_name": "vit", "zsam": True, "alpha": 0.95}}


def test_every_writer_layout_loads_the_saved_weights(tmp_path, trained):
    """Bare state_dict, DDP (module.), Lightning 2.x and 1.2 .ckpt files, the official ZSharp code's
    LightningModule state_dict, a CIFAR script's {'net': DataParallel, 'acc', 'epoch'}, the PyTorch
    tutorial's dict and torch.compile."""
    sd = trained.state_dict()
    files = {
        "plain.pt": (sd, "state_dict"),
        "ddp.pt": (nn.DataParallel(trained).state_dict(), "state_dict"),
        "lightning.ckpt": (_lightning_ckpt(LitNet(trained)), "lightning"),
        "lightning_1_2.ckpt": (_lightning_1_2_ckpt(LitNet(trained)), "lightning"),
        "zsharp_weights.pth": (LitNet(trained).state_dict(), "state_dict"),  # torch.save(net.state_dict())
        "cifar_script.pth": ({"net": nn.DataParallel(trained).state_dict(), "acc": 93.5, "epoch": 199},
                             "training-script"),
        "tutorial.tar": ({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {"state": {}},
                          "loss": torch.tensor(0.3)}, "training-script"),
        "compiled.pt": ({f"_orig_mod.{k}": v for k, v in sd.items()}, "state_dict"),
    }
    for name, (obj, source) in files.items():
        torch.save(obj, tmp_path / name)
        ckpt = load_checkpoint(tmp_path / name, spec=SPEC)
        assert ckpt.is_bare and ckpt.source_format == source, name
        _assert_same(ckpt.model, trained)
        assert set(ckpt.state_dict) == set(sd)


def test_lightning_module_naming_its_network_net_is_fitted_to_the_model(tmp_path, trained):
    """A LightningModule with ``self.net`` (no known prefix): given the model, the shared ``net.`` is removed."""
    torch.save(_lightning_ckpt(LitNet(trained, "net")), tmp_path / "net.ckpt")
    _assert_same(load_checkpoint(tmp_path / "net.ckpt", spec=SPEC).model, trained)


def test_model_whose_own_keys_start_with_model_keeps_them(tmp_path, trained):
    """Prefixes are removed only when needed: a wrapper whose real keys are ``model.*`` loads unchanged."""
    wrapper = LitNet(trained)
    torch.save(wrapper.state_dict(), tmp_path / "w.pt")
    into = LitNet(build_model("mlp", 10, hidden=(16,)))
    load_checkpoint(tmp_path / "w.pt", model=into)
    _assert_same(into.model, trained)


def test_timm_checkpoint_with_pickled_args_loads_without_running_code(tmp_path, trained):
    """timm's CheckpointSaver pickles ``args`` (an argparse.Namespace) and a numpy metric: weights_only refuses
    them; they are read as inert placeholders; the training weights are preferred to the EMA copy."""
    import numpy as np

    ema = {k: v + 1 for k, v in trained.state_dict().items()}
    saved = {"epoch": 10, "arch": "mlp", "state_dict": trained.state_dict(), "optimizer": {"state": {}},
             "version": 2, "args": argparse.Namespace(model="mlp", lr=0.1), "state_dict_ema": ema,
             "metric": np.float64(91.5)}
    torch.save(saved, tmp_path / "timm.pth.tar")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "timm.pth.tar", weights_only=True)  # the premise: plain safe loading refuses it
    ckpt = load_checkpoint(tmp_path / "timm.pth.tar", spec=SPEC)
    assert ckpt.source_format == "timm"
    _assert_same(ckpt.model, trained)
    torch.save({"epoch": 10, "state_dict_ema": ema, "args": argparse.Namespace(model="mlp")}, tmp_path / "ema.pt")
    assert torch.equal(load_checkpoint(tmp_path / "ema.pt", spec=SPEC).model.state_dict()["net.0.weight"],
                       ema["net.0.weight"])


def test_placeholders_never_call_the_pickled_globals(tmp_path):
    """A file whose pickle would call ``builtins.exec`` at load (torch.load(weights_only=False) would run it):
    the call reaches an :class:`Opaque`, not exec."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, (f"import pathlib; pathlib.Path({str(tmp_path / 'pwned')!r}).write_text('ran')",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": Evil(), "tags": {"a"}}, path, pickle_module=pickle)
    weights, raw = read_checkpoint(path)
    assert torch.equal(weights["w"], torch.ones(2)) and raw == {}
    assert not (tmp_path / "pwned").exists()
    hook = _read(path, "cpu")["hook"]
    assert isinstance(hook, Opaque) and hook.name == "builtins.exec" and "pwned" in hook.args[0]
    assert _read(path, "cpu")["tags"] == {"a"}  # what weights_only allows (a set) is still itself


def test_pickled_module_is_still_refused(tmp_path):
    """torch.save(model) (weights inside a pickled module, even beside other keys) is refused with advice."""
    torch.save({"model": nn.Linear(2, 2), "epoch": 1}, tmp_path / "m.pt")
    with pytest.raises(UserInputError, match="safe loading .* refuses.*save model.state_dict"):
        load_checkpoint(tmp_path / "m.pt", spec=SPEC)


def test_safetensors_file_loads(tmp_path, trained):
    """``safetensors.torch.save_file(model.state_dict(), path)`` (recognised by its header, not its name)."""
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "weights.bin"))
    ckpt = load_checkpoint(tmp_path / "weights.bin", spec=SPEC)
    assert ckpt.source_format == "safetensors"
    _assert_same(ckpt.model, trained)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "weights.bin").read_bytes()[:200])
    with pytest.raises(UserInputError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "cut.safetensors", spec=SPEC)


def test_prefix_is_stripped_only_when_every_key_has_it(tmp_path, trained):
    """One key without ``module.``: nothing is stripped, and the error names a few keys of both sides."""
    sd = {f"module.{k}": v for k, v in trained.state_dict().items()}
    sd["extra_scale"] = torch.ones(1)
    torch.save(sd, tmp_path / "mixed.pt")
    assert set(read_checkpoint(tmp_path / "mixed.pt")[0]) == set(sd)
    with pytest.raises(UserInputError) as info:
        load_checkpoint(tmp_path / "mixed.pt", spec=SPEC)
    message = str(info.value)
    assert "\n" not in message
    assert "missing (e.g. net.0.weight)" in message and "unexpected (e.g. module.net.0.weight)" in message
    assert "file keys: module.net.0.weight, module.net.0.bias, module.net.2.weight" in message
    assert "model keys: net.0.weight, net.0.bias, net.2.weight" in message
    assert "Give the model it was saved from" in message


def test_bare_file_without_architecture_says_what_to_pass(tmp_path, trained):
    """No model= / spec=: a MissingModelError (a UserInputError) that keeps the path for the CLI's own advice."""
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    with pytest.raises(MissingModelError, match="pass model= .* or spec=") as info:
        load_checkpoint(tmp_path / "w.pt")
    assert info.value.path == tmp_path / "w.pt" and isinstance(info.value, UserInputError)


# ------------------------------------------------------------------ the command line: --model for weights only

def _cli(*args: str) -> int:
    from sharpscope.cli import main

    return main(["analyze", *args, "--zscores", "--samples", "64", "--batch-size", "32", "--quiet", "--threads", "1"])


def test_cli_model_flag_analyses_a_bare_state_dict_like_the_native_checkpoint(tmp_path, trained):
    """--model mlp on a DDP state_dict gives the same Z-scores as the sharpscope checkpoint of the same weights
    (digest-checked on load); the input shape (in_features=64) comes from the dataset, as `sharpscope train`
    passes it."""
    from sharpscope.analysis.results import load_result
    from sharpscope.train import save_checkpoint

    torch.save(nn.DataParallel(trained).state_dict(), tmp_path / "ddp.pt")
    save_checkpoint(tmp_path / "native.pt", {"state_dict": trained.state_dict(), "model_spec":
                                             {"name": "mlp", "num_classes": 10, "kwargs": {"in_features": 64,
                                                                                           "hidden": [16]}}})
    # one run for both (the dataset is read once): the native file's weights go into the --model as well
    assert _cli(str(tmp_path / "ddp.pt"), str(tmp_path / "native.pt"), "--model", "mlp", "--model-arg",
                "hidden=[16]", "--out", str(tmp_path / "out")) == 0
    a = load_result(tmp_path / "out" / "ddp__zscores.nc").to_dataframe()
    b = load_result(tmp_path / "out" / "native__zscores.nc").to_dataframe()
    numeric = a.select_dtypes("number").columns
    assert len(a) and a[numeric].equals(b[numeric])


@pytest.mark.parametrize("argv, needle", [
    ([], "holds weights but not which model they belong to: say it with --model NAME --num-classes N"),
    (["--model", "timm:resnet18"], "model timm:resnet18 needs timm, which cannot be imported here"),
    (["--model", "timm:"], "names no timm model"),
    (["--model", "resnet-7"], "unknown model 'resnet-7'"),
    (["--num-classes", "10"], "--num-classes describes the --model to build; add --model NAME"),
    (["--model", "mlp", "--model-arg", "hidden"], "--model-arg 'hidden' must be KEY=VALUE"),
    (["--model", "mlp", "--model-arg", "hidden=[32]"],
     r"does not fit MLP: 3 with another shape \(e.g. net.0.weight: \(16, 64\) in the file, \(32, 64\)"),
    (["--model", "mlp", "--hf", "x"], "either --model .* or --hf"),
    (["--task", "causal-lm"], "--task chooses the head of an --hf model"),
])
def test_cli_model_errors_are_one_line(tmp_path, trained, capsys, argv, needle):
    """Each wrong or missing model flag: exit 2 and one line saying what to do (timm is not importable here:
    only its error path and the timm:NAME parsing are tested)."""
    import re

    torch.save(trained.state_dict(), tmp_path / "w.pt")
    assert _cli(str(tmp_path / "w.pt"), *argv, "--out", str(tmp_path / "out")) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sharpscope analyze: error: ")
    assert re.search(needle, lines[0]), lines[0]


def test_model_options_parse_json_values():
    """KEY=VALUE pairs: JSON numbers and lists, anything else a string."""
    from sharpscope.commands.analyze import model_options

    assert model_options(["width=16", "hidden=[64, 64]", "act=gelu", "scale=0.5"]) == {
        "width": 16, "hidden": [64, 64], "act": "gelu", "scale": 0.5}


def test_timm_names_are_parsed_without_importing_timm():
    """timm:NAME keeps timm's (case-sensitive) name; specs of timm models round-trip through model_spec."""
    import sys

    from sharpscope.models import canonical_model_name, model_spec

    assert canonical_model_name("TIMM:vit_tiny_patch16_224") == "timm:vit_tiny_patch16_224"
    assert model_spec("timm:resnet18", 10)["name"] == "timm:resnet18"
    assert "timm" not in sys.modules
