"""Decoder gRPC servicer: checks latents, decodes them with the VAE, encodes the MP4."""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Iterator, Sequence

import grpc
import numpy as np
import torch

from services.common.config import ModelConfig, parse_config, setting
from services.common.errors import Cancelled, DeadlineExceeded, InvalidArgument, grpc_errors
from services.common.logs import kv
from services.common.model_folder import resolve_device, resolve_dtype
from services.common.server import ReadyGate, run_stage
from services.common.tracing import Tracing
from services.common.tensors import check_finite, from_proto, to_proto
from services.decoder.encode_threads import EncodeThreads
from services.decoder.metrics import DecoderMetrics
from services.decoder.vae import DecodeTiming, VaeDecoder, to_uint8
from services.decoder.video import check_x264_settings, encode_mp4
from t2v.v1 import decoder_pb2, decoder_pb2_grpc

SERVICE_NAME = "t2v.v1.Decoder"
log = logging.getLogger("decoder")


@dataclass(frozen=True)
class DecoderConfig(ModelConfig):
    port: int = setting(50053, "port to listen on (0 = any free port)")
    chunk_size: int = setting(4, "frames decoded by the VAE at a time; each chunk is encoded to MP4 on the CPU "
                                 "while the GPU decodes the next, so only the last chunk's encoding adds to a "
                                 "call's time (with 16 frames, 4 of them); lower it if a long video runs out of memory")
    batch_megapixels: float = setting(4.2, "output megapixels one VAE forward decodes for the calls decoding at "
                                           "once, their chunks together (4.2: 64 frames of 256x256); a call alone "
                                           "still runs its own chunks at once; 0 = each call its own forwards")
    crf: int = setting(18, "H.264 quality, 0 (lossless) to 51 (worst)")
    x264_preset: str = setting("veryfast", "x264 speed/size trade-off: ultrafast ... veryslow (veryfast: ~2x "
                                           "faster than medium, files ~10% larger)")
    x264_tune: str = setting("zerolatency", "x264 tune ('' = x264's default); zerolatency encodes each frame as "
                                            "it arrives (no lookahead, no B-frames), so the encoding overlaps the "
                                            "VAE instead of waiting for the end; files are larger at the same crf")
    x264_threads: int = setting(0, "x264 threads a video, 0 to 64; 0 = by load: the decoder's cores (its CPU limit "
                                   "included) divided by the calls in it, at least 1, which x264 clips to what the "
                                   "frame allows (4 for 256x256): a call alone gets x264's own choice, 16 videos "
                                   "at once on 16 cores 1 thread each (docs/benchmarks.md run I)")
    torch_threads: int = setting(0, "threads for torch's CPU work, 0 to 256 (set, it wins over OMP_NUM_THREADS); "
                                    "0 = 1 on a GPU (there that work is the NaN check and the frames' conversion to "
                                    "bytes, and OpenMP's idle threads spin after each step: a 16-core H200 host's "
                                    "team burned 1.1-1.4 CPU seconds a video, docs/benchmarks.md run K), torch's "
                                    "own choice on the CPU (where the VAE runs on them)")
    max_frames: int = setting(256, "most frames accepted in one video")
    max_fps: int = setting(60, "highest frame rate accepted")
    max_size: int = setting(1024, "largest height or width of a video accepted, in pixels")


MAX_BATCH_MEGAPIXELS = 1024.0
MAX_X264_THREADS = 64
MAX_TORCH_THREADS = 256


