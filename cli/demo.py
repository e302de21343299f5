"""`quartet demo`: the embedded stack teaches a tiny model arithmetic with RL (no GPU, no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

DEMO_HELP = (
    "Build a ~1M-parameter model and an arithmetic task, warm it up with supervised steps, then run RL "
    "(GRPO by default) with the four services started locally; prints greedy test accuracy before and "
    "after and writes curves.png and summary.json to the run directory."
)


def demo(
    algo: Annotated[Literal["grpo", "ppo", "trpo"], typer.Option("--algo", help="RL algorithm.")] = "grpo",
    steps: Annotated[int, typer.Option("--steps", min=1, help="RL steps (32 prompts x 8 samples each).")] = 150,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where everything is written.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the model, task, warm-up and run.")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", min=1, help="Measure test accuracy every N steps.")] = 15,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Run-config override key=value, repeatable.")] = None,
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from demo.run import run_demo

    console = Console()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(algo, total=steps, info="", visible=False)

        def on_step(r) -> None:
            bar.update(task, visible=True, completed=r.step,
                       info=f"reward {r.rewards['mean']:.3f}  {r.metrics['step_seconds']:.2f} s/step")

        summary = run_demo(algo=algo, steps=steps, run_dir=run_dir, seed=seed, eval_every=eval_every,
                           overrides=set_ or [], log=lambda m: console.print(f"[dim]{m}[/]"), on_step=on_step)
    console.print(
        f"[bold]greedy test accuracy: {summary.accuracy_before:.1%} before -> {summary.accuracy_after:.1%} after "
        f"{summary.steps} {algo} steps[/] (mean reward {summary.reward_first:.3f} -> {summary.reward_last:.3f}, "
        f"{summary.step_seconds_mean:.2f} s/step)"
    )
    console.print(f"plot: {run_dir / 'curves.png'}  summary: {run_dir / 'summary.json'}")
