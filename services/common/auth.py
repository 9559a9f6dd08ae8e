"""Optional API keys: a gRPC server interceptor that refuses calls without a valid key.

Why an interceptor: the check must cover every method of the service (today's and tomorrow's)
without each servicer remembering to call it. A client sends ``authorization: Bearer <key>`` (or
``x-api-key: <key>``) as call metadata. Keys are compared with ``hmac.compare_digest`` against every
configured key (no early exit), and never logged. Health checks stay open: Kubernetes probes and
``t2v up`` send no key. The gateway's HTTP API (``services/gateway/http.py``) loads the same keys with
``load_api_keys`` and checks them with ``presented_key`` and ``key_matches``.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import grpc

from services.common.logs import kv

log = logging.getLogger("auth")

ENV_KEYS = "T2V_API_KEYS"                         # comma-separated keys, besides --api-keys-file
ENV_ADMIN_KEYS = "T2V_ADMIN_API_KEYS"             # the gateway's admin keys, besides --admin-keys-file
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
MISSING_KEY = ("this gateway needs an API key: send it as the call metadata 'authorization: Bearer <key>' "
               "(or 'x-api-key: <key>')")
WRONG_KEY = "the API key sent is not valid; check it with whoever runs this gateway"


class ApiKeyError(ValueError):
    """The key configuration cannot be used; the message says what to fix."""


def load_api_keys(path: str = "", env_value: str | None = None, flag: str = "--api-keys-file") -> frozenset[str]:
    """Keys from ``path`` (one per line; blank lines and ``#`` comments skipped) and from ``env_value``
    (comma-separated). An empty result means keys are off. A named file that is missing or holds no
    key is an error: a typo must not turn authentication off. ``flag`` names the setting in messages."""
    keys: set[str] = set()
    named = f"{flag} ({'T2V_' + flag.lstrip('-').upper().replace('-', '_')})"
    if path:
        file = Path(path).expanduser()
        try:
            text = file.read_text()
        except OSError as exc:
            raise ApiKeyError(f"cannot read the API keys file {file} ({exc.strerror}); fix {named} or unset it"
                              ) from None
        keys.update(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
        if not keys:
            raise ApiKeyError(f"the API keys file {file} holds no key; write one key per line, or unset "
                              f"{named} to turn keys off")
    if env_value:
        keys.update(key.strip() for key in env_value.split(",") if key.strip())
    bad = [key for key in keys if any(c.isspace() for c in key) or not key.isprintable()]
    if bad:
        raise ApiKeyError(f"{len(bad)} API key(s) contain spaces or control characters; keys are single tokens")
    return frozenset(keys)


def key_matches(keys: Sequence[bytes], given: str) -> bool:
    """True if ``given`` is one of ``keys``. Compared with ``hmac.compare_digest`` against every key, with no
    early exit, so the time taken tells nothing about which key matched or how much of one. The gRPC
    interceptor and the HTTP API both check keys here."""
    data = given.encode()
    match = False
    for candidate in keys:
        match |= hmac.compare_digest(candidate, data)
    return match


def presented_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The key a call carries: ``authorization: Bearer <key>`` first, else ``x-api-key``."""
    found: dict[str, str] = {}
    for name, value in metadata or ():
        if isinstance(value, bytes):
            continue                                  # binary (-bin) metadata never carries a key
        found.setdefault(name.lower(), value)
    auth = found.get("authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = found.get("x-api-key", "").strip()
    return key or None


def _refuse(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for attribute, make in kinds.items():
        if getattr(handler, attribute) is not None:
            return make(abort, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(abort)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with one of ``keys``; health checks always pass."""

    def __init__(self, keys: Iterable[str], open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES) -> None:
        self._keys = [key.encode() for key in keys]
        if not self._keys:
            raise ApiKeyError("ApiKeyInterceptor needs at least one key")
        self._open = open_prefixes

    def _valid(self, key: str) -> bool:
        return key_matches(self._keys, key)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(self._open):
            return continuation(handler_call_details)
        key = presented_key(handler_call_details.invocation_metadata)
        if key is not None and self._valid(key):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None                               # unknown method: gRPC answers UNIMPLEMENTED
        log.info(kv("unauthenticated", method=method, reason="no key" if key is None else "wrong key"))
        return _refuse(handler, MISSING_KEY if key is None else WRONG_KEY)
