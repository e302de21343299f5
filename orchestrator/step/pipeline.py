"""Where a step's prompts and samples come from: drawn when the step starts (synchronous), or sampled
while the previous step trained (pipelined, one step off-policy: `rollout.pipeline`).

Pipelined: as soon as step k has its samples, Generate for step k+1 (its prompts, its seed) is sent on a
background thread, and runs while step k scores (reward, reference, values) and updates the policy. Step k
pushes its new weights only once that Generate has answered (`settle`): no request straddles a weight
swap, so step k+1's samples come from exactly the weights before step k's update, staleness exactly 1,
and a pipelined run is as reproducible as a synchronous one. (Letting the push overlap the sampling would
save the sync time per step at the price of samples from either version, by timing.) The update corrects
for the staleness (decoupled PPO with truncated importance weights, rl/offpolicy.py). The version stamp on
every answer is checked: one more than `rollout.max_staleness` versions behind, or newer than the run's
weights (a generator that restarted and serves other weights), is discarded and the step samples again
synchronously through WeightKeeper.generate, which re-sends the weights first.

The prefetched samples are run state: a checkpoint written after step k holds step k+1's data cursor and
samples (`Pending`), so a resume trains on exactly the samples the uninterrupted run would have. A
checkpoint left after a failure holds none; the resumed run samples its first step synchronously.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.remote.clients import Samples, ServiceError
from orchestrator.run.config import RunConfig
from orchestrator.run.data import Cursor, PromptRow, PromptStream
from orchestrator.step.records import PhaseTimer, sampling_seed
from orchestrator.step.recovery import RecoveryLog, WeightKeeper

log = logging.getLogger("quartet.orchestrator")


@dataclass(frozen=True)
class Drawn:
    """One step's prompts and samples."""

    rows: list[PromptRow]
    prompts: list[list[int]]  # [P] prompt token ids
    samples: Samples  # [P * G] prompt-major
    cursor: Cursor  # the data cursor after these prompts
    staleness: int  # weight versions between the weights that sampled and the weights the step trains


@dataclass(frozen=True)
class Pending:
    """The prefetched rollout of step `step`: prompts drawn from `cursor`, and their samples."""

    step: int  # 0-based step the samples are for
    cursor: Cursor  # the data cursor its prompts were drawn from
    samples: Samples
    # Versions between the sampling weights and the checkpoint's policy. Kept apart from the version stamp:
    # a resumed run numbers the versions it pushes afresh (the generator may have restarted meanwhile).
    behind: int

    def to_state(self) -> dict[str, Any]:
        """Plain data for a checkpoint (floats round-trip exactly)."""
        return {"step": self.step, "cursor": asdict(self.cursor), "samples": asdict(self.samples),
                "behind": self.behind}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Pending:
        return cls(int(state["step"]), Cursor(**state["cursor"]), Samples(**state["samples"]), int(state["behind"]))


@dataclass
class _Ahead:
    step: int
    cursor: Cursor
    future: Future[Samples]
    behind: int | None = None  # restored from a checkpoint: its staleness then (else: from the version stamp)


