"""The records the loop passes around: the run's services, its state across restarts, one step's result,
the phase timer and the sampling seed of a step."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.remote.clients import GeneratorClient, ReferenceClient, RewardClient, ValueClient
from orchestrator.run.data import Cursor

if TYPE_CHECKING:
    from orchestrator.step.pipeline import Pending


@dataclass
class Services:
    """Clients of the four roles for one run."""

    generator: GeneratorClient
    rewards: list[RewardClient]
    reference: ReferenceClient | None
    value: ValueClient | None

    def close(self) -> None:
        for c in filter(None, (self.generator, *self.rewards, self.reference, self.value)):
            c.close()


@dataclass(frozen=True)
class RunState:
    """What the run must remember across a restart (besides weights and optimizer)."""

    step: int = 0  # completed steps
    cursor: Cursor = field(default_factory=Cursor)
    weight_version: int = 0  # version the generator serves
    pending: Pending | None = None  # pipelined rollouts: the next step's prompts and samples, drawn already


@dataclass(frozen=True)
class StepResult:
    """One completed step: its step-log line and metric values."""

    step: int  # 1-based number of the completed step
    metrics: dict[str, float]
    phases: dict[str, float]  # phase -> seconds
    rewards: dict[str, float]  # mean / std / min / max of the total reward
    reward_services: dict[str, float]  # identity -> weight of each reward service used
    generated_tokens: int
    recovery: dict[str, int] = field(default_factory=dict)  # rejoin actions during the step (absent: none)
    reward_components: dict[str, float] = field(default_factory=dict)  # identity -> mean of its unweighted rewards

    def log_line(self) -> str:
        line: dict[str, Any] = {"step": self.step, **self.metrics, "phases": self.phases, "reward": self.rewards,
                                "reward_services": self.reward_services, "generated_tokens": self.generated_tokens,
                                "reward_components": self.reward_components}
        if self.recovery:
            line["recovery"] = self.recovery
        return json.dumps(line, sort_keys=True)


def sampling_seed(run_seed: int, step: int) -> int:
    """The Generate seed of a step: sample j of prompt i is then drawn from (this seed, i, j)."""
    digest = hashlib.blake2b(f"quartet-sampling:{run_seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _timed(fn: Callable, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
