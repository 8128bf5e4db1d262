"""Objectives (sharpscope.analysis.objective) and generic batches (sharpscope.analysis.batching).

Independent references: the token-level cross-entropy written out by hand (sum of -log softmax at the
target over the valid tokens, divided by their number), Hugging Face's own ``.loss`` of a causal LM
(its documented definition is the same mean over shifted, non-ignored labels), and the classification
path ``loss_fn(model(x), y)`` the rest of the suite validates against exact references.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharpscope as ss
from sharpscope.analysis.batching import as_batches, batch_size, batch_weights, slice_batch, to_device
from sharpscope.analysis.evaluation import check_model_accepts, full_data_gradient, full_data_loss
from sharpscope.analysis.objective import (
    BatchLoss,
    ClassificationLoss,
    ModelOutputLoss,
    TokenCrossEntropy,
    as_objective,
)
from sharpscope.errors import UserInputError
from tests._curvature_models import parameters_from_flat


class TinyLM(nn.Module):
    """Embedding + linear head: logits (B, T, V) for input_ids (B, T); attention_mask accepted and unused."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(input_ids)))


def _hand_token_ce(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """sum over all valid (shifted) tokens of -log p(target) / their number, written out."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in batches:
        logp = torch.log_softmax(model(b["input_ids"]).double(), -1)
        for i in range(b["input_ids"].shape[0]):
            for t in range(b["input_ids"].shape[1] - 1):
                if b["attention_mask"][i, t + 1] == 1:
                    total = total - logp[i, t, b["input_ids"][i, t + 1]]
                    count += 1
    return total / count


def _padded_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids_a = torch.randint(0, 11, (3, 7), generator=g)
    mask_a = torch.ones_like(ids_a)
    mask_a[0, 4:] = 0
    mask_a[2, 2:] = 0
    ids_b = torch.randint(0, 11, (2, 5), generator=g)
    mask_b = torch.ones_like(ids_b)
    return [{"input_ids": ids_a, "attention_mask": mask_a}, {"input_ids": ids_b, "attention_mask": mask_b}]


def test_token_cross_entropy_is_the_mean_over_all_valid_tokens_across_batches():
    torch.manual_seed(0)
    model = TinyLM().double()
    batches = _padded_batches()
    objective = TokenCrossEntropy()
    # counts: 3 (row 0: tokens 1..3), 6, 1 (row 2: token 1) in batch a; 2 x 4 in batch b
    assert [objective.count(b) for b in batches] == [3 + 6 + 1, 8]
    loss = full_data_loss(model, objective, batches)
    assert loss == pytest.approx(_hand_token_ce(model, batches).item(), abs=1e-12)


def test_token_cross_entropy_gradient_equals_the_concatenated_data():
    """Two padded batches give the gradient of the hand-written mean over all their tokens."""
    torch.manual_seed(1)
    model = TinyLM().double()
    batches = _padded_batches()
    params = list(model.parameters())
    _, grads = full_data_gradient(model, "lm", batches, params)
    expected = torch.autograd.grad(_hand_token_ce(model, batches), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_token_cross_entropy_matches_hugging_face_loss():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=37, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 37, (3, 9))
    labels = ids.clone()
    labels[1, 5:] = -100
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        hf = model(**batch).loss
        ours = TokenCrossEntropy()(model, batch)
        own = ModelOutputLoss.for_model(model)(model, batch)
    torch.testing.assert_close(ours, hf, rtol=1e-6, atol=1e-6)
    assert own.item() == hf.item()
    assert ModelOutputLoss.for_model(model).shift
    assert ModelOutputLoss.for_model(model).count(batch) == TokenCrossEntropy().count(batch) == 3 * 8 - 4


def test_dict_batches_equal_tuple_batches_for_a_classifier():
    """The same examples as (x, y), as {"pixel_values", "labels"} and through loss_fn(model, batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(10, 3, 2, 2), torch.randint(0, 3, (10,))
    tuples = [(x[:4], y[:4]), (x[4:], y[4:])]
    dicts = [{"pixel_values": a, "labels": b} for a, b in tuples]
    by_hand = BatchLoss(lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]))
    reference = full_data_loss(model, nn.CrossEntropyLoss(), tuples, with_accuracy=True)
    assert full_data_loss(model, nn.CrossEntropyLoss(), dicts, with_accuracy=True) == reference
    assert full_data_loss(model, by_hand, tuples) == reference.loss
    assert reference.loss == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-6)


