"""Thread policy: run each analysis (and training) with the intra-op thread count that pays off.

Small models and small batches are the common case in notebooks, and there torch's intra-op threads
spin on every tiny kernel; when another process keeps a core busy, two threads can be several
times slower than one (measured on the 2-core CI machine: 157 ms vs 21 ms per Hessian-vector product
of the digits MLP). Neither the model size nor the machine's load alone tells which count is faster,
so the policy measures: it times a representative unit of the work (one forward and backward pass
on a few examples of the first batch) at one thread and at the caller's thread count, alternating
so that a change of load hits both, and runs the whole analysis with the faster one (fewer threads on
a tie within 5 %). It decides once per analysis, never raises the count above the caller's setting,
and restores the caller's setting afterwards.

``fixed_threads(n)`` (the CLI's ``--threads N``) turns the measurement off and uses ``n`` threads.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch

from ._validate import positive_int

F = TypeVar("F", bound=Callable[..., Any])

_FIXED: contextvars.ContextVar[int | None] = contextvars.ContextVar("sharpscope_fixed_threads", default=None)
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("sharpscope_policy_active", default=False)
#: Relative margin under which the smaller thread count wins (a tie is cheaper for other work).
TIE_MARGIN = 0.05
#: A first measurement this many times slower than the other settles the choice without repeats.
CLEAR_MARGIN = 1.5
#: The trial unit's target duration at one thread, and the bounds on its number of examples.
TRIAL_SECONDS = 0.05
MIN_TRIAL_EXAMPLES = 8
MAX_TRIAL_EXAMPLES = 256
#: A decision for the same work (model structure, input shape, device) is reused this long.
REUSE_SECONDS = 60.0
_RECENT: dict[tuple[Any, int], tuple[float, int]] = {}


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Inside this block every analysis uses exactly ``threads`` threads (None: the policy decides)."""
    token = _FIXED.set(None if threads is None else positive_int(threads, "threads"))
    try:
        yield
    finally:
        _FIXED.reset(token)


def fixed_thread_count() -> int | None:
    """The count fixed by an enclosing :func:`fixed_threads` block (None: the policy decides)."""
    return _FIXED.get()


def _time_once(trial: Callable[[], Any], threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    trial()
    return time.perf_counter() - start


def choose_threads(trial: Callable[[], Any], max_threads: int | None = None, repeats: int = 3) -> int:
    """The thread count in ``{1, max_threads}`` under which ``trial()`` runs faster.

    ``trial`` runs twice at one thread (the first is a warm-up) and once at ``max_threads``; when one
    count is clearly faster (by :data:`CLEAR_MARGIN`) that settles it, so a count that is slow on a
    busy machine is tried only once. Otherwise both are timed ``repeats`` more times, alternating,
    and each is judged by its median run (robust to the moments when a busy neighbour is
    descheduled). The caller's thread setting is restored.
    """
    saved = torch.get_num_threads()
    top = saved if max_threads is None else max(1, min(int(max_threads), saved))
    if top == 1:
        return 1
    try:
        _time_once(trial, 1)
        runs = {1: [_time_once(trial, 1)], top: [_time_once(trial, top)]}
        if max(runs[1][0], runs[top][0]) <= min(runs[1][0], runs[top][0]) * CLEAR_MARGIN:
            for _ in range(repeats):
                for n in (1, top):
                    runs[n].append(_time_once(trial, n))
    finally:
        torch.set_num_threads(saved)
    return 1 if statistics.median(runs[1]) <= statistics.median(runs[top]) * (1 + TIE_MARGIN) else top


def _remembered_choice(trial: Callable[[], Any], top: int) -> int:
    """:func:`choose_threads`, reusing a decision made for the same work in the last :data:`REUSE_SECONDS`.

    A notebook or the demo runs many analyses of one model in a row; the machine's load does not
    change from one to the next, so measuring each time would only add its cost. A trial that
    cannot run (a model that does not fit its data) keeps ``top``: the analysis' own checks then
    report the problem in one line.
    """
    key = getattr(trial, "work_key", None)
    now = time.monotonic()
    if key is not None and (key, top) in _RECENT and now - _RECENT[(key, top)][0] < REUSE_SECONDS:
        return _RECENT[(key, top)][1]
    try:
        chosen = choose_threads(trial, top)
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError):
        return top
    if key is not None:
        _RECENT[(key, top)] = (now, chosen)
    return chosen


@contextlib.contextmanager
def thread_policy(trial: Callable[[], Any] | None = None, threads: int | None = None) -> Iterator[int]:
    """Run a block with the chosen thread count; yield it; restore the caller's setting afterwards.

    ``threads`` (or an enclosing :func:`fixed_threads`) fixes the count; otherwise ``trial`` is timed
    (:func:`choose_threads`). Nested policies keep the outer choice (decide once per analysis).
    """
    saved = torch.get_num_threads()
    fixed = threads if threads is not None else _FIXED.get()
    if fixed is not None:
        chosen = positive_int(fixed, "threads")
    elif _ACTIVE.get() or trial is None:
        chosen = saved
    else:
        chosen = _remembered_choice(trial, saved)
    token = _ACTIVE.set(True)
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        _ACTIVE.reset(token)
        torch.set_num_threads(saved)


