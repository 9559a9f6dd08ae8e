"""AutoencoderKL: latents -> float frames in [0, 1]. Knows nothing of gRPC or video files.

The math is diffusers' TextToVideoSDPipeline.decode_latents + postprocess_video, so the frames
equal the pipeline's. Frames are decoded ``chunk_size`` at a time, so a long video fits in memory,
and on a GPU chunk k+1 is decoding while the caller encodes chunk k to MP4 on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKL

from services.common.model_folder import model_part, vae_scale_factor


def to_frames(images: torch.Tensor) -> torch.Tensor:
    """The VAE's [N, 3, H, W] output in [-1, 1] -> [N, H, W, 3] float32 frames in [0, 1]."""
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] (on the CPU) -> uint8, rounded: the pixels the MP4 is made of."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@dataclass
class DecodeTiming:
    """GPU (or, on the CPU, wall) seconds the VAE spent, summed over chunks."""

    vae_seconds: float = 0.0


class VaeDecoder:
    def __init__(self, model: str | Path, device: torch.device, dtype: torch.dtype, chunk_size: int = 8) -> None:
        self.vae = AutoencoderKL.from_pretrained(model_part(model, "vae"), dtype=dtype)
        self.vae.to(device).eval().requires_grad_(False)
        self.device, self.dtype, self.chunk_size = device, dtype, chunk_size
        # Pixels per latent along a side, read as the denoiser and the gateway read it.
        self.scale_factor = vae_scale_factor(model)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def _frames(self, chunk: torch.Tensor) -> torch.Tensor:
        return to_frames(self.vae.decode(chunk).sample)

    @torch.inference_mode()
    def iter_decode(self, latents: torch.Tensor, timing: DecodeTiming | None = None) -> Iterator[torch.Tensor]:
        """[1, C, F, h, w] latents -> chunks of [n, H, W, 3] float32 CPU frames in [0, 1], in order.

        On CUDA each chunk is copied to pinned memory asynchronously and the next chunk is queued
        before the previous one is handed out, so the caller's CPU work overlaps the GPU's.
        """
        timing = timing if timing is not None else DecodeTiming()
        latents = 1 / self.vae.config.scaling_factor * latents.to(self.device, self.dtype)
        batch, channels, frames, height, width = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        pending = None
        for chunk in flat.split(self.chunk_size):
            if self.device.type != "cuda":
                started = time.perf_counter()
                host = self._frames(chunk).contiguous()
                timing.vae_seconds += time.perf_counter() - started
                yield host
                continue
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = self._frames(chunk)
            host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
            host.copy_(result, non_blocking=True)
            done.record()
            if pending is not None:
                yield self._collect(pending, timing)
            pending = (host, start, done)
        if pending is not None:
            yield self._collect(pending, timing)

    @staticmethod
    def _collect(pending: tuple, timing: DecodeTiming) -> torch.Tensor:
        host, start, done = pending
        done.synchronize()
        timing.vae_seconds += start.elapsed_time(done) / 1e3
        return host

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, F, h, w] latents -> [F, H, W, 3] float32 frames in [0, 1], on the CPU."""
        return torch.cat(list(self.iter_decode(latents)))
