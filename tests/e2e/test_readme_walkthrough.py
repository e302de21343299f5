"""The README's "A first run of your own", run as written: each line of its code block, unedited, in a
shell whose working directory is a fresh copy of what a clone gives a user (examples/), with `quartet`
being this checkout's command. Only the environment shortens it: QUARTET_MAX_STEPS (default 3 here; the
product's own cap, in `quartet train --help`) ends each `quartet train` after at most that many more
steps with a checkpoint, so the 60 steps become 3, and the resume to 100 becomes steps 4-6.

Then what the text says about the result: one run per directory, its step log holding each step once,
the resume continuing the same run, `latest` naming its newest checkpoint, the second run in a directory
of its own; and a new run into the first run's directory is refused before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## A first run of your own"


def walkthrough() -> list[str]:
    """The command lines of the section's first bash block, as written."""
    section = (ROOT / "README.md").read_text().split(SECTION, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {SECTION!r} in README.md"
    return [line for line in block.group(1).splitlines() if line.strip()]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "quartet").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cli.main "$@"\n')
    (bin_dir / "quartet").chmod(0o755)
    cap = int(os.environ.get("QUARTET_MAX_STEPS", "3"))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "QUARTET_MAX_STEPS": str(cap),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "COLUMNS": "250"}

    def sh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)

    commands = walkthrough()
    out: dict[str, str] = {}
    for command in commands:
        proc = sh(command)
        out[command] = text = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"$ {command}\n{text[-5000:]}"

    demo, first, resume, evaluate, second = commands
    runs = tmp_path / "runs"
    assert (runs / "demo" / "warmup" / "config.json").is_file() and (runs / "demo" / "task" / "test.jsonl").is_file()
    assert "run directory: runs/demo/001-grpo" in out[demo], out[demo]
    assert json.loads((runs / "demo" / "001-grpo" / "summary.json").read_text())["steps"] == 1
    # The first run, then the same run continued: one run id, each step once.
    grpo, n1 = runs / "grpo", min(60, cap)
    n2 = min(100, n1 + cap)
    assert f"stopping at step {n1} of 60" in " ".join(out[first].split()) or n1 == 60, out[first]
    assert re.search(rf"resumed from \S+step-{n1:08d} at step {n1}\b", " ".join(out[resume].split())), out[resume]
    assert logged_steps(grpo) == list(range(1, n2 + 1)), "the step log holds this one run, each step once"
    record = json.loads((grpo / "run.json").read_text())
    assert [(s["how"], s["step"]) for s in record["starts"]] == [("new", 0), ("resume", n1)]
    latest = grpo / "checkpoints" / "latest"
    assert latest.resolve().name == f"step-{n2:08d}"
    stamped = {json.loads(p.read_text())["run_id"] for p in (grpo / "checkpoints").glob("step-*/state.json")}
    assert stamped == {record["run_id"]}
    assert re.search(r"accuracy \d+\.\d%", out[evaluate]) and "latest" in out[evaluate], out[evaluate]
    # The second run: its own directory and id.
    lr = runs / "grpo-lr5e-5"
    assert logged_steps(lr) == list(range(1, min(60, cap) + 1)), out[second]
    assert json.loads((lr / "run.json").read_text())["run_id"] != record["run_id"]

    # What the text says a new run into the first run's directory does: refused, saying what to use.
    before = (grpo / "steps.jsonl").read_text()
    proc = sh("quartet train examples/grpo.yaml")
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0 and "holds another run" in text, text
    assert "quartet train examples/grpo.yaml --resume" in text and "quartet train examples/grpo.yaml --overwrite" in text
    assert (grpo / "steps.jsonl").read_text() == before
