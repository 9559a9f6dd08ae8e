"""``t2v up --gpus`` (issue 18): which processes the mesh starts on a node with several GPUs, and how the
gateway reaches them. Pure logic: the commands, not the processes (no GPU here)."""

from __future__ import annotations

import pytest

from t2v.up import Mesh, MeshPorts, parse_gpus


def flag(command: list[str], name: str) -> str | None:
    for index, arg in enumerate(command):
        if arg == name:
            return command[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def test_gpus_all_or_a_list_and_clear_refusals() -> None:
    assert parse_gpus("all", 4) == (0, 1, 2, 3)
    assert parse_gpus("0,2", 4) == (0, 2)
    for bad, available in [("all", 0), ("4", 4), ("0,0", 2), ("x", 2), ("", 2)]:
        with pytest.raises(ValueError, match="--gpus"):
            parse_gpus(bad, available)


def test_one_denoiser_per_gpu_and_the_gateway_spreads_jobs_over_them() -> None:
    mesh = Mesh("127.0.0.1", MeshPorts(), "/m", gpus=(0, 1, 2))
    assert mesh.names == ["text_encoder", "denoiser", "denoiser-1", "denoiser-2", "decoder", "gateway"]
    ports = [int(flag(mesh.command(n), "--port")) for n in ("denoiser", "denoiser-1", "denoiser-2")]
    assert ports == [50052, 50062, 50072]
    assert [flag(mesh.command(n), "--gpu") for n in ("denoiser", "denoiser-1", "denoiser-2")] == ["0", "1", "2"]
    assert [flag(mesh.command(n), "--metrics-port") for n in ("denoiser", "denoiser-1")] == ["50152", "50162"]
    gateway = mesh.command("gateway")
    assert flag(gateway, "--denoiser") == "ipv4:127.0.0.1:50052,127.0.0.1:50062,127.0.0.1:50072"
    assert flag(gateway, "--slots") == "12"
    assert flag(mesh.command("text_encoder"), "--device") == "cuda:0"
    assert flag(mesh.command("decoder"), "--device") == "cuda:0"
    assert mesh.command("denoiser-1")[3:5] == ["serve", "denoiser"]


def test_cfg_parallel_pairs_the_gpus() -> None:
    mesh = Mesh("127.0.0.1", MeshPorts(), "/m", gpus=(0, 1, 2, 3, 4), cfg_parallel=True)
    assert mesh.denoiser_gpus == [(0, 1), (2, 3)]             # the odd GPU out is left alone
    first, second = mesh.command("denoiser"), mesh.command("denoiser-1")
    assert (flag(first, "--gpu"), flag(first, "--cfg-parallel-device")) == ("0", "cuda:1")
    assert (flag(second, "--gpu"), flag(second, "--cfg-parallel-device")) == ("2", "cuda:3")
    assert flag(first, "--cfg-parallel") == "true"


def test_without_gpus_the_mesh_is_as_before() -> None:
    mesh = Mesh("127.0.0.1", MeshPorts(), "/m", device="cpu")
    assert mesh.names == ["text_encoder", "denoiser", "decoder", "gateway"]
    assert flag(mesh.command("gateway"), "--denoiser") == "127.0.0.1:50052"
    assert flag(mesh.command("gateway"), "--slots") is None
    assert flag(mesh.command("denoiser"), "--device") == "cpu" and flag(mesh.command("denoiser"), "--gpu") is None