def torch_threads_for(setting: int, device: torch.device) -> int:
    """The threads to give torch's CPU work (0 = leave torch's default): ``--torch-threads``, or by device."""
    return setting or (1 if device.type == "cuda" else 0)


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, config: DecoderConfig) -> None:
        if not 0 <= config.x264_threads <= MAX_X264_THREADS:
            raise ValueError(f"--x264-threads is {config.x264_threads}; it must be 0 (by load) to "
                             f"{MAX_X264_THREADS}")
        if not 0 <= config.torch_threads <= MAX_TORCH_THREADS:
            raise ValueError(f"--torch-threads is {config.torch_threads}; it must be 0 (by device) to "
                             f"{MAX_TORCH_THREADS}")
        if not 0 <= config.batch_megapixels <= MAX_BATCH_MEGAPIXELS:
            raise ValueError(f"--batch-megapixels is {config.batch_megapixels}; it must be 0 (off) to "
                             f"{MAX_BATCH_MEGAPIXELS:g}")
        self.config = config
        self.gate = ReadyGate("decoder")
        self.metrics = DecoderMetrics()
        self.tracing = Tracing.for_service("t2v-decoder", config.otlp_endpoint)   # off unless an endpoint is set
        self.vae: VaeDecoder | None = None
        self.encode_threads = EncodeThreads(config.x264_threads)

    def load(self) -> None:
        check_x264_settings(self.config.crf, self.config.x264_preset, self.config.x264_tune)   # a typo stops the start
        device = resolve_device(self.config.device)
        if threads := torch_threads_for(self.config.torch_threads, device):
            torch.set_num_threads(threads)
        self.vae = VaeDecoder(self.config.model, device, resolve_dtype(self.config.dtype, device),
                              chunk_size=self.config.chunk_size,
                              batch_pixels=round(self.config.batch_megapixels * 1e6), on_batch=self.metrics.batched)

    def close(self, timeout: float) -> None:
        if self.vae is not None:
            self.vae.close(timeout)

    @grpc_errors
    def Decode(self, request: decoder_pb2.DecodeRequest, context: grpc.ServicerContext
               ) -> decoder_pb2.DecodeResponse:
        self.gate.check()
        assert self.vae is not None
        if not 1 <= request.fps <= self.config.max_fps:
            raise InvalidArgument(f"fps is {request.fps}; it must be between 1 and {self.config.max_fps}")
        latents = from_proto(request.latents, "latents")
        channels = self.vae.latent_channels
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != channels:
            raise InvalidArgument(f"latents have shape {list(latents.shape)}; expected [1, {channels}, frames, "
                                  f"height/{self.vae.scale_factor}, width/{self.vae.scale_factor}]")
        if latents.shape[2] > self.config.max_frames:
            raise InvalidArgument(f"latents hold {latents.shape[2]} frames; at most {self.config.max_frames}")
        # Unchecked, a [1, C, 1, 1, 4M] tensor (16 MiB) would ask the VAE for a 32-megapixel frame.
        height, width = (latents.shape[3] * self.vae.scale_factor, latents.shape[4] * self.vae.scale_factor)
        if max(height, width) > self.config.max_size:
            raise InvalidArgument(f"latents of shape {list(latents.shape)} make {width}x{height} frames; at most "
                                  f"{self.config.max_size} pixels a side are accepted")
        check_finite(latents, "latents")
        started = time.perf_counter()
        timing, kept, count = DecodeTiming(), [], 0

        def chunks() -> Iterator[np.ndarray]:
            nonlocal count
            for frames in self.vae.iter_decode(latents, timing, alive=context.is_active):
                if not torch.isfinite(frames).all():    # else to_uint8 makes them a silently broken video
                    raise InvalidArgument(f"decoding gave NaN or Inf pixels: the latents' values (up to "
                                          f"{float(latents.abs().max()):.3g}) are far outside what this VAE "
                                          "decodes; check the denoiser's output (a huge guidance_scale makes such "
                                          "latents)")
                count += frames.shape[0]
                if request.return_frames:     # otherwise only one chunk of frames is ever held
                    kept.append(frames)
                yield to_uint8(frames)

        try:
            with self.encode_threads.counting_call():
                video = encode_mp4(chunks(), request.fps, width, height, self.config.crf, self.config.x264_preset,
                                   self.config.x264_tune, self.encode_threads.threads_for_video)
        except CancelledError:                  # its chunks left the shared forwards' queue: the caller went away
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the call's deadline passed before its video was decoded") from None
            raise Cancelled("the call ended before its video was decoded") from None
        self.metrics.decoded(count, timing.vae_seconds)
        # What the decode did not hide: the MP4 encoding and the hand-over of frames on the CPU. Not the time
        # its chunks waited for other calls' shared forwards either (waited_seconds counts that wait).
        self.metrics.encoded(len(video), max(0.0, time.perf_counter() - started
                                              - max(timing.vae_seconds, timing.waited_seconds)))
        log.info(kv("decoded", job_id=request.request_id, frames=count, width=width, height=height,
                    mp4_bytes=len(video)))
        response = decoder_pb2.DecodeResponse(video=video, mime_type="video/mp4", num_frames=count,
                                              height=height, width=width)
        if request.return_frames:
            response.frames.CopyFrom(to_proto(torch.cat(kept)))
        return response


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(DecoderConfig, argv, "t2v serve decoder",
                          "VAE decoder stage: latents -> frames -> MP4 over gRPC.")
    run_stage(config, "decoder", SERVICE_NAME, DecoderServicer, decoder_pb2_grpc.add_DecoderServicer_to_server)
