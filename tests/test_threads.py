"""The thread policy (sharpscope.threads): picks the faster count, never exceeds the caller's, restores it.

Checked against trials whose speed at each thread count is known by construction (they sleep for a
duration that depends on ``torch.get_num_threads()``), not against timings of real kernels.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from sharpscope.errors import UserInputError
from sharpscope.threads import analysis_threads, choose_threads, fixed_threads, thread_policy


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def _trial_fast_at(fast: int):
    def trial() -> None:
        time.sleep(0.001 if torch.get_num_threads() == fast else 0.02)
    return trial


def test_choose_threads_picks_the_faster_count(two_threads):
    assert choose_threads(_trial_fast_at(1), repeats=2) == 1
    assert choose_threads(_trial_fast_at(2), repeats=2) == 2
    assert torch.get_num_threads() == 2


def test_tie_goes_to_fewer_threads(two_threads):
    assert choose_threads(lambda: time.sleep(0.005), repeats=2) == 1


def test_never_above_the_callers_setting():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert choose_threads(_trial_fast_at(2), max_threads=4) == 1
        with thread_policy(_trial_fast_at(2)) as chosen:
            assert chosen == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


def test_policy_restores_and_fixed_threads_wins(two_threads):
    with thread_policy(_trial_fast_at(1)) as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
        with thread_policy(_trial_fast_at(2)) as inner:  # decided once: the outer choice holds
            assert inner == 1
    assert torch.get_num_threads() == 2
    with fixed_threads(2), thread_policy(_trial_fast_at(1)) as chosen:
        assert chosen == 2
    assert torch.get_num_threads() == 2


def test_bad_thread_count_is_one_clear_error():
    with pytest.raises(UserInputError, match="threads must be an integer >= 1"):
        with fixed_threads(0):
            pass


def test_decorated_analysis_leaves_a_one_shot_iterator_unread(two_threads):
    model = nn.Linear(3, 2)
    seen = []

    @analysis_threads
    def analysis(model, loss_fn, data):
        seen.extend(data)
        return torch.get_num_threads()

    batches = iter([(torch.randn(4, 3), torch.randint(0, 2, (4,)))] * 3)
    analysis(model, nn.CrossEntropyLoss(), batches)
    assert len(seen) == 3
    assert analysis(model, nn.CrossEntropyLoss(), (torch.randn(4, 3), torch.randint(0, 2, (4,))), threads=1) == 1
    assert torch.get_num_threads() == 2
