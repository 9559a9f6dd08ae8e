"""Frames -> MP4 bytes with PyAV: H.264, yuv420p, faststart, so every browser plays it inline."""

from __future__ import annotations

import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable

import av
import numpy as np


def encode_mp4(chunks: Iterable[np.ndarray], fps: int, width: int, height: int, crf: int = 18,
               preset: str = "veryfast", tune: str = "zerolatency", threads: int | Callable[[], int] = 0) -> bytes:
    """Chunks of [n, H, W, 3] uint8 RGB frames -> MP4 bytes. Height and width must be even (yuv420p).

    Chunks are encoded as they arrive, so a producer (the VAE on a GPU) can work on the next one.
    ``tune`` is x264's (``""`` = none). The default, zerolatency, turns off x264's lookahead and
    B-frames: each frame is encoded when it arrives instead of about half the work waiting for the
    flush at the end, which no GPU work hides (16 frames of 256x256 noise on a 2-core dev machine:
    42-50 ms in all, about half of it in the flush; with zerolatency no flush). The cost: a larger
    file at the same ``crf`` (1.5-1.7x on smooth test clips). ``threads`` is x264's (0 = its own
    choice), or a function asked for it when the first chunk arrives (the decoder's EncodeThreads: how
    crowded the cores are then, not when the call came in).
    """
    if height % 2 or width % 2:
        raise ValueError(f"frames are {width}x{height}; H.264 in yuv420p needs an even width and height")
    # faststart rewrites the file to put the index first, which needs a real file, not a BytesIO.
    with tempfile.TemporaryDirectory(prefix="t2v-mp4-") as folder:
        path = Path(folder) / "video.mp4"
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"

            def x264_options(count: int) -> dict[str, str]:
                return {"crf": str(crf), "preset": preset, **({"tune": tune} if tune else {}),
                        **({"threads": str(count)} if count else {})}

            stream.options = x264_options(0 if callable(threads) else threads)   # the flush's, if no chunk comes
            for index, chunk in enumerate(chunks):
                if index == 0 and callable(threads):   # x264 opens at the first frame, with the options set by then
                    stream.options = x264_options(threads())
                for frame in chunk:
                    image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                    container.mux(stream.encode(image))
            container.mux(stream.encode())
        return path.read_bytes()


def check_x264_settings(crf: int, preset: str, tune: str) -> None:
    """Encode two tiny frames with these settings, or raise ValueError naming them.

    Why: x264 checks its preset and tune only when a video is encoded; unchecked, a typo would fail
    every Decode call with an FFmpeg error instead of stopping the decoder at start with a sentence.
    """
    try:
        encode_mp4([np.zeros((2, 16, 16, 3), np.uint8)], 8, 16, 16, crf, preset, tune)
    except av.error.FFmpegError:
        raise ValueError(f"x264 refused --x264-preset {preset!r} with --x264-tune {tune!r}; presets: ultrafast, "
                         "superfast, veryfast, faster, fast, medium, slow, slower, veryslow; tunes: zerolatency, "
                         "film, animation, grain, stillimage, psnr, ssim, fastdecode, or '' for none") from None
