"""The denoiser engine on its own (no gRPC): step-level batching and cancellation."""

from __future__ import annotations

import pytest
import torch

from services.denoiser import engine as eng

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(model_dir: str):
    e = eng.DenoiseEngine.from_folder(model_dir, torch.device("cpu"), torch.float32, max_batch=4, max_jobs=8)
    e.start()
    yield e
    e.stop(1.0)


def embeddings(seed: int, dim: int) -> torch.Tensor:
    return torch.randn(2, 77, dim, generator=torch.Generator().manual_seed(seed))


def request(seed: int, dim: int, steps: int = 6, **kw) -> eng.Request:
    base = dict(request_id=f"r{seed}", embeddings=embeddings(seed, dim), num_frames=4, height=64, width=64,
                num_inference_steps=steps, guidance_scale=7.0, seed=seed)
    base.update(kw)
    return eng.Request(**base)


def collect(job: eng.Job) -> list[eng.Event]:
    events = []
    while True:
        event = job.events.get(timeout=120)
        events.append(event)
        if not isinstance(event, eng.Step):
            return events


def test_the_same_seed_gives_the_same_latents_alone_or_batched(engine):
    dim = engine.embedding_dim
    alone = {}
    for seed in (1, 2, 3):
        events = collect(engine.submit(request(seed, dim)))
        assert [e.step for e in events[:-1]] == list(range(1, 7))
        alone[seed] = events[-1].latents
    before = engine.stats.max_batch_seen
    engine.stats.max_batch_seen = 0
    jobs = {seed: engine.submit(request(seed, dim)) for seed in (1, 2, 3)}
    batched = {seed: collect(job)[-1].latents for seed, job in jobs.items()}
    assert engine.stats.max_batch_seen >= 2, "the three requests never shared a UNet forward"
    engine.stats.max_batch_seen = max(before, engine.stats.max_batch_seen)
    for seed in (1, 2, 3):
        assert torch.allclose(alone[seed], batched[seed], atol=1e-4, rtol=0), f"seed {seed} changed when batched"
    assert not torch.allclose(batched[1], batched[2])


def test_requests_of_other_shapes_and_guidance_run_side_by_side(engine):
    dim = engine.embedding_dim
    a = engine.submit(request(5, dim, num_frames=2))
    b = engine.submit(request(6, dim, embeddings=embeddings(6, dim)[1:], guidance_scale=1.0))
    last_a, last_b = collect(a)[-1], collect(b)[-1]
    assert last_a.latents.shape == (1, 4, 2, 8, 8)
    assert last_b.latents.shape == (1, 4, 4, 8, 8)


def test_a_cancelled_request_stops_early_and_frees_its_slot(engine):
    dim = engine.embedding_dim
    job = engine.submit(request(7, dim, steps=200))
    first = job.events.get(timeout=60)
    assert isinstance(first, eng.Step)
    job.cancel()
    events = collect(job)
    assert isinstance(events[-1], eng.Cancelled)
    assert events[-1].steps_run < 200
    assert engine.active_jobs() == 0
    follow_up = collect(engine.submit(request(8, dim, steps=2)))
    assert isinstance(follow_up[-1], eng.Finished)


def test_a_full_engine_refuses_more_work(model_dir):
    small = eng.DenoiseEngine.from_folder(model_dir, torch.device("cpu"), torch.float32, max_jobs=1)
    # Not started: the first job waits in the inbox, so the second finds the engine full.
    small.submit(request(1, small.embedding_dim))
    with pytest.raises(eng.EngineFull, match="retry later"):
        small.submit(request(2, small.embedding_dim))


def test_shapes_take_turns_so_a_long_job_does_not_stall_another_shape(engine):
    dim = engine.embedding_dim
    long_job = engine.submit(request(11, dim, steps=30, num_frames=2))
    other = engine.submit(request(12, dim, steps=30, num_frames=3))
    collect(long_job)
    progressed = other.events.qsize()
    assert progressed >= 20, f"the other shape ran only {progressed} steps while the first job ran 30"
    assert isinstance(collect(other)[-1], eng.Finished)
