"""Resume: 4 steps straight vs a run SIGKILLed once step 2 is logged, then `--resume` -> the same
final policy weights, bit for bit (CPU, fp32, seeded sampling and a checkpointed trainer RNG).

Both runs go through `quartet train` as a subprocess, the way a user runs it. The interrupted run
is killed with SIGKILL (no atexit, no signal handler) as soon as step 2's line is in the step log;
its services must still go away (they ask the kernel for SIGTERM when their parent dies).

Where the kill lands is a race with step 3, on purpose: with checkpoint.interval=1 step 2's
checkpoint is complete before its line is written, but the kill may come while step 3 runs, while
its checkpoint is written, or after it is complete and before its line. Every case must resume to the
same result: from step-2 (step 3 redone) or from step-3 (whose checkpoint carries step 3's line, which
the resume writes back when the kill beat it).
"""

from __future__ import annotations

import json
import os
import re
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


def train(cfg_path: Path, *args: str, out: Path | None = None) -> subprocess.Popen:
    """`quartet train` as a subprocess; its output to `out` (a file) or a pipe."""
    cmd = [sys.executable, "-m", "cli.main", "train", str(cfg_path), *args]
    if out is None:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with out.open("wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "policy" / "model.safetensors")


def service_pids(run_dir: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in (run_dir / "services").glob("*.ready.json")]


@pytest.mark.slow
def test_kill9_and_resume_gives_the_same_weights(tiny_checkpoint, task, tmp_path) -> None:  # noqa: F811
    # 8 prompts, 4 a step: an epoch is 2 steps, so the kill after step 2 leaves a checkpoint exactly at an
    # epoch's end (the resume must go on into epoch 2, as the straight run does; other trainers stopped there).
    eight = tmp_path / "eight.jsonl"
    eight.write_text("".join(task["train"].read_text().splitlines(keepends=True)[:8]))
    sets = ("steps=4", "checkpoint.interval=1", "checkpoint.keep=10", "metrics_port=null", f"dataset.path={eight}")
    straight = write_config(e2e_config("grpo", tiny_checkpoint, task, tmp_path / "straight", *sets), tmp_path / "a.yaml")
    broken = write_config(e2e_config("grpo", tiny_checkpoint, task, tmp_path / "broken", *sets), tmp_path / "b.yaml")

    # Output to files: no unread pipe can stall either run while the test watches the step log.
    a = train(straight, out=tmp_path / "a.out")
    b = train(broken, out=tmp_path / "b.out")
    # Kill -9 as soon as step 2 is logged.
    log = tmp_path / "broken" / "steps.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert b.poll() is None, (tmp_path / "b.out").read_text()
        time.sleep(0.01)
    pids = service_pids(tmp_path / "broken")
    os.kill(b.pid, signal.SIGKILL)
    b.wait()
    assert wait_gone(pids) == [], "services outlived the killed orchestrator"
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert logged[:2] == [1, 2] and logged[-1] < 4, f"the kill came too late to interrupt the run: {logged}"

    assert a.wait(timeout=240) == 0, (tmp_path / "a.out").read_text()
    c = train(broken, "--resume")
    out_c = c.communicate(timeout=240)[0].decode()
    assert c.returncode == 0, out_c
    resumed = re.search(r"resumed from .*? at step (\d+)", " ".join(out_c.split()))  # rich wraps long paths
    assert resumed and int(resumed.group(1)) in (2, 3), out_c

    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "every step exactly once in the step log"
    want, got = final_weights(tmp_path / "straight", 4), final_weights(tmp_path / "broken", 4)
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert different == [], f"resumed run differs in {different}"
