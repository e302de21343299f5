"""The training step, top to bottom as in the algorithm (issue 5, steps 1-8).

rollout (Generate) -> score, reference logprobs and values in parallel -> experience (KL,
advantages) -> critic TrainStep -> policy update -> weight broadcast -> metrics, step log,
checkpoint. Every formula lives in orchestrator/algorithms (through build_experience and
PolicyTrainer); every RPC in orchestrator/remote/clients.

Failures (issue 7). Everything up to the policy update can be redone: Generate is seeded, Score,
LogProbs and Values are pure, and the critic is reloaded from its last save when it restarted
(orchestrator/remote/rejoin.py). So a service that comes back is brought up to date and the rollout is
redone, giving the same samples. The critic trains before the policy update (its inputs come from
the experience computed before the update, so the math is the same), which leaves only the weight
sync after the update. When a service stays down past its retry budget, `step` leaves a checkpoint
of the last consistent state and raises `StepFailed`: a failure before the update checkpoints the
state the step started from; a failed sync checkpoints the completed step (a resume re-sends the
weights first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from orchestrator.remote.clients import (
    GeneratorClient,
    ReferenceClient,
    RewardClient,
    Samples,
    ServiceError,
    ValueClient,
    ValueTrainResult,
    WeightSync,
)
from orchestrator.remote.rejoin import MAX_REJOINS, CriticKeeper, Rejoined, ValueSave, resend_version
from orchestrator.run import checkpoint as ckpt
from orchestrator.run.config import RunConfig
from orchestrator.run.data import Cursor, PromptStream
from orchestrator.run.metrics import RunMetrics
from orchestrator.step.experience import Experience, Rollout, build_experience, trainer_logprobs

log = logging.getLogger("quartet.orchestrator")


@dataclass
class Services:
    """Clients of the four roles for one run."""

    generator: GeneratorClient
    rewards: list[RewardClient]
    reference: ReferenceClient | None
    value: ValueClient | None

    def close(self) -> None:
        for c in (self.generator, *self.rewards, self.reference, self.value):
            if c is not None:
                c.close()


@dataclass(frozen=True)
class RunState:
    """What the run must remember across a restart (besides weights and optimizer)."""

    step: int = 0  # completed steps
    cursor: Cursor = field(default_factory=Cursor)
    weight_version: int = 0  # version the generator serves


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

    def log_line(self) -> str:
        line: dict[str, Any] = {"step": self.step, **self.metrics, "phases": self.phases, "reward": self.rewards,
                                "reward_services": self.reward_services, "generated_tokens": self.generated_tokens}
        if self.recovery:
            line["recovery"] = self.recovery
        return json.dumps(line, sort_keys=True)


class StepFailed(ServiceError):
    """A service failed past its retry budget; the run state is saved in `checkpoint` for --resume.

    The message is the ServiceError's (service, call, last status). `checkpoint` is None when there was
    nothing to save (no step completed yet) or the save itself failed (`note` says why).
    """

    def __init__(self, err: ServiceError, *, checkpoint: Path | None, completed_steps: int, note: str = "") -> None:
        super().__init__(err.service, err.call, err.problem, code=err.code)
        self.checkpoint, self.completed_steps, self.note = checkpoint, completed_steps, note


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


@dataclass(frozen=True)
class _StepRollout:
    """Everything of one step up to (not including) the policy update."""

    samples: Samples
    rewards: torch.Tensor  # [B] weighted sum over reward services
    identities: dict[str, float]
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

    `checkpoint(orch, *, log_line, rng)` writes the run state (Session passes checkpoint.save).
    `value_save` names the value checkpoint the value service was just loaded from (resume).
    """

    def __init__(self, cfg: RunConfig, services: Services, *, policy, tokenizer, trainer, prompts: PromptStream,
                 state: RunState, metrics: RunMetrics | None = None,
                 checkpoint: Callable[..., Path] | None = None, value_save: str | None = None) -> None:
        self.cfg, self.services = cfg, services
        self.policy, self.tokenizer, self.trainer = policy, tokenizer, trainer
        self.prompts, self.state, self.metrics = prompts, state, metrics
        self.checkpoint = checkpoint
        self.step_log = Path(cfg.run_dir) / "steps.jsonl"
        self.pool = ThreadPoolExecutor(max_workers=2 + len(services.rewards), thread_name_prefix="quartet-call")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.last_log_line: str | None = None  # the line of step `state.step`, when this process logged it
        self._recovery: dict[str, int] = {}
        self._completed: _Completed | None = None
        self.critic = self._critic_keeper(value_save) if services.value is not None and cfg.uses_value else None

    def _critic_keeper(self, value_save: str | None) -> CriticKeeper:
        assert self.services.value is not None
        return CriticKeeper.start(self.services.value, slot_prefix=f"{Path(self.cfg.run_dir).name}-value-live",
                                  loaded=value_save, value_interval=self.cfg.checkpoint.value_interval,
                                  on_reload=self._lost_value_steps)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def step(self) -> StepResult:
        """One full RL step. Services that restarted are brought back and the step goes on; one that stays
        down past its retry budget raises StepFailed after a resumable checkpoint is left."""
        step, start_rng = self.state.step, ckpt.rng_states()
        self._recovery = {}
        try:
            return self._step(start_rng)
        except ServiceError as err:
            raise self._stop(err, step, start_rng) from err

    def _step(self, start_rng: dict[str, Any]) -> StepResult:
        cfg, timer, started = self.cfg, PhaseTimer(), time.perf_counter()
        step = self.state.step
        # 1-6. Rollout, scores, experience, critic TrainStep: redone (same seed) if a service came back.
        for redo in range(MAX_REJOINS + 1):
            try:
                rollout = self._rollout(step, timer)
                break
            except Rejoined as why:
                if redo == MAX_REJOINS:
                    raise ServiceError("value", "TrainStep", f"{why}; gave up after {MAX_REJOINS} reloads") from None
                log.warning("step %d: %s; redoing the step's rollout", step + 1, why)
                self._count("rollout_redos")
                ckpt.set_rng_states(start_rng)  # the redo draws what the first attempt drew
        # 7. The policy update. From here the step counts as done: a failed sync still leaves step + 1.
        with timer("update"):
            stats = self.trainer.update(rollout.exp)
        self._completed = _Completed(timer, started, stats, rollout)
        self.state = RunState(step + 1, self.prompts.cursor, self.state.weight_version)
        # 8. Broadcast the new weights; the response confirms the generator serves the new version.
        with timer("sync"):
            sync = self.services.generator.update_weights(self.named_weights(), self.state.weight_version + 1)
        self._completed.sync = sync
        self.state = replace(self.state, weight_version=sync.version)
        interval = cfg.checkpoint.interval
        return self._finish(checkpoint=bool(interval) and self.state.step % interval == 0)

    def _rollout(self, step: int, timer: PhaseTimer) -> _StepRollout:
        cfg, svc = self.cfg, self.services
        g = cfg.samples_per_prompt
        if self.critic is not None:
            self.critic.ensure()  # a value service that restarted since the last step is reloaded first

        # 1. The next prompts (the cursor moves only when the step completes).
        self.prompts.cursor = self.state.cursor
        rows = self.prompts.next_batch(cfg.prompts_per_step)
        prompts = [list(self.tokenizer(r.text)["input_ids"]) for r in rows]

        # 2. Generate G samples per prompt, seeded by (run seed, step): reproducible and retry-safe.
        with timer("generate"):
            samples = self._generate(prompts, step)
        prompt_ids = [prompts[k // g] for k in range(len(samples.completion_ids))]
        completions = samples.completion_ids

        # 3. In parallel: every reward service, reference logprobs, critic values.
        texts = [rows[k // g].text for k in range(len(completions))]
        meta = [rows[k // g].metadata for k in range(len(completions))]
        score_futures = [self.pool.submit(_timed, r.score, prompt_ids, completions, texts, samples.texts, meta)
                         for r in svc.rewards]
        ref_future = (self.pool.submit(_timed, svc.reference.logprobs, prompt_ids, completions)
                      if svc.reference is not None and cfg.uses_reference else None)
        val_future = (self.pool.submit(_timed, svc.value.values, prompt_ids, completions)
                      if svc.value is not None and cfg.uses_value else None)
        # Meanwhile this process computes the policy's own log-probs of the samples: on a small box the
        # services and the trainer then share the cores instead of taking turns.
        with timer("policy_logprobs"):
            policy_lp = trainer_logprobs(prompt_ids, completions, self.policy, pad_token_id=self.pad_token_id)
        rewards = torch.zeros(len(completions))
        identities: dict[str, float] = {}
        for client, fut in zip(svc.rewards, score_futures, strict=True):
            scores, secs = fut.result()
            timer.seconds["score"] = max(timer.seconds.get("score", 0.0), secs)
            rewards += client.weight * scores.rewards
            identities[scores.identity or client.name] = client.weight
        ref_logprobs = values = None
        if ref_future is not None:
            ref_logprobs, timer.seconds["reference"] = ref_future.result()
        if val_future is not None:
            values, timer.seconds["values"] = val_future.result()

        # 4-5. KL and advantages (build_experience) from the policy as it was sampled.
        rollout = Rollout(
            prompt_ids=prompt_ids, completion_ids=completions, generator_logprobs=samples.logprobs,
            rewards=rewards, ref_logprobs=ref_logprobs, values=values, group_size=g, finished=samples.finished,
        )
        with timer("update"):
            exp = build_experience(rollout, self.policy, cfg.algorithm, pad_token_id=self.pad_token_id,
                                   policy_logprobs=policy_lp)

        # 6. The critic trains itself on the returns, once per step id, then is saved at its interval.
        value_stats = None
        if self.critic is not None and svc.value is not None:
            with timer("value_train"):
                returns, old_values, mask = self.trainer.value_train_inputs(exp)
                value_stats = svc.value.train_step(
                    prompt_ids, completions, returns=returns, old_values=old_values, mask=mask,
                    clip_range=cfg.algorithm.value_clip, step_id=step,
                )
                self.critic.trained(step, value_stats)
                every = cfg.checkpoint.value_interval
                if every and (step + 1) % every == 0 and self.critic.save() is None:
                    raise Rejoined("the value service restarted while the critic was being saved")
        return _StepRollout(samples, rewards, identities, exp, value_stats)

    def _generate(self, prompts: list[list[int]], step: int) -> Samples:
        """Generate, re-sending the weights first whenever the generator serves other weights (a restart).

        GetInfo before Generate catches a generator that restarted since the last step without a wasted
        Generate; the version stamped on the answer catches one that restarted in between.
        """
        s, gen = self.cfg.sampling, self.services.generator
        served = gen.info().weight_version
        if served != self.state.weight_version:
            self._resend_weights(served, step)
        for attempt in range(MAX_REJOINS + 1):
            samples = gen.generate(
                prompts, n=self.cfg.samples_per_prompt, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                max_new_tokens=s.max_new_tokens, stop_token_ids=s.stop_token_ids,
                seed=sampling_seed(self.cfg.seed, step), request_id=f"step-{step}",
            )
            if samples.weight_version == self.state.weight_version or attempt == MAX_REJOINS:
                break
            self._resend_weights(samples.weight_version, step)
        if samples.weight_version != self.state.weight_version:
            raise ServiceError(gen.name, "Generate", f"sampled with weight version {samples.weight_version}, expected "
                               f"{self.state.weight_version}, after {MAX_REJOINS} re-sends of the weights")
        return samples

    def _resend_weights(self, served: int, step: int) -> None:
        """Push the trainer's policy again: before the update it is exactly what the generator should serve."""
        version = resend_version(self.state.weight_version, served)
        log.warning("step %d: %s serves weight version %d instead of %d (it restarted): re-sending the "
                    "policy as version %d", step + 1, self.services.generator.name, served,
                    self.state.weight_version, version)
        sync = self.services.generator.update_weights(self.named_weights(), version)
        self.state = replace(self.state, weight_version=sync.version)
        self._count("weight_resends")

    def _finish(self, *, checkpoint: bool, fallback: bool = False) -> StepResult:
        """Checkpoint (when asked) and log the completed step; a checkpoint comes first so a logged step is durable.

        The checkpoint carries the step's line too: a crash between the two leaves the line to the resume.
        `fallback`: a checkpoint left after a failure (see value_checkpoint).
        """
        done = self._completed
        assert done is not None
        if checkpoint and self.checkpoint is not None:
            line = self._result(done).log_line()
            with done.timer("checkpoint"):
                self.checkpoint(self, log_line=line, fallback=fallback)
        result = self._result(done)
        self._log(result)
        self._completed = None
        return result

    def _stop(self, err: ServiceError, step: int, start_rng: dict[str, Any]) -> StepFailed:
        """Leave a checkpoint of the last consistent state after `err`; returns the error to raise."""
        note = ""
        path = self.cfg.checkpoint_dir / ckpt.step_name(self.state.step)
        try:
            if self._completed is not None:  # the policy moved: finish the step (sync or checkpoint failed)
                self._finish(checkpoint=True, fallback=True)
            elif self.state.step > 0 and self.checkpoint is not None and not (path / ckpt.MARKER).is_file():
                self.checkpoint(self, log_line=self.last_log_line, rng=start_rng, fallback=True)  # nothing applied
        except (ServiceError, OSError) as e:
            note = f"no checkpoint of step {self.state.step} could be written ({e})"
            log.error("%s after %s", note, err)
        done = path if (path / ckpt.MARKER).is_file() else None
        return StepFailed(err, checkpoint=done, completed_steps=self.state.step, note=note)

    def value_checkpoint(self, name: str, *, fallback: bool = False) -> ValueSave | None:
        """The critic a run checkpoint of `self.state` refers to (see CriticKeeper.for_checkpoint)."""
        if self.critic is None:
            return None
        # The critic of run state N has applied TrainStep ids up to N - 1.
        return self.critic.for_checkpoint(name, newest_fit=self.state.step - 1, fallback=fallback)

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The policy's state dict as the generator names it (tied weights are sent once by push_weights)."""
        return dict(self.policy.state_dict())

    def _count(self, action: str, n: int = 1) -> None:
        self._recovery[action] = self._recovery.get(action, 0) + n
        if self.metrics is not None:
            self.metrics.rejoin(action, n)

    def _lost_value_steps(self, lost: list[int]) -> None:
        self._count("value_reloads")
        if lost:
            self._count("value_lost_train_steps", len(lost))

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
            finished_fraction=sum(samples.finished) / max(1, len(samples.finished)),
        )
        if sync is not None:  # None: the sync failed; the resume re-sends the weights
            metrics.update(sync_seconds=sync.seconds, sync_bytes=float(sync.bytes), weight_version=float(sync.version))
        rewards = r.rewards
        reward_stats = {"mean": float(rewards.mean()), "std": float(rewards.std(unbiased=False)),
                        "min": float(rewards.min()), "max": float(rewards.max())}
        return StepResult(self.state.step, metrics, dict(done.timer.seconds), reward_stats, r.identities, n_tokens,
                          dict(self._recovery))

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
                                result.reward_services, result.generated_tokens)

    def run(self, on_step: Callable[[StepResult], None] | None = None) -> list[StepResult]:
        """Steps until cfg.steps are done (a resumed run continues to the same total)."""
        results = []
        while self.state.step < self.cfg.steps:
            results.append(self.step())
            if on_step is not None:
                on_step(results[-1])
        return results

