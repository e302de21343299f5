"""`quartet train CONFIG [--set key=value]... [--resume | --overwrite] [--max-steps N] [--retries N]`: one RL run
with a progress bar and a summary.

A wrapper of the command (the container entrypoint, docker/entrypoint.py) passes `TrainHooks` as the
Typer context object: a change to the loaded config and a callback after each step.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

TRAIN_HELP = (
    "Run RL fine-tuning (PPO, GRPO or TRPO) from a YAML run config (see examples/). Services are reached "
    "at their endpoints, or started here with services.local: true. A new run refuses a run_dir that holds "
    "another run: --resume continues that run from its last complete checkpoint, --overwrite deletes it and starts "
    "over. --retries N resumes by itself after a service error."
)
RETRY_BACKOFF_S, RETRY_BACKOFF_MAX_S = 5.0, 60.0  # first wait before a resume, doubling up to the cap


@dataclass(frozen=True)
class TrainHooks:
    """What a wrapper of `quartet train` adds, passed as the Typer context object (`app(..., obj=hooks)`)."""

    configure: Callable[[Any], None] | None = None  # called with the loaded RunConfig, before the run
    on_step: Callable[[Any], None] | None = None  # called with each StepResult, after the progress bar


def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="YAML run config (examples/grpo.yaml, ppo.yaml, trpo.yaml).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value override, repeatable, e.g. "
                                                   "--set algorithm.lr=1e-5 --set steps=50.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in run_dir from its last complete "
                                         "checkpoint (with --set steps=N, on to step N).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the files of the run already in run_dir "
                                            "(checkpoints, step log, service logs) and start a new run there.")] = False,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", envvar="QUARTET_MAX_STEPS", min=1,
        help="Run at most N steps in this invocation, then checkpoint and stop; the config's steps stays the run's "
        "target, so --resume continues. For a quick check of a config or of the README's commands.")] = None,
    retries: Annotated[int, typer.Option(
        "--retries", envvar="QUARTET_TRAIN_RETRIES", min=0,
        help="After a service error stops the run, resume from the last complete checkpoint up to N times, "
        f"after a backoff ({RETRY_BACKOFF_S:g} s, doubling up to {RETRY_BACKOFF_MAX_S:g} s). A safety net for an "
        "outage longer than services.retry's budget: checkpoint every step (checkpoint.interval: 1) so nothing "
        "is redone.")] = 0,
) -> None:
    from rich.text import Text

    from cli import console as make_console
    from orchestrator.run.config import ConfigError, load_config

    hooks = ctx.obj if isinstance(ctx.obj, TrainHooks) else TrainHooks()
    console = make_console()
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as e:
        console.print(Text.assemble(("config error: ", "bold red"), str(e)))
        raise typer.Exit(2) from None
    if hooks.configure is not None:
        hooks.configure(cfg)
    ranks = _start_ranks(cfg, console, retries)
    if ranks.rank > 0:  # under torchrun: a policy replica that takes part in rank 0's updates, nothing else
        from orchestrator.step.distributed import follow

        follow(cfg, ranks)
        return
    with _leading(ranks) as leader:
        try:  # what the config points at (models, dataset, ports, outputs): every problem now, not after start-up
            from orchestrator.run.preflight import require

            require(cfg)
        except ConfigError as e:
            console.print(Text.assemble(("config error: ", "bold red"), str(e)))
            raise typer.Exit(2) from None
        overrides = [arg for item in set_ or [] for arg in ("--set", item)]
        command = shlex.join(["quartet", "train", str(config), *overrides, "--resume"])
        results = run_with_progress(cfg, resume=resume, overwrite=overwrite, max_steps=max_steps, console=console,
                                    on_step=hooks.on_step, resume_command=command, retries=retries, leader=leader)
    print_summary(console, cfg, results)
    _plot(console, cfg)


def _start_ranks(cfg, console, retries: int):
    """This process's trainer rank (torchrun sets WORLD_SIZE); a config that several ranks cannot run exits 2."""
    from rich.text import Text

    from orchestrator.run.config import ConfigError
    from orchestrator.step.distributed import start

    try:
        if retries and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--retries resumes one trainer process; under torchrun use torchrun --max-restarts N "
                              "and pass --resume (a resume with no checkpoint yet starts from step 0)")
        ranks = start(cfg)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank finds it; one says it
            console.print(Text.assemble(("config error: ", "bold red"), str(e)))
        raise typer.Exit(2) from None
    if ranks.several and ranks.rank == 0:
        console.print(f"[dim]trainer: {ranks.size} torchrun ranks ({ranks.backend}); rank 0 runs the services[/]")
    return ranks


def _leading(ranks):
    """Rank 0 of several: the Leader that the other ranks follow (stopped on leaving); else nothing."""
    from orchestrator.step.distributed import Leader

    return Leader(ranks) if ranks.several else nullcontext()


