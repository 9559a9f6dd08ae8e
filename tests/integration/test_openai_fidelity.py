"""The HTTP API against OpenAI's Videos API and vLLM-Omni's /v1/videos (issue 17), over real loopback HTTP in
front of real stage servers, driven with urllib and with OpenAI's own Python SDK as a user would: DELETE deletes
(the video, its MP4, its place in the lists; gRPC DeleteJob and GetJob agree), the list takes OpenAI's
parameters (order asc|desc, after, limit 0-100), /v1/models lists the served model, and OpenAI's endpoints this
gateway does not have answer one clear 501, vLLM-Omni's field names are taken (JSON and forms), and
POST /v1/videos/sync answers the MP4 itself as vLLM-Omni's does."""

from __future__ import annotations

import http.client as http_client
import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx2
import openai
import pytest

from t2v.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import RunningStage, wait_for
from tests.integration.test_http_api import LONG, Http, frames_of, make_gateway  # noqa: F401 - a fixture

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]


def mp4_of(gateway: RunningStage, video_id: str) -> Path:
    return Path(gateway.servicer.config.state_dir) / "results" / f"{video_id}.mp4"


def completed(http: Http, *seeds: int) -> list[str]:
    ids = [http.create(steps=1, seed=seed)["id"] for seed in seeds]
    for video_id in ids:
        http.wait(video_id, "completed")
    return ids


def sdk(gateway: RunningStage, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.http_url + "/v1", api_key=key, max_retries=0, timeout=60)


# --- DELETE ---------------------------------------------------------------------------------------------
def test_delete_removes_a_completed_video_its_mp4_and_its_place_in_the_lists(make_gateway) -> None:
    gateway = make_gateway()
    http = Http(gateway.http_url)
    older, video_id, newer = completed(http, 1, 2, 3)
    assert mp4_of(gateway, video_id).is_file()

    answer = http.call("DELETE", f"/v1/videos/{video_id}")
    assert answer.status == 200 and answer.json() == {"id": video_id, "object": "video.deleted", "deleted": True}
    assert not mp4_of(gateway, video_id).exists()
    for method, suffix in [("GET", ""), ("GET", "/content"), ("GET", "/events"), ("DELETE", ""),
                           ("POST", "/cancel")]:
        gone = http.call(method, f"/v1/videos/{video_id}{suffix}")
        assert gone.status == 404, (method, suffix, gone.body)
        assert gone.error["code"] == "not_found" and "was deleted" in gone.error["message"], (method, suffix)
    assert [v["id"] for v in http.call("GET", "/v1/videos").json()["data"]] == [newer, older]
    after = http.call("GET", f"/v1/videos?after={video_id}").json()     # a client deleting as it pages
    assert [v["id"] for v in after["data"]] == [older] and after["has_more"] is False
    assert not http.create(steps=1, seed=2)["cached"]                   # the deleted MP4 answers no one

    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    with pytest.raises(grpc.RpcError) as deleted:
        stub.GetJob(gateway_pb2.GetJobRequest(job_id=video_id), timeout=30)
    assert deleted.value.code() == grpc.StatusCode.NOT_FOUND and "was deleted" in deleted.value.details()
    with pytest.raises(grpc.RpcError) as video:
        list(stub.GetVideo(gateway_pb2.GetVideoRequest(job_id=video_id), timeout=30))
    assert video.value.code() == grpc.StatusCode.NOT_FOUND
    listed = {job.job_id for job in stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=100), timeout=30).jobs}
    assert video_id not in listed and {older, newer} <= listed


