"""`quartet demo`, the README's main job, end to end as a user runs it: the model kit builds the
model and task, the warm-up stops at its held-out accuracy target, the four services start, a
couple of RL steps run, accuracy is measured again, the plot and summary are written into the run's
own numbered directory, and the services are gone afterwards. A second demo into the same directory
reuses the warm-up and writes a new numbered directory, leaving the first run's files as they were.
(How much the demo learns is the learning benchmark's job.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quartet_demo_runs_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "cli.main", "demo", "--steps", "2", "--eval-every", "1", "--run-dir", str(run_dir),
           "--set", "prompts_per_step=4", "--set", "metrics_port=null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "greedy test accuracy:" in out and "warm-up stopped after" in out
    run = run_dir / "001-grpo"
    assert f"run directory: {run}" in " ".join(out.split())

    summary = json.loads((run / "summary.json").read_text())
    assert summary["algo"] == "grpo" and summary["steps"] == 2
    # The warm-up stops once held-out (dev) accuracy reaches 30%: test accuracy lands near it.
    assert 0.1 <= summary["accuracy_before"] <= 0.9
    assert [p["step"] for p in summary["curve"]] == [0, 1, 2]
    assert all("accuracy" in p for p in summary["curve"])
    assert summary["run_dir"] == str(run)
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = json.loads((run_dir / "warmup" / "quartet-warmup.json").read_text())
    assert stamp["accuracy"] == summary["accuracy_before"]
    assert len((run / "steps.jsonl").read_text().splitlines()) == 2

    # The services were started with configs in the run directory: none of them may still run.
    assert len(list((run / "services").glob("*.yaml"))) == 3  # generator, reward, reference
    deadline = time.monotonic() + 10
    while (left := processes_mentioning(str(run_dir))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"services still running after the demo: {left}"

    # Another demo into the same directory: the warm-up is reused, the run gets 002-grpo, 001 is untouched.
    first = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = subprocess.run([*cmd[:5], "1", *cmd[6:]], capture_output=True, text=True, timeout=280)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "reusing the warm-up checkpoint" in out and "warm-up stopped after" not in out
    assert json.loads((run_dir / "002-grpo" / "summary.json").read_text())["steps"] == 1
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == first


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        if any(text.encode() in a for a in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found
