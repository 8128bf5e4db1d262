"""Training under torch.distributed (gloo, 2 processes on the CPU) and gradient accumulation.

Each distributed test forks 2 worker processes that join a gloo group on a free port (forking is
much faster than spawning fresh interpreters; the parent never initialises a process group). The
references are computed independently: one process on the whole batch, or per-shard ascents and
the averaged pass-2 gradient written out in the test, or an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sharpscope import distributed as dist_
from sharpscope.data import load_dataset
from sharpscope.models import build_model
from sharpscope.train import TrainConfig, fit, load_checkpoint
from sharpscope.train.config import build_optimizer
from sharpscope.train.layout import RunLayout
from sharpscope.train.loop import TrainStep, rank_batches, reduce_mask_stats

WORLD = 2
SAM_FAMILY = ("sam", "asam", "zsharp", "fsam")


# ------------------------------------------------------------------------------------------ helpers


def _run_workers(target: Callable[..., None], tmp: Path, *args: Any, timeout: float = 60.0,
                 group_timeout: float = 20.0) -> list[int]:
    """Fork WORLD workers running ``target(rank, tmp, *args)`` in a gloo group; return their exit codes."""
    port = dist_.free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(target, r, port, tmp, args, group_timeout)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


def _worker(target: Callable[..., None], rank: int, port: int, tmp: Path, args: tuple[Any, ...],
            group_timeout: float) -> None:
    torch.set_num_threads(1)
    code = 0
    try:
        dist_.init_process_group(rank, WORLD, f"tcp://127.0.0.1:{port}", "gloo", timeout_s=group_timeout)
        target(rank, tmp, *args)
    except BaseException:  # noqa: BLE001 - reported through the file and the exit code
        (tmp / f"error{rank}.txt").write_text(traceback.format_exc())
        code = 1
    finally:
        try:
            dist_.destroy()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def _check_codes(codes: list[int], tmp: Path) -> None:
    errors = [(tmp / f"error{r}.txt").read_text() for r in range(WORLD) if (tmp / f"error{r}.txt").exists()]
    assert codes == [0] * WORLD, f"exit codes {codes}\n" + "\n".join(errors)


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(steps * batch, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (steps * batch,),
                                                                                          generator=g)


def _config(optimizer: str, **kw: Any) -> TrainConfig:
    return TrainConfig(optimizer=optimizer, base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.1,
                       percentile=0.6, device="cpu", progress=False, **kw).validate()


def _train(model: nn.Module, config: TrainConfig, batches: list[tuple[torch.Tensor, torch.Tensor]],
           ddp: DistributedDataParallel | None = None) -> nn.Module:
    optimizer, _ = build_optimizer(model, config)
    step = TrainStep(model, ddp if ddp is not None else model, optimizer, config, torch.device("cpu"), ddp)
    for x, y in batches:
        step(x, y, log_masks=False)
    return model


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


STEPS, BATCH = 3, 8


# ------------------------------------------------------------------------------------------ one process


@pytest.mark.parametrize("optimizer", ("sgd", "adam") + SAM_FAMILY)
def test_accumulation_equals_one_step_on_the_concatenated_batch(optimizer):
    """K = 4 micro-batches give the weights of K = 1 on the whole batch (float64, no BatchNorm) to 1e-10:
    sum_k (n_k/n) grad L_k is the gradient of the batch mean, and there is one ascent and one descent."""
    x, y = _data(STEPS, BATCH)
    batches = list(zip(x.split(BATCH), y.split(BATCH)))
    whole = _train(_mlp(), _config(optimizer), batches)
    micro = _train(_mlp(), _config(optimizer, accumulate=4), batches)
    for a, b in zip(whole.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert not torch.equal(_weights(whole)[0], _weights(_mlp())[0])  # the steps did move the weights


def test_accumulation_with_batchnorm_differs_only_through_batch_statistics():
    """With BatchNorm, micro-batches are normalised by their own statistics: the weights differ from the
    whole-batch step (documented), while the same model without BatchNorm matches (test above)."""
    x, y = _data(1, 16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    whole = _train(copy.deepcopy(model), _config("sam"), [(x, y)])
    micro = _train(copy.deepcopy(model), _config("sam", accumulate=4), [(x, y)])
    assert max((a - b).abs().max().item() for a, b in zip(whole.parameters(), micro.parameters())) > 1e-8


def test_shard_indices_partition_the_permutation():
    """DistributedSampler semantics, checked against set arithmetic: 'keep' is a partition, 'pad' repeats the
    first N - n mod N indices, 'drop' loses the last n mod N, and the k-th batches of B/N rebuild batch k."""
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    keep = [dist_.shard_indices(perm, r, 3, "keep") for r in range(3)]
    assert sorted(torch.cat(keep).tolist()) == list(range(11))
    pad = [dist_.shard_indices(perm, r, 3, "pad") for r in range(3)]
    assert [len(s) for s in pad] == [4, 4, 4]
    assert sorted(torch.cat(pad).tolist()) == sorted(perm.tolist() + perm[:1].tolist())
    assert sorted(torch.cat([dist_.shard_indices(perm, r, 3, "drop") for r in range(3)]).tolist()) == \
        sorted(perm[:9].tolist())
    shards = [dist_.shard_indices(torch.arange(12), r, 2) for r in range(2)]
    assert sorted(torch.cat([s[:3] for s in shards]).tolist()) == list(range(6))


def test_rank_batches_are_disjoint_and_augmentation_differs_per_rank():
    """The two ranks' batches of an epoch share no example and together hold the whole epoch; with
    augmentation on, the draws differ between ranks and replay exactly for the same (seed, epoch, rank)."""
    data = load_dataset("digits").subset(range(40))
    data = dataclasses.replace(data, targets=torch.arange(40), num_classes=40)  # targets name the examples
    cpu = torch.device("cpu")
    seen = [torch.cat([y for _, y in rank_batches(data, 8, 0, 0, False, cpu, r, 2)]) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 20 and not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(40))
    # k-th batch of rank 0 + rank 1 == k-th one-process batch (as sets)
    one = [y for _, y in data.batches(8, shuffle=True, seed=0, epoch=0, augment=False)]
    split = [list(rank_batches(data, 8, 0, 0, False, cpu, r, 2)) for r in (0, 1)]
    assert sorted(one[1].tolist()) == sorted(split[0][1][1].tolist() + split[1][1][1].tolist())
    aug = [[x for x, _ in rank_batches(data, 8, 0, 0, True, cpu, r, 2)] for r in (0, 1, 0)]
    assert torch.equal(aug[0][0], aug[2][0])  # replays
    plain = [x for x, _ in rank_batches(data, 8, 0, 0, False, cpu, 0, 2)]
    assert not torch.equal(aug[0][0], plain[0])  # augmentation did act


def test_reduce_mask_stats_sums_counts_and_averages_norms():
    """The 'reduce' row of a layer: counts summed, kept_fraction = total kept / total numel, norms averaged,
    fallback if any rank fell back; 'per-rank' keeps every row with its rank (hand-made frames)."""
    def frame(kept: int, norm: float, fallback: bool) -> pd.DataFrame:
        return pd.DataFrame({"layer": ["w"], "numel": [10], "kept": [kept], "kept_fraction": [kept / 10],
                             "threshold": [1.0], "grad_norm": [norm], "perturbation_norm": [0.1],
                             "fallback": [fallback]})

    out = reduce_mask_stats([frame(2, 1.0, False), frame(4, 3.0, True)])
    assert out.loc[0, "numel"] == 20 and out.loc[0, "kept"] == 6 and out.loc[0, "kept_fraction"] == 0.3
    assert out.loc[0, "grad_norm"] == 2.0 and bool(out.loc[0, "fallback"]) and out.loc[0, "ranks"] == 2
    per = reduce_mask_stats([frame(2, 1.0, False), frame(4, 3.0, True)], "per-rank")
    assert per["rank"].tolist() == [0, 1] and per["kept"].tolist() == [2, 4]


# ------------------------------------------------------------------------------------------ 2 processes


def _equivalence_worker(rank: int, tmp: Path) -> None:
    """Rank r trains on rows r::2 of every batch; results go to tmp for the parent to compare."""
    x, y = _data(STEPS, BATCH)
    batches = [(xb[rank::WORLD], yb[rank::WORLD]) for xb, yb in zip(x.split(BATCH), y.split(BATCH))]
    out: dict[str, Any] = {}
    for optimizer in SAM_FAMILY:
        for ascent, accumulate in (("global", 1), ("global", 2), ("local", 1)):
            model = _mlp()
            config = _config(optimizer, ascent=ascent, accumulate=accumulate)
            if ascent == "local":  # the reference writes the descent out as plain SGD
                config = dataclass_replace(config, momentum=0.0, weight_decay=0.0)
            ddp = DistributedDataParallel(model)
            _train(model, config, batches if ascent == "global" else batches[:1], ddp)
            out[f"{optimizer}-{ascent}-{accumulate}"] = _weights(model)
    torch.save(out, tmp / f"weights{rank}.pt")


def test_ddp_global_and_local_ascent_match_their_references(tmp_path):
    """Global: 2 ranks on B/2 each equal one process on B (to 1e-10, float64, 3 steps, with and without
    accumulation) for SAM, ASAM, ZSharp and F-SAM. Local: one step equals w - lr * mean_r g'_r, where
    g'_r is the gradient at w + e_r on shard r and e_r the ascent of shard r alone (computed here with the
    optimizer on one process per shard; SGD without momentum/decay so the descent is written out)."""
    _check_codes(_run_workers(_equivalence_worker, tmp_path), tmp_path)
    results = [torch.load(tmp_path / f"weights{r}.pt") for r in range(WORLD)]
    x, y = _data(STEPS, BATCH)
    batches = list(zip(x.split(BATCH), y.split(BATCH)))
    for optimizer in SAM_FAMILY:
        single = _weights(_train(_mlp(), _config(optimizer), batches))
        for key in (f"{optimizer}-global-1", f"{optimizer}-global-2"):
            for r in range(WORLD):
                for a, b in zip(results[r][key], single):
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")
        expected = _local_reference(optimizer, batches[0])
        for r in range(WORLD):
            for a, b in zip(results[r][f"{optimizer}-local-1"], expected):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        assert max((a - b).abs().max().item() for a, b in zip(results[0][f"{optimizer}-local-1"],
                                                             _weights(_train(_mlp(), _config(optimizer),
                                                                             batches[:1])))) > 1e-9


def _local_reference(optimizer: str, batch: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """One local-ascent step with plain SGD (momentum 0, no decay): w - lr * mean_r grad L_r(w + e_r)."""
    config = dataclass_replace(_config(optimizer), momentum=0.0, weight_decay=0.0)
    base = _mlp()
    pass2 = []
    for r in range(WORLD):
        model = copy.deepcopy(base)
        opt, _ = build_optimizer(model, config)
        xb, yb = batch[0][r::WORLD], batch[1][r::WORLD]
        F.cross_entropy(model(xb), yb).backward()
        opt.first_step(zero_grad=True)  # e_r from shard r alone
        pass2.append(torch.autograd.grad(F.cross_entropy(model(xb), yb), list(model.parameters())))
    return [p.detach() - config.base_lr * (g0 + g1) / 2 for p, g0, g1 in zip(base.parameters(), *pass2)]


def dataclass_replace(config: TrainConfig, **kw: Any) -> TrainConfig:
    return dataclasses.replace(config, **kw).validate()



# ------------------------------------------------------------------------------------------ fit under DDP

FIT = {"lr": 0.05, "batch_size": 16, "progress": False, "seed": 0, "device": "cpu", "log_mask_every": 2}


def _digits() -> tuple[Any, Any]:
    return load_dataset("digits").subset(range(96)), load_dataset("digits", train=False).subset(range(30))


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", 10, hidden=(16,))


def _fit_worker(rank: int, tmp: Path) -> None:
    train, test = _digits()
    fsam = {**FIT, "optimizer": "fsam"}  # local ascent: per-replica F-SAM momentum must travel per rank
    fit(_small_model(), train, test, epochs=2, out=tmp / "A", **fsam)
    fit(_small_model(), train, test, epochs=1, out=tmp / "B", **fsam)
    fit(_small_model(), train, test, epochs=2, out=tmp / "B", resume=True, **fsam)
    fit(_small_model(), train, test, epochs=2, out=tmp / "C", resume=True, optimizer="zsharp", **FIT)


def _tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return True


def test_ddp_resume_is_bit_exact_and_checkpoints_move_between_one_and_two_processes(tmp_path):
    """2 gloo ranks: epochs 1+resume to 2 equal 2 uninterrupted epochs bit for bit (weights, optimizer state,
    every rank's RNG and F-SAM momentum); the checkpoint has no ``module.`` prefix and resumes in one
    process; a one-process checkpoint (ZSharp, folder C) resumes under 2 ranks and logs reduced masks."""
    train, test = _digits()
    fit(_small_model(), train, test, epochs=1, out=tmp_path / "C", optimizer="zsharp", **FIT)
    _check_codes(_run_workers(_fit_worker, tmp_path, timeout=120), tmp_path)
    a = torch.load(tmp_path / "A" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "B" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["world_size"] == 2 and len(a["ranks"]) == 2
    for key in ("state_dict", "optimizer_state", "ranks"):
        assert _tensors_equal(a[key], b[key]), key
    assert a["ranks"][0]["optimizer"] is not None  # per-replica momentum was stored
    assert not any(k.startswith("module.") for k in a["state_dict"])
    # one process continues the DDP run (world size 1 now: not bit-exact, but it loads and trains)
    loaded = load_checkpoint(tmp_path / "A" / "last.pt", model=_small_model())
    assert loaded.epoch == 2
    result = fit(_small_model(), train, test, epochs=3, out=tmp_path / "A", resume=True, optimizer="fsam", **FIT)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    c = torch.load(tmp_path / "C" / "last.pt", weights_only=False)
    assert c["epoch"] == 2 and c["world_size"] == 2
    masks = pd.read_csv(RunLayout(tmp_path / "C").masks)
    later = masks[masks["epoch"] == 1]
    assert len(later) and (later["ranks"] == 2).all()
    assert later.groupby("step")["layer"].count().nunique() == 1  # one row per layer per logged step
    assert (masks[masks["epoch"] == 0]["ranks"].isna()).all()  # the one-process epoch has no rank pooling


def _dying_worker(rank: int, tmp: Path) -> None:
    train, test = _digits()
    marks: dict[str, float] = {}

    def on_epoch(row: dict[str, Any]) -> None:
        if row["epoch"] == 1:
            marks["t"] = time.monotonic()
            if rank == 1:
                os._exit(7)  # dies after epoch 1 was committed

    try:
        fit(_small_model(), train, test, epochs=3, out=tmp / "D", on_epoch=on_epoch, optimizer="sam",
            dist_timeout=5.0, **FIT)
    except dist_.DistributedFailure as failure:
        (tmp / "failure.json").write_text(json.dumps({"message": str(failure),
                                                      "after_s": time.monotonic() - marks["t"]}))


def test_a_dead_rank_stops_the_others_within_the_timeout_and_the_run_resumes(tmp_path):
    """Rank 1 exits after epoch 1: rank 0 stops with one DistributedFailure line well within the timeout
    (5 s group timeout + margin), the folder holds epoch 1 and no temporaries, and resume finishes the run."""
    codes = _run_workers(_dying_worker, tmp_path, timeout=60, group_timeout=5.0)
    assert codes == [0, 7], (codes, [(tmp_path / f"error{r}.txt").read_text() for r in range(WORLD)
                                     if (tmp_path / f"error{r}.txt").exists()])
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert "\n" not in failure["message"] and "--resume" in failure["message"]
    assert failure["after_s"] < 5.0 + 10.0
    layout = RunLayout(tmp_path / "D")
    assert layout.stale_temporaries() == [] and torch.load(layout.last, weights_only=False)["epoch"] == 1
    train, test = _digits()
    result = fit(_small_model(), train, test, epochs=3, out=tmp_path / "D", resume=True, optimizer="sam", **FIT)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]


def _hanging_worker(rank: int, tmp: Path) -> None:
    train, test = _digits()
    marks: dict[str, float] = {}

    def on_epoch(row: dict[str, Any]) -> None:
        marks["t"] = time.monotonic()
        if rank == 1 and row["epoch"] == 1:
            time.sleep(12)  # alive but stuck: no connection is closed, only the timeout can tell
            os._exit(7)

    try:
        fit(_small_model(), train, test, epochs=2, out=tmp / "H", on_epoch=on_epoch, optimizer="sam", **FIT)
    except dist_.DistributedFailure as failure:
        (tmp / "failure.json").write_text(json.dumps({"message": str(failure),
                                                      "after_s": time.monotonic() - marks["t"]}))


@pytest.mark.slow
def test_a_stuck_rank_stops_the_others_after_the_group_timeout(tmp_path):
    """Rank 1 hangs (sleeps 12 s) after epoch 1: rank 0 stops with one line after the 3 s group timeout
    (measured 3.0 s), long before rank 1 would have come back."""
    codes = _run_workers(_hanging_worker, tmp_path, timeout=90, group_timeout=3.0)
    assert codes == [0, 7], codes
    failure = json.loads((tmp_path / "failure.json").read_text())
    assert "Timed out" in failure["message"] and "\n" not in failure["message"]
    assert 2.5 < failure["after_s"] < 10.0
