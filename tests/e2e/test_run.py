"""End to end: a 3-step run of each algorithm through the embedded stack (four real service processes).

Each run: completes; every trained parameter changed; the orchestrator's Prometheus endpoint shows
the step metrics; the checkpoint loads with plain AutoModelForCausalLM; the service processes are
gone afterwards (5-8 s each on 2 idle cores). The reward is a plugin (digit share of the completion) so that a random tiny model
already gets varied rewards and every algorithm has a gradient from the first step.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from orchestrator.run.config import RunConfig, build_config

PLUGIN = textwrap.dedent(
    """
    def score(prompts, completions, metadata):
        # Share of digit characters: dense, varied rewards even for a random model.
        return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]
    """
)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from demo.modelkit.arithmetic import make_arithmetic_task

    root = tmp_path_factory.mktemp("e2e-task")
    train, test = make_arithmetic_task(root, n_train=64, n_test=16, seed=0, max_operand=9)
    (root / "digits_reward.py").write_text(PLUGIN)
    return {"root": root, "train": train, "test": test}


def e2e_config(algo: str, policy: Path, task: dict[str, Path], run_dir: Path, *overrides: str) -> RunConfig:
    reward = {"kind": "plugin", "plugin": "digits_reward:score", "plugin_path": str(task["root"]), "workers": 1}
    data = {
        "models": {"policy": str(policy)},
        "services": {"local": True, "local_options": {"reward": reward}},
        "algorithm": {"name": algo, "lr": 1e-3},
        "sampling": {"max_new_tokens": 4},
        "dataset": {"path": str(task["train"])},
        "prompts_per_step": 4,
        "samples_per_prompt": 4,
        "steps": 3,
        "seed": 0,
        "metrics_port": 0,
        "run_dir": str(run_dir),
    }
    return build_config(data, list(overrides))


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


@pytest.mark.parametrize(
    ("algo", "extra"),
    [("grpo", ()), ("ppo", ("algorithm.advantage=gae", "algorithm.epochs=2")), ("trpo", ("algorithm.trpo_max_kl=0.05", "algorithm.trpo_cg_iters=4")),
     ("grpo", ("rollout.pipeline=true",))],
    ids=["grpo", "ppo", "trpo", "grpo-pipelined"],
)
def test_three_steps_through_the_embedded_stack(algo, extra, tiny_checkpoint, task, tmp_path) -> None:
    from orchestrator.run.session import Session

    cfg = e2e_config(algo, tiny_checkpoint, task, tmp_path / "run", *extra)
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_checkpoint).state_dict().items()}
    with Session(cfg) as session:
        assert set(session.stack.services) == {"generator", "reward", "reference"} | ({"value"} if algo == "ppo" else set())
        results = session.orchestrator.run()
        metrics = scrape(session.metrics.port)
        final = session.save_final()
        pids = session.stack.pids
    assert wait_gone(pids) == [], "service processes still running after the run"

    assert [r.step for r in results] == [1, 2, 3]
    for r in results:
        assert all(torch.isfinite(torch.tensor(v)) for v in r.metrics.values()), r.metrics
    assert metrics[("quartet_step", ())] == 3
    assert metrics[("quartet_steps_total", ())] == 3
    for phase in ("generate", "score", "reference", "update", "sync"):
        assert metrics[("quartet_phase_seconds", (("phase", phase),))] > 0
    assert ("quartet_reward", (("stat", "mean"),)) in metrics
    assert any(name == "quartet_reward_service_info" for name, _ in metrics)
    assert metrics[("quartet_weight_sync_bytes_total", ())] > 0
    if algo == "ppo":
        assert metrics[("quartet_phase_seconds", (("phase", "value_train"),))] > 0
        assert "value_loss" in results[-1].metrics
    if algo == "trpo":
        assert sum(r.metrics["trpo_accepted"] for r in results) >= 1
        assert metrics[("quartet_trpo_accepted_ratio", ())] > 0

    if "rollout.pipeline=true" in extra:  # steps 2 and 3 sampled during the update before them, through gRPC
        assert [r.metrics["rollout_staleness"] for r in results] == [0.0, 1.0, 1.0]
        assert metrics[("quartet_rollout_staleness", ())] == 1.0 and metrics[("quartet_is_weight_mean", ())] > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3]

    trained = AutoModelForCausalLM.from_pretrained(final / "policy")
    after = trained.state_dict()
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert unchanged == [], f"parameters not changed by {algo}: {unchanged}"


def test_service_that_cannot_start_stops_the_run_with_its_log(tiny_checkpoint, task, tmp_path) -> None:
    """A run whose reward plugin cannot be imported fails at start-up with the service's log tail."""
    from orchestrator.run.session import Session
    from services.launcher import LaunchError

    cfg = e2e_config("grpo", tiny_checkpoint, task, tmp_path / "run",
                     "services.local_options.reward.plugin=no_such_module:score")
    with pytest.raises(LaunchError, match="reward"), Session(cfg):
        pass
