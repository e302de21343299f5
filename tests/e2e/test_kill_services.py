"""Each service SIGKILLed mid-run: the launcher restarts it, the run completes, every step is logged
once, and the final policy equals an undisturbed run's bit for bit (issue 7).

One PPO run with GAE and a KL term uses all four roles, so a single undisturbed baseline (module
fixture) serves every case. The kill lands right after step 2's log line (from the step callback, so
always between the same two steps): the next call to the killed service fails, is retried until the
replacement serves, and the orchestrator brings it up to date:
- generator: it serves weight version 0 again; the Generate answer says so, the policy is re-sent
  and the step samples again with the same seed;
- value: it comes back untrained; GetInfo says so, and it loads the critic saved after step 2
  (checkpoint.value_interval=1), so no training is lost and the weights match too;
- reward, reference: stateless, they simply answer again.
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

STEPS = 6
KILL_AFTER = 2
SETS = (
    f"steps={STEPS}", "algorithm.advantage=gae", "algorithm.kl_coef=0.05", "metrics_port=null",
    # Patient retries: a restarted service needs a few seconds (interpreter, torch, model) to serve again.
    "services.retry.max_attempts=100", "services.retry.initial_backoff_s=0.1", "services.retry.max_backoff_s=0.5",
    "services.retry.budget_s=90", "services.local_options.restart_backoff_s=0.2",
)


def run(cfg, *, kill: str | None = None) -> dict:
    """Run cfg through the embedded stack, SIGKILLing `kill` after step KILL_AFTER; what the test checks."""
    from orchestrator.session import Session

    killed: list[int] = []
    with Session(cfg) as session:
        stack = session.stack

        def on_step(r) -> None:
            if kill is not None and r.step == KILL_AFTER:
                pid = stack.procs[kill].pid
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        session.orchestrator.run(on_step)
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


@pytest.mark.parametrize("service", ["generator", "reward", "reference", "value"])
def test_sigkilled_service_rejoins_and_the_run_is_unchanged(service, undisturbed, tiny_checkpoint, task,  # noqa: F811
                                                             tmp_path) -> None:
    cfg = e2e_config("ppo", tiny_checkpoint, task, tmp_path / "run", *SETS)
    out = run(cfg, kill=service)

    assert len(out["killed"]) == 1
    assert out["restarts"][service] >= 1, f"the launcher did not restart the {service}"
    assert [line["step"] for line in out["lines"]] == list(range(1, STEPS + 1)), "every step exactly once"
    recovery = {}
    for line in out["lines"]:
        for action, n in line.get("recovery", {}).items():
            recovery[action] = recovery.get(action, 0) + n
    if service == "generator":
        assert recovery.get("weight_resends", 0) >= 1, recovery
    elif service == "value":
        assert recovery.get("value_reloads", 0) >= 1, recovery
        assert recovery.get("value_lost_train_steps", 0) == 0, "the critic was saved after every step"
    else:
        assert recovery == {}, f"a restarted {service} needs no more than retries: {recovery}"

    want, got = undisturbed["weights"], out["weights"]
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert different == [], f"killing the {service} changed the final weights: {different}"
