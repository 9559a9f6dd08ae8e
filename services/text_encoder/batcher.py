"""Encode calls that arrive while the text model is busy share its next forward.

Why: in a burst (16 clients at once) every Encode ran its own CLIP forward, one after another on a GPU
that the denoiser shares, so the last request reached the denoiser about a second after the first and
ran that far behind the batch it joined (docs/benchmarks.md, run F). A CLIP text model's rows are
independent (each prompt is padded to 77 tokens; the causal mask and the optional attention mask are
per row), so a call's embeddings do not depend on what shares its forward.

No call waits for company: a call that finds the model idle runs at once, alone; only the calls that
arrive during a forward are gathered for the next one. ``take_batch`` decides (oldest first, within a
prompt budget); ``EncodeBatcher`` runs the forwards on its own thread.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from services.common.errors import Unavailable
from services.common.logs import kv

log = logging.getLogger("text_encoder")


def take_batch(pending_prompts: Sequence[int], max_prompts: int) -> int:
    """How many of the pending calls (oldest first, given as their prompt counts) go into the next
    forward: the oldest always, even alone above ``max_prompts``; then each next one while the total stays
    within ``max_prompts``. First come, first served: a call is never passed by a later, smaller one."""
    if not pending_prompts:
        return 0
    taken, total = 1, pending_prompts[0]
    for prompts in pending_prompts[1:]:
        if total + prompts > max_prompts:
            break
        taken, total = taken + 1, total + prompts
    return taken


def live(call: "_Call") -> bool:
    """Whether a waiting call is still wanted: not cancelled and its caller still there (a gone caller's
    Future is cancelled here, so nothing waits on it)."""
    if call.result.cancelled():
        return False
    if not call.alive():
        call.result.cancel()
        return False
    return True


@dataclass(frozen=True)
class Encoded:
    """One call's rows (on the CPU), what ``describe`` said of its prompts, and the forward they came from."""
    embeddings: torch.Tensor
    reports: list[Any]      # describe(prompts), one item a prompt ([] without describe)
    seconds: float          # the shared forward's time, its copy to the CPU included
    batch_prompts: int      # prompts in that forward, all calls together


@dataclass
class _Call:
    prompts: list[str]
    alive: Callable[[], bool]           # False once its caller is gone (a gRPC call's is_active)
    result: Future = field(default_factory=Future)


class EncodeBatcher:
    """Runs ``encode`` (prompts -> [n, tokens, hidden]) on one thread for every caller, a batch of the
    calls waiting at a time (``take_batch``); ``describe`` (prompts -> one report a prompt, the token
    counts) runs there too, after the forward, so that no caller's handler competes with the next forward
    for the tokenizer; ``on_batch(prompts, seconds)`` hears of each forward before its callers are
    answered. A call whose caller is gone (``alive``) before its forward is dropped, never encoded."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_prompts: int,
                 on_batch: Callable[[int, float], None] | None = None,
                 describe: Callable[[list[str]], list[Any]] | None = None) -> None:
        if max_prompts < 1:
            raise ValueError(f"max_prompts is {max_prompts}; it must be at least 1")
        self._encode, self.max_prompts, self._on_batch = encode, max_prompts, on_batch
        self._describe = describe
        self._pending: list[_Call] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="encode-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[str], alive: Callable[[], bool] = lambda: True) -> Future:
        """A Future of this call's ``Encoded``, from the next forward that has room for it; cancelling it, or
        ``alive()`` turning False, before that forward starts takes the call out. Raises Unavailable once the
        batcher is closed."""
        call = _Call(list(prompts), alive)
        with self._wake:
            if self._closed or not self._thread.is_alive():
                raise Unavailable("the text encoder is stopping; send the call to another replica")
            self._pending.append(call)
            self._wake.notify()
        return call.result

    def encode(self, prompts: list[str], timeout: float | None = None) -> Encoded:
        """``submit`` and wait: raises what the forward raised, or TimeoutError after ``timeout`` seconds."""
        return self.submit(prompts).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the calls already waiting, then stop the thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    def _next_batch(self) -> list[_Call] | None:
        with self._wake:
            while True:
                while not self._pending and not self._closed:
                    self._wake.wait()
                self._pending = [c for c in self._pending if live(c)]
                if not self._pending:
                    if self._closed:
                        return None
                    continue
                taken = take_batch([len(c.prompts) for c in self._pending], self.max_prompts)
                batch, self._pending = self._pending[:taken], self._pending[taken:]
                batch = [c for c in batch if c.result.set_running_or_notify_cancel()]   # no cancel after this
                if batch:
                    return batch

    def _run(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except BaseException as error:  # noqa: BLE001 - the loop must outlive anything: callers wait on it
                log.error(kv("encode_batcher_error", error=f"{type(error).__name__}: {error}"[:300]))
                continue
            if batch is None:
                return
            if not self._forward(batch) and len(batch) > 1:
                for call in batch:                  # too big together (out of memory, say): each call alone
                    if call.alive():
                        self._forward([call])
                    else:
                        call.result.set_exception(Unavailable("the caller went away"))

    def _forward(self, batch: list[_Call]) -> bool:
        """One forward for ``batch``; True when it answered its callers. On failure a batch of one call hears
        why (its own exception), a larger one is left to be tried call by call."""
        prompts = [p for call in batch for p in call.prompts]
        started = time.perf_counter()
        try:
            rows = self._encode(prompts).to("cpu")            # one copy (and one sync) for the whole batch
        except BaseException as error:  # noqa: BLE001 - the callers hear why; this thread goes on
            log.warning(kv("encode_failed", calls=len(batch), prompts=len(prompts),
                           error=f"{type(error).__name__}: {error}"[:300],
                           then="each call alone" if len(batch) > 1 else "the call fails"))
            if len(batch) == 1:
                failure = RuntimeError(f"the text model failed: {type(error).__name__}: {error}"[:500])
                failure.__cause__ = error
                batch[0].result.set_exception(failure)
            return False
        seconds = time.perf_counter() - started
        try:
            reports = self._describe(prompts) if self._describe is not None else []
        except Exception as error:  # noqa: BLE001 - as a failed forward: the callers hear why
            for call in batch:
                call.result.set_exception(RuntimeError(f"describing the prompts failed: {error}"[:500]))
            return True
        if self._on_batch is not None:
            try:
                self._on_batch(len(prompts), seconds)
            except Exception as error:  # noqa: BLE001 - a metric must not stop the encoder
                log.warning(kv("encode_metrics_failed", error=f"{type(error).__name__}: {error}"[:300]))
        at = 0
        for call in batch:
            n = len(call.prompts)
            call.result.set_result(Encoded(rows[at:at + n], reports[at:at + n], seconds, len(prompts)))
            at += n
        return True
