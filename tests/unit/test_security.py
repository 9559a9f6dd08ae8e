"""The security pieces on their own: TLS settings (services/common/tls.py), the per-key token bucket
(services/gateway/ratelimit.py), the constant-time key check (services/common/auth.py) and the result
store's refusal of any path that is not a job id it wrote (services/gateway/store.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common import auth
from services.common.config import ServerConfig
from services.common.errors import InvalidArgument
from services.common.server import GrpcServer
from services.common.tls import TlsConfigError, load_client_tls, load_server_tls
from services.gateway.ratelimit import MAX_BUCKETS, MemoryBuckets, RateLimited, RateLimiter, peer_host
from services.gateway.domain import new_job_id
from services.gateway.store.sqlite import FileResultStore as ResultStore
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- TLS settings ---------------------------------------------------------------------------------------
def test_tls_off_when_nothing_is_set_and_loaded_when_it_is(pki: Pki) -> None:
    assert load_server_tls("", "") is None and load_client_tls("") is None
    server = load_server_tls(pki.stage.cert, pki.stage.key, pki.ca)
    assert server is not None and server.mutual and server.cert.startswith(b"-----BEGIN CERTIFICATE")
    assert server.uvicorn_options()["ssl_ca_certs"] == pki.ca
    assert not load_server_tls(pki.gateway.cert, pki.gateway.key).mutual
    client = load_client_tls(pki.ca, pki.gateway_client.cert, pki.gateway_client.key)
    assert client is not None and client.ca and client.cert and client.key
    assert load_client_tls("", enabled=True) is not None          # --tls: the system's CAs


def _bad_settings(pki: Pki, tmp: Path) -> list[tuple[str, dict[str, str], str]]:
    text = tmp / "notes.txt"
    text.write_text("not a certificate\n")
    return [
        ("server", {"key": pki.stage.key}, "--tls-key (T2V_TLS_KEY) is set but --tls-cert (T2V_TLS_CERT) is not"),
        ("server", {"cert": pki.stage.cert}, "--tls-cert (T2V_TLS_CERT) is set but --tls-key"),
        ("server", {"cert": str(tmp / "missing.pem"), "key": pki.stage.key}, "cannot read"),
        ("server", {"cert": str(text), "key": pki.stage.key}, "is not a PEM file"),
        ("server", {"cert": pki.stage.cert, "key": pki.gateway.key}, "does not go with the certificate"),
        ("server", {"client_ca": pki.ca}, "--tls-client-ca (T2V_TLS_CLIENT_CA) needs --tls-cert"),
        ("server", {"cert": pki.stage.cert, "key": pki.stage.key, "client_ca": pki.stage.key},
         "is not a PEM file|holds no usable CA"),
        ("client", {"cert": pki.gateway_client.cert, "key": pki.gateway_client.key},
         "--stage-tls-cert (T2V_STAGE_TLS_CERT) is set but --stage-tls-ca"),
        ("client", {"ca": pki.ca, "cert": pki.gateway_client.cert}, "--stage-tls-key"),
    ]


def test_each_bad_tls_setting_is_one_sentence_naming_the_flag(pki: Pki, tmp_path: Path) -> None:
    for side, given, words in _bad_settings(pki, tmp_path):
        with pytest.raises(TlsConfigError) as caught:
            if side == "server":
                load_server_tls(given.get("cert", ""), given.get("key", ""), given.get("client_ca", ""))
            else:
                load_client_tls(given.get("ca", ""), given.get("cert", ""), given.get("key", ""),
                                names=("stage_tls_ca", "stage_tls_cert", "stage_tls_key"))
        message = str(caught.value)
        assert any(w in message for w in words.split("|")) and "\n" not in message, (given, message)


def test_a_server_with_bad_tls_settings_never_listens(pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="does not go with"):
        GrpcServer(ServerConfig(tls_cert=pki.stage.cert, tls_key=pki.gateway_client.key), "x.v1.X", lambda s: None)


# --- the per-key rate limit -----------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate_and_says_when_to_retry() -> None:
    clock, refused = Clock(), []
    limiter = RateLimiter(per_minute=30, burst=3, clock=clock, on_refused=refused.append)   # one token per 2 s
    for _ in range(3):
        limiter.take("key:a", "grpc")
    with pytest.raises(RateLimited) as caught:
        limiter.take("key:a", "http")
    assert caught.value.retry_after_seconds == 2 and refused == ["http"]
    assert "30 a minute, 3 at once" in str(caught.value) and "this API key" in str(caught.value)
    limiter.take("key:b", "grpc")                       # another key has its own bucket
    clock.now += 1.0
    with pytest.raises(RateLimited) as caught:          # half a token: 1 s more
        limiter.take("key:a", "grpc")
    assert caught.value.retry_after_seconds == 1
    clock.now += 1.0
    limiter.take("key:a", "grpc")
    clock.now += 3600                                   # a long pause refills to the burst, no more
    for _ in range(3):
        limiter.take("key:a", "grpc")
    with pytest.raises(RateLimited, match="this client address"):
        for _ in range(4):
            limiter.take("addr:10.0.0.1", "http")


def test_token_bucket_settings_and_memory_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RateLimiter(per_minute=90).burst == 90 and RateLimiter(per_minute=0.5).burst == 1
    for per_minute, burst in ((0, 0), (-5, 0), (10, -1)):
        with pytest.raises(ValueError, match="--rate-limit"):
            RateLimiter(per_minute, burst)
    monkeypatch.setattr("services.gateway.ratelimit.MAX_BUCKETS", 4)
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=1, clock=clock)
    for n in range(50):                                 # many clients, each refused on its second call
        limiter.take(f"addr:{n}", "http")
        with pytest.raises(RateLimited):
            limiter.take(f"addr:{n}", "http")
    assert isinstance(limiter.buckets, MemoryBuckets)
    assert len(limiter.buckets) <= 4 and MAX_BUCKETS >= 1000


def test_memory_buckets_on_their_own() -> None:
    buckets = MemoryBuckets()                           # 2 tokens at most, one every 4 s
    assert [buckets.take("key:a", 10.0, 0.25, 2.0) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("key:a", 10.0, 0.25, 2.0) == pytest.approx(4.0)
    assert buckets.take("key:a", 13.0, 0.25, 2.0) == pytest.approx(1.0)    # 3/4 of a token back
    assert buckets.take("key:a", 14.0, 0.25, 2.0) == 0.0
    assert buckets.take("key:b", 14.0, 0.25, 2.0) == 0.0 and len(buckets) == 2


class ListBuckets:
    """Buckets elsewhere (as a shared store's): records what the limiter asks, answers ``waits`` in turn."""

    def __init__(self, *waits: float) -> None:
        self.waits, self.calls = list(waits), []

    def take(self, identity: str, now: float, rate_per_second: float, burst: float) -> float:
        self.calls.append((identity, now, rate_per_second, burst))
        return self.waits.pop(0)


def test_the_limiter_can_switch_to_buckets_kept_elsewhere() -> None:
    clock, refused = Clock(), []
    limiter = RateLimiter(per_minute=30, burst=3, clock=clock, on_refused=refused.append)
    limiter.take("key:a", "grpc")                       # counted in this process until ``use``
    shared = ListBuckets(0.0, 2.4)
    limiter.use(shared)
    limiter.take("key:a", "grpc")
    with pytest.raises(RateLimited) as caught:
        limiter.take("key:a", "http")
    assert caught.value.retry_after_seconds == 3 and refused == ["http"]
    assert shared.calls == [("key:a", 1000.0, 0.5, 3.0)] * 2
    assert RateLimiter(per_minute=6, buckets=shared).buckets is shared


def test_the_rate_limiter_knows_nothing_of_the_store() -> None:
    import subprocess
    import sys

    code = ("import sys, services.gateway.ratelimit; "
            "sys.exit(any(m.startswith('services.gateway.store') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0


@pytest.mark.parametrize("peer, host", [("ipv4:127.0.0.1:5555", "127.0.0.1"), ("ipv6:[::1]:5555", "[::1]"),
                                        ("unix:/tmp/s", "unix:/tmp/s")])
def test_the_client_address_of_a_grpc_peer(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# --- API keys: no early exit ---------------------------------------------------------------------------
def test_a_key_is_compared_with_every_configured_key_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time as far as a test can show it: one compare_digest (itself constant-time) per
    configured key, the same number whether the key matches the first, the last or none."""
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    keys = [b"k-first", b"k-middle", b"k-last"]
    for given, expected in (("k-first", True), ("k-last", True), ("k-none", False), ("", False)):
        calls.clear()
        assert auth.key_matches(keys, given) is expected
        assert [a for a, _ in calls] == keys


# --- the result store: job ids only, files it wrote only ------------------------------------------------
@pytest.mark.parametrize("job_id", [
    "../" * 8 + "etc/passwd", "/etc/passwd", "..", ".", "", "0" * 31 + "/", "0" * 32 + "\x00",
    "0" * 16 + "\x00" + "0" * 15, "0" * 32 + ".mp4", "0" * 30 + "/..", "A" * 32, "0" * 33, "%2e%2e%2f" * 4,
    "..\\" * 8 + "x", "0" * 32 + "\n"])
def test_a_path_from_a_request_never_reaches_the_disk(tmp_path: Path, job_id: str) -> None:
    store = ResultStore(tmp_path / "results")
    for use in (store.path, store.open, store.exists, store.delete):
        with pytest.raises(InvalidArgument, match="malformed"):
            use(job_id)


def test_only_regular_files_the_store_wrote_are_opened(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "results")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not a video")
    mine, linked, fifo, folder = new_job_id(), new_job_id(), new_job_id(), new_job_id()
    store.save(mine, b"mp4 bytes")
    store.path(linked).symlink_to(secret)                 # planted: a symlink to a file outside
    os.mkfifo(store.path(fifo))                           # planted: would block a plain open()
    store.path(folder).mkdir()
    with store.open(mine)[0] as handle:                   # type: ignore[index]
        assert handle.read() == b"mp4 bytes"
    assert store.open(linked) is None and store.open(fifo) is None and store.open(folder) is None
    copy = new_job_id()
    store.copy(mine, copy)                                # the cache's hard link is still a regular file
    with store.open(copy)[0] as handle:                   # type: ignore[index]
        assert handle.read() == b"mp4 bytes"
