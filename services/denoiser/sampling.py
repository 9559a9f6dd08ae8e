"""Schedulers, classifier-free guidance and seeded noise: the math of one request's denoising.

Kept apart from the engine (which only decides what shares a UNet forward) and written out as
diffusers' TextToVideoSDPipeline does it, so the same seed gives the same latents as the pipeline.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from services.common.contract import DEFAULT_SCHEDULER, SCHEDULERS  # noqa: F401 - re-exported


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler per request: schedulers keep per-run state (multistep history, step index)."""
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def initial_latents(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype,
                    init_noise_sigma: float) -> tuple[torch.Tensor, torch.Generator]:
    """Noise from a CPU generator seeded per request: the same on every device and in every batch."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return latents * init_noise_sigma, generator


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator, eta: float = 0.0) -> dict[str, Any]:
    """eta (DDIM only) and the generator, for the schedulers whose ``step`` takes them."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def apply_guidance(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [uncond, cond] pair."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def scheduler_step(scheduler: SchedulerMixin, noise_pred: torch.Tensor, timestep: int,
                   latents: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """x_t -> x_{t-1} on [B, C, F, h, w] latents; the scheduler sees frames as a batch of images.

    Pass ``timestep`` as a Python int: a CUDA tensor makes DDIM's step read it back to the CPU (it
    indexes a CPU table with it and compares it with 0), a GPU sync on every step.
    """
    flat = scheduler.step(_frames_as_images(noise_pred), timestep, _frames_as_images(latents), **kwargs).prev_sample
    return _images_as_frames(flat, latents.shape[0])


def _frames_as_images(tensor: torch.Tensor) -> torch.Tensor:
    """[B, C, F, h, w] -> [B*F, C, h, w], the layout the image schedulers step (and keep history) in."""
    bsz, channels, frames, height, width = tensor.shape
    return tensor.permute(0, 2, 1, 3, 4).reshape(bsz * frames, channels, height, width)


def _images_as_frames(flat: torch.Tensor, bsz: int) -> torch.Tensor:
    """[B*F, C, h, w] -> [B, C, F, h, w]: the inverse of ``_frames_as_images`` (a view, no arithmetic)."""
    frames, (channels, height, width) = flat.shape[0] // bsz, flat.shape[1:]
    return flat[None, :].reshape(bsz, frames, channels, height, width).permute(0, 2, 1, 3, 4)


# --- checkpoints -----------------------------------------------------------------------------
# What a scheduler carries from one step to the next, read from diffusers 0.42.1's source:
#   DDIMScheduler: nothing. Its step reads only the timestep it is given (the engine keeps the step
#     index) and draws noise only when eta > 0; the engine runs eta = 0.
#   DPMSolverMultistepScheduler: ``model_outputs`` (solver_order slots, newest last, None until
#     filled), ``lower_order_nums`` and ``_step_index`` (``_begin_index`` stays None). With the
#     non-SDE "dpmsolver++" it draws no noise in step.
# So neither needs its generator's state to continue: the seed is spent on the initial latents.
# tests/unit/test_engine_checkpoint.py checks that a whole run leaves the generator untouched.

@dataclass(frozen=True)
class History:
    """A scheduler's memory of the steps it took: what it needs besides the latents to continue."""

    model_outputs: tuple[torch.Tensor, ...] = ()   # oldest first, each [B, C, F, h, w] like the latents
    lower_order_nums: int = 0


def _is_multistep(scheduler: SchedulerMixin) -> bool:
    return isinstance(scheduler, DPMSolverMultistepScheduler)


def history_length(name: str, config: dict[str, Any], steps_done: int) -> int:
    """How many model outputs scheduler ``name`` keeps after ``steps_done`` steps (0 for DDIM)."""
    scheduler = make_scheduler(name, config)
    return min(steps_done, int(scheduler.config.solver_order)) if _is_multistep(scheduler) else 0


def save_history(scheduler: SchedulerMixin, bsz: int = 1) -> History:
    """The scheduler's history, in the latents' layout. No copy: the scheduler replaces its list's
    entries each step and never writes into a tensor it kept, so these stay valid after later steps."""
    if not _is_multistep(scheduler):
        return History()
    kept = tuple(_images_as_frames(output, bsz) for output in scheduler.model_outputs if output is not None)
    return History(kept, int(scheduler.lower_order_nums))


def restore_history(scheduler: SchedulerMixin, steps_done: int, history: History, device: torch.device) -> None:
    """Put a fresh scheduler (``set_timesteps`` already called) where it was after ``steps_done`` steps.

    The multistep solver counts its own steps (``_step_index``, which decides when it lowers its order
    at the end) and keeps its last outputs in ``solver_order`` slots, empty ones first. A run from step
    0 finds its first timestep at index 0 (it is unique in the schedule; a test checks every spacing
    up to 500 steps), so after ``steps_done`` steps the counter is ``steps_done``. Setting it also
    spares the resumed run that lookup, a GPU sync.
    """
    if not _is_multistep(scheduler):
        if history.model_outputs or history.lower_order_nums:
            raise ValueError("a DDIM checkpoint carries no model outputs; this one does, so it was taken "
                             "with another scheduler")
        return
    order = int(scheduler.config.solver_order)
    outputs = [_frames_as_images(output.to(device)) for output in history.model_outputs]
    if len(outputs) > order:
        raise ValueError(f"the checkpoint carries {len(outputs)} model outputs; this scheduler keeps {order}")
    scheduler.model_outputs = [None] * (order - len(outputs)) + outputs
    scheduler.lower_order_nums = history.lower_order_nums
    scheduler._step_index = steps_done
