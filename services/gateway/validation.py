"""Checking a user's generation parameters and filling in the defaults. Pure logic, no gRPC.

Why here and first: a bad request must be refused with a sentence the user can act on before it
costs a queue slot or a GPU second; every rule lives in this one function, which tests cover. Both
front doors reach it the same way: gRPC (``messages.params_input``) and HTTP (``videos.to_job_request``)
turn what they received into a ``domain.ParamsInput``, and ``validate`` resolves it.
"""

from __future__ import annotations

import math
import secrets
import unicodedata

from services.common.contract import (CACHE_MODES, DEFAULT_CACHE, DEFAULT_FPS, DEFAULT_FRAMES, DEFAULT_GUIDANCE,
                                      DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS)
from services.common.errors import InvalidArgument
from services.gateway.domain import Limits, Params, ParamsInput

__all__ = ["Limits", "Params", "ParamsInput", "validate"]


# Characters that show nothing though they are not whitespace: Hangul fillers, the braille blank.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _shows_nothing(text: str) -> bool:
    """Only whitespace, control and format characters (zero-width spaces and joiners, BOMs, bidi marks) and
    blank letters: a prompt that says nothing, though ``str.strip`` keeps it."""
    return all(c.isspace() or c in _BLANK_LETTERS or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp")
               for c in text)


def _check_text(name: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_prompt_chars:
        raise InvalidArgument(f"{name} has {len(text)} characters; at most {limits.max_prompt_chars} are accepted "
                              "(and the model reads only the first 77 tokens)", field=name)
    if "\x00" in text:
        raise InvalidArgument(f"{name} contains a NUL character; send plain text", field=name)


def validate(params: ParamsInput, limits: Limits) -> Params:
    """Return the resolved params or raise InvalidArgument naming the field and the allowed range."""
    prompt = params.prompt
    if _shows_nothing(prompt):
        shown = "" if not prompt else " (it has only invisible characters)"
        raise InvalidArgument(f"prompt is empty{shown}; describe the video you want, e.g. \"a red ball moving "
                              "right\"", field="prompt")
    _check_text("prompt", prompt, limits)
    _check_text("negative_prompt", params.negative_prompt, limits)

    frames = params.num_frames or DEFAULT_FRAMES
    if not 1 <= frames <= limits.max_frames:
        raise InvalidArgument(f"num_frames is {frames}; it must be between 1 and {limits.max_frames}",
                              field="num_frames")
    sizes = {}
    for name in ("height", "width"):
        value = getattr(params, name) or limits.default_size
        factor = limits.vae_scale_factor    # the model's: a latent covers factor x factor pixels
        if value < 0 or value % factor or value > limits.max_size:
            raise InvalidArgument(f"{name} is {value}; it must be a positive multiple of {factor} (this model's "
                                  f"VAE scale factor), at most {limits.max_size}", field=name)
        sizes[name] = value
    steps = params.num_inference_steps or DEFAULT_STEPS
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument(f"num_inference_steps is {steps}; it must be between 1 and {limits.max_steps}",
                              field="num_inference_steps")
    guidance = params.guidance_scale if params.guidance_scale is not None else DEFAULT_GUIDANCE
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidArgument(f"guidance_scale is {guidance}; it must be a number >= 0 (9.0 is the default, "
                              "<= 1 turns guidance off)", field="guidance_scale")
    fps = params.fps or DEFAULT_FPS
    if not 1 <= fps <= limits.max_fps:
        raise InvalidArgument(f"fps is {fps}; it must be between 1 and {limits.max_fps}", field="fps")
    scheduler = (params.scheduler or DEFAULT_SCHEDULER).strip().lower()
    if scheduler not in SCHEDULERS:
        raise InvalidArgument(f"scheduler {params.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}",
                              field="scheduler")
    cache = (params.cache or DEFAULT_CACHE).strip().lower()
    if cache not in CACHE_MODES:
        raise InvalidArgument(f"cache {params.cache!r} is unknown; choose none (exact, the default) or deep "
                              "(DeepCache: faster, approximate)", field="cache")
    if params.seed is not None:
        if params.seed < 0:
            raise InvalidArgument(f"seed is {params.seed}; it must be >= 0", field="seed")
        seed = params.seed
    else:
        seed = secrets.randbelow(2**31)
    return Params(prompt=prompt, negative_prompt=params.negative_prompt, num_frames=frames,
                  height=sizes["height"], width=sizes["width"], num_inference_steps=steps,
                  guidance_scale=float(guidance), seed=seed, fps=fps, scheduler=scheduler, cache=cache,
                  preview=bool(params.preview))