def test_delete_of_a_queued_or_running_job_cancels_it_then_deletes_it(make_gateway, denoiser_stage) -> None:
    gateway = make_gateway(slots=1)
    http = Http(gateway.http_url)
    running = http.create(steps=LONG)
    http.wait_running(running["id"], min_step=2)
    queued = http.create(steps=LONG)
    assert queued["status"] == "queued"
    events = http.events(running["id"])
    assert next(events)[0] in ("stage", "progress")

    assert http.call("DELETE", f"/v1/videos/{queued['id']}").json()["deleted"] is True
    assert http.call("DELETE", f"/v1/videos/{running['id']}").json()["deleted"] is True
    name, last = list(events)[-1]                       # the follower sees it end, cancelled, then the stream ends
    assert (name, last["job_status"], last["error"]["code"]) == ("failed", "cancelled", "cancelled")
    assert "DELETE" in last["error"]["message"]
    wait_for(lambda: denoiser_stage.servicer.engine.active_jobs() == 0, 30, "the run to leave the denoiser")
    for video in (running, queued):
        assert http.call("GET", f"/v1/videos/{video['id']}").status == 404
    assert http.call("GET", "/v1/videos").json()["data"] == []
    assert gateway.servicer.jobs.running_count() == 0 and gateway.servicer.jobs.queue_length() == 0


