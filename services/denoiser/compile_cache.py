"""torch.compile's caches in a folder of their own per software and GPU, trusted only with a manifest.

Why: compiling the UNet takes minutes per batch size (docs/benchmarks.md), and a restarted denoiser
compiles again unless Inductor, AOTAutograd and Triton find their caches. Those caches are only valid
for the torch, Triton and CUDA that wrote them, on the same kind of GPU: a cache on a volume outlives
image upgrades and may be mounted on another GPU pool. So the caches live in ``ROOT/<key>/``, where the
key names torch, Triton, CUDA, Python and the GPU (name and compute capability), and the folder holds a
``manifest.json`` saying who wrote it and whether the warm-up that wrote it finished. A folder whose
manifest is missing, unreadable, names other software or another GPU, or says the warm-up did not
finish, is stale or foreign: it is deleted and rebuilt, never used (but for one thing: a folder of this very
software and GPU whose warm-up was cut short keeps its finished packages of compiled buckets, ``packages/``
(aot.py), which are written whole and checked when loaded, so a long first start makes progress across
restarts). A lock file per key makes a second
process with the same key (another replica on a shared volume) wait until the first has finished
compiling, then use its cache.

The pure parts (``Identity.key``, ``verdict``) are tested on the CPU: tests/unit/test_engine_compile_cache.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.common.logs import kv

log = logging.getLogger("denoiser.compile_cache")

FORMAT = 1              # this module's layout; a change makes every older folder foreign
MANIFEST = "manifest.json"
KEPT_WHEN_UNFINISHED = "packages"     # aot.SUBFOLDER: packages written whole (renamed into place), checked on load


@dataclass(frozen=True)
class Identity:
    """What a compiled artefact depends on, besides the model graph (Inductor keys that itself)."""

    torch: str
    triton: str
    cuda: str
    python: str
    gpu: str
    capability: str
    format: int = FORMAT

    def key(self) -> str:
        """A folder name: readable parts, then a hash of all of them (so two identities that read
        the same once shortened still differ)."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        readable = f"torch{self.torch}-triton{self.triton}-cuda{self.cuda}-{self.gpu}-sm{self.capability}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", readable)[:120] + "-" + digest


def identity(device: Any = None) -> Identity:
    """The running torch, Triton, CUDA and Python, and ``device``'s GPU (or "cpu")."""
    import torch

    try:
        import triton
        triton_version = str(triton.__version__)
    except Exception:  # noqa: BLE001 - no Triton (a CPU build): the key says so
        triton_version = "none"
    gpu, capability = "cpu", "none"
    if device is not None and getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
        capability = "%d%d" % torch.cuda.get_device_capability(device)
    return Identity(torch=torch.__version__, triton=triton_version, cuda=str(torch.version.cuda or "none"),
                    python=".".join(platform.python_version_tuple()[:2]), gpu=gpu, capability=capability)


def verdict(manifest: dict[str, Any] | None, current: Identity) -> tuple[bool, str]:
    """(trust, why): whether a cache folder with this manifest may be used by ``current``.

    ``manifest`` is the folder's parsed manifest.json, or None when it is missing or unreadable."""
    if manifest is None:
        return False, "foreign: no readable manifest"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("identity"), dict):
        return False, "foreign: the manifest has no identity"
    written = manifest["identity"]
    wanted = asdict(current)
    differ = sorted(k for k in set(written) | set(wanted) if written.get(k) != wanted.get(k))
    if differ:
        said = ", ".join(f"{k} {written.get(k)!r} (here {wanted.get(k)!r})" for k in differ)
        return False, f"stale or foreign: written by {said}"
    if manifest.get("complete") is not True:
        return False, "incomplete: the warm-up that wrote it did not finish"
    return True, "warm"


PLANS = "plans.json"


def save_plans(folder: Path, identity: dict[str, Any], plans: dict[tuple[int, int, int], dict[int, float]]) -> None:
    """Write the engine's measured bucket times (shape -> rows -> seconds) beside the compiled code, with
    ``identity`` (what they were measured for: the UNet's config, dtype, buckets, compiled sizes), so a
    restart on this cache need not time every bucket again (engine.DenoiseEngine.warm, ``known``)."""
    body = {"identity": identity,
            "plans": {"x".join(map(str, key)): {str(rows): s for rows, s in sorted(seconds.items())}
                      for key, seconds in plans.items()}}
    tmp = Path(folder) / f".{PLANS}.{os.getpid()}"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True))
    os.replace(tmp, Path(folder) / PLANS)


