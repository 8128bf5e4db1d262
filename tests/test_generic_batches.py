"""Every analysis on generic batches and objectives (issue 12).

Two kinds of independent checks:

* the same data given as ``(x, y)`` tuples (the path the other test files validate against exact
  references), as dicts ``{"pixel_values": x, "labels": y}`` and through a user's
  ``BatchLoss(fn(model, batch))`` must give the same numbers, bit for bit (the same operations run);
* a tiny causal "language model" (an embedding and a linear layer) with :class:`TokenCrossEntropy` on
  two right-padded batches with different numbers of real tokens must give the loss, gradient and
  Hessian-vector product of the token-level mean written out by hand (sum of the token
  cross-entropies over all sequences / number of target tokens), not the mean of the batch means.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.analysis.curvature import HessianOperator
from sharpscope.analysis.directions import eigen_directions
from sharpscope.analysis.evaluation import full_data_gradient, full_data_loss
from sharpscope.analysis.gradients import full_data_gradients, gradient_zscores
from sharpscope.analysis.hessian import hessian_eigenvalues, hessian_trace
from sharpscope.analysis.landscape import callable_identity, landscape_1d, landscape_2d
from sharpscope.analysis.masks import mask_statistics, perturbation_alignment, zsharp_masks
from sharpscope.analysis.objective import BatchLoss, ClassificationLoss, TokenCrossEntropy
from sharpscope.analysis.pyhessian_backend import pyhessian_trace
from sharpscope.analysis.sharpness import sharpness
from sharpscope.errors import UserInputError
from sharpscope.threads import _first_batch, forward_backward_trial


# --- a classifier, its data in three spellings --------------------------------------------------------
def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def tuple_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of different sizes (5 and 3), so the batch weights are not equal."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def dict_batches() -> list[dict[str, torch.Tensor]]:
    return [{"pixel_values": x, "labels": y} for x, y in tuple_batches()]


def _user_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


SPELLINGS = {
    "dict": lambda: (F.cross_entropy, dict_batches()),
    "batch_loss": lambda: (BatchLoss(_user_loss), tuple_batches()),
}


def _reference_and(spelling: str):
    loss_fn, data = SPELLINGS[spelling]()
    return (F.cross_entropy, tuple_batches()), (loss_fn, data)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_gradient_zscores_are_the_same_for_every_spelling(spelling):
    """Per-batch and full-data Z-score statistics: dicts and BatchLoss equal the (x, y) path exactly."""
    (ref_fn, ref_data), (loss_fn, data) = _reference_and(spelling)
    for full in (False, True):
        ref = gradient_zscores(classifier(), ref_fn, ref_data, bins=20, full_data=full, progress=False)
        got = gradient_zscores(classifier(), loss_fn, data, bins=20, full_data=full, progress=False)
        for name in ("counts", "power_sums", "threshold", "tail_count", "mean", "std"):
            np.testing.assert_array_equal(got.dataset[name].values, ref.dataset[name].values, err_msg=name)
        assert got.settings["batch_sizes"] == [5, 3]


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_mask_statistics_and_masks_are_the_same_for_every_spelling(spelling):
    """ZSharp's per-batch mask table and full-data masks: identical to the (x, y) path."""
    (ref_fn, ref_data), (loss_fn, data) = _reference_and(spelling)
    ref = mask_statistics(classifier(), ref_fn, ref_data, per_batch=True, progress=False)
    got = mask_statistics(classifier(), loss_fn, data, per_batch=True, progress=False)
    pd.testing.assert_frame_equal(pd.DataFrame(got.table), pd.DataFrame(ref.table))
    ref_masks = zsharp_masks(classifier(), ref_fn, ref_data)
    got_masks = zsharp_masks(classifier(), loss_fn, data)
    assert list(got_masks) == list(ref_masks)
    for name in ref_masks:
        assert torch.equal(got_masks[name], ref_masks[name]), name


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_landscapes_are_the_same_for_every_spelling(spelling):
    """1-D and 2-D slices (sequential and vmapped points): the same losses; accuracy wherever the
    objective can count correct predictions (a BatchLoss cannot: NaN, as for a regression)."""
    (ref_fn, ref_data), (loss_fn, data) = _reference_and(spelling)
    kwargs = dict(steps=[-0.5, 0.0, 0.5], progress=False)
    ref = landscape_1d(classifier(), ref_fn, ref_data, **kwargs)
    got = landscape_1d(classifier(), loss_fn, data, **kwargs)
    np.testing.assert_array_equal(got.loss, ref.loss)
    if spelling == "batch_loss":
        assert np.isnan(got.accuracy).all()
    else:
        np.testing.assert_array_equal(got.accuracy, ref.accuracy)
        vmapped = landscape_1d(classifier(), loss_fn, data, points_per_call=3, **kwargs)
        np.testing.assert_allclose(vmapped.loss, ref.loss, rtol=1e-12)
        np.testing.assert_array_equal(vmapped.accuracy, ref.accuracy)
    grid = dict(x=[-0.3, 0.2], y=[0.0, 0.4], progress=False)
    np.testing.assert_array_equal(landscape_2d(classifier(), loss_fn, data, **grid).loss,
                                  landscape_2d(classifier(), ref_fn, ref_data, **grid).loss)


