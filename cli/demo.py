"""`quartet demo`: the embedded stack teaches a tiny model arithmetic with RL (no GPU, no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

DEMO_HELP = (
    "Build a ~1M-parameter model and an arithmetic task, warm it up with supervised steps, then run RL "
    "(GRPO by default) with the services started locally (generator, reward and reference; PPO's critic adds a "
    "value service); prints greedy test accuracy before and after. Each run gets its own numbered directory in "
    "--run-dir (e.g. runs/demo/001-grpo: step log, checkpoints, service logs, curves.png, summary.json); the task "
    "and the warm-up beside them are reused by later runs."
)


def demo(
    algo: Annotated[Literal["grpo", "ppo", "trpo"], typer.Option("--algo", help="RL algorithm.")] = "grpo",
    steps: Annotated[int, typer.Option("--steps", min=1, help="RL steps (32 prompts x 8 samples each).")] = 150,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Demo directory: task/ and warmup/ (reused), and a new "
                                          "numbered directory for this run.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the model, task, warm-up and run.")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Measure test accuracy every N steps.")] = 15,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Run-config override key=value, repeatable.")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", envvar="QUARTET_MAX_STEPS", min=1,
                                                  help="Cap --steps at N (a quick check).")] = None,
) -> None:
    from rich.text import Text

    from cli import console as make_console
    from cli.train import progress
    from demo.run import demo_config, run_demo
    from orchestrator.run.config import ConfigError
    from orchestrator.run.preflight import require
    from services.common.command import silence_progress_bars

    silence_progress_bars()  # the warm-up's checkpoint save would draw transformers' bar into the output
    console = make_console()
    steps = min(steps, max_steps) if max_steps is not None else steps
    try:  # the overrides, the ports and the output directory now, not after the warm-up (the demo makes the
        # model and the dataset itself)
        cfg = demo_config(algo, steps=steps, run_dir=run_dir, policy=run_dir / "warmup",
                          dataset=run_dir / "task" / "train.jsonl", seed=seed, overrides=set_ or [])
        require(cfg, models=False, dataset=False)
    except ConfigError as e:
        console.print(Text.assemble(("config error: ", "bold red"), str(e)))
        raise typer.Exit(2) from None
    with progress(cfg, console, start=0) as on_step:
        summary = run_demo(algo=algo, steps=steps, run_dir=run_dir, seed=seed, eval_every=eval_every,
                           overrides=set_ or [], log=lambda m: console.print(f"[dim]{m}[/]"), on_step=on_step)
    console.print(
        f"[bold]greedy test accuracy: {summary.accuracy_before:.1%} before -> {summary.accuracy_after:.1%} after "
        f"{summary.steps} {algo} steps[/] (mean reward {summary.reward_first:.3f} -> {summary.reward_last:.3f}, "
        f"{summary.step_seconds_mean:.2f} s/step)"
    )
    out = Path(summary.run_dir)
    console.print(f"run directory: {out}  plot: {out / 'curves.png'}  summary: {out / 'summary.json'}",
                  highlight=False)
