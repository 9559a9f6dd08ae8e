"""Compiled UNet buckets as packages: built once into the compile cache, loaded without tracing.

Why: a denoiser restarted on a warm torch.compile cache still spent 36.6 s of its 94 s start in Dynamo
tracing the UNet again for its two compiled batch sizes, although every FX graph and Triton kernel came
from the cache (docs/benchmarks.md, run D). A package is the compiled forward itself: loading it traces
nothing. Two kinds (``KINDS``), the same provider:

- ``precompile``: Dynamo's ahead-of-time compile (``torch.compile(fullgraph=True)`` of the module, then
  its experimental ``_aot_compile`` / ``_save_aot_compiled_module``, torch 2.11-2.13): the same Dynamo ->
  AOTAutograd -> Inductor pipeline as ``--compile-backend inductor`` (so the same kernels; a build took
  150-175 s a bucket of the 1.7B UNet on an H200, torch.compile 100-130 s), serialised with its guards;
  loading it runs the saved bytecode on the live module. Its
  guards are the portable ones only (tensor metadata, grad mode: ``keep_portable_guards_unsafe``: the
  identity of Python objects cannot be saved), and loaded back they are not checked
  (``precompiled_forward`` says why and what stands for them). On an H200 a warm
  restart loaded two buckets in 12.7-16.8 s instead of tracing for ~50 s (docs/benchmarks.md, run E).
- ``aoti``: an AOTInductor package (``torch.export`` then ``aoti_compile_and_package``), C++ around the
  same kernels; its build took longer than 255 s for one 2-row bucket of the 1.7B UNet on an H200.

One package per compiled bucket, ``<compile-cache folder>/packages/<name>.precompile`` (or ``.pt2``). It
holds code, never weights: a precompiled forward reads the live module's parameters as inputs of its graph; an AOTI one is
compiled with ``aot_inductor.package_constants_in_so = False`` (and ``always_keep_tensor_constants``, so
no small parameter is inlined into a kernel as a literal), and the live module's parameters and buffers
are handed to it (``load_constants(..., user_managed=True)``: pointers, no copy). So a package is keyed by
what the compiled code depends on: its kind, the module's config (its architecture), the names, shapes and
dtypes of its parameters, the version of the package that holds its code (diffusers for the UNet), dtype,
device type, rows, sample shape and tokens, and ``FORMAT``; never by the weights. The folder it lives in is
keyed by torch, Triton, CUDA and the GPU and trusted only with a complete manifest (compile_cache.py), so a
stale or foreign package goes with its folder.

A package that does not load, or whose first call fails or differs from eager's (corrupt, truncated,
built for other code), is deleted and built again, with a log line. A model that does not export or compile, or whose package would not take its weights
from outside (a parameter baked into the code, or constants of its own), runs that bucket through
torch.compile instead, with a log line saying why: it serves, only with the slower start.

A loaded AOTI model runs single-threaded (``run_single_threaded=True``): the AOTI runtime's multi-threaded
container synchronises on CUDA events, which a CUDA-graph capture (graphs.py) does not allow.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from services.common.logs import kv
from services.denoiser.cross_attention import call_kwargs

log = logging.getLogger("denoiser.aot")

FORMAT = 1              # this module's way of building packages; a change makes every older package unused
SUBFOLDER = "packages"
KINDS = ("precompile", "aoti")
SUFFIX = {"precompile": ".precompile", "aoti": ".pt2"}     # each kind's file name ends so (AOTI requires .pt2)
# A package's first output against eager's, relative L2 error: fp16 compiled code differs by ~4e-4 on the
# 1.7B UNet (docs/benchmarks.md, run D); a package built for other code or weights by far more.
TRIAL_TOLERANCE = 0.05
# Inductor settings every package is compiled with: code only, no constant inlined into it.
WEIGHTS_FREE = {"aot_inductor.package_constants_in_so": False, "always_keep_tensor_constants": True}

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NotWeightsFree(RuntimeError):
    """The compiled package would not take all of its weights from the live module."""


class UNetForward(torch.nn.Module):
    """``unet(sample, timestep, encoder_hidden_states=e, return_dict=False)[0]`` as a module of three
    tensors, the form torch.export takes; its parameters are the UNet's, under ``unet.``."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timesteps, encoder_hidden_states=embeddings, return_dict=False,
                         **call_kwargs(self.unet, sample))[0]


