"""Retries of service calls: one helper used by every client method.

A call is retried on UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED (the service restarted,
stalled or shed load) and on CANCELLED (see RETRYABLE) with exponential backoff and full jitter (sleep ~ U(0, min(max_backoff,
initial * 2^k)), AWS "Exponential Backoff and Jitter"), until `max_attempts` or until no retry can
start within `budget_s` of the first attempt. Only calls that are safe to repeat go through it:
idempotent reads (Generate with its seed, Score, LogProbs, Values, GetInfo), TrainStep with its step
id (the value service acknowledges a duplicate) and UpdateWeights re-streamed with its version.
Each attempt keeps the call's own deadline. Any other status, or a spent budget, raises
ServiceError naming the service, the call and the last status. Logs carry the service, call, code
and attempt: never a token, never request data.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from orchestrator.run.config import RetryConfig

log = logging.getLogger("quartet.orchestrator.retry")

# CANCELLED is here because the orchestrator never cancels a call it retries, so a CANCELLED it sees
# came from the other side: gRPC core ends a call that reached a server but was not yet handed to a
# handler with CANCELLED, not UNAVAILABLE, when that server shuts down (grpc/grpc#41785). A reward
# container stopped for a swap produced exactly that in a run that must ride through the swap.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})

T = TypeVar("T")


class ServiceError(RuntimeError):
    """A service failed a call or answered something unusable; nothing of it entered the update.

    `code` is the last gRPC status when the failure was a status (None for a bad answer).
    """

    def __init__(self, service: str, call: str, problem: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{service} service, {call}: {problem}")
        self.service, self.call, self.problem, self.code = service, call, problem, code


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long one call is retried (see RetryConfig for the meaning of each field)."""

    max_attempts: int = 1  # 1: no retries (the default of a bare client)
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    budget_s: float = 120.0

    @classmethod
    def from_config(cls, cfg: RetryConfig) -> RetryPolicy:
        return cls(cfg.max_attempts, cfg.initial_backoff_s, cfg.max_backoff_s, cfg.budget_s)

    def backoff_cap(self, retry: int) -> float:
        """Upper bound of the sleep before retry number `retry` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** (retry - 1))


# Private generator: retries must not consume the run's seeded `random` stream (checkpointed RNG state).
_jitter = random.Random()


def call_with_retries(
    attempt: Callable[[], T], *, policy: RetryPolicy, service: str, call: str,
    recover: Callable[[grpc.RpcError], T | None] | None = None,
    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run `attempt()` until it returns, retrying retryable statuses within the policy.

    `recover(err)` is asked about a non-retryable status after an earlier attempt failed (that attempt
    may have landed): a non-None answer is returned as the call's result (UpdateWeights uses it when
    the generator already serves the version it re-sent).
    """
    start = clock()
    n = 0
    while True:
        n += 1
        try:
            return attempt()
        except grpc.RpcError as err:
            code = err.code()
            if code not in RETRYABLE:
                recovered = recover(err) if (recover is not None and n > 1) else None
                if recovered is not None:
                    log.warning("%s service, %s: attempt %d got %s after an earlier attempt failed; "
                                "confirmed the earlier attempt landed", service, call, n, code.name)
                    return recovered
                raise ServiceError(service, call, _status(err, n, clock() - start), code=code) from None
            delay = _jitter.uniform(0.0, policy.backoff_cap(n))
            elapsed = clock() - start
            if n >= policy.max_attempts or elapsed + delay > policy.budget_s:
                limit = (f"max_attempts={policy.max_attempts}" if n >= policy.max_attempts
                         else f"budget_s={policy.budget_s:g}")
                raise ServiceError(service, call, f"{_status(err, n, elapsed)}; retries exhausted "
                                   f"(services.retry.{limit})", code=code) from None
            log.warning("%s service, %s failed with %s (attempt %d of %d); retrying in %.2f s",
                        service, call, code.name, n, policy.max_attempts, delay)
            sleep(delay)


def _status(err: grpc.RpcError, attempts: int, elapsed: float) -> str:
    text = f"{err.code().name}: {err.details()}"
    return text if attempts == 1 else f"{text} (last of {attempts} attempts over {elapsed:.1f} s)"