def test_delete_over_grpc_and_another_keys_video(make_gateway, monkeypatch) -> None:
    monkeypatch.setenv("T2V_API_KEYS", "k-alice, k-bob")
    gateway = make_gateway()
    alice, bob = Http(gateway.http_url, "k-alice"), Http(gateway.http_url, "k-bob")
    mine, kept = (alice.create(steps=1, seed=seed)["id"] for seed in (1, 2))
    for video_id in (mine, kept):
        alice.wait(video_id, "completed")
    refused = bob.call("DELETE", f"/v1/videos/{kept}")
    assert refused.status == 404 and "does not exist" in refused.error["message"]      # as an unknown id
    assert alice.get(kept)["job_status"] == "completed" and mp4_of(gateway, kept).is_file()

    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    as_bob, as_alice = [("authorization", "Bearer k-bob")], [("authorization", "Bearer k-alice")]
    with pytest.raises(grpc.RpcError) as other:
        stub.DeleteJob(gateway_pb2.DeleteJobRequest(job_id=mine), metadata=as_bob, timeout=30)
    assert other.value.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in other.value.details()
    answer = stub.DeleteJob(gateway_pb2.DeleteJobRequest(job_id=mine), metadata=as_alice, timeout=30)
    assert (answer.job_id, answer.deleted) == (mine, True) and not mp4_of(gateway, mine).exists()
    with pytest.raises(grpc.RpcError) as twice:
        stub.DeleteJob(gateway_pb2.DeleteJobRequest(job_id=mine), metadata=as_alice, timeout=30)
    assert twice.value.code() == grpc.StatusCode.NOT_FOUND and "was deleted" in twice.value.details()
    with pytest.raises(grpc.RpcError) as cancel:
        stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=mine), metadata=as_alice, timeout=30)
    assert cancel.value.code() == grpc.StatusCode.NOT_FOUND
    gone = alice.call("GET", f"/v1/videos/{mine}")
    assert gone.status == 404 and "was deleted" in gone.error["message"]
    with pytest.raises(grpc.RpcError) as unknown:
        stub.DeleteJob(gateway_pb2.DeleteJobRequest(job_id=uuid.uuid4().hex), metadata=as_alice, timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in unknown.value.details()


# --- the list -------------------------------------------------------------------------------------------
def test_the_list_takes_openais_order_after_and_limit(make_gateway) -> None:
    http = Http(make_gateway().http_url)
    ids = completed(http, 1, 2, 3)
    first = http.call("GET", "/v1/videos?order=asc&limit=2").json()
    assert [v["id"] for v in first["data"]] == ids[:2] and first["has_more"] is True
    assert (first["first_id"], first["last_id"]) == (ids[0], ids[1])
    rest = http.call("GET", f"/v1/videos?order=asc&limit=2&after={first['last_id']}").json()
    assert [v["id"] for v in rest["data"]] == ids[2:] and rest["has_more"] is False
    newest = http.call("GET", f"/v1/videos?order=desc&after={ids[2]}").json()
    assert [v["id"] for v in newest["data"]] == [ids[1], ids[0]]
    none = http.call("GET", "/v1/videos?limit=0")
    assert none.status == 200 and none.json() == {"object": "list", "data": [], "first_id": None, "last_id": None,
                                                  "has_more": True}
    hundred = http.call("GET", "/v1/videos?limit=100&order=asc").json()
    assert [v["id"] for v in hundred["data"]] == ids and hundred["has_more"] is False
    for query, param, words in [("limit=101", "limit", "<= 100"), ("limit=-1", "limit", ">= 0"),
                                ("order=oldest", "order", "'asc' or 'desc'")]:
        answer = http.call("GET", f"/v1/videos?{query}")
        assert answer.status == 400 and answer.error["param"] == param and words in answer.error["message"], query


def test_the_openai_sdk_pages_both_ways_and_deletes(make_gateway) -> None:
    gateway = make_gateway()
    ids = completed(Http(gateway.http_url), 1, 2, 3, 4, 5)
    client = sdk(gateway)
    assert [v.id for v in client.videos.list(order="asc", limit=2)] == ids            # three pages, followed
    assert [v.id for v in client.videos.list(limit=2)] == ids[::-1]
    page = client.videos.list(order="asc", limit=2)
    assert [v.id for v in page.data] == ids[:2] and page.has_more

    deleted = client.videos.delete(ids[2])
    assert (deleted.id, deleted.deleted, deleted.object) == (ids[2], True, "video.deleted")
    with pytest.raises(openai.NotFoundError, match="was deleted"):
        client.videos.retrieve(ids[2])
    with pytest.raises(openai.NotFoundError, match="was deleted"):
        client.videos.download_content(ids[2])
    with pytest.raises(openai.NotFoundError, match="was deleted"):
        client.videos.delete(ids[2])
    assert [v.id for v in client.videos.list(order="asc", limit=2)] == ids[:2] + ids[3:]
    empty = client.videos.list(limit=0)
    assert empty.data == [] and empty.has_more is True
    assert client.videos.retrieve(ids[0]).status == "completed"


# --- the model ------------------------------------------------------------------------------------------
def test_the_served_model_in_openais_models_shape(make_gateway) -> None:
    gateway = make_gateway()
    http = Http(gateway.http_url)
    listed = http.call("GET", "/v1/models")
    assert listed.status == 200
    models = listed.json()
    assert models["object"] == "list" and len(models["data"]) == 1
    model = models["data"][0]
    assert set(model) == {"id", "object", "created", "owned_by"}
    assert (model["id"], model["object"], model["owned_by"]) == ("t2v-world", "model", "t2v-mesh")
    index = Path(gateway.servicer.config.model) / "model_index.json"
    assert model["created"] == int(index.stat().st_mtime)
    assert http.call("GET", "/v1/models/t2v-world").json() == model
    assert http.create(steps=1)["model"] == model["id"]
    for unknown in ("sora-2", "damo-vilab/text-to-video-ms-1.7b"):
        missing = http.call("GET", f"/v1/models/{unknown}")
        assert missing.status == 404 and missing.error["code"] == "not_found"
        assert unknown in missing.error["message"] and "'t2v-world'" in missing.error["message"]

    client = sdk(gateway)
    assert [m.id for m in client.models.list()] == ["t2v-world"]
    assert client.models.retrieve("t2v-world").owned_by == "t2v-mesh"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("sora-2")


# --- what OpenAI has and this gateway does not ----------------------------------------------------------
def test_openais_other_video_endpoints_answer_one_clear_501(make_gateway) -> None:
    gateway = make_gateway()
    http = Http(gateway.http_url)
    video_id = completed(http, 1)[0]
    for method, path, body, named in [
            ("POST", f"/v1/videos/{video_id}/remix", {"prompt": "now in blue"}, "POST /v1/videos/{id}/remix"),
            ("POST", "/v1/videos/edits", {"prompt": "now in blue", "video": {"id": video_id}}, "/v1/videos/edits"),
            ("POST", "/v1/videos/extensions", {"prompt": "and on", "video": {"id": video_id}}, "/v1/videos/extensions"),
            ("POST", "/v1/videos/characters", None, "POST /v1/videos/characters"),
            ("GET", "/v1/videos/characters/char_123", None, "GET /v1/videos/characters/{id}"),
            ("GET", f"/v1/videos/{video_id}/content?variant=thumbnail", None, "variant=thumbnail"),
            ("GET", f"/v1/videos/{video_id}/content?variant=spritesheet", None, "variant=spritesheet")]:
        answer = http.call(method, path, body)
        assert answer.status == 501, (method, path, answer.status, answer.body)
        assert answer.headers["x-should-retry"] == "false"
        error = answer.error
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "unimplemented", None)
        assert named in error["message"] and "not supported by this gateway" in error["message"], path
        assert "POST /v1/videos" in error["message"] or "variant=video" in error["message"], path
    assert http.call("GET", f"/v1/videos/{video_id}/content?variant=video").status == 200
    assert http.call("GET", f"/v1/videos/{video_id}/content?variant=gif").status == 400        # not OpenAI's either

    sent: list[str] = []
    client = openai.OpenAI(base_url=gateway.http_url + "/v1", api_key="unused", timeout=60,      # retries as shipped
                           http_client=httpx2.Client(event_hooks={"request": [lambda r: sent.append(r.url.path)]}))
    with pytest.raises(openai.APIStatusError) as remix:
        client.videos.remix(video_id, prompt="now in blue")
    assert remix.value.status_code == 501 and "remix" in remix.value.message
    assert sent == [f"/v1/videos/{video_id}/remix"]                     # asked once: x-should-retry: false
    with pytest.raises(openai.APIStatusError) as thumbnail:
        client.videos.download_content(video_id, variant="thumbnail")
    assert thumbnail.value.status_code == 501 and len(sent) == 2


