"""The decoder's Prometheus metrics: VAE decode time, MP4 encode time, MP4 size, frames decoded, frames a
shared VAE forward."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.common.metrics import DURATION_BUCKETS, ServiceMetrics

# 16 KiB .. 256 MiB, by powers of 4.
SIZE_BUCKETS = tuple(float(16 * 1024 * 4 ** i) for i in range(8))


class DecoderMetrics(ServiceMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("decoder", registry)
        r = self.registry
        self.vae_seconds = Histogram("t2v_decoder_vae_decode_duration_seconds", "Time to decode one video's "
                                     "latents to frames with the VAE, in seconds", buckets=DURATION_BUCKETS,
                                     registry=r)
        self.mp4_seconds = Histogram("t2v_decoder_mp4_encode_duration_seconds", "Time the MP4 (H.264) "
                                     "encoding adds beyond the VAE (it overlaps the next chunk's decode), in seconds", buckets=DURATION_BUCKETS, registry=r)
        self.mp4_bytes = Histogram("t2v_decoder_mp4_size_bytes", "Size of each MP4 returned, in bytes "
                                   "(_sum: all bytes sent)", buckets=SIZE_BUCKETS, registry=r)
        self.frames = Counter("t2v_decoder_frames_decoded", "Video frames decoded by the VAE", registry=r)
        self.batch_frames = Histogram("t2v_decoder_vae_batch_frames", "Frames in one shared VAE forward, of all "
                                      "the Decode calls whose chunks it decoded", buckets=(1, 2, 4, 8, 16, 32, 64, 128,
                                                                                      256, 512, 1024), registry=r)

    def decoded(self, frames: int, seconds: float) -> None:
        self.vae_seconds.observe(seconds)
        self.frames.inc(frames)

    def batched(self, frames: int) -> None:
        self.batch_frames.observe(frames)

    def encoded(self, mp4_bytes: int, seconds: float) -> None:
        self.mp4_seconds.observe(seconds)
        self.mp4_bytes.observe(mp4_bytes)
