"""Encode calls that arrive while the text model is busy share its next forward.

Why: in a burst (16 clients at once) every Encode ran its own CLIP forward, one after another on a GPU
that the denoiser shares, so the last request reached the denoiser about a second after the first and
ran that far behind the batch it joined (docs/benchmarks.md, run F). A CLIP text model's rows are
independent (each prompt is padded to 77 tokens; the causal mask and the optional attention mask are
per row), so a call's embeddings do not depend on what shares its forward.

No call waits for company: a call that finds the model idle runs at once, alone; only the calls that
arrive during a forward are gathered for the next one, oldest first within a prompt budget: the queue
and its thread are services/common/call_batcher.py's; what a forward does with its calls is this module's.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from services.common.call_batcher import CallBatcher
from services.common.logs import kv

log = logging.getLogger("text_encoder")


@dataclass(frozen=True)
class Encoded:
    """One call's rows (on the CPU), what ``describe`` said of its prompts, and the forward they came from."""
    embeddings: torch.Tensor
    reports: list[Any]      # describe(prompts), one item a prompt ([] without describe)
    seconds: float          # the shared forward's time, its copy to the CPU included
    batch_prompts: int      # prompts in that forward, all calls together


class EncodeBatcher:
    """Runs ``encode`` (prompts -> [n, tokens, hidden]) on one thread for every caller, a batch of the
    calls waiting at a time (at most ``max_prompts`` prompts, but a larger call alone); ``describe``
    (prompts -> one report a prompt, the token counts) runs there too, after the forward, so that no
    caller's handler competes with the next forward for the tokenizer; ``on_batch(prompts, seconds)``
    hears of each forward before its callers are answered. A call whose caller is gone (``alive``) before
    its forward is dropped, never encoded."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_prompts: int,
                 on_batch: Callable[[int, float], None] | None = None,
                 describe: Callable[[list[str]], list[Any]] | None = None) -> None:
        if max_prompts < 1:
            raise ValueError(f"max_prompts is {max_prompts}; it must be at least 1")
        self._encode, self.max_prompts, self._on_batch = encode, max_prompts, on_batch
        self._describe = describe
        self._calls: CallBatcher[list[str], Encoded] = CallBatcher(
            self._forward, max_prompts, len, name="encode-batcher", failure="encoding the prompts failed",
            stopping="the text encoder is stopping; send the call to another replica", log=log)

    def submit(self, prompts: list[str], alive: Callable[[], bool] = lambda: True) -> Future:
        """A Future of this call's ``Encoded``, from the next forward that has room for it; cancelling it, or
        ``alive()`` turning False, before that forward starts takes the call out. Raises Unavailable once the
        batcher is closed."""
        return self._calls.submit(list(prompts), alive)

    def encode(self, prompts: list[str], timeout: float | None = None) -> Encoded:
        """``submit`` and wait: raises what the forward raised, or TimeoutError after ``timeout`` seconds."""
        return self.submit(prompts).result(timeout)

    def waiting(self) -> int:
        """Calls submitted and not yet taken into a forward."""
        return self._calls.waiting()

    def stopped(self) -> bool:
        """Whether its thread has ended (after ``close``)."""
        return self._calls.stopped()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the calls already waiting, then stop the thread."""
        self._calls.close(timeout)

    def _forward(self, calls: list[list[str]]) -> list[Encoded]:
        prompts = [p for call in calls for p in call]
        started = time.perf_counter()
        rows = self._encode(prompts).to("cpu")            # one copy (and one sync) for the whole batch
        seconds = time.perf_counter() - started
        try:
            reports = self._describe(prompts) if self._describe is not None else []
        except Exception as error:
            raise RuntimeError(f"describing the prompts failed: {error}"[:500]) from error
        if self._on_batch is not None:
            try:
                self._on_batch(len(prompts), seconds)
            except Exception as error:  # noqa: BLE001 - a metric must not stop the encoder
                log.warning(kv("encode_metrics_failed", error=f"{type(error).__name__}: {error}"[:300]))
        encoded, at = [], 0
        for call in calls:
            n = len(call)
            encoded.append(Encoded(rows[at:at + n], reports[at:at + n], seconds, len(prompts)))
            at += n
        return encoded
