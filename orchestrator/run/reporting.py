"""Experiment logging (`report_to`, as in TRL): each step's metrics to TensorBoard, W&B or a jsonl file.

One reporter per backend, chosen through `REPORTERS` from the names in `RunConfig.report_to`; the
loop calls `Reporting.report(step, metrics)` once per step with the Prometheus names of
orchestrator/run/metrics.py (`metric_names`), so a dashboard and an experiment tracker show the same
series under the same names. The backends' packages are optional extras, imported only when named:
a missing one is a ConfigError naming `report_to` and the extra to install.

A resumed run continues the same series: TensorBoard purges events past the resumed step, the jsonl
file drops its lines past it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from orchestrator.run.config import ConfigError, RunConfig
from orchestrator.run.metrics import metric_names  # the names every reporter is given

log = logging.getLogger("quartet.reporting")

# backend -> (module that must be importable, extra that installs it)
PACKAGES: dict[str, tuple[str, str] | None] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "jsonl": None,
}


class Reporter(Protocol):
    """One experiment-tracking backend."""

    def report(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RunInfo:
    """What a backend needs to open its run."""

    run_dir: Path
    name: str  # the run's name: the run directory's name
    config: dict[str, Any]  # the resolved run config (no secrets), for trackers that store it
    start_step: int  # steps already done (a resumed run); the next report is for start_step + 1


class TensorBoardReporter:
    """Scalars under <run_dir>/tensorboard, through TensorBoard's own event writer (torch's SummaryWriter)."""

    def __init__(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run.run_dir / "tensorboard"
        # purge_step: TensorBoard drops events of earlier writers from this step on, so a resumed run
        # replaces the steps after its checkpoint instead of drawing them twice.
        self.writer = SummaryWriter(str(self.dir), purge_step=run.start_step + 1)

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A W&B run in <run_dir>/wandb. Offline unless WANDB_MODE says otherwise or WANDB_API_KEY is set, so a
    machine without network (or without a W&B account) still records the run; `wandb sync` uploads it later."""

    def __init__(self, run: RunInfo) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "quartet", name=run.name, dir=str(run.run_dir),
            config=run.config, mode=mode, settings=wandb.Settings(silent=True, console="off"),
        )
        self.dir = Path(self.run.dir).parent  # .../wandb/offline-run-<time>-<id>

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class JsonlReporter:
    """<run_dir>/metrics.jsonl: one line per step, {"step": n, "time": unix seconds, <metric>: value, ...}."""

    def __init__(self, run: RunInfo) -> None:
        self.path = run.run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if run.start_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= run.start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


REPORTERS: dict[str, Callable[[RunInfo], Reporter]] = {
    "tensorboard": TensorBoardReporter,
    "wandb": WandbReporter,
    "jsonl": JsonlReporter,
}


def missing_packages(names: list[str]) -> list[str]:
    """One message per backend in `names` whose package is not installed (checked without importing it)."""
    out = []
    for name in names:
        need = PACKAGES.get(name)
        if need is not None and importlib.util.find_spec(need[0]) is None:
            out.append(f"report_to includes {name!r} but the {need[0]} package is not installed: "
                       f"pip install 'quartet-rl[{need[1]}]', or remove {name} from report_to")
    return out


class Reporting:
    """The configured reporters behind one `report(step, metrics)`; empty when `report_to` is."""

    def __init__(self, reporters: Mapping[str, Reporter] | None = None) -> None:
        self.reporters = dict(reporters or {})

    @classmethod
    def open(cls, cfg: RunConfig, *, start_step: int = 0, say: Callable[[str], None] = log.info) -> Reporting:
        """Open every backend of cfg.report_to; ConfigError naming `report_to` if a package is missing."""
        problems = missing_packages(cfg.report_to)
        if problems:
            raise ConfigError("\n".join(problems))
        # model_dump leaves out inline tokens (exclude=True), as dump_config does.
        run = RunInfo(Path(cfg.run_dir), Path(cfg.run_dir).resolve().name, cfg.model_dump(mode="json"), start_step)
        opened: dict[str, Reporter] = {}
        try:
            for name in dict.fromkeys(cfg.report_to):
                opened[name] = REPORTERS[name](run)
                say(f"report_to {name}: {getattr(opened[name], 'dir', None) or getattr(opened[name], 'path', '')}")
        except BaseException:
            cls(opened).close()
            raise
        return cls(opened)

    def report(self, step: int, metrics: Mapping[str, float]) -> None:
        """Send one step's metrics to every backend; a backend that fails is dropped with a warning, the run goes on."""
        for name, reporter in list(self.reporters.items()):
            try:
                reporter.report(step, metrics)
            except Exception as e:
                log.warning("report_to %s failed at step %d (%s); no more reports to it in this run", name, step, e)
                self.reporters.pop(name)

    def close(self) -> None:
        for name, reporter in self.reporters.items():
            try:
                reporter.close()
            except Exception as e:
                log.warning("report_to %s: closing failed (%s)", name, e)
        self.reporters = {}




class ProgressLines:
    """Plain progress lines where no bar can be drawn (nohup, CI, a container log): step, reward, KL, s/step, ETA.

    A line after the first and the last step, and after any step that is `every_steps` steps or
    `every_seconds` seconds past the previous line. s/step and the ETA come from the steps since that line
    (for the first line, from that step's own seconds: start-up and a demo's warm-up are not steps).
    """

    def __init__(self, *, total: int, start_step: int, every_steps: int, every_seconds: float,
                 write: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.start_step, self.write, self.clock = total, start_step, write, clock
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.last_step, self.last_time = start_step, 0.0

    def __call__(self, step: int, *, reward: float, kl: float, step_seconds: float) -> None:
        now, first = self.clock(), self.last_step == self.start_step
        due = (first or step >= self.total or step - self.last_step >= self.every_steps
               or now - self.last_time >= self.every_seconds)
        if not due or step <= self.last_step:
            return
        per_step = step_seconds if first else (now - self.last_time) / (step - self.last_step)
        self.write(f"step {step}/{self.total}  reward {reward:.3f}  kl {kl:.4f}  {per_step:.2f} s/step  "
                   f"eta {_duration(per_step * max(0, self.total - step))}")
        self.last_step, self.last_time = step, now


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


__all__ = ["REPORTERS", "JsonlReporter", "ProgressLines", "Reporter", "Reporting", "RunInfo", "TensorBoardReporter",
           "WandbReporter", "metric_names", "missing_packages"]
