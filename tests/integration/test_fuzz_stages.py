"""Property-based fuzzing of the three stages over real gRPC (TextEncoder.Encode, Denoiser.Denoise,
Decoder.Decode), built field by field by hypothesis.

Each case either breaks a field the stage must refuse (then: INVALID_ARGUMENT with a sentence), or is
a valid tiny request (then: the right answer, finite numbers), or carries finite but extreme values
(then: either, never NaN out). Never INTERNAL, never a hang (every call has a deadline), and the stage
still serves afterwards. Shapes come from the loaded model, so a retrained embedded model changes
nothing here. Valid cases are kept tiny (1-2 frames, 8-16 px, 1-2 steps) so each runs in milliseconds.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import grpc
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from services.common.contract import SCHEDULERS, TEXT_TOKENS
from services.common.tensors import from_proto
from t2v.v1 import (decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, text_encoder_pb2,
                    text_encoder_pb2_grpc)
from tests.fuzzing import (CALL_TIMEOUT, INT32, Drawn, broken_tensors, call_drawn, check_refusal, fuzz_settings, good_tensors,
                           hostile_texts, int64s, outcome)

pytestmark = pytest.mark.slow

INVALID = {grpc.StatusCode.INVALID_ARGUMENT}
Draw = Callable[[st.SearchStrategy[Any]], Any]


def out_of(low: int, high: int) -> st.SearchStrategy[int]:
    """An int32 outside [low, high]."""
    return st.one_of(st.integers(INT32[0], low - 1), st.integers(high + 1, INT32[1]))


def bad_sizes(most: int) -> st.SearchStrategy[int]:
    """Heights / widths a stage must refuse: <= 0, not a multiple of 8, over ``most``."""
    return st.one_of(out_of(1, most), st.integers(1, most).filter(lambda v: v % 8 != 0))


def broken_fields(fields: list[str]) -> st.SearchStrategy[frozenset[str]]:
    """Which fields a case breaks: none (a valid case) about a third of the time, else one or two."""
    return st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(fields), min_size=1, max_size=2))


# --- text encoder ---------------------------------------------------------------------------------------
@st.composite
def encode_cases(draw: Draw, max_prompts: int, max_chars: int) -> tuple[text_encoder_pb2.EncodeRequest, str]:
    broken = draw(st.sampled_from(["", "", "", "no_prompts", "too_many", "too_long"]))
    prompt = st.one_of(hostile_texts(200), st.just("\U0001F600" * max_chars), st.just("a red ball " * 40))
    prompts = draw(st.lists(prompt, min_size=1, max_size=4))
    if broken == "no_prompts":
        prompts = []
    elif broken == "too_many":
        prompts = draw(st.lists(hostile_texts(8), min_size=max_prompts + 1, max_size=max_prompts + 20))
    elif broken == "too_long":      # one over the limit: a character more, 100 KB, or 100 KB of 4-byte characters
        prompts.insert(draw(st.integers(0, len(prompts))),
                       draw(st.sampled_from(["x" * (max_chars + 1), "é" * (max_chars + 1), "x" * 100_000,
                                             "\U0001F600" * 25_000])))
    return text_encoder_pb2.EncodeRequest(prompts=prompts, request_id=draw(hostile_texts())), broken


@given(data=st.data())
@fuzz_settings(300)
def test_text_encoder_refuses_or_answers_every_request(text_encoder_stage, data: st.DataObject) -> None:
    servicer = text_encoder_stage.servicer
    hidden, tokens = servicer.encoder.hidden_size, servicer.encoder.max_length
    request, broken = data.draw(encode_cases(servicer.config.max_prompts, servicer.config.max_prompt_chars))
    event(f"broken: {broken or 'nothing'}")
    stub = text_encoder_pb2_grpc.TextEncoderStub(text_encoder_stage.channel())
    result = outcome(lambda: stub.Encode(request, timeout=CALL_TIMEOUT))
    if broken:
        check_refusal(result, INVALID, f"Encode breaking {broken}")
        return
    assert result.ok, f"a valid Encode was refused: {result.code.name} {result.details!r}"
    embeddings = from_proto(result.answer.embeddings)
    assert embeddings.shape == (len(request.prompts), tokens, hidden)
    assert torch.isfinite(embeddings).all()
    assert len(result.answer.prompts) == len(request.prompts)
    for info in result.answer.prompts:
        assert info.truncated == (info.num_tokens > tokens)


# --- denoiser -------------------------------------------------------------------------------------------
DENOISE_FIELDS = ["num_frames", "height", "width", "num_inference_steps", "guidance_scale", "scheduler", "embeddings"]


@st.composite
def denoise_cases(draw: Draw, config: Any, embedding_dim: int) -> Drawn:
    broken = draw(broken_fields(DENOISE_FIELDS))
    extreme = not broken and draw(st.integers(0, 9)) == 0     # finite values near the limit: refused or finite
    bad = broken.__contains__
    fields: dict[str, Any] = {
        "num_frames": draw(out_of(1, config.max_frames) if bad("num_frames") else st.integers(1, 2)),
        "height": draw(bad_sizes(config.max_size) if bad("height") else st.sampled_from([8, 16])),
        "width": draw(bad_sizes(config.max_size) if bad("width") else st.sampled_from([8, 16])),
        "num_inference_steps": draw(out_of(1, config.max_steps) if bad("num_inference_steps") else st.integers(1, 2)),
        "seed": draw(int64s()),          # any int64 is a seed
        "request_id": draw(st.one_of(st.sampled_from(["", "t"]), hostile_texts())),
    }
    if bad("guidance_scale"):
        fields["guidance_scale"] = draw(st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -1.0]),
                                                  st.floats(max_value=-1.0, width=32)))
    elif extreme and draw(st.booleans()):
        fields["guidance_scale"] = draw(st.sampled_from([1e6, 1e30, 3e38]))
    else:
        fields["guidance_scale"] = draw(st.one_of(st.floats(0, 20, width=32), st.sampled_from([-0.0, 1.0, 9.0])))
    fields["scheduler"] = draw(st.text(max_size=20).filter(lambda s: s not in SCHEDULERS) if bad("scheduler")
                               else st.sampled_from(SCHEDULERS))
    good_shape = [2 if fields["guidance_scale"] > 1 else 1, TEXT_TOKENS, embedding_dim]
    fields["embeddings"] = draw(broken_tensors(good_shape, (0, 1, 2)) if bad("embeddings")
                                else good_tensors(good_shape, extreme=extreme))
    return Drawn(denoiser_pb2.DenoiseRequest(**fields), broken, extreme)


@given(data=st.data())
@fuzz_settings(400)
def test_denoiser_refuses_or_denoises_every_request(denoiser_stage, data: st.DataObject) -> None:
    engine = denoiser_stage.servicer.engine
    drawn = data.draw(denoise_cases(denoiser_stage.servicer.config, engine.embedding_dim))
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel())
    result = call_drawn(drawn, lambda request: stub.Denoise(request, timeout=CALL_TIMEOUT), "Denoise")
    if result is None:
        return
    request = drawn.request
    *steps, last = result.answer
    assert [e.progress.step for e in steps] == list(range(1, request.num_inference_steps + 1))
    latents = from_proto(last.latents)
    factor = engine.vae_scale_factor
    assert latents.shape == (1, engine.latent_channels, request.num_frames, request.height // factor,
                             request.width // factor)
    assert torch.isfinite(latents).all(), "the denoiser answered NaN or Inf latents"


# --- decoder --------------------------------------------------------------------------------------------
DECODE_FIELDS = ["fps", "latents", "too_big"]


@st.composite
def decode_cases(draw: Draw, config: Any, channels: int, scale: int) -> Drawn:
    broken = draw(broken_fields(DECODE_FIELDS))
    extreme = not broken and draw(st.integers(0, 9)) == 0
    fps = draw(out_of(1, config.max_fps) if "fps" in broken else st.integers(1, config.max_fps))
    good = [1, channels, draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    if "too_big" in broken:          # more frames, or more pixels a side, than the decoder takes: cheap to send
        too_many = draw(st.sampled_from([(2, config.max_frames + 1), (3, config.max_size // scale + 1),
                                         (4, config.max_size // scale + 1), (4, 1 << 16)]))
        good[too_many[0]] = too_many[1] + draw(st.integers(0, 3))
        good[2 if too_many[0] != 2 else 3] = 1
    if "latents" in broken:
        latents = draw(broken_tensors(good, (0, 1)))
    else:
        latents = draw(good_tensors(good, extreme=extreme))
    request = decoder_pb2.DecodeRequest(latents=latents, fps=fps, return_frames=draw(st.booleans()),
                                        request_id=draw(hostile_texts()))
    return Drawn(request, broken, extreme)


@given(data=st.data())
@fuzz_settings(300)
def test_decoder_refuses_or_decodes_every_request(decoder_stage, data: st.DataObject) -> None:
    servicer = decoder_stage.servicer
    scale = servicer.vae.scale_factor
    drawn = data.draw(decode_cases(servicer.config, servicer.vae.latent_channels, scale))
    stub = decoder_pb2_grpc.DecoderStub(decoder_stage.channel())
    result = call_drawn(drawn, lambda request: stub.Decode(request, timeout=CALL_TIMEOUT), "Decode")
    if result is None:
        return
    request = drawn.request
    answer, shape = result.answer, list(request.latents.shape)
    assert answer.video[4:8] == b"ftyp" and answer.mime_type == "video/mp4"
    assert (answer.num_frames, answer.height, answer.width) == (shape[2], shape[3] * scale, shape[4] * scale)
    if request.return_frames:
        frames = from_proto(answer.frames)
        assert frames.shape == (shape[2], shape[3] * scale, shape[4] * scale, 3)
        assert torch.isfinite(frames).all() and 0 <= float(frames.min()) and float(frames.max()) <= 1


def test_every_stage_still_serves_after_the_fuzzing(text_encoder_stage, denoiser_stage, decoder_stage) -> None:
    """Runs after the fuzz tests above (file order): no case left a stage broken or busy."""
    engine = denoiser_stage.servicer.engine
    assert engine.active_jobs() == 0
    encoded = text_encoder_pb2_grpc.TextEncoderStub(text_encoder_stage.channel()).Encode(
        text_encoder_pb2.EncodeRequest(prompts=["", "still serving"]), timeout=CALL_TIMEOUT)
    denoise = denoiser_pb2.DenoiseRequest(embeddings=encoded.embeddings, num_frames=1, height=8, width=8,
                                          num_inference_steps=1, guidance_scale=9.0, scheduler=SCHEDULERS[0])
    latents = list(denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel()).Denoise(denoise, timeout=CALL_TIMEOUT))
    decoded = decoder_pb2_grpc.DecoderStub(decoder_stage.channel()).Decode(
        decoder_pb2.DecodeRequest(latents=latents[-1].latents, fps=8), timeout=CALL_TIMEOUT)
    assert decoded.video[4:8] == b"ftyp"
