"""services.decoder.encode_threads: x264 threads a video from the calls in the decoder and the cores."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from services.decoder.encode_threads import EncodeThreads, available_cores, threads_for
from services.decoder.video import encode_mp4
from tests.unit.test_video import x264_options


@pytest.mark.parametrize(("calls", "cores", "threads"), [
    (1, 16, 16), (4, 16, 4), (5, 16, 3), (8, 16, 2), (16, 16, 1), (64, 16, 1), (1, 2, 2), (3, 2, 1), (0, 4, 4),
])
def test_the_cores_are_shared_out_among_the_calls(calls: int, cores: int, threads: int) -> None:
    assert threads_for(calls, cores) == threads


@pytest.mark.parametrize(("cpu_max", "cores"), [
    ("max 100000\n", 16), ("200000 100000\n", 2), ("150000 100000\n", 2), ("1000 100000\n", 1),
    ("-1 100000\n", 1), ("200000 0\n", 16), ("garbage\n", 16), ("200000\n", 16), ("", 16), (None, 16),
])
def test_the_cores_are_the_affinity_capped_by_the_cgroup_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               cpu_max: str | None, cores: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    assert available_cores(tmp_path, tmp_path / "no-proc-cgroup") == cores


def test_the_quota_is_read_from_the_cgroup_proc_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cgroup namespace (systemd's CPUQuota, docker --cgroupns=host) the root's cpu.max is the
    host's; the process's own is under the path /proc/self/cgroup gives."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "system.slice" / "t2v.service").mkdir(parents=True)
    (tmp_path / "system.slice" / "t2v.service" / "cpu.max").write_text("400000 100000\n")
    (tmp_path / "proc-cgroup").write_text("0::/system.slice/t2v.service\n")
    assert available_cores(tmp_path, tmp_path / "proc-cgroup") == 4


def test_calls_in_the_decoder_are_counted_from_threads_and_let_go() -> None:
    threads = EncodeThreads(cores=16)
    inside, release = threading.Barrier(17), threading.Event()

    def call() -> None:
        with threads.counting_call():
            inside.wait(10)
            release.wait(10)

    workers = [threading.Thread(target=call) for _ in range(16)]
    for worker in workers:
        worker.start()
    inside.wait(10)
    assert threads.threads_for_video() == 1          # 16 calls on 16 cores
    release.set()
    for worker in workers:
        worker.join(10)
    with threads.counting_call():
        assert threads.threads_for_video() == 16     # alone again (x264 clips it to what the frame allows)


def test_an_operators_count_is_kept_whatever_the_load() -> None:
    threads = EncodeThreads(fixed=3, cores=16)
    with threads.counting_call(), threads.counting_call():
        assert threads.threads_for_video() == 3


def test_encode_mp4_asks_for_the_count_when_the_first_frames_arrive() -> None:
    """x264 fixes its threads when it opens; asked at the call, a video would keep the count of a decoder the
    rest of its burst has not reached yet. 3 is a count x264 keeps at 256x256 and would not pick itself."""
    frames = np.random.default_rng(0).integers(0, 255, (2, 256, 256, 3), dtype=np.uint8)
    events: list[str] = []

    def chunks():
        events.append("first chunk")
        yield frames

    def count() -> int:
        events.append("asked")
        return 3

    mp4 = encode_mp4(chunks(), 8, 256, 256, threads=count)
    assert events == ["first chunk", "asked"]
    assert x264_options(mp4)["threads"] == "3"
