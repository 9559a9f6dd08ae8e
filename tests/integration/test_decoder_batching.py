"""Decode calls at once share the VAE's forwards (services/decoder/vae.py with ``batch_pixels``).

The VAE is the embedded model's real one on the CPU; a gate holds the first forward open so that the chunks
behind it are known to have arrived while it ran.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from contextlib import contextmanager
from typing import Iterator

import grpc
import pytest
import torch

from services.common.errors import Unavailable
from services.decoder.encode_threads import EncodeThreads
from services.decoder.server import DecoderConfig, DecoderServicer
from services.decoder.vae import DecodeTiming, VaeDecoder
from tests.conftest import start_decoder, stop_stage, wait_for


def video(seed: int, frames: int = 4, side: int = 8) -> torch.Tensor:
    return torch.randn(1, 4, frames, side, side, generator=torch.Generator().manual_seed(seed))


class Gate:
    """Wraps the VAE's forward: holds the first one at its start until ``release``; records each forward's
    frame count; fails any forward that holds a latent above ``poison``, or more than ``most`` frames."""

    def __init__(self, decoder: VaeDecoder, poison: float | None = None, most: int | None = None) -> None:
        self.frames_of = decoder._frames
        self.forwards: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()
        self.poison, self.most = poison, most
        decoder._frames = self

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        self.forwards.append(latents.shape[0])
        if len(self.forwards) == 1:
            self.entered.set()
            assert self.release.wait(30)
        if self.most is not None and latents.shape[0] > self.most:
            raise RuntimeError("CUDA out of memory (a stand-in: this forward is too big)")
        if self.poison is not None and bool((latents.abs() > self.poison).any()):
            raise RuntimeError("a forward that fails")
        return self.frames_of(latents)


@pytest.fixture(scope="module")
def alone(model_dir) -> VaeDecoder:
    return VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2)


def run_calls(decoder: VaeDecoder, gate: Gate, latents: list[torch.Tensor],
              alive: list | None = None) -> dict[int, object]:
    """The first call starts and holds the gate; the others then queue their chunks; then the gate opens.
    Each call's frames (or what it raised) by index."""
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = torch.cat(list(decoder.iter_decode(latents[i], DecodeTiming(),
                                                            alive=(alive[i] if alive else lambda: True))))
        except BaseException as error:  # noqa: BLE001 - the test reads it
            results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(latents))]
    threads[0].start()
    assert gate.entered.wait(10)
    queued = decoder.waiting()
    for n, thread in enumerate(threads[1:], start=1):
        thread.start()
        wait_for(lambda n=n: decoder.waiting() == queued + 2 * n, 10, "two chunks a call to queue")
    gate.release.set()
    for thread in threads:
        thread.join(30)
    return results


def test_calls_decoding_at_once_share_forwards_and_get_their_own_frames(model_dir, alone) -> None:
    sizes: list[int] = []
    decoder = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2, batch_pixels=10 ** 9,
                         on_batch=sizes.append)
    gate = Gate(decoder)
    latents = [video(i) for i in range(3)]
    results = run_calls(decoder, gate, latents)
    decoder.close()
    assert max(gate.forwards) > 2                       # chunks of different calls shared a forward
    assert sum(gate.forwards) == 12 and sorted(sizes) == sorted(gate.forwards)
    for i, frames in results.items():
        torch.testing.assert_close(frames, alone.decode(latents[i]), rtol=1e-4, atol=1e-5)   # frames do not mix


def test_calls_of_another_frame_size_are_stepped_over_not_waited_behind(model_dir, alone) -> None:
    """Sizes alternating in the queue (12x12, 8x8, 12x12, 8x8 latents behind a held call) share two forwards,
    one a size, instead of running one call at a time in arrival order."""
    decoder = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2, batch_pixels=10 ** 9)
    gate = Gate(decoder)
    latents = [video(0)] + [video(i, side=12 if i % 2 else 8) for i in range(1, 5)]
    results = run_calls(decoder, gate, latents)
    decoder.close()
    assert len(gate.forwards) == 3, gate.forwards           # the held one, then one forward a frame size
    for i, frames in results.items():
        torch.testing.assert_close(frames, alone.decode(latents[i]), rtol=1e-4, atol=1e-5)


def test_the_pixel_budget_bounds_a_shared_forward(model_dir) -> None:
    chunk_pixels = 2 * 64 * 64                          # 2 latent frames of 8x8, 8 pixels a latent a side
    decoder = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2, batch_pixels=3 * chunk_pixels)
    gate = Gate(decoder)
    run_calls(decoder, gate, [video(i) for i in range(4)])
    decoder.close()
    assert max(gate.forwards) > 2 and all(frames <= 6 for frames in gate.forwards)


