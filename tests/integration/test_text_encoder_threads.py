"""The text encoder called from many gRPC threads at once, as the server does under load.

Why: the fast tokenizer keeps its padding and truncation settings in state that every call rewrites;
before ``TextEncoder`` serialised its tokenizer calls, ``report`` (no padding) racing ``encode``
(padding to 77) failed about one Encode in a thousand with a ValueError (found by the load test,
tests/e2e/test_load.py). Without the lock this test fails most runs; with it, never.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [["", "a cat"], ["", "a red ball bouncing on green grass"], ["", "a very long prompt " * 30],
           ["blurry", "a dog running on a beach at sunset, cinematic"]]


def run_in_threads(work, count: int) -> None:
    """``work(i)`` on ``count`` threads at once, to the end; fails if a call hangs."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "an encode call hangs"


def test_concurrent_encode_and_report_give_the_single_threaded_answers(text_encoder_stage):
    encoder = text_encoder_stage.servicer.encoder
    expected = [(encoder.encode(p).clone(), encoder.report(p)) for p in PROMPTS]
    failures: list[str] = []

    def work(index: int) -> None:
        for round_ in range(150):
            which = (index + round_) % len(PROMPTS)
            try:
                embeddings, reports = encoder.encode(PROMPTS[which]), encoder.report(PROMPTS[which])
            except Exception as error:  # noqa: BLE001 - collected, asserted below
                failures.append(f"thread {index} round {round_}: {error!r}"[:300])
                continue
            if not torch.allclose(embeddings, expected[which][0], atol=1e-5) or reports != expected[which][1]:
                failures.append(f"thread {index} round {round_}: prompts {which} gave another answer")

    run_in_threads(work, 8)
    assert failures == [], f"{len(failures)} of 1200 calls went wrong, e.g. {failures[:3]}"


def test_concurrent_encode_calls_over_grpc_share_forwards_and_each_gets_its_own_rows(text_encoder_stage):
    """Calls that arrive while a forward runs share the next one (services/text_encoder/batcher.py): every
    call still gets the rows it would get alone, and the stage counts fewer forwards than calls."""
    from services.common.tensors import from_proto
    from t2v.v1 import text_encoder_pb2, text_encoder_pb2_grpc

    servicer = text_encoder_stage.servicer
    expected = [servicer.encoder.encode(p).clone() for p in PROMPTS]
    registry = servicer.metrics.registry
    before = {name: registry.get_sample_value(f"t2v_text_encoder_batch_prompts_{name}") or 0.0
              for name in ("count", "sum")}
    failures: list[str] = []
    answered: list[int] = []

    def work(index: int) -> None:
        stub = text_encoder_pb2_grpc.TextEncoderStub(text_encoder_stage.channel())
        for round_ in range(20):
            which = (index + round_) % len(PROMPTS)
            answer = stub.Encode(text_encoder_pb2.EncodeRequest(prompts=PROMPTS[which]), timeout=60)
            answered.append(which)
            if not torch.allclose(from_proto(answer.embeddings), expected[which], rtol=1e-4, atol=1e-5):
                failures.append(f"thread {index} round {round_}: prompts {which} gave another answer")

    run_in_threads(work, 8)
    assert failures == [] and len(answered) == 160, failures[:3]
    forwards = registry.get_sample_value("t2v_text_encoder_batch_prompts_count") - before["count"]
    prompts = registry.get_sample_value("t2v_text_encoder_batch_prompts_sum") - before["sum"]
    assert prompts == 2 * 160                                # every prompt encoded once
    assert forwards < 160, "no two of 160 concurrent calls shared a forward"


def test_a_call_with_no_deadline_is_answered(text_encoder_stage):
    """grpcurl without -max-time, a stub called without a timeout: gRPC reports the time remaining as about
    1e9 s, which a wait cannot be given (it was INTERNAL with an OverflowError, every time)."""
    from t2v.v1 import text_encoder_pb2, text_encoder_pb2_grpc

    stub = text_encoder_pb2_grpc.TextEncoderStub(text_encoder_stage.channel())
    answer = stub.Encode(text_encoder_pb2.EncodeRequest(prompts=["a cat", "a very long prompt " * 30]))
    assert [p.truncated for p in answer.prompts] == [False, True]
