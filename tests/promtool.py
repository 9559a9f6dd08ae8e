"""promtool for the tests: ``check metrics`` on an exposition text (the format and Prometheus' naming lint), and
``check rules`` / ``test rules`` on rule files (tests/unit/test_monitoring.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

INSTALL_HINT = ("promtool is not installed; the metrics tests need it. Install it with "
                "`apt-get install prometheus` (Debian/Ubuntu; `make test` does it when apt-get exists) "
                "or put the promtool binary from https://prometheus.io/download/ on PATH")


def promtool_check(exposition: bytes | str, what: str) -> None:
    """Fail (never skip) if promtool is missing or finds a problem in ``exposition``."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    data = exposition.encode() if isinstance(exposition, str) else exposition
    result = subprocess.run([promtool, "check", "metrics"], input=data, capture_output=True, timeout=30)
    problems = (result.stdout + result.stderr).decode().strip()
    assert result.returncode == 0 and not problems, f"promtool check metrics on {what}: {problems}"


def promtool(*args: str, cwd: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``promtool ARGS`` (e.g. ``check rules FILE``, ``test rules FILE``); fails, never skips, without it."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