# --- the key -------------------------------------------------------------------------------------------
def code_version(module: torch.nn.Module) -> str:
    """The top-level package of ``module``'s class and its version ("diffusers 0.36.0"): its forward is that
    package's code, and another version may trace to another graph."""
    top = type(module).__module__.split(".")[0]
    try:
        version = getattr(importlib.import_module(top), "__version__", "none")
    except ImportError:
        version = "none"
    return f"{top} {version}"


def weight_layout(module: torch.nn.Module) -> list[list[str]]:
    """Every parameter's and buffer's name, shape and dtype (never its values)."""
    tensors = {**dict(module.named_parameters(remove_duplicate=False)),
               **dict(module.named_buffers(remove_duplicate=False))}
    return [[name, "x".join(map(str, t.shape)), str(t.dtype).removeprefix("torch.")]
            for name, t in sorted(tensors.items())]


def module_state(module: torch.nn.Module) -> list[str]:
    """What of ``module``'s Python state its traced graph depends on beyond its config and weights: train or
    eval mode, the classes of its attention processors (diffusers' ``set_attn_processor`` swaps them), with
    the ``VERSION`` of the project's own (short_attention.py: its code's digest; cross_attention.py's, and the
    processor it wraps), and the project's own layers swapped in (those whose class has a ``VERSION``:
    temporal_conv.py's)."""
    processors = getattr(module, "attn_processors", None)
    classes: set[type] = set()
    for processor in processors.values() if isinstance(processors, dict) else ():
        while processor is not None:                  # and the one a wrapper calls (cross_attention.py's)
            classes.add(type(processor))
            processor = getattr(processor, "inner", None)
    names = sorted(c.__name__ + (f"@{c.VERSION}" if getattr(c, "VERSION", "") else "") for c in classes)
    layers = sorted({f"{type(m).__name__}@{type(m).VERSION}" for m in module.modules()
                     if getattr(type(m), "VERSION", "")})
    return [f"training={bool(module.training)}", *(f"attn={n}" for n in names), *(f"layer={n}" for n in layers)]


# Inductor's settings that choose which kernels it generates (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 and
# TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 in the environment set two of them; docs/benchmarks.md's run H tries them)
INDUCTOR_TUNING = ("coordinate_descent_tuning", "max_autotune", "max_autotune_gemm", "conv_1x1_as_mm",
                   "force_layout_optimization")


def inductor_tuning() -> dict[str, Any]:
    """Those settings as this process has them: in a package's key and the batch plan's identity, so a
    package or a plan made under other ones (other kernels, other times) is rebuilt, never reused."""
    import torch._inductor.config as inductor_config

    return {name: getattr(inductor_config, name, None) for name in INDUCTOR_TUNING}