def forward_backward_trial(model: torch.nn.Module, loss_fn: Any, batch: Any,
                           n: int | None = None) -> Callable[[], None]:
    """A unit of an analysis' work: loss and parameter gradients on the first ``n`` examples of ``batch``.

    ``batch``: ``(x, y)``, a dict of tensors or anything ``loss_fn(model, batch)`` understands;
    ``loss_fn``: anything :func:`~sharpscope.analysis.objective.as_objective` accepts.

    Uses ``torch.autograd.grad`` in eval mode, so ``.grad``, buffers and the train flag stay as found.
    ``n=None`` sizes the unit, on its first call, to take about :data:`TRIAL_SECONDS` at one thread
    (between :data:`MIN_TRIAL_EXAMPLES` and :data:`MAX_TRIAL_EXAMPLES` examples, measured on a few),
    so that deciding costs a fraction of a second on a large model and the unit is not trivially small
    on a small one. Nothing runs until the unit is called: a decision reused from
    :func:`thread_policy`'s memory costs no pass through the model.
    """
    return _ForwardBackward(model, loss_fn, batch, n)


class _ForwardBackward:
    """The callable behind :func:`forward_backward_trial`; ``work_key`` names the work for reuse.

    ``batch`` is any batch an analysis takes (``(x, y)``, a dict of tensors, ...) and ``loss_fn``
    anything :func:`~sharpscope.analysis.objective.as_objective` accepts; the unit is the objective's
    loss on the batch's first examples (:func:`~sharpscope.analysis.batching.slice_batch`).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Any, batch: Any, n: int | None) -> None:
        from .analysis.batching import batch_size  # the analysis package imports this module
        from .analysis.objective import as_objective, first_tensor

        self.model, self.objective, self.batch = model, as_objective(loss_fn, model), batch
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.examples = batch_size(batch)
        first = first_tensor(batch)
        self.plan = None if n is None else (n, 1)
        self.work_key = (type(model).__qualname__, sum(p.numel() for p in self.params),
                         None if first is None else tuple(first.shape[1:]),
                         None if first is None else str(first.dtype), str(self.device), n, self.objective.name)

    def __call__(self) -> None:
        if self.plan is None:
            self.plan = self._calibrated_plan()
        self._run(*self.plan)

    def _run(self, size: int, repeats: int = 1) -> None:
        from .analysis.batching import eval_mode, slice_batch, to_device

        batch = to_device(slice_batch(self.batch, slice(0, size)), self.device)
        with eval_mode(self.model):
            for _ in range(repeats):
                loss = self.objective(self.model, batch)
                if self.params and loss.requires_grad:
                    torch.autograd.grad(loss, self.params, allow_unused=True)

    def _calibrated_plan(self) -> tuple[int, int]:
        """``(examples, repetitions)`` for a unit of about :data:`TRIAL_SECONDS` at one thread.

        The per-example cost is taken as linear; a model too small to fill the time with
        :data:`MAX_TRIAL_EXAMPLES` examples repeats its unit, so that a timing spans several scheduler
        time slices (a few ms each) and sees the cost of a busy neighbour.
        """
        available = self.examples
        probe = min(MIN_TRIAL_EXAMPLES, available)
        saved = torch.get_num_threads()
        try:
            self._run(probe)  # warm-up
            seconds = max(_time_once(lambda: self._run(probe), 1), 1e-6)
        finally:
            torch.set_num_threads(saved)
        size = max(probe, min(int(probe * TRIAL_SECONDS / seconds), MAX_TRIAL_EXAMPLES, available))
        repeats = max(1, min(int(TRIAL_SECONDS / (seconds * size / probe)), 1000))
        return size, repeats


def _first_batch(data: Any) -> Any | None:
    """The first batch of ``data``, or None for a one-shot iterator (reading it would consume it)."""
    if isinstance(data, Mapping):  # one dict batch (iterating it would give its keys)
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data
    try:
        iterator = iter(data)
    except TypeError:
        return None
    if iterator is data:
        return None
    return next(iterator, None)


def analysis_threads(func: F) -> F:
    """Decorate an analysis ``func(model, loss_fn, data, ...)`` to run under :func:`thread_policy`.

    The model is the argument named ``model`` (or ``model_a``). The trial is
    :func:`forward_backward_trial` on the first batch of ``data``; a ``threads=`` keyword fixes the
    count instead.
    """
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args: Any, threads: int | None = None, **kwargs: Any) -> Any:
        trial = None
        if threads is None and _FIXED.get() is None and not _ACTIVE.get() and torch.get_num_threads() > 1:
            bound = signature.bind_partial(*args, **kwargs).arguments
            trial = _trial_or_none(bound.get("model", bound.get("model_a")), bound.get("loss_fn"), bound.get("data"))
        with thread_policy(trial, threads):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _trial_or_none(model: Any, loss_fn: Any, data: Any) -> Callable[[], None] | None:
    """The trial for this call, or None when it cannot be built (the analysis reports bad input itself)."""
    usable_loss = loss_fn is None or callable(loss_fn) or isinstance(loss_fn, str)
    batch = _first_batch(data) if isinstance(model, torch.nn.Module) and usable_loss else None
    if batch is None:
        return None
    try:
        return forward_backward_trial(model, loss_fn, batch)
    except (ValueError, TypeError, KeyError, AttributeError):  # an unknown loss name, a batch without tensors
        return None