def load_plans(folder: Path, identity: dict[str, Any]) -> dict[tuple[int, int, int], dict[int, float]]:
    """The bucket times ``save_plans`` wrote for this ``identity``; empty when there are none, they are
    unreadable, or they were measured for anything else (then they are measured again)."""
    try:
        body = json.loads((Path(folder) / PLANS).read_text())
        if body.get("identity") != json.loads(json.dumps(identity)):
            return {}
        return {tuple(int(v) for v in key.split("x")): {int(rows): float(s) for rows, s in seconds.items()}
                for key, seconds in body["plans"].items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


class CompileCache:
    """``open()`` before the first compilation, ``complete()`` after the warm-up, ``close()`` at the end.

    While open, the process holds the key's lock and torch/Triton write into ``folder``."""

    def __init__(self, root: str | Path, ident: Identity) -> None:
        self.root = Path(root)
        self.identity = ident
        self.folder = self.root / ident.key()
        self.status = "closed"       # warm, rebuilt (why), new
        self._lock_fd: int | None = None

    # --- the lock ------------------------------------------------------------------------------
    def _lock(self, timeout: float) -> bool:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{self.folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() > deadline:
                os.close(fd)
                return False
            time.sleep(0.5)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)      # closing releases the flock
            self._lock_fd = None

    # --- lifecycle -----------------------------------------------------------------------------
    def open(self, lock_timeout: float = 1800.0) -> str:
        """Take the key's lock, judge the folder, delete it unless trusted, point torch at it.

        Returns the status: "warm" (reused), "new" (none was there) or "rebuilt: <why>". If the lock
        cannot be had within ``lock_timeout`` (another process compiles for that long), compiles
        into a private temporary folder instead: never into a folder someone else is writing."""
        if not self._lock(lock_timeout):
            self.folder = Path(tempfile.mkdtemp(prefix="t2v-compile-"))
            self.status = "private: another process held the lock"
        elif not self.folder.exists():
            self.status = "new"
        else:
            trust, why = verdict(read_manifest(self.folder), self.identity)
            if trust:
                self.status = "warm"
            elif why.startswith("incomplete") and (self.folder / KEPT_WHEN_UNFINISHED).is_dir():
                # this software on this GPU, its warm-up cut short (a pod killed by its startup probe, say):
                # the packages of compiled buckets it finished stay, each checked by a trial call when loaded
                # (aot.py), so a first start longer than the probe allows still gets there over restarts
                for child in self.folder.iterdir():
                    if child.name != KEPT_WHEN_UNFINISHED:
                        shutil.rmtree(child) if child.is_dir() else child.unlink(missing_ok=True)
                for partial in (self.folder / KEPT_WHEN_UNFINISHED).glob(".*"):     # a build cut mid-write
                    partial.unlink(missing_ok=True)
                self.status = f"rebuilt: {why}; its finished packages kept"
            else:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.status = f"rebuilt: {why}"
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.status != "warm":
            self._write({"identity": asdict(self.identity), "complete": False, "created": time.time(),
                         "host": socket.gethostname()})
        self._point_torch_here()
        log.info(kv("compile_cache", folder=str(self.folder), status=self.status))
        return self.status

    def complete(self, **facts: Any) -> None:
        """The warm-up finished: mark the folder trusted (with ``facts`` for people) and release the lock."""
        manifest = read_manifest(self.folder) or {"identity": asdict(self.identity), "created": time.time()}
        manifest.update(facts, complete=True, completed=time.time())
        self._write(manifest)
        self._unlock()

    def close(self) -> None:
        self._unlock()

    def _write(self, manifest: dict[str, Any]) -> None:
        tmp = self.folder / f".{MANIFEST}.{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, self.folder / MANIFEST)

    def _point_torch_here(self) -> None:
        """Inductor's FX-graph and AOTAutograd caches under ``inductor/``, Triton's under ``triton/``.

        Torch reads these variables when it compiles (its compile workers inherit them), so setting
        them before the first compilation is enough; both caches are on by default, the two
        ``..._CACHE=1`` force them on."""
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.folder / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(self.folder / "triton")
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
