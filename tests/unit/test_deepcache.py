"""DeepCache (services/denoiser/deepcache.py) and its place in the engine, on the embedded model's UNet
on the CPU: the forwards compute what the UNet computes, cache=none stays the exact path bit for bit,
and cache=deep runs the whole UNet on the steps it should and stays close to exact."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from services.denoiser import engine as eng
from services.denoiser import sampling
from services.denoiser.deepcache import DeepCacheUNet
from tests.unit.test_engine_step import SCHEDULER_CONFIG, request, unet


def inputs(rows: int = 2, frames: int = 3, size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = unet()
    sample = torch.randn(rows, model.config.in_channels, frames, size, size, generator=g)
    embeddings = torch.randn(rows, 77, model.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([700] * rows), embeddings


@pytest.mark.parametrize("branch", [None, 0, 1])
def test_the_full_forward_is_the_unet_and_the_shallow_one_on_its_features_too(branch) -> None:
    sample, timesteps, embeddings = inputs()
    deep = DeepCacheUNet(unet(), branch)
    with torch.inference_mode():
        exact = unet()(sample, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]
        noise, features = deep.full(sample, timesteps, embeddings)
        again = deep.shallow(sample, timesteps, embeddings, features)
    assert torch.equal(noise, exact)
    assert torch.equal(again, exact)      # same inputs, same features: the same operations in the same order
    assert features.shape[:2] == (2, 3)   # rows first, then frames: graphs pad and slice it like the sample


def test_the_shallow_forward_on_other_features_differs_and_a_bad_branch_is_refused() -> None:
    sample, timesteps, embeddings = inputs()
    deep = DeepCacheUNet(unet(), 0)
    with torch.inference_mode():
        noise, features = deep.full(sample, timesteps, embeddings)
        other = deep.shallow(sample, timesteps, embeddings, torch.zeros_like(features))
    assert not torch.allclose(noise, other)
    with pytest.raises(ValueError, match="between 0 and 1"):
        DeepCacheUNet(unet(), 2)


def engine(**kwargs) -> eng.DenoiseEngine:
    return eng.DenoiseEngine(unet(), json.loads(SCHEDULER_CONFIG.read_text()), torch.device("cpu"), torch.float32,
                             max_batch=4, **kwargs)


class Cache(eng.EngineObserver):
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def cache_steps(self, full: int, shallow: int) -> None:
        self.calls.append((full, shallow))


def finish(e: eng.DenoiseEngine, requests: list[eng.Request]) -> list[eng.Finished]:
    jobs = [e.submit(r) for r in requests]
    e.start()
    try:
        out = []
        for job in jobs:
            while isinstance(event := job.events.get(timeout=60), (eng.Step, eng.Checkpoint)):
                pass
            assert isinstance(event, eng.Finished), event
            out.append(event)
        return out
    finally:
        e.stop(1.0)


def reference(r: eng.Request) -> torch.Tensor:
    """The exact denoising loop written out (diffusers' pipeline's), for one request alone."""
    scheduler = sampling.make_scheduler(r.scheduler, json.loads(SCHEDULER_CONFIG.read_text()))
    scheduler.set_timesteps(r.num_inference_steps)
    latents, generator = sampling.initial_latents((1, 4, r.num_frames, r.height // 8, r.width // 8), r.seed,
                                                  torch.device("cpu"), torch.float32, scheduler.init_noise_sigma)
    kwargs = sampling.step_kwargs(scheduler, generator)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), int(t))
            noise = unet()(x, t.reshape(1).expand(2), encoder_hidden_states=r.embeddings, return_dict=False)[0]
            noise = sampling.apply_guidance(noise, r.guidance_scale)
            latents = sampling.scheduler_step(scheduler, noise, int(t), latents, kwargs)
    return latents


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_cache_none_is_the_exact_loop_bit_for_bit(scheduler) -> None:
    torch.manual_seed(1)
    r = request(3, steps=5, scheduler=scheduler)
    [done] = finish(engine(), [r])                      # DeepCache on in the engine, not asked for
    assert torch.equal(done.latents, reference(r))


def test_deep_with_interval_1_runs_every_step_full_and_equals_exact() -> None:
    torch.manual_seed(2)
    r = request(4, steps=4)
    observer = Cache()
    [done] = finish(engine(deep_cache_interval=1, observer=observer), [dataclasses.replace(r, cache="deep")])
    assert observer.calls == [(1, 0)] * 4
    assert torch.equal(done.latents, reference(r))


def test_deep_runs_the_whole_unet_every_nth_step_and_stays_close_to_exact() -> None:
    torch.manual_seed(3)
    r = request(5, steps=7)
    observer = Cache()
    e = engine(deep_cache_interval=3, observer=observer)
    [deep] = finish(e, [dataclasses.replace(r, cache="deep")])
    assert observer.calls == [(1, 0), (0, 1), (0, 1), (1, 0), (0, 1), (0, 1), (1, 0)]
    assert (e.stats.deep_full, e.stats.deep_shallow, e.stats.forwards) == (3, 4, 7)
    exact = reference(r)
    assert not torch.equal(deep.latents, exact)
    # 7 steps are coarse (neighbouring steps far apart, so kept features are staler): 0.42 measured; at
    # 20 steps 0.049. Another seed's exact latents are 1.2 away.
    error = float((deep.latents - exact).norm() / exact.norm())
    assert error < 0.6, error
    torch.manual_seed(3)
    r20 = request(5, steps=20)
    [deep20] = finish(engine(deep_cache_interval=3), [dataclasses.replace(r20, cache="deep")])
    exact20 = reference(r20)
    assert float((deep20.latents - exact20).norm() / exact20.norm()) < 0.1


def test_a_batch_of_exact_and_deep_requests_runs_two_forwards_on_shallow_steps() -> None:
    torch.manual_seed(4)
    exact_r, deep_r = request(6, steps=4), dataclasses.replace(request(7, steps=4), cache="deep")
    e = engine(deep_cache_interval=2)
    exact_done, deep_done = finish(e, [exact_r, deep_r])
    # steps 0, 2: one full forward for both; steps 1, 3: the exact request full, the deep one shallow
    assert (e.stats.steps, e.stats.forwards, e.stats.deep_full, e.stats.deep_shallow) == (4, 6, 2, 2)
    assert torch.allclose(exact_done.latents, reference(exact_r), atol=1e-4)   # other batches: rounding only
    [alone] = finish(engine(deep_cache_interval=2), [deep_r])
    assert torch.allclose(deep_done.latents, alone.latents, atol=1e-4)


def test_deep_requests_that_arrive_apart_fall_into_one_phase() -> None:
    """The shape's clock: a request that joins later runs full at once, then on the clock's full steps."""
    e = engine(deep_cache_interval=3)
    first = eng.Job(dataclasses.replace(request(1), cache="deep"))
    late = eng.Job(dataclasses.replace(request(2), cache="deep"))
    plan = []
    for step in range(7):
        batch = [first] + ([late] if step >= 2 else [])
        full, shallow = e._split(batch)
        plan.append(("F" if first in full else "s") + ("" if step < 2 else "F" if late in full else "s"))
        for job in full:
            job.features, job.since_full = torch.zeros(1), 0
        for job in shallow:
            job.since_full += 1
    assert plan == ["F", "s", "sF", "FF", "ss", "ss", "FF"]


def test_a_resumed_deep_request_starts_with_a_full_step() -> None:
    torch.manual_seed(5)
    r = dataclasses.replace(request(8, steps=6, scheduler="dpmsolver++"), cache="deep", checkpoint_every=2)
    e = engine(deep_cache_interval=3)
    job = e.submit(r)
    e.start()
    try:
        while not isinstance(event := job.events.get(timeout=60), eng.Checkpoint):
            pass
        while not isinstance(job.events.get(timeout=60), eng.Finished):
            pass
    finally:
        e.stop(1.0)
    observer = Cache()
    other = engine(deep_cache_interval=3, observer=observer)
    other._deep_clock[(2, 32, 32)] = 1          # not a full step of the shape's clock: the resume alone decides
    [resumed] = finish(other, [dataclasses.replace(r, resume=event)])
    assert observer.calls == [(1, 0), (0, 1), (1, 0), (0, 1)]
    assert torch.isfinite(resumed.latents).all()


def test_deep_cache_off_and_a_bad_interval() -> None:
    off = engine(deep_cache_interval=0)
    job = off.submit(dataclasses.replace(request(9), cache="deep"))
    off.start()
    try:
        event = job.events.get(timeout=30)
    finally:
        off.stop(1.0)
    assert isinstance(event, eng.Failed) and "DeepCache off" in str(event.error)
    with pytest.raises(ValueError, match="deep_cache_interval"):
        engine(deep_cache_interval=-1)
