"""Checkpoints: round trip, foreign formats (bare state_dict, DDP/Lightning prefixes), bad files, and
atomicity under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from sharpscope.data import load_dataset
from sharpscope.errors import UserInputError
from sharpscope.models import build_model
from sharpscope.train import fit, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short ZSharp run on a digits subset, written to a run folder."""
    out = tmp_path_factory.mktemp("run")
    train = load_dataset("digits").subset(range(256))
    test = load_dataset("digits", train=False)
    model = build_model("cnn", 10, in_channels=1, width=8)
    result = fit(model, train, test, optimizer="zsharp", epochs=2, batch_size=64, progress=False, out=out,
                 log_mask_every=2, save_every=1)
    return out, result, test


def test_round_trip_rebuilds_model_and_restores_everything(digits_run):
    """Against the in-memory model: same weights, same logits; spec, history, optimizer config and states."""
    out, result, test = digits_run
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.spec == {"name": "cnn", "num_classes": 10, "kwargs": {"in_channels": 1, "width": 8}}
    for key, value in result.model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[key], value.cpu())
    x, _ = test.tensors(n=50)
    result.model.eval()
    torch.testing.assert_close(ckpt.model(x), result.model(x), rtol=0, atol=0)
    assert not ckpt.model.training
    assert ckpt.history == result.history and ckpt.epoch == 2 and ckpt.step == 8
    assert ckpt.optimizer_config["name"] == "zsharp" and ckpt.optimizer_config["rho"] == 0.05
    assert ckpt.optimizer_config["percentile"] == 0.95 and ckpt.optimizer_config["base"] == "sgd"
    assert ckpt.optimizer_state["base"]["state"]  # momentum buffers of the base optimizer are there
    assert ckpt.scheduler_state["step"] == 8 and ckpt.rng["torch"].dtype == torch.uint8
    assert ckpt.raw["torch_version"] == str(torch.__version__) and ckpt.raw["format_version"] == 1
    assert ckpt.config["batch_size"] == 64
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "epoch_0001.pt", "epoch_0002.pt",
                                               "metrics.jsonl", "masks.csv", "config.json"}
    best_epoch = max(result.history, key=lambda r: r["test_acc"])["epoch"]
    assert load_checkpoint(out / "best.pt").epoch == best_epoch
    assert load_checkpoint(out / "epoch_0001.pt").epoch == 1


def test_bare_state_dict_with_prefixes_loads(tmp_path):
    """Plain, DDP (module.), Lightning ({'state_dict': {'model.…'}}) and torch.compile (_orig_mod.) files."""
    model = build_model("mlp", 10, hidden=(16,))
    spec = model.sharpscope_spec
    sd = model.state_dict()
    variants = {
        "plain.pt": sd,
        "ddp.pt": {f"module.{k}": v for k, v in sd.items()},
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3},
        "compiled.pt": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        ckpt = load_checkpoint(tmp_path / name, spec=spec)
        assert ckpt.is_bare
        for k, v in sd.items():
            assert torch.equal(ckpt.model.state_dict()[k], v)
    into = build_model("mlp", 10, hidden=(16,))
    assert load_checkpoint(tmp_path / "ddp.pt", model=into).model is into
    assert torch.equal(into.state_dict()["net.0.weight"], sd["net.0.weight"])
    with pytest.raises(UserInputError, match="bare state_dict: pass model= .* or spec="):
        load_checkpoint(tmp_path / "plain.pt")


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    (b"hello, not a checkpoint", r"not a torch checkpoint \(it looks like text\)"),
    (b'{"config": {}}', r"not a torch checkpoint \(it looks like JSON\)"),
    ("list", "not a checkpoint: it holds no state_dict"),
    ("pickled-model", "safe loading .* refuses"),
])
def test_non_checkpoints_are_one_line_errors(tmp_path, content, match):
    """Missing, garbage, a torch file without weights, and a pickled module (refused by weights_only)."""
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "list":
        torch.save([1, 2, 3], path)
    elif content == "pickled-model":
        torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UserInputError, match=match) as info:
        load_checkpoint(path, spec={"name": "mlp", "num_classes": 10, "kwargs": {}})
    assert "\n" not in str(info.value)


