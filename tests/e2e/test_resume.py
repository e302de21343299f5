"""Resume: 4 steps straight vs 2 steps, kill -9 of the orchestrator, `--resume` for the rest -> the
same final policy weights, bit for bit (CPU, fp32, seeded sampling and a checkpointed trainer RNG).

Both runs go through `quartet train` as a subprocess, the way a user runs it. The interrupted run
is held after step 2 by the QUARTET_HANG_AFTER_STEP test hook (so the kill lands at a known step)
and killed with SIGKILL: no atexit, no signal handler; its services must still go away (they ask
the kernel for SIGTERM when their parent dies).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.e2e.test_run import e2e_config, task, wait_gone  # noqa: F401  (task is a fixture)


def train(cfg_path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli.main", "train", str(cfg_path), *args]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "policy" / "model.safetensors")


def service_pids(run_dir: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in (run_dir / "services").glob("*.ready.json")]


@pytest.mark.slow
def test_kill9_and_resume_gives_the_same_weights(tiny_checkpoint, task, tmp_path) -> None:  # noqa: F811
    sets = ("steps=4", "checkpoint.interval=1", "checkpoint.keep=10", "metrics_port=null")
    straight = write_config(e2e_config("grpo", tiny_checkpoint, task, tmp_path / "straight", *sets), tmp_path / "a.yaml")
    broken = write_config(e2e_config("grpo", tiny_checkpoint, task, tmp_path / "broken", *sets), tmp_path / "b.yaml")

    a = train(straight)
    b = train(broken, env={"QUARTET_HANG_AFTER_STEP": "2"})
    out_a = a.communicate(timeout=240)[0].decode()
    assert a.returncode == 0, out_a

    # Kill -9 once step 2 is logged (its checkpoint is complete before the log line is written).
    log = tmp_path / "broken" / "steps.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert b.poll() is None, b.stdout.read().decode()
        time.sleep(0.1)
    pids = service_pids(tmp_path / "broken")
    os.kill(b.pid, signal.SIGKILL)
    b.wait()
    assert wait_gone(pids) == [], "services outlived the killed orchestrator"

    c = train(broken, "--resume")
    out_c = c.communicate(timeout=240)[0].decode()
    assert c.returncode == 0, out_c
    assert "resumed from" in out_c and "step 2" in out_c

    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "every step exactly once in the step log"
    want, got = final_weights(tmp_path / "straight", 4), final_weights(tmp_path / "broken", 4)
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert different == [], f"resumed run differs in {different}"