def test_as_objective_dispatch():
    def by_batch(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    assert isinstance(as_objective(None), ClassificationLoss)
    assert isinstance(as_objective(nn.CrossEntropyLoss()), ClassificationLoss)
    assert isinstance(as_objective(F.mse_loss), ClassificationLoss)
    assert isinstance(as_objective(by_batch), BatchLoss)
    assert isinstance(as_objective("LM"), TokenCrossEntropy)
    assert isinstance(as_objective("hf"), ModelOutputLoss)
    objective = TokenCrossEntropy(ignore_index=0)
    assert as_objective(objective) is objective
    with pytest.raises(UserInputError, match="unknown loss 'focal'"):
        as_objective("focal")
    with pytest.raises(TypeError):
        as_objective(3)


def test_generic_batch_helpers():
    batch = {"input_ids": torch.arange(12).view(4, 3), "attention_mask": torch.ones(4, 3), "scale": torch.tensor(2.0)}
    assert batch_size(batch) == 4
    part = slice_batch(batch, slice(1, 3))
    assert part["input_ids"].tolist() == [[3, 4, 5], [6, 7, 8]] and part["scale"].item() == 2.0
    moved = to_device(batch, torch.device("cpu"), torch.float64)
    assert moved["attention_mask"].dtype == torch.float64 and moved["input_ids"].dtype == torch.int64
    assert len(as_batches(batch)) == 1  # one dict is one batch
    assert len(as_batches([batch, batch])) == 2
    # (x, y, index) triples from a DataLoader keep (x, y)
    assert len(as_batches([(torch.ones(2, 1), torch.zeros(2), torch.arange(2))])[0]) == 2
    assert batch_weights([batch, slice_batch(batch, slice(0, 1))]) == [0.8, 0.2]
    with pytest.raises(UserInputError, match="data is empty"):
        as_batches([{"input_ids": torch.zeros(0, 3)}])


def test_bad_batches_get_one_line():
    model = nn.Linear(4, 2)
    with pytest.raises(UserInputError, match="has no targets"):
        full_data_loss(model, nn.CrossEntropyLoss(), [{"pixel_values": torch.ones(2, 4)}])
    with pytest.raises(UserInputError, match="needs 'labels'"):
        ModelOutputLoss()(model, {"input_ids": torch.ones(2, 4)})
    with pytest.raises(UserInputError, match="no targets to average"):
        batch_weights([{"input_ids": torch.ones(2, 1, dtype=torch.long)}], "lm")  # one token: nothing predicted
    with pytest.raises(UserInputError, match="cannot run on this data"):
        check_model_accepts(model, "lm", {"input_ids": torch.ones(2, 3, dtype=torch.long)})


def test_hessian_of_token_lm_with_unequal_padded_batches_equals_the_concatenated_hessian():
    """Lanczos on two padded batches equals eigh of torch.func.hessian of the hand-written token mean."""
    torch.manual_seed(2)
    model = TinyLM(vocab=5, width=3).double()
    batches = _padded_batches()
    for b in batches:
        b["input_ids"] = b["input_ids"] % 5
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        f = ss.analysis.objective.functional_model(model, parameters_from_flat(model, flat))
        total = sum(TokenCrossEntropy()(f, b) * TokenCrossEntropy().count(b) for b in batches)
        return total / sum(TokenCrossEntropy().count(b) for b in batches)

    exact = torch.linalg.eigvalsh(torch.func.hessian(loss_of)(flat0)).flip(0)[:3]
    result = ss.hessian_eigenvalues(model, "lm", batches, k=3, tol=1e-12)
    assert abs(loss_of(flat0).item() - _hand_token_ce(model, batches).item()) < 1e-12
    torch.testing.assert_close(torch.as_tensor(result.eigenvalues), exact, rtol=0, atol=1e-9)
