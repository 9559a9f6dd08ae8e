"""Data-parallel training over the GPUs of one host, or a single process when started plainly.

    torchrun --nproc_per_node 2 -m t2v.train.train --out runs/r7 ...   # one process per GPU
    python -m t2v.train.train --out runs/r7 ...                         # one process (no process group)

Why: the lent device time is counted per machine, not per GPU, so a machine with two GPUs trains
on twice the clips in the same minutes. Each process draws its own clips, and
DistributedDataParallel averages the gradients, so every process makes the same update.

Every process must also take the same number of steps at the same learning rate (else their
weights part and the collective calls hang). Both follow the clock (``--time-budget``), and clocks
differ, so the processes read rank 0's clock (``SharedClock``).
"""

from __future__ import annotations

import datetime
import os
import time

import torch


class Group:
    """This process's place in the torchrun group (rank 0 of 1 when started without torchrun)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process logs, evaluates and saves (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def start(self, device: str) -> torch.device:
        """Join the group (NCCL on GPUs, gloo on CPUs) and return this process's device."""
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank if self.parallel else (self.device.index or 0))
            torch.cuda.set_device(self.device)
        if self.parallel:
            # Rank 0 evaluates and saves alone at the end while the others wait at a barrier.
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                                 timeout=datetime.timedelta(minutes=30))
        return self.device

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped in DistributedDataParallel (which also copies rank 0's weights to all)."""
        if not self.parallel:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if not self.parallel:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return float(tensor.item())

    def check_in_step(self, modules: list[torch.nn.Module]) -> None:
        """Fail loudly if the processes' weights have parted (they must stay identical)."""
        if not self.parallel:
            return
        # One sum on the device, read back once (not one host sync per parameter).
        total = torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()]).sum()
        spread = torch.stack([total, -total]).to(self.device)
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        if float(spread[0] + spread[1]) > 1e-6 * max(1.0, abs(float(total))):
            raise RuntimeError(f"rank {self.rank}: weights differ between processes (max - min of the "
                               f"weight sums: {float(spread[0] + spread[1]):.3g})")

    def barrier(self) -> None:
        if self.parallel:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.parallel:
            torch.distributed.destroy_process_group()


class SharedClock:
    """Seconds since this clock was made, as rank 0 counts them, re-read every ``every`` steps.

    Called with the step number; every process calls it at the same steps, so the broadcast lines
    up, and between re-reads every process sees the same number.
    """

    def __init__(self, group: Group, every: int = 10) -> None:
        self.group, self.every = group, max(1, every)
        self.start = time.perf_counter()
        self.step, self.value = -1, 0.0

    def __call__(self, step: int) -> float:
        if not self.group.parallel:
            return time.perf_counter() - self.start
        if step != self.step and (step % self.every == 0 or self.step < 0):
            self.value = self.group.broadcast(time.perf_counter() - self.start)
            self.step = step
        return self.value