def run_with_progress(cfg, *, resume: bool, console, on_step=None, resume_command: str | None = None,
                      retries: int = 0, overwrite: bool = False, max_steps: int | None = None, leader=None):
    """Open the session, run every step under a rich progress bar; returns the StepResults.

    A service that stays down past its retry budget ends the run with exit code 1, the error (service,
    call, last status) and where the run state was saved, with the command that continues it. With
    `retries`, such a run (or one whose services could not be reached or started) is first resumed from
    its last complete checkpoint, up to `retries` times, after a growing backoff. `leader`: see `Session`.
    """
    from orchestrator.remote.clients import ServiceError
    from services.launcher import LaunchError

    run = partial(_run_session, cfg, console=console, on_step=on_step, resume_command=resume_command,
                  max_steps=max_steps, leader=leader)
    delay = RETRY_BACKOFF_S
    for attempt in range(retries):
        try:
            return run(resume=resume, overwrite=overwrite)
        except (ServiceError, LaunchError):  # printed by _run_session; the last checkpoint is complete
            console.print(f"run stopped (attempt {attempt + 1} of {retries + 1}); resuming from the last "
                          f"checkpoint in {delay:g} s", highlight=False)
        time.sleep(delay)
        resume, overwrite, delay = True, False, min(RETRY_BACKOFF_MAX_S, delay * 2)
    try:
        return run(resume=resume, overwrite=overwrite)
    except (ServiceError, LaunchError):
        raise typer.Exit(1) from None


def _run_session(cfg, *, resume: bool, console, on_step, resume_command: str | None, overwrite: bool = False,
                 max_steps: int | None = None, leader=None):
    """One session, start to end (or to the error, printed here and raised: run_with_progress decides)."""
    from rich.text import Text

    from orchestrator.remote.clients import ServiceError
    from orchestrator.run.checkpoint import RunDirError
    from orchestrator.run.config import ConfigError
    from orchestrator.run.session import Session
    from orchestrator.step.loop import StepFailed
    from services.launcher import LaunchError

    try:
        with Session(cfg, resume=resume, overwrite=overwrite, max_steps=max_steps,
                     log=lambda m: console.print(f"[dim]{m}[/]"), leader=leader) as session:
            o = session.orchestrator
            if session.metrics is not None and session.metrics.port:
                console.print(f"[dim]metrics: http://127.0.0.1:{session.metrics.port}/metrics[/]")
            with progress(session.cfg, console, start=o.state.step) as shown:  # session.cfg: --max-steps applied

                def show(r) -> None:
                    shown(r)
                    if on_step is not None:
                        on_step(r)

                results = session.run(show)  # the held-out evaluation (eval:) runs after its steps
            final = session.save_final()
            if final is not None:
                console.print(f"[dim]checkpoint: {final}[/]")
            return results
    except (ServiceError, LaunchError) as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)))
        if isinstance(e, StepFailed):
            console.print(Text(_resume_hint(e, resume_command or "quartet train CONFIG --resume")))
        raise
    except ConfigError as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)))
        if isinstance(e, RunDirError) and resume_command and not resume:
            start_over = resume_command.removesuffix(" --resume") + " --overwrite"
            console.print(f"continue it:  {resume_command}\nstart over:   {start_over}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: services stopped; resume with --resume[/]")
        raise typer.Exit(130) from None


@contextmanager
def progress(cfg, console, *, start: int) -> Iterator[Callable[[Any], None]]:
    """Yields what shows one StepResult: the rich bar on a terminal, plain lines elsewhere (cfg.progress)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from orchestrator.run.reporting import ProgressLines

    mode = cfg.progress.mode
    if mode == "auto":
        mode = "bar" if console.is_terminal else "lines"
    if mode == "bar":
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(cfg.algorithm.name, total=cfg.steps, completed=start, info="")

            def update(r) -> None:
                info = (f"reward {r.rewards['mean']:.3f}  kl {r.metrics.get('kl_ref', 0.0):.4f}  "
                        f"{r.metrics['step_seconds']:.2f} s/step")
                bar.update(task, completed=r.step, info=info)

            yield update
    elif mode == "lines":
        def write(line: str) -> None:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
            console.file.flush()  # a pipe or a file is block-buffered: a line is no use an hour late

        lines = ProgressLines(total=cfg.steps, start_step=start, every_steps=cfg.progress.every_steps,
                              every_seconds=cfg.progress.every_seconds, write=write)
        yield lambda r: lines(r.step, reward=r.rewards["mean"], kl=r.metrics.get("kl_ref", 0.0),
                              step_seconds=r.metrics["step_seconds"])
    else:
        yield lambda r: None


def _resume_hint(e, command: str) -> str:
    """Where a failed run's state is and how to continue it (e is a StepFailed)."""
    if e.checkpoint is not None:
        return (f"{e.completed_steps} steps completed; run state saved in {e.checkpoint}. "
                f"Bring the service back, then continue with: {command}")
    where = f" ({e.note})" if e.note else ""
    return (f"{e.completed_steps} steps completed, no new checkpoint{where}. {command} continues from the last "
            "complete checkpoint, if any")


