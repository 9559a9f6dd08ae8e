"""The gateway's HTTP API over real loopback HTTP (urllib), in front of real stage servers: create, poll,
download (Range too), list, cancel, server-sent events, a full queue, API keys, the OpenAPI document,
/healthz and the page. Each test gets its own gateway (HTTP on a free port) and state dir; the stages
are shared. "Long" jobs (500 steps) are always cancelled before they end."""

from __future__ import annotations

import io
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import av
import pytest

from tests.conftest import RunningStage, free_port, wait_for

pytestmark = pytest.mark.slow

LONG = 500           # steps: ~7 s on a 2-core CPU; never run to the end here
SMALL = {"num_frames": 2, "size": "32x32"}


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


class Http:
    """urllib with the few things these tests repeat: JSON in and out, errors as answers, a key."""

    def __init__(self, base: str, key: str | None = None) -> None:
        self.base = base
        self.key = key

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             timeout: float = 30) -> Answer:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers or {})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.key is not None:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Answer(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            with error:
                return Answer(error.code, error.headers, error.read())

    def create(self, steps: int = 2, **fields: Any) -> dict[str, Any]:
        answer = self.call("POST", "/v1/videos", {"prompt": "a red ball", "num_inference_steps": steps,
                                                  **SMALL, **fields})
        assert answer.status == 200, answer.body
        return answer.json()

    def get(self, video_id: str) -> dict[str, Any]:
        answer = self.call("GET", f"/v1/videos/{video_id}")
        assert answer.status == 200, answer.body
        return answer.json()

    def wait(self, video_id: str, job_status: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: (v := self.get(video_id))["job_status"] == job_status and v, timeout,
                        f"video {video_id} to be {job_status}")

    def wait_running(self, video_id: str, min_step: int = 1) -> dict[str, Any]:
        return wait_for(lambda: (v := self.get(video_id))["job_status"] == "running" and v["step"] >= min_step
                        and v, 60, f"video {video_id} to run step {min_step}")

    def events(self, video_id: str, timeout: float = 60) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) pairs of GET /v1/videos/{id}/events, parsed from text/event-stream as it comes."""
        request = urllib.request.Request(f"{self.base}/v1/videos/{video_id}/events")
        if self.key is not None:
            request.add_header("Authorization", f"Bearer {self.key}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            name, data = None, []
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    yield name or "message", json.loads("\n".join(data))
                    name, data = None, []


def frames_of(data: bytes) -> list[tuple[int, int]]:
    with av.open(io.BytesIO(data)) as container:
        return [(frame.width, frame.height) for frame in container.decode(video=0)]


@pytest.fixture
def make_gateway(gateway_factory: Callable[..., RunningStage]) -> Callable[..., RunningStage]:
    def make(**overrides: Any) -> RunningStage:
        overrides.setdefault("max_steps", LONG)
        overrides.setdefault("http_port", 0)
        return gateway_factory(**overrides)
    return make


def test_create_poll_and_download_the_mp4_with_ranges(make_gateway) -> None:
    http = Http(make_gateway().http_url)
    created = http.create(steps=3, seed=7, priority="high", negative_prompt="blurry")
    assert len(created["id"]) == 32 and created["object"] == "video"
    assert created["status"] in ("queued", "in_progress") and isinstance(created["created_at"], int)
    assert abs(created["created_at"] - time.time()) < 60
    assert (created["model"], created["size"], created["seconds"]) == ("t2v-world", "32x32", "0.25")
    assert (created["seed"], created["num_frames"], created["fps"], created["priority"]) == (7, 2, 8, "high")

    done = http.wait(created["id"], "completed")
    assert (done["status"], done["progress"], done["error"]) == ("completed", 100, None)
    assert (done["step"], done["total_steps"], done["negative_prompt"]) == (3, 3, "blurry")
    assert done["created_at"] <= done["completed_at"] < done["expires_at"] and done["queue_position"] is None

    whole = http.call("GET", f"/v1/videos/{created['id']}/content")
    assert whole.status == 200 and whole.headers["Content-Type"] == "video/mp4"
    assert whole.headers["Accept-Ranges"] == "bytes"
    size = int(whole.headers["Content-Length"])
    assert size == len(whole.body) == done["video_size"]
    assert frames_of(whole.body) == [(32, 32), (32, 32)]

    for header, start, end in [("bytes=10-99", 10, 99), ("bytes=100-", 100, size - 1),
                               ("bytes=-50", size - 50, size - 1), (f"bytes=0-{size + 500}", 0, size - 1)]:
        part = http.call("GET", f"/v1/videos/{created['id']}/content", headers={"Range": header})
        assert part.status == 206, header
        assert part.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert part.body == whole.body[start:end + 1] and int(part.headers["Content-Length"]) == end - start + 1
    beyond = http.call("GET", f"/v1/videos/{created['id']}/content", headers={"Range": f"bytes={size}-"})
    assert beyond.status == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"
    assert f"{size} bytes" in beyond.error["message"]
    ignored = http.call("GET", f"/v1/videos/{created['id']}/content", headers={"Range": "bytes=0-1,5-9"})
    assert ignored.status == 200 and ignored.body == whole.body        # several ranges: the whole file

    again = http.create(steps=3, seed=7, priority="high", negative_prompt="blurry")
    assert again["status"] == "completed" and again["cached"] and again["id"] != created["id"]


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "   "}, "prompt", "prompt is empty"),
    ({"num_frames": 2}, "prompt", "prompt is missing"),
    ({"prompt": "x", "num_frames": 0}, "num_frames", "between 1 and"),
    ({"prompt": "x", "num_frames": "many"}, "num_frames", "whole number"),
    ({"prompt": "x", "size": "32 by 32"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "33x32"}, "size", "multiple of 8"),
    ({"prompt": "x", "seconds": "99"}, "seconds", "at most 64 frames"),
    ({"prompt": "x", "seconds": "1", "num_frames": 8}, "seconds", "not both"),
    ({"prompt": "x", "scheduler": "euler"}, "scheduler", "unknown"),
    ({"prompt": "x", "cache": "fast"}, "cache", "choose none (exact, the default) or deep"),
    ({"prompt": "x", "priority": "urgent"}, "priority", "'low', 'normal' or 'high'"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", ">= 0"),
    ({"prompt": "x", "num_inference_steps": 100_000}, "num_inference_steps", "between 1 and"),
    ({"prompt": "x", "stpes": 3}, "stpes", "not a field"),
    ({"prompt": "x", "input_reference": "cat.png"}, "input_reference", "text only"),
])
def test_bad_input_is_a_400_with_a_sentence_and_the_field(make_gateway, body, param, words) -> None:
    answer = Http(make_gateway().http_url).call("POST", "/v1/videos", body)
    assert answer.status == 400, answer.body
    error = answer.error
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_argument")
    assert words in error["message"] and "Traceback" not in error["message"]


def test_unknown_malformed_and_unfinished_ids(make_gateway) -> None:
    gateway = make_gateway(slots=1)
    http = Http(gateway.http_url)
    for method, suffix in [("GET", ""), ("DELETE", ""), ("GET", "/content"), ("GET", "/events"),
                           ("POST", "/cancel")]:
        unknown = http.call(method, f"/v1/videos/{uuid.uuid4().hex}{suffix}")
        assert unknown.status == 404 and "does not exist" in unknown.error["message"]
        malformed = http.call(method, f"/v1/videos/..%2F..%2Fetc{suffix}")
        assert malformed.status in (400, 404)                 # the router may not even match it
        bad = http.call(method, f"/v1/videos/NOT-A-JOB-ID{suffix}")
        assert bad.status == 400 and bad.error["param"] == "video_id" and "malformed" in bad.error["message"]
    body = http.call("POST", "/v1/videos", headers={"Content-Type": "application/json"})
    assert body.status == 400 and "empty" in body.error["message"]
    assert http.call("GET", "/v2/nothing").status == 404
    assert http.call("PUT", "/v1/videos").status == 405

    long = http.create(steps=LONG)
    http.wait_running(long["id"])
    waiting = http.create(steps=1)
    early = http.call("GET", f"/v1/videos/{waiting['id']}/content")
    assert early.status == 409 and "queued" in early.error["message"]
    assert early.error["code"] == "failed_precondition"
    http.call("DELETE", f"/v1/videos/{long['id']}")


def test_list_is_newest_first_with_limit_and_after(make_gateway) -> None:
    http = Http(make_gateway().http_url)
    ids = [http.create(steps=1, seed=s)["id"] for s in (1, 2, 3)]
    for video_id in ids:
        http.wait(video_id, "completed")
    first = http.call("GET", "/v1/videos?limit=2").json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [v["id"] for v in first["data"]] == [ids[2], ids[1]]
    assert (first["first_id"], first["last_id"]) == (ids[2], ids[1])
    rest = http.call("GET", f"/v1/videos?limit=2&after={first['last_id']}").json()
    assert [v["id"] for v in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert http.call("GET", "/v1/videos").json()["data"][0]["id"] == ids[2]
    for query, param in [("limit=-1", "limit"), ("limit=101", "limit"), ("limit=x", "limit"),
                         ("order=newest", "order"), ("after=zzz", "after")]:
        answer = http.call("GET", f"/v1/videos?{query}")
        assert answer.status == 400 and answer.error["param"] == param, query


def test_cancel_stops_a_running_job_and_keeps_it(make_gateway, denoiser_stage) -> None:
    http = Http(make_gateway(slots=1).http_url)
    long = http.create(steps=LONG)
    http.wait_running(long["id"], min_step=2)
    cancelled = http.call("POST", f"/v1/videos/{long['id']}/cancel")
    assert cancelled.status == 200
    video = cancelled.json()
    assert (video["status"], video["job_status"], video["error"]["code"]) == ("failed", "cancelled", "cancelled")
    assert "/cancel" in video["error"]["message"] and video["step"] < LONG
    assert http.get(long["id"])["job_status"] == "cancelled"
    content = http.call("GET", f"/v1/videos/{long['id']}/content")
    assert content.status == 409 and content.error["code"] == "cancelled"
    wait_for(lambda: denoiser_stage.servicer.engine.active_jobs() == 0, 30, "the request to leave the denoiser")


def test_events_stream_the_queue_place_each_step_then_the_video(make_gateway) -> None:
    http = Http(make_gateway(slots=1).http_url)
    long = http.create(steps=LONG)
    http.wait_running(long["id"])
    waiting = http.create(steps=4, seed=9)
    assert (waiting["status"], waiting["queue_position"], waiting["queue_length"]) == ("queued", 1, 1)

    events = http.events(waiting["id"])
    name, data = next(events)
    assert (name, data["status"], data["queue_position"], data["queue_length"]) == ("queued", "queued", 1, 1)
    http.call("DELETE", f"/v1/videos/{long['id']}")
    rest = list(events)                                  # ends by itself after the last event
    names = [n for n, _ in rest]
    assert names[-1] == "completed" and names.count("completed") == 1
    assert [d["step"] for n, d in rest if n == "progress"] == [1, 2, 3, 4]
    assert [d["stage"] for n, d in rest if n == "stage"] == ["text_encoder", "denoiser", "decoder"]
    percents = [d["progress"] for n, d in rest if n in ("stage", "progress")]
    assert percents == sorted(percents) and percents[-1] == 99
    final = rest[-1][1]
    assert (final["id"], final["status"], final["progress"], final["object"]) == (waiting["id"], "completed", 100,
                                                                                  "video")

    replay = list(http.events(waiting["id"]))           # an ended job: just its end
    assert [n for n, _ in replay] == ["completed"]


def test_a_full_queue_is_a_429_with_retry_after(make_gateway) -> None:
    http = Http(make_gateway(slots=1, max_queue=1).http_url)
    long = http.create(steps=LONG)
    http.wait_running(long["id"])
    http.create(steps=1)
    refused = http.call("POST", "/v1/videos", {"prompt": "one more", **SMALL})
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.error["type"] == "rate_limit_error" and refused.error["code"] == "resource_exhausted"
    assert f"retry in about {refused.headers['Retry-After']} s" in refused.error["message"]
    assert len(http.call("GET", "/v1/videos").json()["data"]) == 2          # refused jobs leave no row
    http.call("DELETE", f"/v1/videos/{long['id']}")


def test_api_keys_guard_everything_but_the_page_and_healthz(make_gateway, monkeypatch) -> None:
    monkeypatch.setenv("T2V_API_KEYS", "k-right, k-second")
    base = make_gateway().http_url
    for path in ("/v1/videos", f"/v1/videos/{uuid.uuid4().hex}", "/openapi.json", "/nowhere"):
        missing = Http(base).call("GET", path)
        assert missing.status == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert "needs an API key" in missing.error["message"] and missing.error["type"] == "authentication_error"
        wrong = Http(base, "k-wrong").call("GET", path)
        assert wrong.status == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
        assert "not valid" in wrong.error["message"]
    assert Http(base, "k-wrong").call("POST", "/v1/videos", {"prompt": "x"}).status == 401
    assert Http(base, "k-right").call("GET", "/v1/videos").status == 200
    assert Http(base).call("GET", "/v1/videos", headers={"X-API-Key": "k-second"}).status == 200
    video = Http(base, "k-right").create(steps=1)
    assert Http(base, "k-right").wait(video["id"], "completed")["progress"] == 100
    assert Http(base, "k-second").call("GET", f"/v1/videos/{video['id']}").status == 404   # another key's
    assert Http(base).call("GET", "/").status == 200
    assert Http(base).call("GET", "/healthz").status == 200


def test_openapi_healthz_and_the_page(make_gateway) -> None:
    gateway = make_gateway(max_frames=24)
    http = Http(gateway.http_url)
    spec = http.call("GET", "/openapi.json")
    assert spec.status == 200 and spec.headers["Content-Type"] == "application/json"
    doc = spec.json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content",
            "/v1/videos/{video_id}/events", "/healthz"} <= set(doc["paths"])
    assert set(doc["paths"]["/v1/videos"]) == {"get", "post"} and "delete" in doc["paths"]["/v1/videos/{video_id}"]
    schemas = doc["components"]["schemas"]
    body = schemas["CreateVideoRequest"]
    assert body["required"] == ["prompt"] and body["additionalProperties"] is False
    assert body["properties"]["num_frames"]["maximum"] == 24                   # this gateway's --max-frames
    assert body["properties"]["priority"]["enum"] == ["low", "normal", "high"]
    assert body["properties"]["scheduler"]["enum"] == ["ddim", "dpmsolver++"]
    assert schemas["Video"]["properties"]["status"]["enum"] == ["queued", "in_progress", "completed", "failed"]
    assert all(p.get("description") for name, p in schemas["Video"]["properties"].items()
               if name in ("progress", "status", "queue_position", "seed"))
    post = doc["paths"]["/v1/videos"]["post"]
    assert set(post["requestBody"]["content"]) >= {"application/json", "multipart/form-data"}
    assert "429" in post["responses"] and "video/mp4" in str(doc["paths"]["/v1/videos/{video_id}/content"])

    assert http.call("GET", "/healthz").json() == {"status": "serving"}
    page = http.call("GET", "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"<video" in page.body and b"/v1/videos" in page.body
    assert not re.search(rb'(src|href)="(https?:)?//', page.body)            # self-contained: no CDN

    dead = Http(make_gateway(decoder=f"127.0.0.1:{free_port()}").http_url).call("GET", "/healthz")
    assert dead.status == 503 and "not SERVING" in dead.error["message"]


def test_the_form_variant_openai_sdks_send(make_gateway) -> None:
    """OpenAI's SDKs POST multipart/form-data with every value a string (seconds as "4")."""
    http = Http(make_gateway().http_url)
    boundary = "t2vboundary"
    fields = {"prompt": "a cat", "model": "sora-2", "seconds": "0.25", "size": "32x32",
              "num_inference_steps": "1", "seed": "4"}
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                   for k, v in fields.items()) + f"--{boundary}--\r\n"
    request = urllib.request.Request(http.base + "/v1/videos", data=body.encode(), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        video = json.loads(response.read())
    assert (video["num_frames"], video["fps"], video["seconds"], video["model"]) == (2, 8, "0.25", "t2v-world")
    assert http.wait(video["id"], "completed")["seed"] == 4


def test_a_client_that_leaves_an_event_stream_unsubscribes(make_gateway) -> None:
    gateway = make_gateway(slots=1)
    http = Http(gateway.http_url)
    long = http.create(steps=LONG)
    http.wait_running(long["id"])
    jobs = gateway.servicer.jobs
    events = http.events(long["id"])
    assert next(events)[0] in ("stage", "progress")
    assert len(jobs._watchers.get(long["id"], [])) == 1
    events.close()                                        # closes the connection
    wait_for(lambda: not jobs._watchers.get(long["id"]), 10, "the stream's watch to be closed")
    http.call("DELETE", f"/v1/videos/{long['id']}")
