"""The ``t2v`` command: one entry point for running, calling and preparing the mesh.

    t2v up                               start the whole mesh on loopback (Ctrl-C stops it)
    t2v up --generate "a prompt" -o v.mp4  start it, make one video, stop it (the demo)
    t2v serve STAGE [--help]             run one service (text_encoder, denoiser, decoder, gateway)
    t2v generate "a prompt" -o v.mp4     call a running gateway, with a progress bar
    t2v make-model --preset tiny -o DIR  write a random-weight model folder (tiny, world or full 1.7B layout)
    t2v jobs list|show|cancel|download   follow the gateway's jobs
    t2v ops status|scale|drain           look after the mesh on Kubernetes (deploy/k8s, docs/deploy.md)
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

from services.common.config import DEFAULT_MODEL

_PRIORITIES = {"low": 1, "normal": 2, "high": 3}     # t2v.v1.Priority values; imported lazily elsewhere
SERVE_MODULES = {
    "text_encoder": "services.text_encoder.server",
    "denoiser": "services.denoiser.server",
    "decoder": "services.decoder.server",
    "gateway": "services.gateway.app",
}


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation (0 or unset = the default)")
    g.add_argument("--negative-prompt", default="", help="what the video should not show")
    g.add_argument("--frames", type=int, default=0, help="number of frames (default 16)")
    g.add_argument("--height", type=int, default=0, help="pixels, multiple of 8 (default: the model's)")
    g.add_argument("--width", type=int, default=0, help="pixels, multiple of 8 (default: the model's)")
    g.add_argument("--steps", type=int, default=0, help="denoising steps (default 50)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default 9.0)")
    g.add_argument("--seed", type=int, default=None, help="same seed, same video (default: random)")
    g.add_argument("--fps", type=int, default=0, help="frames per second of the MP4 (default 8)")
    g.add_argument("--scheduler", default="", help="ddim (default) or dpmsolver++")
    g.add_argument("--cache", default="", help="none (default: exact) or deep (DeepCache step caching: faster, "
                                               "approximate)")
    g.add_argument("-o", "--output", type=Path, default=Path("out/video.mp4"), help="where to write the MP4")
    g.add_argument("--timeout", type=float, default=None,
                   help="give up after this many seconds (time waiting in the queue included)")
    g.add_argument("--priority", choices=sorted(_PRIORITIES), default="normal", help="queue priority")
    g.add_argument("--api-key", default=None,
                   help="key for a gateway that requires one [env T2V_API_KEY]")


def _params(prompt: str, args: argparse.Namespace):  # -> generation_pb2.GenerationParams
    from t2v.v1 import generation_pb2

    params = generation_pb2.GenerationParams(
        prompt=prompt, negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height,
        width=args.width, num_inference_steps=args.steps, fps=args.fps, scheduler=args.scheduler,
        cache=args.cache)
    if args.guidance is not None:
        params.guidance_scale = args.guidance
    if args.seed is not None:
        params.seed = args.seed
    return params


def _run_generate(gateway: str, prompt: str, args: argparse.Namespace) -> int:
    from t2v.client import GenerateError, generate, tls_from_args

    started = time.monotonic()
    try:
        result = generate(gateway, _params(prompt, args), args.output, timeout=args.timeout,
                          api_key=args.api_key or os.environ.get("T2V_API_KEY"), priority=_PRIORITIES[args.priority],
                          tls=tls_from_args(args))
    except GenerateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({result.num_frames} frames, {result.width}x{result.height}, {result.fps} fps, "
          f"seed {result.seed}) in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(args.output.resolve())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    return _run_generate(args.gateway, args.prompt, args)


def cmd_up(args: argparse.Namespace) -> int:
    from t2v.up import Mesh, MeshPorts, StartError

    ports = MeshPorts.from_base(args.base_port)
    ports = MeshPorts(args.gateway_port or ports.gateway, args.text_encoder_port or ports.text_encoder,
                      args.denoiser_port or ports.denoiser, args.decoder_port or ports.decoder)
    log_dir = args.log_dir or (Path("out/logs") if args.generate else None)
    mesh = Mesh(args.host, ports, args.model, args.device, args.dtype, log_dir, state_dir=args.state_dir,
                job_store=args.job_store)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Python leaves SIGINT ignored when it starts ignored, as for a background job of a script (`t2v up &`):
    # Ctrl-C / kill -INT must still stop the mesh.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        print(f"starting the mesh on {args.host} with model {args.model}"
              + (f" (service logs in {log_dir}/)" if log_dir else ""), file=sys.stderr)
        started = time.monotonic()
        mesh.start(timeout=args.start_timeout)
        print(f"all services SERVING in {time.monotonic() - started:.1f} s; gateway at {mesh.address('gateway')}"
              + (f"; web page at {mesh.web_url}" if mesh.web_url else ""), file=sys.stderr)
        if args.generate:
            return _run_generate(mesh.address("gateway"), args.generate, args)
        print("press Ctrl-C to stop", file=sys.stderr)
        exited = mesh.wait_any_exit()
        if exited:
            print(f"error: {exited[0]} exited with code {exited[1]}; stopping the mesh", file=sys.stderr)
            return 1
        return 0
    except StartError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the mesh", file=sys.stderr)
        return 0
    finally:
        mesh.stop()
        print("all services stopped", file=sys.stderr)


def cmd_make_model(args: argparse.Namespace) -> int:
    from t2v.modelgen import make_model

    print(make_model(args.preset, args.output, seed=args.seed, device=args.device, dtype=args.dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2v", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the whole mesh on this machine",
                        description="Start text_encoder, denoiser, decoder and gateway as separate processes, "
                                    "wait until all are SERVING, stop them all on Ctrl-C.")
    up.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    up.add_argument("--base-port", type=int, default=50050, help="gateway port; the stages take the next three")
    for stage in ("gateway", "text-encoder", "denoiser", "decoder"):
        up.add_argument(f"--{stage}-port", type=int, default=0, help=f"{stage} port (overrides --base-port)")
    up.add_argument("--model", default=DEFAULT_MODEL, help="diffusers text-to-video model folder")
    up.add_argument("--device", default="auto", help="torch device for the stages (auto, cpu, cuda)")
    up.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto")
    up.add_argument("--log-dir", type=Path, default=None, help="write each service's log here instead of the terminal")
    up.add_argument("--state-dir", type=Path, default=None,
                    help="the gateway's job database and videos (default: LOG_DIR/state with --log-dir, "
                         "else out/state)")
    up.add_argument("--job-store", default=os.environ.get("T2V_JOB_STORE", ""),
                    help="where the gateway keeps its jobs: sqlite:///PATH (default: the state dir's jobs.sqlite3) "
                         "or postgresql://USER@HOST:PORT/DB, shared with other gateways (env T2V_JOB_STORE)")
    up.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for every service")
    up.add_argument("--generate", metavar="PROMPT", default=None,
                    help="make one video for PROMPT, then stop the mesh (prints the MP4's path)")
    _add_generation_args(up)
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one service", add_help=False,
                           description="t2v serve STAGE [options]; `t2v serve STAGE --help` lists its options.")
    serve.add_argument("stage", choices=sorted(SERVE_MODULES), help="which service")

    gen = sub.add_parser("generate", help="make a video through a running gateway")
    gen.add_argument("prompt", help="what the video shows")
    gen.add_argument("--gateway", default="127.0.0.1:50050", help="gateway address")
    _add_generation_args(gen)
    from t2v.client import add_tls_args
    add_tls_args(gen)
    gen.set_defaults(func=cmd_generate)

    make = sub.add_parser("make-model", help="write a model folder with random weights")
    make.add_argument("--preset", choices=("tiny", "world", "full"), default="tiny",
                      help="tiny: the smallest; world: the embedded default's architecture (models/t2v-world "
                           "is it trained); full: the real 1.7B architecture")
    make.add_argument("-o", "--output", type=Path, required=True, help="folder to write")
    make.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    make.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster for full)")
    make.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                      help="dtype of the saved weights")
    make.set_defaults(func=cmd_make_model)

    from t2v.jobs_cli import add_parser as add_jobs_parser   # t2v jobs list|show|cancel|download
    add_jobs_parser(sub)
    from t2v.ops import add_parser as add_ops_parser   # t2v ops status|scale|drain (Kubernetes)
    add_ops_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        if len(argv) < 2 or argv[1] not in SERVE_MODULES:
            build_parser().parse_args(argv[:2] or ["serve"])  # prints the usage and the choices
            return 2
        importlib.import_module(SERVE_MODULES[argv[1]]).main(argv[2:])
        return 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
