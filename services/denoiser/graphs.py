"""CUDA graphs for the UNet forward, one per (batch-size bucket, shape), captured before users come.

Why: a UNet3D step is hundreds of small kernels; at small batches the GPU waits on Python to launch
them. Replaying a captured graph launches them all at once. Batches are padded up to the next
bucket (1, 2, 4, ... rows) so a handful of graphs serve every batch size; padded rows compute on
zeros and are dropped. Graphs share one memory pool, and only the engine thread replays them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from services.common.logs import kv

log = logging.getLogger("denoiser.graphs")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    timesteps: torch.Tensor
    embeddings: torch.Tensor
    output: torch.Tensor


def buckets_up_to(max_rows: int) -> list[int]:
    """Powers of two up to (and including) the first one >= max_rows."""
    sizes, size = [], 1
    while True:
        sizes.append(size)
        if size >= max_rows:
            return sizes
        size *= 2


class GraphedUNet:
    """Calls ``forward(sample, timesteps, embeddings) -> noise`` (the UNet, eager or compiled) through
    CUDA graphs."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 max_rows: int, device: torch.device) -> None:
        self.forward = forward
        self.device = device
        self.buckets = buckets_up_to(max_rows)
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, _Graph] = {}

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def capture(self, rows: int, sample_shape: tuple[int, ...], embedding_shape: tuple[int, ...],
                dtype: torch.dtype) -> None:
        key = (rows, sample_shape, embedding_shape)
        if key in self._graphs:
            return
        device = self.device
        sample = torch.zeros((rows, *sample_shape), device=device, dtype=dtype)
        timesteps = torch.full((rows,), 999, device=device, dtype=torch.long)
        embeddings = torch.zeros((rows, *embedding_shape), device=device, dtype=dtype)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: cuDNN/cuBLAS pick their kernels outside the capture
                self.forward(sample, timesteps, embeddings)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            output = self.forward(sample, timesteps, embeddings)
        self._graphs[key] = _Graph(graph, sample, timesteps, embeddings, output)
        log.info(kv("graph_captured", rows=rows, sample=list(sample_shape)))

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
                 ) -> torch.Tensor:
        rows = sample.shape[0]
        bucket = self.bucket(rows)
        if bucket is None:
            return self.forward(sample, timesteps, encoder_hidden_states)
        self.capture(bucket, tuple(sample.shape[1:]), tuple(encoder_hidden_states.shape[1:]), sample.dtype)
        g = self._graphs[(bucket, tuple(sample.shape[1:]), tuple(encoder_hidden_states.shape[1:]))]
        g.sample[:rows].copy_(sample)
        g.timesteps[:rows].copy_(timesteps)
        g.embeddings[:rows].copy_(encoder_hidden_states)
        if bucket > rows:
            g.sample[rows:].zero_()
            g.embeddings[rows:].zero_()
        g.graph.replay()
        return g.output[:rows].clone()
