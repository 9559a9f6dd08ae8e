"""Encode calls that arrive while the text model is busy share its next forward (services/text_encoder/batcher.py).

The forwards are the embedded model's real CLIP text model; a gate holds the first forward open so that the
calls behind it are known to have arrived while it ran.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.common.call_batcher import take_batch
from services.common.config import DEFAULT_MODEL
from services.common.errors import ResourceExhausted, Unavailable
from services.text_encoder.batcher import EncodeBatcher
from services.text_encoder.encoder import TextEncoder


def test_the_oldest_call_always_goes_and_no_call_passes_an_older_one() -> None:
    assert take_batch([], 64) == []
    assert take_batch([2, 2, 2], 64) == [0, 1, 2]
    assert take_batch([2, 2, 2], 4) == [0, 1]
    assert take_batch([16, 2], 8) == [0]               # alone above the budget rather than never
    assert take_batch([2, 16, 2], 8) == [0]            # the 2 behind the 16 waits its turn
    assert take_batch([2, 2], 1) == [0]
    assert take_batch([2, 2, 2], 64, kinds=["a", "a", "b"]) == [0, 1]     # another kind waits for its own forward
    assert take_batch([2, 2, 2], 64, kinds=["a", "b", "a"]) == [0, 2]     # but is stepped over, not waited behind
    assert take_batch([2, 2, 16, 2], 8, kinds=["a", "b", "a", "a"]) == [0]  # within a kind: no passing


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(DEFAULT_MODEL, torch.device("cpu"), torch.float32)


class Gated:
    """The encoder's forward, held at its start until ``release`` while ``hold`` is set; records each
    forward's prompts."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder, self.forwards = encoder, []
        self.hold, self.entered, self.release = True, threading.Event(), threading.Event()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.forwards.append(list(prompts))
        if self.hold:
            self.hold = False
            self.entered.set()
            assert self.release.wait(30)
        return self.encoder.encode(prompts)


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_calls_that_arrive_during_a_forward_share_the_next_and_get_their_own_rows(encoder: TextEncoder) -> None:
    gated = Gated(encoder)
    sizes: list[int] = []
    batcher = EncodeBatcher(gated, max_prompts=64, on_batch=lambda prompts, seconds: sizes.append(prompts))
    calls = [["", "a cat"], ["", "a red ball bouncing"], ["blurry", "a dog on a beach", "waves"], ["", "rain"]]
    results: dict[int, object] = {}
    first = threading.Thread(target=lambda: results.setdefault(0, batcher.encode(calls[0])))
    first.start()
    assert gated.entered.wait(10)                          # the first call runs alone, at once
    others = [threading.Thread(target=lambda i=i: results.setdefault(i, batcher.encode(calls[i]))) for i in (1, 2, 3)]
    for waiting, thread in enumerate(others, start=1):
        thread.start()
        wait_until(lambda waiting=waiting: batcher.waiting() == waiting)      # so the arrival order is known
    gated.release.set()
    for thread in [first, *others]:
        thread.join(30)
    batcher.close()
    assert gated.forwards == [calls[0], calls[1] + calls[2] + calls[3]]
    assert sizes == [2, 7]
    for i, prompts in enumerate(calls):
        got = results[i]
        alone = encoder.encode(prompts)
        assert got.embeddings.shape == alone.shape and got.embeddings.device.type == "cpu"
        torch.testing.assert_close(got.embeddings, alone, rtol=1e-4, atol=1e-5)     # rows do not mix
        assert got.batch_prompts == (2 if i == 0 else 7)


def test_the_prompt_budget_splits_a_queue_into_forwards_in_arrival_order(encoder: TextEncoder) -> None:
    gated = Gated(encoder)
    batcher = EncodeBatcher(gated, max_prompts=4)
    threads = [threading.Thread(target=batcher.encode, args=([f"prompt {i}", ""],)) for i in range(4)]
    threads[0].start()
    assert gated.entered.wait(10)
    for i, thread in enumerate(threads[1:], start=1):
        thread.start()
        wait_until(lambda i=i: batcher.waiting() == i)          # so the arrival order is known
    gated.release.set()
    for thread in threads:
        thread.join(30)
    batcher.close()
    assert gated.forwards == [["prompt 0", ""], ["prompt 1", "", "prompt 2", ""], ["prompt 3", ""]]


