"""Prompt adherence measured through the mesh: prompt -> gateway -> MP4 -> decoded frames -> checker.

Why through the mesh and not ``train.evaluate``: a user gets the MP4, so the figure must include
everything between the weights and the file (the services' sampling code, fp casts, H.264's
yuv420p colour subsampling). The checker reads only the decoded pixels, never the prompt.

    python -m t2v.train.adherence --count 84                 # against a fresh local mesh on the embedded model
    python -m t2v.train.adherence --gateway 127.0.0.1:50050  # against a running one
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.contract import CACHE_MODES, SCHEDULERS
from t2v.train import checker, world


@dataclass(frozen=True)
class Case:
    spec: world.Spec
    prompt: str
    seed: int


def cases(split: str, paraphrase: bool, count: int, seed: int = 5) -> list[Case]:
    """``count`` prompts of ``split`` ("train" or "heldout"), fixed by ``seed`` (the same for every model).

    Held-out prompts name (shape, colour, motion) combinations that training never showed; paraphrased
    ones use phrasings that training never showed.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        spec = world.sample_spec(rng, split)
        out.append(Case(spec, world.captions(spec, rng, paraphrase), seed=i))
    return out


def decode_mp4(data: bytes) -> np.ndarray:
    """uint8 [F, H, W, 3] frames of an MP4 (as a user's player would show them)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def generate(gateway: str, case: Case, steps: int = 0, scheduler: str = "", timeout: float = 600.0,
             cache: str = "") -> np.ndarray:
    """One video of ``case`` through the gateway's Generate at the model's defaults (steps 0, scheduler
    "" and cache "" = the defaults: 50 exact DDIM steps)."""
    import grpc

    from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2

    params = generation_pb2.GenerationParams(prompt=case.prompt, seed=case.seed, num_inference_steps=steps,
                                             scheduler=scheduler, cache=cache)
    with grpc.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for event in stub.Generate(gateway_pb2.GenerateRequest(params=params), timeout=timeout):
            if event.WhichOneof("event") == "result":
                return decode_mp4(event.result.video)
    raise RuntimeError(f"the gateway sent no video for {case.prompt!r}")


def measure(gateway: str, chosen: list[Case], clients: int = 2, steps: int = 0, scheduler: str = "",
            cache: str = "", videos_out: list | None = None) -> dict:
    """Checker accuracy per attribute (and all three) over ``chosen``, plus each case's verdict (the
    videos are appended to ``videos_out`` when one is given)."""
    with ThreadPoolExecutor(clients) as pool:
        videos = list(pool.map(lambda case: generate(gateway, case, steps, scheduler, cache=cache), chosen))
    if videos_out is not None:
        videos_out.extend(videos)
    verdicts = []
    for case, video in zip(chosen, videos):
        guess = checker.classify(video)
        verdicts.append({"prompt": case.prompt, "seed": case.seed, **checker.check(video, case.spec),
                         "saw": [guess.shape, guess.colour, guess.motion]})
    rates = checker.accuracy(list(zip(videos, [c.spec for c in chosen])))
    return {"n": len(chosen), **rates, "cases": verdicts}


SETS = {"train": ("train", False), "heldout": ("heldout", False), "paraphrase": ("train", True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t2v.train.adherence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", default="", help="a running gateway (default: start a local mesh)")
    parser.add_argument("--model", default="", help="model folder for the local mesh (default: the embedded one)")
    parser.add_argument("--count", type=int, default=84, help="prompts per set (84 = every held-out spec's count)")
    parser.add_argument("--sets", default="heldout,paraphrase,train", help="comma-separated: " + ",".join(SETS))
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (0 = the default, 50)")
    parser.add_argument("--scheduler", default="", choices=("", *SCHEDULERS), help="sampler (default: ddim)")
    parser.add_argument("--clients", type=int, default=2, help="requests in flight (the denoiser batches them)")
    parser.add_argument("--cache", default="", choices=("", *CACHE_MODES), help="step caching (default: none, exact)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures and every verdict as JSON")
    args = parser.parse_args(argv)

    results: dict = {}

    def run(gateway: str) -> None:
        for name in args.sets.split(","):
            split, paraphrase = SETS[name]
            started = time.perf_counter()
            results[name] = measure(gateway, cases(split, paraphrase, args.count), args.clients, args.steps,
                                    args.scheduler, args.cache)
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{name}: " + " ".join(f"{k} {results[name][k]:.3f}" for k in ("colour", "shape", "motion", "all"))
                  + f" (n={args.count}, {results[name]['seconds']} s)", flush=True)

    if args.gateway:
        run(args.gateway)
    else:
        from services.common.config import DEFAULT_MODEL
        from t2v.up import Mesh, MeshPorts, free_port

        with tempfile.TemporaryDirectory(prefix="t2v-adherence-") as work:
            mesh = Mesh("127.0.0.1", MeshPorts(*(free_port() for _ in range(4))), args.model or DEFAULT_MODEL,
                        device="cpu", dtype="float32", log_dir=Path(work) / "logs", state_dir=Path(work) / "state",
                        metrics_offset=-1, http_offset=-1)
            try:
                mesh.start(echo=sys.stderr)
                run(mesh.address("gateway"))
            finally:
                mesh.stop(grace=10.0)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
