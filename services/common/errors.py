"""Errors that a servicer raises, and the one place that turns them into gRPC status codes.

Why: model code raises plain Python exceptions with a sentence a user can act on; the servicer
wrapper maps them to INVALID_ARGUMENT / UNAVAILABLE / ... so no traceback ever reaches a client,
and an unexpected failure is logged once with the request id and answered with INTERNAL.
The same wrapper counts every call by method and status code, and times it, in the servicer's
``metrics`` (a ``services.common.metrics.ServiceMetrics``) when it has one.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from typing import Any, Callable

import grpc

from services.common.logs import kv
from services.common.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a gRPC status code and a sentence for the user."""

    code = grpc.StatusCode.INTERNAL
    http_status: int | None = None      # the HTTP API's status, where the code's usual one would mislead

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field      # the request field at fault, when one is (the HTTP API reports it as "param")


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InsufficientStorage(ResourceExhausted):
    """No room to keep what was asked (a full disk): RESOURCE_EXHAUSTED over gRPC, 507 over HTTP (429 would
    tell the client to slow down, which does not help)."""

    http_status = 507


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(ServiceError):
    """What the API's model (OpenAI's, say) has and this server does not do: UNIMPLEMENTED, 501 over HTTP."""

    code = grpc.StatusCode.UNIMPLEMENTED


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details"


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    code, message = _status_for(exc)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, ServiceError):
        log.exception(kv("rpc_failed", method=method))
    else:
        log.info(kv("rpc_refused", method=method, code=code.name, reason=message))
    context.abort(code, message)


def _metrics(servicer: Any, method: str) -> ServiceMetrics | None:
    metrics = getattr(servicer, "metrics", None)
    if not isinstance(metrics, ServiceMetrics):
        return None
    metrics.rpc_started(method)
    return metrics


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (unary or server-streaming) so every exception becomes a status,
    and every call is counted and timed in the servicer's ``metrics``."""
    name = method.__name__
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            metrics, started, code = _metrics(self, name), time.monotonic(), grpc.StatusCode.OK
            try:
                yield from method(self, request, context)
            except GeneratorExit:      # the client went away between two messages
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - the point is to map everything
                code = _status_for(exc)[0]
                _abort(context, name, exc)
            finally:
                if metrics is not None:
                    metrics.rpc_finished(name, code.name, time.monotonic() - started)
        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        metrics, started, code = _metrics(self, name), time.monotonic(), grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            code = _status_for(exc)[0]
            _abort(context, name, exc)
        finally:
            if metrics is not None:
                metrics.rpc_finished(name, code.name, time.monotonic() - started)
    return unary
