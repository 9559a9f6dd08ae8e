"""torch.compile's cache folder (services/denoiser/compile_cache.py): keyed by torch, Triton, CUDA,
Python and GPU; a stale, foreign or unfinished folder is detected and rebuilt, never used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from services.denoiser import compile_cache as cc

HERE = cc.Identity(torch="2.11.0+cu130", triton="3.6.0", cuda="13.0", python="3.12", gpu="NVIDIA H200",
                   capability="90")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def keep_environment(monkeypatch: pytest.MonkeyPatch):
    """open() points torch's caches at the folder through os.environ: undo it after each test."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                 "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.delenv(name, raising=False)     # restored (or removed again) after the test


def test_the_key_changes_with_torch_triton_cuda_python_and_the_gpu() -> None:
    key = HERE.key()
    assert key.startswith("torch2.11.0_cu130-triton3.6.0-cuda13.0-NVIDIA_H200-sm90-")
    assert all(c.isalnum() or c in "._-" for c in key), key
    others = [replace(HERE, torch="2.12.0+cu130"), replace(HERE, triton="3.7.0"), replace(HERE, cuda="12.8"),
              replace(HERE, python="3.13"), replace(HERE, gpu="NVIDIA H100 80GB HBM3"),
              replace(HERE, capability="100"), replace(HERE, format=cc.FORMAT + 1)]
    assert len({key, *(o.key() for o in others)}) == len(others) + 1
    assert HERE.key() == key, "the same software and GPU: the same folder"


def test_the_identity_of_this_process() -> None:
    ident = cc.identity(torch.device("cpu"))
    assert ident.torch == torch.__version__ and ident.gpu == "cpu" and ident.capability == "none"
    assert ident.python == "%d.%d" % sys.version_info[:2]


def manifest(ident: cc.Identity = HERE, complete: bool = True) -> dict:
    from dataclasses import asdict

    return {"identity": asdict(ident), "complete": complete}


@pytest.mark.parametrize("found, why", [
    (None, "no readable manifest"),
    ({"complete": True}, "no identity"),
    ([1, 2], "no identity"),
    (manifest(replace(HERE, torch="2.10.0+cu128")), "torch '2.10.0+cu128'"),
    (manifest(replace(HERE, triton="3.5.0")), "triton '3.5.0'"),
    (manifest(replace(HERE, gpu="NVIDIA H100 80GB HBM3", capability="90")), "gpu 'NVIDIA H100 80GB HBM3'"),
    (manifest(complete=False), "did not finish"),
    ({**manifest(), "identity": {**manifest()["identity"], "extra": "x"}}, "extra"),
])
def test_a_stale_foreign_or_unfinished_manifest_is_not_trusted(found, why: str) -> None:
    trust, reason = cc.verdict(found, HERE)
    assert not trust and why in reason, reason


def test_a_complete_manifest_of_the_same_identity_is_trusted() -> None:
    assert cc.verdict(manifest(), HERE) == (True, "warm")


def test_open_builds_marks_complete_then_reuses(tmp_path: Path) -> None:
    cache = cc.CompileCache(tmp_path, HERE)
    assert cache.open() == "new"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / HERE.key() / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / HERE.key() / "triton")
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    artefact = cache.folder / "inductor" / "fxgraph" / "entry"
    artefact.parent.mkdir(parents=True)
    artefact.write_text("compiled")
    assert cc.read_manifest(cache.folder)["complete"] is False, "unfinished until complete()"
    cache.complete(compile_rows=[2, 32], warm_seconds=12.5)
    written = cc.read_manifest(cache.folder)
    assert written["complete"] is True and written["compile_rows"] == [2, 32]

    again = cc.CompileCache(tmp_path, HERE)
    assert again.open() == "warm"
    assert artefact.read_text() == "compiled", "a trusted cache is kept"
    again.close()


@pytest.mark.parametrize("spoil, why", [
    (lambda folder: (folder / cc.MANIFEST).unlink(), "no readable manifest"),
    (lambda folder: (folder / cc.MANIFEST).write_text("{not json"), "no readable manifest"),
    (lambda folder: (folder / cc.MANIFEST).write_text(json.dumps(manifest(replace(HERE, torch="2.9.1")))),
     "torch '2.9.1'"),
    (lambda folder: (folder / cc.MANIFEST).write_text(json.dumps(manifest(complete=False))), "did not finish"),
])
def test_a_spoiled_folder_is_deleted_and_rebuilt(tmp_path: Path, spoil, why: str) -> None:
    cache = cc.CompileCache(tmp_path, HERE)
    cache.open()
    (cache.folder / "triton" / "kernel.cubin").parent.mkdir(parents=True)
    (cache.folder / "triton" / "kernel.cubin").write_text("from elsewhere")
    cache.complete()
    spoil(cache.folder)

    again = cc.CompileCache(tmp_path, HERE)
    status = again.open()
    assert status.startswith("rebuilt") and why in status, status
    assert not (again.folder / "triton" / "kernel.cubin").exists(), "nothing of the untrusted folder is used"
    assert cc.read_manifest(again.folder)["complete"] is False
    again.close()


