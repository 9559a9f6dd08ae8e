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