def device_label(device: torch.device) -> str:
    """"cuda:1", "cpu": the compiled code names the GPU it was built for (Inductor's DeviceGuard and streams),
    so a package of cuda:0 must never serve cuda:1 (two replicas on one compile-cache volume)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without diffusers' bookkeeping (``_name_or_path``, ``_diffusers_version``, ...) but with the
    class name: where the model was read from, or which version wrote its file, is not its architecture."""
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def package_name(config: Mapping[str, Any], *, kind: str, rows: int, sample_shape: Sequence[int], tokens: int,
                 dtype: torch.dtype, device: str, timestep_dtype: torch.dtype = torch.long,
                 code: str = "", layout: Sequence[Sequence[str]] = (), state: Sequence[str] = (),
                 name: str = "") -> str:
    """The file name of one bucket's package: readable parts, then a hash of everything it depends on, then
    the kind's ``SUFFIX``.

    ``config``: the module's config (architecture); ``device``: ``device_label``; ``code``: ``code_version``;
    ``layout``: ``weight_layout``; ``state``: ``module_state``; ``name``: the module's class name (the
    readable prefix)."""
    if kind not in KINDS:
        raise ValueError(f"package kind {kind!r} is unknown; choose {' or '.join(KINDS)}")
    key = {"config": json.loads(json.dumps(_architecture(config), sort_keys=True, default=str)),
           "dtype": str(dtype), "timestep_dtype": str(timestep_dtype), "device": device, "rows": int(rows),
           "sample": [int(s) for s in sample_shape], "tokens": int(tokens), "code": code,
           "layout": [list(item) for item in layout], "state": list(state), "format": FORMAT, "kind": kind,
           "tuning": inductor_tuning()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    readable = (f"{name or 'module'}-r{rows}-{'x'.join(map(str, sample_shape))}-t{tokens}-"
                f"{str(dtype).removeprefix('torch.')}-{device}")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", readable)[:120] + f"-{digest}{SUFFIX[kind]}"


# --- the steps (module-level, so a test can replace one) -------------------------------------------------
def export_forward(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """torch.export of ``module`` at exactly these input shapes (non-strict: the Python runs as Python)."""
    with torch.inference_mode():
        return torch.export.export(module, inputs, strict=False)


def used_weights(exported: Any) -> set[str]:
    """The names of the parameters and buffers the exported graph reads (unused ones are compiled away)."""
    signature = exported.graph_signature
    by_input = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    return {by_input[node.name] for node in exported.graph.nodes
            if node.op == "placeholder" and node.name in by_input and node.users}


def compile_package(exported: Any, path: Path, options: Mapping[str, Any] | None = None) -> None:
    """AOTInductor-compile ``exported`` into the package ``path`` (a name ending in .pt2), without weights."""
    if exported.constants:
        raise NotWeightsFree(f"the model has constants of its own ({', '.join(sorted(exported.constants)[:3])}), "
                             "which a package without weights cannot carry")
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                             inductor_configs={**WEIGHTS_FREE, **(options or {})})


def load_package(path: Path, device: torch.device, weights: Mapping[str, torch.Tensor],
                 expected: set[str] | None = None) -> Any:
    """Load the package at ``path`` for ``device`` and hand it ``weights`` (name -> the live tensor).

    ``expected``: the weights the package must take from outside (``used_weights`` at build time); one it
    lacks was compiled into its code, so the package is refused (NotWeightsFree)."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    model = torch._inductor.aoti_load_package(str(path), run_single_threaded=True, device_index=index)
    names = list(model.get_constant_fqns())
    unknown = [n for n in names if n not in weights]
    if unknown:
        raise NotWeightsFree(f"the package wants {len(unknown)} constants the module does not have, e.g. "
                             f"{', '.join(unknown[:3])}")
    baked = sorted((expected or set()) - set(names))
    if baked:
        raise NotWeightsFree(f"{len(baked)} weights were compiled into the package's code, e.g. {', '.join(baked[:3])}")
    model.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
    return model


def precompile_available() -> bool:
    """Whether this torch has Dynamo's ahead-of-time compile of modules (2.11-2.13 do; it is experimental)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return all(hasattr(OptimizedModule, name) for name in
               ("_aot_compile", "_save_aot_compiled_module", "_load_aot_compiled_module"))


