"""As a user would: `t2v up` in one terminal, `t2v generate` in another, then Ctrl-C; `make demo`; every
command's --help."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

from services.common.config import DEFAULT_MODEL
from services.gateway.app import model_default_size
from t2v.up import health_status
from tests.conftest import free_base_port, free_port

SIZE = model_default_size(DEFAULT_MODEL)   # the embedded model's default height and width
REPO = Path(__file__).resolve().parents[2]
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"              # ISO 8601 to the second
DURATION = r"\d+(\.\d)? s|\d+ min \d\d s|\d+ h \d\d min"

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
T2V = [sys.executable, "-m", "t2v"]


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(T2V + args, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def free_ports_at(offsets: tuple[int, ...], taken: set[int]) -> int:
    """A port P with P + each offset free and not in ``taken``, below Linux's ephemeral range (where the
    other tests' free_port() draws): a stage's gRPC port, its /metrics (+100), the gateway's HTTP (+30)."""
    for _ in range(200):
        base = random.randrange(20000, 32000)
        wanted = [base + offset for offset in offsets]
        if taken.intersection(wanted):
            continue
        try:
            for port in wanted:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        taken.update(wanted)
        return base
    raise AssertionError("no free ports for a stage of `t2v up`")


def port_args() -> tuple[dict[str, int], list[str]]:
    """Ports for each stage of `t2v up` whose derived ports are free too (a /metrics port taken by another
    test once made the gateway exit at start: exit 1, "Address already in use")."""
    taken: set[int] = set()
    ports = {stage: free_ports_at((0, 100, 30) if stage == "gateway" else (0, 100), taken)
             for stage in ("gateway", "text-encoder", "denoiser", "decoder")}
    return ports, [arg for stage, port in ports.items() for arg in (f"--{stage}-port", str(port))]


def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"t2v up exited early with {proc.returncode}"
        if health_status(address) == 1:
            return
        time.sleep(0.3)
    raise AssertionError(f"{address} never became SERVING")


