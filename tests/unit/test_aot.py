"""Packages per compiled bucket (services/denoiser/aot.py), of both kinds (Dynamo's precompile, AOTInductor),
on a small module shaped like the UNet's call (sample, timestep, encoder_hidden_states -> a tuple): built
once, then loaded by a fresh provider without building; equal to eager; weights always the live module's
(two modules of one architecture through one package each get their own output); keyed by everything but
the weights; a corrupt package rebuilt; a model that does not build served by torch.compile.

Compiling the real UNet takes minutes on a CPU; this module compiles in seconds. Two packages of each kind
are compiled in the whole file (the shared one, and the corrupt one's rebuild)."""

from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn

from services.denoiser import aot

ROWS, SAMPLE, TOKENS, DIM = 2, (4, 8, 8), 5, 16
# A quicker C++ build of the wrapper: what the tests check does not depend on its optimisation.
OPTIONS = {"aot_inductor.compile_wrapper_opt_level": "O0"}


class TinyUNet(nn.Module):
    """Conv, GroupNorm, SiLU, a Linear on the embeddings, the timestep, and an output conv with 4 channels
    (its bias has 4 numbers: the size Inductor would inline into a kernel as literals)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.config = FrozenDict(_class_name="TinyUNet", in_channels=4, cross_attention_dim=DIM, sample_size=8,
                                 _name_or_path=f"/models/seed{seed}")     # diffusers' config: keys and attributes
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(DIM, 8)
        self.out = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.5)         # GroupNorm's ones and zeros too: every weight differs between seeds
        self.eval().requires_grad_(False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False) -> tuple[torch.Tensor]:
        h = nn.functional.silu(self.norm(self.conv(sample)))
        h = h + self.proj(encoder_hidden_states).mean(1)[:, :, None, None] + timestep.float()[:, None, None, None] / 1e3
        return (self.out(h),)


def inputs(rows: int = ROWS, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((rows, *SAMPLE), generator=g), torch.randint(0, 1000, (rows,), generator=g),
            torch.randn((rows, TOKENS, DIM), generator=g))


def eager(module: nn.Module, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(x, t, encoder_hidden_states=e, return_dict=False)[0]


# the step of each kind that builds (a test replaces it to prove nothing is built)
BUILD_STEP = {"precompile": "precompile_forward", "aoti": "export_forward"}


def provider(module: nn.Module, folder: Path, kind: str, **kwargs: Any) -> aot.AotBuckets:
    return aot.AotBuckets(module, folder, embedding_dim=DIM, kind=kind, options=OPTIONS, **kwargs)


def bucket(buckets: aot.AotBuckets, rows: int = ROWS) -> aot.Forward:
    # in inference mode, as the engine's warm-up and steps call it
    with torch.inference_mode():
        return buckets.bucket(rows, SAMPLE, TOKENS, torch.float32, torch.device("cpu"))


def run(forward: aot.Forward, x: torch.Tensor, t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return forward(x, t, e)


@pytest.fixture(scope="module", params=aot.KINDS)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, aot.AotBuckets]:
    """One package of each kind, built for module seed 0 at ROWS rows: the folder and the provider that built it."""
    folder = tmp_path_factory.mktemp(f"cache-{request.param}")
    buckets = provider(TinyUNet(0), folder, request.param)
    bucket(buckets)
    return folder, buckets


def package_of(folder: Path, kind: str) -> Path:
    (path,) = (folder / aot.SUBFOLDER).glob(f"*{aot.SUFFIX[kind]}")
    return path


def never_build(monkeypatch: pytest.MonkeyPatch, kind: str, why: str) -> None:
    def fail(*_: Any) -> None:
        raise AssertionError(why)

    monkeypatch.setattr(aot, BUILD_STEP[kind], fail)


@pytest.mark.slow
def test_a_package_is_built_once_then_loaded_without_building(built, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, first = built
    kind = first.kind
    assert first.counts == {"loaded": 0, "built": 1, "rebuilt": 0, "fallback": 0}
    path = package_of(folder, kind)
    assert path.name == first.name(ROWS, SAMPLE, TOKENS, torch.float32, torch.device("cpu"))
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left beside it"
    info = first.info[path.name]
    assert info["status"] == "built" and {"compile_s", "trial_s"} <= set(info)
    mtime = path.stat().st_mtime_ns

    never_build(monkeypatch, kind, "a package that is there must be loaded, not built again")
    module = TinyUNet(0)
    again = provider(module, folder, kind)
    forward = bucket(again)
    assert again.counts == {"loaded": 1, "built": 0, "rebuilt": 0, "fallback": 0}
    assert path.stat().st_mtime_ns == mtime
    x, t, e = inputs()
    assert torch.allclose(run(forward, x, t, e), eager(module, x, t, e), atol=1e-5, rtol=0)
    assert bucket(again) is forward, "one load per bucket and process"


@pytest.mark.slow
def test_the_weights_are_the_live_modules_never_the_packages(built) -> None:
    folder, first = built
    a, b = TinyUNet(0), TinyUNet(1)
    forward_a, forward_b = bucket(provider(a, folder, first.kind)), bucket(provider(b, folder, first.kind))
    assert len(list((folder / aot.SUBFOLDER).iterdir())) == 1, "one package, loaded twice"
    x, t, e = inputs()
    out_a, out_b = run(forward_a, x, t, e), run(forward_b, x, t, e)
    assert torch.allclose(out_a, eager(a, x, t, e), atol=1e-5, rtol=0)
    assert torch.allclose(out_b, eager(b, x, t, e), atol=1e-5, rtol=0)
    assert not torch.allclose(out_a, out_b, atol=1e-2), "two checkpoints, two outputs"
    with torch.no_grad():                     # the loaded forward reads the module's own tensors, not copies
        for p in b.parameters():
            p.mul_(-1.5)
    assert torch.allclose(run(forward_b, x, t, e), eager(b, x, t, e), atol=1e-5, rtol=0)
    stored = package_of(folder, first.kind).read_bytes()
    assert TinyUNet(0).conv.weight.detach().numpy().tobytes() not in stored, "no weight is in the package"
    if first.kind == "aoti":
        with zipfile.ZipFile(package_of(folder, "aoti")) as archive:
            assert not [n for n in archive.namelist() if "weight" in n.lower() or n.endswith((".bin", ".pt"))]


def test_the_name_changes_with_everything_the_code_depends_on_and_nothing_else() -> None:
    module = TinyUNet(0)
    base = dict(config=module.config, kind="aoti", rows=2, sample_shape=(4, 16, 32, 32), tokens=77,
                dtype=torch.float16, device="cuda:0", code=aot.code_version(module), layout=aot.weight_layout(module),
                state=aot.module_state(module), name="UNet3D")
    name = aot.package_name(**base)
    assert name.startswith("UNet3D-r2-4x16x32x32-t77-float16-cuda_0-") and name.endswith(".pt2")
    assert all(c.isalnum() or c in "._-" for c in name), name
    others = [dict(rows=32), dict(sample_shape=(4, 8, 32, 32)), dict(tokens=64), dict(dtype=torch.bfloat16),
              dict(device="cpu"), dict(device="cuda:1"), dict(timestep_dtype=torch.float32),
              dict(code="diffusers 0.0.1"), dict(config={**module.config, "in_channels": 8}),
              dict(layout=aot.weight_layout(TinyUNet(0).half())), dict(state=aot.module_state(TinyUNet(0).train())),
              dict(kind="precompile")]
    names = {aot.package_name(**{**base, **change}) for change in others}
    assert len(names | {name}) == len(others) + 1
    # the weights, where the model was read from, and a version of its config file are not in the key
    assert aot.package_name(**{**base, "config": TinyUNet(1).config, "layout": aot.weight_layout(TinyUNet(1))}) == name
    assert aot.package_name(**{**base, "config": {**module.config, "_diffusers_version": "0.1"}}) == name
    assert aot.code_version(module).endswith(" none"), "a module of no versioned package"
    with pytest.raises(ValueError, match="precompile or aoti"):
        aot.package_name(**{**base, "kind": "tensorrt"})
    # Inductor's kernel tuning (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1, ...): other kernels, another package
    import torch._inductor.config as inductor_config

    for setting in aot.INDUCTOR_TUNING:
        with inductor_config.patch({setting: not getattr(inductor_config, setting)}):
            assert aot.package_name(**base) != name, setting
    assert aot.package_name(**base) == name
    import diffusers
    from diffusers.models.embeddings import TimestepEmbedding

    assert aot.code_version(TimestepEmbedding(4, 8)) == f"diffusers {diffusers.__version__}"
    assert aot.device_label(torch.device("cpu")) == "cpu" and aot.device_label(torch.device("cuda", 1)) == "cuda:1"


def test_the_state_names_the_mode_and_the_attention_processors() -> None:
    from diffusers import UNet3DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model = UNet3DConditionModel.from_pretrained(Path(__file__).resolve().parents[2] / "models" / "t2v-world" / "unet")
    model.set_attn_processor(AttnProcessor2_0())
    assert aot.module_state(model.eval()) == ["training=False", "attn=AttnProcessor2_0"]
    model.set_attn_processor(AttnProcessor())
    assert aot.module_state(model.train()) == ["training=True", "attn=AttnProcessor"]
    assert aot.module_state(TinyUNet(0)) == ["training=False"], "a module without attention processors"
    from services.denoiser import short_attention

    model.set_attn_processor(short_attention.ShortAttnProcessor())     # the project's own: its code's digest too
    assert aot.module_state(model.eval()) == ["training=False",
                                              f"attn=ShortAttnProcessor@{short_attention.CODE_VERSION}"]


@pytest.mark.slow
def test_a_corrupt_package_is_deleted_and_built_again(built, tmp_path: Path, caplog) -> None:
    kind = built[1].kind
    folder = tmp_path / "cache"
    shutil.copytree(built[0], folder)
    path = package_of(folder, kind)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])      # truncated
    module = TinyUNet(0)
    buckets = provider(module, folder, kind)
    with caplog.at_level(logging.WARNING, logger="denoiser.aot"):
        forward = bucket(buckets)
    assert "event=package_unusable" in caplog.text and "building it again" in caplog.text
    assert buckets.counts["rebuilt"] == 1 and buckets.info[path.name]["status"] == "rebuilt"
    x, t, e = inputs()
    assert torch.allclose(run(forward, x, t, e), eager(module, x, t, e), atol=1e-5, rtol=0)
    fresh = provider(TinyUNet(0), folder, kind)      # the rebuilt package loads in a fresh provider
    bucket(fresh)
    assert fresh.counts["loaded"] == 1


@pytest.mark.slow
def test_a_package_that_runs_to_other_numbers_is_never_served(built, tmp_path: Path, monkeypatch, caplog) -> None:
    """The trial compares a package's first output with eager: one that loads and runs but computes something
    else (built for other code) is deleted and built again, and a build whose file still loads wrong falls
    back to torch.compile at once instead of being rebuilt at every restart."""
    kind = built[1].kind
    folder = tmp_path / "cache"
    shutil.copytree(built[0], folder)
    loader = "load_precompiled" if kind == "precompile" else "load_package"
    real = getattr(aot, loader)
    monkeypatch.setattr(aot, loader, lambda *args, **kw: (lambda *x: real(*args, **kw)(*x) * 1.5))
    module = TinyUNet(0)
    buckets = provider(module, folder, kind, fallback=lambda m: (lambda x, t, e: eager(m.unet, x, t, e)))
    with caplog.at_level(logging.WARNING, logger="denoiser.aot"):
        forward = bucket(buckets)
    assert "event=package_unusable" in caplog.text and "differs from eager" in caplog.text
    assert "event=package_fallback" in caplog.text
    assert buckets.counts == {"loaded": 0, "built": 0, "rebuilt": 0, "fallback": 1}
    x, t, e = inputs()
    assert torch.allclose(run(forward, x, t, e), eager(module, x, t, e), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", aot.KINDS)
def test_a_model_that_does_not_build_is_served_by_torch_compile(kind: str, tmp_path: Path, monkeypatch,
                                                                caplog) -> None:
    def fail(*_: Any) -> None:
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(aot, BUILD_STEP[kind], fail)
    made: list[nn.Module] = []

    def compile_(module: nn.Module) -> aot.Forward:
        made.append(module)
        return module            # stands for torch.compile(module): the same numbers, no compile time

    module = TinyUNet(0)
    buckets = provider(module, tmp_path, kind, fallback=compile_)
    with caplog.at_level(logging.WARNING, logger="denoiser.aot"):
        forward = bucket(buckets)
        bucket(buckets, rows=4)
    assert "event=package_fallback" in caplog.text and "data-dependent control flow" in caplog.text
    assert "torch.compile for this bucket" in caplog.text and f"kind={kind}" in caplog.text
    assert buckets.counts["fallback"] == 2 and len(made) == 1, "one torch.compile for every bucket that falls back"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing half-built is left"
    x, t, e = inputs()
    assert torch.equal(run(forward, x, t, e), eager(module, x, t, e))


@pytest.mark.parametrize("kind", aot.KINDS)
def test_the_default_fallback_is_torch_compile_with_static_shapes(kind: str, tmp_path: Path, monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(aot, BUILD_STEP[kind], lambda *_: (_ for _ in ()).throw(RuntimeError("no")))
    monkeypatch.setattr(torch, "compile", lambda module, **kw: calls.append(kw) or module)
    bucket(provider(TinyUNet(0), tmp_path, kind))
    assert calls == [{"dynamic": False}]


def test_a_model_with_constants_of_its_own_falls_back(tmp_path: Path) -> None:
    class WithConstant(TinyUNet):
        def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
            return (super().forward(sample, timestep, encoder_hidden_states)[0] * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None, None],)

    buckets = provider(WithConstant(0), tmp_path, "aoti", fallback=lambda module: module)
    bucket(buckets)
    assert buckets.counts["fallback"] == 1 and "constants of its own" in next(iter(buckets.info.values()))["why"]


@pytest.mark.slow
@pytest.mark.parametrize("built", ["aoti"], indirect=True)   # AOTInductor's own check: a precompiled forward
def test_an_aoti_package_missing_a_weight_it_should_take_is_refused(built) -> None:   # reads every weight live
    folder, first = built
    assert first.kind == "aoti"
    weights = first.weights()
    with pytest.raises(aot.NotWeightsFree, match="compiled into the package"):
        aot.load_package(package_of(folder, "aoti"), torch.device("cpu"), weights,
                         expected={*weights, "unet.extra.weight"})
    with pytest.raises(aot.NotWeightsFree, match="does not have"):
        aot.load_package(package_of(folder, "aoti"), torch.device("cpu"),
                         {k: v for k, v in weights.items() if "conv" not in k})


def test_inputs_get_the_strides_the_package_checks() -> None:
    t = torch.tensor(5).reshape(1).expand(3)
    assert aot._dense(t).stride() == (1,) and torch.equal(aot._dense(t), t)
    x = torch.zeros(2, 3)
    assert aot._dense(x) is x


@pytest.mark.slow
def test_the_engine_runs_its_compiled_rows_through_the_packages(built) -> None:
    from services.denoiser import engine as eng

    folder, first = built
    module = TinyUNet(0)
    engine = eng.DenoiseEngine(module, {}, torch.device("cpu"), torch.float32, max_batch=2, deep_cache_interval=0)
    with pytest.raises(ValueError, match="compile cache"):
        engine.use_compile({ROWS}, backend=first.kind)
    with pytest.raises(ValueError, match="inductor or precompile or aoti"):
        engine.use_compile({ROWS}, backend="tensorrt", folder=folder)
    engine.use_compile({ROWS}, backend=first.kind, folder=folder)
    assert engine.compile_backend == first.kind and engine.compile_rows == {ROWS}
    for rows in (ROWS, 3):
        x, t, e = inputs(rows)
        with torch.inference_mode():
            out = engine._forward(x, t, e)
        assert torch.allclose(out, eager(module, x, t, e), atol=1e-5, rtol=0)
    assert engine.aot_counts == {"loaded": 1, "built": 0, "rebuilt": 0, "fallback": 0}


@pytest.mark.slow
def test_after_the_warm_up_a_bucket_not_built_runs_eager_and_builds_nothing(built, monkeypatch, caplog) -> None:
    """A package takes minutes to build on a GPU: once sealed (the engine's warm() does it), a shape nobody
    warmed must not build one in the serving thread while every running request waits."""
    folder, first = built
    module = TinyUNet(0)
    buckets = provider(module, folder, first.kind)
    bucket(buckets)                                        # the warmed bucket: loaded
    calls: list[int] = []
    buckets.seal(lambda x, t, e: calls.append(x.shape[0]) or eager(module, x, t, e))
    never_build(monkeypatch, first.kind, "a sealed provider must not build")
    x, t, e = inputs(ROWS + 1)                              # rows never warmed
    with caplog.at_level("WARNING", logger="denoiser.aot"):
        out = run(buckets, x, t, e)
    assert calls == [ROWS + 1] and torch.allclose(out, eager(module, x, t, e), atol=1e-5, rtol=0)
    assert "package_bucket_unbuilt" in caplog.text
    assert len(list((folder / aot.SUBFOLDER).iterdir())) == 1
    x, t, e = inputs()
    run(buckets, x, t, e)                                  # the built one still runs its package
    assert calls == [ROWS + 1] and buckets.counts["loaded"] == 1


def test_the_denoiser_setting_and_its_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from services.common.config import parse_config
    from services.common.server import run_stage
    from services.denoiser.server import SERVICE_NAME, DenoiserConfig, DenoiserServicer, check_compile, compile_backend

    default = parse_config(DenoiserConfig, [], "t2v serve denoiser", "d")
    assert default.compile_backend == "auto" and compile_backend(default) == "inductor", "no cache: torch.compile"
    assert compile_backend(replace(default, compile_cache="/var/cache/t2v")) == "precompile"
    from torch._dynamo.eval_frame import OptimizedModule

    with monkeypatch.context() as patched:           # a torch without Dynamo's ahead-of-time compile
        patched.delattr(OptimizedModule, "_aot_compile")
        assert compile_backend(replace(default, compile_cache="/var/cache/t2v")) == "inductor"
    check_compile(replace(default, compile_rows="2,32"))
    monkeypatch.setenv("T2V_COMPILE_BACKEND", "precompile")
    config = parse_config(DenoiserConfig, ["--compile-rows", "2,32"], "t2v serve denoiser", "d")
    assert config.compile_backend == "precompile"
    check_compile(replace(config, compile_cache="/var/cache/t2v"))
    check_compile(replace(config, compile_rows=""))          # nothing to compile: nothing to keep
    with pytest.raises(ValueError, match="auto or inductor or precompile or aoti"):
        check_compile(replace(config, compile_backend="tensorrt"))
    with pytest.raises(SystemExit, match=r"^denoiser: --compile-backend precompile keeps its packages in the compile "
                                         r"cache: give --compile-cache DIR"):
        run_stage(config, "denoiser", SERVICE_NAME, DenoiserServicer, lambda *_: None)
