"""The gateway's HTTP API (the shape of OpenAI's Videos API) and its web page, served by the gateway
process itself on ``--http-port``.

Why in the gateway process: the routes call the same ``JobService`` as the gRPC servicer, in memory, so
both front doors share one queue, cache, deadline and restart story, and there is nothing more to
deploy. This module is the gRPC servicer's sibling, not inside it: ``app.Gateway`` builds both over one
job system. Why FastAPI: ``/openapi.json`` comes from the bodies in ``videos.py``; uvicorn runs it on a
background thread with its own event loop, beside the gRPC server's thread pool. The routes are module
functions on ``router``; each finds the gateway's ``Backend`` on ``request.app.state``.

    GET    /                          the web page (static/index.html), open without a key
    GET    /healthz                   200 when the job system runs and the stages are SERVING, else 503
    GET    /openapi.json              the contract
    POST   /v1/videos                 create (JSON, multipart or urlencoded form) -> video object
    POST   /v1/videos/sync            create and wait: the MP4 itself (vLLM-Omni's synchronous endpoint)
    GET    /v1/videos                 list, newest first (limit, after, order)
    GET    /v1/videos/{id}            the video object
    DELETE /v1/videos/{id}            delete (a queued or running job is cancelled first) -> {"deleted": true}
    POST   /v1/videos/{id}/cancel     cancel, keeping the video object -> the video object
    GET    /v1/videos/{id}/content    the MP4 (Range requests: 206 / 416)
    GET    /v1/videos/{id}/events     server-sent events until the job ends
    GET    /v1/videos/{id}/preview    the latest live preview of a running job (PNG), for jobs that ask
    GET    /v1/models[/{id}]          the served model, in OpenAI's shape
    POST   /v1/videos/{id}/remix, /v1/videos/edits, /v1/videos/extensions, /v1/videos/characters,
    GET    /v1/videos/characters/{id}, /content?variant=thumbnail|spritesheet
                                      OpenAI's, not done here: 501 with a sentence saying what to use

Errors are OpenAI-shaped ({"error": {message, type, param, code}}), ``code`` being the gRPC status
in lower case; the status mapping is ``HTTP_STATUS`` below (docs/api.md has the table).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Optional

import grpc
import h11
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common.auth import key_matches, presented_key
from services.common.errors import (Cancelled, FailedPrecondition, InvalidArgument, NotFound, ServiceError,
                                    Unavailable, Unimplemented)
from services.common.logs import kv
from services.common.tls import ServerTls
from services.common.tracing import Tracing
from services.gateway import messages, videos
from services.gateway.domain import (JOB_ID_PATTERN, Finished, Interrupted, JobDeleted, JobRequest, JobStatus, JobView,
                                     Limits, QueueFull)
from services.gateway.jobs import JobService, Video as OpenVideo, Watch
from services.gateway.http_spans import HttpRequestSpans
from services.gateway.metrics import GatewayMetrics, HttpRequestMetrics
from services.gateway.ratelimit import RateLimited, RateLimiter, identity
from services.gateway.ranges import RangeNotSatisfiable, parse_range
from services.gateway.tenancy import Caller, Tenancy

log = logging.getLogger("gateway.http")

PAGE = FilePath(__file__).with_name("static") / "index.html"
OPEN_PATHS = frozenset({"/", "/healthz"})       # GET without a key: the page itself and probes
MAX_BODY_BYTES = 1 << 20
MAX_PATH_SHOWN = 200                            # characters of a request's path an error message repeats
READ_CHUNK_BYTES = 256 << 10
SSE_POLL_SECONDS = 0.1                          # how often an event stream looks for the job's news
SSE_KEEPALIVE_SECONDS = 15.0                    # a comment line this often keeps proxies from closing it
SHUTDOWN_SECONDS = 3.0                          # open streams get this long when the gateway stops
KEEPALIVE_SECONDS = 5                           # an idle kept-alive connection is closed after this long
REQUEST_READ_SECONDS = 10.0                     # a request's headers and body must arrive within this long

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.CANCELLED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNIMPLEMENTED: 501,
}
MISSING_KEY = ("this gateway needs an API key: send the header 'Authorization: Bearer <key>' "
               "(or 'X-API-Key: <key>')")
WRONG_KEY = "the API key sent is not valid; check it with whoever runs this gateway"


@dataclass(frozen=True)
class Backend:
    """What the HTTP API needs of the gateway; ``server.GatewayServicer`` fills it."""

    jobs: Callable[[], JobService]        # the job system; raises Unavailable while loading or draining
    limits: Limits
    model: str                            # the model folder
    stages_ready: Callable[[], bool]      # every stage answers SERVING
    api_keys: frozenset[str] = frozenset()    # every key the front door lets in (admin keys too)
    rate_limiter: RateLimiter | None = None   # shared with the gRPC side: one budget per key
    tenancy: Tenancy = Tenancy()              # whose jobs a key sees
    metrics: GatewayMetrics | None = None     # counts and times every request (HttpRequestMetrics)
    tracing: Tracing | None = None            # a span per request when it is on (http_spans.py)

    @property
    def model_name(self) -> str:
        return videos.model_name(self.model)


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def _caller(request: Request) -> Caller:
    """Who calls (the front door has checked the key already)."""
    headers = ((name.decode("latin-1"), value.decode("latin-1")) for name, value in request.scope["headers"])
    return _backend(request).tenancy.caller(presented_key(headers))


# --- errors ---------------------------------------------------------------------------------------------
def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status == 501:                     # the request asks for what this server does not do: not its fault
        return "invalid_request_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": _error_type(status), "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def service_error_response(error: ServiceError) -> JSONResponse:
    status = error.http_status or HTTP_STATUS.get(error.code, 500)
    headers = {"Retry-After": str(error.retry_after_seconds)} if isinstance(error, QueueFull) else None
    if status == 501:        # OpenAI's SDKs retry any 5xx unless told: asking again will not make it supported
        headers = {"x-should-retry": "false"}
    return error_response(status, error.message, error.code.name.lower(), error.field, headers)


def _unauthenticated(missing: bool) -> JSONResponse:
    challenge = 'Bearer realm="t2v-mesh"' + ("" if missing else ', error="invalid_token"')
    return error_response(401, MISSING_KEY if missing else WRONG_KEY, "unauthenticated",
                          headers={"WWW-Authenticate": challenge})


def _query_sentence(error: dict[str, Any]) -> tuple[str, str | None]:
    """A sentence for a query or path parameter that FastAPI refused (e.g. ?limit=0)."""
    loc = [str(part) for part in error.get("loc", ()) if part not in ("query", "path", "body")]
    field = ".".join(loc) or None
    kind, given, ctx = error.get("type", ""), error.get("input"), error.get("ctx") or {}
    bounds = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()), "")
        return f"{field} is {given}; it must be {bounds[kind]} {limit}", field
    if kind.startswith("int_"):
        return f"{field} is {given!r}; it must be a whole number", field
    if kind == "literal_error":
        return f"{field} {given!r} is unknown; use {ctx.get('expected', '')}", field
    return f"{field or 'the request'}: {error.get('msg', 'is not valid')}", field


# --- the middleware: API keys and one log line per request --------------------------------------------
class _Front:
    """Every request passes here first: the API-key check (when keys are set; ``OPEN_PATHS`` excepted),
    then the per-key rate limit (when set: 429 with Retry-After), and one log line when it ends (debug
    for success, info for a refusal). Keys are never logged."""

    def __init__(self, app: Any, keys: frozenset[str], limiter: RateLimiter | None = None) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.limiter = limiter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            guarded = not (scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD"))
            key = None
            if self.keys and guarded:
                key = presented_key((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"])
                if key is None or not key_matches(self.keys, key):
                    await _unauthenticated(key is None)(scope, receive, sending)
                    return
            if self.limiter is not None and guarded:
                try:            # key is None with keys off: a sent key is unchecked, so count by address
                    self.limiter.take(identity(key, (scope.get("client") or ("?",))[0]), "http")
                except RateLimited as refused:
                    await error_response(429, str(refused), "resource_exhausted", headers={
                        "Retry-After": str(refused.retry_after_seconds)})(scope, receive, sending)
                    return
            await self.app(scope, receive, sending)
        finally:
            level = logging.INFO if status[0] >= 400 or status[0] == 0 else logging.DEBUG
            log.log(level, kv("http_request", method=scope["method"], path=scope["path"], status=status[0],
                              seconds=round(time.monotonic() - started, 4)))


# --- helpers for the routes ---------------------------------------------------------------------------
def _check_id(video_id: str) -> str:
    if not JOB_ID_PATTERN.fullmatch(video_id):
        shown = video_id if len(video_id) <= 64 else video_id[:64] + "..."
        raise InvalidArgument(f"video id {shown!r} is malformed; a video id is the 32 lowercase hex characters "
                              "that POST /v1/videos returned", field="video_id")
    return video_id


@contextlib.contextmanager
def _in_http_words(video_id: str, field: str | None = None) -> Iterator[None]:
    """The job system's NotFound as this API says it: the video was deleted, or it does not exist (an unknown id
    and another key's video alike, so ids cannot be probed)."""
    try:
        yield
    except JobDeleted:
        raise NotFound(videos.deleted_sentence(video_id), field=field) from None
    except NotFound:
        raise NotFound(f"video {video_id} does not exist on this gateway; GET /v1/videos lists the videos "
                       "it knows", field=field) from None