def probe(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height, float(stream.average_rate)


def test_up_generate_and_ctrl_c(tmp_path):
    ports, args = port_args()
    up = subprocess.Popen(T2V + ["up", "--log-dir", str(tmp_path / "logs"), *args], env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for stage in ports:
            wait_serving(f"127.0.0.1:{ports[stage]}", up)
        output = tmp_path / "cat.mp4"
        address = f"127.0.0.1:{ports['gateway']}"
        with_env = {**ENV, "T2V_GATEWAY": address}           # the gateway from the environment, no --gateway
        gen = run(["generate", "a cat playing piano", "--frames", "8", "--steps", "12", "--fps", "12", "--seed", "3",
                   "-o", str(output)], env=with_env, timeout=120)
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.strip() == str(output.resolve())
        assert "step 12/12" in gen.stderr and "seed 3" in gen.stderr
        assert probe(output) == (8, SIZE, SIZE, 12.0)
        # The bar (one line at steps 1, 10 and the last, off a terminal): elapsed time, pace, time left.
        bar = {int(m.group(1)): m.group(2) for m in re.finditer(r"step (\d+)/12  (.*)", gen.stderr)}
        assert sorted(bar) == [1, 10, 12], gen.stderr
        assert re.fullmatch(f"elapsed ({DURATION})", bar[1]), bar
        assert re.fullmatch(rf"elapsed ({DURATION}), \d+\.\d (steps/s|s/step), about ({DURATION}) left", bar[10]), bar
        assert re.fullmatch(rf"elapsed ({DURATION}), \d+\.\d (steps/s|s/step)", bar[12]), bar

        gateway = ["--gateway", address]
        listing = subprocess.run(T2V + ["jobs", *gateway, "list"], env=ENV, capture_output=True, text=True,
                                 timeout=60)
        assert listing.returncode == 0, listing.stderr
        job_id, status = listing.stdout.split()[:2]
        assert status == "completed" and "a cat playing piano" in listing.stdout
        assert re.search(rf"  ({DURATION}) ago  a cat playing piano", listing.stdout), listing.stdout
        after = run(["jobs", "list", "--limit", "1", *gateway])          # --gateway after the action too
        assert after.returncode == 0 and after.stdout.split()[:2] == [job_id, "completed"], after.stderr
        assert run(["jobs", "list"], env=with_env).stdout.split()[:2] == [job_id, "completed"]

        # A person reads the times: ISO 8601 in local time with its offset (here TZ's +05:30), or UTC.
        show = run(["jobs", "show", job_id, *gateway], env={**ENV, "TZ": "XYZ-5:30"})
        assert show.returncode == 0, show.stderr
        fields = dict(line.split(None, 1) for line in show.stdout.splitlines())
        assert fields["job"] == job_id and fields["status"] == "completed", show.stdout
        assert fields["prompt"] == "a cat playing piano"
        assert fields["params"].startswith(f"8 frames, {SIZE}x{SIZE}, 12 steps, guidance 9, seed 3, 12 fps"), fields
        assert re.fullmatch(rf"{ISO}\+05:30  \(({DURATION}) ago\)", fields["created"]), fields["created"]
        assert re.fullmatch(rf"{ISO}\+05:30  \(after ({DURATION}) in the queue\)", fields["started"]), fields
        assert re.fullmatch(rf"{ISO}\+05:30  \(ran ({DURATION}), ({DURATION}) in all\)", fields["finished"]), fields
        assert re.fullmatch(rf"{ISO}\+05:30  \(in 23 h \d\d min\)", fields["expires"]), fields   # kept 24 h
        assert re.fullmatch(r"[\d,]+ bytes, video/mp4", fields["video"]), fields
        raw = run(["jobs", "show", job_id, "--raw"], env=with_env)     # for scripts: the message, as it was
        assert raw.returncode == 0 and f'job_id: "{job_id}"' in raw.stdout and "created_unix_ms: " in raw.stdout
        utc = run(["jobs", "show", "--utc", job_id], env=with_env)
        assert re.match(rf"{ISO}Z  \(", dict(line.split(None, 1) for line in utc.stdout.splitlines())["created"]), (
            utc.stdout + utc.stderr)
        copy = tmp_path / "copy.mp4"
        download = subprocess.run(T2V + ["jobs", *gateway, "download", job_id, "-o", str(copy)], env=ENV,
                                  capture_output=True, text=True, timeout=60)
        assert download.returncode == 0 and copy.read_bytes() == output.read_bytes()
        deleted = run(["jobs", "delete", job_id], env=with_env)
        assert deleted.returncode == 0 and deleted.stdout.split() == [job_id, "deleted"], deleted.stdout + deleted.stderr
        gone = run(["jobs", "show", job_id], env=with_env)
        assert gone.returncode == 1 and gone.stderr.startswith("error: NOT_FOUND: ") and "deleted" in gone.stderr
        assert "Traceback" not in gone.stderr
        unknown = subprocess.run(T2V + ["jobs", *gateway, "show", "0" * 32], env=ENV, capture_output=True,
                                 text=True, timeout=60)
        assert unknown.returncode == 1 and unknown.stderr.startswith("error: NOT_FOUND: ")
        assert "Traceback" not in unknown.stderr

        bad = subprocess.run(T2V + ["generate", "  ", "--gateway", f"127.0.0.1:{ports['gateway']}",
                                    "-o", str(tmp_path / "x.mp4")], env=ENV, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1
        assert bad.stderr.strip() == ('error: INVALID_ARGUMENT: prompt is empty (it has only invisible characters); '
                                      'describe the video you want, e.g. "a red ball moving right"')
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "all services stopped" in out
    for port in ports.values():
        assert health_status(f"127.0.0.1:{port}", timeout=0.5) is None, f"port {port} still answers after Ctrl-C"


def test_ctrl_c_stops_up_even_when_started_with_sigint_ignored(tmp_path):
    """A background job of a script (`t2v up &`) starts with SIGINT ignored, and Python then keeps it
    ignored: `kill -INT` did nothing (a clean-clone CI run launched with `&` hung here). `t2v up`
    installs its own handler."""
    ports, args = port_args()
    # The shell ignores SIGINT and exec keeps it ignored, as for `t2v up &`. Not preexec_fn: a fork of
    # this process (its gRPC threads running) sometimes aborted the child before the exec (exit -6).
    up = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", *T2V, "up", "--log-dir",
                           str(tmp_path / "logs"), *args], env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(f"127.0.0.1:{ports['gateway']}", up)
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert up.returncode == 0 and "stopping the mesh" in out and "all services stopped" in out, out


def test_make_demo_on_a_port_starts_the_mesh_makes_a_video_and_stops(tmp_path):
    """`make demo PORT=P` (-> `t2v up --port P --generate ...`), from another folder (its out/ lands there),
    with this interpreter's environment as VENV and its setup taken as done (-o: never reinstalled here)."""
    port = free_base_port()
    venv = Path(sys.prefix)
    output = tmp_path / "demo.mp4"
    started = time.monotonic()
    demo = subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "-o", f"{venv}/.installed", "demo",
                           f"VENV={venv}", f"PORT={port}", f"OUTPUT={output}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in ENV.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")})
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.strip().splitlines()[-1] == str(output.resolve())
    assert probe(output) == (16, SIZE, SIZE, 8.0)
    assert f"gateway at 127.0.0.1:{port}; web page at http://127.0.0.1:{port + 30}/" in demo.stderr, demo.stderr
    assert f"denoiser      SERVING on 127.0.0.1:{port + 2} (metrics http://127.0.0.1:{port + 102}/metrics)" in (
        demo.stderr)
    assert "all services stopped" in demo.stderr
    print(f"demo: first video in {time.monotonic() - started:.1f} s")


