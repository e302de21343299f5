"""run_dir/curves.png: the mean reward per step and the held-out accuracy per evaluation, from the run's logs.

Drawn from steps.jsonl and eval.jsonl (not from memory), so a resumed run's plot covers the whole run.
matplotlib is optional (the `plot` extra): without it the plot is skipped with a line saying how to get it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from orchestrator.run.checkpoint import STEP_LOG
from orchestrator.run.evaluation import EVAL_LOG, EvalLog

PLOT = "curves.png"


def plot_run(run_dir: Path, *, log: Callable[[str], None] = print) -> Path | None:
    """Write run_dir/curves.png (reward left axis, eval accuracy and format rate right axis); None when skipped."""
    steps_path = run_dir / STEP_LOG
    steps = ([json.loads(line) for line in steps_path.read_text().splitlines() if line.strip()]
             if steps_path.is_file() else [])
    evals = EvalLog(run_dir / EVAL_LOG).read()
    if not steps and not evals:
        return None
    try:
        import matplotlib
    except ImportError:
        log(f"no plot: matplotlib is not installed (pip install 'quartet-rl[plot]'); the curves are in {steps_path} "
            f"and {run_dir / EVAL_LOG}")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([s["step"] for s in steps], [s["reward"]["mean"] for s in steps], color="tab:blue", label="mean reward")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        x = [e["step"] for e in evals]
        ax2.plot(x, [e["accuracy"] for e in evals], "o-", color="tab:orange", label="eval accuracy")
        ax2.plot(x, [e["format_rate"] for e in evals], "s--", color="tab:green", label="eval format")
        ax2.set_ylabel("held-out greedy pass@1 / format", color="tab:orange")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.set_title(f"{run_dir.name}: reward and held-out evaluation")
    fig.tight_layout()
    path = run_dir / PLOT
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["PLOT", "plot_run"]
