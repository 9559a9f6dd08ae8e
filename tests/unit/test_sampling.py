"""services.denoiser.sampling: schedulers, seeded noise, guidance and the 5-D scheduler step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from services.common.contract import SCHEDULERS
from services.denoiser.sampling import apply_guidance, initial_latents, make_scheduler, scheduler_step, step_kwargs

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
SHAPE = (1, 4, 3, 8, 8)  # [B, C, F, h, w]


@pytest.fixture(scope="module")
def scheduler_config() -> dict:
    path = REPO_ROOT / "models" / "t2v-world" / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text())


def test_make_scheduler_ddim(scheduler_config: dict) -> None:
    scheduler = make_scheduler("ddim", scheduler_config)
    assert isinstance(scheduler, DDIMScheduler)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.steps_offset == 1
    assert scheduler.config.set_alpha_to_one is False


def test_make_scheduler_dpmsolver(scheduler_config: dict) -> None:
    scheduler = make_scheduler("dpmsolver++", scheduler_config)
    assert isinstance(scheduler, DPMSolverMultistepScheduler)
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.beta_schedule == "scaled_linear"


def test_make_scheduler_returns_a_fresh_instance(scheduler_config: dict) -> None:
    a = make_scheduler("dpmsolver++", scheduler_config)
    b = make_scheduler("dpmsolver++", scheduler_config)
    assert a is not b
    a.set_timesteps(5)
    b.set_timesteps(20)
    assert len(a.timesteps) == 5 and len(b.timesteps) == 20


def test_every_contract_scheduler_can_be_made(scheduler_config: dict) -> None:
    for name in SCHEDULERS:
        make_scheduler(name, scheduler_config)


@pytest.mark.parametrize("name", ["euler", "DDIM", ""])
def test_make_scheduler_refuses_unknown_names(scheduler_config: dict, name: str) -> None:
    with pytest.raises(ValueError) as info:
        make_scheduler(name, scheduler_config)
    message = str(info.value)
    assert repr(name) in message
    for choice in SCHEDULERS:
        assert choice in message


def test_initial_latents_same_seed_same_noise() -> None:
    a, gen_a = initial_latents(SHAPE, 42, CPU, torch.float32, 1.0)
    b, _ = initial_latents(SHAPE, 42, CPU, torch.float32, 1.0)
    assert a.shape == SHAPE and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert isinstance(gen_a, torch.Generator)
    assert a.std().item() > 0.5  # real noise, not zeros


def test_initial_latents_different_seed_different_noise() -> None:
    a, _ = initial_latents(SHAPE, 42, CPU, torch.float32, 1.0)
    b, _ = initial_latents(SHAPE, 43, CPU, torch.float32, 1.0)
    assert not torch.equal(a, b)


def test_initial_latents_match_a_cpu_generator_and_scale_by_sigma() -> None:
    expected = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(7))
    scaled, _ = initial_latents(SHAPE, 7, CPU, torch.float32, 2.5)
    torch.testing.assert_close(scaled, expected * 2.5, rtol=0, atol=0)


def test_initial_latents_do_not_depend_on_global_rng() -> None:
    torch.manual_seed(1)
    a, _ = initial_latents(SHAPE, 5, CPU, torch.float32, 1.0)
    torch.manual_seed(2)
    torch.randn(100)
    b, _ = initial_latents(SHAPE, 5, CPU, torch.float32, 1.0)
    assert torch.equal(a, b)


def test_initial_latents_dtype() -> None:
    latents, _ = initial_latents(SHAPE, 0, CPU, torch.bfloat16, 1.0)
    assert latents.dtype == torch.bfloat16


def test_apply_guidance_scale_one_returns_cond() -> None:
    generator = torch.Generator().manual_seed(0)
    uncond = torch.randn(SHAPE, generator=generator)
    cond = torch.randn(SHAPE, generator=generator)
    guided = apply_guidance(torch.cat([uncond, cond]), 1.0)
    assert guided.shape == SHAPE
    torch.testing.assert_close(guided, cond)


def test_apply_guidance_formula() -> None:
    uncond = torch.full(SHAPE, 1.0)
    cond = torch.full(SHAPE, 3.0)
    torch.testing.assert_close(apply_guidance(torch.cat([uncond, cond]), 0.0), uncond)
    torch.testing.assert_close(apply_guidance(torch.cat([uncond, cond]), 9.0), torch.full(SHAPE, 19.0))


def test_apply_guidance_pairs_by_halves_for_a_batch() -> None:
    # Batch of 2 requests: [uncond_0, uncond_1, cond_0, cond_1].
    uncond = torch.stack([torch.zeros(SHAPE[1:]), torch.ones(SHAPE[1:])])
    cond = torch.stack([torch.full(SHAPE[1:], 2.0), torch.full(SHAPE[1:], 5.0)])
    guided = apply_guidance(torch.cat([uncond, cond]), 2.0)
    torch.testing.assert_close(guided, torch.stack([torch.full(SHAPE[1:], 4.0), torch.full(SHAPE[1:], 9.0)]))


def test_step_kwargs(scheduler_config: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    ddim = step_kwargs(make_scheduler("ddim", scheduler_config), generator, eta=0.3)
    assert ddim["eta"] == 0.3 and ddim["generator"] is generator
    dpm = step_kwargs(make_scheduler("dpmsolver++", scheduler_config), generator)
    assert "eta" not in dpm


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("shape", [SHAPE, (2, 4, 5, 4, 6)])
def test_scheduler_step_keeps_the_5d_shape(scheduler_config: dict, name: str, shape: tuple[int, ...]) -> None:
    scheduler = make_scheduler(name, scheduler_config)
    scheduler.set_timesteps(3)
    latents, generator = initial_latents(shape, 0, CPU, torch.float32, scheduler.init_noise_sigma)
    kwargs = step_kwargs(scheduler, generator)
    for timestep in scheduler.timesteps:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(timestep)))
        latents = scheduler_step(scheduler, noise, timestep, latents, kwargs)
        assert latents.shape == shape
        assert torch.isfinite(latents).all()


def test_scheduler_step_treats_frames_as_images(scheduler_config: dict) -> None:
    """Each (batch, frame) slice must be stepped as its own image, with channels kept in place."""
    shape = (2, 4, 3, 4, 4)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    scheduler = make_scheduler("ddim", scheduler_config)
    scheduler.set_timesteps(10)
    timestep = scheduler.timesteps[0]
    out = scheduler_step(scheduler, noise, timestep, latents, {"eta": 0.0})

    reference = make_scheduler("ddim", scheduler_config)
    reference.set_timesteps(10)
    for b in range(shape[0]):
        for f in range(shape[2]):
            expected = reference.step(noise[b:b + 1, :, f], timestep, latents[b:b + 1, :, f], eta=0.0).prev_sample
            torch.testing.assert_close(out[b:b + 1, :, f], expected)
