"""fit's general form: any loss_fn and any re-iterable of batches (DataLoader, list of dict batches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sharpscope.analysis.objective import TokenCrossEntropy
from sharpscope.errors import UserInputError
from sharpscope.optim import SAM
from sharpscope.train import fit

LR, MOMENTUM, DECAY, RHO = 0.1, 0.9, 1e-3, 0.05


def _data(n: int = 96, d: int = 6, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1) + (x[:, -1] > 1.5).long()) % classes
    return TensorDataset(x, y)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _recording_loss(record: list[float]):
    def smoothed(model, batch):
        """Label-smoothed cross-entropy written by hand: (1 - s) * NLL + s * mean_k(-log p_k)."""
        x, y = batch
        logp = torch.log_softmax(model(x), 1)
        loss = (0.9 * -logp.gather(1, y[:, None]).squeeze(1) - 0.1 * logp.mean(1)).mean()
        record.append(float(loss.detach()))
        return loss

    return smoothed


def _hand_loop(loader: DataLoader, epochs: int, sam: bool) -> tuple[nn.Module, list[float]]:
    """The reference: the textbook loop (zero_grad, backward, step; SAM: first_step, second pass, second_step)."""
    model, record = _mlp(), []
    loss_fn = _recording_loss(record)
    if sam:
        opt = SAM(list(model.named_parameters()), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOMENTUM,
                  weight_decay=DECAY)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            if sam:
                opt.first_step(zero_grad=True)
                loss_fn(model, batch).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.step()
    return model, record


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_dataloader_and_model_batch_loss_equal_a_hand_written_loop_step_by_step(optimizer):
    """fit(DataLoader, loss_fn(model, batch)) records, call by call, the losses of the textbook loop with the same
    optimizer and batches (both passes of SAM use the loss_fn), ends at its weights, and the loss decreases."""
    loader = DataLoader(_data(), batch_size=16, shuffle=False)
    record: list[float] = []
    result = fit(_mlp(), loader, config=None, loss_fn=_recording_loss(record), optimizer=optimizer, lr=LR,
                 momentum=MOMENTUM, weight_decay=DECAY, rho=RHO, epochs=3, device="cpu", progress=False)
    reference, expected = _hand_loop(loader, 3, optimizer == "sam")
    assert record == expected
    for a, b in zip(result.model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    history = result.metrics()
    assert history["train_loss"].iloc[-1] < 0.8 * history["train_loss"].iloc[0]
    assert history["train_acc"].isna().all()  # a loss_fn(model, batch) gives no accuracy: none is made up
    assert result.best_test_acc is None


class TinyLM(nn.Module):
    """Embedding -> linear: next-token logits from the current token only."""

    def __init__(self, vocab: int = 12, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def _token_batches(n_batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences t, t+1, t+2, ... (mod 12) with right padding of varying length: next token is learnable."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        start = torch.randint(0, 12, (4, 1), generator=g)
        ids = (start + torch.arange(9)) % 12
        lengths = torch.randint(3, 10, (4,), generator=g)
        mask = (torch.arange(9) < lengths[:, None]).long()
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def _token_mean(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Reference: the mean cross-entropy over every real next-token target of all batches pooled together."""
    logits, targets = [], []
    with torch.no_grad():
        for b in batches:
            out = model(b["input_ids"])[:, :-1]
            valid = b["attention_mask"][:, 1:] == 1
            logits.append(out[valid])
            targets.append(b["input_ids"][:, 1:][valid])
    return float(F.cross_entropy(torch.cat(logits), torch.cat(targets)))


def test_dict_batches_and_token_cross_entropy_train_a_tiny_lm():
    """Dict batches with padding and TokenCrossEntropy: the loss falls, the token accuracy is reported, and the test
    loss is the token-weighted mean over all batches (pooled cross-entropy, computed by hand)."""
    train, test = _token_batches(6, 0), _token_batches(3, 1)
    result = fit(TinyLM(), train, test, loss_fn=TokenCrossEntropy(), optimizer="adam", base="adam", lr=0.01,
                 weight_decay=0.0, epochs=4, device="cpu", progress=False)
    history = result.metrics()
    assert history["train_loss"].iloc[-1] < 0.5 * history["train_loss"].iloc[0]
    assert 0 <= history["test_acc"].iloc[-1] <= 1 and history["test_acc"].iloc[-1] > history["test_acc"].iloc[0]
    result.model.eval()
    assert history["test_loss"].iloc[-1] == pytest.approx(_token_mean(result.model, test), rel=1e-6)


def test_shuffled_dataloader_resumes_bit_for_bit(tmp_path):
    """A DataLoader(shuffle=True) without a generator draws its order from torch's generator, which fit seeds and
    its checkpoints store: 2 epochs straight equal 1 epoch + resume to 2 (and a tracker changes nothing)."""
    def run(out, epochs, resume, track=""):
        loader = DataLoader(_data(), batch_size=16, shuffle=True)
        return fit(_mlp(), loader, loss_fn=F.cross_entropy, optimizer="zsharp", lr=LR, epochs=epochs, device="cpu",
                   progress=False, out=out, resume=resume, track=track, track_every=4, track_samples=24)

    straight = run(tmp_path / "a", 2, False)
    run(tmp_path / "b", 1, False)
    resumed = run(tmp_path / "b", 2, True)
    tracked = run(tmp_path / "c", 2, False, track="lambda_max,update_curvature")
    for a, b, c in zip(straight.model.parameters(), resumed.model.parameters(), tracked.model.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    keys = ("epoch", "step", "train_loss", "train_acc", "test_loss")
    assert [[r[k] for k in keys] for r in straight.history] == [[r[k] for k in keys] for r in resumed.history]
    assert straight.history[-1]["test_loss"] is None  # no test data: nothing, not NaN
    assert set(tracked.tracking["measure"]) == {"lambda_max", "update_curvature"}
    assert (tracked.tracking.query("measure == 'lambda_max'")["value"] > 0).all()


def test_bad_generic_inputs_are_one_line_errors():
    """An iterator (one pass only), label_smoothing with a custom loss and an unsized iterable are refused."""
    loader = DataLoader(_data(), batch_size=16)
    with pytest.raises(UserInputError, match="re-iterable"):
        fit(_mlp(), iter(loader), epochs=1, device="cpu", progress=False)
    with pytest.raises(UserInputError, match="label_smoothing"):
        fit(_mlp(), loader, loss_fn=F.cross_entropy, label_smoothing=0.1, epochs=1, device="cpu", progress=False)

    class Stream:
        def __iter__(self):
            return iter(loader)

    with pytest.raises(UserInputError, match="no len"):
        fit(_mlp(), Stream(), epochs=1, device="cpu", progress=False)


def test_batches_under_torch_distributed_are_refused_in_one_line(monkeypatch):
    """Under torch.distributed (simulated) fit on batches says it needs TensorData, before any work."""
    from sharpscope.train import loop

    monkeypatch.setattr(loop.dist_, "is_distributed", lambda: True)
    with pytest.raises(UserInputError, match="torch.distributed fit needs TensorData"):
        fit(_mlp(), DataLoader(_data(), batch_size=16), epochs=1, device="cpu", progress=False)