def test_landscape_metrics_on_dict_batches_are_averaged_over_examples():
    """A user metric fn(outputs, targets) gets the same (outputs, labels) from a dict batch as from a tuple."""
    def wrong(out, y):
        return (out.argmax(1) != y).double().mean()

    kwargs = dict(steps=[0.0, 0.5], metrics={"err": wrong}, progress=False)
    ref = landscape_1d(classifier(), F.cross_entropy, tuple_batches(), **kwargs)
    got = landscape_1d(classifier(), F.cross_entropy, dict_batches(), **kwargs)
    np.testing.assert_array_equal(got["err"], ref["err"])
    np.testing.assert_allclose(got["err"], 1 - got.accuracy, rtol=1e-12)  # independent: the error rate


def test_landscape_refuses_what_a_user_objective_cannot_do():
    """Metrics need outputs and targets; vmapped points need output tensors: one line each."""
    with pytest.raises(UserInputError, match="metrics"):
        landscape_1d(classifier(), BatchLoss(_user_loss), tuple_batches(), steps=2, progress=False,
                     metrics={"m": lambda o, t: o.mean()})
    with pytest.raises(UserInputError, match="points_per_call"):
        landscape_1d(classifier(), BatchLoss(_user_loss), tuple_batches(), steps=2, progress=False,
                     points_per_call=2)


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_sharpness_is_the_same_for_every_spelling(spelling):
    """Worst-case (gradient ascent) and average-case (random draws) sharpness: identical numbers."""
    (ref_fn, ref_data), (loss_fn, data) = _reference_and(spelling)
    for kind in ("worst", "average"):
        kw = dict(rho=0.1, kind=kind, steps=3, n_samples=3)
        ref = sharpness(classifier(), ref_fn, ref_data, **kw)
        got = sharpness(classifier(), loss_fn, data, **kw)
        assert got.value == ref.value and got.base_loss == ref.base_loss
        assert got.settings["n_examples"] == 8


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_second_order_analyses_are_the_same_for_every_spelling(spelling):
    """Eigen directions, perturbation alignment and the Hessian trace (one seed): the same numbers."""
    (ref_fn, ref_data), (loss_fn, data) = _reference_and(spelling)
    ref_dir = eigen_directions(classifier(), ref_fn, ref_data, n=1, tol=1e-8, max_iter=60)[0]
    got_dir = eigen_directions(classifier(), loss_fn, data, n=1, tol=1e-8, max_iter=60)[0]
    assert got_dir.meta["eigenvalue"] == pytest.approx(ref_dir.meta["eigenvalue"], rel=1e-10)
    for name in ref_dir:
        torch.testing.assert_close(got_dir[name], ref_dir[name], rtol=1e-7, atol=1e-9)
    kw = dict(k=1, methods=("sam", "zsharp"), tol=1e-8, max_iter=60, progress=False)
    ref = perturbation_alignment(classifier(), ref_fn, ref_data, **kw)
    got = perturbation_alignment(classifier(), loss_fn, data, **kw)
    for name in ("cosine", "directional_curvature", "loss_increase"):
        np.testing.assert_allclose(got.dataset[name].values, ref.dataset[name].values, rtol=1e-7, err_msg=name)
    kw = dict(n_samples=6, method="hutchinson", progress=False)
    assert hessian_trace(classifier(), loss_fn, data, **kw).estimate == pytest.approx(
        hessian_trace(classifier(), ref_fn, ref_data, **kw).estimate, rel=1e-12)


