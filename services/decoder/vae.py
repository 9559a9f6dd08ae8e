"""AutoencoderKL: latents -> float frames in [0, 1]. Knows nothing of gRPC or video files.

The math is diffusers' TextToVideoSDPipeline.decode_latents + postprocess_video, so the frames
equal the pipeline's. Frames are decoded ``chunk_size`` at a time, so a long video fits in memory,
and on a GPU chunk k+1 is decoding while the caller encodes chunk k to MP4 on the CPU.

With ``batch_pixels``, the chunks of calls decoding at once share VAE forwards (services/common/call_batcher.py):
the 16 videos that finish at one denoising step took 1.09 s on an H200 as 64 forwards of 4 frames, one
call after another, and 0.66 s as 4 forwards of 64 frames (docs/benchmarks.md, run H). A call alone still
runs its own chunks at once, so its MP4 encoding overlaps its next chunk as before. The VAE decodes each
frame on its own (GroupNorm and attention are per image), so a frame does not depend on what shares its
forward.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from diffusers import AutoencoderKL

from services.common.call_batcher import CallBatcher
from services.common.logs import kv
from services.common.model_folder import model_part, vae_scale_factor

log = logging.getLogger("decoder")


def to_frames(images: torch.Tensor) -> torch.Tensor:
    """The VAE's [N, 3, H, W] output in [-1, 1] -> [N, H, W, 3] float32 frames in [0, 1]."""
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] (on the CPU) -> uint8, rounded: the pixels the MP4 is made of."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@dataclass
class DecodeTiming:
    """GPU (or, on the CPU, wall) seconds the VAE spent, summed over chunks (a shared forward's time split
    among its chunks by their frames)."""

    vae_seconds: float = 0.0
    waited_seconds: float = 0.0                 # wall time the caller was blocked on its chunks (queue included)


@dataclass(frozen=True)
class DecodedChunk:
    """One chunk's frames on the CPU ([n, H, W, 3] float32; on a GPU still being copied until ``done``)
    and its share of the forward's time."""

    frames: torch.Tensor
    share: float                                # this chunk's frames / the forward's frames
    start: torch.cuda.Event | None = None       # around the forward on a GPU; None on the CPU
    done: torch.cuda.Event | None = None
    cpu_seconds: float = 0.0                    # the forward's wall time on the CPU

    def collect(self, timing: DecodeTiming) -> torch.Tensor:
        """Wait until the frames are on the CPU; add this chunk's share of the forward's time to ``timing``."""
        if self.done is None:
            timing.vae_seconds += self.cpu_seconds * self.share
        else:
            self.done.synchronize()
            timing.vae_seconds += self.start.elapsed_time(self.done) / 1e3 * self.share
        # A view into a shared forward's output would keep all of it (pinned memory on a GPU) alive for as
        # long as this caller holds its chunk (return_frames holds them all): a copy of its own frames.
        return self.frames if self.share == 1 else self.frames.clone()


