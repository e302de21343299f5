"""What a step does when a service fails (issue 7), kept out of the loop so the loop reads like the algorithm.

Everything up to the policy update can be redone: Generate is seeded, Score, LogProbs and Values are
pure, and the critic is reloaded from its last save when it restarted (orchestrator/remote/rejoin.py).
So a service that comes back is brought up to date and the rollout is redone from the step's start
RNG states (`redo_rollout`), giving the same samples. A generator that restarted serves its starting
weights: `WeightKeeper` re-sends the trainer's policy before sampling (before the step's update that
is exactly what the generator should serve). The critic trains before the policy update (its inputs
come from the experience computed before the update, so the math is the same), which leaves only the
weight sync after the update.

When a service stays down past its retry budget, the step leaves a checkpoint of the last consistent
state and raises `StepFailed` (`stopped`): a failure before the update checkpoints the state the step
started from; a failed sync checkpoints the completed step (a resume re-sends the weights first). Such
a fallback checkpoint may refer to the critic's last verified save (`critic_for_checkpoint`).

This module sits with the step, not with the remote roles: it decides what a step redoes and what it
saves given what the step has applied. The per-role mechanics it uses (CriticKeeper, resend_version)
are orchestrator/remote/rejoin.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from orchestrator.remote.clients import GeneratorClient, Samples, ServiceError, WeightSync
from orchestrator.remote.rejoin import MAX_REJOINS, CriticKeeper, Rejoined, ValueSave, resend_version
from orchestrator.run import checkpoint as ckpt
from orchestrator.run.metrics import RunMetrics

if TYPE_CHECKING:
    from orchestrator.run.config import SamplingConfig

log = logging.getLogger("quartet.orchestrator")

T = TypeVar("T")


class StepFailed(ServiceError):
    """A service failed past its retry budget; the run state is saved in `checkpoint` for --resume.

    The message is the ServiceError's (service, call, last status). `checkpoint` is None when there was
    nothing to save (no step completed yet) or the save itself failed (`note` says why).
    """

    def __init__(self, err: ServiceError, *, checkpoint: Path | None, completed_steps: int, note: str = "") -> None:
        super().__init__(err.service, err.call, err.problem, code=err.code)
        self.checkpoint, self.completed_steps, self.note = checkpoint, completed_steps, note


class RecoveryLog:
    """The rejoin actions of the current step (its step-log line's `recovery`), counted in the run's metrics too."""

    def __init__(self, metrics: RunMetrics | None = None) -> None:
        self.metrics = metrics
        self.actions: dict[str, int] = {}

    def new_step(self) -> None:
        self.actions = {}

    def count(self, action: str, n: int = 1) -> None:
        self.actions[action] = self.actions.get(action, 0) + n
        if self.metrics is not None:
            self.metrics.rejoin(action, n)

    def value_reloaded(self, lost: list[int]) -> None:
        """CriticKeeper's on_reload: one reload of the value service, and the TrainStep ids it lost."""
        self.count("value_reloads")
        if lost:
            self.count("value_lost_train_steps", len(lost))


def redo_rollout(rollout: Callable[[], T], *, step: int, start_rng: dict[str, Any], recovery: RecoveryLog) -> T:
    """`rollout()`, redone from the step's start RNG states each time a service came back (Rejoined)."""
    for _ in range(MAX_REJOINS):
        try:
            return rollout()
        except Rejoined as why:
            log.warning("step %d: %s; redoing the step's rollout", step + 1, why)
            recovery.count("rollout_redos")
            ckpt.set_rng_states(start_rng)  # the redo draws what the first attempt drew
    try:
        return rollout()
    except Rejoined as why:
        raise ServiceError("value", "TrainStep", f"{why}; gave up after {MAX_REJOINS} reloads") from None


class WeightKeeper:
    """The weight version the generator serves, kept equal to the trainer's policy across generator restarts.

    `version` is the version the generator last confirmed (an UpdateWeights answer).
    """

    def __init__(self, generator: GeneratorClient, policy: torch.nn.Module, *, version: int,
                 recovery: RecoveryLog) -> None:
        self.generator, self.policy, self.version, self.recovery = generator, policy, version, recovery

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The policy's state dict as the generator names it (tied weights are sent once by push_weights)."""
        return dict(self.policy.state_dict())

    def push(self, version: int) -> WeightSync:
        """Send the policy as `version`; the answer confirms the generator serves it."""
        sync = self.generator.update_weights(self.named_weights(), version)
        self.version = sync.version
        return sync

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, sampling: SamplingConfig, seed: int,
                 step: int) -> Samples:
        """Generate, re-sending the weights first whenever the generator serves other weights (a restart).

        GetInfo before Generate catches a generator that restarted since the last step without a wasted
        Generate; the version stamped on the answer catches one that restarted in between.
        """
        s, gen = sampling, self.generator
        served = gen.info().weight_version
        if served != self.version:
            self._resend(served, step)
        for attempt in range(MAX_REJOINS + 1):
            samples = gen.generate(
                prompts, n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                max_new_tokens=s.max_new_tokens, stop_token_ids=s.stop_token_ids, seed=seed, request_id=f"step-{step}",
                stop=s.stop,
            )
            if samples.weight_version == self.version or attempt == MAX_REJOINS:
                break
            self._resend(samples.weight_version, step)
        if samples.weight_version != self.version:
            raise ServiceError(gen.name, "Generate", f"sampled with weight version {samples.weight_version}, expected "
                               f"{self.version}, after {MAX_REJOINS} re-sends of the weights")
        return samples

    def _resend(self, served: int, step: int) -> None:
        """Push the trainer's policy again: before the update it is exactly what the generator should serve."""
        version = resend_version(self.version, served)
        log.warning("step %d: %s serves weight version %d instead of %d (it restarted): re-sending the "
                    "policy as version %d", step + 1, self.generator.name, served, self.version, version)
        self.push(version)
        self.recovery.count("weight_resends")


def critic_for_checkpoint(critic: CriticKeeper | None, name: str, *, step: int, fallback: bool) -> ValueSave | None:
    """The critic a run checkpoint of `step` completed steps refers to, saved as `name` (CriticKeeper.for_checkpoint).

    `fallback`: a checkpoint left after a failure, which may refer to the last verified save instead.
    """
    if critic is None:
        return None
    # The critic of run state N has applied TrainStep ids up to N - 1.
    return critic.for_checkpoint(name, newest_fit=step - 1, fallback=fallback)


def stopped(err: ServiceError, *, checkpoint: Path, completed_steps: int,
            save: Callable[[], object] | None) -> StepFailed:
    """The StepFailed to raise after `err`, once `save()` has left the checkpoint of the last consistent state.

    `checkpoint`: where that state's checkpoint is; `save` None: there is nothing to write (no step
    completed yet, or that checkpoint is already complete). A save that fails too is noted, not raised.
    """
    note = ""
    try:
        if save is not None:
            save()
    except (ServiceError, OSError) as e:
        note = f"no checkpoint of step {completed_steps} could be written ({e})"
        log.error("%s after %s", note, err)
    done = checkpoint if ckpt.is_complete(checkpoint) else None
    return StepFailed(err, checkpoint=done, completed_steps=completed_steps, note=note)
