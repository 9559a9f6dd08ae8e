"""CUDA graphs for the UNet forward, one per (batch-size bucket, shape), captured before users come.

Why: a UNet3D step is hundreds of small kernels; at small batches the GPU waits on Python to launch
them. Replaying a captured graph launches them all at once. Batches are padded up to a bucket
(batching.py chooses which: by default the smallest that fits, a larger one where it was measured
faster) so a few graphs serve every batch size; padded rows compute on zeros and are dropped. Graphs
share one memory pool, and only the engine thread replays them. The same class graphs the DeepCache
forwards (deepcache.py), which take and return more tensors, all with the batch's rows first.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from services.common.logs import kv
from services.denoiser.batching import choose_bucket, powers_of_two_up_to

log = logging.getLogger("denoiser.graphs")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor | tuple[torch.Tensor, ...]


def buckets_up_to(max_rows: int) -> list[int]:
    """Powers of two up to (and including) the first one >= max_rows (the buckets before 2026-12)."""
    return powers_of_two_up_to(max_rows)


Shapes = tuple[tuple[int, ...], ...]     # each input's shape without its first (rows) dimension


class GraphedUNet:
    """Calls ``forward(*inputs) -> output`` (the UNet, eager or compiled: ``forward(sample, timesteps,
    embeddings) -> noise``, or a DeepCache forward with more inputs or outputs) through CUDA graphs, one
    per bucket of ``buckets`` rows (or the powers of two up to ``max_rows``) and input shapes. Every
    input and output has the batch's rows first.

    ``pool`` and ``seconds`` may be another GraphedUNet's: the DeepCache forwards share the exact
    forward's memory pool (only one graph replays at a time) and its measured times, which choose
    their padding too (a compiled bucket is about as much faster on each path)."""

    def __init__(self, forward: Callable[..., Any], max_rows: int | None = None, device: torch.device | None = None,
                 buckets: Sequence[int] | None = None, name: str = "unet", pool: Any = None,
                 seconds: dict[tuple[int, ...], dict[int, float]] | None = None) -> None:
        if buckets is None and max_rows is None:
            raise ValueError("give the buckets, or max_rows for powers of two")
        self.forward = forward
        self.name = name
        self.device = device or torch.device("cuda")
        self.buckets = sorted(set(buckets)) if buckets is not None else buckets_up_to(int(max_rows or 1))
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, _Graph] = {}
        # first input's per-row shape (the sample's) -> rows -> seconds a replay
        self._seconds: dict[tuple[int, ...], dict[int, float]] = seconds if seconds is not None else {}

    def bucket(self, rows: int, sample_shape: tuple[int, ...] | None = None) -> int | None:
        """The bucket a batch of ``rows`` runs in, for samples of ``sample_shape`` (per row): the
        smallest that fits unless one measured by ``time`` is faster."""
        measured = self._seconds.get(tuple(sample_shape)) if sample_shape is not None else None
        return choose_bucket(rows, self.buckets, measured)

    def seconds(self, sample_shape: tuple[int, ...], *_: Any) -> dict[int, float]:
        """What ``time`` measured for samples of this per-row shape: bucket rows -> seconds a replay."""
        return dict(self._seconds.get(tuple(sample_shape), {}))

    def remember(self, sample_shape: tuple[int, ...], seconds: dict[int, float]) -> None:
        """Take bucket times measured earlier (e.g. by a previous start, stored with the compile cache)."""
        self._seconds.setdefault(tuple(sample_shape), {}).update(seconds)

    def time(self, rows: int, shapes: Shapes, dtypes: Sequence[torch.dtype], repeat: int = 3) -> float:
        """Capture (if needed) and time the ``rows`` bucket's replay on random inputs (median of
        ``repeat``, CUDA events); remembered, so ``bucket`` may pad to a faster larger bucket."""
        shapes = tuple(tuple(s) for s in shapes)
        self.capture(rows, shapes, dtypes)
        g = self._graphs[(rows, shapes)]
        for tensor in g.inputs:
            if tensor.is_floating_point():
                tensor.normal_()
            else:
                tensor.random_(0, 1000)
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        seconds = statistics.median(times)
        self._seconds.setdefault(shapes[0], {})[rows] = seconds
        return seconds

    def capture(self, rows: int, shapes: Shapes, dtypes: Sequence[torch.dtype], warmups: int = 1) -> None:
        """Capture the ``rows`` bucket for inputs of ``shapes`` (per row) and ``dtypes``, after ``warmups``
        forwards outside the capture (one is enough for cuDNN/cuBLAS to choose and load their kernels and
        for a compiled forward to compile; two were run before 2026-12, a forward's time more at start)."""
        shapes = tuple(tuple(s) for s in shapes)
        key = (rows, shapes)
        if key in self._graphs:
            return
        device = self.device
        inputs = tuple(torch.full((rows, *shape), 999, device=device, dtype=dtype) if not dtype.is_floating_point
                       else torch.zeros((rows, *shape), device=device, dtype=dtype)
                       for shape, dtype in zip(shapes, dtypes))
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmups):
                self.forward(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a capture may run while the server is up (engine.warm(defer=True)); another thread's
        # CUDA call then (a gRPC thread copying a preview to the host) must not invalidate it
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self.forward(*inputs)
        self._graphs[key] = _Graph(graph, inputs, output)
        log.info(kv("graph_captured", forward=self.name, rows=rows, sample=list(shapes[0])))

    def __call__(self, *inputs: torch.Tensor) -> Any:
        rows = inputs[0].shape[0]
        shapes = tuple(tuple(x.shape[1:]) for x in inputs)
        bucket = self.bucket(rows, shapes[0])
        if bucket is None:
            return self.forward(*inputs)
        self.capture(bucket, shapes, [x.dtype for x in inputs])
        g = self._graphs[(bucket, shapes)]
        for static, given in zip(g.inputs, inputs):
            static[:rows].copy_(given)
            if bucket > rows and static.is_floating_point():
                static[rows:].zero_()
        g.graph.replay()
        if isinstance(g.output, tuple):
            return tuple(out[:rows].clone() for out in g.output)
        return g.output[:rows].clone()
