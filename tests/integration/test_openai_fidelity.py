"""The HTTP API against OpenAI's Videos API and vLLM-Omni's /v1/videos (issue 17), over real loopback HTTP in
front of real stage servers, driven with urllib and with OpenAI's own Python SDK as a user would: DELETE deletes
(the video, its MP4, its place in the lists; gRPC DeleteJob and GetJob agree), the list takes OpenAI's
parameters (order asc|desc, after, limit 0-100), /v1/models lists the served model, and OpenAI's endpoints this
gateway does not have answer one clear 501."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx2
import openai
import pytest

from t2v.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import RunningStage, wait_for
from tests.integration.test_http_api import LONG, Http, make_gateway  # noqa: F401 - make_gateway is a fixture

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