def test_pyhessian_backend_refuses_dicts_and_other_objectives_in_one_line():
    """PyHessian only knows (inputs, targets) + criterion: anything else points to backend='sharpscope'."""
    for loss_fn, data in ((F.cross_entropy, dict_batches()), (BatchLoss(_user_loss), tuple_batches()),
                          ("lm", tuple_batches())):
        with pytest.raises(UserInputError, match="backend='sharpscope'") as err:
            pyhessian_trace(classifier(), loss_fn, data, max_iter=2)
        assert "\n" not in str(err.value)
    with pytest.raises(UserInputError, match="backend='sharpscope'"):  # the public route
        hessian_trace(classifier(), F.cross_entropy, dict_batches(), backend="pyhessian", progress=False)


def test_thread_trial_runs_on_a_dict_batch():
    """The thread policy's trial: a single dict batch is the batch (not its first key), and the unit runs
    the objective on its first examples with the model left in its mode and without .grad."""
    model, batch = classifier().train(), dict_batches()[0]
    assert _first_batch(batch) is batch
    assert _first_batch(dict_batches()) is not None
    forward_backward_trial(model, F.cross_entropy, batch, n=2)()
    forward_backward_trial(model, BatchLoss(_user_loss), tuple_batches()[0], n=2)()
    assert model.training and all(p.grad is None for p in model.parameters())


def test_objective_identity_is_stable_and_distinguishes_settings():
    """The landscape's resume check: ClassificationLoss(fn) is fn; equal objectives agree without a memory
    address in the text (stable across processes); other settings or functions differ."""
    assert callable_identity(ClassificationLoss(F.cross_entropy)) == callable_identity(F.cross_entropy)
    assert callable_identity(TokenCrossEntropy()) == callable_identity(TokenCrossEntropy())
    assert "0x" not in callable_identity(TokenCrossEntropy()) + callable_identity(BatchLoss(_user_loss))
    assert callable_identity(TokenCrossEntropy()) != callable_identity(TokenCrossEntropy(ignore_index=0))
    assert callable_identity(BatchLoss(_user_loss)) != callable_identity(BatchLoss(lambda model, b: model(b[0]).sum()))


# --- exact token weighting of a language model --------------------------------------------------------
VOCAB, PAD = 7, 0


class TinyLM(nn.Module):
    """A position-wise (hence causal) "language model": logits_t = W emb(token_t) + b."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(VOCAB, 4).double()
        self.head = nn.Linear(4, VOCAB).double()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(input_ids)))


def lm_batches() -> list[dict[str, torch.Tensor]]:
    """Right-padded batches: 2 sequences of length 6 (5 + 3 real tokens: 6 targets) and 3 of length 4
    (4 + 2 + 4 real tokens: 7 targets)."""
    g = torch.Generator().manual_seed(4)

    def padded(lengths: list[int], width: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}

    return [padded([5, 3], 6), padded([4, 2, 4], 4)]


def hand_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """sum over every sequence and real position t >= 1 of -log p(token_t | token_{t-1}) / #targets."""
    total, count = 0.0, 0
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            n = int(mask.sum())
            logp = torch.log_softmax(model(ids[None, :n])[0], dim=-1)
            total = total - logp[torch.arange(n - 1), ids[1:n]].sum()
            count += n - 1
    return total / count


