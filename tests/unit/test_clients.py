"""The orchestrator's response checks: a bad answer from a service raises ServiceError naming it."""

from __future__ import annotations

import pytest
import torch

from orchestrator.clients import GeneratorClient, ServiceError, ServiceInfo, check_tokenizers
from orchestrator.config import Endpoint
from quartet.v1 import generator_pb2
from services.common.codec import encode_ragged


def client() -> GeneratorClient:
    c = GeneratorClient(Endpoint(address="127.0.0.1:1"), deadline_s=1, weights_deadline_s=1)
    c.vocab_size = 10
    return c


def response(ids: list[list[int]], lps: list[list[float]] | None = None, reasons=None) -> generator_pb2.GenerateResponse:
    lps = lps if lps is not None else [[-0.5] * len(r) for r in ids]
    return generator_pb2.GenerateResponse(
        completion_ids=encode_ragged([torch.tensor(r, dtype=torch.int64) for r in ids], torch.int64),
        logprobs=encode_ragged([torch.tensor(r, dtype=torch.float32) for r in lps], torch.float32),
        finish_reasons=reasons or [generator_pb2.FINISH_REASON_STOP] * len(ids),
        weight_version=3,
    )


def test_good_response_decodes() -> None:
    s = client()._check_samples(response([[1, 2], [3]]), n_prompts=1, n=2, max_new_tokens=4)
    assert s.completion_ids == [[1, 2], [3]] and s.finished == [True, True] and s.weight_version == 3


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
