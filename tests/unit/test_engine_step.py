"""One batched step of the denoiser engine on the embedded model's UNet (tiny latents, so seconds on a
CPU): what the scheduler is given, and what the observer's step time covers."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import UNet3DConditionModel

from services.common.contract import SCHEDULERS
from services.denoiser import engine as eng
from services.denoiser.sampling import make_scheduler

MODEL = Path(__file__).resolve().parents[2] / "models" / "t2v-world"
SCHEDULER_CONFIG = MODEL / "scheduler" / "scheduler_config.json"


@functools.lru_cache(maxsize=None)
def unet(device: str = "cpu") -> UNet3DConditionModel:
    dtype = torch.float16 if device == "cuda" else torch.float32
    return UNet3DConditionModel.from_pretrained(MODEL / "unet", dtype=dtype).to(device).eval().requires_grad_(False)


class Recorder(eng.EngineObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []

    def step(self, batch_size: int, seconds: float) -> None:
        self.steps.append((batch_size, seconds))


def request(seed: int, steps: int = 3, guidance_scale: float = 7.0, scheduler: str = "ddim") -> eng.Request:
    rows = 2 if guidance_scale > 1 else 1
    return eng.Request(f"r{seed}", torch.randn(rows, 77, unet().config.cross_attention_dim), num_frames=2, height=32, width=32,
                       num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed, scheduler=scheduler)


def run(jobs: list[eng.Request], observer: eng.EngineObserver | None = None,
        config: dict | None = None) -> list[eng.Event]:
    """Submit every request before the engine starts (so they share batches), return the last events."""
    config = config or json.loads(SCHEDULER_CONFIG.read_text())
    engine = eng.DenoiseEngine(unet(), config, torch.device("cpu"), torch.float32, max_batch=4,
                               observer=observer)
    submitted = [engine.submit(r) for r in jobs]
    engine.start()
    try:
        last = []
        for job in submitted:
            while isinstance(event := job.events.get(timeout=30), eng.Step):
                pass
            last.append(event)
        return last
    finally:
        engine.stop(1.0)


def wrap(monkeypatch: pytest.MonkeyPatch, cls: type, name: str, before: Any) -> None:
    """Call ``before(*args, **kwargs)`` ahead of ``cls.name``; the signature stays the original's (the
    engine inspects ``step``'s parameters for eta and generator)."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        before(*args, **kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_scheduler_is_given_each_timestep_as_a_python_int(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """``scheduler.step`` and ``scale_model_input`` get plain ints, not an element of the timesteps tensor.

    Why: on a GPU that tensor lives on CUDA, and DDIM's step indexes its CPU ``alphas_cumprod`` with
    it and tests ``prev_timestep >= 0``; each reads the value back to the host, which synchronises the
    stream every step, so the GPU idles while Python prepares the next step. On this CPU the tensor
    is a CPU tensor (no sync to see), so the test checks the type the scheduler receives.
    """
    cls = type(make_scheduler(name, json.loads(SCHEDULER_CONFIG.read_text())))
    seen: list[tuple[str, type]] = []
    wrap(monkeypatch, cls, "step", lambda output, timestep, *a, **k: seen.append(("step", type(timestep))))
    wrap(monkeypatch, cls, "scale_model_input",
         lambda sample, *a, **k: seen.append(("scale_model_input", type(a[0] if a else k.get("timestep")))))
    last = run([request(1, scheduler=name), request(2, guidance_scale=1.0, scheduler=name)])
    assert all(isinstance(event, eng.Finished) for event in last), last
    assert all(torch.isfinite(event.latents).all() for event in last)
    assert {what for what, _ in seen} == {"step", "scale_model_input"}
    assert {kind for _, kind in seen} == {int}, f"the scheduler was given {seen}"


def test_the_observer_times_the_whole_step_not_only_the_unet_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step time covers the scheduler steps (and guidance), not just the UNet forward.

    Why: those are GPU kernels too; timed around the forward only, their time was counted as
    "not GPU" in the benchmark's non-GPU share. Here each scheduler step also sleeps 20 ms, so a
    step of two requests must report its UNet forward's time plus at least 40 ms.
    """
    cls = type(make_scheduler("ddim", json.loads(SCHEDULER_CONFIG.read_text())))
    wrap(monkeypatch, cls, "step", lambda *a, **k: time.sleep(0.02))
    forwards: list[float] = []
    eager = eng.DenoiseEngine._eager_forward

    def timed_forward(self: eng.DenoiseEngine, *args: Any) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return eager(self, *args)
        finally:
            forwards.append(time.perf_counter() - started)

    monkeypatch.setattr(eng.DenoiseEngine, "_eager_forward", timed_forward)
    observer = Recorder()
    last = run([request(1), request(2)], observer)
    assert all(isinstance(event, eng.Finished) for event in last), last
    assert [size for size, _ in observer.steps] == [2, 2, 2], observer.steps
    assert len(forwards) == 3
    assert all(step >= forward + 0.04 for (_, step), forward in zip(observer.steps, forwards)), (observer.steps, forwards)


def test_a_step_that_raises_is_not_timed_and_fails_its_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("scheduler broke")

    cls = type(make_scheduler("ddim", json.loads(SCHEDULER_CONFIG.read_text())))
    wrap(monkeypatch, cls, "step", fail)
    observer = Recorder()
    last = run([request(1)], observer)
    assert isinstance(last[0], eng.Failed) and "scheduler broke" in str(last[0].error)
    assert observer.steps == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_step_on_cuda_never_makes_the_cpu_wait_for_the_gpu(name: str) -> None:
    """No step but the last (whose latents go to the CPU) synchronises with the GPU: torch's sync
    debug mode raises on any call that would. So Python queues step k+1 while the GPU runs step k.

    DPM-Solver looks its first timestep up in the schedule (a sync, once per request), so the first
    step runs outside the check."""
    config = json.loads(SCHEDULER_CONFIG.read_text())
    observer = Recorder()
    engine = eng.DenoiseEngine(unet("cuda"), config, torch.device("cuda"), torch.float16, max_batch=4,
                               observer=observer)
    for job in [engine.submit(request(1, steps=6, scheduler=name)),
                engine.submit(request(2, steps=6, guidance_scale=1.0, scheduler=name))]:
        engine._admit(job)                       # reads the timesteps once: a sync per request, not per step
    engine._step(engine._pick_batch())
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            engine._step(engine._pick_batch())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine._step(engine._pick_batch())
    assert engine.stats.finished == 2
    assert observer.steps and all(size == 2 and seconds > 0 for size, seconds in observer.steps), observer.steps


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_model_saved_with_a_zero_terminal_snr_schedule_samples_from_its_first_step(
        monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The schedule ``t2v.train --zero-terminal-snr`` saves into a model folder (v-prediction, betas
    rescaled to no signal at t = 999, trailing timesteps) runs in the engine as it is: sampling starts
    at t = 999 itself, where epsilon-prediction would divide by zero, and the latents stay finite."""
    from t2v.modelgen import ZERO_TERMINAL_SNR_CONFIG

    config = {"_class_name": "DDIMScheduler", **ZERO_TERMINAL_SNR_CONFIG}
    scheduler = make_scheduler(name, config)
    assert scheduler.config.prediction_type == "v_prediction"
    cls = type(scheduler)
    seen: list[int] = []
    wrap(monkeypatch, cls, "step", lambda output, timestep, *a, **k: seen.append(timestep))
    last = run([request(1, steps=4, scheduler=name)], config=config)
    assert isinstance(last[0], eng.Finished) and torch.isfinite(last[0].latents).all(), last
    assert seen[0] == 999 and len(seen) == 4