def _get(jobs: JobService, video_id: str, caller: Caller, expired_ok: bool = False) -> JobView:
    """The job, or 404 (unknown, another key's, deleted, or expired unless ``expired_ok``) / 400 (malformed) in
    HTTP's words."""
    with _in_http_words(video_id):
        view = jobs.get(_check_id(video_id), caller)
    if view.status == JobStatus.EXPIRED and not expired_ok:
        raise NotFound(videos.expired_sentence(view))
    return view


def _not_ready(view: JobView) -> ServiceError:
    """Why a job has no content to serve (409)."""
    r, job_id = view.record, view.job_id
    if r.status == JobStatus.QUEUED:
        return FailedPrecondition(f"video {job_id} is still queued (position {view.queue_position} of "
                                  f"{view.queue_length}); fetch its content once its status is completed "
                                  f"(follow GET /v1/videos/{job_id}/events)")
    if r.status == JobStatus.RUNNING:
        return FailedPrecondition(f"video {job_id} is in progress (step {r.step} of {r.total_steps}); fetch its "
                                  f"content once its status is completed (follow GET /v1/videos/{job_id}/events)")
    reason = f": {r.error_message}" if r.error_message else ""
    if r.status == JobStatus.CANCELLED:
        return Cancelled(f"video {job_id} was cancelled and has no content{reason}")
    return FailedPrecondition(f"video {job_id} failed and has no content{reason}")


