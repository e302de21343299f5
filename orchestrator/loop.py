"""The training step, top to bottom as in the algorithm (issue 5, steps 1-8).

rollout (Generate) -> score, reference logprobs and values in parallel -> experience (KL,
advantages) -> policy update -> critic TrainStep -> weight broadcast -> metrics, step log,
checkpoint. Every formula lives in orchestrator/algorithms (through build_experience and
PolicyTrainer); every RPC in orchestrator/clients.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from orchestrator.clients import GeneratorClient, ReferenceClient, RewardClient, ServiceError, ValueClient
from orchestrator.config import RunConfig
from orchestrator.data import Cursor, PromptStream
from orchestrator.experience import Rollout, build_experience
from orchestrator.metrics import RunMetrics

# Test hook: stop making progress after this step (the resume test kills the process there).
HANG_AFTER_STEP_ENV = "QUARTET_HANG_AFTER_STEP"


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


@dataclass
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

    def log_line(self) -> str:
        return json.dumps({"step": self.step, **self.metrics, "phases": self.phases, "reward": self.rewards,
                           "reward_services": self.reward_services, "generated_tokens": self.generated_tokens},
                          sort_keys=True)


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


class Orchestrator:
    """Drives the run: owns the policy copy, the trainer, the data cursor and the step log."""

    def __init__(self, cfg: RunConfig, services: Services, *, policy, tokenizer, trainer, prompts: PromptStream,
                 state: RunState, metrics: RunMetrics | None = None,
                 checkpoint: Callable[[Orchestrator], Path] | None = None) -> None:
        self.cfg, self.services = cfg, services
        self.policy, self.tokenizer, self.trainer = policy, tokenizer, trainer
        self.prompts, self.state, self.metrics = prompts, state, metrics
        self.checkpoint = checkpoint
        self.step_log = Path(cfg.run_dir) / "steps.jsonl"
        self.pool = ThreadPoolExecutor(max_workers=2 + len(services.rewards), thread_name_prefix="quartet-call")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def step(self) -> StepResult:
        """One full RL step; raises ServiceError (nothing applied) if a service misbehaves."""
        cfg, svc, timer = self.cfg, self.services, PhaseTimer()
        step_start = time.perf_counter()
        step = self.state.step
        g = cfg.samples_per_prompt

        # 1. The next prompts (the cursor moves only when the step completes).
        self.prompts.cursor = self.state.cursor
        rows = self.prompts.next_batch(cfg.prompts_per_step)
        prompts = [list(self.tokenizer(r.text)["input_ids"]) for r in rows]

        # 2. Generate G samples per prompt, seeded by (run seed, step): reproducible and retry-safe.
        s = cfg.sampling
        with timer("generate"):
            samples = svc.generator.generate(
                prompts, n=g, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                max_new_tokens=s.max_new_tokens, stop_token_ids=s.stop_token_ids,
                seed=sampling_seed(cfg.seed, step), request_id=f"step-{step}",
            )
        if samples.weight_version != self.state.weight_version:
            raise ServiceError(svc.generator.name, "Generate", f"sampled with weight version {samples.weight_version}, "
                               f"expected {self.state.weight_version}: the generator lost the pushed weights")
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

        # 4-5. KL and advantages (build_experience), then the policy update on the trainer's copy.
        rollout = Rollout(
            prompt_ids=prompt_ids, completion_ids=completions, generator_logprobs=samples.logprobs,
            rewards=rewards, ref_logprobs=ref_logprobs, values=values, group_size=g, finished=samples.finished,
        )
        with timer("update"):
            exp = build_experience(rollout, self.policy, cfg.algorithm, pad_token_id=self.pad_token_id)
            stats = self.trainer.update(exp)

        # 6. The critic trains itself on the returns, once per step id.
        value_stats = None
        if svc.value is not None and cfg.uses_value:
            with timer("value_train"):
                returns, old_values, mask = self.trainer.value_train_inputs(exp)
                value_stats = svc.value.train_step(
                    prompt_ids, completions, returns=returns, old_values=old_values, mask=mask,
                    clip_range=cfg.algorithm.value_clip, step_id=step,
                )

        # 7. Broadcast the new weights; the response confirms the generator serves the new version.
        with timer("sync"):
            sync = svc.generator.update_weights(self.named_weights(), self.state.weight_version + 1)

        self.state = RunState(step=step + 1, cursor=self.prompts.cursor, weight_version=sync.version)
        # 8. Checkpoint at the interval (before the step is logged: a logged step is durable).
        interval = cfg.checkpoint.interval
        if self.checkpoint is not None and interval and self.state.step % interval == 0:
            with timer("checkpoint"):
                self.checkpoint(self)

        result = self._result(timer, time.perf_counter() - step_start, stats, value_stats, exp, rewards, samples,
                              sync, identities)
        self._log(result)
        hang = os.environ.get(HANG_AFTER_STEP_ENV)
        if hang and int(hang) == self.state.step:
            while True:
                time.sleep(3600)
        return result

    def named_weights(self) -> dict[str, torch.Tensor]:
        """The policy's state dict as the generator names it (tied weights are sent once by push_weights)."""
        return dict(self.policy.state_dict())

    def _result(self, timer, seconds, stats, value_stats, exp, rewards, samples, sync, identities) -> StepResult:
        n_tokens = sum(len(c) for c in samples.completion_ids)
        metrics = stats.as_dict()
        if value_stats is not None:
            metrics.update(value_loss=value_stats.loss, value_clipfrac=value_stats.clipfrac,
                           value_explained_variance=value_stats.explained_variance)
        metrics.update(logprob_gap_mean=exp.logprob_gap.mean, logprob_gap_max=exp.logprob_gap.max, kl_ref=exp.kl_ref)
        metrics.update(
            step_seconds=seconds, tokens_per_second=n_tokens / seconds if seconds > 0 else 0.0,
            sync_seconds=sync.seconds, sync_bytes=float(sync.bytes), weight_version=float(sync.version),
            response_length_mean=n_tokens / max(1, len(samples.completion_ids)),
            finished_fraction=sum(samples.finished) / max(1, len(samples.finished)),
        )
        reward_stats = {"mean": float(rewards.mean()), "std": float(rewards.std(unbiased=False)),
                        "min": float(rewards.min()), "max": float(rewards.max())}
        return StepResult(self.state.step, metrics, dict(timer.seconds), reward_stats, identities, n_tokens)

    def _log(self, result: StepResult) -> None:
        self.step_log.parent.mkdir(parents=True, exist_ok=True)
        with self.step_log.open("a") as f:
            f.write(result.log_line() + "\n")
            f.flush()
            os.fsync(f.fileno())
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


def truncate_step_log(path: Path, last_step: int) -> None:
    """Drop step-log lines after `last_step` (steps done after the checkpoint a resume starts from)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