def test_every_command_explains_itself_with_help():
    serve = run(["serve", "--help"])
    assert serve.returncode == 0, serve.stderr
    assert all(stage in serve.stdout for stage in ("text_encoder", "denoiser", "decoder", "gateway"))
    assert "t2v serve STAGE --help" in serve.stdout and "T2V_*" in serve.stdout
    bare = run(["serve"])
    assert bare.returncode == 2 and "required: STAGE" in bare.stderr

    up = run(["up", "--help"])
    assert up.returncode == 0, up.stderr
    text = " ".join(up.stdout.split())
    assert "--port P" in text and "make demo PORT=P" in text
    assert "HTTP API and web page: P+30 (http://127.0.0.1:50080/)" in text, up.stdout
    assert "/metrics: its gRPC port + 100 (50150-50153)" in text, up.stdout

    for command in (["generate"], ["jobs"], ["jobs", "list"], ["jobs", "show"], ["jobs", "delete"],
                    ["jobs", "download"]):
        default = " ".join(run([*command, "--help"]).stdout.split())
        assert "--gateway HOST:PORT the gateway's gRPC address (default: 127.0.0.1:50050" in default, (command, default)
        assert "T2V_GATEWAY" in default, default
        from_env = " ".join(run([*command, "--help"], env={**ENV, "T2V_GATEWAY": "gw.example:7000"}).stdout.split())
        assert "(default: gw.example:7000, from $T2V_GATEWAY)" in from_env, from_env


def test_generate_without_a_gateway_says_so(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    gen = subprocess.run(T2V + ["generate", "a cat", "--gateway", address, "-o", str(tmp_path / "x.mp4")],
                         env=ENV, capture_output=True, text=True, timeout=60)
    assert gen.returncode == 1
    assert f"cannot reach the gateway at {address}" in gen.stderr and "t2v up" in gen.stderr
    assert "Traceback" not in gen.stderr
    # The address from T2V_GATEWAY, for `t2v generate` and for `t2v jobs` (the flag after the action wins).
    env = {**ENV, "T2V_GATEWAY": address}
    gen = run(["generate", "a cat", "-o", str(tmp_path / "x.mp4")], env=env)
    assert gen.returncode == 1 and f"cannot reach the gateway at {address}" in gen.stderr, gen.stderr
    jobs = run(["jobs", "list"], env=env)
    assert jobs.returncode == 1 and f"cannot reach the gateway at {address}" in jobs.stderr, jobs.stderr
    other = f"127.0.0.1:{free_port()}"
    jobs = run(["jobs", "--gateway", address, "show", "0" * 32, "--gateway", other], env=env)
    assert jobs.returncode == 1 and f"cannot reach the gateway at {other}" in jobs.stderr, jobs.stderr


def test_up_reports_a_stage_that_cannot_start(tmp_path):
    _, args = port_args()
    up = subprocess.run(T2V + ["up", *args, "--model", str(tmp_path / "missing"), "--log-dir", str(tmp_path)],
                        env=ENV, capture_output=True, text=True, timeout=120)
    assert up.returncode == 1
    assert "exited with code" in up.stderr and "does not exist" in up.stderr
    assert "Traceback" not in up.stderr.split("last lines")[0]