async def _bounded_body(request: Request) -> bytes:
    """The whole body, refused as soon as it passes ``MAX_BODY_BYTES`` whatever its type and transfer
    encoding (a chunked form with no Content-Length too), so memory stays bounded by the limit. The
    bytes are kept on the request, where starlette's form parser reads them."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise InvalidArgument(f"the request body is over {MAX_BODY_BYTES >> 20} MiB; a request is a few fields")
    request._body = bytes(raw)  # noqa: SLF001 - starlette's own cache of the body, which form() reads
    return request._body


class DuplicateField(ValueError):
    """A JSON object or a form names one field twice: which value was meant cannot be known."""


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a dict, refusing a key given twice (json.loads keeps the last silently)."""
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name in seen:
            raise DuplicateField(name)
        seen[name] = value
    return seen


def _duplicate(name: str) -> InvalidArgument:
    return InvalidArgument(f"the request names {name[:MAX_PATH_SHOWN]!r} more than once; send each field once",
                           field=name[:MAX_PATH_SHOWN])


async def _read_body(request: Request) -> tuple[Any, bool]:
    """The POST body as a dict, and whether it came as JSON (typed values: checked strictly, so ``true`` is not
    a number and ``"5"`` not a number of seconds) rather than a form as OpenAI's SDKs send it (every value a
    string). A field named twice is refused either way."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise InvalidArgument(f"the request body is over {MAX_BODY_BYTES >> 20} MiB; a request is a few fields")
    if kind and kind not in ("multipart/form-data", "application/x-www-form-urlencoded", "application/json") \
            and not kind.endswith("+json"):
        raise InvalidArgument(f"Content-Type {kind!r} is not supported; send application/json (or a form)")
    raw = await _bounded_body(request)
    if kind == "application/x-www-form-urlencoded" and raw.lstrip()[:1] == b"{":
        kind = "application/json"            # JSON sent as curl -d sends it, without a Content-Type
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        async with request.form() as form:
            try:
                return _once([(name, value if isinstance(value, str) else "(a file)")
                              for name, value in form.multi_items()]), False
            except DuplicateField as twice:
                raise _duplicate(str(twice)) from None
    if not raw.strip():
        raise InvalidArgument("the request body is empty; send JSON such as {\"prompt\": \"a red ball moving right\"}")
    try:
        body = json.loads(raw, object_pairs_hook=_once)
        json.dumps(body, ensure_ascii=False).encode()   # "\ud800" is valid JSON but not text: no job, no row
    except DuplicateField as twice:
        raise _duplicate(str(twice)) from None
    except UnicodeEncodeError:
        raise InvalidArgument("the request body has a lone surrogate escape such as \"\\ud800\", which is not text; "
                              "send valid Unicode (UTF-8)") from None
    except RecursionError:
        raise InvalidArgument("the request body is nested too deeply; a request is one flat JSON object, e.g. "
                              "{\"prompt\": \"a red ball moving right\"}") from None
    except ValueError as error:
        raise InvalidArgument(f"the request body is not valid JSON ({error}); send e.g. "
                              "{\"prompt\": \"a red ball moving right\"}") from None
    return body, True


def _file_part(video: OpenVideo, start: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of the open video from ``start``; closes it at the end (or when abandoned)."""
    try:
        video.file.seek(start)
        left = length
        while left > 0:
            data = video.file.read(min(READ_CHUNK_BYTES, left))
            if not data:
                return
            left -= len(data)
            yield data
    finally:
        video.close()


def _sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _event_stream(watch: Watch, model: str) -> AsyncIterator[str]:
    """The job's updates as server-sent events, until it ends. Polls the watch (a thread-safe queue)
    rather than parking a thread per stream; a client that goes away cancels this at its next await."""
    job_id = watch.job_id
    seen, beat = videos.Progress(), time.monotonic()
    try:
        yield "retry: 2000\n\n"
        while True:
            update = watch.next(timeout=0)
            if update is None:
                if time.monotonic() - beat >= SSE_KEEPALIVE_SECONDS:
                    beat = time.monotonic()
                    yield ": keepalive\n\n"
                await asyncio.sleep(SSE_POLL_SECONDS)
                continue
            event = videos.event_of(job_id, update, seen, model)
            if event is not None:
                beat = time.monotonic()
                yield _sse(*event)
            if isinstance(update, (Finished, Interrupted)):
                return
    finally:
        watch.close()


class Mp4Response(StreamingResponse):
    media_type = "video/mp4"


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


