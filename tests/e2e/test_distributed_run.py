"""`quartet train` under torchrun with 2 gloo ranks on CPU against one process, same config and seed:
a GRPO run of 4 steps through the embedded stack, the 2-rank run stopped after 2 steps (--max-steps)
and resumed with 2 ranks. The step-log losses and the final policy weights equal the one-process
run's within fp32 tolerance; rank 0 alone logs, serves metrics and checkpoints.

Both runs go through the command line as a user runs them (torchrun on 127.0.0.1, a free port).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.test_resume import final_weights, write_config
from tests.e2e.test_run import e2e_config, task  # noqa: F401  (task is a fixture)

# Step-log metrics of the policy update compared between the runs (GRPO logs each of them).
LOSS_KEYS = ("policy_loss", "kl_ref", "entropy", "grad_norm", "approx_kl", "clipfrac")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quartet_train(cfg_path: Path, *args: str, ranks: int, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cli.main", "train", str(cfg_path), *args]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), *cmd[1:]]
    # gloo on the loopback interface only; one intra-op thread per rank on a 2-core machine.
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    with out.open("wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def finish(proc: subprocess.Popen, out: Path) -> str:
    assert proc.wait(timeout=240) == 0, out.read_text()
    return out.read_text()


def step_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_train_and_resume_like_one_process(tiny_checkpoint, task, tmp_path) -> None:  # noqa: F811
    sets = ("steps=4", "metrics_port=0", "progress.mode=lines", "models.threads=1")
    one = write_config(e2e_config("grpo", tiny_checkpoint, task, tmp_path / "one", *sets), tmp_path / "one.yaml")
    two = write_config(e2e_config("grpo", tiny_checkpoint, task, tmp_path / "two", *sets), tmp_path / "two.yaml")

    straight = quartet_train(one, ranks=1, out=tmp_path / "one.out")
    first = quartet_train(two, "--max-steps", "2", ranks=2, out=tmp_path / "two-a.out")
    out_first = finish(first, tmp_path / "two-a.out")
    resumed = quartet_train(two, "--resume", ranks=2, out=tmp_path / "two-b.out")
    finish(straight, tmp_path / "one.out")
    out_resumed = finish(resumed, tmp_path / "two-b.out")

    # Rank 0 alone serves metrics, reports progress and resumes (rank 1 prints nothing).
    for out in (out_first, out_resumed):
        assert out.count("metrics: http://127.0.0.1:") == 1, out
    assert "resumed from" in out_resumed and "at step 2" in " ".join(out_resumed.split()), out_resumed

    a, b = step_log(tmp_path / "one"), step_log(tmp_path / "two")
    assert [line["step"] for line in b] == [1, 2, 3, 4], "every step exactly once, from rank 0 only"
    worst: dict[str, float] = {}
    for x, y in zip(a, b, strict=True):
        assert y["reward"] == pytest.approx(x["reward"], abs=1e-6)  # the same samples: the same weights sampled
        for key in LOSS_KEYS:
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key, x[key], y[key])
            worst[key] = max(worst.get(key, 0.0), abs(x[key] - y[key]))
    want, got = final_weights(tmp_path / "one", 4), final_weights(tmp_path / "two", 4)
    assert want.keys() == got.keys()
    weight_diff = max(float((want[k] - got[k]).abs().max()) for k in want)
    print(f"2 ranks vs 1: max |weight diff| {weight_diff:.2e}; max |step-log diff| "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    # Adam's m / sqrt(v) turns ~1e-8 gradient differences into ~1e-6 weight differences after a few steps.
    assert weight_diff < 1e-4
    # And the run did train: the weights moved far more than the ranks differ.
    start = final_weights(tmp_path / "two", 2)
    assert max(float((start[k] - got[k]).abs().max()) for k in got) > 100 * max(weight_diff, 1e-7)
    assert torch.isfinite(torch.tensor([line["policy_loss"] for line in b])).all()


@pytest.mark.slow
def test_a_run_that_fails_on_rank_0_stops_the_other_ranks(tiny_checkpoint, task, tmp_path) -> None:  # noqa: F811
    # The reward service cannot start: rank 0 fails in its session, before any update; rank 1, waiting
    # for rank 0's next message, must be told to stop and exit cleanly rather than wait out its timeout.
    cfg = e2e_config("grpo", tiny_checkpoint, task, tmp_path / "run", "metrics_port=null",
                     "services.local_options.reward.plugin=no_such_module:score")
    proc = quartet_train(write_config(cfg, tmp_path / "bad.yaml"), ranks=2, out=tmp_path / "bad.out")
    assert proc.wait(timeout=120) != 0
    out = tmp_path / "bad.out"
    text = " ".join(out.read_text().split())
    assert "local reward service exited" in text, text
    # torchrun's report: rank 0 failed, and no other rank did.
    assert "local_rank: 0" in text and "<NO_OTHER_FAILURES>" in text, text
