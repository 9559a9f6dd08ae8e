"""CFG-parallel denoising: every UNet forward split by rows across two devices, both halves at once.

Why rows: the engine's batch holds, for each request, its unconditional and its conditional row side by
side, and each row goes through the UNet on its own (its layers never mix the rows of a batch). So any
split of the rows gives the same noise prediction, and splitting in two halves puts a lone request's
unconditional row on one device and its conditional row on the other: classifier-free guidance in
parallel, each device doing half the work of every step. Batching stays step by step: a batch of 2k
rows sends k to each device; the engine, its scheduler steps and its guidance are untouched.

Mechanism (policy stays in the engine): rank 0 is the denoiser's engine, which calls ``RowSplit`` as its
UNet forward; rank 1 is a follower process (``python -m services.denoiser.cfg_parallel``) holding the
same UNet on its own device, looping: receive a header and its rows' inputs, run them, send the noise
back. torch.distributed carries them: gloo on CPUs (what CI proves), NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger("denoiser.cfg_parallel")

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
HEADER = 8              # rows, channels, frames, h, w, tokens, embedding width, the leader's share
FOLLOWER = 1
TIMEOUT = timedelta(minutes=10)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def leader_rows(rows: int) -> int:
    """The rows rank 0 keeps: the first half, rounded up (a lone unguided request stays on rank 0)."""
    return math.ceil(rows / 2)


class RowSplit:
    """The UNet forward of rank 0: the first half of the rows here, the rest on the follower, at once."""

    def __init__(self, local: Forward, device: torch.device, dtype: torch.dtype) -> None:
        self.local, self.device, self.dtype = local, device, dtype
        self.closed = False

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        rows = sample.shape[0]
        keep = leader_rows(rows)
        header = torch.tensor([rows, *sample.shape[1:], *embeddings.shape[1:], keep], dtype=torch.int64,
                              device=self.device)
        dist.send(header, FOLLOWER)
        if keep == rows:
            return self.local(sample, timesteps, embeddings)
        parts = [t[keep:].contiguous() for t in (sample, timesteps.to(torch.int64), embeddings)]
        sent = [dist.isend(part, FOLLOWER) for part in parts]      # ``parts`` keeps them alive until sent
        mine = self.local(sample[:keep], timesteps[:keep], embeddings[:keep])
        theirs = torch.empty((rows - keep, *mine.shape[1:]), dtype=mine.dtype, device=self.device)
        dist.recv(theirs, FOLLOWER)
        for work in sent:
            work.wait()
        return torch.cat([mine, theirs])

    def close(self) -> None:
        """Tell the follower to exit (a header of 0 rows)."""
        if not self.closed:
            self.closed = True
            dist.send(torch.zeros(HEADER, dtype=torch.int64, device=self.device), FOLLOWER)


def follow(forward: Forward, device: torch.device, dtype: torch.dtype) -> int:
    """Rank 1's loop: run the rows rank 0 sends until it sends 0 rows; returns how many forwards it ran."""
    forwards = 0
    header = torch.empty(HEADER, dtype=torch.int64, device=device)
    with torch.inference_mode():
        while True:
            dist.recv(header, 0)
            rows, channels, frames, h, w, tokens, width, keep = (int(v) for v in header.tolist())
            if rows == 0:
                return forwards
            if keep == rows:
                continue
            count = rows - keep
            sample = torch.empty((count, channels, frames, h, w), dtype=dtype, device=device)
            timesteps = torch.empty(count, dtype=torch.int64, device=device)
            embeddings = torch.empty((count, tokens, width), dtype=dtype, device=device)
            for tensor in (sample, timesteps, embeddings):
                dist.recv(tensor, 0)
            noise = forward(sample, timesteps, embeddings)
            dist.send(noise.to(dtype).contiguous(), 0)
            forwards += 1


# --- the two processes -------------------------------------------------------------------------------------
def second_device(first: torch.device, wanted: str = "auto") -> torch.device:
    """The follower's device: ``wanted``, or for "auto" the GPU after ``first`` (the CPU on a CPU)."""
    if wanted != "auto":
        other = torch.device(wanted)
    elif first.type == "cuda":
        index = (first.index or 0) + 1
        if index >= torch.cuda.device_count():
            raise ValueError(f"--cfg-parallel needs a second GPU after {first}, and this machine has "
                             f"{torch.cuda.device_count()}; give --cfg-parallel-device, or drop --cfg-parallel")
        other = torch.device("cuda", index)
    else:
        other = torch.device("cpu")
    if other.type != first.type:
        raise ValueError(f"--cfg-parallel-device {other} is not the same kind of device as --device {first}")
    return other


