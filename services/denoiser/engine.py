"""The denoiser engine: one loop that keeps the GPU busy with step-level continuous batching.

Why: the UNet is the product's cost. Every iteration takes the active requests of one shape
(frames, height, width), runs ONE UNet forward for all of them (cond and uncond rows together,
each row at its own timestep), then a scheduler step per request. Requests join and leave between
steps; a cancelled request leaves at the next step. Noise comes from each request's own seeded
generator, so a video does not depend on what it was batched with. Knows nothing of gRPC.

Each batch stops at the size that runs fastest per row (measured when the engine warms up; see
batching.py): the other requests of that shape wait, oldest first, and join as places free up, so
more load never means fewer videos a second.

A request may ask for a Checkpoint every N steps and may start from one (``Request.resume``): its
latents and its scheduler's history, enough to continue bit for bit on another engine. A resumed
request is an ordinary member of its shape's batches, at its own timestep.

A request may ask for DeepCache (``Request.cache == "deep"``, deepcache.py): every
``deep_cache_interval``-th step it runs the whole UNet and keeps its deep features, the steps between
run only the shallow path on them. The rows of one batch at full and at shallow steps run as two
forwards (sub-batches) of the same step; the full steps of a shape's deep requests are kept in phase
(every request full on the shape's every N-th step, and on its own first), so most steps run one
large forward of one kind. A request with ``cache == "none"`` (the default) runs today's exact path:
with no deep request in its batch, the very same forward; beside deep requests at their full step,
the DeepCache full forward, which computes the same operations (bit for bit on the CPU, up to float
rounding on compiled GPU kernels, as any change of batch does). Features are not checkpointed: a
resumed deep request starts its cache again with a full step.

A request may also ask for a Preview every N steps (``Request.preview_every``): its latents mapped to RGB by
the model's fixed linear map (services/common/latent_rgb.py), computed on the device and handed over as a
device tensor like a Checkpoint's, so the step never waits for it. Requests that did not ask pay nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections import deque
from typing import Any, Callable, Iterator, Union

import torch
from diffusers import DDIMScheduler, UNet3DConditionModel

from services.common.logs import kv
from services.common.contract import CACHE_MODES, DEFAULT_VAE_SCALE_FACTOR
from services.common.latent_rgb import LatentRgb, map_to_rgb
from services.common.model_folder import model_part, vae_scale_factor
from services.denoiser import batching, sampling
from services.denoiser.cross_attention import install as install_cross_attention
from services.denoiser.deepcache import DeepCacheUNet
from services.denoiser.short_attention import install as install_short_attention
from services.denoiser.temporal_conv import install as install_temporal_conv

log = logging.getLogger("denoiser.engine")


COMPILE_BACKENDS = ("inductor", "precompile", "aoti")   # use_compile's: torch.compile, or packages (aot.py KINDS)


class EngineFull(RuntimeError):
    """More requests are active than ``max_jobs``."""


class EngineStopped(RuntimeError):
    """The engine is stopping; the request should go to another replica."""


@dataclass(frozen=True)
class Checkpoint:
    """A request's state after ``step`` steps: an event the engine emits, and a resume point.

    As an event its tensors are the engine's own (on its device; it never writes into them again), so
    taking one costs the engine no copy and no wait for the GPU: whoever reads it moves them to the CPU
    in its own thread."""

    step: int                  # steps done, 1 .. num_inference_steps - 1
    latents: torch.Tensor      # [1, C, F, h, w] in the engine's compute dtype
    history: sampling.History = sampling.History()


@dataclass(frozen=True)
class Request:
    request_id: str
    embeddings: torch.Tensor          # [2, 77, D] (uncond, cond) or [1, 77, D] without guidance
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str = sampling.DEFAULT_SCHEDULER
    checkpoint_every: int = 0            # 0 = never; N = a Checkpoint after steps N, 2N, ... but the last
    resume: Checkpoint | None = None     # None = start from the seed's noise
    cache: str = "none"                  # "none" = the exact UNet every step; "deep" = DeepCache
    preview_every: int = 0               # 0 = never; N = a Preview after steps N, 2N, ... and the last

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class Step:
    step: int          # 1-based
    total: int
    timestep: int


@dataclass(frozen=True)
class Preview:
    """A request's latents after ``step`` steps as RGB, at latent resolution (``DenoiseEngine.preview``).

    Like a Checkpoint's, ``rgb`` is a tensor on the engine's device that it never writes into again: the
    reader moves it to the CPU in its own thread, so the engine does not wait for the GPU."""

    step: int                  # steps done, 1-based
    total: int
    rgb: torch.Tensor          # uint8 [F, h, w, 3]


@dataclass(frozen=True)
class Finished:
    latents: torch.Tensor   # [1, C, F, h, w] on the CPU
    steps_run: int


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass(frozen=True)
class Cancelled:
    steps_run: int


Event = Union[Step, Checkpoint, Preview, Finished, Failed, Cancelled]
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (sample, timesteps, embeddings)


@dataclass(eq=False)
class Job:
    """One request's state inside the engine; its events come out of ``events``.

    Compared by identity (``eq=False``): the loop's ``remove`` / ``not in`` mean "this job", and a
    field-wise ``==`` would compare two jobs' tensors when their request ids are equal, raising in
    the engine thread and killing it (tests/integration/test_bad_input.py has the case)."""

    request: Request
    events: "queue.Queue[Event]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by the engine thread when the job is admitted.
    scheduler: Any = None
    timesteps: Any = None
    timestep_values: list[int] = field(default_factory=list)
    latents: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    generator: torch.Generator | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    features: torch.Tensor | None = None   # DeepCache: the deep features of the last full step
    since_full: int = 0                    # DeepCache: steps since that full step

    def cancel(self) -> None:
        self.cancelled.set()

    def wants_checkpoint(self) -> bool:
        """Whether a Checkpoint follows the step just done: every ``checkpoint_every``-th step of the
        whole run, never the last (the latents come then anyway)."""
        every = self.request.checkpoint_every
        return every > 0 and self.index % every == 0 and self.index < len(self.timestep_values)

    def wants_preview(self) -> bool:
        """Whether a Preview follows the step just done: every ``preview_every``-th step, and the last."""
        every = self.request.preview_every
        return every > 0 and (self.index % every == 0 or self.index == len(self.timestep_values))

    @property
    def shape_key(self) -> tuple[int, int, int]:
        r = self.request
        return (r.num_frames, r.height, r.width)

    @property
    def rows(self) -> int:
        """UNet rows this job takes in a batch: 2 with guidance (uncond, cond), else 1."""
        return 2 if self.request.uses_guidance else 1

    @property
    def deep(self) -> bool:
        return self.request.cache == "deep"


class EngineObserver:
    """What the engine reports as it runs, for whoever watches it (the server turns it into metrics).

    Called from the engine thread: methods must be quick and must not raise. This base does nothing.
    """

    def step(self, batch_size: int, seconds: float) -> None:
        """One batched denoising step ran for ``batch_size`` requests: the UNet forward, the guidance
        and each request's scheduler step, taking ``seconds`` of GPU time (of wall time on the CPU).

        The whole step, not only the forward: guidance and the scheduler step are GPU kernels too, and
        timing the forward alone left them counted as "not GPU" time (docs/benchmarks.md)."""

    def request_done(self, outcome: str) -> None:
        """A request left the engine: ``finished``, ``cancelled`` or ``failed``."""

    def cache_steps(self, full: int, shallow: int) -> None:
        """One batched step ran ``full`` requests with cache=deep through the whole UNet and ``shallow``
        through DeepCache's shallow path (called only for steps with deep requests)."""


