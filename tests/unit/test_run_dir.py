"""Run directories never mix two runs: a new run refuses a run_dir that holds another run (before any
service starts), --overwrite removes that run's files first and says which, --resume continues the run
there (past its old `steps` too) under the same run id, and the step log only ever holds one run.

Whole sessions run in process: `Session._connect` is replaced by the in-memory roles of
test_step_inprocess.py, so everything else (run-dir claim, checkpoints, resume, step log) is the real code.
Seconds, where the same through `quartet train` and four service processes takes minutes (tests/e2e).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from demo.modelkit import TEST_MODEL, build_char_tokenizer, build_tiny_model, save_checkpoint
from orchestrator.run import checkpoint
from orchestrator.run.checkpoint import RunDirError
from orchestrator.run.config import RunConfig, build_config
from orchestrator.run.session import Session
from orchestrator.step.loop import Services
from tests.unit.test_step_inprocess import PROMPTS, FakeGenerator, FakeReference, FakeReward

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_char_tokenizer()
    return save_checkpoint(build_tiny_model(tokenizer, **TEST_MODEL, seed=0), tokenizer,
                           tmp_path_factory.mktemp("policy"))


@pytest.fixture
def contacted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Session._connect with in-memory roles; the list records every run that reached its services."""
    reached: list[str] = []

    def connect(self: Session) -> Services:
        reached.append(self.cfg.run_dir)
        tokenizer = build_char_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(self.cfg.models.policy)
        gen, reward, ref = FakeGenerator(model, tokenizer), FakeReward(), FakeReference(model)
        self.services = Services(gen, [reward], ref, None)
        self.infos = {"generator": gen.info(), "reference": ref.info(), "reward[0]": reward.info()}
        return self.services

    monkeypatch.setattr(Session, "_connect", connect)
    return reached


def config(tmp_path: Path, policy_dir: Path, *sets: str) -> RunConfig:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "0"}) + "\n" for p in PROMPTS))
    return build_config({
        "models": {"policy": str(policy_dir)}, "services": {"local": True},
        "algorithm": {"name": "grpo", "lr": 1e-3}, "sampling": {"max_new_tokens": 4},
        "dataset": {"path": str(data), "shuffle": False}, "prompts_per_step": 2, "samples_per_prompt": 2,
        "steps": 2, "seed": 0, "metrics_port": None, "checkpoint": {"interval": 1, "keep": 1},
        "run_dir": str(tmp_path / "run"),
    }, list(sets))


