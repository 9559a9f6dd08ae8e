"""The denoiser's batch policy (services/denoiser/batching.py): which buckets are captured, which one a
batch is padded to, where the batch stops, and that the engine keeps to it (on the CPU, embedded model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.denoiser import batching
from services.denoiser import engine as eng
from services.denoiser.server import parse_rows

MODEL = Path(__file__).resolve().parents[2] / "models" / "t2v-world"

# One UNet forward at 16x256x256 on an H200 (docs/benchmarks.md): eager CUDA graphs ~16 ms + 20 ms a
# row; the compiled 32-row bucket 457 ms.
H200 = {**{rows: 0.016 + 0.020 * rows for rows in batching.fine_buckets(32)}, 32: 0.457}


def test_fine_buckets_step_by_two_then_by_four_and_end_at_the_maximum() -> None:
    assert batching.fine_buckets(32) == [1, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32]
    assert batching.fine_buckets(8) == [1, 2, 4, 6, 8]
    assert batching.fine_buckets(1) == [1]
    assert batching.fine_buckets(7) == [1, 2, 4, 6, 7]
    assert batching.fine_buckets(18) == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18]
    with pytest.raises(ValueError):
        batching.fine_buckets(0)


def test_padding_wastes_little_where_powers_of_two_wasted_up_to_half() -> None:
    """Every even batch (guidance: 2 rows a request) up to 16 rows has its own bucket; above, at most
    2 rows in 18 are padding. Powers of two ran 5 requests (10 rows) as 16."""
    buckets = batching.fine_buckets(32)
    for rows in range(2, 33, 2):
        bucket = batching.choose_bucket(rows, buckets)
        assert bucket is not None and (bucket - rows) / bucket <= (0 if rows <= 16 else 2 / 18), (rows, bucket)
    assert batching.choose_bucket(10, batching.powers_of_two_up_to(32)) == 16


def test_no_bucket_is_captured_above_the_largest_compiled_size() -> None:
    assert batching.graph_buckets(64, {32}) == batching.fine_buckets(32)
    assert batching.graph_buckets(64, {2, 32}) == batching.fine_buckets(32)
    assert batching.graph_buckets(64, {30}) == sorted(set(batching.fine_buckets(30)))
    assert batching.graph_buckets(16, {32}) == batching.fine_buckets(16), "a compiled size above the maximum is unused"
    assert 18 in batching.graph_buckets(32, {18}), "every compiled size is a bucket"
    assert batching.graph_buckets(16) == batching.fine_buckets(16)


def test_a_batch_is_padded_to_a_larger_bucket_only_when_that_is_measured_faster() -> None:
    buckets = sorted(H200)
    assert batching.choose_bucket(2, buckets, H200) == 2
    assert batching.choose_bucket(20, buckets, H200) == 20        # 416 ms eager < 457 ms compiled
    assert batching.choose_bucket(24, buckets, H200) == 32        # 496 ms eager > 457 ms compiled
    assert batching.choose_bucket(28, buckets, H200) == 32
    assert batching.choose_bucket(33, buckets, H200) is None
    noisy = {2: 0.0557, 4: 0.0550, 6: 0.0560}                     # launch-bound: equal up to noise
    assert batching.choose_bucket(2, sorted(noisy), noisy) == 2, "timing noise must not move a request's kernels"
    assert batching.choose_bucket(3, [2, 4, 8], {2: 1.0}) == 4, "an unmeasured bucket: the smallest that fits"


def test_the_batch_stops_at_the_size_that_makes_the_most_rows_a_second() -> None:
    assert batching.batch_cap(H200) == 32
    eager_only = {rows: 0.016 + 0.020 * rows for rows in batching.fine_buckets(64)}
    assert batching.batch_cap(eager_only) == 64, "flat per-row time: the largest, so fewest wait"
    # A compiled 32 beats an eager 64 per row: 32 concurrent requests run as two batches of 16, not one
    # slow batch of 32 (the 2026-12-01 regression: 0.474 videos/s at 32 against 0.640 at 16).
    assert batching.batch_cap({**eager_only, 32: 0.457}) == 32
    assert batching.batch_cap({8: 0.20, 16: 0.40 * 1.02}) == 16, "within the tolerance: the larger"
    assert batching.batch_cap({8: 0.20, 16: 0.40 * 1.10}) == 8
    assert batching.batch_cap({}) is None


@pytest.mark.parametrize("rows, cap, max_jobs, expected", [
    ([2, 2, 2, 2], 8, 16, 4),
    ([2, 2, 2, 2], 6, 16, 3),
    ([2, 2, 2, 2], 8, 2, 2),
    ([2, 1, 2, 1], 4, 16, 2),
    ([1, 1, 2, 1], 4, 16, 3),
    ([4, 1], 2, 16, 1),            # a job larger than the cap still runs, alone
    ([2, 2, 1], 3, 16, 1),         # a prefix: a later small job does not jump the queue
    ([], 8, 16, 0),
])
def test_take_a_prefix_of_the_waiting_jobs_within_the_caps(rows: list[int], cap: int, max_jobs: int,
                                                           expected: int) -> None:
    assert batching.take(rows, cap, max_jobs) == expected


def test_compile_rows_parse() -> None:
    assert parse_rows("2, 32") == {2, 32}
    assert parse_rows("") == set()
    with pytest.raises(ValueError, match="row counts"):
        parse_rows("2,x")
    with pytest.raises(ValueError, match="at least 1"):
        parse_rows("0")


def test_the_engine_keeps_its_batch_at_the_cap_and_the_rest_wait_then_finish() -> None:
    """Six guided requests, max_batch 8 but a measured cap of 4 rows: no forward runs more than two of
    them; the others wait and every one finishes with the latents it has alone."""
    engine = eng.DenoiseEngine.from_folder(MODEL, torch.device("cpu"), torch.float32, max_batch=8, max_jobs=16)
    engine.set_plan((2, 32, 32), {2: 0.010, 4: 0.012, 8: 0.040})     # 4 rows: best per row
    assert engine.cap_rows((2, 32, 32)) == 4 and engine.plans[(2, 32, 32)]["cap_rows"] == 4
    assert engine.cap_rows((2, 64, 64)) == 16, "an unmeasured shape: up to max_batch"
    dim = engine.embedding_dim

    def request(seed: int) -> eng.Request:
        emb = torch.randn(2, 77, dim, generator=torch.Generator().manual_seed(seed))
        return eng.Request(f"r{seed}", emb, num_frames=2, height=32, width=32, num_inference_steps=3,
                           guidance_scale=7.0, seed=seed)

    jobs = [engine.submit(request(seed)) for seed in range(6)]
    engine.start()
    try:
        finals = []
        for job in jobs:
            while isinstance(event := job.events.get(timeout=60), eng.Step):
                pass
            assert isinstance(event, eng.Finished), event
            finals.append(event.latents)
        assert engine.stats.max_batch_seen == 2 and engine.stats.max_rows_seen == 4
        assert engine.stats.waited > 0 and engine.stats.finished == 6
        alone = engine.submit(request(4))
        while isinstance(event := alone.events.get(timeout=60), eng.Step):
            pass
        torch.testing.assert_close(event.latents, finals[4], rtol=1e-4, atol=1e-4)
    finally:
        engine.stop(1.0)


def test_a_plan_never_lets_the_batch_exceed_max_batch() -> None:
    engine = eng.DenoiseEngine.from_folder(MODEL, torch.device("cpu"), torch.float32, max_batch=2)
    engine.set_plan((2, 32, 32), {4: 0.01, 64: 0.02})
    assert engine.cap_rows((2, 32, 32)) == 4


def test_the_cpu_engine_warms_the_powers_of_two_and_the_compiled_sizes() -> None:
    engine = eng.DenoiseEngine.from_folder(MODEL, torch.device("cpu"), torch.float32, max_batch=4)
    assert engine.warm_rows() == [1, 2, 4, 8]
    engine.compile_rows = {6}
    assert engine.warm_rows() == [1, 2, 4, 6, 8]
    assert json.loads(json.dumps(engine.plans)) == {}
