"""Per-key rate limits shared by every gateway of one PostgreSQL job store (``PostgresRateBuckets``, in
services/gateway/store/postgres.py, behind ``ratelimit.Buckets``): on the real server tests/postgres.py
starts. Two store instances on one database stand for two gateways; then two real gateways in this process,
called in turn, hold one budget per key between them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Callable, Iterator

import grpc
import psycopg
import pytest

from services.gateway.store.postgres import PostgresJobStore, PostgresRateBuckets
from t2v.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import RunningStage

pytestmark = pytest.mark.slow


@pytest.fixture
def two_stores(postgres_dsn: str) -> Iterator[tuple[PostgresJobStore, PostgresJobStore]]:
    first, second = PostgresJobStore(postgres_dsn), PostgresJobStore(postgres_dsn)
    yield first, second
    first.close()
    second.close()


def _rows(dsn: str) -> dict[str, tuple[float, int]]:
    with psycopg.connect(dsn) as connection:
        return {identity: (tokens, updated) for identity, tokens, updated in
                connection.execute("SELECT identity, tokens, updated_ms FROM rate_buckets")}


def test_two_gateways_buckets_share_one_budget(two_stores: tuple[PostgresJobStore, PostgresJobStore],
                                               postgres_dsn: str) -> None:
    a, b = (store.rate_buckets() for store in two_stores)
    assert isinstance(a, PostgresRateBuckets) and isinstance(b, PostgresRateBuckets)
    rate, burst = 2.0, 3.0                                    # a token every 0.5 s, 3 at once
    assert [bucket.take("key:k-one", 0.0, rate, burst) for bucket in (a, b, a)] == [0.0] * 3
    wait = b.take("key:k-one", 0.0, rate, burst)              # the 4th across both: refused
    assert 0.35 < wait <= 0.5, wait
    assert a.take("key:k-one", 0.0, rate, burst) > 0.3        # on the other gateway too
    assert b.take("key:k-two", 0.0, rate, burst) == 0.0       # another key has its own budget
    time.sleep(wait + 0.05)                                   # one token is back, one only
    assert a.take("key:k-one", 0.0, rate, burst) == 0.0
    assert 0.3 < b.take("key:k-one", 0.0, rate, burst) <= 0.5
    rows = _rows(postgres_dsn)                                # the keys themselves are never stored
    assert set(rows) == {hashlib.sha256(f"key:{k}".encode()).hexdigest() for k in ("k-one", "k-two")}


def test_gateways_taking_at_the_same_moment_never_spend_more_than_the_burst(
        two_stores: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    buckets = [store.rate_buckets() for store in two_stores]
    results: list[float] = []
    start = threading.Barrier(16)

    def client(n: int) -> None:
        start.wait()
        for _ in range(3):
            results.append(buckets[n % 2].take("key:hammered", 0.0, 1 / 60, 5.0))   # no refill to speak of

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 48 and results.count(0.0) == 5
    assert all(50 < wait <= 60 for wait in results if wait), sorted(results)


def test_refilled_rows_are_deleted_at_most_once_a_minute(two_stores: tuple[PostgresJobStore, PostgresJobStore],
                                                         postgres_dsn: str) -> None:
    buckets = two_stores[0].rate_buckets()
    with psycopg.connect(postgres_dsn) as connection:         # a client last seen an hour ago: full by now
        connection.execute("INSERT INTO rate_buckets VALUES ('old', 0, "
                           "(extract(epoch FROM now()) * 1000)::bigint - 3600000)")
    assert buckets.take("key:recent", 0.0, 1.0, 10.0) == 0.0
    assert set(_rows(postgres_dsn)) == {"old", hashlib.sha256(b"key:recent").hexdigest()}   # not a minute yet
    buckets._pruned -= buckets.PRUNE_SECONDS                  # a minute later
    assert buckets.take("key:recent", 0.0, 1.0, 10.0) == 0.0
    assert set(_rows(postgres_dsn)) == {hashlib.sha256(b"key:recent").hexdigest()}   # 10 s to refill: kept
    assert buckets.take("key:recent", 0.0, 1.0, 10.0) == 0.0  # and no second prune within the minute


def test_an_unreachable_database_lets_requests_through_with_one_warning(
        postgres_server: Any, postgres_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    store = PostgresJobStore(postgres_dsn)
    try:
        buckets = PostgresRateBuckets(store, timeout=0.5)
        assert buckets.take("key:k-secret", 0.0, 1 / 60, 1.0) == 0.0
        assert buckets.take("key:k-secret", 0.0, 1 / 60, 1.0) > 50     # the limit holds while the database answers
        postgres_server.stop()                                # postgres_dsn starts it again afterwards
        caplog.set_level(logging.WARNING, "gateway.store.postgres")
        started = time.monotonic()
        assert buckets.take("key:k-secret", 0.0, 1 / 60, 1.0) == 0.0    # fail open, within the timeout
        assert time.monotonic() - started < 3
        started = time.monotonic()
        assert [buckets.take("key:k-secret", 0.0, 1 / 60, 1.0) for _ in range(5)] == [0.0] * 5
        assert time.monotonic() - started < 0.1               # just failed: not asked again for a second
        warnings = [r.getMessage() for r in caplog.records if "event=rate_limit_unchecked" in r.getMessage()]
        assert len(warnings) == 1 and "k-secret" not in warnings[0]
    finally:
        store.close()


# --- two real gateways on one database -----------------------------------------------------------------
def _list_jobs(stub: gateway_pb2_grpc.GatewayStub, key: str) -> tuple[grpc.StatusCode, str, str]:
    """The call's code, its retry-after trailer (if any) and its message."""
    try:
        stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=10)
        return grpc.StatusCode.OK, "", ""
    except grpc.RpcError as error:
        return error.code(), dict(error.trailing_metadata() or ()).get("retry-after", ""), error.details() or ""


def test_a_keys_budget_holds_across_two_gateways(gateway_factory: Callable[..., RunningStage], postgres_dsn: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2V_API_KEYS", "k-one,k-two")
    gateways = [gateway_factory(job_store=postgres_dsn, rate_limit_per_minute=6, rate_limit_burst=2)   # 1 per 10 s
                for _ in range(2)]
    stubs = [gateway_pb2_grpc.GatewayStub(gateway.channel()) for gateway in gateways]
    answers = [_list_jobs(stubs[n % 2], "k-one") for n in range(4)]          # one, two, one, two
    assert [code for code, _, _ in answers] == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    for _, retry_after, message in answers[2:]:
        assert retry_after in ("9", "10") and "too many requests for this API key" in message
        assert f"retry in about {retry_after} s" in message
    assert [_list_jobs(stub, "k-two")[0] for stub in stubs] == [grpc.StatusCode.OK] * 2    # another key passes
    assert all(len(identity) == 64 and "k-" not in identity for identity in _rows(postgres_dsn))
    refused = [gateway.servicer.metrics.registry.get_sample_value("t2v_gateway_rate_limited_total", {"api": "grpc"})
               for gateway in gateways]
    assert refused == [1.0, 1.0]                              # each gateway counts its own refusals
