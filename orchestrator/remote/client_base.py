"""What every role client shares: the answer types, the channel (auth, TLS, reconnect), one
retried unary call with its deadline, GetInfo, and the check of a ragged float answer.

`orchestrator.remote.clients` builds the four role clients on `RoleClient`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from orchestrator.remote.retry import RetryPolicy, ServiceError, call_with_retries
from orchestrator.run.config import Endpoint
from quartet.v1 import common_pb2
from services.common.channel import open_channel
from services.common.codec import RaggedTensor, decode_ragged
from services.common.errors import QuartetError
from services.common.shm_weights import is_local_address
from services.common.weights import SharedWeightsWriter

log = logging.getLogger("quartet.orchestrator.clients")

# A log-probability is <= 0; this much above it is float error of a log-softmax, not a bad answer.
LOGPROB_SLACK = 1e-4


@dataclass(frozen=True)
class ServiceInfo:
    """What GetInfo reported."""

    role: str
    identity: str
    model_path: str
    backend: str
    tokenizer_fingerprint: str
    weight_version: int
    vocab_size: int
    last_step_id: int
    max_batch_sequences: int = 0  # Limits.max_batch_sequences (0: not reported); replicas are balanced by it
    queue_depth: int = 0  # calls the service reported waiting (extra["queue_depth"]; 0: none or not reported)


@dataclass(frozen=True)
class Samples:
    """Generate's answer, prompt-major: sample k = i * n + j is sample j of prompt i."""

    completion_ids: list[list[int]]  # [P * n] rows of sampled token ids
    logprobs: list[list[float]]  # [P * n] raw-policy logprobs aligned with completion_ids
    finished: list[bool]  # [P * n] True if the sample stopped on EOS / a stop token
    texts: list[str]  # [P * n] decoded completions
    weight_version: int


@dataclass(frozen=True)
class Scores:
    rewards: torch.Tensor  # [B] float32, finite
    failed: list[bool]  # [B] verifier failures (scored with the failure reward)
    identity: str


@dataclass(frozen=True)
class ValueTrainResult:
    loss: float
    clipfrac: float
    explained_variance: float
    grad_norm: float
    duplicate: bool
    steps_trained: int
    last_step_id: int


@dataclass(frozen=True)
class WeightSync:
    version: int
    tensors: int
    bytes: int
    seconds: float
    transport: str = "grpc"  # "shm": same-host shared memory; "grpc": the UpdateWeights chunk stream


class WeightTransport:
    """How a GeneratorClient sends weights (services.generator.weights_transport) and what happened so far.

    "auto" tries shared memory when the generator's address is on this host, after a probe showed it
    can open this process's segment; the first refusal or failure is logged once, counted in
    `fallbacks`, and every later update takes the gRPC stream. "shm" never falls back; "grpc" never tries.
    """

    def __init__(self, mode: str, address: str) -> None:
        if mode not in ("auto", "grpc", "shm"):
            raise ValueError(f"weights_transport {mode!r}: use auto, grpc or shm")
        self.mode = mode
        self.local = is_local_address(address)
        self.probed = False
        self.fallbacks = 0  # updates that went over the stream after shared memory failed
        self.refusal: str | None = None
        self.writer = SharedWeightsWriter()

    def wants_shm(self) -> bool:
        return self.mode == "shm" or (self.mode == "auto" and self.local and self.refusal is None)

    def fall_back(self, reason: str, service: str) -> None:
        self.fallbacks += 1
        if self.refusal is None:
            log.warning("%s: shared-memory weights refused or failed, sending them as the gRPC stream from now on: "
                        "%s", service, reason)
        self.refusal = reason
        self.writer.close()


# A restarted service comes back on the same address: cap gRPC's reconnect backoff (default: up to
# 120 s) so the channel finds it within a couple of seconds rather than after the retry budget.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000))


def _channel(ep: Endpoint, *, admin: bool) -> grpc.Channel:
    token = ep.admin_call_token() if admin else ep.call_token()
    root = Path(ep.tls_ca).read_bytes() if ep.tls_ca else None
    cert = Path(ep.tls_client_cert).read_bytes() if ep.tls_client_cert else None
    key = Path(ep.tls_client_key).read_bytes() if ep.tls_client_key else None
    if not isinstance(ep.address, str):
        raise ValueError(f"one client per address, got {ep.address!r}: orchestrator.remote.discovery builds replica sets")
    options = RECONNECT_OPTIONS
    if ep.tls_server_name:  # a replica dialled by IP presents the certificate of its Service's name
        options = (*options, ("grpc.ssl_target_name_override", ep.tls_server_name))
    return open_channel(ep.address, token=token, root_cert=root, client_cert=cert, client_key=key, options=options)