_ERRORS = {status: {"model": videos.ErrorResponse, "description": text} for status, text in [
    (400, "Bad input: `error.message` says what to change, `error.param` names the field."),
    (401, "API keys are on and the request has no valid `Authorization: Bearer <key>`."),
    (404, "No such video, it was deleted, or its MP4 expired (the message says which)."),
    (429, "The queue is full; `Retry-After` says when to come back."),
    (503, "The gateway is starting or stopping, or a stage is down.")]}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: _ERRORS[status] for status in statuses}


_NOT_HERE = {"model": videos.ErrorResponse,
             "description": "OpenAI's API has this; this gateway does not: the sentence says what to use instead.",
             "headers": {"x-should-retry": {"description": "`false`: asking again will not make it supported.",
                                            "schema": {"type": "string", "enum": ["false"]}}}}


def _unsupported(what: str, instead: str) -> Unimplemented:
    """The one answer of every OpenAI endpoint (or variant) this gateway does not have: 501, in a sentence."""
    return Unimplemented(f"{what} is not supported by this gateway, which makes videos from text prompts only; "
                         f"{instead}")


# --- errors as answers ---------------------------------------------------------------------------------
async def _on_service_error(request: Request, error: ServiceError) -> JSONResponse:
    if (error.http_status or HTTP_STATUS.get(error.code, 500)) >= 500:
        log.info(kv("http_refused", path=request.url.path, code=error.code.name, reason=error.message))
    return service_error_response(error)


async def _on_bad_range(request: Request, error: RangeNotSatisfiable) -> JSONResponse:
    return error_response(416, str(error), "out_of_range", "Range",
                          headers={"Content-Range": f"bytes */{error.size}", "Accept-Ranges": "bytes"})


async def _on_bad_parameter(request: Request, error: RequestValidationError) -> JSONResponse:
    message, field = _query_sentence(error.errors()[0])
    return error_response(400, message, "invalid_argument", field)


async def _on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    path = request.url.path
    if len(path) > MAX_PATH_SHOWN:                # a 60,000-character path is not echoed back whole
        path = path[:MAX_PATH_SHOWN] + "..."
    where = f"{request.method} {path}"
    messages = {404: f"there is no {where} here; the API is under /v1/videos (see /openapi.json)",
                405: f"{where} is not allowed; /openapi.json lists the methods of each path"}
    code = {404: "not_found", 405: "unimplemented"}.get(error.status_code, "invalid_argument")
    return error_response(error.status_code, messages.get(error.status_code, str(error.detail)), code,
                          headers=getattr(error, "headers", None))


async def _on_client_gone(request: Request, error: ClientDisconnect) -> Response:
    """The client hung up before its request's body had all come: nobody reads an answer, and it is no fault
    of the gateway's (it was counted a 500, with a traceback in the log). 499: nginx's "client closed"."""
    log.info(kv("http_client_gone", method=request.method, path=request.url.path[:MAX_PATH_SHOWN]))
    return Response(status_code=499)


async def _on_crash(request: Request, error: Exception) -> JSONResponse:
    log.exception(kv("http_failed", method=request.method, path=request.url.path))
    return error_response(500, f"internal error ({type(error).__name__}); the server log has the details",
                          "internal")


# --- the routes -------------------------------------------------------------------------------------------
_bearer = HTTPBearer(auto_error=False, description="Only when the gateway has API keys; the check itself "
                                                   "covers every path but / and /healthz.")
_V1 = [Security(_bearer)]     # documents the scheme on /v1 routes; _Front does the check
_PAGE_TEXT = PAGE.read_text(encoding="utf-8")
_VIDEO_ID = Path(description="The video's id (32 lowercase hex characters).",
                 json_schema_extra={"pattern": JOB_ID_PATTERN.pattern})
router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
def web_page() -> HTMLResponse:
    return HTMLResponse(_PAGE_TEXT, headers={"Cache-Control": "no-cache"})


@router.get("/healthz", summary="Ready to take jobs?",
            responses={200: {"content": {"application/json": {"example": {"status": "serving"}}}},
                       503: {"model": videos.ErrorResponse, "description": "Not ready, with the reason."}})
def healthz(backend: Backend = Depends(_backend)) -> JSONResponse:
    """200 when the job system runs, its store answers and every stage answers SERVING; 503 with the
    reason otherwise. Open without an API key, for probes."""
    try:
        jobs = backend.jobs()
    except ServiceError as error:
        return service_error_response(error)
    if not jobs.healthy():
        return error_response(503, "the job store does not answer; new jobs are refused until it is back (the "
                              "gateway reconnects by itself)", "unavailable")
    if not backend.stages_ready():
        return error_response(503, "a stage (text_encoder, denoiser or decoder) is not SERVING; jobs wait "
                              "until every stage is up: check the stages' logs", "unavailable")
    return JSONResponse({"status": "serving"})


# HEAD /healthz answers as GET does, without the body (probes and monitors send HEAD); kept out of the
# schema, which documents GET only, as it did before.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)


_CREATE_BODY = {"requestBody": {"required": True, "content": {
    media: {"schema": {"$ref": "#/components/schemas/CreateVideoRequest"}}
    for media in ("application/json", "multipart/form-data", "application/x-www-form-urlencoded")}}}