def run(cfg: RunConfig, **kw) -> tuple[Session, list[str]]:
    """One whole session (as `quartet train`); returns it and what it logged."""
    said: list[str] = []
    with Session(cfg, log=said.append, **kw) as session:
        session.orchestrator.run()
        session.save_final()
    return session, said


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def cfg_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("leftover", ["steps.jsonl", "checkpoints", "services"])
def test_a_new_run_refuses_a_run_dir_holding_another_run(leftover, policy_dir, contacted, tmp_path) -> None:
    cfg = config(tmp_path, policy_dir)
    run_dir = tmp_path / "run"
    if leftover == "steps.jsonl":
        (run_dir).mkdir()
        (run_dir / "steps.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    elif leftover == "checkpoints":
        (run_dir / "checkpoints" / "step-00000040").mkdir(parents=True)
        (run_dir / "checkpoints" / "step-00000040" / checkpoint.MARKER).write_text("step-00000040\n")
    else:
        (run_dir / "services").mkdir(parents=True)
        (run_dir / "services" / "generator.log").write_text("an old run's log\n")
    before = tree(run_dir)

    with pytest.raises(RunDirError) as err:
        Session(cfg).open()
    msg = str(err.value)
    assert f"run_dir {run_dir} holds another run" in msg and "--resume" in msg and "--overwrite" in msg, msg
    assert {"steps.jsonl": "steps.jsonl with 2 steps", "checkpoints": "checkpoints step-00000040",
            "services": "1 service logs"}[leftover] in msg
    assert contacted == [], "refused before any service was started or reached"
    assert tree(run_dir) == before, "a refused run leaves the directory as it was (no config.yaml, no run.json)"


def test_overwrite_removes_the_old_runs_files_and_says_which(policy_dir, contacted, tmp_path) -> None:
    cfg = config(tmp_path, policy_dir, "steps=1")
    old, _ = run(config(tmp_path, policy_dir, "steps=2"))
    run_dir = tmp_path / "run"
    (run_dir / "services").mkdir()
    (run_dir / "services" / "generator.log").write_text("the old run's log\n")
    (run_dir / "notes.txt").write_text("mine")  # not a run's file: never removed

    new, said = run(cfg, overwrite=True)
    removed = next(m for m in said if m.startswith("--overwrite: removed"))
    assert old.run_id in removed and "steps.jsonl with 2 steps" in removed and "step-00000002" in removed, removed
    assert "1 service logs" in removed
    assert new.run_id != old.run_id and checkpoint.read_run_id(run_dir) == new.run_id
    assert logged_steps(run_dir) == [1], "only the new run in the step log"
    assert [p.name for p in checkpoint.complete_checkpoints(cfg.checkpoint_dir)] == ["step-00000001"]
    assert not (run_dir / "services").exists() and (run_dir / "notes.txt").read_text() == "mine"


def test_resume_with_more_steps_continues_the_same_run(policy_dir, contacted, tmp_path) -> None:
    first, _ = run(config(tmp_path, policy_dir))  # steps=2, a checkpoint every step, keep 1
    run_dir = tmp_path / "run"
    assert logged_steps(run_dir) == [1, 2]
    with pytest.raises(RunDirError):  # the README's old `--set steps=100` without --resume
        Session(config(tmp_path, policy_dir, "steps=4")).open()

    again, said = run(config(tmp_path, policy_dir, "steps=4"), resume=True)
    assert again.resumed_from == cfg_dir(run_dir) / "step-00000002"
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000002'} at step 2" in said
    assert again.orchestrator.state.step == 4 and logged_steps(run_dir) == [1, 2, 3, 4]
    assert again.run_id == first.run_id == checkpoint.read_run_id(run_dir)
    latest = cfg_dir(run_dir) / checkpoint.LATEST
    assert latest.resolve() == (cfg_dir(run_dir) / "step-00000004").resolve()
    assert checkpoint.checkpoint_run_id(latest) == first.run_id
    starts = json.loads((run_dir / "run.json").read_text())["starts"]
    assert [(s["how"], s["step"]) for s in starts] == [("new", 0), ("resume", 2)]


def test_max_steps_stops_early_and_resume_goes_on(policy_dir, contacted, tmp_path) -> None:
    cfg = config(tmp_path, policy_dir, "steps=4", "checkpoint.interval=0")
    first, said = run(cfg, max_steps=1)
    run_dir = tmp_path / "run"
    assert first.orchestrator.state.step == 1 and any("stopping at step 1 of 4" in m for m in said), said
    assert checkpoint.latest(cfg.checkpoint_dir).name == "step-00000001", "the stop leaves a checkpoint"
    again, _ = run(cfg, resume=True, max_steps=2)
    assert again.orchestrator.state.step == 3 and logged_steps(run_dir) == [1, 2, 3]
    assert again.run_id == first.run_id
    done, _ = run(cfg, resume=True, max_steps=5)
    assert done.orchestrator.state.step == 4 and logged_steps(run_dir) == [1, 2, 3, 4]
    _, said = run(cfg, resume=True)
    assert any("is at step 4 and steps=4: nothing to run" in m for m in said), said


def test_a_resume_without_a_checkpoint_restarts_the_same_run_with_an_empty_step_log(
        policy_dir, contacted, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "20260101-000000-abcdef", "starts": []}))
    (run_dir / "steps.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # crashed before its first checkpoint
    session, said = run(config(tmp_path, policy_dir, "steps=1"), resume=True)
    assert session.run_id == "20260101-000000-abcdef" and any("starting from step 0" in m for m in said), said
    assert logged_steps(run_dir) == [1], "the old lines went: the step log holds each step once"


def test_resume_and_overwrite_exclude_each_other(policy_dir, contacted, tmp_path) -> None:
    with pytest.raises(RunDirError, match="exclude each other"):
        Session(config(tmp_path, policy_dir), resume=True, overwrite=True).open()
    assert contacted == []


def test_quartet_train_refusal_prints_both_commands(policy_dir, contacted, tmp_path) -> None:
    from cli.main import app

    cfg = config(tmp_path, policy_dir)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "steps.jsonl").write_text('{"step": 1}\n')
    result = CliRunner().invoke(app, ["train", str(path), "--set", "steps=9"], terminal_width=400)
    out = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "holds another run" in out
    assert f"continue it: quartet train {path} --set steps=9 --resume" in out, out
    assert f"start over: quartet train {path} --set steps=9 --overwrite" in out, out
    assert contacted == []
