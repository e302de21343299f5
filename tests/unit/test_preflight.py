"""Preflight: what a run config points at is checked before any service starts, every problem at once.

Each of the cases that used to surface only after 30-80 s of starting services (a missing model
directory, a missing dataset, a malformed dataset line, a busy metrics port) is reported here within
seconds, naming the config field; several at once are all listed; `quartet train` prints them and
exits 2 without a traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.run import reporting
from orchestrator.run.config import RunConfig, build_config
from orchestrator.run.preflight import PreflightError, check, require

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(5)))
    return path


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def config(policy: Path | str, dataset: Path | str, run_dir: Path, **top: object) -> dict:
    return {"models": {"policy": str(policy)}, "services": {"local": True}, "dataset": {"path": str(dataset)},
            "run_dir": str(run_dir), **top}


def problems_of(data: dict) -> dict[str, str]:
    return {p.field: p.message for p in check(build_config(data))}


def test_a_sound_config_has_no_problem(tiny_checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    cfg: RunConfig = build_config(config(tiny_checkpoint, dataset, tmp_path / "run", metrics_port=0))
    start = time.perf_counter()
    assert check(cfg) == []
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "run").exists(), "preflight creates nothing"


def test_missing_model_directory_names_models_policy(dataset: Path, tmp_path: Path) -> None:
    found = problems_of(config(tmp_path / "no-such-model", dataset, tmp_path / "run"))
    assert list(found) == ["models.policy"]
    assert "does not exist" in found["models.policy"] and "config.json" in found["models.policy"]


def test_model_directory_without_tokenizer(tiny_checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    found = problems_of(config(bare, dataset, tmp_path / "run"))
    assert list(found) == ["models.policy"] and "no tokenizer" in found["models.policy"]



def test_unreadable_config_and_tokenizer_are_both_reported(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "tokenizer.json").write_text("{not json either")
    messages = [p.message for p in check(build_config(config(broken, dataset, tmp_path / "run")))
                if p.field == "models.policy"]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"{str(broken)!r}: config.json is missing or unreadable (")
    assert messages[1].startswith(f"{str(broken)!r}: the tokenizer cannot be loaded (")
    assert all(m.endswith("(config.json and tokenizer files)") for m in messages)

def test_reference_and_value_directories_are_checked_when_used(tiny_checkpoint: Path, dataset: Path,
                                                               tmp_path: Path) -> None:
    data = config(tiny_checkpoint, dataset, tmp_path / "run",
                  models={"policy": str(tiny_checkpoint), "reference": str(tmp_path / "ref"),
                          "value": str(tmp_path / "val")},
                  algorithm={"name": "ppo", "advantage": "gae", "kl_coef": 0.1})
    assert set(problems_of(data)) == {"models.reference", "models.value"}


def test_missing_dataset_names_dataset_path(tiny_checkpoint: Path, tmp_path: Path) -> None:
    found = problems_of(config(tiny_checkpoint, tmp_path / "missing.jsonl", tmp_path / "run"))
    assert list(found) == ["dataset.path"] and "does not exist" in found["dataset.path"]


def test_malformed_dataset_line_is_reported_as_file_and_line(tiny_checkpoint: Path, dataset: Path,
                                                             tmp_path: Path) -> None:
    lines = dataset.read_text().splitlines()
    lines[2] = '{"prompt": "2+1=", "answer": '
    dataset.write_text("\n".join(lines) + "\n")
    found = problems_of(config(tiny_checkpoint, dataset, tmp_path / "run"))
    assert list(found) == ["dataset.path"]
    assert f"{dataset}:3: not valid JSON" in found["dataset.path"]


def test_missing_column_names_the_column_fields(tiny_checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    data = config(tiny_checkpoint, dataset, tmp_path / "run")
    data["dataset"]["prompt_column"] = "question"
    (field, message), = problems_of(data).items()
    assert "dataset.prompt_column" in field and "['question']" in message and "'prompt'" in message


def test_real_data_loader_bad_row_is_reported_as_file_and_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text('{"question": "1+1?", "answer": "1 + 1 = 2\\n#### 2"}\n{"question": "2+2?", "answer": "4"}\n')
    data = config(tiny_checkpoint, path, tmp_path / "run")
    data["dataset"]["kind"] = "gsm8k"
    (field, message), = problems_of(data).items()
    assert field == "dataset" and f"{path}:2:" in message and "bad_rows: skip" in message
    data["dataset"]["bad_rows"] = "skip"
    assert problems_of(data) == {}
    data["dataset"]["system_prompt"] = "Be brief."  # the char tokenizer has no chat template
    (field, message), = problems_of(data).items()
    assert field == "dataset" and "system_prompt needs the chat template" in message


def test_busy_metrics_port_names_metrics_port(tiny_checkpoint: Path, dataset: Path, tmp_path: Path,
                                              busy_port: int) -> None:
    found = problems_of(config(tiny_checkpoint, dataset, tmp_path / "run", metrics_port=busy_port))
    assert list(found) == ["metrics_port"]
    assert f"port {busy_port}" in found["metrics_port"] and "already in use" in found["metrics_port"]


def test_run_dir_that_cannot_be_created(tiny_checkpoint: Path, dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    found = problems_of(config(tiny_checkpoint, dataset, tmp_path / "a-file" / "run"))
    assert list(found) == ["run_dir"] and "is a file" in found["run_dir"]


def test_report_to_backend_not_installed(tiny_checkpoint: Path, dataset: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(reporting.PACKAGES, "wandb", ("quartet_no_such_module", "wandb"))
    found = problems_of(config(tiny_checkpoint, dataset, tmp_path / "run", report_to=["wandb"]))
    assert list(found) == ["report_to"] and "pip install 'quartet-rl[wandb]'" in found["report_to"]


def test_every_problem_is_listed_at_once(dataset: Path, tmp_path: Path, busy_port: int) -> None:
    dataset.write_text('{"prompt": "1+1=", "answer": "2"}\nnot json\n')
    cfg = build_config(config(tmp_path / "no-model", dataset, tmp_path / "run", metrics_port=busy_port))
    with pytest.raises(PreflightError) as err:
        require(cfg)
    assert [p.field for p in err.value.problems] == ["models.policy", "dataset.path", "metrics_port"]
    text = str(err.value)
    assert text.startswith("3 problem(s)") and f"{dataset}:2" in text and "metrics_port" in text


def test_quartet_train_reports_every_problem_in_seconds_without_traceback(tmp_path: Path, busy_port: int) -> None:
    """The issue's cases through the real command (a missing model directory, a malformed dataset line, a busy
    metrics port) and an output directory that cannot be made: exit 2, each field named, no traceback."""
    dataset = tmp_path / "train.jsonl"
    dataset.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n')
    (tmp_path / "a-file").write_text("x")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "no-model", dataset, tmp_path / "a-file" / "run",
                                          metrics_port=busy_port)))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cli.main", "train", str(path)], cwd=ROOT,
                         env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text
    for expected in ("4 problem(s)", "models.policy", f"{dataset}:2: not valid JSON", "run_dir",
                     "metrics_port", f"port {busy_port}"):
        assert expected in text, (expected, text)
    assert seconds < 60, f"took {seconds:.0f} s"  # 3-10 s: mostly importing torch and transformers


def test_quartet_train_missing_dataset_exits_2_naming_the_field(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path / "no-model", tmp_path / "nope.jsonl", tmp_path / "run")))
    result = CliRunner().invoke(app, ["train", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit(2), no exception escaping
    assert "models.policy" in result.output
    assert f"dataset.path: {str(tmp_path / 'nope.jsonl')!r} does not exist" in result.output
    assert not (tmp_path / "run").exists()
