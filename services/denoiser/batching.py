"""How big a batch the engine runs, and which captured size (bucket) a batch is padded to.

Pure functions of row counts and measured times, no torch: unit-tested on the CPU
(tests/unit/test_engine_batching.py) and used by engine.py and graphs.py.

Why the engine caps its batch: a step's time grows with its rows, but not evenly. On an H100/H200
at 16x256x256 an eager forward costs ~20 ms a row at any size from 8 to 64 rows, a compiled
(torch.compile) 32-row forward ~14 ms a row, and a batch larger than every compiled size falls
back to eager: so 32 concurrent requests (64 rows) made fewer videos per second than 16
(docs/benchmarks.md, 2026-11-25 and 2026-12-01). The batch therefore stops at the size whose
measured time per row is best, and the other requests wait for a free place (they join between
steps, as any new request does), so more load never means less throughput.

Why finer buckets: batches were padded to the next power of two, so 5 requests (10 rows) ran as
16 rows and paid for 6 rows of zeros. Buckets every 2 rows up to 16 and every 4 rows above waste
at most 3 rows in 20 (15%), usually none (with guidance every request is 2 rows).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

# A larger bucket is used for fewer rows only when it is measured this much faster than the smallest
# that fits (a compiled bucket against an eager one: ~30%), never on timing noise: the same request
# should keep running on the same kernels.
PAD_MARGIN = 0.05
# The batch cap is the largest bucket whose time per row is within this of the best one: when several
# sizes are about as efficient, the largest leaves the fewest requests waiting.
CAP_TOLERANCE = 0.03


def powers_of_two_up_to(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to (and including) the first power of two >= max_rows."""
    sizes, size = [], 1
    while True:
        sizes.append(size)
        if size >= max_rows:
            return sizes
        size *= 2


def fine_buckets(max_rows: int, fine_up_to: int = 16, fine_step: int = 2, coarse_step: int = 4) -> list[int]:
    """1, then every ``fine_step`` rows up to ``fine_up_to``, then every ``coarse_step`` rows, up to and
    including ``max_rows``: 1, 2, 4, 6, ..., 16, 20, 24, ... max_rows."""
    if max_rows < 1:
        raise ValueError(f"max_rows is {max_rows}; it must be at least 1")
    sizes = {1}
    sizes.update(range(fine_step, min(fine_up_to, max_rows) + 1, fine_step))
    sizes.update(range(fine_up_to + coarse_step, max_rows + 1, coarse_step))
    sizes.add(max_rows)
    return sorted(sizes)


def graph_buckets(max_rows: int, compiled: Iterable[int] = ()) -> list[int]:
    """The row counts to capture as CUDA graphs for an engine of ``max_rows`` rows a batch.

    With compiled sizes, none above the largest compiled one that fits: a larger batch would run
    eager and make fewer rows a second than the compiled one, so the batch never grows past it (see
    ``batch_cap``), and capturing those sizes would only lengthen the start. Every compiled size is a
    bucket of its own."""
    compiled = sorted(r for r in set(compiled) if 1 <= r <= max_rows)
    top = compiled[-1] if compiled else max_rows
    return sorted(set(fine_buckets(top)) | set(compiled))


def choose_bucket(rows: int, buckets: Sequence[int], seconds: Mapping[int, float] | None = None,
                  margin: float = PAD_MARGIN) -> int | None:
    """The bucket to pad a batch of ``rows`` rows to, or None when it is larger than every bucket.

    The smallest bucket that fits, unless a larger one was measured faster by more than ``margin``
    (then the fastest of those): 20 rows run padded to a compiled 32-row graph when that replays in
    less time than the eager 20-row one."""
    fitting = sorted(b for b in buckets if b >= rows)
    if not fitting:
        return None
    smallest = fitting[0]
    if not seconds or smallest not in seconds:
        return smallest
    best = min((b for b in fitting if b in seconds), key=lambda b: (seconds[b], b))
    return best if seconds[best] < seconds[smallest] * (1 - margin) else smallest


def batch_cap(seconds: Mapping[int, float], tolerance: float = CAP_TOLERANCE) -> int | None:
    """The most rows a batch should have, from measured seconds per bucket: the largest bucket whose
    seconds per row is within ``tolerance`` of the best bucket's. None without measurements."""
    if not seconds:
        return None
    per_row = {rows: t / rows for rows, t in seconds.items() if rows > 0 and t > 0}
    if not per_row:
        return None
    best = min(per_row.values())
    return max(rows for rows, value in per_row.items() if value <= best * (1 + tolerance))


def take(rows: Sequence[int], cap_rows: int, max_jobs: int) -> int:
    """How many of the waiting jobs (oldest first, ``rows[i]`` rows each) the next batch takes: a
    prefix, at most ``max_jobs`` jobs and ``cap_rows`` rows, and at least one job if any waits (a job
    larger than the cap runs alone rather than never)."""
    count, total = 0, 0
    for r in rows:
        if count >= max_jobs or (count and total + r > cap_rows):
            break
        count, total = count + 1, total + r
    return count
