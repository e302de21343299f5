"""Experiment logging (`report_to`), plain progress lines and the per-algorithm end-of-run summary.

TensorBoard's event file is read back with TensorBoard's own EventAccumulator, the W&B run is an
offline run directory (no network), the jsonl file is read line by line; every backend gets the
Prometheus names of orchestrator/run/metrics.py.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from rich.console import Console

from cli.train import print_summary
from orchestrator.run import reporting
from orchestrator.run.config import ConfigError, ReportTo, build_config
from orchestrator.run.metrics import GAUGES
from orchestrator.run.reporting import REPORTERS, ProgressLines, Reporting, metric_names
from orchestrator.step.loop import StepResult

METRICS = {"step": 1, "kl_ref": 0.25, "policy_loss": -0.5, "clipfrac": 0.125, "step_seconds": 2.0,
           "not_a_gauge": 7.0}
PHASES = {"generate": 0.5, "update": 1.25}
REWARDS = {"mean": 0.75, "std": 0.25, "min": 0.0, "max": 1.0}


def run_config(tmp_path: Path, report_to: object, **top: object):
    return build_config({"models": {"policy": "unused"}, "services": {"local": True},
                         "dataset": {"path": "unused.jsonl"}, "run_dir": str(tmp_path / "run"),
                         "report_to": report_to, **top})


def test_metric_names_are_the_prometheus_names() -> None:
    names = metric_names(METRICS, PHASES, REWARDS)
    assert names == {
        "quartet_kl_reference": 0.25, "quartet_policy_loss": -0.5, "quartet_clip_fraction": 0.125,
        "quartet_step_seconds": 2.0, "quartet_reward_mean": 0.75, "quartet_reward_std": 0.25,
        "quartet_reward_min": 0.0, "quartet_reward_max": 1.0, "quartet_phase_seconds_generate": 0.5,
        "quartet_phase_seconds_update": 1.25,
    }
    assert {GAUGES[k][0] for k in ("kl_ref", "policy_loss", "clipfrac")} <= set(names)


def test_each_reward_service_mean_is_reported_under_its_identity() -> None:
    names = metric_names(METRICS, PHASES, REWARDS, {"correct": 0.125, "format": 0.75})
    assert names["quartet_reward_component_mean_correct"] == 0.125
    assert names["quartet_reward_component_mean_format"] == 0.75
    assert not any("component" in n for n in metric_names(METRICS, PHASES, REWARDS))


def test_every_report_to_name_has_a_reporter() -> None:
    assert set(REPORTERS) == set(typing.get_args(ReportTo)) == set(reporting.PACKAGES)


@pytest.mark.parametrize(("given", "expected"), [("jsonl", ["jsonl"]), ("none", []), ([], []),
                                                 ("all", ["tensorboard", "wandb", "jsonl"])])
def test_report_to_accepts_trl_forms(tmp_path: Path, given: object, expected: list[str]) -> None:
    assert run_config(tmp_path, given).report_to == expected


def test_unknown_backend_is_a_config_error_naming_report_to(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"report_to\.1: .*'tensorboard', 'wandb' or 'jsonl'.*got 'mlflow'"):
        run_config(tmp_path, ["jsonl", "mlflow"])


def test_missing_package_is_a_config_error_saying_what_to_install(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(reporting.PACKAGES, "tensorboard", ("quartet_no_such_module", "tensorboard"))
    with pytest.raises(ConfigError, match=r"report_to includes 'tensorboard'.*pip install 'quartet-rl\[tensorboard\]'"):
        Reporting.open(run_config(tmp_path, ["tensorboard"]))


def test_jsonl_reporter_writes_one_line_per_step_and_a_resume_drops_later_lines(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, ["jsonl"])
    rep = Reporting.open(cfg)
    for step in (1, 2, 3):
        rep.report(step, {"quartet_reward_mean": step / 10})
    rep.close()
    path = tmp_path / "run" / "metrics.jsonl"
    assert [json.loads(line)["quartet_reward_mean"] for line in path.read_text().splitlines()] == [0.1, 0.2, 0.3]
    rep = Reporting.open(cfg, start_step=2)  # resumed from the checkpoint of step 2
    rep.report(3, {"quartet_reward_mean": 0.9})
    rep.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert json.loads(path.read_text().splitlines()[-1])["quartet_reward_mean"] == 0.9
    Reporting.open(cfg).close()  # a new run from step 0 starts an empty file
    assert path.read_text() == ""


def test_tensorboard_event_file_is_written_and_readable(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rep = Reporting.open(run_config(tmp_path, ["tensorboard"]))
    for step in (1, 2):
        rep.report(step, metric_names(METRICS, PHASES, {**REWARDS, "mean": step / 4}))
    rep.close()
    logdir = tmp_path / "run" / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert {"quartet_reward_mean", "quartet_kl_reference", "quartet_phase_seconds_update"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("quartet_reward_mean")] == [(1, 0.25), (2, 0.5)]


def test_wandb_offline_run_directory_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # no key: offline, no network needed
    monkeypatch.setenv("WANDB_SILENT", "true")
    rep = Reporting.open(run_config(tmp_path, ["wandb"]))
    run_dir = rep.reporters["wandb"].dir
    rep.report(1, {"quartet_reward_mean": 0.5})
    rep.close()
    assert run_dir.parent == tmp_path / "run" / "wandb" and run_dir.name.startswith("offline-run-")
    assert list(run_dir.glob("run-*.wandb")), sorted(p.name for p in run_dir.iterdir())


def test_a_failing_backend_is_dropped_and_the_others_go_on() -> None:
    class Broken:
        def report(self, step, metrics):
            raise OSError("disk full")

        def close(self):
            pass

    class Kept:
        seen: typing.ClassVar[list[int]] = []

        def report(self, step, metrics):
            self.seen.append(step)

        def close(self):
            pass

    rep = Reporting({"tensorboard": Broken(), "jsonl": Kept()})
    rep.report(1, {})
    rep.report(2, {})
    assert list(rep.reporters) == ["jsonl"] and Kept.seen == [1, 2]


# --- progress lines --------------------------------------------------------------------------------


def test_progress_lines_every_n_steps_or_s_seconds_with_eta() -> None:
    now = [0.0]
    out: list[str] = []
    lines = ProgressLines(total=25, start_step=0, every_steps=10, every_seconds=60, write=out.append,
                          clock=lambda: now[0])
    now[0] = 500.0  # start-up (or a demo's warm-up) before the first step does not count
    for step in range(1, 26):
        seconds = 2.0 if step <= 20 else 40.0  # steps 21-25 are slow: the seconds rule fires
        now[0] += seconds
        lines(step, reward=step / 100, kl=0.001, step_seconds=seconds)
    assert [line.split()[1] for line in out] == ["1/25", "11/25", "21/25", "23/25", "25/25"]
    assert out[0] == "step 1/25  reward 0.010  kl 0.0010  2.00 s/step  eta 0m48s"
    assert out[1].endswith("2.00 s/step  eta 0m28s")
    assert out[3] == "step 23/25  reward 0.230  kl 0.0010  40.00 s/step  eta 1m20s"
    assert out[-1].endswith("eta 0m00s")


def test_progress_lines_after_a_resume_count_from_the_resumed_step() -> None:
    out: list[str] = []
    lines = ProgressLines(total=100, start_step=40, every_steps=50, every_seconds=1e9, write=out.append,
                          clock=lambda: 0.0)
    for step in range(41, 101):
        lines(step, reward=0.0, kl=0.0, step_seconds=1.0)
    assert [line.split()[1] for line in out] == ["41/100", "91/100", "100/100"]


# --- end-of-run summary ----------------------------------------------------------------------------


def _result(step: int, **metrics: float) -> StepResult:
    base = {"kl_ref": 0.01, "policy_loss": 0.1, "clipfrac": 0.2, "entropy": 1.0, "approx_kl": 0.001,
            "grad_norm": 1.0, "step_seconds": 1.0, "trpo_accepted": 0.0, "trpo_backtracks": 0.0,
            "trpo_step_size": 0.0, "trpo_final_kl": 0.0}
    return StepResult(step, {**base, **metrics}, {"update": 0.5}, {"mean": 0.5, "std": 0.1, "min": 0, "max": 1},
                      {"rule": 1.0}, 10)


def _summary(tmp_path: Path, algo: str, results: list[StepResult], **algorithm: object) -> dict[str, list[str]]:
    cfg = run_config(tmp_path, [], algorithm={"name": algo, **algorithm})
    console = Console(record=True, width=200)
    print_summary(console, cfg, results)
    rows = {}
    for line in console.export_text().splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3 and cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


def test_trpo_summary_shows_the_line_search_not_clipfrac(tmp_path: Path) -> None:
    results = [_result(1, trpo_accepted=1.0, trpo_backtracks=0.0, trpo_step_size=0.5, trpo_final_kl=0.0009),
               _result(2, trpo_accepted=0.0, trpo_backtracks=10.0, trpo_step_size=0.25, trpo_final_kl=0.0),
               _result(3, trpo_accepted=1.0, trpo_backtracks=2.0, trpo_step_size=0.125, trpo_final_kl=0.0004)]
    rows = _summary(tmp_path, "trpo", results)
    assert rows["line search accepted"] == ["", "2/3 (67%)"]
    assert rows["trpo_backtracks (mean)"] == ["", "4.00"]
    assert rows["trpo_final_kl"] == ["0.0009", "0.0004"]
    assert rows["trpo_step_size"] == ["0.5", "0.125"]
    assert rows["trpo_backtracks"] == ["0", "2"]
    assert "clipfrac" not in rows and "approx_kl" not in rows


def test_ppo_summary_shows_the_critic(tmp_path: Path) -> None:
    results = [_result(1, value_loss=0.8, value_explained_variance=-0.1),
               _result(2, value_loss=0.2, value_explained_variance=0.6)]
    rows = _summary(tmp_path, "ppo", results, advantage="gae")
    assert rows["value_loss"] == ["0.8", "0.2"]
    assert rows["value_explained_variance"] == ["-0.1", "0.6"]
    assert "clipfrac" in rows and not any(k.startswith("trpo") or k.startswith("line search") for k in rows)


def test_grpo_summary_is_unchanged(tmp_path: Path) -> None:
    rows = _summary(tmp_path, "grpo", [_result(1), _result(2)])
    assert [k for k in rows if not k.endswith("(mean)")] == [
        "reward mean", "kl_ref", "policy_loss", "clipfrac", "approx_kl", "entropy", "grad_norm",
        "step_seconds"]


@pytest.mark.parametrize(("terminal", "mode", "expected"), [
    (True, "auto", "reward 0.500  kl 0.0100  1.00 s/step"),  # the rich bar's text
    (False, "auto", "step 2/2  reward 0.500  kl 0.0100"),  # a plain line
    (True, "lines", "step 2/2  reward 0.500  kl 0.0100"),
    (False, "off", ""),
])
def test_train_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(tmp_path: Path, terminal: bool, mode: str,
                                                                   expected: str) -> None:
    import io

    from cli.train import progress

    cfg = run_config(tmp_path, [], steps=2, progress={"mode": mode})
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=150)
    with progress(cfg, console, start=0) as show:
        for step in (1, 2):
            show(_result(step))
    text = out.getvalue()
    assert expected in text if expected else text == ""
    assert ("\x1b[" in text) == (terminal and mode == "auto")
