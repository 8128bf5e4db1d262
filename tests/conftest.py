"""Shared test settings: deterministic seeds; one intra-op thread; matplotlib without a screen.

One thread: the thread policy (sharpscope.threads) never raises the count above the caller's, so
every analysis runs single-threaded and gives the same bits in every call; tests that compare two
calls bit for bit stay exact whatever the machine's load. tests/test_threads.py sets its own count.
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    torch.manual_seed(0)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
