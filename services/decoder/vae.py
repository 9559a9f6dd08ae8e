"""AutoencoderKL: latents -> float frames in [0, 1]. Knows nothing of gRPC or video files.

The math is diffusers' TextToVideoSDPipeline.decode_latents + postprocess_video, so the frames
equal the pipeline's; frames are decoded ``chunk_size`` at a time so a long video fits in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from services.common.model_folder import model_part


class VaeDecoder:
    def __init__(self, model: str | Path, device: torch.device, dtype: torch.dtype, chunk_size: int = 8) -> None:
        self.vae = AutoencoderKL.from_pretrained(model_part(model, "vae"), dtype=dtype)
        self.vae.to(device).eval().requires_grad_(False)
        self.device, self.dtype, self.chunk_size = device, dtype, chunk_size

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, F, h, w] latents -> [F, H, W, 3] float32 frames in [0, 1], on the CPU."""
        latents = 1 / self.vae.config.scaling_factor * latents.to(self.device, self.dtype)
        batch, channels, frames, height, width = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        images = torch.cat([self.vae.decode(chunk).sample for chunk in flat.split(self.chunk_size)])
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return images.permute(0, 2, 3, 1).to("cpu")
