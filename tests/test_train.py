"""The training loop and ``sharpscope train``: every optimizer learns digits, the two-pass step equals a
hand-written SAM step, BatchNorm bypass, schedules, exact resume, logs, and CLI bad input."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sharpscope.cli import main
from sharpscope.data import load_dataset
from sharpscope.models import build_model
from sharpscope.optim import MASK_STATS_COLUMNS
from sharpscope.train import PAPER_PRESET, TrainConfig, TrainingDiverged, fit, load_checkpoint, lr_factor
from sharpscope.train.metrics import read_metrics


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits"), load_dataset("digits", train=False)


# Measured on the CPU (seed 0, MLP 64-64, 4 epochs, batch 64): test accuracy 0.93-0.96 for every
# optimizer over seeds 0-4; the bound leaves a margin for other BLAS/thread counts.
@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 3e-3), ("adamw", 3e-3), ("sam", 0.05),
                                           ("asam", 0.05), ("zsharp", 0.05), ("fsam", 0.05)])
def test_every_optimizer_learns_digits(digits, optimizer, lr):
    """Train loss falls well below its first-epoch value and test accuracy exceeds 0.90 (measured 0.93-0.96)."""
    train, test = digits
    torch.manual_seed(0)
    result = fit(build_model("mlp", 10), train, test, optimizer=optimizer, base="sgd", lr=lr, epochs=4,
                 batch_size=64, progress=False, seed=0)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.35
    assert result.history[-1]["test_acc"] > 0.90
    assert result.best_test_acc == max(row["test_acc"] for row in result.history)


def test_two_pass_step_equals_hand_written_sam(digits):
    """One SAM step of the loop against SAM written out here: e = rho g/||g||, g' at w + e, SGD(momentum, wd)."""
    train, _ = digits
    small = train.subset(range(32))
    torch.manual_seed(1)
    model = build_model("mlp", 10, hidden=(16,))
    reference = copy.deepcopy(model)
    fit(model, small, optimizer="sam", rho=0.1, lr=0.2, momentum=0.9, weight_decay=1e-3, epochs=1,
        batch_size=32, progress=False)
    x, y = small.tensors()
    params = list(reference.parameters())
    g = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    norm = torch.sqrt(sum((t**2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(0.1 * t / (norm + 1e-12))
    g2 = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    with torch.no_grad():
        for p, t, t2 in zip(params, g, g2):
            p.sub_(0.1 * t / (norm + 1e-12))  # back to w
            p.sub_(0.2 * (t2 + 1e-3 * p))  # first SGD step: the momentum buffer is the gradient itself
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bypass", [True, False])
def test_bn_bypass_updates_running_stats_once(digits, bypass):
    """With the bypass, BN running stats equal those of a single train-mode forward at w (reference copy)."""
    train, _ = digits
    small = train.subset(range(32))
    torch.manual_seed(2)
    model = build_model("cnn", 10, in_channels=1, width=4)
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        reference(small.tensors()[0])
    fit(model, small, optimizer="sam", rho=0.5, epochs=1, batch_size=32, bn_bypass=bypass, progress=False)
    once = torch.allclose(model.bn1.running_mean, reference.bn1.running_mean, atol=1e-6)
    assert once == bypass
    assert int(model.bn1.num_batches_tracked) == (1 if bypass else 2)


def test_paper_schedule_matches_recipe():
    """REFERENCE.md: linear warm-up over 5 epochs, then x0.75 every 30 epochs (hand-computed values)."""
    config = TrainConfig(**PAPER_PRESET)
    spe = 10
    assert lr_factor(config, 0, spe) == pytest.approx(1 / 50)
    assert lr_factor(config, 24, spe) == pytest.approx(25 / 50)
    assert lr_factor(config, 5 * spe, spe) == 1.0
    assert lr_factor(config, 34 * spe + 9, spe) == 1.0
    assert lr_factor(config, 35 * spe, spe) == pytest.approx(0.75)
    assert lr_factor(config, 65 * spe, spe) == pytest.approx(0.5625)
    cosine = TrainConfig(schedule="cosine", epochs=4)
    assert lr_factor(cosine, 0, 5) == 1.0 and lr_factor(cosine, 10, 5) == pytest.approx(0.5)
    assert (config.optimizer, config.base, config.lr, config.weight_decay, config.batch_size, config.epochs,
            config.seed) == ("zsharp", "adam", 1e-3, 5e-5, 256, 200, 52)


def _run(out, epochs, resume, optimizer):
    train = load_dataset("digits").subset(range(192))
    test = load_dataset("digits", train=False).subset(range(64))
    torch.manual_seed(0)
    model = build_model("cnn", 10, in_channels=1, width=4)
    return fit(model, train, test, optimizer=optimizer, base="adam" if optimizer == "fsam" else "sgd", lr=0.01,
               epochs=epochs, batch_size=32, augment=True, schedule="step",
               step_size=1, gamma=0.5, warmup_epochs=0.5, log_mask_every=2, progress=False, out=out, resume=resume)


@pytest.mark.parametrize("optimizer", ["zsharp", "fsam", "adam"])
def test_resume_is_bit_identical(tmp_path, optimizer):
    """2 epochs straight == 1 epoch + resume + 1 epoch: weights, BN buffers, optimizer state, logs."""
    straight = _run(tmp_path / "a", 2, False, optimizer)
    first = _run(tmp_path / "b", 1, False, optimizer)
    assert len(first.history) == 1
    resumed = _run(tmp_path / "b", 2, True, optimizer)
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    drop = lambda h: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in h]  # noqa: E731
    assert drop(straight.history) == drop(resumed.history)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    state = (lambda c: c.optimizer_state.get("base", c.optimizer_state)["state"])  # noqa: E731
    for s1, s2 in zip(state(a).values(), state(b).values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 2
    if optimizer == "zsharp":
        ma, mb = pd.read_csv(tmp_path / "a" / "masks.csv"), pd.read_csv(tmp_path / "b" / "masks.csv")
        pd.testing.assert_frame_equal(ma, mb)


def test_logs_are_tidy(tmp_path, digits):
    """metrics.jsonl has the documented keys per epoch; masks.csv has step/epoch + mask_stats columns."""
    train, test = digits
    fit(build_model("mlp", 10), train.subset(range(256)), test, optimizer="zsharp", epochs=2, batch_size=64,
        log_mask_every=3, progress=False, out=tmp_path)
    metrics = read_metrics(tmp_path / "metrics.jsonl")
    assert list(metrics.columns) == ["epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                                     "time_s", "images_per_s"]
    assert metrics["epoch"].tolist() == [1, 2] and metrics["step"].tolist() == [4, 8]
    masks = pd.read_csv(tmp_path / "masks.csv")
    assert list(masks.columns) == ["step", "epoch", *MASK_STATS_COLUMNS]
    assert sorted(masks["step"].unique()) == [0, 3, 6]
    assert set(masks["layer"]) == {"net.0.weight", "net.2.weight", "net.4.weight"}  # ndim > 1 tensors only
    # strict |z| > tau with tau the linear-interpolated 0.95-quantile keeps at most ceil(0.05 numel) entries
    assert (masks["kept"] <= (0.05 * masks["numel"]).apply(math.ceil)).all() and (masks["kept"] > 0).all()
    assert json.loads((tmp_path / "config.json").read_text())["model_spec"]["name"] == "mlp"


def test_divergence_is_reported(digits):
    """A learning rate of 1e8 gives TrainingDiverged (a one-line user error), not NaN metrics."""
    train, _ = digits
    with pytest.raises(TrainingDiverged, match="training diverged: non-finite train loss in epoch 1; lower --lr"):
        fit(build_model("mlp", 10), train, optimizer="sgd", lr=1e8, epochs=1, progress=False)


def test_bf16_autocast_trains_on_cpu(digits):
    """amp='bf16' runs (CPU autocast) and still learns: accuracy above 0.85 after 3 epochs."""
    train, test = digits
    result = fit(build_model("cnn", 10, in_channels=1), train, test, optimizer="zsharp", amp="bf16", epochs=3,
                 batch_size=64, progress=False)
    assert result.history[-1]["test_acc"] > 0.85


# ------------------------------------------------------------------------------------------ CLI


def test_cli_trains_and_resumes(tmp_path, capsys):
    """`sharpscope train` writes a loadable run; --resume continues it to more epochs."""
    out = tmp_path / "run"
    assert main(["train", "--optimizer", "zsharp", "--epochs", "1", "--batch-size", "256", "--out", str(out),
                 "--quiet", "--lr", "0.05"]) == 0
    assert "done: zsharp on digits, 1 epochs" in capsys.readouterr().out
    assert main(["train", "--epochs", "2", "--out", str(out), "--resume", "--quiet"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.epoch == 2 and ckpt.optimizer_config["name"] == "zsharp" and ckpt.config["lr"] == 0.05
    assert ckpt.raw["metadata"]["dataset"] == "digits" and ckpt.spec["name"] == "mlp"


def test_cli_accumulate_and_ascent_are_stored_and_define_the_run(tmp_path, capsys):
    """--accumulate/--ascent reach the stored config; resuming with another --accumulate is refused (it changes
    the bits: the micro-batch gradients are summed in another order), another --dist-timeout is allowed."""
    out = tmp_path / "run"
    assert main(["train", "--optimizer", "sam", "--epochs", "1", "--batch-size", "256", "--accumulate", "2",
                 "--ascent", "global", "--out", str(out), "--quiet"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.config["accumulate"] == 2 and ckpt.config["ascent"] == "global" and ckpt.raw["world_size"] == 1
    assert main(["train", "--epochs", "2", "--accumulate", "3", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "accumulate (run: 2, now: 3)" in capsys.readouterr().err
    assert main(["train", "--epochs", "2", "--dist-timeout", "60", "--out", str(out), "--resume", "--quiet"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet21"], "unknown model 'resnet21'; choose one of: resnet20"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; choose one of: digits"),
    (["--optimizer", "lion"], "unknown --optimizer 'lion'; choose one of: sgd, adam"),
    (["--dataset", "cifar10", "--data-root", "{tmp}/none"], "no CIFAR data under"),
    (["--out", "{tmp}/file"], "is a file; give a folder"),
    (["--out", "{tmp}/empty", "--resume"], "nothing to resume"),
    (["--out", "{tmp}/trunc", "--resume"], "not a readable checkpoint"),
    (["--rho", "-1", "--optimizer", "sam"], "rho must be a number > 0; got -1.0"),
    (["--lr", "1e9", "--epochs", "1", "--out", "{tmp}/div"], "training diverged"),
    (["--accumulate", "0"], "accumulate must be an integer"),
    (["--dist-timeout", "-5"], "dist_timeout must be a number > 0"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    """Each mistake: exit code 2, one line on stderr naming the problem, no traceback, no checkpoint."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "last.pt").write_bytes(b"PK\x03\x04 cut")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    assert main(["train", "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "div" / "last.pt").exists()


# ------------------------------------------------------------------------------------ divergence


class _BreaksLater(torch.nn.Module):
    """A small MLP that goes bad in epoch ``bad_epoch`` (counted by evaluation calls): its evaluation
    output becomes NaN (``part="test"``) or one of its buffers becomes inf during training
    (``part="weights"``) while the training loss stays finite."""

    def __init__(self, part: str, bad_epoch: int = 2) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        self.register_buffer("scale", torch.ones(()))
        self.part, self.bad_epoch, self.evaluations = part, bad_epoch, 0

    def forward(self, x):
        out = self.net(x)
        if not self.training:
            self.evaluations += 1
            if self.part == "test" and self.evaluations >= self.bad_epoch:
                return out * float("nan")
        elif self.part == "weights" and self.evaluations >= self.bad_epoch - 1:
            self.scale.fill_(float("inf"))  # not used by the output: the training loss stays finite
        return out


@pytest.mark.parametrize("part, what", [("test", "test loss"), ("weights", r"weights \(scale\)")])
def test_divergence_after_a_good_epoch_keeps_the_good_checkpoint(tmp_path, digits, part, what):
    """A run whose test loss (or weights) turns non-finite in epoch 2 stops with one line, and the run
    folder is that of epoch 1: last.pt is epoch 1 with a finite test loss, metrics.jsonl has one row,
    no epoch_0002.pt (an independent check: what epoch 1 alone would have written)."""
    train, test = digits
    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match=f"training diverged: non-finite {what} in epoch 2; lower --lr") \
            as info:
        fit(_BreaksLater(part), train.subset(range(256)), test.subset(range(64)), optimizer="sgd", lr=0.05,
            epochs=3, batch_size=64, save_every=1, progress=False, out=tmp_path)
    assert "\n" not in str(info.value) and "last good checkpoint is kept" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "last.pt", model=_BreaksLater(part))
    assert ckpt.epoch == 1 and math.isfinite(ckpt.history[-1]["test_loss"])
    assert all(torch.isfinite(t).all() for t in ckpt.state_dict.values())
    assert read_metrics(tmp_path)["epoch"].tolist() == [1]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "epoch_0001.pt", "last.pt"]


def test_cli_huge_lr_exits_2_and_writes_no_diverged_checkpoint(tmp_path, capsys):
    """`--lr 100` on digits: the train loss is finite in epoch 1 and NaN in epoch 2 (measured), so the
    command fails with one line (exit 2) and last.pt is the finite epoch 1."""
    out = tmp_path / "run"
    assert main(["train", "--lr", "100", "--epochs", "3", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "training diverged: non-finite train loss in epoch 2" in err
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.epoch == 1 and math.isfinite(ckpt.history[0]["test_loss"])


def test_optimizer_names_are_case_insensitive_on_the_command_line():
    """--optimizer ZSharp is zsharp (as styles are case-insensitive); an unknown name is one line."""
    import argparse

    from sharpscope.errors import UserInputError
    from sharpscope.train.command import _check_names

    args = argparse.Namespace(optimizer="ZSharp", base="SGD", schedule=None, amp=None)
    _check_names(args)
    assert (args.optimizer, args.base) == ("zsharp", "sgd")
    with pytest.raises(UserInputError, match="unknown --optimizer 'Zsharpp'"):
        _check_names(argparse.Namespace(optimizer="Zsharpp", base=None, schedule=None, amp=None))
