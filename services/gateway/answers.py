"""When an HTTP answer has gone out, as ASGI middleware can tell: the HTTP metrics and spans end there.

Why not when the app returns: by then the client may hold its whole answer and have scraped /metrics or
asked again (an integration test saw 13 polls counted of 14). A plain answer ends with its body message
whose ``more_body`` is false; a streamed one (``StreamingResponse``: the MP4 routes) sends its last bytes
with ``more_body`` true and an empty closing message later, after a hop through a thread pool, so with a
Content-Length the answer ends with the message that completes it. ``AnswerWatch`` calls ``on_end`` once,
just before that message goes to the server, or when the app ends without one (``finish``).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable


class AnswerWatch:
    """Wraps an ASGI ``send``: records the answer's status, calls ``on_end(status)`` once when it ends."""

    def __init__(self, send: Callable[[dict[str, Any]], Awaitable[None]], on_end: Callable[[int], None]) -> None:
        self._send = send
        self._on_end = on_end
        self.status = 0                    # 0 until the answer starts
        self._length: int | None = None    # its Content-Length, when it has one
        self._sent = 0
        self._ended = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            for name, value in message.get("headers", ()):
                if name.lower() == b"content-length" and value.strip().isdigit():
                    self._length = int(value)
        elif message["type"] == "http.response.body":
            self._sent += len(message.get("body", b""))
            if not message.get("more_body", False) or (self._length is not None and self._sent >= self._length):
                self.finish()
        await self._send(message)

    async def serve(self, app: Callable[..., Awaitable[None]], scope: dict[str, Any], receive: Any) -> None:
        """Run the ASGI ``app`` with this watch as its ``send``. An exception before any answer is the 500
        that Starlette's ServerErrorMiddleware, outside the middleware, answers; the answer ends here at the
        latest."""
        try:
            await app(scope, receive, self)
        except Exception:
            if self.status == 0:
                self.status = 500
            raise
        finally:
            self.finish()

    def finish(self) -> None:
        """The answer's end (the app ended, or the last of it goes out now); later calls do nothing."""
        if not self._ended:
            self._ended = True
            self._on_end(self.status)
