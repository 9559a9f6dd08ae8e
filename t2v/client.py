"""``t2v generate``: call the gateway, show the denoising steps as a progress bar, write the MP4."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc

from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2

_STAGE_LABELS = {gateway_pb2.STAGE_TEXT_ENCODER: "encoding the prompt", gateway_pb2.STAGE_DENOISER: "denoising",
                 gateway_pb2.STAGE_DECODER: "decoding frames and writing the MP4"}
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class GenerateError(RuntimeError):
    """A failed generation, with a sentence for the user."""


@dataclass
class ProgressBar:
    """A one-line bar on a terminal; one line per stage elsewhere (logs, CI)."""

    stream: TextIO
    width: int = 30

    def stage(self, label: str) -> None:
        self.stream.write(f"{label}...\n")
        self.stream.flush()

    def step(self, step: int, total: int) -> None:
        filled = self.width * step // max(total, 1)
        line = f"  [{'#' * filled}{'.' * (self.width - filled)}] step {step}/{total}"
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if step == total else ""))
        elif step == total or step == 1 or step % 10 == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def gateway_channel(gateway: str) -> grpc.Channel:
    """A channel to the gateway that takes whole videos (the 4 MiB default would not)."""
    return grpc.insecure_channel(gateway, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])


def auth_metadata(api_key: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {api_key}")] if api_key else None


def explain(gateway: str, error: grpc.RpcError) -> str:
    """One sentence for a failed call: the gateway's own message, or that it cannot be reached."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "stage" not in details:
        return f"cannot reach the gateway at {gateway} ({details}); is `t2v up` running?"
    return f"{code.name}: {details}"


def generate(gateway: str, params: generation_pb2.GenerationParams, output: Path, timeout: float | None = None,
             progress: TextIO | None = sys.stderr, api_key: str | None = None,
             priority: int = gateway_pb2.PRIORITY_UNSPECIFIED) -> gateway_pb2.VideoResult:
    """Run one generation through the gateway and write the video to ``output``."""
    metadata = auth_metadata(api_key)
    bar = ProgressBar(progress) if progress is not None else None
    with gateway_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        result = None
        try:
            for event in stub.Generate(gateway_pb2.GenerateRequest(params=params, priority=priority),
                                       timeout=timeout, metadata=metadata):
                for warning in event.warnings:
                    if bar:
                        bar.stream.write(f"warning: {warning}\n")
                kind = event.WhichOneof("event")
                if kind == "queue" and bar:
                    bar.stage(f"waiting in the queue: {event.queue.position} of {event.queue.queue_length}")
                elif kind == "stage" and bar:
                    bar.stage(_STAGE_LABELS.get(event.stage.stage, "working"))
                elif kind == "progress" and bar:
                    bar.step(event.progress.step, event.progress.total_steps)
                elif kind == "result":
                    result = event.result
        except grpc.RpcError as error:
            raise GenerateError(explain(gateway, error)) from None
    if result is None:
        raise GenerateError("the gateway ended the stream without a video")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(result.video)
    return result
