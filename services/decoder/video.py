"""Frames -> MP4 bytes with PyAV: H.264, yuv420p, faststart, so every browser plays it inline."""

from __future__ import annotations

import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import av
import numpy as np
import torch


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[F, H, W, 3] floats in [0, 1] -> uint8, rounded."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def encode_mp4(chunks: Iterable[np.ndarray], fps: int, width: int, height: int, crf: int = 18,
               preset: str = "veryfast") -> bytes:
    """Chunks of [n, H, W, 3] uint8 RGB frames -> MP4 bytes. Height and width must be even (yuv420p).

    Chunks are encoded as they arrive, so a producer (the VAE on a GPU) can work on the next one.
    """
    if height % 2 or width % 2:
        raise ValueError(f"frames are {width}x{height}; H.264 in yuv420p needs an even width and height")
    # faststart rewrites the file to put the index first, which needs a real file, not a BytesIO.
    with tempfile.TemporaryDirectory(prefix="t2v-mp4-") as folder:
        path = Path(folder) / "video.mp4"
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
            for chunk in chunks:
                for frame in chunk:
                    image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                    container.mux(stream.encode(image))
            container.mux(stream.encode())
        return path.read_bytes()
