"""Checkpoints in the denoiser engine on the embedded model's UNet (2 frames of 32x32, a few steps, so
seconds on a CPU): a run resumed from a checkpoint, on a new engine, alone or batched with another
request, ends with the latents of an uninterrupted run.

Every checkpoint goes through the wire format on its way (server.checkpoint_to_proto, SerializeToString,
FromString, server.check_request), as it does when a gateway stores it and a successor sends it back.

Like is compared with like: on this CPU a request's latents move by ~1e-5 with the size of its batch
and its rows' place in it (two identical requests in one batch differ by 6e-6), which has nothing to
do with resuming. So a run resumed alone is compared with one run alone, and a run resumed in the
first place of a batch of two with one run in the first place of a batch of two. Then they are equal
(``pytest -s`` prints the differences). On a CUDA machine the same holds in float16, eager and with
CUDA graphs, and no step waits for the GPU to hand out a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from services.common.contract import SCHEDULERS
from services.common.tensors import to_proto
from services.denoiser import engine as eng
from services.denoiser import sampling
from services.denoiser.server import DenoiserConfig, check_request, checkpoint_to_proto
from t2v.v1 import denoiser_pb2, tensor_pb2
from tests.unit.test_engine_step import SCHEDULER_CONFIG, unet

STEPS = 6          # DPM-Solver++ then runs first order, second order, and lowers its order at the end
TOLERANCE = 1e-5   # float32 on the CPU; what the tests measure is printed (pytest -s): 0.0 so far


def make_engine() -> eng.DenoiseEngine:
    """A new engine on the shared UNet: nothing survives from one engine to the next but the weights."""
    return eng.DenoiseEngine(unet(), json.loads(SCHEDULER_CONFIG.read_text()), torch.device("cpu"), torch.float32,
                             max_batch=4)


def proto_request(scheduler: str, seed: int = 1, guidance_scale: float = 7.0, checkpoint_every: int = 0,
                  resume: denoiser_pb2.DenoiseCheckpoint | None = None) -> denoiser_pb2.DenoiseRequest:
    rows = 2 if guidance_scale > 1 else 1
    embeddings = torch.randn(rows, 77, unet().config.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    return denoiser_pb2.DenoiseRequest(
        request_id=f"r{seed}", embeddings=to_proto(embeddings), num_frames=2, height=32, width=32,
        num_inference_steps=STEPS, guidance_scale=guidance_scale, seed=seed, scheduler=scheduler,
        checkpoint_every=checkpoint_every, resume=resume)


def checked(request: denoiser_pb2.DenoiseRequest, engine: eng.DenoiseEngine) -> eng.Request:
    """The engine Request the server would make of ``request`` (round-tripped through bytes first)."""
    wire = denoiser_pb2.DenoiseRequest.FromString(request.SerializeToString())
    return check_request(wire, DenoiserConfig(device="cpu", dtype="float32"), engine)


def events_of(engine: eng.DenoiseEngine, requests: list[eng.Request]) -> list[list[eng.Event]]:
    """Submit every request before the engine starts (so they share batches); every job's events."""
    jobs = [engine.submit(r) for r in requests]
    engine.start()
    try:
        return [collect(job) for job in jobs]
    finally:
        engine.stop(1.0)


def collect(job: eng.Job) -> list[eng.Event]:
    events = []
    while not isinstance(event := job.events.get(timeout=60), (eng.Finished, eng.Failed, eng.Cancelled)):
        events.append(event)
    return events + [event]


def final_latents(events: list[eng.Event]) -> torch.Tensor:
    assert isinstance(events[-1], eng.Finished), events[-1]
    return events[-1].latents


def wire_checkpoint(checkpoint: eng.Checkpoint, request: eng.Request) -> denoiser_pb2.DenoiseCheckpoint:
    """What a gateway stores (bytes) and sends back."""
    return denoiser_pb2.DenoiseCheckpoint.FromString(checkpoint_to_proto(checkpoint, request).SerializeToString())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def uninterrupted(name: str, *others: denoiser_pb2.DenoiseRequest
                  ) -> tuple[list[eng.Event], dict[int, denoiser_pb2.DenoiseCheckpoint]]:
    """A run of seed 1 with a checkpoint after every step (first in its batches, with ``others``):
    its events and its checkpoints by step, as the wire carries them.

    The checkpoints are serialized only once the run has ended: the engine hands out its own tensors,
    so a later step writing into one of them would show here as a resume that goes wrong."""
    engine = make_engine()
    asked = checked(proto_request(name, checkpoint_every=1), engine)
    events = events_of(engine, [asked, *(checked(other, engine) for other in others)])[0]
    return events, {e.step: wire_checkpoint(e, asked) for e in events if isinstance(e, eng.Checkpoint)}