def test_truncated_checkpoint_is_refused(digits_run, tmp_path):
    """A file cut in half (a copy interrupted mid-way) gives a one-line error, not a traceback."""
    out, _, _ = digits_run
    payload = (out / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(payload[: len(payload) // 2])
    with pytest.raises(UserInputError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_wrong_architecture_names_the_mismatch(digits_run):
    """Loading ResNet weights into an MLP (or another class count) names missing/unexpected/shape keys."""
    out, _, _ = digits_run
    with pytest.raises(UserInputError, match=r"does not fit MLP: \d+ missing \(e.g. net.0.weight\)"):
        load_checkpoint(out / "last.pt", spec={"name": "mlp", "num_classes": 10, "kwargs": {}})
    with pytest.raises(UserInputError, match=r"linear.weight: \(10, 16\) in the file, \(7, 16\) in the model"):
        load_checkpoint(out / "last.pt", model=build_model("cnn", 7, in_channels=1, width=8))


_WRITER = textwrap.dedent("""
    import sys, time, torch
    from sharpscope import _io
    from sharpscope.train.checkpoint import save_checkpoint
    path = sys.argv[1]
    save_checkpoint(path, {"state_dict": {"w": torch.zeros(1000)}, "epoch": 0})

    def half_written(target, payload):
        # Write the first half of the serialised bytes, then wait to be killed mid-write.
        with open(target, "wb") as handle:
            handle.write(payload[: len(payload) // 2])
            handle.flush()
        print("mid-write", flush=True)
        time.sleep(120)

    _io._write_file = half_written
    save_checkpoint(path, {"state_dict": {"w": torch.ones(1000)}, "epoch": 1})
""")


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """A writer killed with SIGKILL half-way through writing a checkpoint: last.pt is still the
    complete earlier checkpoint (checked against what the first save wrote)."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    target = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == b"mid-write"
        partial = list(tmp_path.glob(".last.pt.*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # the kill lands mid-write
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    obj = torch.load(target, weights_only=True)
    assert obj["format"] == "sharpscope-checkpoint" and obj["epoch"] == 0
    assert torch.equal(obj["state_dict"]["w"], torch.zeros(1000))


def test_save_refuses_a_directory_target(tmp_path):
    """Saving onto a folder is a user error, and nothing is written."""
    (tmp_path / "last.pt").mkdir()
    with pytest.raises(UserInputError, match="is a directory"):
        save_checkpoint(tmp_path / "last.pt", {"state_dict": {}})
    assert list((tmp_path / "last.pt").iterdir()) == []


# ------------------------------------------------------------------ integrity and field checks


def _float_member_offset(path, values: torch.Tensor) -> int:
    """Byte offset in the file of the first element of the archive member holding ``values``'s bytes."""
    raw = values.numpy().tobytes()
    payload = path.read_bytes()
    offset = payload.find(raw)
    assert offset > 0 and payload.find(raw, offset + 1) < 0  # found once: the tensor's storage record
    return offset


def test_flipped_mantissa_bit_fails_the_archive_crc(tmp_path):
    """One bit flipped inside a stored float tensor (the lowest mantissa bit of its first element):
    torch.load alone accepts the file; load_checkpoint refuses it naming the file (zip CRC-32)."""
    values = torch.arange(1.0, 257.0)
    path = save_checkpoint(tmp_path / "c.pt", {"state_dict": {"net.0.weight": values}, "epoch": 1})
    offset = _float_member_offset(path, values)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    flipped = torch.load(path, weights_only=True)["state_dict"]["net.0.weight"]
    assert flipped[0].item() != 1.0 and torch.equal(flipped[1:], values[1:])  # the flip did land in the tensor
    with pytest.raises(UserInputError, match=r"c\.pt'? is corrupted: archive member .* fails its CRC check") as info:
        load_checkpoint(path, model=torch.nn.Linear(16, 16))
    assert "\n" not in str(info.value)


def test_tensor_digest_catches_a_change_in_a_valid_archive(digits_run, tmp_path):
    """A checkpoint re-saved with one weight's mantissa bit flipped (valid zip, correct CRCs, stale
    digest) is refused; the untouched file loads."""
    out, _, _ = digits_run
    raw = torch.load(out / "last.pt", weights_only=True)
    assert raw["digest"]["algorithm"] == "sha256" and len(raw["digest"]["tensors"]) == 64
    weight = raw["state_dict"]["linear.weight"]
    weight.view(torch.int32).view(-1)[0] ^= 1  # lowest mantissa bit of one float32
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(UserInputError, match="do not match the SHA-256 digest stored in it"):
        load_checkpoint(tmp_path / "edited.pt")
    load_checkpoint(out / "last.pt")


def test_checkpoint_of_sharpscope_0_1_without_digest_still_loads():
    """tests/fixtures/run_v0_1/last.pt (written by 0.1.0, no digest field) loads with its weights and history."""
    ckpt = load_checkpoint(os.path.join(os.path.dirname(__file__), "fixtures", "run_v0_1", "last.pt"))
    assert "digest" not in ckpt.raw and ckpt.epoch == 1 and ckpt.spec["name"] == "mlp"
    assert ckpt.history[0]["test_acc"] == pytest.approx(0.6833333333333333)


@pytest.mark.parametrize("field, value, match", [
    ("epoch", "three", "epoch must be an integer >= 0; got 'three'"),
    ("step", -4, "step must be an integer >= 0; got -4"),
    ("history", "not a list", "history must be a list of per-epoch dicts"),
    ("history", [1, 2], "history must be a list of per-epoch dicts"),
    ("model_spec", {"name": "mlp", "num_classes": "10", "kwargs": {}}, "model_spec num_classes must be an integer"),
    ("optimizer_config", ["sgd"], "optimizer_config must be a dict"),
    ("best_test_acc", "high", "best_test_acc must be a finite number"),
])
def test_malformed_fields_are_one_line_errors(digits_run, tmp_path, field, value, match):
    """A checkpoint with one field of the wrong type (tensors and digest intact) is refused naming the
    file and the field, before anything uses the value."""
    out, _, _ = digits_run
    raw = torch.load(out / "last.pt", weights_only=True)
    raw[field] = value
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(UserInputError, match=f"bad.pt'? has a malformed field: {match}") as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(info.value)


def _alarm(signum, frame):
    raise TimeoutError("load_checkpoint blocked")


def test_fifo_is_refused_without_blocking(tmp_path):
    """A FIFO with no writer: open() would block for ever; the refusal comes at once (alarm after 10 s)."""
    os.mkfifo(tmp_path / "pipe.pt")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        with pytest.raises(UserInputError, match="is not a regular file"):
            load_checkpoint(tmp_path / "pipe.pt")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_unreadable_checkpoint_names_the_path(digits_run, monkeypatch):
    """An OS error while opening (here EACCES, simulated: the tests run as root) is one line naming the file."""
    out, _, _ = digits_run
    import sharpscope.train.checkpoint as module

    def denied(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(module, "open", denied, raising=False)
    with pytest.raises(UserInputError, match=r"cannot read checkpoint '.*last\.pt': Permission denied"):
        load_checkpoint(out / "last.pt")
