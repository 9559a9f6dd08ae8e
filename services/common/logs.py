"""Structured logging: one ``key=value`` line per event, the job id on every line about a job."""

from __future__ import annotations

import logging
import sys
from typing import Any


def setup_logging(service: str, level: str = "info") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"ts=%(asctime)s level=%(levelname)s service={service} %(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(service)


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' or not c.isprintable() for c in text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return '"' + "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in escaped) + '"'
    return text


def kv(event: str, **fields: Any) -> str:
    """``kv("job_done", job_id="j1", seconds=1.5)`` -> ``event=job_done job_id=j1 seconds=1.5``."""
    return " ".join([f"event={event}"] + [f"{k}={_format_value(v)}" for k, v in fields.items()])
