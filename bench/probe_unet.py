"""Where the compiled UNet forward's time goes on a GPU, and what the kernel levers left do to it.

Why: at 16 concurrent requests the mesh and a diffusers user who compiles run the same Inductor kernels for
the same 32 rows (docs/benchmarks.md, issue 15), so more throughput must come from faster kernels, not from
batching. This probe measures, on the full 1.7B UNet (fp16, 16x256x256: latents 4x16x32x32, 77 tokens), in
one process and one call, each step guarded by a time budget:

1. ``profile``: the compiled 32-row forward's GPU time by kernel family (convolutions, matrix products,
   Inductor's fused Triton kernels, attention, the rest), from torch.profiler's kernel records;
2. ``cudnn``: the same compiled forward replayed as a CUDA graph with cuDNN's benchmark mode off (PyTorch's
   default: cuDNN's heuristics pick each convolution's algorithm) and on (each algorithm timed once per
   shape, before the capture); Inductor leaves convolutions to aten, which asks cuDNN at run time;
3. ``fp8``: every large linear layer as an FP8 (e4m3) matrix product (``torch._scaled_mm``, the activations
   scaled per row or per tensor at run time, the weights once), compiled for 32 rows and replayed as a
   graph; its error against the fp16 output on the same inputs (relative norm and max);
4. ``rows64``: the exact forward compiled for 64 rows, a row's time against 32;
5. ``attention``: every attention shape of one 32-row forward through each kernel (cuDNN, flash, efficient,
   two matrix products eager and compiled), ms a call and a forward;
   ``kernel``: the Triton kernel (services/denoiser/short_attention.py) on the temporal shapes at 1, 2 and 4
   warps; ``--variants``: the whole UNet compiled with a combination of levers, each one compilation:
   ``math`` (short sequences' attention as matrix products) or ``triton`` (the product's kernel, through
   its processor), ``layout`` (Inductor's channels-last layout forced), ``fp8`` (as step 3), ``conv2d``
   (the temporal convolutions as 2-D ones, services/denoiser/temporal_conv.py), and Inductor's own tuning:
   ``coord`` (coordinate-descent tuning of its Triton kernels' block sizes: the fused elementwise and
   normalisation work), ``mm1x1`` (1x1 convolutions as matrix products), ``autotune`` (max-autotune for
   matrix products: Triton templates timed against cuBLAS, with the elementwise epilogue fused), and
   ``qkv`` (diffusers' fused projections: one q/k/v matrix product a self-attention, one k/v a
   cross-attention, read by the product's processor), ``xattn`` (the cross-attention's keys and values once
   a video, all its frames' queries in one call: services/denoiser/cross_attention.py), e.g.
   ``--variants triton+layout,triton+layout+fp8`` (step ``variants``). The SDPA baseline is compiled first
   only when ``baseline`` (or a step that needs it) is in ``--steps``; a variant that would outlast the
   budget is stopped (an alarm) and recorded as such;
6. ``vae``: the decoder's VAE (fp16, 256x256 frames) at 4 to 64 frames a forward, channels-last too, and 16
   videos decoded as the decoder serves a burst today (16 threads, 4 frames a forward each) against one
   thread decoding the same 256 frames 64 at a time: what batching the tail's decoding would save;
7. ``mp4``: the decoder's MP4 encoding (services/decoder/video.py, x264 veryfast/zerolatency) of a 16-frame
   256x256 video of VAE output, alone and 16 at once on 16 threads (a burst's tail), for x264 thread
   counts 0 (its own choice), 1, 2 and 4: what ``--x264-threads`` does to the decode tail;
8. ``preview``: a live preview's map (engine.DenoiseEngine.preview) on one request's latents on the GPU,
   CUDA events, against a 32-row step.
(Packages of compiled buckets: bench/probe_packages.py, which builds them through services/denoiser/aot.py itself.)

    python bench/probe_unet.py --model /tmp/t2v-full --out /tmp/probe --budget-s 420
    python bench/probe_unet.py --steps kernel,variants --variants triton,triton+layout --budget-s 570

Prints one JSON line per step as it finishes and writes probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

FRAMES, LATENT, TOKENS = 16, 32, 77


def event_median(fn: Callable[[], Any], repeat: int = 10, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeat`` calls, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def random_inputs(rows: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    sample = torch.randn(rows, 4, FRAMES, LATENT, LATENT, device="cuda", dtype=torch.float16, generator=g)
    timesteps = torch.randint(1, 999, (rows,), device="cuda", generator=g)
    embeddings = torch.randn(rows, TOKENS, dim, device="cuda", dtype=torch.float16, generator=g)
    return sample, timesteps, embeddings


def graphed(forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """``forward(*inputs)`` captured as a CUDA graph (a warm-up on a side stream first, as graphs.py does)."""
    static = tuple(x.clone() for x in inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward(*static)
    return graph.replay


def family(name: str) -> str:
    n = name.lower()
    if n.startswith("triton"):                     # Inductor's, even when named triton_*_fused_convolution_*
        return "triton (fused by inductor)"
    if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa")):     # before "fprop": cuDNN's SDPA
        return "attention"                                                       # kernels are named *_fprop_*
    if any(k in n for k in ("nchwtonhwc", "nhwctonchw")):
        return "layout transposes (cuDNN)"
    if any(k in n for k in ("conv", "implicit", "winograd", "fprop", "dgrad", "xmma_fprop")):
        return "convolution"
    if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "matmul", "nvjet", "cublas", "scaled_mm")):
        return "matmul"
    return "other"


def kernel_families(fn: Callable[[], None]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    top: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        totals[family(event.name)] = totals.get(family(event.name), 0.0) + us
        top[event.name] = top.get(event.name, 0.0) + us
    whole = sum(totals.values()) or 1.0
    kinds: dict[str, float] = {}                   # Inductor's names: red(uction), per(sistent reduction), poi(ntwise)
    for name, us in top.items():
        if name.startswith("triton_"):
            kind = name.split("_")[1]
            kinds[kind] = kinds.get(kind, 0.0) + us
    return {"ms": {k: round(v / 1e3, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
            "triton_by_kind_ms": {k: round(v / 1e3, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / whole, 3) for k, v in totals.items()},
            "top_kernels_ms": {k[:110]: round(v / 1e3, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:30]}}


class Fp8Linear(torch.nn.Module):
    """``linear`` as an e4m3 matrix product: the weight scaled once (per output row), the input per row
    (``rowwise``, bf16 out) or per tensor (fp16 out) at each call; the bias added after."""

    def __init__(self, linear: torch.nn.Linear, rowwise: bool) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.rowwise = rowwise
        if rowwise:
            scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12)     # [out, 1]
            self.register_buffer("scale_w", scale.t().contiguous())                   # [1, out]
        else:
            scale = (w.abs().amax() / 448.0).clamp(min=1e-12)
            self.register_buffer("scale_w", scale.reshape(()))
        self.register_buffer("w8", (w / scale).to(torch.float8_e4m3fn))               # [out, in]
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.rowwise:
            scale_x = (flat.abs().amax(dim=1, keepdim=True).float() / 448.0).clamp(min=1e-12)
            out = torch._scaled_mm((flat / scale_x).to(torch.float8_e4m3fn), self.w8.t(), scale_x, self.scale_w,
                                   out_dtype=torch.bfloat16).to(self.out_dtype)
        else:
            scale_x = (flat.abs().amax().float() / 448.0).clamp(min=1e-12)
            out = torch._scaled_mm((flat / scale_x).to(torch.float8_e4m3fn), self.w8.t(), scale_x, self.scale_w,
                                   out_dtype=self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], out.shape[-1])


def to_fp8(unet: torch.nn.Module, rowwise: bool, min_features: int = 256) -> int:
    """Swap every nn.Linear of at least ``min_features`` in and out (multiples of 16) for Fp8Linear."""
    swapped = 0
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, torch.nn.Linear) and child.in_features >= min_features
                    and child.out_features >= min_features and child.in_features % 16 == 0
                    and child.out_features % 16 == 0):
                setattr(parent, name, Fp8Linear(child, rowwise))
                swapped += 1
    return swapped


_SDPA = torch.nn.functional.scaled_dot_product_attention
SHORT = 32          # sequences of at most this many keys go through plain matmuls in the "short" variant


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as two matrix products, the softmax in float32."""
    weights = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return weights.float().softmax(-1).to(q.dtype) @ v