def test_a_forward_that_fails_is_tried_call_by_call_and_each_caller_hears_its_own_error(encoder: TextEncoder) -> None:
    """Out of memory for 7 prompts together need not be for 2 alone; a call that fails alone hears why, in an
    exception of its own (one shared by the callers grows a traceback per re-raise)."""
    gated = Gated(encoder)

    def too_big(prompts: list[str]) -> torch.Tensor:
        if len(prompts) > 2 or "poison" in prompts:
            raise RuntimeError("CUDA out of memory")
        return gated(prompts)

    batcher = EncodeBatcher(too_big, max_prompts=64)
    results: dict[int, object] = {}

    def call(i: int, prompts: list[str]) -> None:
        try:
            results[i] = batcher.encode(prompts)
        except (RuntimeError, ResourceExhausted) as error:
            results[i] = error

    threads = [threading.Thread(target=call, args=(0, ["", "first"]))]
    threads[0].start()
    assert gated.entered.wait(10)
    for i, prompts in enumerate([["", "a cat"], ["", "poison"], ["", "rain"]], start=1):
        threads.append(threading.Thread(target=call, args=(i, prompts)))
        threads[-1].start()
        wait_until(lambda i=i: batcher.waiting() == i)
    gated.release.set()
    for thread in threads:
        thread.join(30)
    assert [results[i].embeddings.shape[0] for i in (0, 1, 3)] == [2, 2, 2]
    assert isinstance(results[2], ResourceExhausted)         # RESOURCE_EXHAUSTED over gRPC: try again later
    assert "encoding the prompts failed: RuntimeError: CUDA out of memory" in str(results[2])
    assert gated.forwards[1:] == [["", "a cat"], ["", "rain"]]                  # the 6 together never ran
    assert batcher.encode(["a cat"]).embeddings.shape[0] == 1                  # and the thread goes on
    batcher.close()


def test_a_call_cancelled_before_its_forward_is_never_encoded(encoder: TextEncoder) -> None:
    gated = Gated(encoder)
    batcher = EncodeBatcher(gated, max_prompts=64)
    first = threading.Thread(target=batcher.encode, args=(["", "first"],))
    first.start()
    assert gated.entered.wait(10)
    gone = batcher.submit(["", "gone"])
    kept = batcher.submit(["", "kept"])
    assert gone.cancel()
    gated.release.set()
    assert kept.result(30).embeddings.shape[0] == 2
    first.join(30)
    batcher.close()
    assert gated.forwards == [["", "first"], ["", "kept"]]


def test_close_finishes_what_waits_and_refuses_what_comes_after(encoder: TextEncoder) -> None:
    gated = Gated(encoder)
    batcher = EncodeBatcher(gated, max_prompts=64)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(batcher.encode(["a cat"]))) for _ in range(2)]
    threads[0].start()
    assert gated.entered.wait(10)
    threads[1].start()
    wait_until(lambda: batcher.waiting() == 1)
    closing = threading.Thread(target=batcher.close)
    closing.start()
    gated.release.set()
    closing.join(30)
    for thread in threads:
        thread.join(30)
    assert len(results) == 2 and batcher.stopped()
    with pytest.raises(Unavailable, match="stopping; send the call to another replica"):
        batcher.encode(["a cat"])
    with pytest.raises(ValueError, match="at least 1"):
        EncodeBatcher(gated, max_prompts=0)


def test_a_call_whose_caller_is_gone_before_its_forward_is_never_encoded(encoder: TextEncoder) -> None:
    """A gRPC call past its deadline or hung up (``alive`` False) costs no forward: an attacker's calls with
    a 1 ms deadline made the stage encode for nobody."""
    gated = Gated(encoder)
    batcher = EncodeBatcher(gated, max_prompts=64, describe=encoder.report)
    first = threading.Thread(target=batcher.encode, args=(["", "first"],))
    first.start()
    assert gated.entered.wait(10)
    caller = {"there": True}
    gone = batcher.submit(["", "gone"], alive=lambda: caller["there"])
    kept = batcher.submit(["", "a very long prompt " * 30])
    caller["there"] = False
    gated.release.set()
    encoded = kept.result(30)
    first.join(30)
    batcher.close()
    assert gated.forwards == [["", "first"], ["", "a very long prompt " * 30]] and gone.cancelled()
    assert encoded.reports == encoder.report(["", "a very long prompt " * 30])      # the reports come along
    assert encoded.reports[1].truncated and not encoded.reports[0].truncated
