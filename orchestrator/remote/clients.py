"""Typed clients of the four roles: the only orchestrator module that sees protobuf.

Each wrapper encodes plain Python/torch inputs, calls with the role's deadline, and checks what
comes back before anything reaches the update: wrong counts, wrong shapes, non-finite numbers and
token ids outside the vocabulary raise `ServiceError` naming the service and the call. Calls that are
safe to repeat are retried by `orchestrator.remote.retry.call_with_retries` (every method goes through
`RoleClient._call`, in client_base.py; Save and Load are not retried).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import grpc
import torch

from orchestrator.remote.client_base import (
    LOGPROB_SLACK,
    RECONNECT_OPTIONS,
    RoleClient,
    Samples,
    Scores,
    ServiceInfo,
    ValueTrainResult,
    WeightSync,
    WeightTransport,
    check_tokenizers,
)
from orchestrator.remote.retry import ServiceError
from orchestrator.run.config import Endpoint
from quartet.v1 import (
    common_pb2,
    generator_pb2,
    generator_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    value_pb2,
    value_pb2_grpc,
)
from services.common.codec import decode_ragged, decode_tensor, encode_ragged
from services.common.errors import QuartetError

log = logging.getLogger("quartet.orchestrator.clients")

_STOP, _LENGTH = generator_pb2.FINISH_REASON_STOP, generator_pb2.FINISH_REASON_LENGTH
_FINISH_REASONS = frozenset({_STOP, _LENGTH})

__all__ = [
    "LOGPROB_SLACK",
    "RECONNECT_OPTIONS",
    "GeneratorClient",
    "ReferenceClient",
    "RewardClient",
    "RoleClient",
    "Samples",
    "Scores",
    "ServiceError",
    "ServiceInfo",
    "ValueClient",
    "ValueTrainResult",
    "WeightSync",
    "WeightTransport",
    "check_tokenizers",
]


def _sequences(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> common_pb2.SequenceBatch:
    rows = [torch.tensor([*p, *c], dtype=torch.int64) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    return common_pb2.SequenceBatch(token_ids=encode_ragged(rows, torch.int64), response_start=[len(p) for p in prompt_ids])


# Statuses that say shared memory cannot carry weights to this generator (UNIMPLEMENTED: an older one;
# UNKNOWN: the segment failed inside the request stream), and the fields naming the handle (or a checksum:
# bytes changed in shared memory, which the stream re-sends from the tensors themselves).
_SHM_CODES = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
_SHM_FIELDS = (": segment", ": shared_memory_weights", ": probe", "].crc32: ")


def _shm_unusable(err: ServiceError) -> bool:
    if err.code in _SHM_CODES:
        return True
    return err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION) and any(
        f in err.problem for f in _SHM_FIELDS)


class GeneratorClient(RoleClient):
    role = "generator"

    def __init__(self, ep: Endpoint, *, deadline_s: float, weights_deadline_s: float,
                 weights_transport: str | None = None, **kw) -> None:
        super().__init__(ep, deadline_s=deadline_s, **kw)
        self.weights_deadline_s = weights_deadline_s
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)
        self._admin = generator_pb2_grpc.GeneratorStub(self._admin_channel)
        self.vocab_size: int | None = None
        self.weight_transport = WeightTransport(weights_transport or getattr(ep, "weights_transport", "auto"), ep.address)

    def info(self, *, retry: bool = True) -> ServiceInfo:
        info = self._info(self._stub, retry=retry)
        if info.vocab_size < 1:
            raise self._fail("GetInfo", f"vocab_size {info.vocab_size}: a generator must report its vocabulary size "
                                        "(sampled token ids are checked against it)")
        self.vocab_size = info.vocab_size
        return info

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], *, n: int, temperature: float, top_p: float, top_k: int,
        max_new_tokens: int, stop_token_ids: Sequence[int], seed: int, request_id: str, prompt_index_offset: int = 0,
        stop: Sequence[str] = (),
    ) -> Samples:
        """n samples for each of P prompts; per-sample seeds derive from (seed, prompt_index_offset + prompt, sample)."""
        params = generator_pb2.SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            stop_token_ids=list(stop_token_ids), seed=seed, stop=list(stop),
        )
        req = generator_pb2.GenerateRequest(
            prompt_ids=encode_ragged([torch.tensor(p, dtype=torch.int64) for p in prompt_ids], torch.int64),
            params=params, request_id=request_id, return_text=True, prompt_index_offset=prompt_index_offset,
        )
        resp = self._call(self._stub.Generate, req, call="Generate")
        return self._check_samples(resp, n_prompts=len(prompt_ids), n=n, max_new_tokens=max_new_tokens,
                                   offset=prompt_index_offset)

    def _check_samples(self, resp, *, n_prompts: int, n: int, max_new_tokens: int, offset: int = 0) -> Samples:
        call, b = "Generate", n_prompts * n
        try:
            ids = decode_ragged(resp.completion_ids, field="completion_ids", dtypes=(torch.int64, torch.int32), rows=b)
        except QuartetError as e:
            raise self._fail(call, f"malformed completion_ids, expected {b} samples ({n_prompts} prompts x {n}): {e}") from None
        lengths = ids.lengths.tolist()
        if min(lengths, default=1) < 1 or max(lengths, default=0) > max_new_tokens:
            raise self._fail(call, f"completion_ids row lengths {min(lengths)}..{max(lengths)} outside 1..{max_new_tokens}")
        vocab = self.vocab_size
        if vocab is None:  # without it a token id past the trainer's embedding would pass this check
            raise self._fail(call, "vocabulary size unknown: call info() first (GetInfo.vocab_size)")
        if ids.values.numel() and (int(ids.values.min()) < 0 or int(ids.values.max()) >= vocab):
            raise self._fail(call, f"completion_ids hold token ids outside the vocabulary [0, {vocab}) "
                                   f"(min {int(ids.values.min())}, max {int(ids.values.max())})")
        logprobs = self._rows(resp.logprobs, call=call, field="logprobs", lengths=lengths, logprobs=True)
        if len(resp.finish_reasons) != b:
            raise self._fail(call, f"finish_reasons has {len(resp.finish_reasons)} entries for {b} samples")
        unknown = set(resp.finish_reasons) - _FINISH_REASONS
        if unknown:
            raise self._fail(call, f"finish_reasons holds {sorted(unknown)}, expected STOP ({_STOP}) or LENGTH ({_LENGTH})")
        index = list(resp.prompt_index)
        if offset and index in ([], [k // n for k in range(b)]):
            # Without the offset it sampled prompt i as prompt i: not what one generator gives for the whole batch.
            raise self._fail(call, f"ignored prompt_index_offset={offset} (an older generator): it cannot serve as one "
                                   "of several replicas; upgrade it or give the role a single address")
        if index and index != [offset + k // n for k in range(b)]:
            raise self._fail(call, "samples are not prompt-major (prompt_index disagrees)")
        # Reward services score these texts: a missing one would be scored as an empty completion.
        if len(resp.completion_text) != b:
            raise self._fail(call, f"completion_text has {len(resp.completion_text)} entries for {b} samples "
                                   "(requested with return_text)")
        texts = list(resp.completion_text)
        return Samples(
            completion_ids=[r.long().tolist() for r in ids.rows()],
            logprobs=[r.tolist() for r in logprobs],
            finished=[f == generator_pb2.FINISH_REASON_STOP for f in resp.finish_reasons],
            texts=texts, weight_version=int(resp.weight_version),
        )

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> WeightSync:
        """Send a complete weight set: through shared memory when the generator shares this host (and
        the transport allows), else as the gRPC chunk stream; returns the served version."""
        start = time.perf_counter()
        transport, resp = "grpc", None
        if self.weight_transport.wants_shm():
            resp = self._update_shared(named_tensors, version)
            transport = "shm" if resp is not None else "grpc"
        if resp is None:
            from services.common.weights import push_weights

            def attempt():  # a retry re-sends the whole stream with the same version
                return push_weights(self._admin_channel, named_tensors.items(), version, timeout=self.weights_deadline_s)

            resp = self._retrying(attempt, call="UpdateWeights", recover=self._landed(named_tensors, version))
        if int(resp.version) != version:
            raise self._fail("UpdateWeights", f"serves version {resp.version} after pushing version {version}")
        return WeightSync(int(resp.version), int(resp.tensors_updated), int(resp.bytes_received),
                          time.perf_counter() - start, transport)

    def _landed(self, named_tensors: Mapping[str, torch.Tensor], version: int):
        def landed(err: grpc.RpcError):
            """A retry refused as stale: the earlier attempt landed if the generator serves `version`."""
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION or "already serves version" not in (err.details() or ""):
                return None
            if self.info().weight_version != version:
                return None
            nbytes = sum(t.numel() * t.element_size() for t in named_tensors.values())
            return generator_pb2.UpdateWeightsResponse(version=version, tensors_updated=len(named_tensors),
                                                       bytes_received=nbytes)
        return landed

    def _update_shared(self, named_tensors: Mapping[str, torch.Tensor], version: int):
        """UpdateWeightsShared (probing the segment first); None when the stream must carry this update."""
        from services.common.weights import probe_shared, push_weights_shared

        w, timeout = self.weight_transport, self.weights_deadline_s
        try:
            if not w.probed:
                nbytes = sum(-(-t.numel() * t.element_size() // 64) * 64 for t in named_tensors.values())
                self._retrying(lambda: probe_shared(self._admin_channel, w.writer, nbytes, timeout=timeout),
                               call="UpdateWeightsShared(probe)")
                w.probed = True
            return self._retrying(
                lambda: push_weights_shared(self._admin_channel, w.writer, named_tensors.items(), version,
                                            timeout=timeout),
                call="UpdateWeightsShared", recover=self._landed(named_tensors, version))
        except (ServiceError, OSError, TimeoutError) as e:
            if isinstance(e, ServiceError) and not _shm_unusable(e):
                raise  # down, stalled, or refused what the stream would carry too (a bad tensor, a stale version)
            if w.mode == "shm":
                raise self._fail("UpdateWeightsShared", f"{e}; services.generator.weights_transport is 'shm' (set "
                                                        "'auto' to fall back to the gRPC stream)") from None
            w.fall_back(str(e), self.name)
            return None


class RewardClient(RoleClient):
    role = "reward"

    def __init__(self, ep: Endpoint, *, deadline_s: float, weight: float = 1.0, **kw) -> None:
        super().__init__(ep, deadline_s=deadline_s, **kw)
        self.weight = weight
        self.label: str | None = getattr(ep, "name", None)  # the config's name of this reward (step log, metrics)
        self._stub = reward_pb2_grpc.RewardStub(self._channel)

    def info(self, *, retry: bool = True) -> ServiceInfo:
        return self._info(self._stub, retry=retry)

    def score(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], prompt_text: Sequence[str],
        completion_text: Sequence[str], metadata: Sequence[Mapping[str, str]],
    ) -> Scores:
        b = len(completion_ids)
        req = reward_pb2.ScoreRequest(
            prompt_ids=encode_ragged([torch.tensor(p, dtype=torch.int64) for p in prompt_ids], torch.int64),
            completion_ids=encode_ragged([torch.tensor(c, dtype=torch.int64) for c in completion_ids], torch.int64),
            prompt_text=list(prompt_text), completion_text=list(completion_text),
            metadata=[reward_pb2.Metadata(values=dict(m)) for m in metadata],
        )
        resp = self._call(self._stub.Score, req, call="Score")
        return self._check_scores(resp, b)

    def _check_scores(self, resp, b: int) -> Scores:
        try:
            rewards = decode_tensor(resp.rewards, field="rewards", dtypes=(torch.float32,), ndim=1, copy=True)
        except QuartetError as e:
            raise self._fail("Score", f"malformed rewards: {e}") from None
        if rewards.numel() != b:
            raise self._fail("Score", f"rewards has {rewards.numel()} values for {b} samples")
        if not bool(torch.isfinite(rewards).all()):
            raise self._fail("Score", "rewards holds non-finite values")
        if len(resp.failed) not in (0, b):  # empty: no verifier failures reported
            raise self._fail("Score", f"failed has {len(resp.failed)} entries for {b} samples (send {b} or none)")
        failed = list(resp.failed) or [False] * b
        return Scores(rewards, failed, resp.identity)


class ReferenceClient(RoleClient):
    role = "reference"

    def __init__(self, ep: Endpoint, *, deadline_s: float, **kw) -> None:
        super().__init__(ep, deadline_s=deadline_s, **kw)
        self._stub = reference_pb2_grpc.ReferenceStub(self._channel)

    def info(self, *, retry: bool = True) -> ServiceInfo:
        return self._info(self._stub, retry=retry)

    def logprobs(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """log π_ref of every response token: B rows, row i of length len(completion_ids[i])."""
        req = reference_pb2.LogProbsRequest(sequences=_sequences(prompt_ids, completion_ids))
        resp = self._call(self._stub.LogProbs, req, call="LogProbs")
        return self._rows(resp.logprobs, call="LogProbs", field="logprobs", lengths=[len(c) for c in completion_ids],
                          logprobs=True)


class ValueClient(RoleClient):
    role = "value"

    def __init__(self, ep: Endpoint, *, deadline_s: float, train_deadline_s: float, checkpoint_deadline_s: float, **kw):
        super().__init__(ep, deadline_s=deadline_s, **kw)
        self.train_deadline_s, self.checkpoint_deadline_s = train_deadline_s, checkpoint_deadline_s
        self._stub = value_pb2_grpc.ValueStub(self._channel)
        self._admin = value_pb2_grpc.ValueStub(self._admin_channel)

    def info(self, *, retry: bool = True) -> ServiceInfo:
        return self._info(self._stub, retry=retry)

    def values(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """V(s_t) at every response token: B rows aligned with completion_ids."""
        req = value_pb2.ValuesRequest(sequences=_sequences(prompt_ids, completion_ids))
        resp = self._call(self._stub.Values, req, call="Values")
        return self._rows(resp.values, call="Values", field="values", lengths=[len(c) for c in completion_ids])

    def train_step(
        self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
        returns: Sequence[torch.Tensor], old_values: Sequence[torch.Tensor], mask: Sequence[torch.Tensor] | None,
        clip_range: float | None, step_id: int, epochs: int = 1, minibatch_size: int = 0,
    ) -> ValueTrainResult:
        """One TrainStep with the step id (a retried call is acknowledged, not trained twice)."""
        f32 = torch.float32
        req = value_pb2.TrainStepRequest(
            sequences=_sequences(prompt_ids, completion_ids),
            returns=encode_ragged([r.to(f32) for r in returns], f32),
            old_values=encode_ragged([v.to(f32) for v in old_values], f32),
            step_id=step_id, epochs=epochs, minibatch_size=minibatch_size,
        )
        if mask is not None:
            req.mask.CopyFrom(encode_ragged([m.to(f32) for m in mask], f32))
        if clip_range is not None:
            req.clip_range = clip_range
        r = self._call(self._admin.TrainStep, req, call="TrainStep", timeout=self.train_deadline_s)
        return self._check_train(r)

    def _check_train(self, r) -> ValueTrainResult:
        problems = [
            (not math.isfinite(r.loss), f"loss {r.loss} is not finite"),
            (not 0.0 <= r.clip_fraction <= 1.0, f"clip_fraction {r.clip_fraction} is outside [0, 1]"),
            # NaN is the service's answer for returns without variance; infinities are not.
            (math.isinf(r.explained_variance), f"explained_variance {r.explained_variance} is infinite"),
            (not (math.isfinite(r.grad_norm) and r.grad_norm >= 0), f"grad_norm {r.grad_norm} is not a finite norm"),
            (r.steps_trained < 0, f"steps_trained {r.steps_trained} is negative"),
            (r.last_step_id < -1, f"last_step_id {r.last_step_id} is below -1"),
        ]
        for bad, problem in problems:
            if bad:
                raise self._fail("TrainStep", problem)
        return ValueTrainResult(r.loss, r.clip_fraction, r.explained_variance, r.grad_norm, r.duplicate,
                                int(r.steps_trained), int(r.last_step_id))

    def save(self, name: str) -> str:
        r = self._call(self._admin.Save, value_pb2.SaveRequest(name=name), call="Save", timeout=self.checkpoint_deadline_s,
                       retry=False)
        return r.path

    def load(self, name: str) -> int:
        r = self._call(self._admin.Load, value_pb2.LoadRequest(name=name), call="Load", timeout=self.checkpoint_deadline_s,
                       retry=False)
        return int(r.last_step_id)
