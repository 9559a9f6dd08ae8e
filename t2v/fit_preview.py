"""``t2v fit-preview MODEL_FOLDER``: fit the model's latent -> RGB map for live previews, and write it into the
folder as vae/latent_rgb.json (services/common/latent_rgb.py says how the denoiser uses it).

How: take latents as the denoiser holds them (multiplied by the VAE's ``scaling_factor``), decode them with the
model's own VAE into frames in [0, 1] as the decoder does, average-pool the frames by the VAE scale factor so
each pixel sits over its latent, and solve ``rgb = weights @ latent + bias`` for the 3 x (C + 1) numbers by
least squares over every latent pixel.

Which latents: ``--source denoise`` (the default) makes a few videos with the model's own text encoder and
denoiser, so the map is fitted where previews are looked at; ``--source random`` draws latents from N(0, 1),
the scale the VAE's scaling_factor gives them, for a model whose weights are random anyway (``t2v make-model``
uses it). Either way the fit is reported: the error in 8-bit levels and how much of each channel it explains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from services.common.latent_rgb import FILE, LatentRgb
from services.common.model_folder import model_part, vae_scale_factor

# Colours, shapes, motions and backgrounds in plain words: a spread of colours for the fit to see. (The embedded
# model, models/t2v-world, draws these; docs/model.md.)
PROMPTS = (
    "a red circle moving right on a black background",
    "a green square moving up on a gray background",
    "a blue triangle sliding to the left on a black background",
    "a yellow square moving up on a gray background",
    "a white box growing on a dark blue background",
    "a purple circle falling on a dark green background",
    "an orange triangle spinning over a dark green background",
    "a red square shrinking on a gray background",
    "a green circle moving left on a dark blue background",
    "a blue square growing on a dark green background",
    "a yellow triangle moving down on a black background",
    "a white circle spinning on a gray background",
)
DEFAULT_SEEDS = 1
DEFAULT_STEPS = 25
DECODE_CHUNK = 8          # frames decoded at once


def pooled_frames(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, factor: int,
                  chunk: int = DECODE_CHUNK) -> torch.Tensor:
    """[N, C, h, w] latents -> [N, 3, h, w] float64: ``decode`` ([n, C, h, w] -> [n, 3, h*f, w*f] in [0, 1])
    average-pooled by ``factor``, so pixel (y, x) is the mean of the decoded pixels over latent (y, x)."""
    pooled = [torch.nn.functional.avg_pool2d(decode(part).double(), factor) for part in latents.split(chunk)]
    return torch.cat(pooled)


def least_squares(latents: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """[N, C, h, w] latents and [N, 3, h, w] RGB -> (weights [3, C], bias [3], report), fitted over every pixel."""
    channels = latents.shape[1]
    x = latents.double().permute(0, 2, 3, 1).reshape(-1, channels)
    y = targets.double().permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution          # [C + 1, 3]
    residual = y - design @ solution
    spread = (y - y.mean(0)).pow(2).sum(0)
    explained = 1 - residual.pow(2).sum(0) / spread.clamp_min(1e-12)
    report = {"pixels": len(x), "rmse_levels": round(float(residual.pow(2).mean().sqrt()) * 255, 2),
              "rmse_levels_rgb": [round(float(v) * 255, 2) for v in residual.pow(2).mean(0).sqrt()],
              "r2_rgb": [round(float(v), 4) for v in explained]}
    return solution[:channels].T.contiguous(), solution[channels], report


def heldout_error(latents: torch.Tensor, targets: torch.Tensor, every: int = 4) -> float:
    """RMSE in 8-bit levels on every ``every``-th frame, of the map fitted on the others (clamped to [0, 1], as the
    denoiser clamps it): what the fit does on latents it has not seen."""
    test = torch.arange(len(latents)) % every == 0
    weights, bias, _ = least_squares(latents[~test], targets[~test])
    x = latents[test].double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = targets[test].double().permute(0, 2, 3, 1).reshape(-1, 3)
    return round(float((y - (x @ weights.T + bias).clamp(0, 1)).pow(2).mean().sqrt()) * 255, 2)


def _frames_of(videos: torch.Tensor) -> torch.Tensor:
    """[V, C, F, h, w] -> [V*F, C, h, w]."""
    v, c, f, h, w = videos.shape
    return videos.permute(0, 2, 1, 3, 4).reshape(v * f, c, h, w)


def random_latents(channels: int, videos: int, frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[videos, C, frames, height, width] from N(0, 1): the scale of the denoiser's (scaled) latents."""
    return torch.randn(videos, channels, frames, height, width, generator=torch.Generator().manual_seed(seed))