class StepTimer:
    """Times batched steps for the observer without making the engine wait for the GPU: on CUDA it
    records events around each step's kernels and reads them once they have completed (a step or two
    later); on the CPU it reads the clock. A step that raises is not reported."""

    def __init__(self, observer: EngineObserver, device: torch.device) -> None:
        self.observer, self.cuda = observer, device.type == "cuda"
        self._pending: deque[tuple[int, Any, Any]] = deque()

    @contextmanager
    def step(self, batch_size: int) -> Iterator[None]:
        """Wrap everything the step queues on the GPU, from its first input to its last scheduler step."""
        if not self.cuda:
            started = time.perf_counter()
            yield
            self.observer.step(batch_size, time.perf_counter() - started)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((batch_size, start, end))
        while self._pending and (self._pending[0][2].query() or len(self._pending) > 8):
            size, first, last = self._pending.popleft()
            last.synchronize()
            self.observer.step(size, first.elapsed_time(last) / 1e3)


@dataclass
class EngineStats:
    steps: int = 0                 # UNet forwards
    requests_stepped: int = 0      # sum of batch sizes
    max_batch_seen: int = 0
    max_rows_seen: int = 0
    waited: int = 0                # batches that left requests of their shape waiting (the cap held)
    finished: int = 0
    cancelled: int = 0
    deep_full: int = 0             # request steps of cache=deep requests through the whole UNet
    deep_shallow: int = 0          # ... through the shallow path
    forwards: int = 0              # forwards run (a step with full and shallow rows runs two)


