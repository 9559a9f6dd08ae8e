"""bench/host_load.py: the busy and steal shares from two readings of /proc/stat, and what it says where
there is none (the benchmark must not fail on a host without it)."""

from __future__ import annotations

from pathlib import Path

from bench import host_load


def stat_file(tmp_path: Path, name: str, cpu_line: str) -> Path:
    path = tmp_path / name
    path.write_text(f"{cpu_line}\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 12345\n")
    return path


def test_busy_and_steal_are_shares_of_all_cpus_time_between_two_readings(tmp_path: Path) -> None:
    #                           user nice system idle iowait irq softirq steal guest guest_nice
    before = host_load.read_cpu(stat_file(tmp_path, "a", "cpu  100 0 50 800 10 5 5 30 0 0"))
    after = host_load.read_cpu(stat_file(tmp_path, "b", "cpu  160 0 70 900 10 5 15 40 0 0"))
    assert before == {"user": 100, "nice": 0, "system": 50, "idle": 800, "iowait": 10, "irq": 5, "softirq": 5,
                      "steal": 30}
    # deltas: user 60, system 20, idle 100, softirq 10, steal 10 -> 200 ticks; busy 90, steal 10
    assert host_load.shares(before, after) == {"busy_share": 0.45, "steal_share": 0.05}


def test_without_proc_stat_or_elapsed_time_the_shares_are_none_and_nothing_fails(tmp_path: Path) -> None:
    missing = host_load.read_cpu(tmp_path / "absent")
    assert missing is None
    assert host_load.read_cpu(stat_file(tmp_path, "odd", "intr 1 2 3")) is None
    same = host_load.read_cpu(stat_file(tmp_path, "same", "cpu  1 2 3 4"))    # an old kernel: fewer fields
    assert same is not None and same["steal"] == 0
    none = {"busy_share": None, "steal_share": None}
    assert host_load.shares(missing, same) == none and host_load.shares(same, same) == none
    with host_load.watch(tmp_path / "absent") as load:
        pass
    assert load["busy_share"] is None and load["core_ms_before"] > 0
    assert host_load.describe(load).startswith("busy n/a, steal n/a, one core ")


def test_a_block_that_raises_keeps_its_figures(tmp_path: Path) -> None:
    path = stat_file(tmp_path, "s", "cpu  1 0 1 10 0 0 0 0")
    try:
        with host_load.watch(path) as load:
            raise RuntimeError("a phase cut short")
    except RuntimeError:
        pass
    assert "seconds" in load and load["busy_share"] is None    # the file did not move


def fake_process(proc: Path, pid: int, parent: int, ticks: tuple[int, int], argv: list[str], comm: str = "python",
                 reaped: tuple[int, int] = (0, 0)) -> None:
    folder = proc / str(pid)
    folder.mkdir(exist_ok=True)
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    # priority nice num_threads itrealvalue starttime ...
    folder.joinpath("stat").write_text(f"{pid} ({comm}) S {parent} 1 1 0 -1 0 0 0 0 0 {ticks[0]} {ticks[1]} "
                                       f"{reaped[0]} {reaped[1]} 20 0 1 0 1000 0 0\n")
    folder.joinpath("cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_the_mesh_processes_cpu_is_summed_by_service_and_what_each_started(tmp_path: Path) -> None:
    hz = host_load.TICKS_PER_S
    proc = tmp_path / "proc"
    proc.mkdir()
    denoiser = ["python", "-m", "t2v", "serve", "denoiser", "--port", "1"]
    fake_process(proc, 10, 1, (hz, 0), ["python", "-m", "t2v", "up"])
    fake_process(proc, 11, 10, (2 * hz, hz), denoiser)
    fake_process(proc, 12, 10, (hz, 0), ["/usr/bin/t2v", "serve", "decoder"], comm="odd ) name")
    fake_process(proc, 13, 11, (hz, 0), ["python", "-m", "torch._inductor.compile_worker"])
    fake_process(proc, 14, 13, (hz, hz), ["python", "worker"])                 # a grandchild: still the denoiser's
    fake_process(proc, 17, 11, (hz, 0), denoiser)                             # forked: the same command line
    fake_process(proc, 18, 10, (hz, 0), ["python", "-m", "other", "serve", "x"])   # "serve", not t2v's
    fake_process(proc, 20, 1, (50 * hz, 0), denoiser)                         # not under the root
    (proc / "21").mkdir()                                                     # a stat that is not one
    (proc / "21" / "stat").write_text("garbage")
    before = host_load.tree_cpu(10, proc)
    assert before == {"decoder": 1.0, "decoder children": 0.0, "denoiser": 3.0, "denoiser children": 4.0, "other": 2.0}
    # the forked 17 works 0.5 s more, exits and 11 reaps it; 14 works 2 s; 15 starts under the decoder
    (proc / "17" / "stat").unlink()
    fake_process(proc, 11, 10, (2 * hz, 2 * hz), denoiser, reaped=(hz, hz // 2))
    fake_process(proc, 14, 13, (2 * hz, 2 * hz), ["python", "worker"])
    fake_process(proc, 15, 12, (hz // 4, 0), ["python", "x264"])
    after = host_load.tree_cpu(10, proc)
    assert host_load.cpu_by_role(before, after) == {"decoder": 0.0, "decoder children": 0.25, "denoiser": 1.0,
                                                    "denoiser children": 0.5 + 2.0, "other": 0.0}
    with host_load.watch(tmp_path / "absent", root=10, proc=proc) as load:
        fake_process(proc, 16, 12, (hz, 0), ["python", "x264"])
    assert load["cpu_s"] == {"decoder": 0.0, "decoder children": 1.0, "denoiser": 0.0, "denoiser children": 0.0,
                             "other": 0.0}
    assert host_load.describe(load).endswith("; CPU seconds: decoder 0.00, decoder children 1.00, denoiser 0.00, "
                                             "denoiser children 0.00, other 0.00")


def test_this_process_is_found_under_its_parent_in_the_real_proc() -> None:
    assert host_load.tree_cpu(host_load.os.getppid()).get("other", 0) > 0      # pytest's own CPU, at least