def test_a_shared_forward_that_fails_is_tried_chunk_by_chunk_and_only_its_caller_hears(model_dir, alone) -> None:
    decoder = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2, batch_pixels=10 ** 9)
    latents = [video(i) for i in range(3)]
    latents[2][0, 0, 3, 0, 0] = 1e5                     # the last chunk of call 2 always fails
    gate = Gate(decoder, poison=1000.0, most=2)         # and every shared forward runs out of memory
    results = run_calls(decoder, gate, latents)
    decoder.close()
    assert type(results[2]) is RuntimeError and "the VAE failed: RuntimeError: a forward that fails" in str(results[2])
    for i in (0, 1):
        torch.testing.assert_close(results[i], alone.decode(latents[i]), rtol=1e-4, atol=1e-5)


def test_a_call_whose_caller_is_gone_is_never_decoded(model_dir) -> None:
    decoder = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2, batch_pixels=10 ** 9)
    gate = Gate(decoder)
    gone = threading.Event()
    results = {}
    first = threading.Thread(target=lambda: results.setdefault(0, decoder.decode(video(0))))
    first.start()
    assert gate.entered.wait(10)
    queued = decoder.waiting()

    def second() -> None:
        try:
            results[1] = list(decoder.iter_decode(video(1), alive=lambda: not gone.is_set()))
        except BaseException as error:  # noqa: BLE001 - the test reads it
            results[1] = error

    other = threading.Thread(target=second)
    other.start()
    wait_for(lambda: decoder.waiting() == queued + 2, 10, "its chunks to queue behind the held forward")
    gone.set()                                              # then its caller goes away
    gate.release.set()
    first.join(30)
    other.join(30)
    decoder.close()
    assert isinstance(results[0], torch.Tensor) and isinstance(results[1], CancelledError)
    assert sum(gate.forwards) == 4                          # the first call's frames only


