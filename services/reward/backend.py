"""The reward backend interface, the batch it scores, and the checks every batch goes through.

A backend (rule, plugin, model) implements `compute(batch) -> RewardResult`. Callers use
`score(batch)`, which checks the request against the backend's needs and limits, calls `compute`,
then checks the result: one finite reward per sample, one failed flag per sample, token rewards
aligned with the completion ids. A backend that breaks that contract raises `BackendError`
(INTERNAL) naming the backend; the service stays up and answers the next call. Nothing here
imports protobuf: the servicer converts messages to a `RewardBatch`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.errors import BackendError, InvalidArgument

# Rewards are usually in [-1, 1] (rules: 0/1); reward models reach a few units either side.
REWARD_BUCKETS = (-10, -5, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1, 2, 5, 10)

#: Request fields, by their proto names.
FIELDS = ("prompt_ids", "completion_ids", "prompt_text", "completion_text", "metadata")


@dataclass(frozen=True)
class RewardBatch:
    """B samples to score. Fields not sent are filled (empty strings, rows, dicts) and left out of `present`."""

    prompt_text: list[str]                # [B] prompts as text
    completion_text: list[str]            # [B] completions as text
    prompt_ids: list[torch.Tensor]        # [B] int64 rows [P_i]
    completion_ids: list[torch.Tensor]    # [B] int64 rows [T_i]
    metadata: list[dict[str, str]]        # [B] dataset columns, e.g. {"answer": "71"}
    present: frozenset[str] = field(default_factory=frozenset)  # which of FIELDS the request sent
    want_token_rewards: bool = False

    def __len__(self) -> int:
        return len(self.completion_text)

    @classmethod
    def build(cls, *, prompt_text: Sequence[str] = (), completion_text: Sequence[str] = (),
              prompt_ids: Sequence[torch.Tensor] | None = None,
              completion_ids: Sequence[torch.Tensor] | None = None,
              metadata: Sequence[dict[str, str]] = (), want_token_rewards: bool = False) -> RewardBatch:
        """Assemble a batch from the fields a request sent (ids: None = not sent; text/metadata: empty = not sent).

        Every sent field must have the same number of entries B, else InvalidArgument naming the odd
        field: B is the length most sent fields agree on (ties: the largest), so the field named is
        the one that disagrees, and the message lists every length.
        """
        given: dict[str, Sequence[object]] = {}
        for name, value in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids),
                            ("prompt_text", prompt_text), ("completion_text", completion_text),
                            ("metadata", metadata)):
            if value is not None and (len(value) or name.endswith("_ids")):
                given[name] = value
        lengths = [len(v) for v in given.values()]
        b = max(lengths, key=lambda n: (lengths.count(n), n), default=0)
        for name, value in given.items():
            if len(value) != b:
                sizes = ", ".join(f"{n}={len(v)}" for n, v in given.items())
                raise InvalidArgument(name, f"has {len(value)} entries but the batch has {b} ({sizes}); every "
                                            "field sent must have one entry per sample")
        empty = torch.empty(0, dtype=torch.int64)
        return cls(
            prompt_text=list(prompt_text) or [""] * b,
            completion_text=list(completion_text) or [""] * b,
            prompt_ids=list(prompt_ids) if prompt_ids is not None else [empty] * b,
            completion_ids=list(completion_ids) if completion_ids is not None else [empty] * b,
            metadata=[dict(m) for m in metadata] or [{} for _ in range(b)],
            present=frozenset(given),
            want_token_rewards=want_token_rewards,
        )


@dataclass(frozen=True)
class RewardResult:
    """What a backend returns for a batch of B samples."""

    rewards: torch.Tensor | Sequence[float]          # [B] one finite reward per sample
    failed: Sequence[bool]                           # [B] True where scored with the failure reward
    token_rewards: Sequence[torch.Tensor] | None = None  # [B] float rows [T_i] aligned with completion_ids


class RewardMetrics:
    """The reward role's own metrics, on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.value = Histogram("quartet_reward_value", "Rewards given (failed samples excluded), by backend kind.",
                               ["kind"], buckets=REWARD_BUCKETS, registry=registry)
        # Negative buckets make prometheus_client drop the histogram's _sum, so the mean is its own gauge.
        self.batch_mean = Gauge("quartet_reward_batch_mean", "Mean reward of the last scored batch (failed samples "
                                "excluded), by backend kind.", ["kind"], registry=registry)
        self.samples = Counter("quartet_reward_samples", "Samples scored, by backend kind.", ["kind"],
                               registry=registry)
        self.failed = Counter("quartet_reward_failed_samples", "Samples scored with the failure reward, by "
                              "kind and reason (timeout, verifier_error, worker_crash).", ["kind", "reason"],
                              registry=registry)
        self.timeouts = Counter("quartet_reward_timeouts", "Samples whose verifier or plugin ran past the "
                                "per-sample timeout.", ["kind"], registry=registry)
        self.errors = Counter("quartet_reward_errors", "Errors: a Score call failed by the backend (reason "
                              "plugin_error, plugin_crash, invalid_output) or a sample whose verifier raised "
                              "or crashed (verifier_error, worker_crash).", ["kind", "reason"], registry=registry)
        self.restarts = Counter("quartet_reward_worker_restarts", "Worker processes killed or lost and "
                                "replaced, by reason (timeout, crash).", ["reason"], registry=registry)


