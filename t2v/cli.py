"""The ``t2v`` command: one entry point for running, calling and preparing the mesh.

    t2v up                               start the whole mesh on loopback (Ctrl-C stops it)
    t2v up --generate "a prompt" -o v.mp4  start it, make one video, stop it (the demo)
    t2v serve STAGE [--help]             run one service (text_encoder, denoiser, decoder, gateway)
    t2v generate "a prompt" -o v.mp4     call a running gateway, with a progress bar
                                         (the gateway: --gateway HOST:PORT, else $T2V_GATEWAY, else 127.0.0.1:50050)
    t2v make-model --preset tiny -o DIR  write a random-weight model folder (tiny, world or full 1.7B layout)
    t2v fit-preview MODEL_FOLDER         fit the latent -> RGB map of live previews (MODEL/vae/latent_rgb.json)
    t2v jobs list|show|cancel|delete|download  follow (and delete) the gateway's jobs
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
    g.add_argument("--height", type=int, default=0, help="pixels, a multiple of the model's VAE scale factor, 8 for "
                   "most (default: the model's)")
    g.add_argument("--width", type=int, default=0, help="pixels, a multiple of the model's VAE scale factor, 8 for "
                   "most (default: the model's)")
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
    from t2v.up import Mesh, MeshPorts, StartError, parse_gpus

    gpus: tuple[int, ...] = ()
    if args.gpus:
        import torch

        try:
            gpus = parse_gpus(args.gpus, torch.cuda.device_count())
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.cfg_parallel and len(gpus) < 2:
        print("error: --cfg-parallel needs two GPUs a denoiser: give --gpus with at least two", file=sys.stderr)
        return 2
    ports = MeshPorts.from_base(args.base_port)
    ports = MeshPorts(args.gateway_port or ports.gateway, args.text_encoder_port or ports.text_encoder,
                      args.denoiser_port or ports.denoiser, args.decoder_port or ports.decoder)
    log_dir = args.log_dir or (Path("out/logs") if args.generate else None)
    mesh = Mesh(args.host, ports, args.model, args.device, args.dtype, log_dir, state_dir=args.state_dir,
                job_store=args.job_store, gpus=gpus, cfg_parallel=args.cfg_parallel)
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


def cmd_fit_preview(args: argparse.Namespace) -> int:
    from services.common.model_folder import ModelFolderError
    from t2v.fit_preview import main as fit_main

    try:
        return fit_main(args)
    except (ModelFolderError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:        # e.g. the folder became unwritable, or the disk filled, during the fit
        from services.common.latent_rgb import FILE

        print(f"error: could not write {Path(args.model) / FILE}: {error.strerror or error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2v", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from t2v.up import HTTP_PORT_OFFSET, METRICS_PORT_OFFSET, MeshPorts

    base = MeshPorts().gateway
    http, metrics = base + HTTP_PORT_OFFSET, base + METRICS_PORT_OFFSET
    up = sub.add_parser(
        "up", help="start the whole mesh on this machine", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""Start text_encoder, denoiser, decoder and gateway as separate processes, wait until all
are SERVING, stop them all on Ctrl-C.

Ports, from --port P (default {base}; `make demo PORT=P` passes it):
  gRPC     gateway P, text_encoder P+1, denoiser P+2, decoder P+3 ({base}-{base + 3})
  HTTP     the gateway's HTTP API and web page: P+{HTTP_PORT_OFFSET} (http://127.0.0.1:{http}/)
  metrics  each service's Prometheus /metrics: its gRPC port + {METRICS_PORT_OFFSET} ({metrics}-{metrics + 3})
A --STAGE-port flag moves one service; its metrics port (and the gateway's HTTP
port) follow it. Every address is printed on the service's SERVING line.""")
    up.add_argument("--host", default="127.0.0.1", help="address every service listens on")
    up.add_argument("--port", "--base-port", dest="base_port", type=int, default=base, metavar="P",
                    help=f"the gateway's gRPC port; the stages take the next three, the web page P+{HTTP_PORT_OFFSET}, "
                         f"metrics +{METRICS_PORT_OFFSET} (default {base})")
    for stage in ("gateway", "text-encoder", "denoiser", "decoder"):
        up.add_argument(f"--{stage}-port", type=int, default=0, help=f"{stage} gRPC port (overrides --port)")
    up.add_argument("--model", default=DEFAULT_MODEL, help="diffusers text-to-video model folder")
    up.add_argument("--device", default="auto", help="torch device for the stages (auto, cpu, cuda)")
    up.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto")
    up.add_argument("--gpus", default="", metavar="all|0,1,...",
                    help="one denoiser per GPU (ports: the denoiser's + 10 each), the gateway spreading jobs over "
                         "them; the text encoder and decoder on the first (default: one denoiser on --device)")
    up.add_argument("--cfg-parallel", action="store_true",
                    help="with --gpus: one denoiser per pair of GPUs, each running CFG-parallel over its two")
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

    # `t2v serve STAGE ...` goes straight to the stage's own parser (main); this one answers `t2v serve`,
    # `t2v serve --help` and a stage that does not exist.
    serve = sub.add_parser(
        "serve", help="run one service", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="t2v serve STAGE [options]",
        description="""Run one service of the mesh in this process (what `t2v up` starts four of).

  t2v serve text_encoder   the prompt -> embeddings (CLIP text model)
  t2v serve denoiser       embeddings -> latents (the UNet, step-level batching)
  t2v serve decoder        latents -> MP4 (the VAE and H.264)
  t2v serve gateway        the public API: jobs, queue, the three stages' addresses, HTTP API and web page

`t2v serve STAGE --help` lists that service's settings, each with its T2V_* environment variable
(e.g. t2v serve denoiser --help). docs/operations.md describes them.""")
    serve.add_argument("stage", choices=sorted(SERVE_MODULES), metavar="STAGE",
                       help=f"which service: {', '.join(sorted(SERVE_MODULES))}")

    from t2v.client import add_gateway_arg, add_tls_args
    gen = sub.add_parser("generate", help="make a video through a running gateway",
                         description="Make one video through a running gateway (`t2v up`), with a progress bar "
                                     "(elapsed time, steps per second, time left); prints the MP4's path.")
    gen.add_argument("prompt", help="what the video shows")
    add_gateway_arg(gen)
    _add_generation_args(gen)
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

    fit = sub.add_parser(
        "fit-preview", help="fit the latent -> RGB map of live previews into a model folder",
        description="Fit the small linear map from latent channels to RGB that the denoiser's live previews use, "
                    "by least squares against the model's VAE (its decoded frames average-pooled to latent "
                    "resolution), and write it as MODEL_FOLDER/vae/latent_rgb.json. Without that file the "
                    "denoiser serves, but says previews are unavailable.")
    fit.add_argument("model", metavar="MODEL_FOLDER", help="a diffusers text-to-video model folder")
    fit.add_argument("--source", choices=("denoise", "random"), default="denoise",
                     help="denoise: latents of videos the model makes of a dozen prompts (default); random: "
                          "N(0, 1) latents, for a folder of random weights")
    fit.add_argument("--seeds", type=int, default=1, help="videos per prompt (denoise; default 1)")
    fit.add_argument("--steps", type=int, default=25, help="denoising steps per video (denoise; default 25)")
    fit.add_argument("--frames", type=int, default=16, help="frames per video (denoise; default 16)")
    fit.add_argument("--device", default="cpu", help="torch device (cpu, cuda, auto)")
    fit.add_argument("--dtype", default="float32", help="float32, float16, bfloat16 or auto")
    fit.add_argument("--dry-run", action="store_true", help="fit and report, write nothing")
    fit.set_defaults(func=cmd_fit_preview)

    from t2v.jobs_cli import add_parser as add_jobs_parser   # t2v jobs list|show|cancel|delete|download
    add_jobs_parser(sub)
    from t2v.ops import add_parser as add_ops_parser   # t2v ops status|scale|drain (Kubernetes)
    add_ops_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"] and len(argv) >= 2 and argv[1] in SERVE_MODULES:
        importlib.import_module(SERVE_MODULES[argv[1]]).main(argv[2:])
        return 0
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
