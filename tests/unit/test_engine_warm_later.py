"""engine.warm(defer=True): on a warm restart only the compiled buckets are warmed before SERVING; the eager
buckets' and DeepCache's captures run afterwards in the engine thread while it is idle (CPU, embedded model).

CUDA graphs cannot be captured on a CPU: ``Graphs`` stands in for graphs.GraphedUNet (its buckets, the times
it remembers) and records which bucket each warm-up forward ran, running the real forward underneath."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from services.denoiser import engine as eng

MODEL = Path(__file__).resolve().parents[2] / "models" / "t2v-world"
SHAPE = (2, 32, 32)
BUCKETS = [1, 2, 4, 8]
KNOWN = {SHAPE: {1: 0.010, 2: 0.011, 4: 0.020, 8: 0.040}}     # what an earlier start measured


class Graphs:
    """graphs.GraphedUNet's surface that warm() uses; ``calls`` lists each forward's rows, in order."""

    def __init__(self, forward: Callable[..., Any], calls: list, name: str, fail: bool = False) -> None:
        self.forward, self.calls, self.name, self.fail = forward, calls, name, fail
        self.buckets = BUCKETS
        self.hold: threading.Event | None = None       # set: a forward of another row count than 2 waits for it
        self.holding = threading.Event()
        self._seconds: dict[tuple[int, ...], dict[int, float]] = {}

    def remember(self, sample_shape: tuple[int, ...], seconds: dict[int, float]) -> None:
        self._seconds.setdefault(tuple(sample_shape), {}).update(seconds)

    def seconds(self, sample_shape: tuple[int, ...], *_: Any) -> dict[int, float]:
        return dict(self._seconds.get(tuple(sample_shape), {}))

    def time(self, rows: int, *_: Any) -> float:
        return KNOWN[SHAPE][rows]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        self.calls.append((self.name, inputs[0].shape[0], time.monotonic()))
        if self.hold is not None and inputs[0].shape[0] != 2:
            self.holding.set()
            self.hold.wait(30)
        if self.fail and self.name == "unet" and inputs[0].shape[0] != 2:
            raise RuntimeError("capture failed")
        return self.forward(*inputs)


def engine_with_graphs(fail: bool = False) -> tuple[eng.DenoiseEngine, list]:
    engine = eng.DenoiseEngine.from_folder(MODEL, torch.device("cpu"), torch.float32, max_batch=4, max_jobs=8)
    engine.compile_rows = {2}                      # as if compiled: the rows warmed before SERVING
    calls: list = []
    engine._graphed = engine._forward = Graphs(engine._forward, calls, "unet", fail)
    engine._deep_full = Graphs(engine._deep_full, calls, "deep_full")
    engine._deep_shallow = Graphs(engine._deep_shallow, calls, "deep_shallow")
    return engine, calls


def finish(engine: eng.DenoiseEngine, seed: int = 0) -> Any:
    emb = torch.randn(2, 77, engine.embedding_dim, generator=torch.Generator().manual_seed(seed))
    job = engine.submit(eng.Request(f"r{seed}", emb, num_frames=2, height=32, width=32, num_inference_steps=2,
                                    guidance_scale=7.0, seed=seed))
    while isinstance(event := job.events.get(timeout=60), eng.Step):
        pass
    return event


def wait_for(condition: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_warm_restart_serves_after_the_compiled_buckets_and_captures_the_rest_while_idle(caplog) -> None:
    engine, calls = engine_with_graphs()
    spent = engine.warm([SHAPE], known=KNOWN, defer=True)
    used = engine.used_buckets(SHAPE)
    assert 2 in used and len(used) > 1, used
    assert [(name, rows) for name, rows, _ in calls] == [("unet", 2)], "only the compiled bucket before SERVING"
    assert spent["deferred"] == engine.deferred == (len(used) - 1) + len(used)    # eager unet + DeepCache's
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="denoiser.engine"):
        engine.start()
        try:
            wait_for(lambda: engine.deferred == 0 and "warm_later_done" in caplog.text)
            later = [(name, rows) for name, rows, at in calls if at >= started]
            assert sorted(rows for name, rows in later if name == "unet") == [r for r in used if r != 2]
            assert sorted(rows for name, rows in later if name == "deep_full") == used
            assert sorted(rows for name, rows in later if name == "deep_shallow") == used
            assert isinstance(finish(engine), eng.Finished)
        finally:
            engine.stop(1.0)


def test_without_defer_or_without_stored_times_everything_is_warmed_before_serving() -> None:
    for kwargs in ({"known": KNOWN, "defer": False}, {"known": None, "defer": True}):
        engine, calls = engine_with_graphs()
        spent = engine.warm([SHAPE], **kwargs)
        assert spent["deferred"] == engine.deferred == 0, kwargs
        unet_rows = sorted(rows for name, rows, _ in calls if name == "unet")
        expected = engine.used_buckets(SHAPE) if kwargs["known"] else BUCKETS
        assert unet_rows == sorted(expected), kwargs
        assert {name for name, _, _ in calls} == {"unet", "deep_full", "deep_shallow"}


def test_a_request_arriving_during_a_capture_waits_for_that_one_only() -> None:
    """The engine runs one deferred capture at a time and looks at its inbox between them: a request that
    comes while one runs is stepped next, before any other deferred capture."""
    engine, calls = engine_with_graphs()
    engine.warm([SHAPE], known=KNOWN, defer=True)
    graphs = engine._graphed
    graphs.hold = threading.Event()
    engine.start()
    try:
        assert graphs.holding.wait(30), "the first deferred capture started"
        during = len(calls)
        emb = torch.zeros(2, 77, engine.embedding_dim)
        job = engine.submit(eng.Request("during", emb, num_frames=2, height=32, width=32, num_inference_steps=2,
                                        guidance_scale=7.0, seed=3))
        graphs.hold.set()
        while isinstance(event := job.events.get(timeout=60), eng.Step):
            pass
        assert isinstance(event, eng.Finished)
        # after the held capture: the request's two steps (2 rows, the unet) come before any other capture
        after = [(name, rows) for name, rows, _ in calls[during:]]
        assert after[:2] == [("unet", 2), ("unet", 2)], after
        wait_for(lambda: engine.deferred == 0)
    finally:
        graphs.hold.set()
        engine.stop(1.0)


def test_stopping_drops_the_captures_still_queued(caplog) -> None:
    engine, calls = engine_with_graphs()
    engine.warm([SHAPE], known=KNOWN, defer=True)
    graphs = engine._graphed
    graphs.hold = threading.Event()
    with caplog.at_level(logging.INFO, logger="denoiser.engine"):
        engine.start()
        assert graphs.holding.wait(30)
        with pytest.raises(RuntimeError, match="before start"):
            engine.warm([SHAPE], known=KNOWN, defer=True)   # the engine thread owns what is deferred now
        with engine._cond:                       # as stop() does, without waiting for the thread yet
            engine._stopping = True
            engine._cond.notify_all()
        graphs.hold.set()
        engine.stop(1.0)
    assert not engine._thread.is_alive()
    assert engine.deferred > 0 and f"event=warm_later_dropped captures={engine.deferred}" in caplog.text
    assert "warm_later_done" not in caplog.text


def test_with_compiled_deepcache_only_the_compiled_rows_warm_before_serving() -> None:
    engine, calls = engine_with_graphs()
    engine.deep_compile = True                   # as --deep-cache-compile: the compiled rows' DeepCache forwards
    spent = engine.warm([SHAPE], known=KNOWN, defer=True)
    before = sorted((name, rows) for name, rows, _ in calls)
    assert before == [("deep_full", 2), ("deep_shallow", 2), ("unet", 2)], before
    used = engine.used_buckets(SHAPE)
    assert spent["deferred"] == 2 * (len(used) - 1), "the eager rows' unet and DeepCache captures wait"


def test_a_request_that_comes_first_is_served_and_the_captures_follow(caplog) -> None:
    engine, calls = engine_with_graphs()
    engine.warm([SHAPE], known=KNOWN, defer=True)
    pending = engine.deferred
    assert pending > 0
    job_done = engine.submit(eng.Request("first", torch.zeros(2, 77, engine.embedding_dim), num_frames=2,
                                         height=32, width=32, num_inference_steps=2, guidance_scale=7.0, seed=1))
    engine.start()          # the request is in the inbox before the thread starts: it goes first
    try:
        while isinstance(event := job_done.events.get(timeout=60), eng.Step):
            pass
        assert isinstance(event, eng.Finished)
        wait_for(lambda: engine.deferred == 0)
    finally:
        engine.stop(1.0)


def test_a_deferred_capture_that_fails_is_logged_and_the_engine_serves_on(caplog) -> None:
    engine, _ = engine_with_graphs(fail=True)
    engine.warm([SHAPE], known=KNOWN, defer=True)
    with caplog.at_level(logging.INFO, logger="denoiser.engine"):
        engine.start()
        try:
            wait_for(lambda: engine.deferred == 0 and "warm_later_done" in caplog.text)
            assert "event=warm_later_failed" in caplog.text and "capture failed" in caplog.text
            assert engine._thread.is_alive()
        finally:
            engine.stop(1.0)


@pytest.mark.parametrize("value, expected", [([], True), (["--warm-later", "false"], False)])
def test_the_denoiser_setting(value: list[str], expected: bool) -> None:
    from services.common.config import parse_config
    from services.denoiser.server import DenoiserConfig

    assert parse_config(DenoiserConfig, value, "t2v serve denoiser", "d").warm_later is expected
