"""When the HTTP metrics and spans take an answer to have ended (services/gateway/answers.py), on real
Starlette answers: a plain one, a stream with a Content-Length (the MP4 routes), a stream without one."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from services.gateway.answers import AnswerWatch
from services.gateway.metrics import GatewayMetrics, HttpRequestMetrics


def chunks():
    yield b"01234"
    yield b"56789"


async def plain(request: Any) -> JSONResponse:
    return JSONResponse({"ok": True})


async def sized(request: Any) -> StreamingResponse:
    return StreamingResponse(chunks(), headers={"Content-Length": "10"}, media_type="video/mp4")


async def unsized(request: Any) -> StreamingResponse:
    return StreamingResponse(chunks(), media_type="video/mp4")


APP = Starlette(routes=[Route("/plain", plain), Route("/sized", sized), Route("/unsized", unsized)])


def get(path: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080)}


async def silent_client() -> dict:
    await asyncio.sleep(3600)              # the client never sends more: the app must not wait for it
    return {"type": "http.disconnect"}


def answer(app: Any, path: str) -> list[tuple[bool, int, bool]]:
    """(more_body, bytes so far, whether the answer had ended when it was sent) of each body message."""
    ended: list[int] = []
    seen: list[tuple[bool, int, bool]] = []
    sent = [0]

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            sent[0] += len(message.get("body", b""))
            seen.append((bool(message.get("more_body", False)), sent[0], bool(ended)))

    async def run() -> None:
        watch = AnswerWatch(send, ended.append)
        await app(get(path), silent_client, watch)
        watch.finish()
        assert ended == [200]              # once, with the status

    asyncio.run(run())
    return seen


def test_a_plain_answer_ends_with_its_last_body_message() -> None:
    seen = answer(APP, "/plain")
    assert seen[-1][0] is False and seen[-1][2] is True


def test_a_stream_with_a_content_length_ends_with_the_message_that_completes_it() -> None:
    """Starlette sends the last bytes with more_body true and an empty closing message after: the client has
    the whole answer before the closing one, so the end is the message that completes the length."""
    seen = answer(APP, "/sized")
    completing = [entry for entry in seen if entry[1] == 10][0]
    assert completing[0] is True and completing[2] is True, seen


def test_a_stream_without_a_length_ends_with_its_closing_message() -> None:
    seen = answer(APP, "/unsized")
    assert [entry[2] for entry in seen if entry[0]] == [False, False] and seen[-1] == (False, 10, True), seen


def test_the_metrics_count_a_streamed_answer_before_its_last_bytes_go_out() -> None:
    """The race b17be1d fixed for plain answers, on a streamed one: counted when its last bytes were handed on."""
    metrics = GatewayMetrics()
    app = HttpRequestMetrics(APP, metrics)
    counts: list[float] = []

    def counted() -> float:
        return sum(s.value for f in metrics.registry.collect() if f.name == "t2v_gateway_http_requests"
                   for s in f.samples if s.name.endswith("_total"))

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            counts.append(counted())

    asyncio.run(app(get("/sized"), silent_client, send))
    assert counts == [0, 1] and counted() == 1