def test_language_model_token_weighting_is_exact():
    """Loss, gradient and a Hessian-vector product over two padded batches equal those of the token
    mean written out by hand; the mean of the two batch means (equal weights) is measurably different."""
    model, batches, lm = TinyLM(), lm_batches(), TokenCrossEntropy()
    params = list(model.parameters())
    ref = hand_loss(model, batches)
    ref_grad = torch.autograd.grad(ref, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    ref_hv = torch.autograd.grad(ref_grad, params, grad_outputs=v)
    naive = (lm(model, batches[0]) + lm(model, batches[1])).detach() / 2
    assert abs(float(naive) - float(ref.detach())) > 1e-3  # the data tells the two weightings apart

    assert full_data_loss(model, lm, batches) == pytest.approx(float(ref.detach()), rel=1e-13)
    loss, grads = full_data_gradient(model, lm, batches, params)
    named = list(model.named_parameters())
    for g, mine, r in zip(grads, full_data_gradients(model, lm, batches, named, show_progress=False), ref_grad):
        torch.testing.assert_close(g, r.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(mine, r.detach(), rtol=1e-12, atol=1e-14)
    with HessianOperator(model, lm, batches) as op:
        hv = op.matvec(op.flatten(v))
    torch.testing.assert_close(hv, torch.cat([h.reshape(-1) for h in ref_hv]), rtol=1e-11, atol=1e-13)


def test_language_model_landscape_and_sharpness_use_token_means():
    """At the origin a landscape point is the hand token mean, with the token accuracy counted by hand;
    "lm" by name is the same objective; the base loss of the sharpness search is that value too."""
    model, batches = TinyLM(), lm_batches()
    ref = float(hand_loss(model, batches).detach())
    correct, count = 0, 0
    for batch in batches:
        logits = model(batch["input_ids"])
        for seq, ids, mask in zip(logits, batch["input_ids"], batch["attention_mask"]):
            n = int(mask.sum())
            correct += int((seq[:n - 1].argmax(-1) == ids[1:n]).sum())
            count += n - 1
    land = landscape_1d(model, "lm", batches, steps=[0.0, 0.3], progress=False)
    assert land.loss[0] == pytest.approx(ref, rel=1e-13)
    assert land.accuracy[0] == pytest.approx(correct / count, rel=1e-13)
    vmapped = landscape_1d(model, TokenCrossEntropy(), batches, steps=[0.0, 0.3], progress=False, points_per_call=2)
    np.testing.assert_allclose(vmapped.loss, land.loss, rtol=1e-12)
    np.testing.assert_array_equal(vmapped.accuracy, land.accuracy)
    assert sharpness(model, "lm", batches, rho=0.05, steps=2).base_loss == pytest.approx(ref, rel=1e-13)
    top = hessian_eigenvalues(model, TokenCrossEntropy(), batches, k=1, tol=1e-8, max_iter=80, progress=False)
    assert np.isfinite(top.eigenvalues[0])


def test_language_model_landscape_resumes_only_with_the_same_objective(tmp_path):
    """The resume identity of a TokenCrossEntropy: an equal new object (or the name "lm") continues the
    grid; another ignore_index is refused in one line naming the loss function."""
    model, batches = TinyLM(), lm_batches()
    kwargs = dict(steps=[-0.2, 0.0], checkpoint_path=tmp_path / "grid.nc", progress=False)
    first = landscape_1d(model, TokenCrossEntropy(), batches, **kwargs)
    again = landscape_1d(model, "lm", batches, **kwargs)
    np.testing.assert_array_equal(again.loss, first.loss)
    with pytest.raises(UserInputError, match="another loss function"):
        landscape_1d(model, TokenCrossEntropy(ignore_index=PAD), batches, **kwargs)