def join(init_method: str, rank: int, device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")      # no NVLink multicast: two ranks talk point to point
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=2,
                            timeout=TIMEOUT)


class CfgParallel:
    """Rank 0's side: the follower process, the process group, and the forward wrapper."""

    def __init__(self, follower: subprocess.Popen, device: torch.device, dtype: torch.dtype) -> None:
        self.follower, self.device, self.dtype = follower, device, dtype
        self.split: RowSplit | None = None

    @classmethod
    def start(cls, model: str, device: torch.device, other: torch.device, dtype: torch.dtype,
              short_attention: str = "auto", temporal_conv: str = "conv3d", cross_attention: str = "video",
              start_seconds: float = 600.0) -> "CfgParallel":
        """Start the follower on ``other`` and join it; RuntimeError if it exits or does not join in time.
        ``short_attention``: the kind the leader's engine uses, so the follower's rows run the same kernels (on
        a CUDA device; a CPU follower keeps SDPA); ``temporal_conv`` and ``cross_attention`` likewise."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        command = [sys.executable, "-m", "services.denoiser.cfg_parallel", "--model", model, "--device", str(other),
                   "--dtype", str(dtype).removeprefix("torch."), "--init-method", init_method,
                   "--short-attention", short_attention if other.type == "cuda" else "sdpa",
                   "--temporal-conv", temporal_conv, "--cross-attention", cross_attention]
        follower = subprocess.Popen(command, start_new_session=True)
        joined: list[BaseException | None] = []
        thread = threading.Thread(target=lambda: joined.append(_try(join, init_method, 0, device)), daemon=True)
        thread.start()
        deadline = time.monotonic() + start_seconds
        while thread.is_alive():
            if follower.poll() is not None:
                raise RuntimeError(f"the CFG-parallel follower on {other} exited with code {follower.returncode} "
                                   "while starting (its log is above)")
            if time.monotonic() > deadline:
                follower.kill()
                raise RuntimeError(f"the CFG-parallel follower on {other} did not join within {start_seconds:g} s")
            thread.join(0.2)
        if joined and joined[0] is not None:
            follower.kill()
            raise RuntimeError(f"cannot join the CFG-parallel follower: {joined[0]}")
        return cls(follower, device, dtype)

    def wrap(self, local: Forward) -> RowSplit:
        self.split = RowSplit(local, self.device, self.dtype)
        return self.split

    def close(self) -> None:
        """Stop the follower (it exits once told), then leave the group."""
        try:
            if self.split is not None and self.follower.poll() is None:
                self.split.close()
            self.follower.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a follower that does not stop is killed
            self.follower.kill()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _try(call: Callable[..., object], *args: object) -> BaseException | None:
    try:
        call(*args)
        return None
    except BaseException as error:  # noqa: BLE001 - handed to the starting thread
        return error


def _exit_with_parent() -> None:
    """The follower is useless without its leader: exit when the leader's process is gone (even SIGKILLed)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)
    threading.Thread(target=watch, name="watch-leader", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    from services.common.model_folder import resolve_device, resolve_dtype
    from services.denoiser.engine import DenoiseEngine

    parser = argparse.ArgumentParser(prog="python -m services.denoiser.cfg_parallel",
                                     description="The second device of a CFG-parallel denoiser (started by it).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--init-method", required=True, help="torch.distributed init method, e.g. tcp://127.0.0.1:P")
    parser.add_argument("--short-attention", default="auto", help="as the denoiser's --short-attention")
    parser.add_argument("--temporal-conv", default="conv3d", help="conv3d or conv2d: the kind the leader's engine uses")
    parser.add_argument("--cross-attention", default="video", help="video or frame: the kind the leader's engine uses")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="level=%(levelname)s logger=%(name)s %(message)s")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    _exit_with_parent()
    engine = DenoiseEngine.from_folder(args.model, device, dtype, short_attention=args.short_attention,
                                       temporal_conv=args.temporal_conv, cross_attention=args.cross_attention)
    join(args.init_method, FOLLOWER, device)
    log.info(f"event=follower_ready device={device} dtype={dtype}")
    try:
        forwards = follow(engine._forward, device, dtype)
    finally:
        dist.destroy_process_group()
    log.info(f"event=follower_done forwards={forwards}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
