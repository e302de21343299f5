"""Checkpoints: a snapshot saved and read back restores the run (policy bit for bit, optimizer state,
data cursor, RNG streams); writes are atomic; retention (only the saving run's checkpoints, never the one
just written); `latest`; the step log a resume keeps."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from demo.modelkit import TEST_MODEL, build_char_tokenizer, build_tiny_model
from orchestrator.run import checkpoint
from orchestrator.run.config import build_config
from orchestrator.run.data import Cursor


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    return build_tiny_model(tokenizer, **TEST_MODEL, seed=0)


def snapshot(policy, tokenizer, tmp_path: Path, *, step: int = 3, **kw) -> checkpoint.Snapshot:
    cfg = build_config({"models": {"policy": str(tmp_path / "unused")}, "services": {"local": True},
                        "dataset": {"path": str(tmp_path / "unused.jsonl")}, "run_dir": str(tmp_path / "run")})
    fields = dict(step=step, cursor=Cursor(epoch=1, position=2), weight_version=4, policy=policy, tokenizer=tokenizer,
                  trainer_state=None, rng=checkpoint.rng_states(), value_checkpoint=None, value_last_step_id=None,
                  log_line=json.dumps({"step": step}), config=cfg)
    return checkpoint.Snapshot(**{**fields, **kw})


def draws() -> tuple[torch.Tensor, float, float]:
    return torch.rand(3), random.random(), float(np.random.rand())


def test_round_trip_restores_policy_optimizer_cursor_and_rng(policy, tokenizer, tmp_path) -> None:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    policy.zero_grad()
    policy(torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[1, 5, 6, 7]])).loss.backward()
    optimizer.step()  # some optimizer state (exp_avg, exp_avg_sq, step) worth restoring
    trainer_state = {"optimizer": optimizer.state_dict(), "updates": 1}
    snap = snapshot(policy, tokenizer, tmp_path, trainer_state=trainer_state, value_checkpoint="run-step-00000003",
                    value_last_step_id=2)
    want = draws()  # what the run draws next after the snapshot's RNG states
    path = checkpoint.save(tmp_path / "ckpt", snap)
    draws()  # the process moves on

    got = checkpoint.read(path)
    assert path.name == "step-00000003" and got.path == path
    assert (got.step, got.cursor, got.weight_version) == (3, Cursor(1, 2), 4)
    assert (got.value_checkpoint, got.value_last_step_id, got.log_line) == ("run-step-00000003", 2, snap.log_line)
    checkpoint.set_rng_states(got.rng)
    again = draws()
    assert torch.equal(again[0], want[0]) and again[1:] == want[1:], "the next random numbers are the same"
    # Policy: plain transformers loads it, bit for bit.
    loaded = AutoModelForCausalLM.from_pretrained(path / "policy")
    theirs = loaded.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in policy.state_dict().items())
    # Optimizer: a fresh optimizer on the loaded model takes the saved state.
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    fresh.load_state_dict(got.trainer_state["optimizer"])
    for a, b in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    assert got.trainer_state["updates"] == 1
    assert "models:" in (path / "config.yaml").read_text()


def test_a_half_written_checkpoint_is_never_listed(policy, tokenizer, tmp_path) -> None:
    class Crashing:
        def save_pretrained(self, *_args, **_kw) -> None:
            raise OSError("disk full")

    ckpt_dir = tmp_path / "ckpt"
    checkpoint.save(ckpt_dir, snapshot(policy, tokenizer, tmp_path, step=1))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(ckpt_dir, replace(snapshot(policy, tokenizer, tmp_path, step=2), tokenizer=Crashing()))
    assert any(p.name.startswith(".tmp-step-00000002") for p in ckpt_dir.iterdir()), "the crash left its temp dir"
    (ckpt_dir / "step-00000005").mkdir()  # a directory without the COMPLETE marker
    assert [p.name for p in checkpoint.complete_checkpoints(ckpt_dir)] == ["step-00000001"]
    assert checkpoint.latest(ckpt_dir) == ckpt_dir / "step-00000001"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.read(ckpt_dir / "step-00000005")


def test_retention_keeps_n_and_never_the_one_just_written(policy, tokenizer, tmp_path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    assert checkpoint.latest(ckpt_dir) is None
    snap = snapshot(policy, tokenizer, tmp_path)
    for step in (1, 2, 3, 4):
        checkpoint.save(ckpt_dir, replace(snap, step=step), keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(ckpt_dir)] == ["step-00000003", "step-00000004"]
    assert checkpoint.latest(ckpt_dir) == ckpt_dir / "step-00000004"
    # An older step written last (a fallback checkpoint below newer ones) is kept all the same.
    path = checkpoint.save(ckpt_dir, replace(snap, step=2), keep=1)
    assert checkpoint.is_complete(path)
    assert [p.name for p in checkpoint.complete_checkpoints(ckpt_dir)] == ["step-00000002", "step-00000004"]
    # A step written again replaces its old copy.
    again = checkpoint.save(ckpt_dir, replace(snap, step=4, log_line='{"step": 4, "again": 1}'), keep=2)
    assert checkpoint.read(again).log_line == '{"step": 4, "again": 1}'


def test_retention_deletes_only_checkpoints_of_the_run_that_saves(policy, tokenizer, tmp_path) -> None:
    """The issue's case: a new 5-step run saved into a checkpoint directory that held a 40-step run's
    step-30 and step-40; `keep: 2` deleted the new step-5 at once and kept the old run's."""
    ckpt_dir, run_dir = tmp_path / "ckpt", tmp_path / "run"
    snap = snapshot(policy, tokenizer, tmp_path)
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "old-run"}))
    for step in (30, 40):
        checkpoint.save(ckpt_dir, replace(snap, step=step), keep=2)
    (run_dir / "run.json").write_text(json.dumps({"run_id": "new-run"}))
    first = checkpoint.save(ckpt_dir, replace(snap, step=5), keep=2)
    assert checkpoint.is_complete(first), "never the checkpoint just written"
    for step in (6, 7):
        checkpoint.save(ckpt_dir, replace(snap, step=step), keep=2)
    names = [p.name for p in checkpoint.complete_checkpoints(ckpt_dir)]
    assert names == ["step-00000006", "step-00000007", "step-00000030", "step-00000040"], "the old run's untouched"
    assert [checkpoint.checkpoint_run_id(ckpt_dir / n) for n in names] == ["new-run"] * 2 + ["old-run"] * 2
    assert checkpoint.latest(ckpt_dir, run_id="new-run") == ckpt_dir / "step-00000007"
    latest = ckpt_dir / checkpoint.LATEST
    assert latest.is_symlink() and latest.resolve() == (ckpt_dir / "step-00000007").resolve()
    assert AutoModelForCausalLM.from_pretrained(latest / "policy") is not None, "loads through the link"


def test_truncate_step_log_keeps_each_step_once_and_restores_a_lost_line(tmp_path) -> None:
    log = tmp_path / "steps.jsonl"
    line = {n: json.dumps({"step": n, "policy_loss": 0.1 * n}) for n in range(1, 5)}
    log.write_text(line[1] + "\n" + line[2] + "\n" + line[2] + "\n" + line[3] + "\n" + line[4] + "\n")
    checkpoint.truncate_step_log(log, 2)
    assert log.read_text().splitlines() == [line[1], line[2]], "steps after the checkpoint go, none twice"
    checkpoint.truncate_step_log(log, 3, restore=line[3])  # a crash came between checkpoint 3 and its line
    assert log.read_text().splitlines() == [line[1], line[2], line[3]]
    checkpoint.truncate_step_log(log, 3, restore=json.dumps({"step": 3, "other": 1}))
    assert log.read_text().splitlines()[-1] == line[3], "a logged line wins over the checkpoint's copy"
    missing = tmp_path / "none.jsonl"
    checkpoint.truncate_step_log(missing, 0)
    assert not missing.exists()
