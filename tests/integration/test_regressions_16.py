"""Regressions of issue 16: a shared gRPC port, a huge Range number, HEAD on / and /healthz, a long 404 path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from concurrent import futures
from typing import Callable

import grpc
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from services.common.config import ServerConfig
from services.common.server import GrpcServer
from services.gateway.app import GatewayConfig, limits_from
from services.gateway.http import Backend, HttpServer, create_app
from services.gateway.ranges import RangeNotSatisfiable, parse_range


def _grpc_server(port: int) -> GrpcServer:
    return GrpcServer(ServerConfig(port=port), "t2v.test.Nothing", lambda server: None)


# --- 1. a gRPC port in use is refused ----------------------------------------------------------------------
def test_a_second_grpc_server_on_a_taken_port_is_refused() -> None:
    first = _grpc_server(0)
    port = first.start()
    try:
        second = _grpc_server(port)
        with pytest.raises(RuntimeError, match="already in use"):
            second.start()
    finally:
        first.stop(0)


def test_the_health_port_in_use_is_refused() -> None:
    holder = _grpc_server(0)
    taken = holder.start()
    try:
        server = GrpcServer(ServerConfig(port=0, health_port=taken), "t2v.test.Nothing", lambda s: None)
        with pytest.raises(RuntimeError, match="already in use"):
            server.start()
        server.stop(0)
    finally:
        holder.stop(0)


def test_serve_gateway_on_a_taken_port_exits_with_one_line(tmp_path) -> None:
    holder = grpc.server(futures.ThreadPoolExecutor(max_workers=1))   # grpc's defaults: SO_REUSEPORT on
    port = holder.add_insecure_port("127.0.0.1:0")
    holder.start()
    try:
        command = [sys.executable, "-m", "t2v", "serve", "gateway", "--host", "127.0.0.1", "--port", str(port),
                   "--state-dir", str(tmp_path / "state"), "--http-port", "-1"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the gateway started on a taken port {port}: {exc.stdout!r} {exc.stderr!r}")
        assert done.returncode != 0
        assert "Traceback" not in done.stderr, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert str(port) in last and "already in use" in last, done.stderr
    finally:
        holder.stop(0)


# --- 2. a Range number thousands of digits long --------------------------------------------------------------
HUGE = "9" * 5000


@pytest.mark.parametrize("header", [f"bytes={HUGE}-", f"bytes=0-{HUGE}", f"bytes=-{HUGE}", f"bytes={HUGE}-{HUGE}",
                                    f"bytes=1{HUGE}-2{HUGE}"])
def test_a_range_with_a_huge_number_is_refused_like_other_bad_ranges(header: str) -> None:
    try:
        answer = parse_range(header, 1000)
    except RangeNotSatisfiable:
        return                        # 416, as for a range past the end
    assert answer is None             # ignored, as for other malformed ranges


# --- 3 and 4. HEAD on / and /healthz; a long path in a 404 ---------------------------------------------------
class _HealthyJobs:
    """Stands in for the job system where a route must not reach it (it would be a bug if it did)."""

    def healthy(self) -> bool:
        return True


def _app() -> FastAPI:
    config = GatewayConfig(port=0)
    return create_app(Backend(jobs=_HealthyJobs, limits=limits_from(config), model=config.model,  # type: ignore
                              stages_ready=lambda: True))


@pytest.fixture(scope="module")
def client() -> TestClient:
    with TestClient(_app(), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("path", ["/", "/healthz"])
def test_head_answers_like_get_without_a_body(client: TestClient, path: str) -> None:
    got, head = client.get(path), client.head(path)
    assert got.status_code == 200
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_on_the_page_stays_out_of_the_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert set(paths["/healthz"]) == {"get"}


def test_a_404_does_not_echo_a_huge_path(client: TestClient) -> None:
    answer = client.get("/" + "a" * 60_000)
    assert answer.status_code == 404
    message = answer.json()["error"]["message"]
    assert len(message) < 400 and "..." in message


# --- 3. the body limit, for every content type and transfer encoding ---------------------------------------
def _response(sock: socket.socket) -> bytes:
    """One HTTP response, headers and its Content-Length of body (they may come in separate reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body


def test_a_chunked_form_body_is_refused_once_it_passes_the_limit_not_at_its_end() -> None:
    """A chunked urlencoded POST with no Content-Length was read whole before its 400 (256 MiB took the
    gateway to 586 MiB RSS). Now the 400 comes as soon as the body passes 1 MiB: here the client stops
    sending after 1.25 MiB, and the answer must come while its body is still unfinished."""
    server = HttpServer(_app(), "127.0.0.1", 0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
            chunk = b"prompt=" + b"a" * (64 * 1024 - 7)
            for _ in range(20):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sock.settimeout(10)
            answer = _response(sock)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"over 1 MiB" in answer, answer
    finally:
        server.stop()


# --- loose input: JSON values are taken as typed, a field is named once, a prompt must show something -------
@pytest.mark.parametrize("body, field, said", [
    ('{"prompt": "a red ball", "num_frames": true}', "num_frames", "num_frames is true; it must be a whole number"),
    ('{"prompt": "a red ball", "timeout_seconds": "5"}', "timeout_seconds", "it must be a number"),
    ('{"prompt": "a red ball", "seed": 1.5}', "seed", "it must be a whole number"),
    ('{"prompt": "a red ball", "num_frames": 2, "num_frames": 8}', "num_frames", "more than once"),
    ('{"prompt": "a red ball", "prompt": "a blue cube"}', "prompt", "more than once"),
    ('{"prompt": "\\u200b\\u200d\\ufeff\\u2060"}', "prompt", "only invisible characters"),
    ('{"prompt": " \\u3164 \\u00a0"}', "prompt", "only invisible characters"),
])
def test_loose_json_is_refused_with_the_field_named(client: TestClient, body: str, field: str, said: str) -> None:
    answer = client.post("/v1/videos", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and said in error["message"], error


def test_a_form_field_named_twice_is_refused(client: TestClient) -> None:
    answer = client.post("/v1/videos", content="prompt=a+red+ball&num_frames=2&num_frames=8",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 400 and "more than once" in answer.json()["error"]["message"]


# --- a stage off loopback demands mutual TLS, unless told the network is trusted ----------------------------
def _serve_stage(*flags: str, timeout: float = 60) -> tuple[int | None, str]:
    """``t2v serve text_encoder`` with ``flags``: (exit code, stderr), or (None, log) once it listens."""
    command = [sys.executable, "-m", "t2v", "serve", "text_encoder", "--port", "0", "--device", "cpu", *flags]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:           # ends when the process exits
            lines.append(line)
            if "event=listening" in line:
                return None, "".join(lines)
        return proc.wait(timeout), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout)


def test_a_stage_on_every_interface_without_mutual_tls_refuses_to_start() -> None:
    code, stderr = _serve_stage("--host", "0.0.0.0")
    assert code == 1, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert "without mutual TLS" in last and "--trusted-network" in last, stderr


@pytest.mark.parametrize("flags", [("--host", "0.0.0.0", "--trusted-network", "true"), ("--host", "127.0.0.1")])
def test_a_trusted_network_or_loopback_lets_a_stage_listen(flags: tuple[str, ...]) -> None:
    code, log = _serve_stage(*flags)
    assert code is None, log
