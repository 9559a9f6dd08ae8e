"""Calls that arrive while a model is busy share its next forward: the queue and the thread, for any stage.

Why: a GPU runs one small forward hardly faster than a larger one, and calls from different threads do
not overlap on it. In a burst (16 clients at once) the text encoder ran 16 CLIP forwards one after
another, so the last request reached the denoiser a second after the first (docs/benchmarks.md, run F);
and the 16 videos that finish at one step were decoded 4 frames a VAE forward, call after call: 1.09 s on
an H200 against 0.66 s for the same 256 frames 64 at a time (run H). The text encoder
(services/text_encoder/batcher.py) and the decoder (services/decoder/vae.py) hand their calls to one of
these; what a forward does with its items stays theirs.

No call waits for company: an item that finds the model idle runs at once, alone; only the items that
arrive during a forward are gathered for the next one. ``take_batch`` decides (oldest first, within a
budget, of the oldest's kind: another kind is stepped over); ``CallBatcher`` runs the forwards on its own
thread.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

from services.common.errors import ResourceExhausted, Unavailable
from services.common.logs import kv

Item = TypeVar("Item")
Result = TypeVar("Result")


def take_batch(sizes: Sequence[int], budget: int, kinds: Sequence[Hashable] | None = None) -> list[int]:
    """Which of the pending items (oldest first, given as their sizes) go into the next forward, by index:
    the oldest always, even alone above ``budget``; then each next one of the oldest's kind while the total
    stays within ``budget``. Items of another kind (``kinds``: frames of two sizes cannot share a forward)
    are stepped over, not waited behind: the oldest of them leads a later forward. Within a kind, first
    come, first served: an item is never passed by a later, smaller one."""
    if not sizes:
        return []
    taken, total = [0], sizes[0]
    for i in range(1, len(sizes)):
        if kinds is not None and kinds[i] != kinds[0]:
            continue
        if total + sizes[i] > budget:
            break
        taken.append(i)
        total += sizes[i]
    return taken


@dataclass
class _Pending(Generic[Item]):
    item: Item
    alive: Callable[[], bool]           # False once its caller is gone (a gRPC call's is_active)
    result: Future = field(default_factory=Future)


def out_of_memory(error: BaseException) -> bool:
    """Whether a forward failed for want of memory (torch's OutOfMemoryError says "out of memory"): the
    caller hears RESOURCE_EXHAUSTED, which may pass if it tries again later, not INTERNAL."""
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower()


def live(pending: _Pending) -> bool:
    """Whether a waiting item is still wanted: not cancelled and its caller still there (a gone caller's
    Future is cancelled here, so nothing waits on it)."""
    if pending.result.cancelled():
        return False
    if not pending.alive():
        pending.result.cancel()
        return False
    return True


class CallBatcher(Generic[Item, Result]):
    """Runs ``forward`` (items -> one result an item, in order) on one thread for every caller, a batch of
    the items waiting at a time (``take_batch`` on ``size(item)`` within ``budget``, of one ``kind(item)``).
    An item whose caller is gone (``alive``) before its forward is dropped, never run. A forward that raises
    is tried again item by item, so each caller hears its own error (``failure``: what failed, in words;
    ResourceExhausted when the item alone ran out of memory, RuntimeError otherwise)."""

    def __init__(self, forward: Callable[[list[Item]], list[Result]], budget: int, size: Callable[[Item], int],
                 *, name: str, failure: str, stopping: str, log: logging.Logger,
                 kind: Callable[[Item], Hashable] | None = None) -> None:
        if budget < 1:
            raise ValueError(f"the batch budget is {budget}; it must be at least 1")
        self._run_forward, self.budget, self._size, self._kind = forward, budget, size, kind
        self._failure, self._stopping, self._log = failure, stopping, log
        self._pending: list[_Pending[Item]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Item, alive: Callable[[], bool] = lambda: True) -> Future:
        """A Future of this item's result, from the next forward that has room for it; cancelling it, or
        ``alive()`` turning False, before that forward starts takes the item out. Raises Unavailable once
        the batcher is closed."""
        pending = _Pending(item, alive)
        with self._wake:
            if self._closed or not self._thread.is_alive():
                raise Unavailable(self._stopping)
            self._pending.append(pending)
            self._wake.notify()
        return pending.result

    def waiting(self) -> int:
        """Items submitted and not yet taken into a forward (a test's way to know the arrival order)."""
        with self._wake:
            return len(self._pending)

    def stopped(self) -> bool:
        """Whether the thread has ended (after ``close``)."""
        return not self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the items already waiting, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    def _next_batch(self) -> list[_Pending[Item]] | None:
        with self._wake:
            while True:
                while not self._pending and not self._closed:
                    self._wake.wait()
                self._pending = [p for p in self._pending if live(p)]
                if not self._pending:
                    if self._closed:
                        return None
                    continue
                kinds = [self._kind(p.item) for p in self._pending] if self._kind is not None else None
                taken = set(take_batch([self._size(p.item) for p in self._pending], self.budget, kinds))
                batch = [p for i, p in enumerate(self._pending) if i in taken]
                self._pending = [p for i, p in enumerate(self._pending) if i not in taken]
                batch = [p for p in batch if p.result.set_running_or_notify_cancel()]   # no cancel after this
                if batch:
                    return batch

    def _run(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except BaseException as error:  # noqa: BLE001 - the loop must outlive anything: callers wait on it
                self._log.error(kv("batcher_error", batcher=self._thread.name,
                                   error=f"{type(error).__name__}: {error}"[:300]))
                continue
            if batch is None:
                return
            if not self._forward(batch) and len(batch) > 1:
                for pending in batch:           # too big together (out of memory, say): each item alone
                    if pending.alive():
                        self._forward([pending])
                    else:
                        pending.result.set_exception(Unavailable("the caller went away"))

    def _forward(self, batch: list[_Pending[Item]]) -> bool:
        """One forward for ``batch``; True when it answered its callers. On failure a batch of one item hears
        why (its own exception), a larger one is left to be tried item by item."""
        try:
            results = self._run_forward([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} items")
        except BaseException as error:  # noqa: BLE001 - the callers hear why; this thread goes on
            self._log.warning(kv("batch_failed", batcher=self._thread.name, items=len(batch),
                                 error=f"{type(error).__name__}: {error}"[:300],
                                 then="each item alone" if len(batch) > 1 else "the call fails"))
            if len(batch) == 1:
                kind = ResourceExhausted if out_of_memory(error) else RuntimeError
                failure = kind(f"{self._failure}: {type(error).__name__}: {error}"[:500])
                failure.__cause__ = error
                batch[0].result.set_exception(failure)
            return False
        for pending, result in zip(batch, results):
            pending.result.set_result(result)
        return True
