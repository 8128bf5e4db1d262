"""Tracking loggers read back with the real packages: JSONL, TensorBoard (EventAccumulator), MLflow (its
client on the SQLite store), W&B offline (only when wandb is installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sharpscope.errors import UserInputError
from sharpscope.track import JsonlLogger, TrackRow, read_tracking, read_tracking_layers

ROWS = [
    TrackRow(0, "lambda_max", {"value": 2.5, "residual": 0.01, "n_hvp": 7}),
    TrackRow(0, "masks", {"kept_fraction": 0.05}, layers={"conv.weight": {"kept_fraction": 0.06, "threshold": 1.9},
                                                          "fc.weight": {"kept_fraction": 0.04, "threshold": 2.1}}),
    TrackRow(0, "zscores", {"mean_kurtosis": 1.5}, layers={"conv.weight": {"kurtosis": 1.5}},
             histograms={"conv.weight": (np.linspace(-2, 2, 5), np.array([1, 4, 4, 1]))}),
    TrackRow(10, "lambda_max", {"value": 3.0, "residual": float("nan"), "n_hvp": 3}),
]


def test_row_drops_non_finite_values_and_round_trips_through_json():
    """A NaN never reaches a logger (it is left out), and to_json/from_json is the identity on the rest."""
    assert "residual" not in ROWS[3].values
    for row in ROWS:
        back = TrackRow.from_json(json.loads(json.dumps(row.to_json())))
        assert (back.step, back.measure, back.values, back.layers) == (row.step, row.measure, row.values, row.layers)


def test_jsonl_writes_atomically_on_flush_and_resumes_before_a_step(tmp_path):
    """Rows reach the file on flush (one JSON object per line, read back by read_tracking/read_tracking_layers);
    resume_step keeps only the earlier rows; a damaged line is one UserInputError naming it."""
    path = tmp_path / "tracking.jsonl"
    logger = JsonlLogger(path)
    logger.log(ROWS)
    assert not path.exists()  # buffered until flush (flush_every_s not reached)
    logger.close()
    assert len(path.read_text().splitlines()) == 4
    frame = read_tracking(tmp_path)
    assert list(frame["step"]) == [0, 0, 0, 10] and frame.loc[3, "value"] == 3.0
    layers = read_tracking_layers(path, "masks")
    assert layers.set_index(["layer", "key"]).loc[("fc.weight", "threshold"), "value"] == 2.1
    resumed = JsonlLogger(path, resume_step=10)
    resumed.close()
    assert list(read_tracking(path)["step"]) == [0, 0, 0]
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(UserInputError, match="tracking.jsonl:4"):
        read_tracking(path)


def test_tensorboard_events_read_back_with_event_accumulator(tmp_path):
    """Scalars (measure/key, measure.key/layer) and the Z-score histogram are in the event file, read by
    TensorBoard's own EventAccumulator."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sharpscope.track.loggers.tensorboard import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log(ROWS)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    values = [(e.step, e.value) for e in acc.Scalars("lambda_max/value")]
    assert values == [(0, 2.5), (10, 3.0)]
    assert acc.Scalars("masks.kept_fraction/fc.weight")[0].value == pytest.approx(0.04)
    assert "lambda_max/residual" in tags["scalars"] and len(acc.Scalars("lambda_max/residual")) == 1
    hist = acc.Histograms("zscores.hist/conv.weight")[0].histogram_value
    assert hist.num == 10 and list(hist.bucket) == [1, 4, 4, 1]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, inside MLflow's store
@pytest.mark.parametrize("store", ["file", "default"])
def test_mlflow_metrics_read_back_with_its_client(tmp_path, monkeypatch, store):
    """Every scalar is an MLflow metric at its step, read back by a new MlflowClient from the file store
    (MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE) and from the default SQLite file in the run folder; the run
    ends FINISHED with the given params."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from sharpscope.track.loggers.mlflow import MlflowLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri() if store == "file" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MlflowLogger(folder=tmp_path, tracking_uri=uri if store == "file" else None, experiment="t",
                          run_name="r", params={"every": 10})
    logger.log(ROWS)
    logger.close()
    assert logger.tracking_uri == uri
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"every": "10"}
    history = sorted((m.step, m.value) for m in client.get_metric_history(logger.run_id, "lambda_max/value"))
    assert history == [(0, 2.5), (10, 3.0)]
    assert run.data.metrics["masks.threshold/conv.weight"] == pytest.approx(1.9)


def test_wandb_offline_run_holds_the_scalars(tmp_path):
    """An offline W&B run logs each scalar with its step (read back from the run's summary/history)."""
    pytest.importorskip("wandb")
    from sharpscope.track.loggers.wandb import WandbLogger

    logger = WandbLogger(folder=tmp_path, project="t")
    logger.log(ROWS)
    assert logger.run.summary["lambda_max/value"] == 3.0
    logger.close()
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def _tracked_fit(out, epochs, resume, log):
    from sharpscope.data import load_dataset
    from sharpscope.models import build_model
    from sharpscope.train import fit

    train = load_dataset("digits").subset(range(64))
    torch.manual_seed(0)
    return fit(build_model("cnn", 10, in_channels=1, width=4), train, optimizer="sgd", lr=0.05, epochs=epochs,
               batch_size=32, track="lambda_max", track_every=1, track_samples=16, log=log, progress=False,
               out=out, resume=resume, device="cpu")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, inside MLflow's store
def test_resumed_fit_continues_the_same_mlflow_run(tmp_path, monkeypatch):
    """1 epoch + resume to 2 epochs with --log mlflow: the store (read back by a new MlflowClient) holds ONE
    run, FINISHED, whose lambda_max history has the steps of both segments once each (0-1 and 2-3)."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()  # the file store: creating the default SQLite store takes ~30 s
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _tracked_fit(tmp_path / "run", 1, False, "mlflow")
    _tracked_fit(tmp_path / "run", 2, True, "mlflow")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "lambda_max/value")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]


def test_resumed_fit_continues_the_same_wandb_run(tmp_path):
    """With wandb installed (offline): the resumed segment logs into the run the first segment started (same id)."""
    pytest.importorskip("wandb")
    from sharpscope.train.checkpoint import load_checkpoint

    _tracked_fit(tmp_path / "run", 1, False, "wandb")
    first = load_checkpoint(tmp_path / "run" / "last.pt").raw["tracker"]["loggers"]["wandb"]["run_id"]
    _tracked_fit(tmp_path / "run", 2, True, "wandb")
    second = load_checkpoint(tmp_path / "run" / "last.pt").raw["tracker"]["loggers"]["wandb"]["run_id"]
    assert first == second


def test_named_logger_without_its_package_is_one_line(monkeypatch, tmp_path):
    """A logger whose package is missing says which package to install (simulated by hiding the module)."""
    import sys

    from sharpscope.track.registry import build_logger

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserInputError, match="pip install"):
        build_logger("wandb", tmp_path)


def test_row_refuses_value_names_that_collide_with_its_fields():
    """'step', 'measure' and 'layers' are the JSON record's own keys: a measure cannot use them as values."""
    with pytest.raises(ValueError, match="reserved"):
        TrackRow(0, "masks", {"layers": 3.0})