# Step-log keys each algorithm's summary shows, first vs last step (a key the run did not log is left out):
# TRPO has no ratio clipping (clipfrac is always 0) but a line search; PPO's critic is judged by its loss
# and explained variance.
_COMMON_KEYS = ("entropy", "grad_norm", "logprob_gap_mean", "response_length_mean", "truncated_fraction",
                "tokens_per_second", "step_seconds")
SUMMARY_KEYS: dict[str, tuple[str, ...]] = {
    "grpo": ("kl_ref", "policy_loss", "value_loss", "clipfrac", "approx_kl", *_COMMON_KEYS),
    "ppo": ("kl_ref", "policy_loss", "clipfrac", "approx_kl", "value_loss", "value_explained_variance",
            *_COMMON_KEYS),
    "trpo": ("kl_ref", "policy_loss", "trpo_final_kl", "trpo_step_size", "trpo_backtracks", *_COMMON_KEYS),
}


def _trpo_run_rows(results) -> list[tuple[str, str]]:
    """Over the whole session: how often the line search accepted a step, and how many backtracks it took."""
    accepted = sum(1 for r in results if r.metrics.get("trpo_accepted", 0.0) > 0)
    backtracks = sum(r.metrics.get("trpo_backtracks", 0.0) for r in results) / len(results)
    return [("line search accepted", f"{accepted}/{len(results)} ({accepted / len(results):.0%})"),
            ("trpo_backtracks (mean)", f"{backtracks:.2f}")]


# Algorithm -> rows over the whole session (label, value), after the first-vs-last rows.
SUMMARY_RUN_ROWS: dict[str, Callable[[list], list[tuple[str, str]]]] = {"trpo": _trpo_run_rows}


def print_summary(console, cfg, results) -> None:
    """A one-screen table: first vs last step of the algorithm's own metrics, run-wide rows, seconds per phase."""
    from rich.table import Table

    if not results:
        console.print("nothing to do: the run had already reached its steps")
        return
    first, last = results[0], results[-1]
    algo = cfg.algorithm.name
    n = len(results)
    table = Table(title=f"{algo} run: {n} step{'s' if n != 1 else ''} ({last.step} total) in {cfg.run_dir}")
    table.add_column("metric")
    table.add_column(f"step {first.step}", justify="right")
    table.add_column(f"step {last.step}", justify="right")
    table.add_row("reward mean", f"{first.rewards['mean']:.4f}", f"{last.rewards['mean']:.4f}")
    for key in SUMMARY_KEYS.get(algo, SUMMARY_KEYS["grpo"]):
        if key in last.metrics:
            table.add_row(key, f"{first.metrics.get(key, float('nan')):.4g}", f"{last.metrics[key]:.4g}")
    for label, value in SUMMARY_RUN_ROWS.get(algo, lambda _r: [])(results):
        table.add_row(label, "", value)
    for label, first_eval, last_eval in _eval_rows(cfg):
        table.add_row(label, first_eval, last_eval)
    phases = sorted({p for r in results for p in r.phases})
    for p in phases:
        mean = sum(r.phases.get(p, 0.0) for r in results) / len(results)
        table.add_row(f"{p} s (mean)", "", f"{mean:.4f}")
    console.print(table)


def _eval_rows(cfg) -> list[tuple[str, str, str]]:
    """First vs last held-out evaluation of the run (run_dir/eval.jsonl), as summary rows."""
    from orchestrator.run.evaluation import EVAL_LOG, EvalLog

    evals = EvalLog(Path(cfg.run_dir) / EVAL_LOG).read()
    if not evals:
        return []
    a, b = evals[0], evals[-1]
    rows = [("eval at step", str(a["step"]), str(b["step"]))]
    for key, fmt in (("accuracy", "{:.1%}"), ("format_rate", "{:.1%}"), ("truncated_fraction", "{:.1%}"),
                     ("length_mean", "{:.1f}")):
        rows.append((f"eval {key}", fmt.format(a[key]), fmt.format(b[key])))
    return rows


def _plot(console, cfg) -> None:
    from orchestrator.run.plot import plot_run

    path = plot_run(Path(cfg.run_dir), log=lambda m: console.print(f"[dim]{m}[/]"))
    if path is not None:
        console.print(f"[dim]plot: {path}[/]")
