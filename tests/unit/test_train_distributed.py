"""t2v.train.distributed: one process is a no-op; two real gloo processes share rank 0's clock and notice
weights that part."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from t2v.train.distributed import Group, SharedClock


def test_without_torchrun_the_group_is_one_process_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    group = Group()
    assert (group.world, group.rank, group.main, group.parallel) == (1, 0, True, False)
    assert group.start("cpu") == torch.device("cpu")
    module = torch.nn.Linear(2, 2)
    assert group.wrap(module) is module and group.broadcast(2.5) == 2.5
    group.check_in_step([module])
    clock = SharedClock(group)
    first = clock(0)
    time.sleep(0.01)
    assert clock(0) > first >= 0.0                  # one process: the real clock, every call


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    group = Group()
    group.start("cpu")
    result: dict = {}
    time.sleep(0.3 * rank)                          # rank 1 starts its clock later than rank 0
    clock = SharedClock(group, every=2)
    time.sleep(0.2)
    result["clock"] = [clock(0), clock(1), clock(2)]
    result["broadcast"] = group.broadcast(float(rank + 10))
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    group.check_in_step([module])                   # same seed, same weights: passes
    if rank == 1:
        with torch.no_grad():
            module.weight[0, 0] += 1.0
    try:
        group.check_in_step([module])
        result["parted"] = "not noticed"
    except RuntimeError as error:
        result["parted"] = str(error)
    group.close()
    Path(out, f"{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_processes_see_rank_0s_clock_and_notice_parted_weights(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    # Steps 0 and 1 read the clock once (at step 0); step 2 re-reads it: identical on both ranks.
    assert rank0["clock"] == rank1["clock"]
    assert rank0["clock"][0] == rank0["clock"][1] < rank0["clock"][2]
    assert rank0["broadcast"] == rank1["broadcast"] == 10.0
    for result in (rank0, rank1):
        assert "weights differ between processes" in result["parted"]
