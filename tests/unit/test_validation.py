"""services.gateway.validation.validate: defaults, limits and the sentence every refusal carries."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.contract import SCHEDULERS
from services.common.errors import InvalidArgument
from services.gateway.domain import ParamsInput
from services.gateway.messages import params_input
from services.gateway.validation import Limits, Params, validate as validate_input
from t2v.v1 import generation_pb2

LIMITS = Limits()


def validate(params: generation_pb2.GenerationParams | ParamsInput, limits: Limits) -> Params:
    """What the gRPC front door does: its message as a ParamsInput, then the one validation path."""
    return validate_input(params_input(params) if isinstance(params, generation_pb2.GenerationParams) else params,
                          limits)


def make(**fields) -> generation_pb2.GenerationParams:
    fields.setdefault("prompt", "a red ball bouncing")
    return generation_pb2.GenerationParams(**fields)


def test_defaults_are_filled_in() -> None:
    params = validate(make(), LIMITS)
    assert isinstance(params, Params)
    assert params.prompt == "a red ball bouncing"
    assert params.negative_prompt == ""
    assert params.num_frames == 16
    assert params.height == LIMITS.default_size
    assert params.width == LIMITS.default_size
    assert params.num_inference_steps == 50
    assert params.guidance_scale == 9.0
    assert params.fps == 8
    assert params.scheduler == "ddim"
    assert params.cache == "none"
    assert isinstance(params.seed, int)
    assert 0 <= params.seed < 2**31
    assert params.uses_guidance


def test_default_size_follows_limits() -> None:
    params = validate(make(), Limits(default_size=64))
    assert (params.height, params.width) == (64, 64)


@pytest.mark.parametrize("factor, good, bad", [(8, 40, 36), (2, 34, 33), (16, 48, 40)])
def test_sizes_must_be_multiples_of_the_models_vae_scale_factor(factor: int, good: int, bad: int) -> None:
    limits = Limits(vae_scale_factor=factor, default_size=4 * factor)
    assert (validate(make(height=good, width=good), limits).height, validate(make(), limits).width) == (
        good, 4 * factor)
    for name in ("height", "width"):
        with pytest.raises(InvalidArgument) as info:
            validate(make(**{name: bad}), limits)
        assert info.value.field == name
        assert f"{name} is {bad}; it must be a positive multiple of {factor} (this model's VAE scale factor)" \
            in info.value.message


def test_explicit_values_are_kept() -> None:
    params = validate(make(negative_prompt="blurry", num_frames=8, height=128, width=320,
                           num_inference_steps=25, guidance_scale=7.5, seed=123456789012, fps=24,
                           scheduler="dpmsolver++"), LIMITS)
    assert params == Params(prompt="a red ball bouncing", negative_prompt="blurry", num_frames=8, height=128,
                            width=320, num_inference_steps=25, guidance_scale=7.5, seed=123456789012, fps=24,
                            scheduler="dpmsolver++")


def test_random_seed_when_unset() -> None:
    seeds = {validate(make(), LIMITS).seed for _ in range(20)}
    assert all(0 <= s < 2**31 for s in seeds)
    assert len(seeds) > 1, "an unset seed must be drawn at random for each request"


def test_seed_zero_is_kept() -> None:
    request = make(seed=0)
    assert request.HasField("seed")
    assert validate(request, LIMITS).seed == 0


def test_explicit_guidance_zero_is_kept() -> None:
    request = make(guidance_scale=0.0)
    assert request.HasField("guidance_scale")
    params = validate(request, LIMITS)
    assert params.guidance_scale == 0.0
    assert not params.uses_guidance


def test_guidance_one_turns_guidance_off() -> None:
    assert not validate(make(guidance_scale=1.0), LIMITS).uses_guidance


@pytest.mark.parametrize("given_name, expected", [("DDIM", "ddim"), ("DPMSolver++", "dpmsolver++"),
                                                  (" ddim ", "ddim"), ("dpmsolver++", "dpmsolver++")])
def test_scheduler_is_case_insensitive(given_name: str, expected: str) -> None:
    assert validate(make(scheduler=given_name), LIMITS).scheduler == expected


def test_limits_are_inclusive() -> None:
    params = validate(make(num_frames=LIMITS.max_frames, height=LIMITS.max_size, width=LIMITS.vae_scale_factor,
                           num_inference_steps=LIMITS.max_steps, fps=LIMITS.max_fps,
                           prompt="x" * LIMITS.max_prompt_chars), LIMITS)
    assert params.num_frames == LIMITS.max_frames
    assert params.height == LIMITS.max_size
    assert params.width == LIMITS.vae_scale_factor
    assert params.num_inference_steps == LIMITS.max_steps
    assert params.fps == LIMITS.max_fps


@pytest.mark.parametrize(
    "fields, field_name",
    [
        pytest.param(dict(prompt=""), "prompt", id="empty-prompt"),
        pytest.param(dict(prompt=" \t\n "), "prompt", id="whitespace-prompt"),
        pytest.param(dict(prompt="\u200b\u200c\u200d\u2060\ufeff"), "prompt", id="zero-width-prompt"),
        pytest.param(dict(prompt="\u3164\u2800\u200e\u00a0"), "prompt", id="blank-letters-prompt"),
        pytest.param(dict(prompt="x" * (LIMITS.max_prompt_chars + 1)), "prompt", id="long-prompt"),
        pytest.param(dict(prompt="a cat\x00"), "prompt", id="nul-in-prompt"),
        pytest.param(dict(negative_prompt="x" * (LIMITS.max_prompt_chars + 1)), "negative_prompt",
                     id="long-negative-prompt"),
        pytest.param(dict(negative_prompt="blur\x00"), "negative_prompt", id="nul-in-negative-prompt"),
        pytest.param(dict(num_frames=LIMITS.max_frames + 1), "num_frames", id="frames-over-limit"),
        pytest.param(dict(num_frames=-1), "num_frames", id="negative-frames"),
        pytest.param(dict(height=100), "height", id="height-not-multiple-of-8"),
        pytest.param(dict(height=-8), "height", id="negative-height"),
        pytest.param(dict(height=LIMITS.max_size + 8), "height", id="height-over-max"),
        pytest.param(dict(width=LIMITS.max_size + 8), "width", id="width-over-max"),
        pytest.param(dict(width=100), "width", id="width-not-multiple-of-8"),
        pytest.param(dict(width=-16), "width", id="negative-width"),
        pytest.param(dict(num_inference_steps=LIMITS.max_steps + 1), "num_inference_steps", id="steps-over-limit"),
        pytest.param(dict(num_inference_steps=-5), "num_inference_steps", id="negative-steps"),
        pytest.param(dict(guidance_scale=-0.5), "guidance_scale", id="negative-guidance"),
        pytest.param(dict(guidance_scale=math.nan), "guidance_scale", id="nan-guidance"),
        pytest.param(dict(guidance_scale=math.inf), "guidance_scale", id="inf-guidance"),
        pytest.param(dict(guidance_scale=-math.inf), "guidance_scale", id="minus-inf-guidance"),
        pytest.param(dict(scheduler="euler"), "scheduler", id="unknown-scheduler"),
        pytest.param(dict(seed=-1), "seed", id="negative-seed"),
        pytest.param(dict(fps=LIMITS.max_fps + 1), "fps", id="fps-over-limit"),
        pytest.param(dict(fps=-1), "fps", id="negative-fps"),
    ],
)
def test_bad_input_is_refused_naming_the_field(fields: dict, field_name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(make(**fields), LIMITS)
    message = info.value.message
    assert message == str(info.value)
    assert message.startswith(field_name) or f" {field_name} " in message, message
    if field_name == "prompt":
        assert not message.startswith("negative_prompt")
    assert len(message.split()) >= 4, f"not a sentence: {message!r}"


@pytest.mark.parametrize(("given", "expected"), [("", "none"), ("none", "none"), ("deep", "deep"), (" Deep ", "deep")])
def test_cache_defaults_to_none_and_is_case_insensitive(given: str, expected: str) -> None:
    assert validate(make(cache=given), LIMITS).cache == expected


def test_an_unknown_cache_is_refused_naming_the_field_and_the_choices() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(make(cache="turbo"), LIMITS)
    assert info.value.field == "cache"
    assert "'turbo'" in info.value.message and "none" in info.value.message and "deep" in info.value.message


def test_unknown_scheduler_lists_the_choices() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(make(scheduler="euler"), LIMITS)
    for name in SCHEDULERS:
        assert name in info.value.message
    assert "euler" in info.value.message


def test_stricter_limits_are_applied() -> None:
    limits = Limits(max_frames=4, max_size=64, max_steps=10, max_fps=12, max_prompt_chars=5)
    for fields in (dict(num_frames=5), dict(height=72), dict(num_inference_steps=11), dict(fps=13),
                   dict(prompt="abcdef")):
        with pytest.raises(InvalidArgument):
            validate(make(**{"prompt": "abc", **fields}), limits)


# -- property: validate returns params within the limits or raises InvalidArgument, nothing else --

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
SMALL = st.one_of(st.integers(min_value=-16, max_value=1100), INT32)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@st.composite
def generation_params(draw: st.DrawFn) -> generation_pb2.GenerationParams:
    fields = dict(
        prompt=draw(st.one_of(TEXT, st.sampled_from(["a cat", "  ", "x" * (LIMITS.max_prompt_chars + 1)]))),
        negative_prompt=draw(TEXT),
        num_frames=draw(SMALL),
        height=draw(st.one_of(SMALL, st.integers(min_value=0, max_value=130).map(lambda n: n * 8))),
        width=draw(st.one_of(SMALL, st.integers(min_value=0, max_value=130).map(lambda n: n * 8))),
        num_inference_steps=draw(SMALL),
        fps=draw(SMALL),
        scheduler=draw(st.one_of(TEXT, st.sampled_from(["", "ddim", "DDIM", "dpmsolver++", "DPMSolver++"]))),
    )
    if draw(st.booleans()):
        fields["guidance_scale"] = draw(st.floats(width=32))
    if draw(st.booleans()):
        fields["seed"] = draw(st.integers(min_value=-(2**63), max_value=2**63 - 1))
    return generation_pb2.GenerationParams(**fields)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generation_params())
def test_validate_returns_params_within_limits_or_refuses(request: generation_pb2.GenerationParams) -> None:
    try:
        params = validate(request, LIMITS)
    except InvalidArgument as exc:
        assert exc.message.strip()
        return
    assert params.prompt == request.prompt and params.prompt.strip()
    assert "\x00" not in params.prompt and "\x00" not in params.negative_prompt
    assert len(params.prompt) <= LIMITS.max_prompt_chars
    assert len(params.negative_prompt) <= LIMITS.max_prompt_chars
    assert 1 <= params.num_frames <= LIMITS.max_frames
    for size in (params.height, params.width):
        assert 0 < size <= LIMITS.max_size and size % LIMITS.vae_scale_factor == 0
    assert 1 <= params.num_inference_steps <= LIMITS.max_steps
    assert isinstance(params.guidance_scale, float)
    assert math.isfinite(params.guidance_scale) and params.guidance_scale >= 0
    assert 1 <= params.fps <= LIMITS.max_fps
    assert params.scheduler in SCHEDULERS
    assert params.seed >= 0
    if request.HasField("seed"):
        assert params.seed == request.seed
    else:
        assert params.seed < 2**31


@pytest.mark.parametrize("prompt", ["a\u200bcat", "日本の猫", "🙂", "\u200ba red ball"])
def test_a_prompt_with_something_visible_is_kept_as_sent(prompt: str) -> None:
    assert validate(make(prompt=prompt), LIMITS).prompt == prompt
