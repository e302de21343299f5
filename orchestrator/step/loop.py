"""The training step, top to bottom as in the algorithm (issue 5, steps 1-8).

rollout (Generate) -> score, reference logprobs and values in parallel -> experience (KL, advantages) ->
critic TrainStep -> policy update -> weight broadcast -> metrics, step log, checkpoint. Every formula lives
in rl/ (through build_experience and PolicyTrainer); every RPC in orchestrator/remote/clients.

What a step does when a service fails (redo the rollout, re-send the weights, leave a checkpoint of the
last consistent state and raise StepFailed) is orchestrator/step/recovery.py. A checkpoint is a
`checkpoint.Snapshot` the loop builds and hands to orchestrator/run/checkpoint.save (it only writes files).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from orchestrator.remote.clients import (
    Samples,
    ServiceError,
    ValueTrainResult,
    WeightSync,
)
from orchestrator.remote.rejoin import CriticKeeper, Rejoined
from orchestrator.run import checkpoint as ckpt
from orchestrator.run.config import RunConfig
from orchestrator.run.data import Cursor, PromptRow, PromptStream
from orchestrator.run.metrics import RunMetrics, stop_fractions
from orchestrator.run.reporting import Reporting, metric_names
from orchestrator.step.experience import Experience, Rollout, build_experience
from orchestrator.step.pipeline import RolloutSource
from orchestrator.step.records import PhaseTimer, RunState, Services, StepResult, _timed, sampling_seed
from orchestrator.step.recovery import (
    RecoveryLog,
    StepFailed,
    WeightKeeper,
    critic_for_checkpoint,
    redo_rollout,
    stopped,
)

log = logging.getLogger("quartet.orchestrator")


@dataclass(frozen=True)
class _Scored:
    """Step 3's answers, sample-major (B = prompts x G), and the policy's own log-probs computed meanwhile."""

    prompt_ids: list[list[int]]  # [B] the prompt of each sample
    rewards: torch.Tensor  # [B] weighted sum over reward services
    identities: dict[str, float]  # reward service identity -> weight
    components: dict[str, float]  # reward service identity -> mean of its own (unweighted) rewards
    ref_logprobs: list[torch.Tensor] | None  # [B] rows of log π_ref (None: no reference)
    values: list[torch.Tensor] | None  # [B] rows of V(s_t) (None: no critic)
    policy_logprobs: torch.Tensor | None  # [B, T] log π_θ of the samples; None: the update's forward gives them


@dataclass(frozen=True)
class _StepRollout:
    """Everything of one step up to (not including) the policy update."""

    samples: Samples
    cursor: Cursor  # the data cursor after the step's prompts
    staleness: int  # weight versions between the sampling weights and the trained ones (pipeline.Drawn)
    rewards: torch.Tensor  # [B] weighted sum over reward services
    identities: dict[str, float]
    components: dict[str, float]
    exp: Experience
    value_stats: ValueTrainResult | None


@dataclass
class _Completed:
    """A step whose policy update is done, waiting for its checkpoint and log line."""

    timer: PhaseTimer
    started: float  # perf_counter at the step's start
    stats: Any  # UpdateStats
    rollout: _StepRollout
    sync: WeightSync | None = None


class Orchestrator:
    """Drives the run: owns the policy copy, the trainer, the data cursor and the step log.

    `value_save` names the value checkpoint the value service was just loaded from (resume).
    """

    def __init__(self, cfg: RunConfig, services: Services, *, policy, tokenizer, trainer, prompts: PromptStream,
                 state: RunState, metrics: RunMetrics | None = None, value_save: str | None = None) -> None:
        self.cfg, self.services = cfg, services
        self.policy, self.tokenizer, self.trainer = policy, tokenizer, trainer
        self.prompts, self.metrics, self.reporting = prompts, metrics, Reporting()  # report_to: set by Session
        self._steps_done, self._cursor = state.step, state.cursor
        self.step_log = Path(cfg.run_dir) / "steps.jsonl"
        self.pool = ThreadPoolExecutor(max_workers=2 + len(services.rewards), thread_name_prefix="quartet-call")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.last_log_line: str | None = None  # the line of step `state.step`, when this process logged it
        self.recovery = RecoveryLog(metrics)
        self.weights = WeightKeeper(services.generator, policy, version=state.weight_version,
                                    recovery=self.recovery)
        self.source = RolloutSource(cfg, prompts, tokenizer, self.weights, self.recovery, pending=state.pending)
        self._completed: _Completed | None = None
        self.critic: CriticKeeper | None = None
        if services.value is not None and cfg.uses_value:
            self.critic = CriticKeeper.start(
                services.value, slot_prefix=f"{Path(cfg.run_dir).name}-value-live", loaded=value_save,
                value_interval=cfg.checkpoint.value_interval, on_reload=self.recovery.value_reloaded)

    @property
    def state(self) -> RunState:
        """Completed steps, the data cursor after them, and the weight version the generator serves."""
        return RunState(self._steps_done, self._cursor, self.weights.version)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.source.close()

    def run(self, on_step: Callable[[StepResult], None] | None = None) -> list[StepResult]:
        """Steps until cfg.steps are done (a resumed run continues to the same total)."""
        results = []
        while self._steps_done < self.cfg.steps:
            results.append(self.step())
            if on_step is not None:
                on_step(results[-1])
        return results

    def step(self) -> StepResult:
        """One full RL step. Services that restarted are brought back and the step goes on; one that stays
        down past its retry budget raises StepFailed after a resumable checkpoint is left."""
        start_rng = ckpt.rng_states()
        self.recovery.new_step()
        try:
            return self._step(start_rng)
        except ServiceError as err:
            raise self._stop(err, start_rng) from err

    def _step(self, start_rng: dict[str, Any]) -> StepResult:
        timer, started, step = PhaseTimer(), time.perf_counter(), self._steps_done
        # 1-6. Rollout, scores, experience, critic TrainStep: redone (same seed) if a service came back.
        rollout = redo_rollout(partial(self._rollout, step, timer), step=step, start_rng=start_rng,
                               recovery=self.recovery)
        # 7. The policy update. From here the step counts as done: a failed sync still leaves step + 1.
        with timer("update"):
            stats = self.trainer.update(rollout.exp)
            if rollout.exp.pending:  # its old log-probs, KL and log-prob gap came from the loss forward
                rollout = replace(rollout, exp=rollout.exp.completed(stats.old_logprobs, self.cfg.algorithm))
        self._completed = _Completed(timer, started, stats, rollout)
        self._steps_done, self._cursor = step + 1, rollout.cursor
        # 8. Broadcast the new weights; the answer confirms the generator serves the new version. Pipelined: once
        # the next step's samples are drawn, all of them from the weights before this update.
        if self.source.pipelined:
            with timer("prefetch_wait"):
                self.source.settle()
        with timer("sync"):
            self._completed.sync = self.weights.push(self.weights.version + 1)
        interval = self.cfg.checkpoint.interval
        return self._finish(checkpoint=bool(interval) and self._steps_done % interval == 0)

    def _rollout(self, step: int, timer: PhaseTimer) -> _StepRollout:
        cfg = self.cfg
        if self.critic is not None:
            self.critic.ensure()  # a value service that restarted since the last step is reloaded first

        # 1-2. The next prompts (the cursor moves only when the step completes) and G samples per prompt, seeded
        # by (run seed, step): sampled now, or while the last step trained (rollout.pipeline: orchestrator/step/pipeline.py).
        drawn = self.source.draw(step, self._cursor, timer)
        self.source.prefetch(step + 1, drawn.cursor)  # pipelined: the next step samples during this one's update
        rows, prompts, samples = drawn.rows, drawn.prompts, drawn.samples

        # 3. In parallel: every reward service, reference logprobs, critic values.
        scored = self._score(rows, prompts, samples, timer)

        # 4-5. KL and advantages (build_experience) from the policy as it was sampled.
        rollout = Rollout(
            prompt_ids=scored.prompt_ids, completion_ids=samples.completion_ids, generator_logprobs=samples.logprobs,
            rewards=scored.rewards, ref_logprobs=scored.ref_logprobs, values=scored.values,
            group_size=cfg.samples_per_prompt, finished=samples.finished,
        )
        with timer("update"):
            exp = build_experience(rollout, self.policy, cfg.algorithm, pad_token_id=self.pad_token_id,
                                   policy_logprobs=scored.policy_logprobs, from_update=scored.policy_logprobs is None)

        # 6. The critic trains itself on the returns, once per step id, then is saved at its interval.
        value_stats = self._train_critic(step, rollout, exp, timer)
        return _StepRollout(samples, drawn.cursor, drawn.staleness, scored.rewards, scored.identities,
                            scored.components, exp, value_stats)

    def _score(self, rows: list[PromptRow], prompts: list[list[int]], samples: Samples, timer: PhaseTimer) -> _Scored:
        """Step 3: every reward service, reference logprobs and critic values at once, on the pool."""
        cfg, svc, g = self.cfg, self.services, self.cfg.samples_per_prompt
        completions = samples.completion_ids
        prompt_ids = [prompts[k // g] for k in range(len(completions))]
        texts = [rows[k // g].text for k in range(len(completions))]
        meta = [rows[k // g].metadata for k in range(len(completions))]
        score_futures = [self.pool.submit(_timed, r.score, prompt_ids, completions, texts, samples.texts, meta)
                         for r in svc.rewards]
        ref_future = (self.pool.submit(_timed, svc.reference.logprobs, prompt_ids, completions)
                      if svc.reference is not None and cfg.uses_reference else None)
        val_future = (self.pool.submit(_timed, svc.value.values, prompt_ids, completions)
                      if svc.value is not None and cfg.uses_value else None)
        # Meanwhile the trainer's forward on the samples (the services and the trainer share the cores): their
        # log-probs, or None when the update's loss forward gives those (then that forward, kept for the update).
        with timer("policy_forward"):
            policy_lp = self.trainer.forward_samples(prompt_ids, completions, pad_token_id=self.pad_token_id)
        rewards = torch.zeros(len(completions))
        identities: dict[str, float] = {}
        components: dict[str, float] = {}
        for client, fut in zip(svc.rewards, score_futures, strict=True):
            scores, secs = fut.result()
            timer.seconds["score"] = max(timer.seconds.get("score", 0.0), secs)
            rewards += client.weight * scores.rewards
            key = getattr(client, "label", None) or scores.identity or client.name  # label: the config's reward name
            identities[key], components[key] = client.weight, float(scores.rewards.mean())
        ref_logprobs = values = None
        if ref_future is not None:
            ref_logprobs, timer.seconds["reference"] = ref_future.result()
        if val_future is not None:
            values, timer.seconds["values"] = val_future.result()
        return _Scored(prompt_ids, rewards, identities, components, ref_logprobs, values, policy_lp)

    def _train_critic(self, step: int, rollout: Rollout, exp: Experience, timer: PhaseTimer) -> ValueTrainResult | None:
        """Step 6: one value TrainStep with id `step` (idempotent), and the critic's save at its interval."""
        value = self.services.value
        if self.critic is None or value is None:
            return None
        with timer("value_train"):
            returns, old_values, mask = self.trainer.value_train_inputs(exp)
            stats = value.train_step(
                rollout.prompt_ids, rollout.completion_ids, returns=returns, old_values=old_values, mask=mask,
                clip_range=self.cfg.algorithm.value_clip, step_id=step,
            )
            self.critic.trained(step, stats)
            every = self.cfg.checkpoint.value_interval
            if every and (step + 1) % every == 0 and self.critic.save() is None:
                raise Rejoined("the value service restarted while the critic was being saved")
        return stats

    def _finish(self, *, checkpoint: bool, fallback: bool = False) -> StepResult:
        """Checkpoint (when asked) and log the completed step; a checkpoint comes first so a logged step is durable.

        The checkpoint carries the step's line too: a crash between the two leaves the line to the resume.
        `fallback`: a checkpoint left after a failure (see recovery.critic_for_checkpoint).
        """
        done = self._completed
        assert done is not None
        if checkpoint:
            line = self._result(done).log_line()
            with done.timer("checkpoint"):
                self.save_checkpoint(log_line=line, fallback=fallback)
        result = self._result(done)
        self._log(result)
        self._completed = None
        return result

    def _stop(self, err: ServiceError, start_rng: dict[str, Any]) -> StepFailed:
        """Leave a checkpoint of the last consistent state after `err`; returns the error to raise."""
        path = self.cfg.checkpoint_dir / ckpt.step_name(self._steps_done)
        save = None
        if self._completed is not None:  # the policy moved: finish the step (its sync or checkpoint failed)
            save = partial(self._finish, checkpoint=True, fallback=True)
        elif self._steps_done > 0 and not ckpt.is_complete(path):  # nothing applied: the step's start state
            save = partial(self.save_checkpoint, log_line=self.last_log_line, rng=start_rng, fallback=True)
        return stopped(err, checkpoint=path, completed_steps=self._steps_done, save=save)

    def snapshot(self, *, log_line: str | None, rng: dict[str, Any] | None = None,
                 fallback: bool = False) -> ckpt.Snapshot:
        """The run state as of now, for a checkpoint; the critic it refers to is saved first (Value.Save)."""
        s = self.state
        name = f"{Path(self.cfg.run_dir).name}-{ckpt.step_name(s.step)}"
        value = critic_for_checkpoint(self.critic, name, step=s.step, fallback=fallback)
        return ckpt.Snapshot(
            step=s.step, cursor=s.cursor, weight_version=s.weight_version, policy=self.policy, tokenizer=self.tokenizer,
            trainer_state=self.trainer.state_dict() if hasattr(self.trainer, "state_dict") else None,
            rng=rng if rng is not None else ckpt.rng_states(),
            value_checkpoint=value.name if value else None,
            value_last_step_id=value.state.last_step_id if value else None,
            log_line=log_line, config=self.cfg,
            # A failure's checkpoint keeps no prefetched samples: the resumed run samples its first step anew.
            pending_rollout=None if fallback else _state_of(self.source.pending(s.step)),
        )

    def save_checkpoint(self, *, log_line: str | None, rng: dict[str, Any] | None = None,
                        fallback: bool = False) -> Path:
        """Checkpoint the run state (see snapshot) into cfg.checkpoint_dir; returns its path.

        `log_line`: the step-log line of the state's step. `rng`: the RNG states to store (default: now; a
        checkpoint left by a failed step stores those of the step's start).
        """
        snap = self.snapshot(log_line=log_line, rng=rng, fallback=fallback)
        return ckpt.save(self.cfg.checkpoint_dir, snap, keep=self.cfg.checkpoint.keep)

    def _result(self, done: _Completed) -> StepResult:
        r, sync, seconds = done.rollout, done.sync, time.perf_counter() - done.started
        samples, exp = r.samples, r.exp
        n_tokens = sum(len(c) for c in samples.completion_ids)
        metrics = done.stats.as_dict()
        if r.value_stats is not None:
            metrics.update(value_loss=r.value_stats.loss, value_clipfrac=r.value_stats.clipfrac,
                           value_explained_variance=r.value_stats.explained_variance)
        metrics.update(logprob_gap_mean=exp.logprob_gap.mean, logprob_gap_max=exp.logprob_gap.max, kl_ref=exp.kl_ref)
        metrics.update(
            step_seconds=seconds, tokens_per_second=n_tokens / seconds if seconds > 0 else 0.0,
            response_length_mean=n_tokens / max(1, len(samples.completion_ids)),
            **stop_fractions(samples.finished),
        )
        if self.cfg.rollout.pipeline:
            metrics.update(rollout_staleness=float(r.staleness))
        if sync is not None:  # None: the sync failed; the resume re-sends the weights
            metrics.update(sync_seconds=sync.seconds, sync_bytes=float(sync.bytes), weight_version=float(sync.version))
        rewards = r.rewards
        # GRPO learns only from groups whose samples' rewards differ: the rest have zero advantage.
        groups = rewards.reshape(-1, self.cfg.samples_per_prompt)
        metrics.update(group_signal_fraction=float((groups.max(1).values > groups.min(1).values).float().mean()))
        reward_stats = {"mean": float(rewards.mean()), "std": float(rewards.std(unbiased=False)),
                        "min": float(rewards.min()), "max": float(rewards.max())}
        return StepResult(self._steps_done, metrics, dict(done.timer.seconds), reward_stats, r.identities, n_tokens,
                          dict(self.recovery.actions), reward_components=r.components)

    def _log(self, result: StepResult) -> None:
        self.step_log.parent.mkdir(parents=True, exist_ok=True)
        line = result.log_line()
        with self.step_log.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.last_log_line = line
        if self.metrics is not None:
            self.metrics.record({"step": result.step, **result.metrics}, result.phases, result.rewards,
                                result.reward_services, result.generated_tokens, components=result.reward_components)
        self.reporting.report(result.step, metric_names(result.metrics, result.phases, result.rewards,
                                                        result.reward_components))


def _state_of(pending):
    return None if pending is None else pending.to_state()


__all__ = ["Orchestrator", "RunState", "Services", "StepFailed", "StepResult", "sampling_seed"]
