"""What `quartet train` prints when stdout is not a terminal (nohup, CI, a container log), end to end.

A 3-step PPO run through the embedded stack with stdout on a pipe: a plain progress line after each
step (progress.every_steps=1) with reward, KL, s/step and ETA; no Hugging Face "Loading weights" /
"Writing model shards" bars, neither in the output nor in the service logs; the PPO summary with the
critic's rows; TensorBoard and jsonl experiment logs under the Prometheus names.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.run.config import dump_config
from tests.e2e.test_run import e2e_config, task  # noqa: F401  (task: the module fixture)

ROOT = Path(__file__).resolve().parents[2]
HF_BARS = ("Loading weights", "Writing model shards")


@pytest.mark.slow
def test_non_terminal_run_prints_progress_lines_and_no_third_party_bars(tiny_checkpoint, task, tmp_path) -> None:  # noqa: F811
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    cfg = e2e_config("ppo", tiny_checkpoint, task, run_dir, "algorithm.advantage=gae", "progress.every_steps=1",
                     "report_to=[tensorboard, jsonl]", "checkpoint.interval=1")
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    env = {**os.environ, "COLUMNS": "160"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    out = subprocess.run([sys.executable, "-m", "cli.main", "train", str(path)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    text = out.stdout
    assert out.returncode == 0, text

    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], text
    pattern = r"step \d/3  reward -?\d+\.\d{3}  kl -?\d+\.\d{4}  \d+\.\d{2} s/step  eta \d+m\d{2}s"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    service_logs = "".join(p.read_text(errors="replace") for p in (run_dir / "services").glob("*.log"))
    for bar in HF_BARS:
        assert bar not in text and bar not in service_logs, bar
    assert "value_explained_variance" in text and "value_loss" in text  # the PPO summary shows the critic

    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in jsonl] == [1, 2, 3]
    assert {"quartet_reward_mean", "quartet_kl_reference", "quartet_value_loss",
            "quartet_value_explained_variance"} <= set(jsonl[-1])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