def test_an_unfinished_warm_up_keeps_its_finished_aoti_packages_and_nothing_else(tmp_path: Path) -> None:
    """A first start cut short (a pod killed by its startup probe while building packages for minutes): the
    next start of the same software and GPU keeps the packages it finished, so the build makes progress
    across restarts; Inductor's and Triton's caches go as before. Another identity keeps nothing."""
    from services.denoiser import aot

    assert cc.KEPT_WHEN_UNFINISHED == aot.SUBFOLDER, "the kept folder is the one aot.py writes its packages in"
    cache = cc.CompileCache(tmp_path, HERE)
    cache.open()
    for part in ("packages/UNet-r2.precompile", "packages/.UNet-r32.1234.tmp.precompile", "triton/kernel.cubin", "inductor/fxgraph/entry"):
        (cache.folder / part).parent.mkdir(parents=True, exist_ok=True)
        (cache.folder / part).write_text(part)
    cache.close()                                           # never completed

    again = cc.CompileCache(tmp_path, HERE)
    status = again.open()
    assert status.startswith("rebuilt: incomplete") and "packages kept" in status, status
    assert [p.name for p in (again.folder / "packages").iterdir()] == ["UNet-r2.precompile"], "a half-written one goes"
    assert (again.folder / "packages" / "UNet-r2.precompile").read_text() == "packages/UNet-r2.precompile"
    assert not (again.folder / "triton").exists() and not (again.folder / "inductor").exists()
    assert cc.read_manifest(again.folder)["complete"] is False
    again.close()

    (again.folder / cc.MANIFEST).write_text(json.dumps(manifest(replace(HERE, torch="2.9.1"), complete=False)))
    other = cc.CompileCache(tmp_path, HERE)
    assert "torch '2.9.1'" in other.open()
    assert not (other.folder / "packages").exists(), "another torch's packages are never kept"
    other.close()


def test_a_folder_of_another_gpu_stays_beside_this_one(tmp_path: Path) -> None:
    """Pools of different GPUs may share one volume: each key has its own folder."""
    h100 = replace(HERE, gpu="NVIDIA H100 80GB HBM3")
    for ident in (HERE, h100):
        cache = cc.CompileCache(tmp_path, ident)
        cache.open()
        cache.complete()
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {HERE.key(), h100.key()}
    assert cc.CompileCache(tmp_path, h100).open() == "warm"


def test_a_second_process_waits_for_the_lock_or_compiles_privately(tmp_path: Path) -> None:
    """While one process compiles (holds the key's lock), another with the same key does not touch the
    folder: it waits, and past its timeout compiles into a private folder."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from services.denoiser import compile_cache as cc
        ident = cc.Identity(**{HERE.__dict__!r})
        cache = cc.CompileCache({str(tmp_path)!r}, ident)
        cache.open()
        print("locked", flush=True)
        time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = cc.CompileCache(tmp_path, HERE)
        status = other.open(lock_timeout=1.0)
        assert status.startswith("private"), status
        assert not other.folder.is_relative_to(tmp_path)
        other.close()
    finally:
        holder.kill()
        holder.wait()
    # The holder died before complete(): its lock is gone with it, and its folder is not trusted.
    after = cc.CompileCache(tmp_path, HERE)
    assert after.open(lock_timeout=5.0).startswith("rebuilt: incomplete")
    after.close()


def test_bucket_times_are_kept_for_the_identity_that_measured_them(tmp_path) -> None:
    """A warm start reuses the bucket times the start before it measured (engine.warm(known=...)), but
    only for the same UNet, dtype, buckets and compiled sizes; anything else is measured again."""
    from services.denoiser.compile_cache import load_plans, save_plans

    who = {"unet": {"block_out_channels": [320, 640]}, "dtype": "torch.float16", "buckets": [1, 2, 4],
           "compile_rows": [2]}
    plans = {(16, 256, 256): {1: 0.0363, 2: 0.0369, 4: 0.0941}}
    save_plans(tmp_path, who, plans)
    assert load_plans(tmp_path, who) == plans
    assert load_plans(tmp_path, {**who, "compile_rows": [2, 32]}) == {}
    assert load_plans(tmp_path / "elsewhere", who) == {}
    (tmp_path / "plans.json").write_text("{not json")
    assert load_plans(tmp_path, who) == {}