# --- vLLM-Omni's names and its synchronous endpoint ------------------------------------------------------
def form(fields: dict[str, str], boundary: str = "t2vform") -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body as vLLM-Omni's clients send one (every value a string)."""
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                   for name, value in fields.items()) + f"--{boundary}--\r\n"
    return body.encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_raw(http: Http, path: str, body: bytes, headers: dict[str, str]) -> Any:
    request = urllib.request.Request(http.base + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


VLLM_FIELDS = {"prompt": "a red ball", "width": 32, "height": 16, "num_frames": 3, "fps": 6,
               "num_inference_steps": 2, "guidance_scale": 7.5, "negative_prompt": "blurry", "seed": 11}


def test_vllm_omnis_field_names_in_json_and_in_a_form(make_gateway, caplog) -> None:
    gateway = make_gateway()
    http = Http(gateway.http_url)
    marker = "end-user-" + uuid.uuid4().hex[:8]
    with caplog.at_level("INFO", logger="gateway.http"):
        as_json = http.call("POST", "/v1/videos", {**VLLM_FIELDS, "user": marker, "model": "t2v-world"})
        status, _, raw = post_raw(http, "/v1/videos", *form({**{k: str(v) for k, v in VLLM_FIELDS.items()},
                                                              "seed": "12", "user": marker}))
    assert as_json.status == 200 and status == 200, (as_json.body, raw)
    for video in (as_json.json(), json.loads(raw)):
        assert (video["size"], video["width"], video["height"], video["num_frames"], video["fps"]) == \
            ("32x16", 32, 16, 3, 6)
        assert (video["num_inference_steps"], video["guidance_scale"], video["negative_prompt"]) == \
            (2, 7.5, "blurry")
        assert "user" not in video and marker not in json.dumps(video)
        http.wait(video["id"], "completed")
    assert (as_json.json()["seed"], json.loads(raw)["seed"]) == (11, 12)
    logged = [r.getMessage() for r in caplog.records if "event=video_user" in r.getMessage()]
    assert len(logged) == 2 and all(marker in line and "job_id=" in line for line in logged)
    stored = b"".join(p.read_bytes() for p in Path(gateway.servicer.config.state_dir).glob("jobs.sqlite3*"))
    assert marker.encode() not in stored                                   # logged, never stored

    agreeing = http.call("POST", "/v1/videos", {**VLLM_FIELDS, "size": "32x16"})
    assert agreeing.status == 200 and agreeing.json()["size"] == "32x16"
    only_width = http.call("POST", "/v1/videos", {"prompt": "x", "width": 16, "num_frames": 1,
                                                  "num_inference_steps": 1})
    assert only_width.status == 200 and only_width.json()["size"] == f"16x{only_width.json()['height']}"
    for body, param, words in [({**VLLM_FIELDS, "size": "32x32"}, "height", "two different sizes"),
                               ({**VLLM_FIELDS, "size": "16x16"}, "width", "two different sizes"),
                               ({**VLLM_FIELDS, "width": "32"}, "width", "whole number"),       # JSON is typed
                               ({**VLLM_FIELDS, "width": 0}, "width", "between 1 and"),
                               ({**VLLM_FIELDS, "height": 20}, "height", "multiple of 8"),
                               ({**VLLM_FIELDS, "user": 7}, "user", "must be a string")]:
        answer = http.call("POST", "/v1/videos", body)
        assert answer.status == 400 and answer.error["param"] == param and words in answer.error["message"], body
    status, _, raw = post_raw(http, "/v1/videos", *form({"prompt": "x", "width": "32", "size": "16x16"}))
    assert status == 400 and json.loads(raw)["error"]["param"] == "width"
    twice = (b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
             b"--b\r\nContent-Disposition: form-data; name=\"width\"\r\n\r\n32\r\n"
             b"--b\r\nContent-Disposition: form-data; name=\"width\"\r\n\r\n16\r\n--b--\r\n")
    status, _, raw = post_raw(http, "/v1/videos", twice, {"Content-Type": "multipart/form-data; boundary=b"})
    assert status == 400 and "more than once" in json.loads(raw)["error"]["message"]


def test_sync_answers_the_mp4_itself_as_vllm_omni_does(make_gateway) -> None:
    gateway = make_gateway(slots=1)
    http = Http(gateway.http_url)
    status, headers, mp4 = post_raw(http, "/v1/videos/sync", *form({k: str(v) for k, v in VLLM_FIELDS.items()}))
    assert status == 200 and headers["Content-Type"] == "video/mp4" and int(headers["Content-Length"]) == len(mp4)
    assert frames_of(mp4) == [(32, 16)] * 3
    video_id = headers["X-Video-Id"]
    assert headers["X-Request-Id"] == video_id and headers["X-Model"] == "t2v-world" and headers["X-Seed"] == "11"
    assert float(headers["X-Inference-Time-S"]) > 0
    video = http.get(video_id)                                 # an ordinary job: listed, fetched, deletable
    assert (video["job_status"], video["video_size"]) == ("completed", len(mp4))
    assert http.call("GET", f"/v1/videos/{video_id}/content").body == mp4

    again = http.call("POST", "/v1/videos/sync", VLLM_FIELDS)  # JSON too; the same seed: the cache answers
    assert again.status == 200 and again.body == mp4 and again.headers["X-Video-Id"] != video_id
    assert http.get(again.headers["X-Video-Id"])["cached"] is True

    bad = http.call("POST", "/v1/videos/sync", {"prompt": ""})
    assert bad.status == 400 and bad.error["param"] == "prompt" and "X-Video-Id" not in bad.headers

    long = http.create(steps=LONG)                             # holds the only slot
    http.wait_running(long["id"])
    late = http.call("POST", "/v1/videos/sync", {**VLLM_FIELDS, "seed": 99, "timeout_seconds": 0.5})
    assert late.status == 504 and late.error["code"] == "deadline_exceeded" and "deadline" in late.error["message"]
    assert http.get(late.headers["X-Video-Id"])["job_status"] == "failed"
    http.call("DELETE", f"/v1/videos/{long['id']}")


def test_a_sync_client_that_goes_away_cancels_its_job(make_gateway, denoiser_stage) -> None:
    gateway = make_gateway(slots=1)
    http = Http(gateway.http_url)
    host, port = gateway.http_url.removeprefix("http://").rsplit(":", 1)
    connection = http_client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"prompt": "a long one", "num_inference_steps": LONG, "num_frames": 2, "size": "32x32"})
    connection.request("POST", "/v1/videos/sync", body, {"Content-Type": "application/json"})
    running = wait_for(lambda: [v for v in http.call("GET", "/v1/videos").json()["data"]
                                if v["job_status"] == "running" and v["step"] >= 1], 60, "the sync job to run")
    connection.close()                                         # the client gives up
    cancelled = http.wait(running[0]["id"], "cancelled", timeout=30)
    assert "went away" in cancelled["error"]["message"]
    wait_for(lambda: denoiser_stage.servicer.engine.active_jobs() == 0, 30, "the run to leave the denoiser")
