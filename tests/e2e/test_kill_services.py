"""Each service SIGKILLed mid-run: the launcher restarts it, the run completes, every step is logged
once, and the final policy equals an undisturbed run's bit for bit (issue 7).

One PPO run with GAE and a KL term uses all four roles, so a single undisturbed baseline (module
fixture) serves every case. The kill lands right after step 2's log line (from the step callback, so
always between the same two steps): the next call to the killed service fails, is retried until the
replacement serves, and the orchestrator brings it up to date:
- generator: it serves weight version 0 again; GetInfo before Generate says so and the policy is
  re-sent first;
- value: it comes back untrained; GetInfo says so, and it loads the critic saved after step 2
  (checkpoint.value_interval=1), so no training is lost and the weights match too;
- reward, reference: stateless, they simply answer again.
Three more cases kill a stateful service as step 3 calls it (the client method is wrapped to SIGKILL
the service first): the generator at Generate, whose retry is answered by the replacement with
weight version 0 (the policy is re-sent and the step samples again with the same seed); the generator
at UpdateWeights, whose retried stream must leave the replacement serving the new weights; the value
service at TrainStep, which the retry applies to an untrained critic: the orchestrator sees the
counters, reloads and redoes the rollout.
CPU, fp32, seeded sampling: any difference in what the trainer saw would show in the weights.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.e2e.test_run import e2e_config, task, wait_gone  # noqa: F401  (task is a fixture)

pytestmark = pytest.mark.slow  # seven runs of 5 steps and a baseline: ~3 min on 2 busy cores

STEPS = 5
KILL_AFTER = 2
SETS = (
    f"steps={STEPS}", "algorithm.advantage=gae", "algorithm.kl_coef=0.05", "metrics_port=null",
    # Patient retries: a restarted service needs a few seconds (interpreter, torch, model) to serve again.
    "services.retry.max_attempts=100", "services.retry.initial_backoff_s=0.1", "services.retry.max_backoff_s=0.5",
    "services.retry.budget_s=90", "services.local_options.restart_backoff_s=0.2",
)


# Kills during a call of step KILL_AFTER + 1: the client method that SIGKILLs its service first, and the
# completed steps (orchestrator state) when step KILL_AFTER + 1 calls it (the sync follows the update).
DURING = {"Generate": ("generator", "generate", KILL_AFTER), "UpdateWeights": ("generator", "update_weights", KILL_AFTER + 1),
          "TrainStep": ("value", "train_step", KILL_AFTER)}


def run(cfg, *, kill: str | None = None, during: str | None = None) -> dict:
    """Run cfg through the embedded stack, SIGKILLing `kill` after step KILL_AFTER (or as step KILL_AFTER + 1
    calls it); what the test checks."""
    from orchestrator.run.session import Session

    killed: list[int] = []
    with Session(cfg) as session:
        stack, o = session.stack, session.orchestrator

        def sigkill() -> None:
            pid = stack.procs[kill].pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        def on_step(r) -> None:
            if kill is not None and during is None and r.step == KILL_AFTER:
                sigkill()

        if during is not None:
            role, method, at = DURING[during]
            assert role == kill
            client = getattr(session.services, kill)
            real = getattr(client, method)

            def killing_call(*args, **kwargs):
                if not killed and o.state.step == at:
                    sigkill()
                return real(*args, **kwargs)

            setattr(client, method, killing_call)
        o.run(on_step)
        weights = {k: v.detach().clone() for k, v in session.orchestrator.policy.state_dict().items()}
        restarts = dict(stack.restarts)
        pids = stack.pids
    assert wait_gone(pids) == [], "service processes still running after the run"
    lines = [json.loads(line) for line in (Path(cfg.run_dir) / "steps.jsonl").read_text().splitlines()]
    return {"weights": weights, "lines": lines, "restarts": restarts, "killed": killed}


@pytest.fixture(scope="module")
def undisturbed(tiny_checkpoint, task, tmp_path_factory) -> dict:  # noqa: F811
    cfg = e2e_config("ppo", tiny_checkpoint, task, tmp_path_factory.mktemp("kill") / "undisturbed", *SETS)
    out = run(cfg)
    assert [line["step"] for line in out["lines"]] == list(range(1, STEPS + 1))
    assert not any("recovery" in line for line in out["lines"]), "an undisturbed run needed no recovery"
    return out


@pytest.mark.parametrize(("service", "during"), [
    ("generator", None), ("reward", None), ("reference", None), ("value", None),
    ("generator", "Generate"), ("generator", "UpdateWeights"), ("value", "TrainStep"),
], ids=lambda v: v or "between-steps")
def test_sigkilled_service_rejoins_and_the_run_is_unchanged(service, during, undisturbed, tiny_checkpoint,
                                                             task, tmp_path) -> None:  # noqa: F811
    cfg = e2e_config("ppo", tiny_checkpoint, task, tmp_path / "run", *SETS)
    out = run(cfg, kill=service, during=during)

    assert len(out["killed"]) == 1
    assert out["restarts"][service] >= 1, f"the launcher did not restart the {service}"
    assert [line["step"] for line in out["lines"]] == list(range(1, STEPS + 1)), "every step exactly once"
    recovery = {}
    for line in out["lines"]:
        for action, n in line.get("recovery", {}).items():
            recovery[action] = recovery.get(action, 0) + n
    if during == "UpdateWeights":  # the retried stream brought it up to date
        assert recovery == {}, recovery
    elif service == "generator":  # GetInfo (between steps) or the Generate answer's version (in Generate)
        assert recovery.get("weight_resends", 0) >= 1, recovery
    elif service == "value":
        assert recovery.get("value_reloads", 0) >= 1, recovery
        assert recovery.get("value_lost_train_steps", 0) == 0, "the critic was saved after every step"
        if during == "TrainStep":  # it went to an untrained critic: reloaded, and the rollout redone
            assert recovery.get("rollout_redos", 0) >= 1, recovery
    else:
        assert recovery == {}, f"a restarted {service} needs no more than retries: {recovery}"

    want, got = undisturbed["weights"], out["weights"]
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert different == [], f"killing the {service} changed the final weights: {different}"