def short_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):  # type: ignore[no-untyped-def]
    """scaled_dot_product_attention, but short sequences (the temporal attention's 16 frames) as plain
    matrix products: the fused kernels' tiles (64 queries x 128 keys) waste most of their work on 16."""
    if k.shape[-2] <= SHORT and attn_mask is None and not is_causal and scale is None and not kw:
        return math_attention(q, k, v)
    return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)


def attention_shapes(forward: Callable[[], Any]) -> dict[tuple, int]:
    """(q shape, k shape) -> how many calls one forward makes."""
    seen: dict[tuple, int] = {}

    def record(q, k, v, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = (tuple(q.shape), tuple(k.shape))
        seen[key] = seen.get(key, 0) + 1
        return _SDPA(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = record
    try:
        forward()
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA
    return seen


def attention_bench(shapes: dict[tuple, int]) -> dict[str, Any]:
    """Each attention shape of a forward through each way to compute it; totals a forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ways: dict[str, Callable[..., torch.Tensor]] = {"sdpa_default": _SDPA, "math_eager": math_attention,
                                                    "math_compiled": torch.compile(math_attention, dynamic=False)}
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        if hasattr(SDPBackend, backend):
            def way(q, k, v, _b=getattr(SDPBackend, backend)):  # type: ignore[no-untyped-def]
                with sdpa_kernel([_b]):
                    return _SDPA(q, k, v)
            ways[backend.lower()] = way
    rows, totals = [], {name: 0.0 for name in ways}
    for (q_shape, k_shape), count in shapes.items():
        b, h, sq, d = q_shape
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
        k = torch.randn(b, k_shape[2], h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
        v = torch.randn_like(k)
        ref = _SDPA(q.float(), k.float(), v.float())
        row: dict[str, Any] = {"q": list(q_shape), "k": list(k_shape), "calls": count}
        for name, fn in ways.items():
            try:
                ms = event_median(lambda: fn(q, k, v), repeat=10) * 1e3
                err = float((fn(q, k, v).float() - ref).norm() / ref.norm())
                row[name] = {"ms": round(ms, 3), "rel_err": round(err, 6)}
                totals[name] += ms * count
            except Exception as exc:  # noqa: BLE001 - a backend that does not take this shape
                row[name] = f"failed: {type(exc).__name__}"
                totals[name] = float("nan")
        rows.append(row)
    return {"shapes": rows, "ms_a_forward": {k: round(v, 2) for k, v in totals.items()}}


LEVERS = {"math", "triton", "layout", "fp8", "conv2d", "coord", "mm1x1", "autotune", "qkv", "xattn"}


class OutOfTime(BaseException):
    """Raised by the alarm when a variant's compilation would outlast the probe's budget. A BaseException, so
    the ``except Exception`` of the code it interrupts (Inductor's autotuning skips a failing choice so) does
    not swallow it."""


def stopped_by_alarm(exc: BaseException | None) -> bool:
    """Whether ``exc`` is OutOfTime or was raised while handling it (anywhere down its chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OutOfTime):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def within(seconds: float, work: Callable[[], Any]) -> Any:
    """``work()``, or "stopped: ..." if it is still running after ``seconds`` (SIGALRM: the call's results so
    far still come back instead of the device's limit killing the whole probe). The alarm rings again every
    5 s until the work gives up, in case a handler swallowed it. A stopped variant may leave CUDA mid-capture
    or Dynamo mid-trace: the probe runs nothing on the GPU after one (``main``)."""
    import signal

    def ring(signum: int, frame: Any) -> None:
        raise OutOfTime(f"stopped after {seconds:.0f} s: the probe's budget")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds), 5.0)
    try:
        return work()
    except BaseException as exc:
        if stopped_by_alarm(exc):
            return f"stopped: after {seconds:.0f} s, the probe's budget"
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compiled_variant(model: str, levers: list[str], call: Callable[..., Any], inputs: tuple[torch.Tensor, ...],
                     reference: torch.Tensor, baseline_ms: float | None) -> dict[str, Any] | str:
    """A fresh UNet with ``levers`` (math or triton, layout, fp8, conv2d; see the module's docstring), compiled
    for these inputs: its compile time, graph replay, error against the exact eager output, kernels."""
    import torch._inductor.config as inductor_config
    from diffusers import UNet3DConditionModel

    unknown = set(levers) - LEVERS
    if {"qkv", "xattn"} <= set(levers):                # the per-video path steps aside for fused projections
        return f"failed: levers {levers}: qkv and xattn do not combine (cross_attention.py falls back)"
    if unknown or {"math", "triton"} <= set(levers):
        return f"failed: levers {levers}: math or triton (not both), {', '.join(sorted(LEVERS - {'math', 'triton'}))}"
    if "math" in levers:
        torch.nn.functional.scaled_dot_product_attention = short_attention
    tuning = {"force_layout_optimization": "layout" in levers, "coordinate_descent_tuning": "coord" in levers,
              "conv_1x1_as_mm": "mm1x1" in levers, "max_autotune_gemm": "autotune" in levers}
    before = {name: getattr(inductor_config, name) for name in tuning}
    for name, value in tuning.items():
        setattr(inductor_config, name, value)
    try:
        unet = UNet3DConditionModel.from_pretrained(f"{model}/unet", dtype=torch.float16).to("cuda").eval()
        facts: dict[str, Any] = {}
        if "qkv" in levers:                                # before the processor: it reads the fused ones
            unet.fuse_qkv_projections()
            facts["fused_attentions"] = sum(bool(getattr(m, "fused_projections", False)) for m in unet.modules())
        if "triton" in levers:
            from services.denoiser import short_attention as sa

            facts["short_attention"] = sa.install(unet, "triton", torch.device("cuda"), torch.float16)
        if "conv2d" in levers:
            from services.denoiser import temporal_conv

            facts["temporal_conv2d"] = temporal_conv.install(unet, "conv2d")
        if "xattn" in levers:                              # last: it wraps the processor the kernel put on
            from services.denoiser import cross_attention

            facts["cross_attentions_once_a_video"] = cross_attention.install(unet, "video")
        if "fp8" in levers:
            facts["fp8_linears"] = to_fp8(unet, rowwise=True)
        torch._dynamo.reset()
        compiled = torch.compile(unet, dynamic=False)
        started = time.perf_counter()
        out = call(compiled)(*inputs).float()
        torch.cuda.synchronize()
        facts["compile_s"] = round(time.perf_counter() - started, 1)
        facts["graph_ms"] = round(event_median(graphed(call(compiled), inputs)) * 1e3, 2)
        facts["baseline_graph_ms"] = baseline_ms
        facts["rel_err"] = round(float((out - reference).norm() / reference.norm()), 6)
        facts["max_abs_err"] = round(float((out - reference).abs().max()), 4)
        facts["profile"] = kernel_families(lambda: call(compiled)(*inputs))
        return facts
    except Exception as exc:  # noqa: BLE001 - a probe: record why and go on
        if stopped_by_alarm(exc):
            raise
        return f"failed: {type(exc).__name__}: {exc}"[:800]
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA
        for name, value in before.items():
            setattr(inductor_config, name, value)


def kernel_bench(shapes: dict[tuple, int]) -> dict[str, Any]:
    """The product's Triton kernel on each short self-attention shape of a forward, at 1, 2 and 4 warps,
    against SDPA's pick: ms a call, error against float32, and the bandwidth it reaches (q, k, v read once,
    the output written once)."""
    from services.denoiser import short_attention as sa

    rows, totals = [], {"sdpa_default": 0.0, **{f"triton_w{w}": 0.0 for w in (1, 2, 4)}}
    default_warps = sa.NUM_WARPS
    for (q_shape, k_shape), count in shapes.items():
        b, h, sq, d = q_shape
        if k_shape[2] != sq or sq > sa.MAX_SEQUENCE:
            continue
        qkv = torch.randn(b, sq, 3 * h * d, device="cuda", dtype=torch.float16)
        q, k, v = (t.view(b, sq, h, d) for t in qkv.chunk(3, dim=-1))
        reference = _SDPA(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        row: dict[str, Any] = {"q": list(q_shape), "calls": count}
        sdpa = lambda: _SDPA(*(t.transpose(1, 2) for t in (q, k, v)))  # noqa: E731
        ms = event_median(sdpa, repeat=20) * 1e3
        row["sdpa_default_ms"] = round(ms, 3)
        totals["sdpa_default"] += ms * count
        moved = 4 * q.numel() * q.element_size()
        for warps in (1, 2, 4):
            sa.NUM_WARPS = warps
            try:
                ms = event_median(lambda: sa.short_attention(q, k, v), repeat=20) * 1e3
                err = float((sa.short_attention(q, k, v).float() - reference).norm() / reference.norm())
                row[f"triton_w{warps}"] = {"ms": round(ms, 3), "rel_err": round(err, 6),
                                           "tb_s": round(moved / (ms / 1e3) / 1e12, 2)}
                totals[f"triton_w{warps}"] += ms * count
            except Exception as exc:  # noqa: BLE001 - a probe: record why and go on
                row[f"triton_w{warps}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            finally:
                sa.NUM_WARPS = default_warps
        rows.append(row)
    return {"shapes": rows, "ms_a_forward": {k: round(v, 2) for k, v in totals.items()}}


def mp4_bench(model: str, device: str = "cuda", dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """Step ``mp4``: seconds to encode one 16-frame 256x256 video of the VAE's output, alone (median of 5)
    and 16 at once on 16 threads as the decoder's calls at a burst's end do (median of 3, wall and a
    video), for each x264 thread count (see the module's docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    from services.decoder.vae import VaeDecoder, to_uint8
    from services.decoder.video import encode_mp4

    decoder = VaeDecoder(model, torch.device(device), dtype, chunk_size=4)
    g = torch.Generator(device=device).manual_seed(5)
    latents = torch.randn(1, 4, FRAMES, LATENT, LATENT, device=device, dtype=dtype, generator=g)
    with torch.inference_mode():
        frames = [to_uint8(decoder.decode(latents))]
    del decoder
    height, width = frames[0].shape[1:3]
    result: dict[str, Any] = {"frames": int(sum(len(c) for c in frames)), "size": [int(width), int(height)]}

    def encode(threads: int) -> float:
        started = time.perf_counter()
        encode_mp4(frames, 8, width, height, threads=threads)
        return time.perf_counter() - started

    with ThreadPoolExecutor(16) as pool:
        for threads in (0, 1, 2, 4):
            encode(threads)
            alone = statistics.median(encode(threads) for _ in range(5))
            walls, each = [], []
            for _ in range(3):
                started = time.perf_counter()
                times = list(pool.map(encode, [threads] * 16))
                walls.append(time.perf_counter() - started)
                each.append(statistics.mean(times))
            result[f"threads_{threads}"] = {"alone_s": round(alone, 4), "burst_16_wall_s": round(statistics.median(walls), 4),
                                            "burst_16_mean_video_s": round(statistics.median(each), 4)}
    return result


def vae_bench(model: str) -> dict[str, Any]:
    """Step ``vae``: the VAE's decode time by frames a forward, and a burst's 16 videos decoded the decoder's
    way (a thread a call, ``chunk_size`` 4) against one batched pass (see the module's docstring)."""
    import threading

    from services.decoder.vae import VaeDecoder

    decoder = VaeDecoder(model, torch.device("cuda"), torch.float16, chunk_size=4)
    vae = decoder.vae
    result: dict[str, Any] = {"ms_a_forward": {}, "ms_a_frame": {}}
    g = torch.Generator(device="cuda").manual_seed(3)
    videos = [torch.randn(1, 4, FRAMES, LATENT, LATENT, device="cuda", dtype=torch.float16, generator=g)
              for _ in range(16)]
    with torch.inference_mode():
        for layout in ("contiguous", "channels_last"):
            if layout == "channels_last":
                vae.to(memory_format=torch.channels_last)
            for frames in (4, 8, 16, 32, 64):
                x = torch.randn(frames, 4, LATENT, LATENT, device="cuda", dtype=torch.float16, generator=g)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                ms = event_median(lambda: vae.decode(x).sample, repeat=5, warmup=1) * 1e3
                result["ms_a_forward"][f"{layout}_{frames}"] = round(ms, 2)
                result["ms_a_frame"][f"{layout}_{frames}"] = round(ms / frames, 3)
        vae.to(memory_format=torch.contiguous_format)

        def burst_threads() -> None:          # what 16 Decode calls at once do today (MP4 encoding left out)
            threads = [threading.Thread(target=decoder.decode, args=(v,)) for v in videos]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        def one_pass(chunk: int) -> Callable[[], None]:
            def run() -> None:
                flat = torch.cat([v[0].permute(1, 0, 2, 3) for v in videos])     # 256 frames
                for part in flat.split(chunk):
                    images = vae.decode(part / vae.config.scaling_factor).sample
                    host = torch.empty(images.shape, dtype=torch.float32, pin_memory=True)
                    host.copy_(images.float(), non_blocking=True)
                torch.cuda.synchronize()
            return run

        for name, fn in (("burst_16_threads_chunk4_s", burst_threads), ("one_thread_chunk16_s", one_pass(16)),
                         ("one_thread_chunk64_s", one_pass(64))):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                started = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            result[name] = round(statistics.median(times), 4)
    del decoder, vae
    torch.cuda.empty_cache()
    return result


def main() -> None:
    import faulthandler

    faulthandler.enable()
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="/tmp/t2v-full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--steps", default="profile,cudnn,preview,attention,kernel,variants,fp8,rows64,vae")
    parser.add_argument("--variants", default="math,math+layout",
                        help="comma-separated lever combinations for the step variants: math|triton, layout, fp8, conv2d, "
                             "coord, mm1x1, autotune, qkv")
    parser.add_argument("--compile-s", type=float, default=130.0, help="what one compilation is expected to take")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}

    def left() -> float:
        return a.budget_s - (time.monotonic() - began)

    def done(step: str, result: Any) -> None:
        report[step] = result
        print(json.dumps({step: result}), flush=True)
        (a.out / "probe.json").write_text(json.dumps(report, indent=2))

    from diffusers import UNet3DConditionModel

    if not Path(a.model, "unet").exists():
        from t2v.modelgen import make_model

        started = time.perf_counter()
        make_model("full", Path(a.model), device="cuda", dtype="float16")
        done("make_model_s", round(time.perf_counter() - started, 1))
    import platform
    import subprocess
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True, text=True)
    report["host"] = {"cpu": cpu.stdout.split(":", 1)[-1].strip(), "cpus": os.cpu_count(),
                      "python": platform.python_version()}
    steps = a.steps.split(",")
    if "mp4" in steps:
        try:
            done("mp4", mp4_bench(a.model))
        except Exception as exc:  # noqa: BLE001 - a probe: record why and go on
            done("mp4", f"failed: {type(exc).__name__}: {exc}"[:600])
    if "vae" in steps:
        try:
            done("vae", vae_bench(a.model))
        except Exception as exc:  # noqa: BLE001 - a probe: record why and go on
            done("vae", f"failed: {type(exc).__name__}: {exc}"[:600])
    unet = UNet3DConditionModel.from_pretrained(f"{a.model}/unet", dtype=torch.float16).to("cuda").eval()
    dim = unet.config.cross_attention_dim

    def call(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        return lambda x, t, e: module(x, t, encoder_hidden_states=e, return_dict=False)[0]

    with torch.inference_mode():
        x32 = random_inputs(32, dim)
        reference = call(unet)(*x32).float()
        compiled = torch.compile(unet, dynamic=False)
        if set(steps) & {"profile", "cudnn", "preview", "rows64", "baseline"}:
            started = time.perf_counter()
            call(compiled)(*x32)
            torch.cuda.synchronize()
            done("compile_32_s", round(time.perf_counter() - started, 1))
            done("baseline_32_graph_ms", round(event_median(graphed(call(compiled), x32)) * 1e3, 2))
        if "profile" in steps:
            done("profile_32_compiled", kernel_families(lambda: call(compiled)(*x32)))
        if "cudnn" in steps:
            result: dict[str, Any] = {}
            for benchmark in (False, True):
                torch.backends.cudnn.benchmark = benchmark
                call(compiled)(*x32)                        # with benchmark on: cuDNN times its algorithms here
                replay = graphed(call(compiled), x32)
                result[f"benchmark_{'on' if benchmark else 'off'}_graph_ms"] = round(event_median(replay) * 1e3, 2)
                result[f"benchmark_{'on' if benchmark else 'off'}_ms"] = round(
                    event_median(lambda: call(compiled)(*x32)) * 1e3, 2)
            result["profile_benchmark_on"] = kernel_families(lambda: call(compiled)(*x32))
            torch.backends.cudnn.benchmark = False
            done("cudnn_32", result)
        if "attention" in steps:
            shapes = attention_shapes(lambda: call(unet)(*x32))
            done("attention_32", attention_bench(shapes))
        if "kernel" in steps:
            done("kernel_32", kernel_bench(attention_shapes(lambda: call(unet)(*x32))))
        stopped = False
        for variant in (a.variants.split(",") if "variants" in steps else []):
            if stopped or left() < a.compile_s + 30:
                done(f"variant_{variant}", "skipped: " + ("a variant before was stopped" if stopped
                                                          else f"{left():.0f} s left"))
                continue
            result = within(left() - 15, lambda: compiled_variant(
                a.model, variant.split("+"), call, x32, reference, report.get("baseline_32_graph_ms")))
            stopped = isinstance(result, str) and result.startswith("stopped")
            done(f"variant_{variant}", result)
        if stopped:                                        # the GPU may be mid-capture: nothing more runs on it
            done("seconds", round(time.monotonic() - began, 1))
            return
        if "preview" in steps:
            from services.common.latent_rgb import LatentRgb

            rgb = LatentRgb.load(a.model)
            if rgb is None:
                done("preview", "no vae/latent_rgb.json in the model folder")
            else:
                from services.common.latent_rgb import map_to_rgb

                weights, bias = rgb.tensors(torch.device("cuda"))
                latents = x32[0][:1]

                def preview() -> torch.Tensor:      # what engine.DenoiseEngine.preview runs
                    return map_to_rgb(weights, bias, latents[0])

                one = event_median(preview, repeat=200, warmup=10)
                step = event_median(lambda: call(compiled)(*x32), repeat=5)
                started = time.perf_counter()
                for _ in range(200):
                    preview()
                host_us = (time.perf_counter() - started) / 200 * 1e6
                torch.cuda.synchronize()
                done("preview", {"map_gpu_us": round(one * 1e6, 1), "map_host_launch_us": round(host_us, 1),
                                 "step_32_rows_ms": round(step * 1e3, 2),
                                 "two_previews_share_of_step": round(2 * one / step, 6)})
        for rowwise in (True, False):
            if "fp8" not in steps:
                break
            if left() < a.compile_s + 30:
                done(f"fp8_{'rowwise' if rowwise else 'tensorwise'}", f"skipped: {left():.0f} s left")
                continue
            try:
                fp8 = UNet3DConditionModel.from_pretrained(f"{a.model}/unet", dtype=torch.float16).to("cuda").eval()
                swapped = to_fp8(fp8, rowwise)
                eager_out = call(fp8)(*x32).float()
                fp8c = torch.compile(fp8, dynamic=False)
                started = time.perf_counter()
                out = call(fp8c)(*x32).float()
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                replay = graphed(call(fp8c), x32)
                fresh = random_inputs(32, dim, seed=7)
                ref_fresh = call(unet)(*fresh).float()
                out_fresh = call(fp8c)(*fresh).float()
                done(f"fp8_{'rowwise' if rowwise else 'tensorwise'}", {
                    "linears": swapped, "compile_s": round(seconds, 1),
                    "graph_ms": round(event_median(replay) * 1e3, 2),
                    "rel_err": round(float((out - reference).norm() / reference.norm()), 5),
                    "rel_err_eager_fp8": round(float((eager_out - reference).norm() / reference.norm()), 5),
                    "rel_err_fresh_inputs": round(float((out_fresh - ref_fresh).norm() / ref_fresh.norm()), 5),
                    "max_abs_err": round(float((out - reference).abs().max()), 4),
                    "finite": bool(torch.isfinite(out).all()),
                    "profile": kernel_families(lambda: call(fp8c)(*x32))})
                del fp8, fp8c, replay
                break                                      # rowwise worked: tensorwise is the fallback only
            except Exception as exc:  # noqa: BLE001 - a probe: record why and go on
                done(f"fp8_{'rowwise' if rowwise else 'tensorwise'}", f"failed: {type(exc).__name__}: {exc}"[:600])
        if "rows64" in steps:
            if left() < a.compile_s + 20:
                done("rows64", f"skipped: {left():.0f} s left")
            else:
                x64 = random_inputs(64, dim)
                started = time.perf_counter()
                call(compiled)(*x64)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                ms64 = event_median(graphed(call(compiled), x64)) * 1e3
                ms32 = event_median(graphed(call(compiled), x32)) * 1e3
                done("rows64", {"compile_s": round(seconds, 1), "graph_ms_64": round(ms64, 2),
                                "graph_ms_32": round(ms32, 2), "ms_a_row_64": round(ms64 / 64, 3),
                                "ms_a_row_32": round(ms32 / 32, 3)})
    done("seconds", round(time.monotonic() - began, 1))


if __name__ == "__main__":
    main()
