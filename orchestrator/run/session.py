"""Open a run: services (started here or reached remotely), checks, policy, trainer, state, metrics.

`Session(cfg, resume=..., overwrite=...)` is a context manager; everything it starts (child services, the
metrics endpoint, channels) is stopped on exit, error or Ctrl-C. Before anything starts it claims the run
directory (checkpoint.claim_run_dir): a new run refuses one that holds another run, `overwrite` removes that
run's files first, `resume` continues the run there.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from orchestrator.remote.clients import ServiceError, ServiceInfo, ValueClient, check_tokenizers
from orchestrator.remote.discovery import connect_generator, connect_reference, connect_reward
from orchestrator.remote.retry import RetryPolicy
from orchestrator.run import checkpoint
from orchestrator.run.config import ConfigError, Endpoint, RewardEndpoint, RunConfig, dump_config
from orchestrator.run.data import PromptRow, PromptStream, load_split
from orchestrator.run.metrics import RunMetrics
from orchestrator.run.reporting import Reporting
from orchestrator.step.loop import Orchestrator, RunState, Services, StepResult
from orchestrator.step.pipeline import Pending
from services.common.command import silence_progress_bars
from services.common.hf import (
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    tokenizer_fingerprint,
)
from services.launcher import LocalStack, RestartPolicy, ServiceSpec, TlsFiles


def local_specs(cfg: RunConfig) -> list[ServiceSpec]:
    """The services `local: true` starts for this config (reference / value only when used)."""
    m, opts = cfg.models, cfg.services.local_options
    specs = [ServiceSpec("generator", m.policy, opts.generator)]
    # Several rewards: one service each, named reward-NAME (its own process, log and restarts).
    specs += [ServiceSpec("reward", None, r.options, name=f"reward-{r.name}" if r.name else None)
              for r in opts.reward_services()]
    if cfg.uses_reference:
        specs.append(ServiceSpec("reference", m.reference or m.policy, opts.reference))
    if cfg.uses_value:
        ckpt = str((Path(cfg.run_dir) / "value-checkpoints").resolve())
        specs.append(ServiceSpec("value", m.value or m.policy, opts.value, checkpoint_dir=ckpt))
    return specs


class Session:
    """Everything one run needs; `.orchestrator` drives the steps.

    `max_steps`: run at most this many steps in this session (the run's `steps` stays its target: a later
    resume continues); `.cfg` is then the config with `steps` lowered to where this session stops.
    `leader`: rank 0's `orchestrator.step.distributed.Leader` under torchrun; the other ranks join the
    trainer once its state is restored.
    """

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, max_steps: int | None = None,
                 log: Callable[[str], None] = lambda _msg: None, leader=None):
        self.cfg, self.resume, self.overwrite, self.max_steps, self.log = cfg, resume, overwrite, max_steps, log
        self.leader = leader
        self.run_id: str | None = None
        self.stack: LocalStack | None = None
        self.services: Services | None = None
        self.metrics: RunMetrics | None = None
        self.reporting: Reporting | None = None
        self.orchestrator: Orchestrator | None = None
        self.evaluation = None  # evaluation.RunEvaluation when the config has an eval section
        self.infos: dict[str, ServiceInfo] = {}
        self.resumed_from: Path | None = None

    def __enter__(self) -> Session:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _endpoints(self) -> dict[str, Endpoint | list[RewardEndpoint] | None]:
        cfg = self.cfg
        if not cfg.services.local:
            s = cfg.services
            return {"generator": s.generator, "reference": s.reference, "value": s.value, "rewards": s.rewards}
        self.log("starting local services ...")
        opts = cfg.services.local_options
        tls = (TlsFiles(opts.tls.cert, opts.tls.key, opts.tls.ca, opts.tls.client_cert, opts.tls.client_key,
                        opts.tls.client_ca) if opts.tls else None)
        restart = RestartPolicy(opts.max_restarts, opts.restart_backoff_s, opts.restart_backoff_max_s)

        def restarted(label: str, _code: int) -> None:  # metrics exist only once open() is past _connect
            if self.metrics is not None:
                self.metrics.service_restarts.labels(service=label).inc()

        self.stack = LocalStack(cfg.run_dir, local_specs(cfg), startup_timeout_s=opts.startup_timeout_s,
                                dtype=cfg.models.dtype, device=cfg.models.device, restart=restart, tls=tls,
                                on_restart=restarted)
        up = self.stack.start()
        # The services' own certificate files: the stack's clients trust its CA and, for mTLS, present its client cert.
        secure = ({"tls_ca": tls.ca, "tls_client_cert": tls.client_cert, "tls_client_key": tls.client_key}
                  if tls else {})

        def ep(label: str, cls: type[Endpoint] = Endpoint, **extra: object) -> Endpoint | None:
            s = up.get(label)
            return cls(address=s.address, token=s.token, admin_token=s.admin_token, **secure, **extra) if s else None

        rewards = [ep(f"reward-{r.name}" if r.name else "reward", RewardEndpoint, weight=r.weight, name=r.name or None)
                   for r in opts.reward_services()]
        return {"generator": ep("generator"), "reference": ep("reference"), "value": ep("value"), "rewards": rewards}

    def _connect(self) -> Services:
        cfg, d = self.cfg, self.cfg.services.deadlines
        eps = self._endpoints()
        common = {"info_deadline_s": d.info_s, "retry": RetryPolicy.from_config(cfg.services.retry)}
        # An endpoint naming several replicas (a list, or discovery: dns) gets a replica set with the same interface.
        probe = {**common, "probe_interval_s": cfg.services.replica_probe_interval_s}
        gen = connect_generator(eps["generator"], deadline_s=d.generate_s, weights_deadline_s=d.weights_s, **probe)
        rewards = [connect_reward(r, deadline_s=d.score_s, **probe) for r in eps["rewards"]]
        ref = connect_reference(eps["reference"], deadline_s=d.logprobs_s, **probe) if cfg.uses_reference else None
        val = (ValueClient(eps["value"], deadline_s=d.values_s, train_deadline_s=d.train_step_s,
                           checkpoint_deadline_s=d.checkpoint_s, **common) if cfg.uses_value else None)
        self.services = Services(gen, rewards, ref, val)
        self.infos = {"generator": gen.info()}
        if ref is not None:
            self.infos["reference"] = ref.info()
        if val is not None:
            self.infos["value"] = val.info()
        for i, r in enumerate(rewards):
            self.infos[f"reward[{i}]"] = r.info()
        return self.services

    def open(self) -> None:
        cfg = self.cfg
        silence_progress_bars()  # transformers' load / save bars would break the progress bar or log lines
        run_dir = Path(cfg.run_dir)
        self.run_id, start = checkpoint.claim_run_dir(run_dir, cfg.checkpoint_dir, resume=self.resume,
                                                      overwrite=self.overwrite, log=self.log)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        restored = None
        if self.resume:
            if start is None:
                self.log(f"no complete checkpoint in {cfg.checkpoint_dir}: starting from step 0")
            else:
                restored = checkpoint.read(start)
                self.resumed_from = start
        cfg = self._stop_at(restored.step if restored else 0)
        services = self._connect()
        tokenizer = load_tokenizer(cfg.models.policy)
        check_tokenizers({k: v for k, v in self.infos.items() if not k.startswith("reward")},
                         trainer_fingerprint=tokenizer_fingerprint(tokenizer))
        self._seed_everything()
        if cfg.models.threads is not None:
            torch.set_num_threads(cfg.models.threads)
        policy = self._load_policy(cfg, restored)
        from orchestrator.step.trainer import PolicyTrainer

        trainer = PolicyTrainer(policy, cfg.algorithm, seed=cfg.seed)
        train_rows, held_out = load_split(cfg.dataset, tokenizer, self.log)
        prompts = PromptStream(train_rows, seed=cfg.seed, shuffle=cfg.dataset.shuffle)
        served = self.infos["generator"].weight_version
        state, value_save = self._restore(restored, trainer, services, run_dir, served)
        if self.leader is not None:
            self.leader.join(trainer)
        self._serve_metrics(cfg)
        self.metrics.watch_replicas([c.replicas for c in (services.generator, *services.rewards, services.reference)
                                     if getattr(c, "replicas", None) is not None])
        self.reporting = Reporting.open(cfg, start_step=state.step, say=self.log)
        self.orchestrator = Orchestrator(
            cfg, services, policy=policy, tokenizer=tokenizer, trainer=trainer, prompts=prompts, state=state,
            metrics=self.metrics, value_save=value_save,
        )
        self.orchestrator.reporting = self.reporting
        if restored is not None or served != 0:
            # The generator must serve exactly the trainer's policy before the first Generate.
            self.orchestrator.weights.push(served + 1)
        if cfg.eval is not None:
            self._open_evaluation(cfg, tokenizer, held_out, state.step)

    def _open_evaluation(self, cfg: RunConfig, tokenizer, held_out: list[PromptRow], step: int) -> None:
        from orchestrator.run.evaluation import EVAL_LOG, EvalLog, Evaluator, RunEvaluation, grader_for

        EvalLog(Path(cfg.run_dir) / EVAL_LOG).truncate(step)  # later steps run again, and so do their evaluations
        rows = held_out
        if (eval_data := cfg.eval_dataset()) is not None:
            if not eval_data.limit and eval_data.kind != "prompts" and cfg.eval.max_samples:
                eval_data = eval_data.model_copy(update={"limit": cfg.eval.max_samples})
            rows = load_split(eval_data, tokenizer, lambda m: self.log(f"eval {m}"), what="eval problems")[0]
        grader = grader_for(cfg)
        try:
            evaluator = Evaluator(rows, tokenizer, grader, max_samples=cfg.eval.max_samples,
                                  max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
                                  batch_size=cfg.eval.batch_size)
        except ValueError as e:
            grader.close()
            raise ConfigError(f"eval: {e}") from None
        self.evaluation = RunEvaluation(cfg, evaluator, self.orchestrator.weights, metrics=self.metrics,
                                        reporting=self.reporting, log=self.log)

    def run(self, on_step: Callable[[StepResult], None] | None = None) -> list[StepResult]:
        """The run's steps (Orchestrator.run), with the held-out evaluation after the steps it is due."""
        o, ev = self.orchestrator, self.evaluation
        assert o is not None, "open() the session first"
        if ev is None:
            return o.run(on_step)
        ev.after(o.state.step)  # the starting policy (eval.at_start), unless already evaluated

        def after(result: StepResult) -> None:
            if on_step is not None:
                on_step(result)
            ev.after(result.step)

        return o.run(after)

    def _load_policy(self, cfg: RunConfig, restored: checkpoint.Restored | None):
        """The trainable policy: the checkpoint's on resume, else models.policy, on models.device / dtype."""
        device = resolve_device(cfg.models.device, field="models.device")
        dtype = resolve_dtype(cfg.models.dtype, device=device, field="models.dtype")
        # TRPO's Fisher-vector product needs double backprop through attention: eager on CPU (sdpa's CPU kernel has no double backward).
        attn = "eager" if cfg.algorithm.name == "trpo" else None
        policy_path = restored.path / "policy" if restored else cfg.models.policy
        return load_causal_lm(policy_path, dtype=dtype, device=device, attn_implementation=attn)

    def _restore(self, restored: checkpoint.Restored | None, trainer, services: Services, run_dir: Path,
                 served: int) -> tuple[RunState, str | None]:
        """The run state to start from and the critic save it refers to: a restored checkpoint's (trainer
        state, RNG, critic, step log) on resume, else step 0 with the generator's version."""
        value_save = None
        if restored is None:
            if self.resume:  # the same run from step 0: none of its old lines stays
                checkpoint.truncate_step_log(run_dir / checkpoint.STEP_LOG, 0)
            return RunState(weight_version=served), value_save
        if restored.trainer_state is not None:
            trainer.load_state_dict(restored.trainer_state)
        checkpoint.set_rng_states(restored.rng)
        if restored.value_checkpoint and services.value is not None and self.cfg.uses_value:
            loaded = services.value.load(restored.value_checkpoint)
            if restored.value_last_step_id is not None and loaded != restored.value_last_step_id:
                # Only a checkpoint left after a failure refers to a rolling value save, which a later
                # run may have overwritten: the critic then differs from the one the run had.
                self.log(f"warning: value checkpoint {restored.value_checkpoint!r} now holds TrainStep id "
                         f"{loaded}, not {restored.value_last_step_id} as when {restored.path.name} was written")
            value_save = restored.value_checkpoint
        pending = None if restored.pending_rollout is None else Pending.from_state(restored.pending_rollout)
        state = RunState(step=restored.step, cursor=restored.cursor, weight_version=served, pending=pending)
        checkpoint.truncate_step_log(run_dir / checkpoint.STEP_LOG, restored.step, restore=restored.log_line)
        self.log(f"resumed from {restored.path} at step {restored.step}")
        return state, value_save

    def _serve_metrics(self, cfg: RunConfig) -> None:
        self.metrics = RunMetrics(trpo=cfg.algorithm.name == "trpo")
        if cfg.metrics_port is not None:
            try:
                self.metrics.serve(cfg.metrics_port, host=cfg.metrics_host)
            except OSError as e:  # preflight checked it; another process may have taken it since
                raise ConfigError(f"metrics_port={cfg.metrics_port}: cannot listen on {cfg.metrics_host}:"
                                  f"{cfg.metrics_port} ({e.strerror}); set metrics_port to a free port, 0 (any "
                                  "free port) or null (off)") from None

    def _stop_at(self, first: int) -> RunConfig:
        """The config this session runs, from completed step `first`: `steps` lowered by max_steps."""
        cfg = self.cfg
        if first >= cfg.steps:
            self.log(f"run {self.run_id} is at step {first} and steps={cfg.steps}: nothing to run "
                     f"(--set steps=N with N > {first} continues it)")
        elif self.max_steps is not None and first + self.max_steps < cfg.steps:
            self.log(f"max steps {self.max_steps} (--max-steps / QUARTET_MAX_STEPS): stopping at step "
                     f"{first + self.max_steps} of {cfg.steps}; --resume continues from there")
            self.cfg = cfg.model_copy(update={"steps": first + self.max_steps})
        return self.cfg

    def _seed_everything(self) -> None:
        seed = self.cfg.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def save_final(self) -> Path | None:
        """Checkpoint the end of the run unless the interval just did."""
        o = self.orchestrator
        if o is None or o.state.step == 0:
            return None
        path = self.cfg.checkpoint_dir / checkpoint.step_name(o.state.step)
        if checkpoint.is_complete(path):
            return path
        return o.save_checkpoint(log_line=o.last_log_line)

    def close(self) -> None:
        if self.evaluation is not None:
            self.evaluation.close()
        if self.orchestrator is not None:
            self.orchestrator.close()
        if self.services is not None:
            self.services.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.reporting is not None:
            self.reporting.close()
        if self.stack is not None:
            self.stack.stop()


__all__ = ["ServiceError", "Session", "local_specs"]