@pytest.fixture(scope="module", params=SCHEDULERS)
def reference(request: pytest.FixtureRequest) -> SimpleNamespace:
    """Per scheduler, uninterrupted runs: alone with a checkpoint after every step, alone without any,
    and with a checkpoint after every step while batched with an unrelated request."""
    name = request.param
    events, checkpoints = uninterrupted(name)
    engine = make_engine()
    plain = final_latents(events_of(engine, [checked(proto_request(name), engine)])[0])
    batched_events, batched_checkpoints = uninterrupted(name, proto_request(name, seed=5, guidance_scale=4.0))
    return SimpleNamespace(name=name, events=events, latents=final_latents(events), checkpoints=checkpoints,
                           plain=plain, batched=final_latents(batched_events), batched_checkpoints=batched_checkpoints)


@pytest.mark.slow
def test_a_checkpoint_follows_the_progress_of_its_step_and_never_the_last_step(reference: SimpleNamespace) -> None:
    kinds = [(type(e).__name__, e.step) for e in reference.events if isinstance(e, (eng.Step, eng.Checkpoint))]
    expected = [(kind, step) for step in range(1, STEPS + 1) for kind in ("Step", "Checkpoint")][:-1]
    assert kinds == expected
    assert sorted(reference.checkpoints) == list(range(1, STEPS))
    assert torch.equal(reference.latents, reference.plain), "asking for checkpoints changed the run"


@pytest.mark.parametrize("every,after", [(0, []), (2, [2, 4]), (3, [3]), (STEPS, [])])
def test_checkpoints_come_after_every_nth_step_of_the_whole_run_but_the_last(every: int, after: list[int]) -> None:
    job = eng.Job(checked(proto_request("ddim", checkpoint_every=every), make_engine()))
    job.timestep_values = list(range(STEPS))            # what _admit reads from the schedule
    wanted = []
    for steps_done in range(1, STEPS + 1):
        job.index = steps_done
        if job.wants_checkpoint():
            wanted.append(steps_done)
    assert wanted == after


@pytest.mark.slow
def test_a_resumed_run_on_a_new_engine_ends_as_the_uninterrupted_one(reference: SimpleNamespace) -> None:
    """(a) From every step: each resumed request runs on an engine of its own, alone."""
    diffs = {}
    for step, checkpoint in reference.checkpoints.items():
        engine = make_engine()
        events = events_of(engine, [checked(proto_request(reference.name, resume=checkpoint), engine)])[0]
        assert [e.step for e in events if isinstance(e, eng.Step)] == list(range(step + 1, STEPS + 1))
        assert engine.stats.steps == STEPS - step
        diffs[step] = max_diff(final_latents(events), reference.latents)
    print(f"\n{reference.name} resumed alone, max abs diff by resume step: {diffs}")
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.slow
def test_a_resumed_run_batched_with_another_request_ends_as_the_uninterrupted_one(
        reference: SimpleNamespace) -> None:
    """(b) From every step: the resumed request shares each UNet forward with a fresh, unrelated request
    (another seed, prompt and guidance, at its own earlier timesteps) on a new engine."""
    diffs = {}
    for step, checkpoint in reference.batched_checkpoints.items():
        engine = make_engine()
        other = checked(proto_request(reference.name, seed=9, guidance_scale=5.0), engine)
        resumed, fresh = events_of(engine, [checked(proto_request(reference.name, resume=checkpoint), engine), other])
        assert engine.stats.max_batch_seen == 2, "the two requests never shared a UNet forward"
        assert [e.step for e in resumed if isinstance(e, eng.Step)] == list(range(step + 1, STEPS + 1))
        assert [e.step for e in fresh if isinstance(e, eng.Step)] == list(range(1, STEPS + 1))
        diffs[step] = max_diff(final_latents(resumed), reference.batched)
    print(f"\n{reference.name} resumed batched, max abs diff by resume step: {diffs}")
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.slow
def test_without_the_multistep_history_a_resumed_run_ends_elsewhere(reference: SimpleNamespace) -> None:
    """The counter-test: the history in a DPM-Solver++ checkpoint matters for these runs, so the tests
    above would catch a resume that dropped it. (DDIM carries none.)"""
    if reference.name == "ddim":
        assert all(not c.model_outputs and c.lower_order_nums == 0 for c in reference.checkpoints.values())
        return
    engine = make_engine()
    full = checked(proto_request(reference.name, resume=reference.checkpoints[3]), engine)
    assert len(full.resume.history.model_outputs) == 2
    amnesiac = dataclasses.replace(full, resume=eng.Checkpoint(3, full.resume.latents))
    diff = max_diff(final_latents(events_of(engine, [amnesiac])[0]), reference.latents)
    assert diff > 100 * TOLERANCE, f"dropping the history changed the latents by only {diff}"


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_schedulers_draw_no_noise_in_their_steps(name: str) -> None:
    """Why a checkpoint carries no generator state: after the initial noise, a whole run leaves the
    request's generator untouched. A scheduler that drew noise in step (DDIM with eta > 0, the SDE
    variants of DPM-Solver) would fail this, and its checkpoints would need the generator's state."""
    engine = make_engine()
    request = checked(proto_request(name), engine)
    job = engine.submit(request)
    engine.start()
    try:
        final_latents(collect(job))
    finally:
        engine.stop(1.0)
    _, fresh = sampling.initial_latents(tuple(job.latents.shape), request.seed, torch.device("cpu"), torch.float32,
                                        1.0)
    assert "generator" in job.kwargs                    # both steps are given it ...
    assert torch.equal(job.generator.get_state(), fresh.get_state())    # ... and neither draws from it


