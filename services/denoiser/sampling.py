"""Schedulers, classifier-free guidance and seeded noise: the math of one request's denoising.

Kept apart from the engine (which only decides what shares a UNet forward) and written out as
diffusers' TextToVideoSDPipeline does it, so the same seed gives the same latents as the pipeline.
"""

from __future__ import annotations

import inspect
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
    bsz, channels, frames, height, width = latents.shape
    flat_latents = latents.permute(0, 2, 1, 3, 4).reshape(bsz * frames, channels, height, width)
    flat_noise = noise_pred.permute(0, 2, 1, 3, 4).reshape(bsz * frames, channels, height, width)
    flat = scheduler.step(flat_noise, timestep, flat_latents, **kwargs).prev_sample
    return flat[None, :].reshape(bsz, frames, channels, height, width).permute(0, 2, 1, 3, 4)