def test_a_closed_decoder_refuses_new_calls_and_the_setting_is_checked(model_dir) -> None:
    decoder = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2, batch_pixels=10 ** 9)
    decoder.close()
    with pytest.raises(Unavailable, match="stopping"):
        decoder.decode(video(0))
    with pytest.raises(ValueError, match="--batch-megapixels"):
        DecoderServicer(DecoderConfig(batch_megapixels=-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the lent GPU)")
def test_on_cuda_shared_forwards_give_each_call_its_frames_and_time(model_dir) -> None:
    device = torch.device("cuda")
    batched = VaeDecoder(model_dir, device, torch.float16, chunk_size=4, batch_pixels=10 ** 9)
    single = VaeDecoder(model_dir, device, torch.float16, chunk_size=4)
    latents = [video(i, frames=16) for i in range(6)]
    results: dict[int, tuple[torch.Tensor, float]] = {}

    def call(i: int) -> None:
        timing = DecodeTiming()
        results[i] = (torch.cat(list(batched.iter_decode(latents[i], timing))), timing.vae_seconds)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(latents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    batched.close()
    for i, (frames, seconds) in results.items():
        assert frames.device.type == "cpu" and seconds > 0
        torch.testing.assert_close(frames, single.decode(latents[i]), rtol=0, atol=2e-3)    # fp16 kernels may differ


# --- a real decoder stage over gRPC ------------------------------------------------------------------------

def _decode_request(seed: int, frames: int = 2, side: int = 8):
    from services.common.tensors import to_proto
    from t2v.v1 import decoder_pb2

    return decoder_pb2.DecodeRequest(latents=to_proto(video(seed, frames, side)), fps=8)


@contextmanager
def held_stage(side: int = 8) -> Iterator[tuple[object, Gate, object, object]]:
    """A real decoder stage (chunks of 2 frames) whose first Decode call (latents ``side`` square) holds its
    first forward open: (stage, gate, stub, that call's future). The gate is released and the stage stopped
    on the way out."""
    from t2v.v1 import decoder_pb2_grpc

    stage = start_decoder(chunk_size=2)
    gate = Gate(stage.servicer.vae)
    try:
        stub = decoder_pb2_grpc.DecoderStub(stage.channel())
        first = stub.Decode.future(_decode_request(0, side=side), timeout=60)
        assert gate.entered.wait(10)
        yield stage, gate, stub, first
    finally:
        gate.release.set()
        stop_stage(stage)


def test_waiting_for_other_calls_forwards_is_not_counted_as_mp4_encoding(model_dir) -> None:
    """t2v_decoder_mp4_encode_duration_seconds is wall time less the call's VAE share: a call whose chunk
    waited 1 s behind another call's forward must not report that second as MP4 encoding."""
    with held_stage() as (stage, gate, stub, first):
        second = stub.Decode.future(_decode_request(1), timeout=60)
        wait_for(lambda: stage.servicer.vae.waiting() == 1, 10, "its chunk to queue behind the held forward")
        time.sleep(1.0)
        gate.release.set()
        first.result(), second.result()
        mp4 = stage.servicer.metrics.registry.get_sample_value("t2v_decoder_mp4_encode_duration_seconds_sum")
        assert mp4 < 0.5, f"{mp4:.2f} s of MP4 encoding reported for two 2-frame 64x64 videos"


def test_videos_decoded_at_once_share_the_cores_out_for_x264_the_first_one_too(model_dir) -> None:
    """Four calls on 4 cores (the count set, so the test reads the same on any machine): each video's x264
    threads (written by x264 in the MP4) are 1, the first call's too, though it came in alone, because a video
    takes its count when its first frames arrive. A call alone afterwards gets the 4 cores, which x264 clips
    to 2 for a 128x128 frame (a 64x64 one gets 1 whatever it is given, so the frames are 128x128)."""
    from tests.unit.test_video import x264_options

    # Each video's count is read only once all four have asked: otherwise a call scheduled late could see the
    # first ones already gone and take more threads (a race of this test, not of the decoder's rule).
    asked, count = threading.Barrier(4), EncodeThreads.threads_for_video

    def counted_together(self: EncodeThreads) -> int:
        counted = count(self)
        asked.wait(30)
        return counted

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EncodeThreads, "threads_for_video", counted_together)
        with held_stage(side=16) as (stage, gate, stub, first):
            stage.servicer.encode_threads.cores = 4
            others = [stub.Decode.future(_decode_request(seed, side=16), timeout=60) for seed in (1, 2, 3)]
            wait_for(lambda: stage.servicer.vae.waiting() == 3, 10, "three chunks to queue behind the held forward")
            gate.release.set()
            burst = [x264_options(call.result().video).get("threads") for call in [first, *others]]
            patch.undo()
            alone = x264_options(stub.Decode(_decode_request(4, side=16), timeout=60).video).get("threads")
    assert burst == ["1"] * 4, burst
    assert alone == "2", alone


def test_a_cancelled_call_waiting_for_a_forward_frees_its_handler_at_once(model_dir) -> None:
    """A call cancelled (or past its deadline) while its chunks wait behind a long forward: its handler thread
    returns at once, as the text encoder's does, instead of staying blocked until that forward ends."""
    with held_stage() as (stage, gate, stub, first):
        late = stub.Decode.future(_decode_request(1), timeout=1.0)       # a deadline passes while it waits
        wait_for(lambda: stage.servicer.vae.waiting() == 1, 10, "the chunk to queue")
        with pytest.raises(grpc.RpcError):
            late.result()
        # its handler is gone within a second or two of the deadline while the forward is still held (its code:
        # DEADLINE_EXCEEDED, or CANCELLED when the client's end of the deadline reached the server first)
        wait_for(lambda: stage.servicer.metrics.registry.get_sample_value(
            "t2v_grpc_requests_in_progress", {"method": "Decode"}) == 1.0,
            timeout=2.0, what="the late call's handler to return")
        assert not gate.release.is_set()
        gate.release.set()
        first.result()


def test_a_chunk_of_a_shared_forward_does_not_keep_the_other_calls_frames_alive(model_dir) -> None:
    """A chunk handed out from a shared forward is its own memory, not a view that keeps the whole forward's
    output (on a GPU, pinned memory) alive while one call (return_frames keeps every chunk) holds it."""
    decoder = VaeDecoder(model_dir, torch.device("cpu"), torch.float32, chunk_size=2, batch_pixels=10 ** 9)
    gate = Gate(decoder)
    held: dict[int, list[torch.Tensor]] = {}

    def call(i: int) -> None:
        held[i] = list(decoder.iter_decode(video(i), DecodeTiming()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    threads[0].start()
    assert gate.entered.wait(10)
    for n, thread in enumerate(threads[1:], start=1):
        thread.start()
        wait_for(lambda n=n: decoder.waiting() == 2 * n, 10, "the chunks to queue")
    gate.release.set()
    for thread in threads:
        thread.join(30)
    decoder.close()
    assert max(gate.forwards) > 2                           # some chunks did share a forward
    for chunks in held.values():
        for chunk in chunks:
            assert chunk.untyped_storage().nbytes() == chunk.nbytes