class DenoiseEngine:
    """Owns the UNet and the one thread that runs it."""

    def __init__(self, unet: UNet3DConditionModel, scheduler_config: dict[str, Any], device: torch.device,
                 dtype: torch.dtype, max_batch: int = 8, max_jobs: int = 64,
                 observer: EngineObserver | None = None, vae_scale_factor: int = DEFAULT_VAE_SCALE_FACTOR,
                 deep_cache_interval: int = 4, deep_cache_branch: int | None = 0,
                 deep_cache_compile: bool = False, latent_rgb: LatentRgb | None = None,
                 short_attention: str = "auto", temporal_conv: str = "conv3d", cross_attention: str = "video") -> None:
        """``vae_scale_factor``: pixels per latent along a side, the model's VAE's (``from_folder`` reads it
        from the folder); latents are height / factor x width / factor. ``latent_rgb``: the model's latent ->
        RGB map for previews (``from_folder`` reads vae/latent_rgb.json); None = previews unavailable.
        ``short_attention``: "triton" runs the self-attention of short sequences (the temporal attention's
        frames) as one Triton kernel, "auto" where it is available, "sdpa" never (short_attention.py).
        ``temporal_conv``: "conv2d" runs the temporal convolutions as 2-D ones, which Inductor lays out
        channels-last; "conv3d" as diffusers has them (temporal_conv.py; the server settles its "auto").
        ``cross_attention``: "video" projects a video's prompt to keys and values once and attends all its
        frames to them in one call, "frame" once a frame as diffusers does (cross_attention.py)."""
        self.unet = unet
        self.temporal_conv = temporal_conv
        install_temporal_conv(unet, temporal_conv)      # before the processors: it swaps layers, they swap calls
        self.short_attention = install_short_attention(unet, short_attention, device, dtype)
        # last: it wraps the processors the line above chose; "frame" where there is no cross-attention to share
        self.cross_attention = "video" if install_cross_attention(unet, cross_attention) else "frame"
        if latent_rgb is not None and latent_rgb.channels != int(unet.config.in_channels):
            # a map fitted for another model: previews unavailable (each asking job is told), the videos are made
            log.warning(kv("latent_rgb_unusable", map_channels=latent_rgb.channels,
                           unet_channels=int(unet.config.in_channels),
                           fix="fit the map for this model: t2v fit-preview MODEL_FOLDER"))
            latent_rgb = None
        self.latent_rgb = latent_rgb
        self._rgb = latent_rgb.tensors(device) if latent_rgb is not None else None   # (weights, bias) there
        self.vae_scale_factor = vae_scale_factor
        self.scheduler_config = scheduler_config
        self.device, self.dtype = device, dtype
        self.max_batch, self.max_jobs = max_batch, max_jobs
        self.stats = EngineStats()
        self.observer = observer or EngineObserver()
        self._timer = StepTimer(self.observer, device)
        self._inbox: list[Job] = []
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._last_key: tuple[int, int, int] | None = None   # the shape stepped last (shapes take turns)
        self._thread = threading.Thread(target=self._loop, name="denoise-engine", daemon=True)
        self._forward = self._eager_forward
        self.compile_rows: set[int] = set()
        self.compile_backend = "inductor"
        self._aot: Any = None                     # aot.AotBuckets, with use_compile(backend="precompile" or "aoti")
        self._graphed: Any = None                              # GraphedUNet, once use_cuda_graphs()
        self.plans: dict[tuple[int, int, int], dict[str, Any]] = {}   # shape -> measured buckets, cap
        self._cap_rows: dict[tuple[int, int, int], int] = {}
        # DeepCache (deepcache.py): off with interval 0 (requests with cache=deep are refused then).
        if deep_cache_interval < 0:
            raise ValueError(f"deep_cache_interval is {deep_cache_interval}; it must be 0 (off) or a number of steps")
        self.deep_interval = int(deep_cache_interval)
        self._deep = DeepCacheUNet(unet, deep_cache_branch) if self.deep_interval else None
        self.deep_branch = self._deep.branch if self._deep is not None else None
        self.deep_compile = deep_cache_compile
        self._deep_full: Any = self._deep.full if self._deep is not None else None
        self._deep_shallow: Any = self._deep.shallow if self._deep is not None else None
        self._deep_graphs: list[Any] = []
        self._deep_clock: dict[tuple[int, int, int], int] = {}    # shape -> its steps with deep requests
        self._later: list[tuple[str, Callable[[], None]]] = []    # warm(defer=True)'s captures, run when idle
        self._later_seconds, self._later_failed = 0.0, 0

    @property
    def max_rows(self) -> int:
        return 2 * self.max_batch

    def cap_rows(self, key: tuple[int, int, int]) -> int:
        """Most UNet rows a batch of this shape takes: the fastest measured size once warm() measured
        it (batching.batch_cap), else every request up to max_batch."""
        return self._cap_rows.get(key, self.max_rows)

    def _eager_forward(self, sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor
                       ) -> torch.Tensor:
        return self.unet(sample, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]

    def use_cuda_graphs(self) -> None:
        """Replay captured CUDA graphs for the UNet forward (CUDA only); see graphs.py."""
        from services.denoiser.graphs import GraphedUNet

        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; this engine runs on " + str(self.device))
        buckets = batching.graph_buckets(self.max_rows, self.compile_rows)
        self._graphed = GraphedUNet(self._forward, device=self.device, buckets=buckets)
        self._forward = self._graphed
        if self._deep is not None:
            graphed = self._graphed
            self._deep_full = GraphedUNet(self._deep_full, device=self.device, buckets=buckets, name="deep_full",
                                          pool=graphed.pool, seconds=graphed._seconds)
            self._deep_shallow = GraphedUNet(self._deep_shallow, device=self.device, buckets=buckets,
                                             name="deep_shallow", pool=graphed.pool, seconds=graphed._seconds)
            self._deep_graphs = [self._deep_full, self._deep_shallow]

    def use_compile(self, rows: set[int], backend: str = "inductor", folder: str | Path | None = None) -> None:
        """Compile the UNet for batches of exactly these row counts (CUDA-graph buckets); call before
        use_cuda_graphs(), which then captures the compiled forward. Other batch sizes stay eager.

        ``backend``: "inductor" = torch.compile (static shapes); "precompile" or "aoti" = a package per
        bucket in ``folder/packages`` (the compile cache's folder, which ``folder`` must be), built on the
        first start and loaded without tracing on the next (aot.py: Dynamo's ahead-of-time compile, or
        AOTInductor; torch.compile for a bucket whose model does not build). DeepCache's forwards, with
        deep_cache_compile, are torch.compile'd with any.

        Why per bucket: compiling fuses the GroupNorm/SiLU/elementwise traffic; replayed as CUDA
        graphs on an H200 (docs/benchmarks.md, 2026-12-01) a compiled 2-row forward took 36.9 ms
        against 55.2 ms eager and a 32-row one 446 ms against 641 ms. Each compiled size costs ~100 s
        of warm-up on an empty compile cache (~27 s on a warm one, see compile_cache.py, most of it
        Dynamo tracing again: what the packages remove), and a dynamic-batch compilation took over 8 minutes.
        warm() pays the compilations before SERVING.
        """
        if backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile backend {backend!r} is unknown; choose {' or '.join(COMPILE_BACKENDS)}")
        if backend != "inductor" and folder is None:
            raise ValueError(f"the {backend} compile backend keeps its packages in the compile cache: give its "
                             "folder (--compile-cache)")
        eager = self._forward
        self.compile_rows = set(rows)
        self.compile_backend = backend
        if backend != "inductor":
            from services.denoiser.aot import AotBuckets

            self._aot = buckets = AotBuckets(self.unet, folder, embedding_dim=self.embedding_dim, kind=backend)
            self._eager_for_aot = eager        # what warm() seals the packages with

            def forward(sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
                if sample.shape[0] not in rows:
                    return eager(sample, timesteps, embeddings)
                return buckets(sample, timesteps, embeddings)
        else:
            compiled = torch.compile(self.unet, dynamic=False)

            def forward(sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
                if sample.shape[0] not in rows:
                    return eager(sample, timesteps, embeddings)
                return compiled(sample, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]

        self._forward = forward
        if self._deep is not None and self.deep_compile:
            self._deep_full = _compiled_for(rows, self._deep_full)
            self._deep_shallow = _compiled_for(rows, self._deep_shallow)

    @property
    def aot_counts(self) -> dict[str, int]:
        """With a package backend (use_compile): how many buckets' packages were loaded, built, rebuilt (the one
        there did not load) or fell back to torch.compile; empty otherwise."""
        return dict(self._aot.counts) if self._aot is not None else {}

    def use_row_split(self, split: Callable[[Forward], Forward]) -> None:
        """Wrap the UNet forward as it stands (eager, compiled or graphed) in ``split``: CFG-parallel
        (cfg_parallel.RowSplit) runs part of every batch's rows on a second device. Call last."""
        self._forward = split(self._forward)

    def warm_rows(self) -> list[int]:
        """The batch sizes (rows) warm() runs: every CUDA-graph bucket, else the powers of two up to
        max_rows and the compiled sizes."""
        if self._graphed is not None:
            return list(self._graphed.buckets)
        return sorted(set(batching.powers_of_two_up_to(self.max_rows)) | self.compile_rows)

    @torch.inference_mode()
    def warm(self, shapes: list[tuple[int, int, int]], tokens: int = 77,
             known: dict[tuple[int, int, int], dict[int, float]] | None = None, defer: bool = False
             ) -> dict[str, float]:
        """Run (and capture, with CUDA graphs) every batch size for each (frames, height, width) now,
        so the first users do not pay for compilation, kernel selection or graph capture. With CUDA
        graphs, also time each bucket's replay: the times choose the padding and cap the batch at the
        size that makes the most rows a second (batching.py).

        ``known`` (shape -> bucket rows -> seconds, as ``measured()`` returns them) are the times an
        earlier start measured on this GPU (the server keeps them with the compile cache): a shape
        with times for every bucket is not timed again, and only the buckets a batch can run in
        (``used_buckets``) are warmed; the others are captured if ever needed.

        ``defer``: with such times, only the compiled buckets are warmed now; the eager buckets' and
        DeepCache's graph captures (~1 s each, 19 s of a 94-s warm start on an H200) are left to the engine
        thread, which runs them one at a time while it has no request (a request arriving meanwhile waits
        for at most the one capture under way; one that needs a graph not captured yet captures it
        itself, as it always could). Returns the seconds spent: compiled buckets (compilation included),
        eager buckets, DeepCache's forwards, timing, and how many captures were deferred."""
        if defer and self._thread.is_alive():
            raise RuntimeError("warm(defer=True) must run before start(): the engine thread runs what it defers")
        spent = {"compiled_s": 0.0, "eager_s": 0.0, "deep_s": 0.0, "timing_s": 0.0, "deferred": 0}
        for frames, height, width in shapes:
            key = (frames, height, width)
            try:
                sample_shape = (self.latent_channels, frames, *self.latent_size(height, width))
            except ValueError as exc:
                raise ValueError(f"warm shape {frames}x{height}x{width}: {exc}") from None
            rows_to_warm = self.warm_rows()
            stored = (known or {}).get(key)
            reuse = self._graphed is not None and bool(stored) and set(stored) == set(self._graphed.buckets)
            if reuse:
                assert stored is not None
                self._graphed.remember(sample_shape, stored)
                self.set_plan(key, stored)
                rows_to_warm = self.used_buckets(key)

            def inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                return (torch.zeros((rows, *sample_shape), device=self.device, dtype=self.dtype),
                        torch.full((rows,), 999, device=self.device),
                        torch.zeros((rows, tokens, self.embedding_dim), device=self.device, dtype=self.dtype))

            later = defer and reuse
            for rows in rows_to_warm:
                if later and rows not in self.compile_rows:
                    self._later.append((f"unet {rows} rows {'x'.join(map(str, key))}",
                                        lambda rows=rows, make=inputs: self._forward(*make(rows))))
                    continue
                with self._clock(spent, "compiled_s" if rows in self.compile_rows else "eager_s"):
                    self._forward(*inputs(rows))
                log.debug(kv("warmed", shape="x".join(map(str, key)), rows=rows, **spent))
            if self._graphed is not None and not reuse:
                shapes_ = (sample_shape, (), (tokens, self.embedding_dim))
                dtypes = (self.dtype, torch.long, self.dtype)
                with self._clock(spent, "timing_s"):
                    seconds = {rows: self._graphed.time(rows, shapes_, dtypes) for rows in self._graphed.buckets}
                self.set_plan(key, seconds)
            # DeepCache's two forwards, in the buckets a batch can run in (graphs: now that the plan says which;
            # else the compiled sizes: an eager forward on the CPU has nothing to capture or compile)
            deep_rows = self.used_buckets(key) if self._graphed is not None else sorted(self.compile_rows)
            for rows in deep_rows if self._deep is not None and (self._graphed is not None or self.deep_compile) else ():
                def deep(rows: int = rows, make: Callable = inputs) -> None:
                    sample, timesteps, embeddings = make(rows)
                    _, features = self._deep_full(sample, timesteps, embeddings)
                    self._deep_shallow(sample, timesteps, embeddings, features)

                if later and not (self.deep_compile and rows in self.compile_rows):   # no compile while serving
                    self._later.append((f"deepcache {rows} rows {'x'.join(map(str, key))}", deep))
                    continue
                with self._clock(spent, "deep_s"):
                    deep()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._aot is not None:
            self._aot.seal(self._eager_for_aot)
        spent["deferred"] = len(self._later)
        return {k: round(v, 2) for k, v in spent.items()}

    @property
    def deferred(self) -> int:
        """How many of warm(defer=True)'s captures are still to run."""
        return len(self._later)

    def _run_one_later(self) -> None:
        """One deferred capture, in the engine thread while no request waits (_loop calls it). One that fails
        is logged and dropped: the bucket is then captured when a batch first needs it, as without defer."""
        what, capture = self._later.pop(0)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                capture()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - a warm-up left for later must never stop the engine
            self._later_failed += 1
            log.exception(kv("warm_later_failed", what=what, then="captured when a batch first needs it"))
        self._later_seconds += time.perf_counter() - started
        if not self._later:
            log.info(kv("warm_later_done", seconds=round(self._later_seconds, 2), failed=self._later_failed))

    @contextmanager
    def _clock(self, spent: dict[str, float], name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        spent[name] += time.perf_counter() - started

    def used_buckets(self, key: tuple[int, int, int]) -> list[int]:
        """The buckets a batch of shape ``key`` can run in, by its plan: each size up to its cap (and 2,
        a guided request alone) padded as ``batching.choose_bucket`` pads it."""
        assert self._graphed is not None
        seconds = self._seconds_of(key)
        top = max(self.cap_rows(key), 2)
        used = {batching.choose_bucket(rows, self._graphed.buckets, seconds) for rows in range(1, top + 1)}
        return sorted(b for b in used if b is not None)

    def _seconds_of(self, key: tuple[int, int, int]) -> dict[int, float]:
        frames, height, width = key
        assert self._graphed is not None
        return self._graphed.seconds((self.latent_channels, frames, *self.latent_size(height, width)))

    def measured(self) -> dict[tuple[int, int, int], dict[int, float]]:
        """Each warmed shape's bucket times (rows -> seconds a replay), for ``warm(known=...)`` next time."""
        if self._graphed is None:
            return {}
        return {key: self._seconds_of(key) for key in self.plans if self._seconds_of(key)}

    def set_plan(self, key: tuple[int, int, int], seconds: dict[int, float]) -> None:
        """Cap batches of shape ``key`` at the rows ``seconds`` (bucket rows -> seconds a forward) say
        run fastest per row; never above max_rows."""
        cap = min(batching.batch_cap(seconds) or self.max_rows, self.max_rows)
        self._cap_rows[key] = cap
        self.plans[key] = {"cap_rows": cap, "ms": {rows: round(s * 1e3, 2) for rows, s in sorted(seconds.items())},
                           "compiled": sorted(self.compile_rows)}
        log.info(kv("batch_plan", shape="x".join(map(str, key)), cap_rows=cap,
                    ms=",".join(f"{r}:{s * 1e3:.1f}" for r, s in sorted(seconds.items()))))

    @classmethod
    def from_folder(cls, model: str | Path, device: torch.device, dtype: torch.dtype, **kwargs: Any
                    ) -> "DenoiseEngine":
        unet = UNet3DConditionModel.from_pretrained(model_part(model, "unet"), dtype=dtype)
        unet.to(device).eval().requires_grad_(False)
        scheduler_config = dict(DDIMScheduler.load_config(model_part(model, "scheduler")))
        return cls(unet, scheduler_config, device, dtype, vae_scale_factor=vae_scale_factor(model),
                   latent_rgb=LatentRgb.load(model), **kwargs)

    # --- what the model accepts ------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def embedding_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def default_size(self) -> int:
        """diffusers' default height and width: unet sample_size * the VAE scale factor."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, C, F, h, w] latents -> uint8 [F, h, w, 3]: the latent -> RGB map, on the latents' device, with
        no wait for it (a few kernels on a few thousand numbers)."""
        if self._rgb is None:
            raise ValueError("previews are unavailable: this engine has no latent -> RGB map")
        return map_to_rgb(*self._rgb, latents[0])

    def _send_preview(self, job: Job) -> None:
        """A preview for ``job`` now; one that fails is logged and left out: it never fails the batch."""
        try:
            job.events.put(Preview(job.index, len(job.timesteps), self.preview(job.latents)))
        except Exception:  # noqa: BLE001 - a preview is a courtesy; the video goes on
            log.exception(kv("preview_failed", job_id=job.request.request_id, step=job.index))

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latents of a height x width video; raises ValueError unless both are multiples
        of the VAE scale factor (else the decoded video would be smaller than asked, silently)."""
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ValueError(f"{name} is {value}; it must be a positive multiple of {factor} (this model's "
                                 "VAE scale factor)")
        return height // factor, width // factor

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> "DenoiseEngine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Let active jobs run for up to ``timeout`` seconds, then fail the rest as EngineStopped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        while self.active_jobs() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            leftover = self._inbox + self._active
            self._inbox, self._active = [], []
            self._cond.notify_all()
        for job in leftover:
            self.observer.request_done("failed")
            job.events.put(Failed(EngineStopped("the denoiser stopped before this request finished")))
        self._thread.join(timeout=5)

    def submit(self, request: Request) -> Job:
        job = Job(request)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the denoiser is shutting down")
            if len(self._inbox) + len(self._active) >= self.max_jobs:
                raise EngineFull(f"the denoiser already runs {self.max_jobs} requests; retry later")
            self._inbox.append(job)
            self._cond.notify_all()
        return job

    def active_jobs(self) -> int:
        with self._cond:
            return len(self._inbox) + len(self._active)

    # --- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._active:
                    if self._stopping:
                        if self._later:
                            log.info(kv("warm_later_dropped", captures=len(self._later), why="stopping"))
                        return
                    if self._later:
                        break
                    self._cond.wait()
                idle = not self._inbox and not self._active
                new, self._inbox = self._inbox, []
            if idle:
                self._run_one_later()
                continue
            for job in new:
                self._admit(job)
            self._drop_cancelled()
            batch = self._pick_batch()
            if not batch:
                continue
            try:
                self._step(batch)
            except Exception as exc:  # noqa: BLE001 - a failed forward fails its batch, not the engine
                log.exception(kv("step_failed", jobs=",".join(j.request.request_id for j in batch)))
                self._retire(batch, Failed(exc))

    def _admit(self, job: Job) -> None:
        r = job.request
        try:
            if r.cache not in CACHE_MODES:
                raise ValueError(f"cache {r.cache!r} is unknown; choose {' or '.join(CACHE_MODES)}")
            if r.cache == "deep" and self._deep is None:
                raise ValueError("cache is deep, but this engine runs with DeepCache off (deep_cache_interval 0)")
            if r.preview_every and self._rgb is None:
                raise ValueError("previews are unavailable: the model folder has no vae/latent_rgb.json")
            job.scheduler = sampling.make_scheduler(r.scheduler, self.scheduler_config)
            job.scheduler.set_timesteps(r.num_inference_steps, device=self.device)
            job.timesteps = job.scheduler.timesteps
            job.timestep_values = [int(t) for t in job.timesteps.tolist()]   # read once: no GPU sync per step
            if r.resume is None:
                shape = (1, self.latent_channels, r.num_frames, *self.latent_size(r.height, r.width))
                job.latents, job.generator = sampling.initial_latents(
                    shape, r.seed, self.device, self.dtype, job.scheduler.init_noise_sigma)
            else:
                self._resume(job, r.resume)
            job.kwargs = sampling.step_kwargs(job.scheduler, job.generator)
            job.embeddings = r.embeddings.to(self.device, self.dtype)
        except Exception as exc:  # noqa: BLE001
            self.observer.request_done("failed")
            job.events.put(Failed(exc))
            return
        with self._cond:
            self._active.append(job)

    def _resume(self, job: Job, checkpoint: Checkpoint) -> None:
        """Start ``job`` where ``checkpoint`` left off: its latents, its scheduler's history, its step.

        The generator is seeded as a fresh run's but draws nothing: the schedulers here draw no noise
        in their steps (sampling.py says why), so its state after the initial noise does not matter."""
        r, total = job.request, len(job.timestep_values)
        if not 1 <= checkpoint.step < total:
            raise ValueError(f"the checkpoint is at step {checkpoint.step}; a run of {total} steps "
                             f"resumes from step 1 to {total - 1}")
        job.latents = checkpoint.latents.to(self.device, self.dtype)
        job.generator = torch.Generator("cpu").manual_seed(r.seed)
        sampling.restore_history(job.scheduler, checkpoint.step, checkpoint.history, self.device)
        job.index = checkpoint.step

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [j for j in self._active if j.cancelled.is_set()]
        for job in gone:
            self.stats.cancelled += 1
            self.observer.request_done("cancelled")
            log.info(kv("cancelled", job_id=job.request.request_id, steps_run=job.index,
                        steps=job.request.num_inference_steps))
        self._retire(gone, None)

    def _pick_batch(self) -> list[Job]:
        """The next shape in turn, and its jobs in arrival order, up to max_batch requests and the
        shape's row cap (the fastest measured batch size); the rest wait for the next steps.

        Shapes take turns step by step, so a long job of one shape never stalls the jobs of another
        (and the gateway's priorities keep their meaning); within a shape, the oldest jobs go first,
        so the jobs in a batch stay in it until they finish and the waiting ones take their places.
        """
        with self._cond:
            if not self._active:
                return []
            keys = list(dict.fromkeys(job.shape_key for job in self._active))   # in arrival order
            key = keys[(keys.index(self._last_key) + 1) % len(keys)] if self._last_key in keys else keys[0]
            self._last_key = key
            jobs = [job for job in self._active if job.shape_key == key]
        count = batching.take([job.rows for job in jobs], self.cap_rows(key), self.max_batch)
        if count < len(jobs):
            self.stats.waited += 1
        return jobs[:count]

    def _retire(self, jobs: list[Job], event: Event | None) -> None:
        with self._cond:
            self._active = [j for j in self._active if j not in jobs]
        for job in jobs:
            if isinstance(event, Failed):
                self.observer.request_done("failed")
            job.events.put(event if event is not None else Cancelled(job.index))

    def _split(self, batch: list[Job]) -> tuple[list[Job], list[Job]]:
        """The jobs of ``batch`` that run the whole UNet this step, and those that run DeepCache's
        shallow path (each list in batch order).

        A deep job runs the whole UNet on its first step (or the first after a resume), when its
        features are ``deep_interval - 1`` steps old, and on every ``deep_interval``-th step of its shape
        (the shape's clock), so deep jobs that arrived at different steps fall into one phase and the
        steps in between run one large shallow forward."""
        if not any(job.deep for job in batch):
            return batch, []
        key = batch[0].shape_key
        clock = self._deep_clock.get(key, 0)
        self._deep_clock[key] = clock + 1
        phase = clock % self.deep_interval == 0
        full, shallow = [], []
        for job in batch:
            due = job.features is None or job.since_full + 1 >= self.deep_interval or phase
            (full if not job.deep or due else shallow).append(job)
        return full, shallow

    @staticmethod
    def _inputs(jobs: list[Job]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """The UNet inputs of ``jobs``: samples (scaled, doubled for guidance), timesteps, embeddings, and
        each job's rows.

        The scheduler gets each timestep as a Python int, never as the device tensor: DDIM indexes its
        CPU table with it and compares it with 0, which with a CUDA tensor makes the CPU wait for the
        GPU every step (the GPU then idles while Python prepares the next one). The UNet gets the tensor."""
        inputs, embeddings, timesteps, rows = [], [], [], []
        for job in jobs:
            t = job.timestep_values[job.index]
            x = torch.cat([job.latents] * 2) if job.request.uses_guidance else job.latents
            inputs.append(job.scheduler.scale_model_input(x, t))
            embeddings.append(job.embeddings)
            timesteps.append(job.timesteps[job.index].reshape(1).expand(x.shape[0]))
            rows.append(x.shape[0])
        return torch.cat(inputs), torch.cat(timesteps), torch.cat(embeddings), rows

    def _forward_full(self, jobs: list[Job]) -> list[torch.Tensor]:
        """The whole UNet for ``jobs``; each one's noise. Through the exact forward unless a deep job
        needs its features (then DeepCache's full forward, which keeps them)."""
        sample, timesteps, embeddings, rows = self._inputs(jobs)
        if not any(job.deep for job in jobs):
            return list(self._forward(sample, timesteps, embeddings).split(rows))
        noise, features = self._deep_full(sample, timesteps, embeddings)
        for job, kept in zip(jobs, features.split(rows)):
            if job.deep:
                job.features, job.since_full = kept, 0
        return list(noise.split(rows))

    def _forward_shallow(self, jobs: list[Job]) -> list[torch.Tensor]:
        sample, timesteps, embeddings, rows = self._inputs(jobs)
        features = torch.cat([job.features for job in jobs])
        noise = self._deep_shallow(sample, timesteps, embeddings, features)
        for job in jobs:
            job.since_full += 1
        return list(noise.split(rows))

    @torch.inference_mode()
    def _step(self, batch: list[Job]) -> None:
        with self._timer.step(len(batch)):
            full, shallow = self._split(batch)
            noise: dict[int, torch.Tensor] = {}
            for jobs, forward in ((full, self._forward_full), (shallow, self._forward_shallow)):
                if jobs:
                    noise.update(zip(map(id, jobs), forward(jobs)))
                    self.stats.forwards += 1
            self.stats.steps += 1
            self.stats.requests_stepped += len(batch)
            self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(batch))
            self.stats.max_rows_seen = max(self.stats.max_rows_seen, sum(job.rows for job in batch))
            if shallow or any(job.deep for job in full):
                deep_full = sum(1 for job in full if job.deep)
                self.stats.deep_full += deep_full
                self.stats.deep_shallow += len(shallow)
                self.observer.cache_steps(deep_full, len(shallow))

            done = []
            for job in batch:
                pred, r = noise[id(job)], job.request
                if r.uses_guidance:
                    pred = sampling.apply_guidance(pred, r.guidance_scale)
                t = job.timestep_values[job.index]
                job.latents = sampling.scheduler_step(job.scheduler, pred, t, job.latents, job.kwargs)
                job.events.put(Step(job.index + 1, len(job.timesteps), t))
                job.index += 1
                if job.wants_checkpoint():
                    job.events.put(Checkpoint(job.index, job.latents, sampling.save_history(job.scheduler)))
                if job.wants_preview():
                    self._send_preview(job)
                if job.index == len(job.timesteps):
                    done.append(job)
        for job in done:
            job.features = None
            self.stats.finished += 1
            self.observer.request_done("finished")
            with self._cond:
                self._active.remove(job)
            job.events.put(Finished(job.latents.to("cpu"), job.index))


def _compiled_for(rows: set[int], forward: Any) -> Any:
    """``forward`` through torch.compile (static shapes) for batches of exactly ``rows`` rows, eager otherwise."""
    compiled = torch.compile(forward, dynamic=False)

    def call(*inputs: torch.Tensor) -> Any:
        return compiled(*inputs) if inputs[0].shape[0] in rows else forward(*inputs)

    return call


def compile_seconds(top: int = 12) -> dict[str, float]:
    """Where this process's torch.compile time went, by Dynamo's own timers (seconds, summed over every
    compilation; the largest ``top``): a warm start's log says how much was tracing (``_compile.compile_inner``
    less the backend's ``compile_fx``), Inductor loading cached graphs, and Triton loading kernels. Empty if
    nothing was compiled or the timers cannot be read (they are torch internals)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        seconds = {str(n): round(float(v), 2) for n, v in zip(names, values)}
    except Exception:  # noqa: BLE001 - a diagnostic only: no timers, no line
        return {}
    return dict(sorted(seconds.items(), key=lambda kv: -kv[1])[:top])