class RolloutSource:
    """Draws each step's prompts and samples, synchronously or pipelined (see the module doc).

    `pending`: the prefetched rollout a resumed checkpoint holds (None: none).
    """

    def __init__(self, cfg: RunConfig, prompts: PromptStream, tokenizer: Any, weights: WeightKeeper,
                 recovery: RecoveryLog, *, pending: Pending | None = None) -> None:
        self.cfg, self.prompts, self.tokenizer, self.weights, self.recovery = cfg, prompts, tokenizer, weights, recovery
        self.pipelined = cfg.rollout.pipeline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quartet-prefetch")
        self._ahead: _Ahead | None = None
        self._last: tuple[int, Cursor, Drawn] | None = None  # the last draw, returned again to a redo
        if pending is not None and self.pipelined:  # a synchronous run trains on samples of its own weights
            done: Future[Samples] = Future()
            done.set_result(pending.samples)
            self._ahead = _Ahead(pending.step, pending.cursor, done, pending.behind)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _prompts(self, cursor: Cursor) -> tuple[list[PromptRow], list[list[int]], Cursor]:
        self.prompts.cursor = cursor
        rows = self.prompts.next_batch(self.cfg.prompts_per_step)
        return rows, [r.token_ids(self.tokenizer) for r in rows], self.prompts.cursor

    def draw(self, step: int, cursor: Cursor, timer: PhaseTimer) -> Drawn:
        """Step `step`'s prompts from `cursor` and their samples: the prefetched ones when they fit, else
        sampled now (seeded by the run seed and the step: a redo gets the same samples)."""
        if self._last is not None and self._last[:2] == (step, cursor):
            return self._last[2]  # a rollout redone after a service rejoined trains on the same samples
        rows, prompts, after = self._prompts(cursor)
        samples, staleness = self._take_ahead(step, cursor, timer)
        if samples is None:
            s = self.cfg.sampling
            with timer("generate"):
                samples = self.weights.generate(prompts, n=self.cfg.samples_per_prompt, sampling=s,
                                                seed=sampling_seed(self.cfg.seed, step), step=step)
        drawn = Drawn(rows, prompts, samples, after, staleness)
        self._last = (step, cursor, drawn)
        return drawn

    def _take_ahead(self, step: int, cursor: Cursor, timer: PhaseTimer) -> tuple[Samples | None, int]:
        """The prefetched samples of `step` and their staleness, if drawn from `cursor` and recent enough."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or (ahead.step, ahead.cursor) != (step, cursor):
            if ahead is not None:
                ahead.future.cancel()
            return None, 0
        with timer("generate"):  # only the wait: the sampling itself ran during the previous step
            try:
                samples = ahead.future.result()
            except ServiceError as err:
                log.warning("step %d: the prefetched Generate failed (%s); sampling now", step + 1, err)
                self.recovery.count("prefetch_failures")
                return None, 0
        lag = self.weights.version - samples.weight_version if ahead.behind is None else ahead.behind
        if not 0 <= lag <= self.cfg.rollout.max_staleness:
            log.warning("step %d: prefetched samples of weight version %d, the run trains version %d (bound: %d "
                        "behind); sampling again", step + 1, samples.weight_version, self.weights.version,
                        self.cfg.rollout.max_staleness)
            self.recovery.count("stale_rollouts")
            return None, 0
        return samples, lag

    def prefetch(self, step: int, cursor: Cursor) -> None:
        """Pipelined: send step `step`'s Generate now, from `cursor`, to run during the current step's update."""
        if not self.pipelined or step >= self.cfg.steps:
            return
        if self._ahead is not None and (self._ahead.step, self._ahead.cursor) == (step, cursor):
            return  # sent already (the current step's rollout is being redone)
        if self._ahead is not None:
            self._ahead.future.cancel()
        _, prompts, _ = self._prompts(cursor)
        s, gen = self.cfg.sampling, self.weights.generator
        # The generator directly, not WeightKeeper.generate: only this thread pushes weights.
        future = self._executor.submit(
            gen.generate, prompts, n=self.cfg.samples_per_prompt, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k, max_new_tokens=s.max_new_tokens, stop_token_ids=s.stop_token_ids,
            seed=sampling_seed(self.cfg.seed, step), request_id=f"step-{step}", stop=s.stop)
        self._ahead = _Ahead(step, cursor, future)

    def settle(self) -> None:
        """Pipelined: wait until the prefetched Generate has answered, before the weights it must not see are
        pushed (a failure is dealt with when the step takes the samples)."""
        if self._ahead is not None:
            wait([self._ahead.future])

    def pending(self, step: int) -> Pending | None:
        """For a checkpoint after `step` completed steps: the prefetched rollout of step `step`, waited for."""
        ahead = self._ahead
        if ahead is None or ahead.step != step:
            return None
        started = time.perf_counter()
        try:
            samples = ahead.future.result()
        except ServiceError:
            return None  # the step will sample again; the checkpoint need not wait for the generator
        log.debug("checkpoint waited %.3f s for the prefetched rollout", time.perf_counter() - started)
        behind = self.weights.version - samples.weight_version if ahead.behind is None else ahead.behind
        if not 0 <= behind <= self.cfg.rollout.max_staleness:
            return None  # the step will sample again anyway
        return Pending(step, ahead.cursor, samples, behind)
