"""The pure parts of t2v.train.train: the VAE's foreground weighting, SNR loss weights, EMA, atomic saves,
the latent bank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2v.train import checker, world

train = pytest.importorskip("t2v.train.train")
CPU = torch.device("cpu")


def clips(count: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([torch.from_numpy(world.sample(rng)[1]) for _ in range(count)])


def test_foreground_weight_marks_the_shape_and_nothing_else() -> None:
    frames = clips(4)
    weight = train.foreground_weight(train.to_pixels(frames, CPU), extra=4.0)
    assert set(torch.unique(weight).tolist()) == {1.0, 5.0}
    truth = np.stack([checker.foreground_masks(f.numpy(), checker.background_colour(f.numpy())) for f in frames])
    marked = (weight[:, 0] > 1).numpy().reshape(truth.shape)
    assert (marked == truth).mean() > 0.99
    assert 0.01 < marked.mean() < 0.2          # a shape, not the frame


def test_snr_loss_weights_cap_the_low_noise_steps_and_lift_the_high_noise_ones() -> None:
    alphas = torch.linspace(0.999, 0.001, 1000, dtype=torch.float64)
    snr = alphas / (1 - alphas)
    weights = train.snr_loss_weights(alphas, gamma=5.0, floor=1.0)
    # As a loss on the clean latents (the epsilon loss times SNR), every step weighs clamp(SNR, 1, 5).
    assert torch.allclose(weights * snr, snr.clamp(1.0, 5.0))
    assert torch.allclose(weights[snr > 5], 5.0 / snr[snr > 5])            # Min-SNR's cap
    assert torch.allclose(weights[snr < 1], 1.0 / snr[snr < 1])            # the floor: 1/SNR, up to ~1000 here
    assert torch.all(weights[(snr >= 1) & (snr <= 5)] == 1.0)
    only_cap = train.snr_loss_weights(alphas, gamma=5.0, floor=0.0)        # runs 1-6
    assert torch.all(only_cap <= 1.0) and torch.allclose(only_cap[snr <= 5], torch.ones_like(snr[snr <= 5]))
    assert torch.allclose(train.snr_loss_weights(alphas, 0.0, 0.0), torch.ones_like(alphas))
    # v-prediction: the same clean-latent weights for the v loss (which weighs them SNR + 1), finite at SNR 0.
    zero_snr = torch.cat([alphas[:-1], torch.zeros(1, dtype=alphas.dtype)])
    snr0 = zero_snr / (1 - zero_snr)
    v_weights = train.snr_loss_weights(zero_snr, gamma=5.0, floor=1.0, prediction="v_prediction")
    assert torch.isfinite(v_weights).all() and v_weights[-1] == 1.0
    assert torch.allclose(v_weights * (snr0 + 1), snr0.clamp(1.0, 5.0))
    with pytest.raises(ValueError):
        train.snr_loss_weights(alphas, 5.0, 1.0, prediction="sample")


def test_training_targets_are_diffusers_epsilon_and_velocity() -> None:
    from diffusers import DDPMScheduler

    from t2v.modelgen import ZERO_TERMINAL_SNR_CONFIG

    scheduler = DDPMScheduler.from_config(ZERO_TERMINAL_SNR_CONFIG)
    assert scheduler.alphas_cumprod[-1] == 0                     # no signal left at the last step
    latents, noise = torch.randn(3, 4, 2, 8, 8), torch.randn(3, 4, 2, 8, 8)
    t = torch.tensor([0, 500, 999])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    assert torch.equal(train.training_target("epsilon", latents, noise, a), noise)
    v = train.training_target("v_prediction", latents, noise, a)
    assert torch.allclose(v, scheduler.get_velocity(latents, noise, t), atol=1e-6)
    assert torch.allclose(v[2], -latents[2])                    # at zero SNR, v is minus the clean latents
    with pytest.raises(ValueError):
        train.training_target("sample", latents, noise, a)


def test_ema_copies_the_average_into_copies_of_the_modules_in_order() -> None:
    import copy

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(3, 1)
    ema = train.Ema([a, b], decay=0.5)
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            p.add_(1.0)
    ema.update(step=10**6)                                   # decay 0.5: halfway to the new weights
    ca, cb = copy.deepcopy(a), copy.deepcopy(b)
    ema.copy_to([ca, cb])
    assert torch.allclose(ca.weight, a.weight - 0.5) and torch.allclose(cb.bias, b.bias - 0.5)
    with pytest.raises(ValueError):
        ema.copy_to([cb, ca][:1])


def test_save_atomically_swaps_a_whole_model_folder_in(tmp_path) -> None:
    from t2v import modelgen

    modules: dict[str, torch.nn.Module] = {}
    modelgen._build(modelgen.PRESETS["tiny"], lambda module, folder: modules.__setitem__(folder, module))
    out = tmp_path / "run"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "stale.txt").write_text("from the last checkpoint")
    train.save_atomically(out, modules, modelgen.DEFAULT_TOKENIZER, "float16", {"unet_steps": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]            # no .new / .old left
    assert not (out / "unet" / "stale.txt").exists()
    assert json.loads((out / "training.json").read_text()) == {"unet_steps": 7}
    assert (out / "unet" / "config.json").is_file() and (out / "model_index.json").is_file()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=world.SIZE).eval()


def stream(batch: int, frames: int = 2):
    """Batches of (frames, ids) as the DataLoader gives them; ids number the clips 0, 1, 2, ..."""
    count = 0
    while True:
        video = clips(batch, seed=count)[:, :frames]
        ids = torch.arange(count, count + batch)[:, None].repeat(1, 77)
        count += batch
        yield video, ids


def test_latent_bank_fills_draws_and_replaces_the_oldest_clips() -> None:
    empty = torch.full((77,), -1)
    bank = train.LatentBank(6, tiny_vae(), stream(4), CPU, empty, cfg_drop=0.0)
    assert bank.filled == 6 and bank.mean.shape == (6, 4, 2, world.SIZE // 8, world.SIZE // 8)
    assert bank.ids[:, 0].tolist() == [6, 7, 2, 3, 4, 5]             # clips 6 and 7 wrapped over 0 and 1
    bank.refresh()                                                   # the next four overwrite the four oldest
    assert bank.ids[:, 0].tolist() == [6, 7, 8, 9, 10, 11]
    latents, ids = bank.draw(32, scaling=0.5)
    assert latents.shape == (32, 4, 2, world.SIZE // 8, world.SIZE // 8) and latents.dtype == torch.float32
    assert set(ids[:, 0].tolist()) <= set(range(6, 12))


def test_latent_bank_draws_sample_the_distribution_and_drop_captions() -> None:
    empty = torch.full((77,), -1)
    bank = train.LatentBank(4, tiny_vae(), stream(4), CPU, empty, cfg_drop=1.0)
    latents, ids = bank.draw(8, scaling=1.0)
    assert torch.all(ids == -1)                                     # every caption dropped to ""
    again, _ = bank.draw(8, scaling=1.0)
    assert not torch.equal(latents, again)                          # a fresh sample of the posterior each draw
    bank.std.zero_()
    index_free, _ = bank.draw(64, scaling=2.0)
    means = {tuple((2.0 * m.float()).flatten()[:4].tolist()) for m in bank.mean}
    assert {tuple(x.flatten()[:4].tolist()) for x in index_free} <= means


def test_vae_ceiling_judges_the_embedded_vae(capsys: pytest.CaptureFixture[str]) -> None:
    from t2v.train import vae_ceiling

    assert vae_ceiling.main(["--clips", "3", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[vae] reconstructions of held-out clips: colour ")
    figures = dict(zip(line.split()[5::2], map(float, line.split()[6::2])))
    assert set(figures) == {"colour", "shape", "motion", "all"} and all(0 <= v <= 1 for v in figures.values())


def test_direction_probe_reverses_the_noise_in_time_and_judges_every_video(capsys: pytest.CaptureFixture[str]) -> None:
    from t2v.train import direction_probe

    x = torch.randn(2, 4, 16, 8, 8)                     # [N, C, F, h, w], as the sampler starts
    reversed_ = direction_probe.TRANSFORMS["time-reversed"](x)
    assert torch.equal(reversed_[:, :, 0], x[:, :, -1]) and torch.equal(reversed_[:, :, -1], x[:, :, 0])
    assert torch.equal(direction_probe.TRANSFORMS["upside-down"](x)[..., 0, :], x[..., -1, :])
    assert torch.equal(direction_probe.TRANSFORMS["mirrored"](x)[..., 0], x[..., -1])

    assert direction_probe.main(["--colours", "red", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["as", "time-reversed", "upside-down", "mirrored"]
    for line in lines[:4]:
        verdicts = line.split(": ")[1].split()
        assert len(verdicts) == 4 and set(verdicts) <= set(world.MOTIONS) | {"still", "none"}
    assert lines[-1].startswith("reversing the noise in time changed the direction in ") and lines[-1].endswith(" of 4 videos")