class VaeDecoder:
    def __init__(self, model: str | Path, device: torch.device, dtype: torch.dtype, chunk_size: int = 8,
                 batch_pixels: int = 0, on_batch: Callable[[int], None] | None = None) -> None:
        """``batch_pixels`` > 0: the chunks of calls decoding at once share forwards of up to that many output
        pixels (a larger chunk alone); ``on_batch(frames)`` hears of each shared forward. 0: each call runs
        its own forwards."""
        self.vae = AutoencoderKL.from_pretrained(model_part(model, "vae"), dtype=dtype)
        self.vae.to(device).eval().requires_grad_(False)
        self.device, self.dtype, self.chunk_size = device, dtype, chunk_size
        # Pixels per latent along a side, read as the denoiser and the gateway read it.
        self.scale_factor = vae_scale_factor(model)
        self._on_batch = on_batch
        self._previous_done: torch.cuda.Event | None = None      # the batcher thread's last forward
        self._batcher: CallBatcher[torch.Tensor, DecodedChunk] | None = None
        if batch_pixels > 0:
            self._batcher = CallBatcher(
                self._batched_forward, batch_pixels, self._pixels, kind=lambda chunk: tuple(chunk.shape[1:]),
                name="vae-batcher", failure="the VAE failed",
                stopping="the decoder is stopping; send the call to another replica", log=log)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def waiting(self) -> int:
        """Chunks waiting for a shared forward (0 without a batcher)."""
        return self._batcher.waiting() if self._batcher is not None else 0

    def close(self, timeout: float = 10.0) -> None:
        """Finish the chunks already waiting for a shared forward, then stop its thread."""
        if self._batcher is not None:
            self._batcher.close(timeout)

    def _pixels(self, chunk: torch.Tensor) -> int:
        return int(chunk.shape[0] * chunk.shape[2] * chunk.shape[3]) * self.scale_factor ** 2

    def _frames(self, chunk: torch.Tensor) -> torch.Tensor:
        return to_frames(self.vae.decode(chunk).sample)

    @torch.inference_mode()
    def _forward(self, chunks: list[torch.Tensor]) -> list[DecodedChunk]:
        """One VAE forward for ``chunks`` (scaled latents of one shape): each chunk's frames. On CUDA it
        returns once the work is queued; the frames are copied to pinned memory asynchronously."""
        latents = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        total = latents.shape[0]
        if self.device.type != "cuda":
            started = time.perf_counter()
            frames = self._frames(latents).contiguous()
            seconds = time.perf_counter() - started
            start = done = None
        else:
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = self._frames(latents)
            frames = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
            frames.copy_(result, non_blocking=True)
            done.record()
            seconds = 0.0
        decoded, at = [], 0
        for chunk in chunks:
            n = chunk.shape[0]
            decoded.append(DecodedChunk(frames[at:at + n], n / total, start, done, seconds))
            at += n
        return decoded

    def _batched_forward(self, chunks: list[torch.Tensor]) -> list[DecodedChunk]:
        """``_forward`` on the batcher's thread. It then waits for the forward before this one, so at most
        two are queued on the GPU and the chunks that arrive meanwhile gather for the next."""
        decoded = self._forward(chunks)
        previous, self._previous_done = self._previous_done, decoded[0].done
        if previous is not None:
            previous.synchronize()
        if self._on_batch is not None:
            try:
                self._on_batch(sum(c.shape[0] for c in chunks))
            except Exception as error:  # noqa: BLE001 - a metric must not stop the decoder
                log.warning(kv("vae_batch_metrics_failed", error=f"{type(error).__name__}: {error}"[:300]))
        return decoded

    @staticmethod
    def _wait(pending: Future, alive: Callable[[], bool]) -> "DecodedChunk":
        """The chunk's result; CancelledError as soon as ``alive`` turns False (the batcher drops a waiting
        chunk only when it forms its next forward, which may be a long forward away)."""
        while True:
            try:
                return pending.result(timeout=0.05)
            except FutureTimeout:
                if not alive():
                    pending.cancel()
                    raise CancelledError() from None

    def _launch(self, chunk: torch.Tensor, alive: Callable[[], bool]) -> Future:
        if self._batcher is not None:
            return self._batcher.submit(chunk, alive)
        launched: Future = Future()
        launched.set_result(self._forward([chunk])[0])
        return launched

    @torch.inference_mode()
    def iter_decode(self, latents: torch.Tensor, timing: DecodeTiming | None = None,
                    alive: Callable[[], bool] = lambda: True) -> Iterator[torch.Tensor]:
        """[1, C, F, h, w] latents -> chunks of [n, H, W, 3] float32 CPU frames in [0, 1], in order.

        Two chunks are in flight at a time: the next one is queued (or, with a batcher, waits for a
        forward) before the previous one is handed out, so the caller's CPU work overlaps the GPU's.
        ``alive`` False (the caller gone) takes the chunks still waiting for a shared forward out; the
        iterator then raises CancelledError."""
        timing = timing if timing is not None else DecodeTiming()
        latents = 1 / self.vae.config.scaling_factor * latents.to(self.device, self.dtype)
        batch, channels, frames, height, width = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        chunks = list(flat.split(self.chunk_size))
        in_flight = [self._launch(chunk, alive) for chunk in chunks[:2]]
        try:
            for k in range(len(chunks)):
                asked = time.perf_counter()
                decoded = self._wait(in_flight.pop(0), alive)
                if k + 2 < len(chunks):
                    in_flight.append(self._launch(chunks[k + 2], alive))
                frames = decoded.collect(timing)
                timing.waited_seconds += time.perf_counter() - asked
                yield frames
        finally:
            for pending in in_flight:            # a caller that stopped early: nothing decoded for nobody
                pending.cancel()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, F, h, w] latents -> [F, H, W, 3] float32 frames in [0, 1], on the CPU."""
        return torch.cat(list(self.iter_decode(latents)))