def _job_request(body: Any, typed: bool, backend: Backend, caller: Caller
                 ) -> tuple[videos.CreateVideoRequest, JobRequest]:
    """The body read as POST /v1/videos reads it, and its job request (the caller's tenant set)."""
    parsed = videos.parse_request(body, strict=typed)
    return parsed, dataclasses.replace(videos.to_job_request(parsed, backend.limits), tenant=caller.tenant)


def _log_user(parsed: videos.CreateVideoRequest, job_id: str) -> None:
    """OpenAI's and vLLM-Omni's ``user``: a line of the log beside the job, never stored, never an identity."""
    if parsed.user:
        log.info(kv("video_user", job_id=job_id, user=parsed.user[:64]))


@router.post("/v1/videos", response_model=videos.Video, dependencies=_V1, summary="Create a video",
             responses=_errors(400, 401, 429, 503), openapi_extra=_CREATE_BODY)
async def create_video(request: Request, backend: Backend = Depends(_backend),
                       caller: Caller = Depends(_caller)) -> videos.Video:
    """Queue a job; the answer comes at once (status queued, or in_progress when a slot was free, or
    completed for a cache hit). Follow it with GET /v1/videos/{id} or /events."""
    body, typed = await _read_body(request)

    def submit() -> videos.Video:
        jobs = backend.jobs()
        parsed, job_request = _job_request(body, typed, backend, caller)
        view = jobs.submit(job_request)
        _log_user(parsed, view.job_id)
        return videos.video_object(view, backend.model_name)
    return await run_in_threadpool(submit)


def _failure(view: JobView) -> ServiceError:
    """The error a synchronous create answers with when its job did not complete: the job's own code and
    sentence (deadline_exceeded 504, unavailable 503, cancelled 409, a full result store 507, ...)."""
    error = messages.error_for(Finished(view))
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        error.http_status = 507          # the job failed for want of room: retrying at once does not help
    return error


@router.post("/v1/videos/sync", response_class=Mp4Response, dependencies=_V1,
             summary="Create a video and wait for its MP4", openapi_extra=_CREATE_BODY,
             responses={200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
                              "description": "The whole MP4 once the job completed, as vLLM-Omni's /v1/videos/sync "
                                             "answers.",
                              "headers": {name: {"description": text, "schema": {"type": "string"}} for name, text in [
                                  ("X-Video-Id", "The video's id: GET /v1/videos/{id} shows it like any other."),
                                  ("X-Request-Id", "The same id (vLLM-Omni's name for it)."),
                                  ("X-Model", "The model that made it."),
                                  ("X-Inference-Time-S", "Seconds from the request to the video, queue time "
                                                         "included."),
                                  ("X-Seed", "The seed used: send it back for the same video.")]}},
                        409: {"model": videos.ErrorResponse, "description": "The job was cancelled (e.g. by "
                                                                            "DELETE) before it completed."},
                        500: {"model": videos.ErrorResponse, "description": "The job failed: the message says why."},
                        504: {"model": videos.ErrorResponse, "description": "The job's `timeout_seconds` passed."},
                        507: {"model": videos.ErrorResponse, "description": "No room to keep the video."},
                        **_errors(400, 401, 429, 503)})
async def create_video_sync(request: Request, backend: Backend = Depends(_backend),
                            caller: Caller = Depends(_caller)) -> Response:
    """The body of POST /v1/videos; the answer waits for the job and is its MP4 (video/mp4), as vLLM-Omni's
    /v1/videos/sync answers. The job is an ordinary one: queued by priority, cached, listed, deletable; an error
    answer carries `X-Video-Id` when a job was made. A client that goes away cancels the job."""
    body, typed = await _read_body(request)
    started = time.monotonic()

    def submit() -> Watch:
        jobs = backend.jobs()
        parsed, job_request = _job_request(body, typed, backend, caller)
        watch = jobs.submit_and_watch(job_request)
        _log_user(parsed, watch.job_id)
        return watch

    watch = await run_in_threadpool(submit)
    job_id, ids = watch.job_id, {"X-Video-Id": watch.job_id, "X-Request-Id": watch.job_id}
    try:
        with watch:
            while not isinstance(update := watch.next(timeout=0), (Finished, Interrupted)):
                if update is None:
                    if await request.is_disconnected():
                        await run_in_threadpool(backend.jobs().abandon, job_id)
                        return Response(status_code=499)      # nobody reads it: the client is gone
                    await asyncio.sleep(SSE_POLL_SECONDS)
        if isinstance(update, Interrupted):
            raise Unavailable(update.message)
        if update.job.status != JobStatus.COMPLETED:
            raise _failure(update.job)
        video = await run_in_threadpool(backend.jobs().open_video, job_id, caller)
    except ServiceError as error:
        answer = service_error_response(error)
        answer.headers.update(ids)
        if (error.http_status or HTTP_STATUS.get(error.code, 500)) >= 500:
            log.info(kv("http_refused", path=request.url.path, job_id=job_id, code=error.code.name,
                        reason=error.message))
        return answer
    record = update.job.record
    headers = {**ids, "X-Model": backend.model_name, "X-Inference-Time-S": f"{time.monotonic() - started:.3f}",
               "X-Seed": str(record.params.seed), "Content-Length": str(video.size),
               "Content-Disposition": f'inline; filename="{job_id}.mp4"'}
    return Mp4Response(_file_part(video, 0, video.size), headers=headers, media_type=video.mime_type)


