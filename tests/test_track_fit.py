"""Tracking inside fit and `sharpscope train --track`: same weights as without, resume equality, CLI flags."""

from __future__ import annotations

import pytest
import torch

from sharpscope.cli import main
from sharpscope.data import load_dataset
from sharpscope.errors import UserInputError
from sharpscope.models import build_model
from sharpscope.track import read_tracking, read_tracking_layers
from sharpscope.train import TrainConfig, fit


def _run(out, epochs, resume, track="lambda_max,update_curvature,masks"):
    train = load_dataset("digits").subset(range(128))
    torch.manual_seed(0)
    model = build_model("cnn", 10, in_channels=1, width=4)
    return fit(model, train, optimizer="zsharp", base="adam", lr=0.01, epochs=epochs, batch_size=32,
               track=track, track_every=3, track_samples=32, progress=False, out=out, resume=resume)


def test_fit_tracks_without_changing_the_weights_and_resumes_to_the_same_rows(tmp_path):
    """Weights equal those of the same run without tracking; 2 epochs straight and 1 + resume + 1 give the same
    tracking.jsonl rows (warm-start vector, previous weights and counters stored in the checkpoint)."""
    plain = _run(None, 2, False, track="")
    straight = _run(tmp_path / "a", 2, False)
    for a, b in zip(plain.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)
    _run(tmp_path / "b", 1, False)
    resumed = _run(tmp_path / "b", 2, True)
    rows_a, rows_b = read_tracking(tmp_path / "a"), read_tracking(tmp_path / "b")
    assert set(rows_a["measure"]) == {"lambda_max", "update_curvature", "masks"}
    assert rows_a.equals(rows_b)
    assert read_tracking_layers(tmp_path / "a").equals(read_tracking_layers(tmp_path / "b"))
    assert len(resumed.tracking) and set(resumed.tracking["step"]) == {s for s in rows_b["step"] if s >= 4}
    assert list(straight.tracking["step"]) == list(rows_a["step"])


@pytest.mark.parametrize("fields, message", [({"track": "masks"}, "--track masks reads ZSharp"),
                                              ({"track": "lambda_max,hessian"}, "unknown --track measure 'hessian'"),
                                              ({"log": "tensorboard"}, "--track names no measure"),
                                              ({"track": "trace", "track_every": 0}, "track_every")])
def test_tracking_settings_are_checked_up_front(fields, message):
    """A tracking setting that cannot work is one UserInputError from TrainConfig.validate."""
    with pytest.raises(UserInputError, match=message):
        TrainConfig(optimizer="sgd", **fields).validate()


def test_cli_track_flags_write_tracking_rows_and_tensorboard(tmp_path):
    """`sharpscope train --track ... --track-every --track-samples --log tensorboard` writes tracking.jsonl
    with rows every N steps and a TensorBoard event file."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    rc = main(["train", "--optimizer", "zsharp", "--epochs", "1", "--batch-size", "256", "--track",
               "lambda_max,masks", "--track-every", "3", "--track-samples", "64", "--log", "tensorboard",
               "--out", str(out), "--quiet"])
    assert rc == 0
    rows = read_tracking(out)
    steps = -(-len(load_dataset("digits")) // 256)
    assert sorted(set(rows["step"])) == list(range(0, steps, 3)) and set(rows["measure"]) == {"lambda_max", "masks"}
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))


def _ddp_track_worker(rank: int, tmp) -> None:
    from tests.test_distributed_train import FIT, _digits, _small_model

    train, test = _digits()
    fit(_small_model(), train, test, epochs=1, out=tmp / "T", optimizer="zsharp", track="lambda_max,masks",
        track_every=2, track_samples=32, **FIT)


def test_ddp_run_tracks_on_rank_zero(tmp_path):
    """Two gloo ranks: rank 0 tracks the replicated model (no collective inside the tracker, so no rank waits
    forever) and writes tracking.jsonl once, with rows on the steps that are multiples of track_every."""
    from tests.test_distributed_train import _check_codes, _run_workers

    _check_codes(_run_workers(_ddp_track_worker, tmp_path, timeout=120), tmp_path)
    rows = read_tracking(tmp_path / "T")
    assert set(rows["measure"]) == {"lambda_max", "masks"}
    assert list(rows.drop_duplicates(["step", "measure"])["step"]) == list(rows["step"])
    assert all(s % 2 == 0 for s in rows["step"]) and len(rows) >= 2