class RewardBackend(ABC):
    """Scores batches. Subclasses set `kind`, `identity`, `requires` and implement `compute`."""

    kind: str = ""
    #: Names this scorer in GetInfo, responses and errors, e.g. "rule:arithmetic", "plugin:mod:fn".
    identity: str = ""
    #: Request fields the backend reads; a request without one gets INVALID_ARGUMENT.
    requires: frozenset[str] = frozenset({"completion_text"})
    #: Metadata keys every sample must carry (e.g. the reference answer).
    required_metadata: tuple[str, ...] = ()

    def __init__(self, metrics: RewardMetrics, *, max_batch: int) -> None:
        self.metrics = metrics
        self.max_batch = max_batch

    @abstractmethod
    def compute(self, batch: RewardBatch) -> RewardResult:
        """Rewards for a batch that passed `check_batch`."""

    def info(self) -> dict[str, str]:
        """Facts for GetInfo: model_path, dtype, device, tokenizer_fingerprint, and extra entries."""
        return {}

    def close(self) -> None:  # noqa: B027 - an optional hook; most backends hold nothing to release
        """Release worker processes or models."""

    def error(self, reason: str, message: str) -> BackendError:
        """A BackendError naming this backend, counted under `reason`."""
        self.metrics.errors.labels(self.kind, reason).inc()
        return BackendError(f"reward backend {self.identity}: {message}")

    def score(self, batch: RewardBatch) -> tuple[torch.Tensor, list[bool], list[torch.Tensor] | None]:
        """Checked scoring: rewards float32 [B], failed [B], token rewards ([B] rows) or None."""
        self.check_batch(batch)
        result = self.compute(batch)
        rewards, failed, token_rewards = self.check_result(result, batch)
        self.metrics.samples.labels(self.kind).inc(len(batch))
        hist = self.metrics.value.labels(self.kind)
        scored = [r for r, f in zip(rewards.tolist(), failed, strict=True) if not f]
        for r in scored:
            hist.observe(r)
        if scored:
            self.metrics.batch_mean.labels(self.kind).set(sum(scored) / len(scored))
        return rewards, failed, token_rewards

    def check_batch(self, batch: RewardBatch) -> None:
        """InvalidArgument for an empty or oversized batch, a missing field or metadata key."""
        b = len(batch)
        if b == 0:
            raise InvalidArgument("completion_text", "empty batch: send at least one sample")
        if b > self.max_batch:
            raise InvalidArgument("completion_text", f"{b} samples exceed max_batch={self.max_batch}; split the "
                                  "call or raise options.max_batch")
        for name in sorted(self.requires - batch.present):
            raise InvalidArgument(name, f"required by reward backend {self.identity} but not sent")
        for key in self.required_metadata:
            for i, m in enumerate(batch.metadata):
                if key not in m:
                    raise InvalidArgument(f"metadata[{i}]", f"missing key {key!r} needed by {self.identity} "
                                          "(the reference answer; see options.answer_key)")

    def check_result(self, result: RewardResult, batch: RewardBatch
                     ) -> tuple[torch.Tensor, list[bool], list[torch.Tensor] | None]:
        """Normalise a backend's result; BackendError (INTERNAL) naming the backend if it is malformed."""
        b = len(batch)
        try:
            rewards = torch.as_tensor(result.rewards, dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise self.error("invalid_output", f"rewards are not numbers ({type(e).__name__}: {e})") from e
        if rewards.numel() != b:
            raise self.error("invalid_output", f"returned {rewards.numel()} rewards for {b} samples")
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        if bad:
            raise self.error("invalid_output", f"returned non-finite rewards at samples {bad[:8]} "
                             f"({[rewards[i].item() for i in bad[:8]]})")
        failed = [bool(f) for f in result.failed]
        if len(failed) != b:
            raise self.error("invalid_output", f"returned {len(failed)} failed flags for {b} samples")
        token_rewards = None
        if result.token_rewards is not None and batch.want_token_rewards:
            token_rewards = self._check_token_rewards(result.token_rewards, batch)
        return rewards, failed, token_rewards

    def _check_token_rewards(self, rows: Sequence[torch.Tensor], batch: RewardBatch) -> list[torch.Tensor]:
        if len(rows) != len(batch):
            raise self.error("invalid_output", f"returned {len(rows)} token reward rows for {len(batch)} samples")
        out = []
        for i, (row, ids) in enumerate(zip(rows, batch.completion_ids, strict=True)):
            r = torch.as_tensor(row, dtype=torch.float32).reshape(-1)
            if r.numel() != ids.numel():
                raise self.error("invalid_output", f"token rewards of sample {i} have {r.numel()} entries, "
                                 f"its completion_ids {ids.numel()}")
            if not bool(torch.isfinite(r).all()):
                raise self.error("invalid_output", f"token rewards of sample {i} are not all finite")
            out.append(r)
        return out