class RoleClient:
    role = "service"

    def __init__(self, ep: Endpoint, *, deadline_s: float, info_deadline_s: float = 10.0, name: str | None = None,
                 retry: RetryPolicy | None = None):
        self.endpoint = ep
        self.retry = retry or RetryPolicy()
        self.name = name or f"{self.role} at {ep.address}"
        self.deadline_s = deadline_s
        self.info_deadline_s = info_deadline_s
        self._channel = _channel(ep, admin=False)
        separate_admin = ep.admin_call_token() != ep.call_token()
        self._admin_channel = _channel(ep, admin=True) if separate_admin else self._channel

    def _call(self, method, request, *, call: str, timeout: float | None = None, retry: bool = True):
        """One unary RPC with its deadline, retried per the policy when `retry` (the call is safe to repeat)."""
        return self._retrying(lambda: method(request, timeout=timeout or self.deadline_s), call=call, retry=retry)

    def _retrying(self, attempt, *, call: str, retry: bool = True, recover=None):
        policy = self.retry if retry else RetryPolicy(max_attempts=1)
        return call_with_retries(attempt, policy=policy, service=self.name, call=call, recover=recover)

    def _fail(self, call: str, problem: str) -> ServiceError:
        return ServiceError(self.name, call, problem)

    def _info(self, stub, *, retry: bool = True) -> ServiceInfo:
        m = self._call(stub.GetInfo, common_pb2.GetInfoRequest(), call="GetInfo", timeout=self.info_deadline_s,
                       retry=retry)
        if m.vocab_size < 0:
            raise self._fail("GetInfo", f"vocab_size {m.vocab_size} is negative")
        if m.last_step_id < -1:
            raise self._fail("GetInfo", f"last_step_id {m.last_step_id} is below -1 (-1: no step applied)")
        return ServiceInfo(
            role=m.role, identity=m.identity or f"{m.role}/{m.backend}@{self.endpoint.address}", model_path=m.model_path,
            backend=m.backend, tokenizer_fingerprint=m.tokenizer_fingerprint, weight_version=int(m.weight_version),
            vocab_size=int(m.vocab_size), last_step_id=int(m.last_step_id),
            max_batch_sequences=max(0, int(m.limits.max_batch_sequences)), queue_depth=_queue_depth(m.extra),
        )

    def _rows(self, msg, *, call: str, field: str, lengths: Sequence[int], logprobs: bool = False) -> list[torch.Tensor]:
        """Decode a float32 Ragged and check one finite row per sequence of the expected length
        (with `logprobs`, every value also <= 0 up to float error)."""
        try:
            ragged = decode_ragged(msg, field=field, dtypes=(torch.float32,), rows=len(lengths))
        except QuartetError as e:
            raise self._fail(call, f"malformed {field}: {e}") from None
        got = ragged.lengths.tolist()
        if got != list(lengths):
            bad = next(i for i, (a, b) in enumerate(zip(got, lengths, strict=True)) if a != b)
            raise self._fail(call, f"{field} row {bad} has {got[bad]} entries, expected {lengths[bad]} (one per response token)")
        values = ragged.values
        if not bool(torch.isfinite(values).all()):
            raise self._fail(call, f"{field} holds non-finite values")
        if logprobs and bool((values > LOGPROB_SLACK).any()):
            raise self._fail(call, f"{field} holds values above 0 (max {float(values.max()):.3g}; a log-probability is <= 0)")
        return [r.clone() for r in RaggedTensor(values, ragged.offsets).rows()]

    def close(self) -> None:
        transport = getattr(self, "weight_transport", None)
        if isinstance(transport, WeightTransport):
            transport.writer.close()
        self._channel.close()
        if self._admin_channel is not self._channel:
            self._admin_channel.close()



def _queue_depth(extra: Mapping[str, str]) -> int:
    """GetInfo's extra["queue_depth"]: a load hint, so a missing or malformed one counts as an idle service."""
    text = extra.get("queue_depth", "0")
    return max(0, int(text)) if text.isdigit() else 0


def check_tokenizers(infos: Mapping[str, ServiceInfo], *, trainer_fingerprint: str | None = None) -> None:
    """Refuse a run whose generator, reference, value (and trainer) disagree on what token ids mean."""
    prints = {name: i.tokenizer_fingerprint for name, i in infos.items() if i.tokenizer_fingerprint}
    if trainer_fingerprint:
        prints["trainer (models.policy)"] = trainer_fingerprint
    if len(set(prints.values())) > 1:
        listing = ", ".join(f"{k}={v[:12]}" for k, v in prints.items())
        raise ServiceError(
            "run", "GetInfo",
            f"tokenizer fingerprints disagree ({listing}): serve the same tokenizer in every role "
            "(models.policy, models.reference and models.value must share one tokenizer)",
        )