@router.get("/v1/videos", response_model=videos.VideoList, dependencies=_V1, summary="List videos",
            responses=_errors(400, 401, 404, 503))
def list_videos(limit: int = Query(20, ge=0, le=100, description="Videos per page (0: none; `has_more` then says "
                                                                 "whether there are any)."),
                after: Optional[str] = Query(None, description="The `last_id` of the previous page: this page goes "
                                                               "on after that video, in the same `order` (a video "
                                                               "deleted since is still a valid `after`)."),
                order: Literal["asc", "desc"] = Query("desc", description="By creation: `desc` newest first (the "
                                                                          "default), `asc` oldest first."),
                backend: Backend = Depends(_backend), caller: Caller = Depends(_caller)) -> videos.VideoList:
    jobs = backend.jobs()
    token = ""
    if after:
        try:
            with _in_http_words(after, field="after"):
                token = str(jobs.seq_of(_check_id(after), caller))
        except ServiceError as error:
            error.field = "after"
            raise
    views, next_token = jobs.list(None, max(limit, 1), token, caller, oldest_first=order == "asc")
    if limit == 0:                       # OpenAI's range starts at 0: an empty page that says whether any follow
        return videos.VideoList(data=[], has_more=bool(views))
    data = [videos.video_object(view, backend.model_name) for view in views]
    return videos.VideoList(data=data, first_id=data[0].id if data else None,
                            last_id=data[-1].id if data else None, has_more=bool(next_token))


@router.get("/v1/videos/{video_id}", response_model=videos.Video, dependencies=_V1, summary="Get a video",
            responses=_errors(400, 401, 404, 503))
def get_video(video_id: str = _VIDEO_ID, backend: Backend = Depends(_backend),
              caller: Caller = Depends(_caller)) -> videos.Video:
    return videos.video_object(_get(backend.jobs(), video_id, caller), backend.model_name)


@router.delete("/v1/videos/{video_id}", response_model=videos.VideoDeleted, dependencies=_V1,
               summary="Delete a video", responses=_errors(400, 401, 404, 503))
def delete_video(video_id: str = _VIDEO_ID, backend: Backend = Depends(_backend),
                 caller: Caller = Depends(_caller)) -> videos.VideoDeleted:
    """Deletes the video and its job, as OpenAI's DELETE does: a queued job is removed and a running one
    stopped first (wherever it runs; a client following /events sees it cancelled), then its MP4 is
    deleted. From then on GET, /content and DELETE answer 404 saying it was deleted, and the list leaves
    it out. To stop a job but keep it, POST /v1/videos/{id}/cancel."""
    jobs = backend.jobs()
    with _in_http_words(_check_id(video_id)):
        jobs.delete(video_id, caller, "deleted by DELETE /v1/videos/{id}")
    return videos.VideoDeleted(id=video_id)


@router.post("/v1/videos/{video_id}/cancel", response_model=videos.Video, dependencies=_V1,
             summary="Cancel a video", responses=_errors(400, 401, 404, 503))
def cancel_video(video_id: str = _VIDEO_ID, backend: Backend = Depends(_backend),
                 caller: Caller = Depends(_caller)) -> videos.Video:
    """This gateway's own, in the shape of OpenAI's other `/cancel` endpoints: removes a queued job or stops
    a running one (status failed, error.code cancelled), wherever it runs, and keeps it (GET shows it). A
    finished job is returned unchanged. DELETE /v1/videos/{id} cancels and deletes."""
    jobs = backend.jobs()
    _get(jobs, video_id, caller)
    with _in_http_words(video_id):
        return videos.video_object(jobs.cancel(video_id, "cancelled by POST /v1/videos/{id}/cancel", caller),
                                   backend.model_name)


@router.get("/v1/videos/{video_id}/content", response_class=Mp4Response, dependencies=_V1,
            summary="Download the MP4",
            responses={200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The whole MP4 (H.264, yuv420p). `Accept-Ranges: bytes`."},
                       206: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The bytes of a `Range: bytes=a-b` request, with `Content-Range`."},
                       409: {"model": videos.ErrorResponse, "description": "Not completed (yet)."},
                       416: {"model": videos.ErrorResponse, "description": "The range starts past the end."},
                       501: _NOT_HERE, **_errors(400, 401, 404, 503)})
def video_content(request: Request, video_id: str = _VIDEO_ID,
                  variant: Literal["video", "thumbnail", "spritesheet"] = Query(
                      "video", description="Only `video` is stored; OpenAI's `thumbnail` and `spritesheet` are 501."),
                  backend: Backend = Depends(_backend), caller: Caller = Depends(_caller)) -> Response:
    if variant != "video":
        raise _unsupported(f"variant={variant} (a {variant} image of the video)",
                           f"fetch the MP4 itself (variant=video, the default) and take its frames from it")
    jobs = backend.jobs()
    view = _get(jobs, video_id, caller)
    if view.status != JobStatus.COMPLETED:
        raise _not_ready(view)
    video = jobs.open_video(video_id, caller)       # NotFound if it expired a moment ago: it says so
    try:
        part = parse_range(request.headers.get("range"), video.size)
    except RangeNotSatisfiable:
        video.close()
        raise
    headers = {"Accept-Ranges": "bytes", "Content-Disposition": f'inline; filename="{video_id}.mp4"',
               "Cache-Control": "private, max-age=3600", "ETag": f'"{video_id}"'}
    if part is None:
        headers["Content-Length"] = str(video.size)
        return Mp4Response(_file_part(video, 0, video.size), headers=headers, media_type=video.mime_type)
    headers.update({"Content-Length": str(part.length), "Content-Range": part.content_range(video.size)})
    return Mp4Response(_file_part(video, part.start, part.length), status_code=206, headers=headers,
                       media_type=video.mime_type)