def test_restoring_a_history_longer_than_the_solver_keeps_is_refused() -> None:
    scheduler = sampling.make_scheduler("dpmsolver++", json.loads(SCHEDULER_CONFIG.read_text()))
    scheduler.set_timesteps(STEPS)
    outputs = tuple(torch.zeros(1, 4, 2, 4, 4) for _ in range(3))
    with pytest.raises(ValueError, match="keeps 2"):
        sampling.restore_history(scheduler, 3, sampling.History(outputs, 2), torch.device("cpu"))


def cuda_engine(graphs: bool) -> eng.DenoiseEngine:
    """An engine on CUDA in float16 with its graphs (if any) captured ahead, as a server warms it."""
    engine = eng.DenoiseEngine(unet("cuda"), json.loads(SCHEDULER_CONFIG.read_text()), torch.device("cuda"),
                               torch.float16, max_batch=4)
    if graphs:
        engine.use_cuda_graphs()
    engine.warm([(2, 32, 32)])
    return engine


def step_through(engine: eng.DenoiseEngine, request: eng.Request, unchecked_first: bool) -> list[eng.Event]:
    """Run one request to its end with the engine's own steps, every one but the last (whose latents go
    to the CPU) under torch's sync debug mode, which raises on anything that makes the CPU wait for the
    GPU. A fresh DPM-Solver run looks its first timestep up (one sync per request): ``unchecked_first``."""
    job = engine.submit(request)
    engine._admit(job)
    steps = len(job.timestep_values) - job.index
    if unchecked_first:
        engine._step(engine._pick_batch())
        steps -= 1
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps - 1):
            engine._step(engine._pick_batch())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine._step(engine._pick_batch())
    return [job.events.get_nowait() for _ in range(job.events.qsize())]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_on_cuda_checkpoints_cost_the_engine_no_sync_and_resume_exactly(name: str, graphs: bool) -> None:
    """A checkpoint after every step hands out the engine's own CUDA tensors (the copy to the CPU
    happens where the event is read), so no step waits for the GPU; resumed, still on CUDA and without
    a sync, the run ends where the uninterrupted one does, in float16."""
    engine = cuda_engine(graphs)
    asked = checked(proto_request(name, checkpoint_every=1), engine)
    events = step_through(engine, asked, unchecked_first=name == "dpmsolver++")
    checkpoints = [e for e in events if isinstance(e, eng.Checkpoint)]
    assert [c.step for c in checkpoints] == list(range(1, STEPS)) and checkpoints[0].latents.is_cuda
    wire = {c.step: wire_checkpoint(c, asked) for c in checkpoints}
    assert all(c.latents.dtype == tensor_pb2.DTYPE_FLOAT16 for c in wire.values())
    diffs = {}
    for step, checkpoint in wire.items():
        engine = cuda_engine(graphs)
        resumed = step_through(engine, checked(proto_request(name, resume=checkpoint), engine), unchecked_first=False)
        diffs[step] = max_diff(final_latents(resumed).float(), final_latents(events).float())
    print(f"\n{name} on CUDA ({'graphs' if graphs else 'eager'}), float16, max abs diff by resume step: {diffs}")
    assert max(diffs.values()) == 0.0, diffs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # diffusers on numpy 2, at every set_timesteps
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_a_fresh_dpm_solver_run_counts_its_steps_from_index_0(spacing: str) -> None:
    """Why a checkpoint need not carry DPM-Solver's own step counter: a run from step 0 looks its first
    timestep up in the schedule and finds index 0 (no schedule repeats it), so after k steps the counter
    is k, which restore_history sets from the checkpoint's step."""
    config = {**json.loads(SCHEDULER_CONFIG.read_text()), "timestep_spacing": spacing}
    scheduler = sampling.make_scheduler("dpmsolver++", config)
    for steps in range(1, 501):
        scheduler.set_timesteps(steps)
        assert scheduler.index_for_timestep(scheduler.timesteps[0]) == 0, steps
