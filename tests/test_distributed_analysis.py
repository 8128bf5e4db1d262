"""Data-parallel analyses under torch.distributed (gloo, 2 processes on the CPU, float64).

One spawned group of two ranks runs every check (starting a group costs seconds, so they share it).
Each check computes the analysis twice on every rank -- once single-process (``distributed=False``,
all the data) and once split over the ranks -- and compares: the single-process result is the
independent reference. Floating results must agree to 1e-10 (relative to their scale; single
Hessian/GGN-vector products and gradients to 1e-12), counts
(Z-score histograms, mask sizes) exactly. The data are five batches of unequal sizes, so the two
ranks hold unequal shares (3 and 2 batches) and the global batch weights matter. A tiny token
language model on padded dict batches checks the token-count weights: its batches (and the pieces a
single batch is cut into when there are fewer batches than ranks) hold unequal numbers of target tokens,
so weighting by examples instead of tokens would change the split result.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sharpscope import distributed as dist

WORLD = 2
TOL = 1e-10
PRODUCT_TOL = 1e-12  # one product or gradient is a short weighted sum: only its summation order differs


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (7, 8, 9, 6, 5):
        x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()))
    return out


class _Checks:
    """Collects the failures of one rank (a failing comparison does not stop the others)."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed: list[str] = []
        self.seconds: dict[str, float] = {}

    def close(self, name: str, got: object, want: object, tol: float = TOL) -> None:
        a, b = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        scale = max(1.0, float(np.nanmax(np.abs(b)))) if b.size else 1.0
        if a.shape != b.shape or not np.allclose(a, b, rtol=0.0, atol=tol * scale, equal_nan=True):
            diff = float(np.nanmax(np.abs(a - b))) if a.shape == b.shape and a.size else "shape"
            self.failures.append(f"{name}: max |diff| {diff} (scale {scale})")
        else:
            self.passed.append(name)

    def equal(self, name: str, got: object, want: object) -> None:
        if not np.array_equal(np.asarray(got), np.asarray(want)):
            self.failures.append(f"{name}: not exactly equal")
        else:
            self.passed.append(name)

    def run(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - reported per check, the group keeps going
            self.failures.append(f"{name} raised:\n{traceback.format_exc()}")


def _all_reduce_sizes(fn: Callable[[], torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """``fn()`` with the number of elements of every ``torch.distributed.all_reduce`` it makes."""
    calls: list[int] = []
    real = torch.distributed.all_reduce

    def counting(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counting
    try:
        return calls, fn()
    finally:
        torch.distributed.all_reduce = real


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _product_checks(c: _Checks, model: nn.Module, loss_fn: object, datasets: list[tuple[object, str]]) -> None:
    """H v (HessianOperator), G v (GGNOperator) and the gradient on each ``(data, label)``: equal to one
    process, and one all-reduce of dim + 1 numbers per product."""
    from sharpscope.analysis.curvature import HessianOperator
    from sharpscope.analysis.ggn import GGNOperator

    v = torch.randn(_n_params(model), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for operator in (HessianOperator, GGNOperator):
        for data, label in datasets:
            name = f"{operator.__name__} {label}"
            with operator(model, loss_fn, data, distributed=False) as one:
                want_hv, want_g = one.matvec(v), one.gradient()
            with operator(model, loss_fn, data, distributed=True) as op:
                calls, got_hv = _all_reduce_sizes(lambda op=op: op.matvec(v))
                c.close(f"product ({name})", got_hv, want_hv, PRODUCT_TOL)
                c.close(f"gradient ({name})", op.gradient(), want_g, PRODUCT_TOL)
                c.equal(f"one all-reduce of dim + 1 numbers per product ({name})", calls, [op.dim + 1])


def _hvp_checks(c: _Checks, model: nn.Module, batches: list) -> None:
    """Hessian and GGN products of the classifier; a single batch is cut into one piece per rank."""
    _product_checks(c, model, F.cross_entropy, [(batches, "5 batches"), (batches[0], "1 batch")])


def _hessian_checks(c: _Checks, model: nn.Module, batches: list) -> None:
    from sharpscope.analysis.hessian import (
        hessian_density,
        hessian_eigenvalues,
        hessian_trace,
        layer_curvature,
    )

    kw = {"progress": False}
    for curvature, methods in (("hessian", ("hutch++", "hutchinson")), ("ggn", ("hutch++",))):
        eig = {"k": 3, "tol": 1e-6, "max_iter": 83, "curvature": curvature, **kw}
        one = hessian_eigenvalues(model, F.cross_entropy, batches, distributed=False, **eig)
        got = hessian_eigenvalues(model, F.cross_entropy, batches, distributed=True, **eig)
        c.close(f"{curvature} eigenvalues", got.eigenvalues, one.eigenvalues)
        c.close(f"{curvature} eigenvectors", np.abs(got.eigenvectors), np.abs(one.eigenvectors), 1e-8)
        ranks = dist.all_gather_object(np.asarray(got.eigenvalues).tolist())
        c.equal(f"{curvature} eigenvalues identical on every rank", ranks, [ranks[0]] * WORLD)
        for method in methods:
            tr_kw = {"n_samples": 13, "method": method, "curvature": curvature, **kw}
            want = hessian_trace(model, F.cross_entropy, batches, distributed=False, **tr_kw)
            for split in ("data", "probes"):
                tr = hessian_trace(model, F.cross_entropy, batches, distributed=True, split=split, **tr_kw)
                name = f"{curvature} trace {method} split={split}"
                c.close(name, [tr.estimate, tr.stderr], [want.estimate, want.stderr])
                c.equal(f"{name} n_hvp", tr.n_hvp, want.n_hvp)
    want_d = hessian_density(model, F.cross_entropy, batches, n_iter=12, n_runs=3, distributed=False, **kw)
    for split in ("data", "probes"):
        den = hessian_density(model, F.cross_entropy, batches, n_iter=12, n_runs=3, distributed=True, split=split,
                              **kw)
        c.close(f"density nodes split={split}", np.concatenate(den.nodes), np.concatenate(want_d.nodes))
        c.close(f"density weights split={split}", np.concatenate(den.weights), np.concatenate(want_d.weights))
        c.close(f"density curve split={split}", den.density, want_d.density, 1e-8)
    want_l = layer_curvature(model, F.cross_entropy, batches, tol=1e-4, n_trace_samples=9, distributed=False, **kw)
    got_l = layer_curvature(model, F.cross_entropy, batches, tol=1e-4, n_trace_samples=9, distributed=True, **kw)
    c.close("layer curvature", got_l.table[["top_eigenvalue", "trace", "trace_stderr"]].to_numpy(),
            want_l.table[["top_eigenvalue", "trace", "trace_stderr"]].to_numpy())


def _gradient_checks(c: _Checks, model: nn.Module, batches: list) -> None:
    from sharpscope.analysis.gradients import gradient_zscores
    from sharpscope.analysis.masks import mask_statistics, perturbation_alignment, zsharp_masks

    for full in (False, True):
        want = gradient_zscores(model, F.cross_entropy, batches, bins=40, full_data=full, include="all",
                                progress=False, distributed=False)
        got = gradient_zscores(model, F.cross_entropy, batches, bins=40, full_data=full, include="all",
                               progress=False, distributed=True)
        for var in ("counts", "below", "above", "tail_count"):
            c.equal(f"Z-score {var} full_data={full}", got.dataset[var].values, want.dataset[var].values)
        c.close(f"Z-score moments full_data={full}", got.dataset["power_sums"].values,
                want.dataset["power_sums"].values)
        c.close(f"Z-score thresholds full_data={full}", got.dataset["threshold"].values,
                want.dataset["threshold"].values)
    for per_batch in (True, False):
        want_m = mask_statistics(model, F.cross_entropy, batches, per_batch=per_batch, progress=False,
                                 distributed=False)
        got_m = mask_statistics(model, F.cross_entropy, batches, per_batch=per_batch, progress=False,
                                distributed=True)
        c.equal(f"mask kept per_batch={per_batch}", got_m.table["kept"].to_numpy(), want_m.table["kept"].to_numpy())
        numeric = [k for k in want_m.table.columns if want_m.table[k].dtype.kind == "f"]
        c.close(f"mask table per_batch={per_batch}", got_m.table[numeric].to_numpy(),
                want_m.table[numeric].to_numpy())
    _raises_everywhere(c, model, batches)
    want_z = zsharp_masks(model, F.cross_entropy, batches, distributed=False)
    got_z = zsharp_masks(model, F.cross_entropy, batches, distributed=True)
    c.equal("ZSharp masks (full data)", [got_z[k].sum().item() for k in got_z], [want_z[k].sum().item() for k in want_z])
    kw = {"k": 2, "tol": 1e-6, "max_iter": 83, "progress": False}
    want_a = perturbation_alignment(model, F.cross_entropy, batches, distributed=False, **kw)
    got_a = perturbation_alignment(model, F.cross_entropy, batches, distributed=True, **kw)
    for var in ("cosine", "directional_curvature", "loss_increase", "layer_cosine"):
        c.close(f"alignment {var}", got_a.dataset[var].values, want_a.dataset[var].values, 1e-8)


def _raises_everywhere(c: _Checks, model: nn.Module, batches: list) -> None:
    """A NaN batch owned by rank 1 stops both ranks with the same error (no rank left waiting)."""
    from sharpscope.analysis.curvature import HessianOperator
    from sharpscope.analysis.gradients import gradient_zscores

    bad = [(torch.full_like(x, float("nan")), y) if i == 1 else (x, y) for i, (x, y) in enumerate(batches)]
    runs = {"Z-scores": lambda: gradient_zscores(model, F.cross_entropy, bad, include="all", progress=False,
                                                 distributed=True),
            "HVP": lambda: HessianOperator(model, F.cross_entropy, bad, distributed=True).matvec(torch.ones(83))}
    for name, run in runs.items():
        try:
            run()
        except FloatingPointError:
            c.passed.append(f"a NaN batch of rank 1 raises on every rank ({name})")
        else:
            c.failures.append(f"a NaN batch of rank 1 did not raise FloatingPointError here ({name})")


def _sharpness_and_landscape_checks(c: _Checks, model: nn.Module, batches: list) -> None:
    from sharpscope.analysis.landscape import interpolate, landscape_2d
    from sharpscope.analysis.sharpness import sharpness

    for kind in ("worst", "average"):
        kw = {"rho": 0.3, "kind": kind, "steps": 5, "n_samples": 4}
        want = sharpness(model, F.cross_entropy, batches, distributed=False, **kw)
        got = sharpness(model, F.cross_entropy, batches, distributed=True, **kw)
        c.close(f"sharpness {kind}", [got.value, got.base_loss], [want.value, want.base_loss])
        c.close(f"sharpness {kind} trace", got.trace, want.trace)
    grid = {"x": 3, "y": 3, "progress": False}
    want_l = landscape_2d(model, F.cross_entropy, batches, distributed=False, **grid)
    for split in ("points", "data"):
        got_l = landscape_2d(model, F.cross_entropy, batches, distributed=True, split=split, **grid)
        c.close(f"landscape_2d split={split}", np.stack([got_l.loss, got_l.accuracy]),
                np.stack([want_l.loss, want_l.accuracy]))
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3)
    want_i = interpolate(model, other, F.cross_entropy, batches, alphas=4, progress=False, distributed=False)
    got_i = interpolate(model, other, F.cross_entropy, batches, alphas=4, progress=False, distributed=True,
                        split="data")
    c.close("interpolate split=data", got_i.loss, want_i.loss)


class _TinyLM(nn.Module):
    """Next-token logits: embedding, tanh, causal running mean over the real tokens, linear head."""

    def __init__(self, vocab: int = 11, width: int = 4) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = torch.tanh(self.embed(input_ids)) * mask.unsqueeze(-1).to(self.head.weight.dtype)
        seen = mask.cumsum(1).clamp(min=1).unsqueeze(-1).to(h.dtype)
        return self.head(h.cumsum(1) / seen)


def _lm_batches() -> list[dict[str, torch.Tensor]]:
    """Right-padded dict batches of 4, 2 and 3 rows; a row of length L has L - 1 target tokens, so the
    batches hold 12, 6 and 11 targets, and the first one's halves (rows 0-1, rows 2-3) 11 and 1."""
    g = torch.Generator().manual_seed(4)
    out = []
    for lengths in ((7, 6, 2, 1), (5, 3), (6, 4, 4)):
        width = max(lengths)
        mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": torch.randint(1, 11, (len(lengths), width), generator=g) * mask,
                    "attention_mask": mask})
    return out


@torch.no_grad()
def _token_mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Independent reference: sum of -log p(next token) over every real target token, over their number."""
    total, n = 0.0, 0
    for b in batches:
        valid = b["attention_mask"][:, 1:] == 1
        logits = model(b["input_ids"], b["attention_mask"])[:, :-1]
        total += F.cross_entropy(logits[valid], b["input_ids"][:, 1:][valid], reduction="sum").item()
        n += int(valid.sum())
    return total / n


def _lm_checks(c: _Checks, model: nn.Module, batches: list) -> None:
    """The token LM objective on padded dict batches split over the ranks: 3 batches (dealt 2 + 1), and
    1 batch cut into two pieces of 11 and 1 target tokens (fewer batches than ranks: the pieces must be
    weighted by tokens, 11/12 and 1/12, not by rows). Loss (also against the hand-computed token mean),
    gradient, sharpness, H v and G v equal one process."""
    from sharpscope.analysis.evaluation import full_data_gradient, full_data_loss
    from sharpscope.analysis.objective import TokenCrossEntropy
    from sharpscope.analysis.parallel import shared_batches
    from sharpscope.analysis.sharpness import sharpness

    torch.manual_seed(3)
    lm, data = _TinyLM().double().eval(), _lm_batches()
    datasets = [(data, "3 LM batches"), (data[:1], "1 LM batch")]
    pieces = shared_batches(data[:1], True, TokenCrossEntropy())
    c.close("1 LM batch: one piece per rank, weighted by its tokens", [w for _, w in pieces],
            [(11 / 12, 1 / 12)[dist.rank()]])
    _product_checks(c, lm, "lm", datasets)
    params = list(lm.parameters())
    for part, label in datasets:
        loss = full_data_loss(lm, TokenCrossEntropy(), part, distributed=True)
        c.close(f"LM loss = token mean ({label})", loss, _token_mean_loss(lm, part))
        c.close(f"LM loss ({label})", loss, full_data_loss(lm, TokenCrossEntropy(), part, distributed=False))
        want, got = (full_data_gradient(lm, TokenCrossEntropy(), part, params, distributed=d) for d in (False, True))
        c.close(f"LM full-data loss and gradient ({label})", [got[0], *torch.cat([g.reshape(-1) for g in got[1]])],
                [want[0], *torch.cat([g.reshape(-1) for g in want[1]])])
        kw = {"rho": 0.3, "kind": "worst", "steps": 3}
        want_s, got_s = (sharpness(lm, "lm", part, distributed=d, **kw) for d in (False, True))
        c.close(f"LM sharpness ({label})", [got_s.value, got_s.base_loss], [want_s.value, want_s.base_loss])


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(rank, WORLD, f"tcp://127.0.0.1:{port}", "gloo", timeout_s=120)
    checks = _Checks()
    try:
        model, batches = _model(), _batches()
        for name, fn in (("hvp", _hvp_checks), ("hessian", _hessian_checks), ("gradients", _gradient_checks),
                         ("sharpness+landscape", _sharpness_and_landscape_checks), ("lm", _lm_checks)):
            start = time.perf_counter()
            checks.run(name, lambda fn=fn: fn(checks, model, batches))
            checks.seconds[name] = time.perf_counter() - start
            dist.barrier()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps({"failures": checks.failures, "passed": checks.passed,
                                                             "seconds": checks.seconds}))
        dist.destroy()


def test_every_analysis_split_over_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Every data-parallel analysis (Hessian and GGN products, eigenvalues and traces with both splits,
    density, layer curvature, Z-scores, mask statistics, ZSharp masks, alignment, sharpness, landscapes,
    interpolation; a token LM on padded dict batches) equals its single-process result on both ranks."""
    mp.spawn(_worker, args=(dist.free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"rank {rank} seconds per group of checks: {report['seconds']}")
        assert not report["failures"], f"rank {rank}:\n" + "\n".join(report["failures"])
        assert len(report["passed"]) >= 88, report["passed"]  # every check ran


def test_distributed_true_without_a_group_is_one_line() -> None:
    """Asking for a split without a process group is refused up front (not a hang, not a silent single run)."""
    from sharpscope.analysis.hessian import hessian_trace
    from sharpscope.errors import UserInputError

    with pytest.raises(UserInputError, match="process group"):
        hessian_trace(_model(), F.cross_entropy, _batches(), n_samples=6, distributed=True, progress=False)


FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1" / "last.pt"
CLI = ["analyze", str(FIXTURE), "--data", "digits", "--samples", "120", "--batch-size", "50", "--top-k", "2",
       "--trace-samples", "8", "--density-iter", "8", "--density-runs", "2", "--hessian", "--zscores", "--quiet"]


def _cli_worker(rank: int, port: int, out: str) -> None:
    """What torchrun does: the environment names the group; ``sharpscope analyze`` joins it itself."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sharpscope.cli import main

    code = main([*CLI, "--out", out])
    Path(out, f"exit{rank}").write_text(str(code))


@pytest.mark.slow
def test_analyze_command_under_torchrun_writes_the_single_process_results(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m sharpscope analyze`` (simulated with torchrun's environment):
    both ranks exit 0, the files are written once, and their numbers equal those of one process
    (the checkpoint is float32: 1e-5 relative; Z-score counts exactly)."""
    import sharpscope
    from sharpscope.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*CLI, "--out", str(one)]) == 0
    mp.spawn(_cli_worker, args=(dist.free_port(), str(two)), nprocs=WORLD, join=True)
    assert [(two / f"exit{r}").read_text() for r in range(WORLD)] == ["0"] * WORLD
    files = sorted(p.name for p in one.glob("*.nc"))
    assert files == sorted(p.name for p in two.glob("*.nc")) and not list(two.glob("*.partial"))
    for name in files:
        if "history" in name or "mask_log" in name:
            continue
        a, b = sharpscope.load(one / name).to_dataframe(), sharpscope.load(two / name).to_dataframe()
        numeric = [c for c in a.columns if a[c].dtype.kind in "fi"]
        np.testing.assert_allclose(b[numeric].to_numpy(float), a[numeric].to_numpy(float), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    za, zb = sharpscope.load(one / "run_v0_1__zscores.nc"), sharpscope.load(two / "run_v0_1__zscores.nc")
    np.testing.assert_array_equal(zb.dataset["counts"].values, za.dataset["counts"].values)