def dynamo_module(unet: torch.nn.Module) -> Any:
    """``unet`` under torch.compile as a precompiled package needs it: one graph (fullgraph), static shapes,
    and only the guards that can be saved (tensor metadata, grad mode); the key of its file stands for the
    rest (the module's code and architecture)."""
    return torch.compile(unet, fullgraph=True, dynamic=False,
                         options={"guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})


def precompile_forward(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """Dynamo's ahead-of-time compile of ``unet(sample, t, encoder_hidden_states=e, return_dict=False)`` at
    exactly these inputs: the compiled module, whose ``forward`` can be saved (``save_precompiled``)."""
    from torch._dynamo.aot_compile import ModelInput

    sample, timesteps, embeddings = inputs
    compiled = dynamo_module(unet)
    with torch._dynamo.config.patch(enable_aot_compile=True), torch.inference_mode():
        # Dynamo traces the bound forward, not __call__: the UNet's hooks do not run, so the frame count the
        # cross-attention once a video reads is passed here (cross_attention.py), and at every call below.
        compiled._aot_compile([ModelInput((sample, timesteps), {"encoder_hidden_states": embeddings,
                                                                 "return_dict": False,
                                                                 **call_kwargs(unet, sample)}, [])])
    return compiled


def save_precompiled(compiled: Any, path: Path) -> None:
    """Write ``precompile_forward``'s result to ``path``."""
    with torch._dynamo.config.patch(enable_aot_compile=True):
        path.write_bytes(compiled._save_aot_compiled_module())


def load_precompiled(unet: torch.nn.Module, path: Path) -> Forward:
    """The forward ``save_precompiled`` wrote, running on the live ``unet`` (its weights, read as the graph's
    inputs at every call): no tracing, no compiling."""
    compiled = dynamo_module(unet)
    with torch._dynamo.config.patch(enable_aot_compile=True):
        compiled._load_aot_compiled_module(path.read_bytes())
    return precompiled_forward(unet, compiled)


def precompiled_forward(unet: torch.nn.Module, compiled: Any) -> Forward:
    """``(sample, t, e) -> noise`` of a module precompiled for one input, loaded from its file.

    Its Dynamo guards are not checked: as loaded back from a file (torch 2.11-2.13) they refuse every input,
    their tensors' dispatch-key sets matching none made in this process. What they would check stands
    elsewhere: the provider picks the bucket by rows, sample shape, tokens, dtypes and device; the file's key
    covers the module's architecture, weight layout, code version, mode and attention processors; Inductor's
    own code checks its inputs' sizes and strides; and every loaded package's first output is compared
    with eager (``AotBuckets._trial``)."""
    results = getattr(compiled.forward, "compiled_results", None)
    if not results or len(results) != 1:
        raise RuntimeError(f"the precompiled file holds {len(results or [])} compiled forwards, not one")
    (function,) = results
    function.disable_guard_check()

    def forward(sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return function(unet, sample, timesteps, encoder_hidden_states=embeddings, return_dict=False,
                        **call_kwargs(unet, sample))[0]

    return forward


# --- the provider -----------------------------------------------------------------------------------------
class AotBuckets:
    """Compiled forwards of ``unet`` (called as diffusers' UNets are: ``unet(sample, t, encoder_hidden_states=e,
    return_dict=False)[0]``) per bucket, from packages of ``kind`` (``KINDS``) under ``folder/packages``.

    ``bucket(rows, sample_shape, tokens, dtype, device)`` returns the bucket's forward ``(sample, t, e) ->
    noise``: the package loaded if one is there and works, else built now (written under a temporary name,
    loaded and tried, then renamed into place); torch.compile for this bucket if that fails. ``__call__``
    picks the bucket from its inputs. ``info`` says per package what happened and in how many seconds;
    ``counts`` adds them up.

    ``options``: more Inductor settings to compile AOTI packages with (the tests ask for a quicker C++ build);
    ``fallback``: makes the torch.compile forward of the wrapped module (torch.compile, static shapes)."""

    def __init__(self, unet: torch.nn.Module, folder: str | Path, embedding_dim: int, kind: str,
                 config: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None,
                 fallback: Callable[[torch.nn.Module], Forward] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"package kind {kind!r} is unknown; choose {' or '.join(KINDS)}")
        self.kind = kind
        self.module = UNetForward(unet)
        self.folder = Path(folder) / SUBFOLDER
        self.embedding_dim = int(embedding_dim)
        self.config = dict(config if config is not None else getattr(unet, "config", {}) or {})
        self.options = dict(options or {})
        self._make_fallback = fallback or (lambda module: torch.compile(module, dynamic=False))
        self._fallback: Forward | None = None
        self._code = code_version(unet)
        self._layout = weight_layout(unet)
        self._forwards: dict[tuple, Forward] = {}
        self._sealed: Forward | None = None       # after seal(): what a bucket not built by then runs
        self.info: dict[str, dict[str, Any]] = {}
        self.counts = {"loaded": 0, "built": 0, "rebuilt": 0, "fallback": 0}

    def weights(self) -> dict[str, torch.Tensor]:
        """The live module's parameters and buffers by the names the exported program gives them."""
        return {**dict(self.module.named_parameters(remove_duplicate=False)),
                **dict(self.module.named_buffers(remove_duplicate=False))}

    def name(self, rows: int, sample_shape: Sequence[int], tokens: int, dtype: torch.dtype,
             device: torch.device, timestep_dtype: torch.dtype = torch.long) -> str:
        return package_name(self.config, kind=self.kind, rows=rows, sample_shape=sample_shape, tokens=tokens,
                            dtype=dtype, device=device_label(device), timestep_dtype=timestep_dtype,
                            code=self._code, layout=self._layout, state=module_state(self.module.unet),
                            name=type(self.module.unet).__name__)

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        forward = self.bucket(sample.shape[0], tuple(sample.shape[1:]), embeddings.shape[1], sample.dtype,
                              sample.device, timesteps.dtype)
        return forward(sample, timesteps, embeddings)

    def bucket(self, rows: int, sample_shape: Sequence[int], tokens: int, dtype: torch.dtype,
               device: torch.device, timestep_dtype: torch.dtype = torch.long) -> Forward:
        device = torch.device(device)
        key = (int(rows), tuple(int(s) for s in sample_shape), int(tokens), dtype, device, timestep_dtype)
        if key not in self._forwards:
            if self._sealed is not None:
                log.warning(kv("package_bucket_unbuilt", kind=self.kind, rows=rows, sample="x".join(map(str, key[1])),
                               tokens=tokens,
                               action="eager: packages are built at start only (add the shape to --warm-shapes)"))
                self._forwards[key] = self._sealed
            else:
                self._forwards[key] = self._get(*key)
        return self._forwards[key]

    def seal(self, eager: Forward) -> None:
        """No more builds: a bucket first asked for after this runs ``eager`` (with a log line). The engine
        seals once its warm-up is done, so a shape nobody warmed never builds a package (minutes) in the
        serving thread while every running request waits."""
        self._sealed = eager

    # --- one bucket ---------------------------------------------------------------------------------------
    def _inputs(self, rows: int, sample_shape: tuple[int, ...], tokens: int, dtype: torch.dtype,
                device: torch.device, timestep_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The bucket's trial inputs: seeded noise (zeros would let a package with the wrong weights pass)."""
        g = torch.Generator().manual_seed(0)
        return (torch.randn((rows, *sample_shape), generator=g).to(device, dtype),
                torch.full((rows,), 500, dtype=timestep_dtype, device=device),
                torch.randn((rows, tokens, self.embedding_dim), generator=g).to(device, dtype))

    def _get(self, rows: int, sample_shape: tuple[int, ...], tokens: int, dtype: torch.dtype,
             device: torch.device, timestep_dtype: torch.dtype) -> Forward:
        name = self.name(rows, sample_shape, tokens, dtype, device, timestep_dtype)
        path = self.folder / name
        inputs = self._inputs(rows, sample_shape, tokens, dtype, device, timestep_dtype)
        started = time.perf_counter()
        status, facts = "built", {}
        if path.exists():
            try:
                forward = self._load(path, device)
                loaded_at = time.perf_counter()
                self._trial(forward, inputs)
                return self._done(name, rows, "loaded", started, forward, size=path.stat().st_size,
                                  load_s=round(loaded_at - started, 2))
            except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is built again
                log.warning(kv("package_unusable", kind=self.kind, name=name, rows=rows, reason=_reason(exc),
                               action="deleted, building it again"))
                path.unlink(missing_ok=True)
                status, facts = "rebuilt", {"why": _reason(exc)}
        try:
            forward, timings = self._build(path, inputs, device)
        except Exception as exc:  # noqa: BLE001 - the bucket still serves, through torch.compile
            log.warning(kv("package_fallback", kind=self.kind, name=name, rows=rows, reason=_reason(exc),
                           action="torch.compile for this bucket"))
            self.counts["fallback"] += 1
            self.info[name] = {"rows": rows, "status": "fallback", "why": _reason(exc),
                               "seconds": round(time.perf_counter() - started, 2)}
            return self._compiled()
        return self._done(name, rows, status, started, forward, size=path.stat().st_size, **timings, **facts)

    def _load(self, path: Path, device: torch.device, expected: set[str] | None = None) -> Forward:
        """The forward of the package at ``path``, on the live module's weights."""
        if self.kind == "precompile":
            return self._wrap(load_precompiled(self.module.unet, path))
        return self._wrap(load_package(path, device, self.weights(), expected=expected))

    @staticmethod
    def _wrap(run: Callable[..., torch.Tensor]) -> Forward:
        def forward(sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
            return run(_dense(sample), _dense(timesteps), _dense(embeddings))

        return forward

    def _build(self, path: Path, inputs: tuple[torch.Tensor, ...], device: torch.device
               ) -> tuple[Forward, dict[str, float]]:
        """Build into a temporary file beside ``path``, try the bucket's forward, then rename the file into place."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{SUFFIX[self.kind]}")
        try:
            if self.kind == "precompile":
                forward, timings = self._build_precompiled(tmp, inputs, device)
            else:
                forward, timings = self._build_aoti(tmp, inputs, device)
            tried = time.perf_counter()
            self._trial(forward, inputs)
            os.replace(tmp, path)
            return forward, {**timings, "trial_s": round(time.perf_counter() - tried, 2)}
        finally:
            tmp.unlink(missing_ok=True)

    def _build_precompiled(self, tmp: Path, inputs: tuple[torch.Tensor, ...], device: torch.device
                           ) -> tuple[Forward, dict[str, float]]:
        """Compile, save, then load the file back: what runs is what the next start will load, so a file
        that does not load fails this build (torch.compile serves the bucket) instead of every restart."""
        started = time.perf_counter()
        save_precompiled(precompile_forward(self.module.unet, inputs), tmp)
        compiled_at = time.perf_counter()
        forward = self._load(tmp, device)
        return forward, {"compile_s": round(compiled_at - started, 2),
                         "load_s": round(time.perf_counter() - compiled_at, 2)}

    def _build_aoti(self, tmp: Path, inputs: tuple[torch.Tensor, ...], device: torch.device
                    ) -> tuple[Forward, dict[str, float]]:
        """Export, compile the package, then load it back (an AOTI package runs only loaded)."""
        started = time.perf_counter()
        exported = export_forward(self.module, inputs)
        expected = used_weights(exported)
        exported_at = time.perf_counter()
        # a build takes minutes on a GPU: say where it stands (an operator watching a long first start)
        log.info(kv("aoti_exported", name=tmp.name, export_s=round(exported_at - started, 2),
                    next="compiling the package"))
        compile_package(exported, tmp, self.options)
        del exported
        compiled_at = time.perf_counter()
        forward = self._load(tmp, device, expected=expected)
        return forward, {"export_s": round(exported_at - started, 2), "compile_s": round(compiled_at - exported_at, 2),
                         "load_s": round(time.perf_counter() - compiled_at, 2)}

    def _trial(self, forward: Forward, inputs: tuple[torch.Tensor, ...]) -> None:
        """One call against eager on the bucket's trial inputs: a package that loads but cannot run, or runs
        to other numbers, fails here (and is built again, or torch.compile serves), not in a user's step."""
        with torch.inference_mode():
            out = forward(*inputs)
            if not isinstance(out, torch.Tensor) or out.shape != inputs[0].shape:
                raise RuntimeError(f"the package's output is {type(out).__name__} "
                                   f"{list(getattr(out, 'shape', []))}, not the sample's shape {list(inputs[0].shape)}")
            ref = self.module(*inputs).float()
        error = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))
        if not error < TRIAL_TOLERANCE:       # NaN fails too
            raise RuntimeError(f"the package's output differs from eager's: relative error {error:.3g} "
                               f"(allowed {TRIAL_TOLERANCE})")

    def _done(self, name: str, rows: int, status: str, started: float, forward: Forward, **facts: Any) -> Forward:
        seconds = round(time.perf_counter() - started, 2)
        self.counts[status] += 1
        self.info[name] = {"rows": rows, "status": status, "seconds": seconds, **facts}
        log.info(kv("package_bucket", kind=self.kind, name=name, rows=rows, status=status, seconds=seconds, **facts))
        return forward

    def _compiled(self) -> Forward:
        if self._fallback is None:
            self._fallback = self._make_fallback(self.module)
        return self._fallback


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of a fresh contiguous tensor, which the package checks its inputs against (an
    expanded or sliced input would be refused); no copy when it has them already."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(int(size), 1)
    return t if tuple(reversed(expected)) == t.stride() else t.clone(memory_format=torch.contiguous_format)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"
