"""bench/bench_gpu.py --quick on the CPU, as issue #15 asks CI to keep it: the GPU benchmark's every phase
that runs without a GPU (the peer pipeline, the in-process floor, the mesh through the gateway, cache none
and deep) on the embedded model, so a change that breaks the script is found here, not on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_base_port

ROOT = Path(__file__).resolve().parents[2]
EVENTS = {"text_encoder_started", "denoiser_started", "first_step", "decoder_started", "video"}


def assert_arrivals(arrivals: dict) -> None:
    """Every stage's first/median/last arrival of a burst, in order within each and across the pipeline."""
    assert set(arrivals) == EVENTS, arrivals
    assert all(0 <= v["first"] <= v["median"] <= v["last"] for v in arrivals.values()), arrivals
    firsts = [arrivals[k]["first"] for k in ("text_encoder_started", "denoiser_started", "first_step",
                                               "decoder_started", "video")]
    assert firsts == sorted(firsts), arrivals


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_quick_mode_on_the_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--quick", "--out", str(tmp_path),
                           "--base-port", str(free_base_port())],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["device"] == "cpu" and report["phases"] == ["peer", "floor", "mesh"]
    assert len(report["peer"]["latencies_s"]) == 2 and report["peer"]["latency_s"] > 0
    mesh = report["mesh"]
    assert mesh["starts"] and mesh["starts"][0]["seconds"] > 0 and "warm" in mesh["starts"][0]
    assert len(mesh["latencies_s"]) == 2 and 0 <= mesh["non_gpu_share"] < 1
    assert mesh["throughput"]["2"]["videos_per_s"] > 0
    assert_arrivals(mesh["throughput"]["2"]["arrivals_s"])
    assert mesh["cache_deep"]["throughput"]["2"]["videos_per_s"] > 0
    for figures in (*report["host_load"].values(), mesh["host_load"], mesh["throughput"]["2"]["host_load"]):
        assert 0 < figures["busy_share"] <= 1 and 0 <= figures["steal_share"] < 1 and figures["core_ms_before"] > 0
    assert set(report["host_load"]) == {"peer", "floor", "mesh"}
    for round_ in (mesh["host_load"], mesh["throughput"]["2"]["host_load"]):     # every service is found in both
        assert {"gateway", "text_encoder", "denoiser", "decoder"} <= set(round_["cpu_s"])
        assert min(round_["cpu_s"].values()) >= 0 and round_["cpu_s"]["denoiser"] > 0.1   # it ran the UNet
    table = (tmp_path / "results.md").read_text()
    assert "| mesh latency, concurrency 1" in table and "cache deep" in table
    assert "| host CPUs during the peer phase" in table and "| ... during the mesh's 2 concurrent | busy" in table
    assert (tmp_path / "logs.tgz").stat().st_size > 0


@pytest.mark.slow
def test_the_burst_benchmark_times_each_request_at_each_stage(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "bench/bench_burst.py", "--requests", "3", "--steps", "2", "--out",
                           str(tmp_path), "--base-port", str(free_base_port())],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_arrivals(json.loads((tmp_path / "burst.json").read_text())["arrivals_s"])
    assert "denoiser_started: first" in proc.stdout


@pytest.mark.slow
def test_the_decoder_probe_reports_each_environment_and_the_torch_threads_it_asked_for(tmp_path: Path) -> None:
    base = free_base_port()
    proc = subprocess.run([sys.executable, "bench/probe_decoder.py", "--out", str(tmp_path), "--calls", "2",
                           "--frames", "4", "--size", "64", "--idle-s", "0.5", "--base-port", str(base),
                           "--variants", "default;one=T2V_TORCH_THREADS=1;two=T2V_TORCH_THREADS=2"],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variants = json.loads((tmp_path / "decoder.json").read_text())["variants"]
    assert set(variants) == {"default", "one", "two"} and variants["one"]["env"] == {"T2V_TORCH_THREADS": "1"}
    for figures in variants.values():
        assert len(figures["walls_s"]) == 2 and figures["vae_s_per_call"] > 0 and figures["cpu_s_per_call"] > 0
        assert figures["busiest_threads_s"] and figures["idle_cpu_cores"] < 0.5
    # the setting reached the stage: torch's OpenMP team of two has a thread that one thread does without (the
    # default is left out: pytest's workers may run with OMP_NUM_THREADS=1)
    assert variants["one"]["threads"] < variants["two"]["threads"]
