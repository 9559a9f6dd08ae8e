"""Schemathesis on the gateway's HTTP API: cases generated from its own /openapi.json (valid and
invalid bodies, query and path parameters, every operation), sent over a loopback socket to the real
uvicorn server of a real gateway in front of the real stages.

Every answer: no 5xx (the gateway is not draining; a draining one answers 503 with a sentence, tested
below), every error a JSON body in the documented shape whose message is a sentence, and the
response conforms to the schema. Bodies that the schema allows but that would make a large video are
shrunk before sending (1-2 frames, 8-16 px, 1-2 steps), so accepted jobs finish in milliseconds.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from typing import Any, Callable

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from services.gateway.http import Backend, create_app
from services.gateway.app import GatewayConfig, limits_from
from tests.conftest import RunningStage
from tests.fuzzing import assert_sentence

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 100      # 150 took ~2 min alone after the main part; CI allows 20 min in all
CASES: Counter[str] = Counter()           # by operation
ANSWERS: Counter[tuple[str, int]] = Counter()   # by operation and status class (2, 4)
_SIZE = re.compile(r"\s*([0-9]+)x([0-9]+)\s*")


@pytest.fixture
def http_gateway(gateway_factory: Callable[..., RunningStage]) -> RunningStage:
    return gateway_factory(http_port=0)


def served_openapi() -> dict[str, Any]:
    """The document a default gateway serves at /openapi.json, built as it builds it, with no server:
    schemathesis's pytest plugin needs the schema at collection time (its lazy, fixture-loaded form
    does not run on pytest 9). ``test_the_fuzzed_schema_is_the_served_one`` checks they are equal."""
    config = GatewayConfig(port=0)
    app = create_app(Backend(jobs=lambda: None, limits=limits_from(config), model=config.model,  # type: ignore
                             stages_ready=lambda: False))
    return app.openapi()


schema = schemathesis.openapi.from_dict(served_openapi())


def test_the_fuzzed_schema_is_the_served_one(http_gateway: RunningStage) -> None:
    served = requests.get(http_gateway.http_url + "/openapi.json", timeout=10)
    assert served.status_code == 200 and served.json() == served_openapi()


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def make_cheap(body: Any, most_frames: int, most_size: int, most_steps: int) -> None:
    """Shrink what a valid body would make to a tiny video; leave invalid values as they are (the
    gateway must refuse them) and missing ones missing unless their default is large."""
    if not isinstance(body, dict):
        return
    for name in ("num_frames", "num_inference_steps", "size", "width", "height", "seconds"):
        if name in body and body[name] is None:      # null = the default, which is large: made small below
            del body[name]
    frames, steps = body.get("num_frames"), body.get("num_inference_steps")
    if isinstance(frames, int) and not isinstance(frames, bool) and 2 < frames <= most_frames:
        body["num_frames"] = 2
    if isinstance(steps, int) and not isinstance(steps, bool) and 2 < steps <= most_steps:
        body["num_inference_steps"] = 2
    size = body.get("size")
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    given = (int(match[1]), int(match[2])) if match else None
    small = given
    if match and all(0 < int(v) <= most_size and int(v) % 8 == 0 for v in match.groups()):
        small = (min(int(match[1]), 16), min(int(match[2]), 16))
        body["size"] = f"{small[0]}x{small[1]}"
    for name, index in (("width", 0), ("height", 1)):        # vLLM-Omni's names for size's two numbers
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most_size and value % 8 == 0:
            if given is None:
                body[name] = min(value, 16)
            elif value == given[index] and small is not None:
                body[name] = small[index]                     # still agreeing with size (a disagreement stays)
    seconds, fps = _number(body.get("seconds")), _number(body.get("fps")) or 8
    if seconds is not None and 0 < seconds * fps <= most_frames + 0.5 and "num_frames" not in body:
        body["seconds"] = str(1 / fps) if isinstance(body.get("seconds"), str) else 1 / fps
    if "num_frames" not in body and "seconds" not in body:
        body["num_frames"] = 1
    body.setdefault("num_inference_steps", 1)
    if "width" not in body and "height" not in body:
        body.setdefault("size", "8x8")
    for name in ("width", "height"):
        if name not in body and "size" not in body:
            body[name] = 8


def check_answer(response: requests.Response, draining: bool = False) -> None:
    """No 5xx (but 503 while draining, and 501 for OpenAI's endpoints this gateway documents as not done); an
    error is {"error": {message, type, param, code}} with a sentence."""
    status = response.status_code
    code = response.json()["error"]["code"] if status >= 400 else ""
    unsupported = status == 501 and code == "unimplemented"
    late = status == 504 and code == "deadline_exceeded"        # /sync: the job's own timeout_seconds passed
    assert status < 500 or unsupported or late or (draining and status == 503), f"{status}: {response.text[:500]}"
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert_sentence(error["message"], f"the {status} answer")
        assert isinstance(error["code"], str) and error["code"]


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_without_5xx_and_with_sentences(case: Any, http_gateway: RunningStage) -> None:
    limits = http_gateway.servicer.limits
    if case.method == "POST" and case.path in ("/v1/videos", "/v1/videos/sync"):
        make_cheap(case.body, limits.max_frames, limits.max_size, limits.max_steps)
    response = case.call(base_url=http_gateway.http_url, timeout=30)
    CASES[f"{case.method} {case.path}"] += 1
    ANSWERS[f"{case.method} {case.path}", response.status_code // 100] += 1
    check_answer(response)
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance])


def test_schemathesis_ran_thousands_of_cases() -> None:
    """Runs after the test above (file order): schemathesis reached every operation, many times, and
    POST /v1/videos both created videos and was refused (the cases are not all one kind)."""
    print(f"schemathesis cases: {sum(CASES.values())} {dict(CASES)} {dict(ANSWERS)}")
    assert len(CASES) >= 6, CASES
    assert sum(CASES.values()) >= 600, CASES
    assert ANSWERS["POST /v1/videos", 2] >= 20 and ANSWERS["POST /v1/videos", 4] >= 20, ANSWERS


def test_a_draining_gateway_answers_503_with_a_sentence(http_gateway: RunningStage) -> None:
    http_gateway.servicer.gate.drain()
    base = http_gateway.http_url
    body = json.dumps({"prompt": "a red ball", "num_frames": 1, "size": "8x8", "num_inference_steps": 1})
    video_id = uuid.uuid4().hex
    for method, path, data in [("POST", "/v1/videos", body), ("GET", "/v1/videos", None),
                               ("GET", f"/v1/videos/{video_id}", None), ("DELETE", f"/v1/videos/{video_id}", None),
                               ("GET", f"/v1/videos/{video_id}/content", None),
                               ("GET", f"/v1/videos/{video_id}/events", None), ("GET", "/healthz", None)]:
        response = requests.request(method, base + path, data=data, timeout=30,
                                    headers={"Content-Type": "application/json"})
        assert response.status_code == 503, (method, path, response.status_code, response.text)
        check_answer(response, draining=True)