@router.get("/v1/videos/{video_id}/events", response_class=EventStreamResponse, dependencies=_V1,
            summary="Follow a video's progress",
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "Server-sent events: `queued`, `stage`, `progress`, `preview` "
                                            "(jobs that asked for previews), `warning`, then `completed` or "
                                            "`failed` (the video object) or `error`; then the stream closes."},
                       **_errors(400, 401, 404, 503)})
def video_events(video_id: str = _VIDEO_ID, backend: Backend = Depends(_backend),
                 caller: Caller = Depends(_caller)) -> Response:
    jobs = backend.jobs()
    _get(jobs, video_id, caller)
    watch = jobs.watch(video_id, caller)          # here, in the thread pool: it may ask the job store
    return EventStreamResponse(_event_stream(watch, backend.model_name),
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- the model ----------------------------------------------------------------------------------------------
@router.get("/v1/models", response_model=videos.ModelList, dependencies=_V1, summary="List models",
            responses=_errors(401))
def list_models(backend: Backend = Depends(_backend)) -> videos.ModelList:
    """The one model this mesh serves (every stage loads the same folder), as OpenAI lists models."""
    return videos.ModelList(data=[videos.model_object(backend.model)])


@router.get("/v1/models/{model_id:path}", response_model=videos.Model, dependencies=_V1, summary="Get a model",
            responses=_errors(401, 404))
def get_model(model_id: str = Path(description="A model's `id`, as GET /v1/models lists it."),
              backend: Backend = Depends(_backend)) -> videos.Model:
    if model_id != backend.model_name:
        shown = model_id if len(model_id) <= 64 else model_id[:64] + "..."
        raise NotFound(f"model {shown!r} is not served here; this gateway serves {backend.model_name!r} "
                       "(GET /v1/models)", field="model_id")
    return videos.model_object(backend.model)


# --- OpenAI's endpoints that this gateway does not have: one answer, 501 with what to use ----------------------
_UNSUPPORTED_ROUTE = {"dependencies": _V1, "status_code": 501, "response_model": videos.ErrorResponse,
                      "response_description": _NOT_HERE["description"], "responses": {501: _NOT_HERE, **_errors(401)}}


@router.post("/v1/videos/{video_id}/remix", summary="Remix a video (not supported)", **_UNSUPPORTED_ROUTE)
def remix_video(video_id: str = Path(description="The video OpenAI would remix.")) -> None:
    raise _unsupported("remixing a video (POST /v1/videos/{id}/remix)", "create a new video with POST /v1/videos and "
                       "the changed prompt (send the first one's seed and parameters for a video close to it)")


@router.post("/v1/videos/edits", summary="Edit a video (not supported)", **_UNSUPPORTED_ROUTE)
def edit_video() -> None:
    raise _unsupported("editing a video (POST /v1/videos/edits)", "create a new video with POST /v1/videos and a "
                       "prompt that describes the result")


@router.post("/v1/videos/extensions", summary="Extend a video (not supported)", **_UNSUPPORTED_ROUTE)
def extend_video() -> None:
    raise _unsupported("extending a video (POST /v1/videos/extensions)", "create a longer one with POST /v1/videos "
                       "(more seconds or num_frames, the same seed and prompt)")


@router.post("/v1/videos/characters", summary="Create a character (not supported)", **_UNSUPPORTED_ROUTE)
def create_character() -> None:
    raise _unsupported("characters (POST /v1/videos/characters)", "describe the character in the prompt of "
                       "POST /v1/videos")


@router.get("/v1/videos/characters/{character_id}", summary="Get a character (not supported)", **_UNSUPPORTED_ROUTE)
def get_character(character_id: str = Path(description="The character OpenAI would return.")) -> None:
    raise _unsupported("characters (GET /v1/videos/characters/{id})", "describe the character in the prompt of "
                       "POST /v1/videos")


@router.get("/v1/videos/{video_id}/preview", response_class=Response, dependencies=_V1,
            summary="The latest live preview",
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The latents after `X-Preview-Step` of `X-Preview-Total-Steps` steps: "
                                            "an RGB PNG of the frames in a grid (`X-Preview-Columns` x "
                                            "`X-Preview-Rows`), a pixel per latent."},
                       **_errors(400, 401, 404, 503)})
