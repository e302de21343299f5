"""A service that stays down past its retry budget stops the run with an error naming it and a
checkpoint of the last consistent state; `--resume` then completes the run with the same weights.

Embedded stack, in process. After step 2 a service stops answering: it is SIGSTOPped (alive, so the
launcher does not restart it; every call to it hits its deadline) with short deadlines and a short
retry budget. The run must raise StepFailed naming the service and the call, leave a complete
checkpoint, and a resumed session must finish the run: every step once in the step log and the final
policy equal to an undisturbed run's bit for bit.
- reward down: the failure comes before the policy update, so the checkpoint is the state at step 2
  (with the RNG states of step 3's start);
- value down (PPO with GAE): it cannot save, so the checkpoint refers to the critic's last verified
  save (taken after step 2: checkpoint.value_interval=1);
- weight sync failing after the update: injected at the generator client (a real generator never
  fails only UpdateWeights on cue); the step is complete, so the checkpoint is step 3, its line is
  logged, and the resume re-sends the weights before sampling.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import grpc
import pytest
import torch

from tests.e2e.test_run import e2e_config, task  # noqa: F401  (task is a fixture)

STEPS = 4
SETS = ("steps=4", "metrics_port=null", "checkpoint.keep=10")
# Down means down: 1-2 s deadlines and a 4 s retry budget keep the failing step short.
IMPATIENT = ("services.retry.budget_s=4", "services.retry.initial_backoff_s=0.2", "services.retry.max_backoff_s=1",
             "services.deadlines.info_s=1", "services.deadlines.score_s=2", "services.deadlines.values_s=2",
             "services.deadlines.checkpoint_s=2", "services.deadlines.generate_s=5")
ALGOS = {"grpo": (), "ppo": ("algorithm.advantage=gae",)}


def weights_of(session) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in session.orchestrator.policy.state_dict().items()}


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baselines(tiny_checkpoint, task, tmp_path_factory):  # noqa: F811
    """Final weights of undisturbed runs, per algorithm, computed on first use."""
    from orchestrator.run.session import Session

    done: dict[str, dict[str, torch.Tensor]] = {}

    def get(algo: str) -> dict[str, torch.Tensor]:
        if algo not in done:
            cfg = e2e_config(algo, tiny_checkpoint, task, tmp_path_factory.mktemp("baseline") / algo, *SETS,
                             *ALGOS[algo])
            with Session(cfg) as session:
                session.orchestrator.run()
                done[algo] = weights_of(session)
        return done[algo]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "down", "call"), [("grpo", "reward", "Score"), ("ppo", "value", None)])
def test_service_down_stops_with_a_checkpoint_and_resume_completes(algo, down, call, baselines, tiny_checkpoint,
                                                                   task, tmp_path) -> None:  # noqa: F811
    from orchestrator.run import checkpoint
    from orchestrator.run.session import Session
    from orchestrator.step.loop import StepFailed

    cfg = e2e_config(algo, tiny_checkpoint, task, tmp_path / "run", *SETS, *ALGOS[algo], *IMPATIENT)
    stopped: list[int] = []
    with Session(cfg) as session:

        def stop_after_step_2(r) -> None:
            if r.step == 2:
                stopped.append(session.stack.procs[down].pid)
                os.kill(stopped[0], signal.SIGSTOP)

        try:
            with pytest.raises(StepFailed) as failed:
                session.orchestrator.run(stop_after_step_2)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        assert session.stack.restarts[down] == 0, "a stopped service is alive: nothing to restart"
    err = failed.value
    assert err.service.startswith(down), str(err)
    if call is not None:
        assert err.call == call, str(err)
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED, str(err)
    assert err.completed_steps == 2
    assert err.checkpoint == cfg.checkpoint_dir / checkpoint.step_name(2)
    assert checkpoint.latest(cfg.checkpoint_dir) == err.checkpoint
    saved = checkpoint.read(err.checkpoint)
    if down == "value":  # the checkpoint refers to the critic saved after step 2 (TrainStep id 1)
        assert saved.value_checkpoint is not None and saved.value_checkpoint.endswith(("-value-live-a", "-value-live-b"))
        assert saved.value_last_step_id == 1
    assert logged_steps(tmp_path / "run") == [1, 2]

    with Session(cfg, resume=True) as session:
        assert session.resumed_from == err.checkpoint
        session.orchestrator.run()
        got = weights_of(session)
    assert logged_steps(tmp_path / "run") == list(range(1, STEPS + 1)), "every step exactly once"
    want = baselines(algo)
    assert [k for k in want if not torch.equal(want[k], got[k])] == [], "the resumed run differs from an undisturbed one"


@pytest.mark.slow
def test_failed_weight_sync_checkpoints_the_completed_step(baselines, tiny_checkpoint, task, tmp_path) -> None:  # noqa: F811
    from orchestrator.remote.clients import ServiceError
    from orchestrator.run import checkpoint
    from orchestrator.run.session import Session
    from orchestrator.step.loop import StepFailed

    cfg = e2e_config("grpo", tiny_checkpoint, task, tmp_path / "run", *SETS)
    with Session(cfg) as session:
        gen = session.services.generator
        real = gen.update_weights

        def update_weights(weights, version):
            if session.orchestrator.state.step == 3:  # step 3's policy update is done; its sync fails
                raise ServiceError(gen.name, "UpdateWeights", "UNAVAILABLE: injected; retries exhausted",
                                   code=grpc.StatusCode.UNAVAILABLE)
            return real(weights, version)

        gen.update_weights = update_weights
        with pytest.raises(StepFailed) as failed:
            session.orchestrator.run()
    err = failed.value
    assert (err.service, err.call, err.completed_steps) == (gen.name, "UpdateWeights", 3), str(err)
    assert err.checkpoint == cfg.checkpoint_dir / checkpoint.step_name(3)
    lines = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert "sync_seconds" not in lines[-1] and "sync_seconds" in lines[-2], "step 3 is logged without a sync"

    with Session(cfg, resume=True) as session:
        assert session.resumed_from == err.checkpoint
        assert session.orchestrator.state.weight_version > 0, "the resume re-sent the weights"
        session.orchestrator.run()
        got = weights_of(session)
    assert logged_steps(tmp_path / "run") == list(range(1, STEPS + 1))
    want = baselines("grpo")
    assert [k for k in want if not torch.equal(want[k], got[k])] == [], "the resumed run differs from an undisturbed one"


def test_resume_restores_the_line_a_crash_kept_from_the_log(tmp_path) -> None:
    """A crash between a checkpoint and its step's log line: the line comes back from the checkpoint."""
    from orchestrator.run.checkpoint import truncate_step_log

    log = tmp_path / "steps.jsonl"
    line = {n: json.dumps({"step": n, "policy_loss": 0.1 * n}) for n in range(1, 5)}
    log.write_text(line[1] + "\n" + line[2] + "\n")
    truncate_step_log(log, 3, restore=line[3])
    assert log.read_text().splitlines() == [line[1], line[2], line[3]]
    log.write_text("".join(line[n] + "\n" for n in (1, 2, 3, 4)))
    truncate_step_log(log, 2, restore=line[2])
    assert log.read_text().splitlines() == [line[1], line[2]], "steps after the checkpoint go, none twice"


def test_the_cli_says_where_the_state_is_and_how_to_resume(tmp_path) -> None:
    from cli.train import _resume_hint
    from orchestrator.remote.clients import ServiceError
    from orchestrator.step.loop import StepFailed

    cause = ServiceError("reward at 127.0.0.1:1", "Score", "DEADLINE_EXCEEDED: late; retries exhausted",
                         code=grpc.StatusCode.DEADLINE_EXCEEDED)
    err = StepFailed(cause, checkpoint=tmp_path / "step-00000002", completed_steps=2)
    assert str(err) == str(cause)
    hint = _resume_hint(err, "quartet train run.yaml --resume")
    assert str(tmp_path / "step-00000002") in hint and "quartet train run.yaml --resume" in hint
    none = _resume_hint(StepFailed(cause, checkpoint=None, completed_steps=0), "quartet train run.yaml --resume")
    assert "no new checkpoint" in none
