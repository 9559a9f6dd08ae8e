"""CUDA graphs for the UNet forward, one per (batch-size bucket, shape), captured before users come.

Why: a UNet3D step is hundreds of small kernels; at small batches the GPU waits on Python to launch
them. Replaying a captured graph launches them all at once. Batches are padded up to a bucket
(batching.py chooses which: by default the smallest that fits, a larger one where it was measured
faster) so a few graphs serve every batch size; padded rows compute on zeros and are dropped. Graphs
share one memory pool, and only the engine thread replays them.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from services.common.logs import kv
from services.denoiser.batching import choose_bucket, powers_of_two_up_to

log = logging.getLogger("denoiser.graphs")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    timesteps: torch.Tensor
    embeddings: torch.Tensor
    output: torch.Tensor


def buckets_up_to(max_rows: int) -> list[int]:
    """Powers of two up to (and including) the first one >= max_rows (the buckets before 2026-12)."""
    return powers_of_two_up_to(max_rows)


class GraphedUNet:
    """Calls ``forward(sample, timesteps, embeddings) -> noise`` (the UNet, eager or compiled) through
    CUDA graphs, one per bucket of ``buckets`` rows (or the powers of two up to ``max_rows``)."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 max_rows: int | None = None, device: torch.device | None = None,
                 buckets: Sequence[int] | None = None) -> None:
        if buckets is None and max_rows is None:
            raise ValueError("give the buckets, or max_rows for powers of two")
        self.forward = forward
        self.device = device or torch.device("cuda")
        self.buckets = sorted(set(buckets)) if buckets is not None else buckets_up_to(int(max_rows or 1))
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, _Graph] = {}
        self._seconds: dict[tuple, dict[int, float]] = {}   # (sample shape, embedding shape) -> rows -> s

    def bucket(self, rows: int, shapes: tuple | None = None) -> int | None:
        """The bucket a batch of ``rows`` runs in, for inputs of ``shapes`` (per-row sample shape,
        per-row embedding shape): the smallest that fits unless one measured by ``time`` is faster."""
        return choose_bucket(rows, self.buckets, self._seconds.get(shapes) if shapes else None)

    def seconds(self, sample_shape: tuple[int, ...], embedding_shape: tuple[int, ...]) -> dict[int, float]:
        """What ``time`` measured for these shapes: bucket rows -> seconds a replay."""
        return dict(self._seconds.get((tuple(sample_shape), tuple(embedding_shape)), {}))

    def time(self, rows: int, sample_shape: tuple[int, ...], embedding_shape: tuple[int, ...],
             dtype: torch.dtype, repeat: int = 3) -> float:
        """Capture (if needed) and time the ``rows`` bucket's replay on random inputs (median of
        ``repeat``, CUDA events); remembered, so ``bucket`` may pad to a faster larger bucket."""
        sample_shape, embedding_shape = tuple(sample_shape), tuple(embedding_shape)
        self.capture(rows, sample_shape, embedding_shape, dtype)
        g = self._graphs[(rows, sample_shape, embedding_shape)]
        g.sample.normal_()
        g.embeddings.normal_()
        g.timesteps.random_(0, 1000)
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        seconds = statistics.median(times)
        self._seconds.setdefault((sample_shape, embedding_shape), {})[rows] = seconds
        return seconds

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
        shapes = (tuple(sample.shape[1:]), tuple(encoder_hidden_states.shape[1:]))
        bucket = self.bucket(rows, shapes)
        if bucket is None:
            return self.forward(sample, timesteps, encoder_hidden_states)
        self.capture(bucket, *shapes, sample.dtype)
        g = self._graphs[(bucket, *shapes)]
        g.sample[:rows].copy_(sample)
        g.timesteps[:rows].copy_(timesteps)
        g.embeddings[:rows].copy_(encoder_hidden_states)
        if bucket > rows:
            g.sample[rows:].zero_()
            g.embeddings[rows:].zero_()
        g.graph.replay()
        return g.output[:rows].clone()
