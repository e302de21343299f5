"""The orchestrator's response checks: a bad answer from a service raises ServiceError naming it."""

from __future__ import annotations

import grpc
import pytest
import torch

from orchestrator.remote.clients import GeneratorClient, ServiceError, ServiceInfo, check_tokenizers
from orchestrator.remote.retry import RetryPolicy, call_with_retries
from orchestrator.run.config import Endpoint
from quartet.v1 import generator_pb2
from services.common.codec import encode_ragged


def client() -> GeneratorClient:
    c = GeneratorClient(Endpoint(address="127.0.0.1:1"), deadline_s=1, weights_deadline_s=1)
    c.vocab_size = 10
    return c


def response(ids: list[list[int]], lps: list[list[float]] | None = None, reasons=None, texts=None,
             lp_dtype: torch.dtype = torch.float32) -> generator_pb2.GenerateResponse:
    lps = lps if lps is not None else [[-0.5] * len(r) for r in ids]
    return generator_pb2.GenerateResponse(
        completion_ids=encode_ragged([torch.tensor(r, dtype=torch.int64) for r in ids], torch.int64),
        logprobs=encode_ragged([torch.tensor(r, dtype=torch.float32) for r in lps], lp_dtype),
        finish_reasons=reasons or [generator_pb2.FINISH_REASON_STOP] * len(ids),
        completion_text=texts if texts is not None else ["x" * len(r) for r in ids],
        weight_version=3,
    )


def test_good_response_decodes() -> None:
    s = client()._check_samples(response([[1, 2], [3]]), n_prompts=1, n=2, max_new_tokens=4)
    assert s.completion_ids == [[1, 2], [3]] and s.finished == [True, True] and s.weight_version == 3
    assert s.texts == ["xx", "x"]


def test_token_ids_are_not_checked_blind() -> None:
    """Without GetInfo's vocabulary size there is nothing to check ids against: refuse, do not pass them."""
    c = client()
    c.vocab_size = None
    with pytest.raises(ServiceError, match="vocabulary size unknown"):
        c._check_samples(response([[1, 2], [3]]), n_prompts=1, n=2, max_new_tokens=4)


@pytest.mark.parametrize(
    ("resp", "match"),
    [
        (response([[1, 2]]), "expected 2 samples"),
        (response([[1, 2], [11]]), "outside the vocabulary"),
        (response([[1, 2], [-1]]), "outside the vocabulary"),
        (response([[1, 2], [3]], [[-0.1, float("nan")], [-1.0]]), "non-finite"),
        (response([[1, 2], [3]], [[-0.1], [-1.0, -1.0]]), "logprobs row 0 has 1 entries"),
        (response([[1, 2], [3]], [[0.5, -1.0], [-1.0]]), "above 0"),
        (response([[1, 2, 3, 4, 5], [3]]), "outside 1..4"),
        (response([[1, 2], [3]], lp_dtype=torch.float64), r"logprobs\.values\.dtype"),
        (response([[1, 2], [3]], reasons=[generator_pb2.FINISH_REASON_STOP, 7]), r"finish_reasons holds \[7\]"),
        (response([[1, 2], [3]], reasons=[generator_pb2.FINISH_REASON_UNSPECIFIED] * 2), "finish_reasons holds"),
        (response([[1, 2], [3]], texts=[]), "completion_text has 0 entries for 2"),
    ],
)
def test_bad_generate_response_names_the_service(resp, match) -> None:
    with pytest.raises(ServiceError, match=match) as e:
        client()._check_samples(resp, n_prompts=1, n=2, max_new_tokens=4)
    assert "generator at 127.0.0.1:1" in str(e.value)


def info(fp: str) -> ServiceInfo:
    return ServiceInfo("r", "i", "p", "b", fp, 0, 10, -1)


def test_tokenizer_fingerprints_must_agree() -> None:
    check_tokenizers({"generator": info("a"), "reference": info("a")}, trainer_fingerprint="a")
    with pytest.raises(ServiceError, match=r"fingerprints disagree \(generator=a, reference=b"):
        check_tokenizers({"generator": info("a"), "reference": info("b")})


class _Status(grpc.RpcError):
    """A failed attempt as grpc raises it (code + details)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "boom"


class _Clock:
    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def _failing(codes: list[grpc.StatusCode], result: str = "ok"):
    calls = []

    def attempt() -> str:
        calls.append(1)
        if len(calls) <= len(codes):
            raise _Status(codes[len(calls) - 1])
        return result

    return attempt, calls


def test_backoff_doubles_to_its_cap_with_full_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=0.5, budget_s=100)
    assert [policy.backoff_cap(k) for k in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    clock = _Clock()
    attempt, calls = _failing([grpc.StatusCode.UNAVAILABLE] * 6)
    assert call_with_retries(attempt, policy=policy, service="s", call="C", sleep=clock.sleep,
                             clock=lambda: clock.now) == "ok"
    assert len(calls) == 7 and len(clock.sleeps) == 6
    assert all(0 <= s <= policy.backoff_cap(k + 1) for k, s in enumerate(clock.sleeps))


def test_a_call_cancelled_by_a_stopping_server_is_retried() -> None:
    # gRPC core answers CANCELLED for a call the server had not yet handed to a handler when it shut
    # down (a reward container stopped mid-run); the orchestrator never cancels its own calls.
    attempt, calls = _failing([grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE])
    assert call_with_retries(attempt, policy=RetryPolicy(5, 0.001, 0.001, 10), service="s", call="C") == "ok"
    assert len(calls) == 3


def test_attempts_and_budget_bound_the_retries() -> None:
    clock = _Clock()
    attempt, calls = _failing([grpc.StatusCode.DEADLINE_EXCEEDED] * 100)
    with pytest.raises(ServiceError, match=r"s service, C: DEADLINE_EXCEEDED: boom \(last of 3 attempts.*max_attempts=3"):
        call_with_retries(attempt, policy=RetryPolicy(3, 0.1, 1, 100), service="s", call="C", sleep=clock.sleep,
                          clock=lambda: clock.now)
    assert len(calls) == 3
    clock = _Clock()
    attempt, calls = _failing([grpc.StatusCode.UNAVAILABLE] * 1000)
    with pytest.raises(ServiceError, match=r"budget_s=2\)") as e:
        call_with_retries(attempt, policy=RetryPolicy(1000, 0.5, 0.5, 2), service="s", call="C", sleep=clock.sleep,
                          clock=lambda: clock.now)
    assert clock.now <= 2 and e.value.code == grpc.StatusCode.UNAVAILABLE


def test_recover_is_asked_only_after_an_earlier_attempt_failed() -> None:
    policy = RetryPolicy(5, 0.001, 0.001, 10)
    attempt, _ = _failing([grpc.StatusCode.FAILED_PRECONDITION])
    with pytest.raises(ServiceError, match="FAILED_PRECONDITION"):
        call_with_retries(attempt, policy=policy, service="s", call="C", recover=lambda e: "landed")
    attempt, calls = _failing([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION])
    assert call_with_retries(attempt, policy=policy, service="s", call="C", recover=lambda e: "landed") == "landed"
    assert len(calls) == 2
