"""Denoiser gRPC servicer: checks a DenoiseRequest, hands it to the engine, streams its events."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import grpc
import torch

from services.common.config import ModelConfig, parse_config, setting
from services.common.contract import CACHE_MODES, DEFAULT_CACHE, TEXT_TOKENS
from services.common.errors import (Cancelled, InvalidArgument, ResourceExhausted, ServiceError, Unavailable,
                                    grpc_errors)
from services.common.latent_rgb import UNAVAILABLE
from services.common.logs import kv
from services.common.model_folder import resolve_device, resolve_dtype
from services.common.png import encode_png, frame_grid
from services.common.server import ReadyGate, run_stage
from services.common.tracing import Tracing
from services.common.tensors import check_finite, dtype_name, from_proto, to_proto
from services.denoiser import engine as eng
from services.denoiser.cfg_parallel import CfgParallel, second_device
from services.denoiser import sampling
from services.denoiser.compile_cache import load_plans, save_plans
from services.denoiser.metrics import DenoiserMetrics
from services.denoiser.sampling import SCHEDULERS
from services.denoiser.cross_attention import KINDS as CROSS_ATTENTION_KINDS
from services.denoiser.short_attention import KINDS as SHORT_ATTENTION_KINDS
from services.denoiser.temporal_conv import KINDS as TEMPORAL_CONV_KINDS
from services.denoiser.temporal_conv import resolve as resolve_temporal_conv
from t2v.v1 import denoiser_pb2, denoiser_pb2_grpc, generation_pb2, tensor_pb2

SERVICE_NAME = "t2v.v1.Denoiser"
log = logging.getLogger("denoiser")


@dataclass(frozen=True)
class DenoiserConfig(ModelConfig):
    port: int = setting(50052, "port to listen on (0 = any free port)")
    max_batch: int = setting(8, "most requests that share one UNet forward")
    max_jobs: int = setting(64, "most requests active at once; more get RESOURCE_EXHAUSTED")
    max_frames: int = setting(64, "largest num_frames accepted")
    max_size: int = setting(1024, "largest height or width accepted, in pixels")
    max_steps: int = setting(500, "largest num_inference_steps accepted")
    cuda_graphs: str = setting("auto", "replay the UNet as CUDA graphs: on, off, auto (= on when the device is CUDA)")
    compile_rows: str = setting("", "UNet batch sizes in rows (2 per request with guidance) to torch.compile, "
                                    "e.g. 2,32: 33% and 30% faster there on an H200, ~100 s of warm-up each on an empty "
                                    "compile cache")
    warm_shapes: str = setting("", "shapes to warm at start, FRAMESxHEIGHTxWIDTH comma-separated, e.g. 16x256x256")
    gpu: int = setting(-1, "pin this denoiser to GPU N (= --device cuda:N); -1 = as --device says")
    cfg_parallel: bool = setting(False, "CFG-parallel: run half the UNet rows of every step (a lone request's "
                                        "conditional half) on a second device at once, for lower latency")
    cfg_parallel_device: str = setting("auto", "the second device of --cfg-parallel (auto = the next GPU after "
                                               "--device, or cpu on a CPU)")
    compile_backend: str = setting("auto", "how --compile-rows are compiled: precompile (Dynamo's ahead-of-time "
                                           "compile: a package per bucket, built into --compile-cache on the first "
                                           "start, loaded without tracing after: a warm restart SERVING in ~35 s "
                                           "on an H200, against ~94 s), inductor (torch.compile; a warm cache "
                                           "still traces the UNet again at each start), aoti (AOTInductor "
                                           "packages, slower to build, unmeasured), or auto (= precompile with "
                                           "--compile-cache, else inductor)")
    warm_later: bool = setting(True, "on a warm restart (bucket times stored in --compile-cache), capture the "
                                     "uncompiled buckets' and DeepCache's CUDA graphs after SERVING, while idle, "
                                     "instead of before (19 s of a 94-s start on an H200)")
    compile_cache: str = setting("", "folder for torch.compile's caches (Inductor, AOTAutograd, Triton), kept in "
                                     "a subfolder per torch/Triton/CUDA/GPU; a stale or foreign one is rebuilt "
                                     "(empty = torch's default, unkeyed, in /tmp)")
    deep_cache_interval: int = setting(4, "for requests with cache=deep: the whole UNet every N-th step, DeepCache's "
                                          "shallow path between (1 = every step full; 0 = refuse cache=deep); 4 "
                                          "with branch 0 made 1.84x the videos/s on an H200 (docs/benchmarks.md)")
    deep_cache_branch: int = setting(0, "DeepCache's skip branch: layers of the first resolution the shallow path "
                                        "runs (0 = the fewest: ~10% of the UNet's FLOPs on the 1.7B model, fastest; "
                                        "-1 = the whole first down- and last up-block, ~34%, most faithful)")
    short_attention: str = setting("auto", "self-attention of short sequences (the temporal attention's 16 "
                                           "frames): auto (= triton on a CUDA device with Triton, in fp16 or "
                                           "bf16, where its check at start passes; else sdpa), triton (one "
                                           "kernel a position and head: 58.6 -> 9.9 ms of a 32-row forward on "
                                           "an H200, docs/benchmarks.md run F), sdpa (PyTorch's fused kernels, "
                                           "whose tiles are mostly padding there)")
    temporal_conv: str = setting("auto", "the temporal convolutions (kernel 3x1x1 over frames): auto (= conv2d "
                                         "on a CUDA device with --compile-rows, else conv3d), conv2d (the same "
                                         "sums as a 2-D convolution over frames x pixels, which torch.compile "
                                         "lays out channels-last: a compiled 32-row forward 3% faster on an "
                                         "H200, docs/benchmarks.md run G; eager forwards not timed), conv3d (as "
                                         "diffusers has them)")
    cross_attention: str = setting("video", "the prompt's cross-attention: video (its keys and values projected "
                                            "once a video and all its frames' queries attended to them in one "
                                            "call: the same numbers to rounding, 15 of 16 projections fewer at "
                                            "16 frames; a compiled 32-row forward 1.2% faster on an H200, "
                                            "docs/benchmarks.md run J), frame (once a frame, as diffusers does)")
    deep_cache_compile: bool = setting(False, "with compile_rows, torch.compile DeepCache's two forwards for those "
                                              "rows too (four more compilations for two sizes; not measured to the "
                                              "end on a GPU yet: off, they run as eager CUDA graphs)")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """"16x256x256,8x128x128" -> [(16, 256, 256), (8, 128, 128)]."""
    shapes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            frames, height, width = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"warm shape {item!r} is not FRAMESxHEIGHTxWIDTH, e.g. 16x256x256") from None
        shapes.append((frames, height, width))
    return shapes


def parse_rows(text: str) -> set[int]:
    """"2,32" -> {2, 32}: UNet batch sizes in rows."""
    try:
        rows = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"compile_rows {text!r} is not a comma-separated list of row counts, e.g. 2,32") from None
    if any(r < 1 for r in rows):
        raise ValueError(f"compile_rows {text!r}: every row count must be at least 1")
    return rows


def compile_backend(config: DenoiserConfig) -> str:
    """The backend --compile-backend names, ``auto`` resolved: precompiled packages where there is a compile
    cache to keep them in, else torch.compile."""
    if config.compile_backend == "auto":
        from services.denoiser.aot import precompile_available

        return "precompile" if config.compile_cache and precompile_available() else "inductor"
    return config.compile_backend


def check_compile(config: DenoiserConfig) -> None:
    """Raise ValueError (one line at start) for compile and kernel settings that cannot work together."""
    if config.short_attention not in SHORT_ATTENTION_KINDS:
        raise ValueError(f"--short-attention {config.short_attention!r} is unknown; choose "
                         f"{' or '.join(SHORT_ATTENTION_KINDS)}")
    if config.temporal_conv not in TEMPORAL_CONV_KINDS:
        raise ValueError(f"--temporal-conv {config.temporal_conv!r} is unknown; choose "
                         f"{' or '.join(TEMPORAL_CONV_KINDS)}")
    if config.cross_attention not in CROSS_ATTENTION_KINDS:
        raise ValueError(f"--cross-attention {config.cross_attention!r} is unknown; choose "
                         f"{' or '.join(CROSS_ATTENTION_KINDS)}")
    if config.compile_backend != "auto" and config.compile_backend not in eng.COMPILE_BACKENDS:
        raise ValueError(f"--compile-backend {config.compile_backend!r} is unknown; choose auto or "
                         f"{' or '.join(eng.COMPILE_BACKENDS)}")
    if compile_backend(config) != "inductor" and parse_rows(config.compile_rows) and not config.compile_cache:
        raise ValueError(f"--compile-backend {config.compile_backend} keeps its packages in the compile cache: give "
                         "--compile-cache DIR (T2V_COMPILE_CACHE), or use --compile-backend inductor")


def check_request(request: denoiser_pb2.DenoiseRequest, config: DenoiserConfig, engine: eng.DenoiseEngine
                  ) -> eng.Request:
    """Turn a DenoiseRequest into an engine Request, or raise InvalidArgument saying what to fix.

    ``engine`` says what the model accepts (embedding width, latent channels, VAE scale factor, compute
    dtype, schedule)."""
    embedding_dim = engine.embedding_dim
    if not 1 <= request.num_frames <= config.max_frames:
        raise InvalidArgument(f"num_frames is {request.num_frames}; it must be between 1 and {config.max_frames}")
    for name in ("height", "width"):
        value = getattr(request, name)
        factor = engine.vae_scale_factor    # the model's: a latent covers factor x factor pixels
        if value <= 0 or value % factor or value > config.max_size:
            raise InvalidArgument(f"{name} is {value}; it must be a positive multiple of {factor} (this model's "
                                  f"VAE scale factor), at most {config.max_size}")
    if not 1 <= request.num_inference_steps <= config.max_steps:
        raise InvalidArgument(f"num_inference_steps is {request.num_inference_steps}; "
                              f"it must be between 1 and {config.max_steps}")
    if not math.isfinite(request.guidance_scale) or request.guidance_scale < 0:
        raise InvalidArgument(f"guidance_scale is {request.guidance_scale}; it must be a number >= 0")
    if request.scheduler not in SCHEDULERS:
        raise InvalidArgument(f"scheduler {request.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    embeddings = from_proto(request.embeddings, "embeddings")
    rows = 2 if request.guidance_scale > 1.0 else 1
    # Tokens too: requests of one shape share a UNet forward, so a [2, 5, D] request would fail its batch.
    if embeddings.dim() != 3 or embeddings.shape[0] != rows or embeddings.shape[1] != TEXT_TOKENS \
            or embeddings.shape[2] != embedding_dim:
        order = "uncond, cond" if rows == 2 else "cond only"
        raise InvalidArgument(f"embeddings have shape {list(embeddings.shape)}; this model expects "
                              f"[{rows}, {TEXT_TOKENS}, {embedding_dim}] ({order} for guidance_scale "
                              f"{request.guidance_scale})")
    check_finite(embeddings, "embeddings")
    if request.checkpoint_every < 0:
        raise InvalidArgument(f"checkpoint_every is {request.checkpoint_every}; it must be 0 (no checkpoints) "
                              "or a positive number of steps")
    if request.preview_every < 0:
        raise InvalidArgument(f"preview_every is {request.preview_every}; it must be 0 (no previews) or a positive "
                              "number of steps")
    resume = check_resume(request, engine) if request.HasField("resume") else None
    cache = request.cache or DEFAULT_CACHE
    if cache not in CACHE_MODES:
        raise InvalidArgument(f"cache {request.cache!r} is unknown; choose one of {', '.join(CACHE_MODES)}")
    if cache == "deep" and not engine.deep_interval:
        raise InvalidArgument("cache is deep, but this denoiser runs with DeepCache off (--deep-cache-interval 0); "
                              "send cache none, or start the denoiser with --deep-cache-interval 3")
    return eng.Request(request_id=request.request_id, embeddings=embeddings, num_frames=request.num_frames,
                       height=request.height, width=request.width,
                       num_inference_steps=request.num_inference_steps,
                       guidance_scale=request.guidance_scale, seed=request.seed, scheduler=request.scheduler,
                       checkpoint_every=request.checkpoint_every, resume=resume, cache=cache,
                       # without a latent -> RGB map, none: Denoise says so in a warning event
                       preview_every=request.preview_every if engine.latent_rgb is not None else 0)


_RESTART = "or start over without resume"


def check_resume(request: denoiser_pb2.DenoiseRequest, engine: eng.DenoiseEngine) -> eng.Checkpoint:
    """Decode ``request.resume`` into an engine Checkpoint, or raise InvalidArgument saying what to fix.

    Why so strict: a checkpoint that does not fit the request (another scheduler, schedule, shape or
    dtype) would not fail, it would quietly make a different video; the caller must know."""
    checkpoint, steps = request.resume, request.num_inference_steps
    if checkpoint.scheduler != request.scheduler:
        raise InvalidArgument(f"resume was taken with scheduler {checkpoint.scheduler!r} and this request asks for "
                              f"{request.scheduler!r}; resume with scheduler {checkpoint.scheduler!r}, {_RESTART}")
    if checkpoint.num_inference_steps != steps:
        raise InvalidArgument(f"resume was taken on a schedule of {checkpoint.num_inference_steps} steps and this "
                              f"request asks for {steps}; resume with num_inference_steps "
                              f"{checkpoint.num_inference_steps}, {_RESTART}")
    if not 1 <= checkpoint.step <= steps - 1:
        raise InvalidArgument(f"resume.step is {checkpoint.step}; it must be between 1 and {steps - 1} "
                              f"(num_inference_steps - 1); leave resume unset to start from step 0")
    shape = [1, engine.latent_channels, request.num_frames, *engine.latent_size(request.height, request.width)]
    latents = _checkpoint_tensor(checkpoint.latents, "resume.latents", shape, engine.dtype)
    expected = sampling.history_length(request.scheduler, engine.scheduler_config, checkpoint.step)
    if len(checkpoint.model_outputs) != expected or checkpoint.lower_order_nums != expected:
        raise InvalidArgument(f"resume carries {len(checkpoint.model_outputs)} model outputs and lower_order_nums "
                              f"{checkpoint.lower_order_nums}; {request.scheduler} after {checkpoint.step} steps "
                              f"keeps {expected} of each; send the checkpoint as the denoiser sent it, {_RESTART}")
    outputs = tuple(_checkpoint_tensor(output, f"resume.model_outputs[{i}]", shape, engine.dtype)
                    for i, output in enumerate(checkpoint.model_outputs))
    return eng.Checkpoint(checkpoint.step, latents, sampling.History(outputs, checkpoint.lower_order_nums))


def _checkpoint_tensor(message: tensor_pb2.Tensor, name: str, shape: list[int], dtype: torch.dtype
                       ) -> torch.Tensor:
    """One tensor of a checkpoint: decodable, of the request's latent shape, in this engine's dtype, finite.

    The dtype must be the engine's own: converting would round (or widen) the values, and the resumed
    run would no longer equal an uninterrupted one."""
    tensor = from_proto(message, name)
    if list(tensor.shape) != shape:
        raise InvalidArgument(f"{name} has shape {list(tensor.shape)}; num_frames, height and width of this "
                              f"request make it {shape}; resume with the request that took the checkpoint, "
                              f"{_RESTART}")
    if tensor.dtype != dtype:
        raise InvalidArgument(f"{name} is {dtype_name(tensor.dtype)}; this denoiser computes in "
                              f"{dtype_name(dtype)}; resume on a denoiser that runs {dtype_name(tensor.dtype)}, "
                              f"{_RESTART}")
    check_finite(tensor, name)
    return tensor


def checkpoint_to_proto(checkpoint: eng.Checkpoint, request: eng.Request) -> denoiser_pb2.DenoiseCheckpoint:
    """The engine's checkpoint as a message; moves its tensors to the CPU here, in the gRPC thread, so
    the engine never waits for the copy."""
    return denoiser_pb2.DenoiseCheckpoint(
        step=checkpoint.step, latents=to_proto(checkpoint.latents), scheduler=request.scheduler,
        num_inference_steps=request.num_inference_steps,
        model_outputs=[to_proto(output) for output in checkpoint.history.model_outputs],
        lower_order_nums=checkpoint.history.lower_order_nums)


def preview_to_proto(preview: eng.Preview) -> generation_pb2.Preview:
    """The engine's preview as a PNG of its frames in a grid; moves the pixels to the CPU here, in the gRPC
    thread, so the engine never waits for the copy."""
    frames = preview.rgb.cpu().numpy()
    picture, columns, rows = frame_grid(frames)
    return generation_pb2.Preview(step=preview.step, total_steps=preview.total, png=encode_png(picture),
                                  num_frames=frames.shape[0], columns=columns, rows=rows,
                                  frame_width=frames.shape[2], frame_height=frames.shape[1])


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, config: DenoiserConfig) -> None:
        self.config = config
        self.gate = ReadyGate("denoiser")
        self.metrics = DenoiserMetrics()
        self.tracing = Tracing.for_service("t2v-denoiser", config.otlp_endpoint)   # off unless an endpoint is set
        self.engine: eng.DenoiseEngine | None = None
        self.split: CfgParallel | None = None          # --cfg-parallel: the second device's process
        check_compile(config)

    def load(self) -> None:
        started = time.monotonic()
        device = resolve_device(f"cuda:{self.config.gpu}" if self.config.gpu >= 0 else self.config.device)
        shapes = parse_shapes(self.config.warm_shapes)
        compile_rows = parse_rows(self.config.compile_rows)
        cache = None
        if compile_rows and self.config.compile_cache:
            from services.denoiser.compile_cache import CompileCache, identity

            cache = CompileCache(Path(self.config.compile_cache), identity(device))
            cache.open()
        try:
            engine = eng.DenoiseEngine.from_folder(
                self.config.model, device, resolve_dtype(self.config.dtype, device),
                max_batch=self.config.max_batch, max_jobs=self.config.max_jobs, observer=self.metrics,
                deep_cache_interval=self.config.deep_cache_interval,
                deep_cache_branch=None if self.config.deep_cache_branch < 0 else self.config.deep_cache_branch,
                deep_cache_compile=self.config.deep_cache_compile, short_attention=self.config.short_attention,
                temporal_conv=resolve_temporal_conv(self.config.temporal_conv, device, compiled=bool(compile_rows)),
                cross_attention=self.config.cross_attention)
            loaded = time.monotonic()
            if compile_rows:
                engine.use_compile(compile_rows, backend=compile_backend(self.config),
                                   folder=cache.folder if cache is not None else None)
            if self.config.cuda_graphs == "on" or (self.config.cuda_graphs == "auto" and device.type == "cuda"):
                engine.use_cuda_graphs()
            if self.config.cfg_parallel:
                self.split = self._start_cfg_parallel(engine, device)
                engine.use_row_split(self.split.wrap)
            # Bucket times measured by the start that wrote this cache: a warm start does not time them again.
            plan_identity = self._plan_identity(engine)
            known = load_plans(cache.folder, plan_identity) if cache is not None and cache.status == "warm" else {}
            spent = engine.warm(shapes, known=known, defer=self.config.warm_later)
            warmed = time.monotonic()
            if cache is not None:
                save_plans(cache.folder, plan_identity, engine.measured())
                cache.complete(compile_rows=sorted(compile_rows), compile_backend=engine.compile_backend,
                               warm_shapes=self.config.warm_shapes,
                               warm_seconds=round(warmed - loaded, 1))
        finally:
            if cache is not None:
                cache.close()
        log.info(kv("warm", load_s=round(loaded - started, 1), warm_s=round(warmed - loaded, 1),
                    compile_cache=cache.status if cache else "off", compile_rows=sorted(compile_rows),
                    compile_backend=engine.compile_backend,
                    **{f"packages_{status}": count for status, count in engine.aot_counts.items()},
                    buckets=",".join(map(str, engine.warm_rows())), plans_reused=len(known),
                    deep_cache=f"every {engine.deep_interval}, branch {engine.deep_branch}" if engine.deep_interval
                    else "off",
                    previews="on" if engine.latent_rgb is not None else "unavailable (no vae/latent_rgb.json)",
                    **spent))
        if compile_rows:
            log.info(kv("compile_times", **{re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_"): s
                                            for name, s in eng.compile_seconds().items()}))
        self.engine = engine.start()
        self.metrics.watch_active(self.engine.active_jobs)

    def _start_cfg_parallel(self, engine: eng.DenoiseEngine, device: torch.device) -> CfgParallel:
        other = second_device(device, self.config.cfg_parallel_device)
        split = CfgParallel.start(self.config.model, device, other, engine.dtype, engine.short_attention,
                                  engine.temporal_conv, engine.cross_attention)
        log.info(kv("cfg_parallel", devices=f"{device},{other}"))
        return split

    def _plan_identity(self, engine: eng.DenoiseEngine) -> dict:
        """What the engine's bucket times depend on besides the GPU and software (the cache folder's key)."""
        from services.denoiser.aot import inductor_tuning

        return {"unet": json.loads(json.dumps(dict(engine.unet.config), sort_keys=True, default=str)),
                "dtype": str(engine.dtype), "buckets": engine.warm_rows(), "compile_rows": sorted(engine.compile_rows),
                "compile_backend": engine.compile_backend, "short_attention": engine.short_attention,
                "temporal_conv": engine.temporal_conv, "cross_attention": engine.cross_attention,
                "inductor": inductor_tuning()}

    def close(self, timeout: float) -> None:
        if self.engine is not None:
            self.engine.stop(timeout)
        if self.split is not None:
            self.split.close()

    @grpc_errors
    def Denoise(self, request: denoiser_pb2.DenoiseRequest, context: grpc.ServicerContext
                ) -> Iterator[denoiser_pb2.DenoiseEvent]:
        self.gate.check()
        assert self.engine is not None
        checked = check_request(request, self.config, self.engine)
        try:
            job = self.engine.submit(checked)
        except eng.EngineFull as exc:
            raise ResourceExhausted(str(exc)) from None
        except eng.EngineStopped as exc:
            raise Unavailable(str(exc)) from None
        if not context.add_callback(job.cancel):   # False: the call ended before it was watched (its caller
            job.cancel()                           # cancelled, its deadline passed); else the job ran for nobody
        log.info(kv("accepted", job_id=checked.request_id, frames=checked.num_frames, height=checked.height,
                    width=checked.width, steps=checked.num_inference_steps, scheduler=checked.scheduler,
                    checkpoint_every=checked.checkpoint_every, cache=checked.cache,
                    preview_every=checked.preview_every,
                    resume_step=checked.resume.step if checked.resume else 0))
        if request.preview_every > 0 and checked.preview_every == 0:
            yield denoiser_pb2.DenoiseEvent(warning=UNAVAILABLE)
        while True:
            event = job.events.get()
            if isinstance(event, eng.Step):
                yield denoiser_pb2.DenoiseEvent(progress=generation_pb2.StepProgress(
                    step=event.step, total_steps=event.total, timestep=event.timestep))
            elif isinstance(event, eng.Checkpoint):
                yield denoiser_pb2.DenoiseEvent(checkpoint=checkpoint_to_proto(event, checked))
            elif isinstance(event, eng.Preview):
                yield denoiser_pb2.DenoiseEvent(preview=preview_to_proto(event))
            elif isinstance(event, eng.Finished):
                log.info(kv("finished", job_id=checked.request_id, steps_run=event.steps_run))
                if not torch.isfinite(event.latents).all():     # else the decoder would refuse them, less clearly
                    raise InvalidArgument(f"the latents became NaN or Inf while denoising (guidance_scale "
                                          f"{checked.guidance_scale}, or the embeddings' values, are too large); "
                                          "lower guidance_scale or check the embeddings")
                yield denoiser_pb2.DenoiseEvent(latents=to_proto(event.latents))
                return
            elif isinstance(event, eng.Cancelled):
                raise Cancelled(f"request cancelled after {event.steps_run} steps")
            else:
                error = event.error
                if isinstance(error, eng.EngineStopped):
                    raise Unavailable(str(error))
                if isinstance(error, (ServiceError, ValueError)):
                    raise InvalidArgument(str(error))
                raise error


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(DenoiserConfig, argv, "t2v serve denoiser",
                          "3D-UNet denoiser stage: embeddings -> latents, with step-level batching.")
    run_stage(config, "denoiser", SERVICE_NAME, DenoiserServicer, denoiser_pb2_grpc.add_DenoiserServicer_to_server)
