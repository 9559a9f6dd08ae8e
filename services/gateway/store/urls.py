"""Store URLs: which engine a URL names, and how to show one without its password.

Why its own module: ``__init__`` (which chooses the engine) and each engine's error sentences need
these, and the engines must not import the package that imports them."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

def check_url(url: str, name: str = "--job-store") -> str:
    """The URL's scheme, or ValueError with a sentence that shows a URL that works."""
    if not url:
        return "sqlite"
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ValueError(f"{name} {url!r} is not a SQLite URL; write sqlite:///PATH (three slashes, then the "
                             "file, e.g. sqlite:///var/lib/t2v/jobs.sqlite3)")
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        if not urlsplit(url).hostname and "host=" not in url:
            raise ValueError(f"{name} {describe_url(url)!r} names no host; write postgresql://USER@HOST:PORT/DB")
        return "postgresql"
    if scheme == "file" and name == "--result-store":
        return "file"
    raise ValueError(f"{name} {describe_url(url)!r} is not supported; use sqlite:///PATH (one gateway) or "
                     "postgresql://USER@HOST:PORT/DB (any number of gateways)"
                     + ("; or file:///PATH for the videos" if name == "--result-store" else ""))


def describe_url(url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    parts = urlsplit(url)
    if parts.password:
        url = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]+)", r"\1***", url)


