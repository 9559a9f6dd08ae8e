"""services.decoder.video: frames -> MP4 with x264, and the decoder's check of its x264 settings."""

from __future__ import annotations

import io
import re

import av
import numpy as np
import pytest

import torch

from services.decoder.server import DecoderConfig, DecoderServicer, torch_threads_for
from services.decoder.video import check_x264_settings, encode_mp4

FRAMES = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)


def x264_options(mp4: bytes) -> dict[str, str]:
    """The settings x264 writes into the stream (its SEI message), e.g. {"bframes": "0", ...}."""
    found = re.search(rb"options: ([^\x00]*)", mp4)
    assert found, "no x264 settings in the MP4"
    return dict(item.split("=", 1) for item in found.group(1).decode().split() if "=" in item)


def decoded_frames(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_zerolatency_gives_a_playable_mp4_encoded_without_lookahead() -> None:
    """The decoder's default tune, zerolatency: x264 encodes each frame as it arrives (no lookahead,
    no B-frames), so the encoding overlaps the VAE's next chunk instead of piling up at the flush."""
    mp4 = encode_mp4([FRAMES[:4], FRAMES[4:8], FRAMES[8:]], 8, 64, 64, tune=DecoderConfig().x264_tune)
    frames = decoded_frames(mp4)
    assert len(frames) == 16 and frames[0].shape == (64, 64, 3)
    options = x264_options(mp4)
    assert options["bframes"] == "0" and options.get("rc_lookahead", "0") == "0", options


def test_an_empty_tune_is_x264s_default_with_lookahead() -> None:
    mp4 = encode_mp4([FRAMES], 8, 64, 64, tune="")
    assert len(decoded_frames(mp4)) == 16
    assert int(x264_options(mp4)["rc_lookahead"]) > 0


def test_x264_threads_is_passed_to_x264_and_checked() -> None:
    frames = np.random.default_rng(0).integers(0, 255, (2, 256, 256, 3), dtype=np.uint8)   # x264 caps threads by rows
    assert x264_options(encode_mp4([frames], 8, 256, 256, threads=4))["threads"] == "4"
    assert x264_options(encode_mp4([frames], 8, 256, 256, threads=1))["threads"] == "1"
    assert DecoderConfig().x264_threads == 0                       # by load unless set (encode_threads.py)
    with pytest.raises(ValueError, match="--x264-threads is 65"):
        DecoderServicer(DecoderConfig(x264_threads=65))


def test_torch_gets_one_cpu_thread_on_a_gpu_its_default_on_the_cpu_or_what_is_set() -> None:
    # On a GPU the decoder's torch CPU work is the frames' conversion to bytes; with torch's default team of
    # one OpenMP thread a core, the idle ones spin after each step (1.4 CPU s a video on a 16-core host).
    assert DecoderConfig().torch_threads == 0
    assert torch_threads_for(0, torch.device("cuda")) == 1
    assert torch_threads_for(0, torch.device("cpu")) == 0          # the VAE runs on them: torch's own choice
    assert torch_threads_for(3, torch.device("cuda")) == 3
    with pytest.raises(ValueError, match="--torch-threads is 257"):
        DecoderServicer(DecoderConfig(torch_threads=257))
    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 3                                # a count torch does not run already
    servicer = DecoderServicer(DecoderConfig(device="cpu", dtype="float32", torch_threads=wanted))
    try:
        servicer.load()
        assert torch.get_num_threads() == wanted
    finally:
        servicer.close(5)
        torch.set_num_threads(before)


def test_check_x264_settings_accepts_the_defaults_and_names_a_bad_tune() -> None:
    config = DecoderConfig()
    check_x264_settings(config.crf, config.x264_preset, config.x264_tune)
    with pytest.raises(ValueError, match=r"--x264-tune 'zero-latency'.*zerolatency"):
        check_x264_settings(18, "veryfast", "zero-latency")
    with pytest.raises(ValueError, match=r"--x264-preset 'fastest'"):
        check_x264_settings(18, "fastest", "")


def test_a_decoder_with_an_unknown_tune_stops_at_load_with_a_sentence() -> None:
    """serve() turns a ValueError from load() into one line and a non-zero exit; without the check a
    typo would fail every Decode call with an FFmpeg error instead."""
    servicer = DecoderServicer(DecoderConfig(device="cpu", dtype="float32", x264_tune="bogus"))
    with pytest.raises(ValueError, match="--x264-tune 'bogus'"):
        servicer.load()
    assert servicer.vae is None