def video_preview(video_id: str = _VIDEO_ID, backend: Backend = Depends(_backend),
                  caller: Caller = Depends(_caller)) -> Response:
    """The latest preview of a job that asked for them (`"preview": true`) while it runs on this gateway; 404
    before the first one and once the job ended (its video is then at /content)."""
    view = _get(backend.jobs(), video_id, caller)
    preview = view.preview
    if preview is None:
        if view.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            why = ("it was not created with \"preview\": true" if not view.record.params.preview else
                   "none has come yet (one comes every few denoising steps, to the gateway that runs "
                   "the job)")
            raise NotFound(f"video {video_id} has no preview: {why}")
        raise NotFound(f"video {video_id} has no preview: previews are kept only while a video is made, and this "
                       f"one is {videos.video_object(view, backend.model_name).status}")
    return Response(preview.png, media_type="image/png", headers={
        "Cache-Control": "no-store", "X-Preview-Step": str(preview.step),
        "X-Preview-Total-Steps": str(preview.total), "X-Preview-Columns": str(preview.columns),
        "X-Preview-Rows": str(preview.rows)})


# --- the app ----------------------------------------------------------------------------------------------
def _openapi(app: FastAPI, limits: Limits) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema, plus the request body (read by hand, for the form variants) and the bounds
    that come from this gateway's settings. Errors are JSON on every path: FastAPI would document
    those of /content and /events in the route's own media type (video/mp4, text/event-stream)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                for status, answer in operation.get("responses", {}).items():
                    if status.startswith(("4", "5")) and len(answer.get("content", {})) == 1:
                        answer["content"] = {"application/json": answer["content"].popitem()[1]}
            body = videos.CreateVideoRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, bounds in videos.schema_limits(limits).items():
                body["properties"][name].update(bounds)
            schema.setdefault("components", {}).setdefault("schemas", {})["CreateVideoRequest"] = body
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def create_app(backend: Backend) -> FastAPI:
    """The HTTP API over ``backend``'s job system, with the web page at ``/``."""
    app = FastAPI(title="t2v-mesh", version="1", docs_url=None, redoc_url=None,
                  description="Text-to-video jobs over HTTP, in the shape of OpenAI's Videos API. "
                              "Errors: `{\"error\": {message, type, param, code}}`.")
    app.state.backend = backend
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(RangeNotSatisfiable, _on_bad_range)
    app.add_exception_handler(RequestValidationError, _on_bad_parameter)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ClientDisconnect, _on_client_gone)
    app.add_exception_handler(Exception, _on_crash)
    app.include_router(router)
    app.openapi = _openapi(app, backend.limits)  # type: ignore[method-assign]
    app.add_middleware(_Front, keys=backend.api_keys, limiter=backend.rate_limiter)
    if backend.metrics is not None:         # outside _Front: its refusals are counted too
        app.add_middleware(HttpRequestMetrics, metrics=backend.metrics, routes=router.routes + app.routes)
    if backend.tracing is not None and backend.tracing.enabled:      # outermost: a span covers all of it
        app.add_middleware(HttpRequestSpans, tracing=backend.tracing, routes=router.routes + app.routes)
    return app


# --- the server thread ------------------------------------------------------------------------------------
class _TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request: its headers and body must arrive within
    ``REQUEST_READ_SECONDS`` of its first byte (of the connection's opening, for the first request), else the
    connection is closed.

    Why: uvicorn times out only the idle time between two requests (``timeout_keep_alive``, reset by any byte),
    so a client that connects and sends nothing, or sends its headers a byte a second, holds its connection
    forever. Once the request is in, the deadline is off: a long response (an event stream, a download) is not
    cut. Reading is in the event loop, so such a client never held a thread; this frees its socket."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()                   # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()                # the whole request is in, or the connection is ending

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(REQUEST_READ_SECONDS, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info(kv("http_request_timeout", client=":".join(map(str, self.client or ("?",))),
                        seconds=REQUEST_READ_SECONDS))
            self.transport.close()


class HttpServer:
    """uvicorn on a background thread of the gateway process. ``start`` binds (so a busy port fails at
    once, with a sentence) and returns the port; ``stop`` gives open streams ``SHUTDOWN_SECONDS``."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: ServerTls | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls                    # the gateway's --tls-cert/--tls-key (and --tls-client-ca): HTTPS
        self._app = app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> int:
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            raise RuntimeError(f"cannot serve HTTP on {self.host}:{self.port} ({exc.strerror or exc}); is the port "
                               "already in use? pass another --http-port, 0 for any free port or -1 for none"
                               ) from None
        self.port = sock.getsockname()[1]
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)     # our own line says where it listens
        config = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_SECONDS, ws="none", http=_TimedH11Protocol,
                                timeout_keep_alive=KEEPALIVE_SECONDS,
                                **(self.tls.uvicorn_options() if self.tls else {}))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="gateway-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on {self.host}:{self.port} did not start; see the log above")
            time.sleep(0.01)
        log.info(kv("http_listening", url=self.url))
        return self.port

    def stop(self, timeout: float = SHUTDOWN_SECONDS + 2.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None


def start_http(backend: Backend, host: str, port: int, tls: ServerTls | None = None) -> HttpServer | None:
    """Serve the HTTP API and the page on ``host:port`` (0 = any free port, -1 = off); HTTPS with ``tls``."""
    if port < 0:
        return None
    server = HttpServer(create_app(backend), host, port, tls)
    server.start()
    return server
