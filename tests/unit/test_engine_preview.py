"""Live previews in the denoiser engine, on the embedded model's UNet (2 frames of 32x32, a few steps): a
request that asks gets a Preview after every N-th step and the last, right after that step's Step event,
equal to the latent -> RGB map of its latents then; a request batched with it that did not ask gets none
and costs no preview work; without a map, a request that asks is refused by the engine, and the server
sends none and says so. The PNG the server makes of a preview decodes to the frames in their grid."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.latent_rgb import LatentRgb
from services.common.png import encode_png, frame_grid, grid_shape
from services.common.tensors import to_proto
from services.denoiser import engine as eng
from services.denoiser.server import DenoiserConfig, check_request, preview_to_proto
from t2v.v1 import denoiser_pb2
from tests.unit.test_engine_checkpoint import collect
from tests.unit.test_engine_step import SCHEDULER_CONFIG, unet

# Not the embedded model's fitted map: numbers that make every channel count, and values on both sides of
# the clamp, so a wrong channel order, a missing bias or a missing clamp shows.
MAP = LatentRgb(weights=((0.30, -0.20, 0.10, 0.05), (-0.10, 0.25, 0.20, -0.15), (0.05, 0.10, -0.30, 0.35)),
                bias=(0.5, 0.45, 0.55))
STEPS = 5


def make_engine(latent_rgb: LatentRgb | None = MAP) -> eng.DenoiseEngine:
    return eng.DenoiseEngine(unet(), json.loads(SCHEDULER_CONFIG.read_text()), torch.device("cpu"), torch.float32,
                             max_batch=4, latent_rgb=latent_rgb)


def request(seed: int, preview_every: int = 0, checkpoint_every: int = 1) -> eng.Request:
    embeddings = torch.randn(2, 77, unet().config.cross_attention_dim, generator=torch.Generator().manual_seed(seed))
    return eng.Request(f"r{seed}", embeddings, num_frames=2, height=32, width=32, num_inference_steps=STEPS,
                       guidance_scale=7.0, seed=seed, checkpoint_every=checkpoint_every, preview_every=preview_every)


def expected_rgb(latents: torch.Tensor) -> np.ndarray:
    """The map written out by hand, in float64: [1, C, F, h, w] -> uint8 [F, h, w, 3]."""
    x = latents[0].double().numpy()                                  # [C, F, h, w]
    weights, bias = np.array(MAP.weights), np.array(MAP.bias)
    rgb = np.tensordot(weights, x, axes=([1], [0])) + bias[:, None, None, None]   # [3, F, h, w]
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 3, 0)


def run(engine: eng.DenoiseEngine, requests: list[eng.Request]) -> list[list[eng.Event]]:
    jobs = [engine.submit(r) for r in requests]      # all in before the engine starts: they share batches
    engine.start()
    try:
        return [collect(job) for job in jobs]
    finally:
        engine.stop(1.0)


def latents_after(events: list[eng.Event]) -> dict[int, torch.Tensor]:
    """Step -> latents, from the Checkpoints (every step but the last) and the Finished event."""
    found = {e.step: e.latents for e in events if isinstance(e, eng.Checkpoint)}
    assert isinstance(events[-1], eng.Finished), events[-1]
    found[events[-1].steps_run] = events[-1].latents
    return found


@pytest.mark.slow
def test_previews_come_at_their_steps_only_for_the_requests_that_asked_and_equal_the_map() -> None:
    engine = make_engine()
    every_2, never, every_3 = run(engine, [request(1, preview_every=2), request(2), request(3, preview_every=3)])
    assert engine.stats.max_batch_seen == 3, "the three requests were meant to share their batches"

    clamped = []
    for events, steps in ((every_2, [2, 4, 5]), (every_3, [3, 5])):
        previews = [e for e in events if isinstance(e, eng.Preview)]
        assert [p.step for p in previews] == steps
        assert all(p.total == STEPS for p in previews)
        latents = latents_after(events)
        for preview in previews:
            before = events[events.index(preview) - 1]
            # right after its step's Step event (and that step's Checkpoint, when there is one)
            assert isinstance(before, (eng.Step, eng.Checkpoint)) and before.step == preview.step
            assert preview.rgb.dtype == torch.uint8 and list(preview.rgb.shape) == [2, 4, 4, 3]
            got, want = preview.rgb.numpy().astype(int), expected_rgb(latents[preview.step]).astype(int)
            assert np.abs(got - want).max() <= 1, "a preview is not the map of its latents"   # float32 vs 64 rounding
            assert (got == want).mean() > 0.97
            clamped.append((got == 0).mean() + (got == 255).mean())
    assert 0 < np.mean(clamped) < 0.5, f"the test map should clamp some values, not most: {clamped}"
    assert not [e for e in never if isinstance(e, eng.Preview)]
    # not a copy of one request's picture: every request has its own
    assert not torch.equal(next(e for e in every_2 if isinstance(e, eng.Preview) and e.step == 5).rgb,
                           next(e for e in every_3 if isinstance(e, eng.Preview) and e.step == 5).rgb)


@pytest.mark.slow
def test_requests_that_did_not_ask_cost_no_preview_work(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine()
    calls: list[int] = []
    real = engine.preview
    monkeypatch.setattr(engine, "preview", lambda latents: calls.append(latents.shape[0]) or real(latents))
    run(engine, [request(4, checkpoint_every=0), request(5, checkpoint_every=0)])
    assert calls == [] and engine.stats.steps == STEPS

    engine = make_engine()
    monkeypatch.setattr(engine, "preview", lambda latents: calls.append(latents.shape[0]) or real(latents))
    run(engine, [request(4, checkpoint_every=0), request(5, preview_every=1, checkpoint_every=0)])
    assert len(calls) == STEPS, "one preview a step, for the one request that asked"


@pytest.mark.slow
def test_a_map_for_other_latents_is_not_used_and_a_failing_preview_fails_no_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a map fitted for a 3-channel model on this 4-channel UNet: previews are unavailable, as without a map
    three = LatentRgb(weights=((0.3, -0.2, 0.1), (-0.1, 0.25, 0.2), (0.05, 0.1, -0.3)), bias=(0.5, 0.45, 0.55))
    engine = make_engine(latent_rgb=three)
    assert engine.latent_rgb is None
    wire = denoiser_pb2.DenoiseRequest(
        request_id="w", embeddings=to_proto(request(9).embeddings), num_frames=2, height=32, width=32,
        num_inference_steps=STEPS, guidance_scale=7.0, seed=9, scheduler="ddim", preview_every=2)
    assert check_request(wire, DenoiserConfig(device="cpu", dtype="float32"), engine).preview_every == 0

    # a preview that raises in the step: logged and left out; both requests of the batch still finish
    engine = make_engine()
    monkeypatch.setattr(engine, "preview", lambda latents: 1 / 0)
    asked, plain = run(engine, [request(10, preview_every=1, checkpoint_every=0), request(11, checkpoint_every=0)])
    assert isinstance(asked[-1], eng.Finished) and isinstance(plain[-1], eng.Finished)
    assert not [e for e in asked if isinstance(e, eng.Preview)] and asked[-1].steps_run == STEPS


@pytest.mark.slow
def test_without_a_map_the_engine_refuses_previews_and_the_server_asks_for_none() -> None:
    engine = make_engine(latent_rgb=None)
    asked, plain = run(engine, [request(6, preview_every=2), request(7)])
    assert isinstance(asked[-1], eng.Failed) and "previews are unavailable" in str(asked[-1].error)
    assert isinstance(plain[-1], eng.Finished)

    wire = denoiser_pb2.DenoiseRequest(
        request_id="w", embeddings=to_proto(request(8).embeddings), num_frames=2, height=32, width=32,
        num_inference_steps=STEPS, guidance_scale=7.0, seed=8, scheduler="ddim", preview_every=2)
    config = DenoiserConfig(device="cpu", dtype="float32")
    assert check_request(wire, config, make_engine(latent_rgb=None)).preview_every == 0
    assert check_request(wire, config, make_engine()).preview_every == 2
    wire.preview_every = -1
    with pytest.raises(InvalidArgument, match="preview_every is -1"):
        check_request(wire, config, make_engine())


def test_the_server_sends_a_preview_as_a_png_of_its_frames_in_a_grid() -> None:
    rgb = torch.randint(0, 256, (3, 4, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    message = preview_to_proto(eng.Preview(step=4, total=9, rgb=rgb))
    assert (message.step, message.total_steps, message.num_frames) == (4, 9, 3)
    assert (message.columns, message.rows, message.frame_width, message.frame_height) == (2, 2, 5, 4)
    with Image.open(io.BytesIO(message.png)) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (10, 8)
        pixels = np.asarray(image)
    frames = rgb.numpy()
    for i in range(3):                                   # frame i at column i % 2, row i // 2
        row, column = divmod(i, 2)
        assert np.array_equal(pixels[row * 4:(row + 1) * 4, column * 5:(column + 1) * 5], frames[i])
    assert not pixels[4:, 5:].any(), "the cell past the last frame is black"


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (64, 200, 3)])
def test_encode_png_decodes_to_the_same_pixels(shape: tuple[int, int, int]) -> None:
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(pixels))) as image:
        image.load()                                     # checks every chunk's CRC and the zlib stream
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)


def test_encode_png_refuses_what_is_not_rgb_bytes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2), dtype=np.uint8))


def test_grid_shapes() -> None:
    assert [grid_shape(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [(1, 1), (2, 1), (2, 2), (2, 2), (3, 2), (4, 4),
                                                                (5, 4)]
    picture, columns, rows = frame_grid(np.full((16, 8, 8, 3), 7, dtype=np.uint8))
    assert picture.shape == (32, 32, 3) and (columns, rows) == (4, 4) and (picture == 7).all()