def denoised_latents(model: str | Path, device: torch.device, dtype: torch.dtype, prompts: Sequence[str],
                     seeds: int, steps: int, frames: int, size: int = 0, guidance_scale: float = 9.0
                     ) -> torch.Tensor:
    """[len(prompts) * seeds, C, frames, h, w]: the model's own videos' final latents, made by its text encoder
    and the denoiser engine (batched, as the service runs), on ``device``."""
    import json

    from diffusers import UNet3DConditionModel

    from services.denoiser import engine as eng
    from services.text_encoder.encoder import TextEncoder

    encoder = TextEncoder(model, device, dtype)
    unet = UNet3DConditionModel.from_pretrained(model_part(model, "unet"), dtype=dtype)
    unet.to(device).eval().requires_grad_(False)
    scheduler = json.loads((model_part(model, "scheduler") / "scheduler_config.json").read_text())
    engine = eng.DenoiseEngine(unet, scheduler, device, dtype, max_batch=4, vae_scale_factor=vae_scale_factor(model))
    size = size or engine.default_size
    with torch.inference_mode():
        uncond = encoder.encode([""])
        conds = encoder.encode(list(prompts))
    engine.start()
    try:
        jobs = [engine.submit(eng.Request(f"fit-{i}-{seed}", torch.cat([uncond, conds[i:i + 1]]), frames, size, size,
                                          steps, guidance_scale, seed))
                for i in range(len(prompts)) for seed in range(seeds)]
        latents = []
        for job in jobs:
            while not isinstance(event := job.events.get(), (eng.Finished, eng.Failed, eng.Cancelled)):
                pass
            if not isinstance(event, eng.Finished):
                raise RuntimeError(f"denoising {job.request.request_id} did not finish: {event}")
            latents.append(event.latents)
    finally:
        engine.stop(1.0)
    return torch.cat(latents)


def fit_folder(model: str | Path, source: str = "denoise", device: str = "cpu", dtype: str = "float32",
               prompts: Sequence[str] = PROMPTS, seeds: int = DEFAULT_SEEDS, steps: int = DEFAULT_STEPS,
               frames: int = 16, seed: int = 0, write: bool = True) -> LatentRgb:
    """Fit the folder's latent -> RGB map (see the module's words) and, with ``write``, save it there."""
    from diffusers import AutoencoderKL

    from services.common.model_folder import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    vae = AutoencoderKL.from_pretrained(model_part(model, "vae"), dtype=torch_dtype)
    vae.to(torch_device).eval().requires_grad_(False)
    factor = vae_scale_factor(model)
    scaling = float(vae.config.scaling_factor)
    channels = int(vae.config.latent_channels)
    if source == "denoise":
        videos = denoised_latents(model, torch_device, torch_dtype, prompts, seeds, steps, frames)
        about = {"source": "denoise", "videos": len(videos), "prompts": len(prompts), "seeds": seeds, "steps": steps}
    elif source == "random":
        side = max(1, math.ceil(64 / factor))          # 64 x 64 pixels a frame: cheap even for the 1.7B VAE
        videos = random_latents(channels, 4, 4, side, side, seed)
        about = {"source": "random", "videos": len(videos), "distribution": "N(0, 1)"}
    else:
        raise ValueError(f"source {source!r} is unknown; use denoise or random")
    latents = _frames_of(videos.float().cpu())

    @torch.inference_mode()
    def decode(part: torch.Tensor) -> torch.Tensor:
        images = vae.decode(part.to(torch_device, torch_dtype) / scaling).sample      # as the decoder divides
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    targets = pooled_frames(decode, latents, factor)
    weights, bias, report = least_squares(latents, targets)
    report["heldout_rmse_levels"] = heldout_error(latents, targets)
    latent_rgb = LatentRgb(tuple(tuple(round(float(v), 6) for v in row) for row in weights),
                           tuple(round(float(v), 6) for v in bias), scaling, {**about, **report})   # type: ignore[arg-type]
    if write:
        latent_rgb.save(model)
    return latent_rgb


def main(args: Any) -> int:
    if not args.dry_run:
        LatentRgb.check_writable(args.model)
    latent_rgb = fit_folder(args.model, source=args.source, device=args.device, dtype=args.dtype, seeds=args.seeds,
                            steps=args.steps, frames=args.frames, write=not args.dry_run)
    fit = latent_rgb.fit
    print(f"fitted on {fit['pixels']} latent pixels ({fit['source']}, {fit['videos']} videos): error "
          f"{fit['rmse_levels']} levels of 255 (R, G, B {fit['rmse_levels_rgb']}), explains R, G, B "
          f"{fit['r2_rgb']}; on frames left out of the fit {fit['heldout_rmse_levels']} levels")
    if not args.dry_run:
        print(Path(args.model) / FILE)
    return 0
