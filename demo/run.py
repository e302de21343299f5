"""`quartet demo`: a tiny model learns arithmetic with RL through the embedded stack.

Build the ~1M-parameter demo model and the arithmetic task (model kit), a short supervised warm-up
so some answers are right, greedy test accuracy, an RL run (GRPO by default) with the four roles as
local services, greedy accuracy again; a PNG plot of reward and accuracy over steps and a JSON
summary in the run's directory. No GPU, no download.

The demo directory (`--run-dir`, default runs/demo) holds the task and the warm-up, shared and reused by
later demos, and one numbered directory per RL run (001-grpo, 002-ppo, ...) with its step log,
checkpoints, service logs, plot and summary: a run never writes into another's.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.run.config import RunConfig, build_config

# A fixed-length warm-up (docker/entrypoint.py prepares its model with it): enough supervised steps
# that some answers are right.
WARMUP = {"steps": 500, "batch_size": 64, "lr": 3e-3}
TASK = {"n_train": 5000, "n_test": 200, "max_operand": 99, "n_dev": 200}
EVAL_ROWS = 200

# The demo's RL recipe per algorithm (measured, see README "Benchmarks"): 32 prompts x 8 samples a
# step. With 8 prompts the gradient is too noisy for Adam: every parameter takes ~lr-sized random
# steps, and learning rates >= 1e-3 wipe out the warm-up (accuracy 36% -> 0-5% within 30 steps).
# kl_coef 0 also did worse than the default KL to the reference (36% -> 27% in 7 minutes).
RECIPES: dict[str, dict[str, Any]] = {
    "grpo": {"algorithm": {"lr": 5e-4}, "prompts_per_step": 32},
    "ppo": {"algorithm": {"lr": 3e-4, "epochs": 2, "kl_coef": 0.01}, "prompts_per_step": 32},
    "trpo": {"algorithm": {"trpo_max_kl": 0.001, "trpo_cg_iters": 5, "trpo_fisher_fraction": 0.25}, "prompts_per_step": 32},
}


@dataclass
class DemoSummary:
    algo: str
    steps: int
    accuracy_before: float
    accuracy_after: float
    reward_first: float
    reward_last: float
    warmup_seconds: float
    rl_seconds: float
    step_seconds_mean: float
    curve: list[dict[str, float]] = field(default_factory=list)  # step, reward, accuracy (when measured)
    run_dir: str = ""


def demo_config(algo: str, *, steps: int, run_dir: Path, policy: Path, dataset: Path, seed: int,
                overrides: list[str] | None = None) -> RunConfig:
    """The run config of the demo: local services, arithmetic rule reward, RECIPES[algo] (32 prompts x
    8 samples), the 6 new tokens an answer needs at most."""
    recipe = RECIPES[algo]
    data = {
        "models": {"policy": str(policy)},
        "services": {"local": True, "local_options": {"reward": {"kind": "rule", "rule": "arithmetic"},
                                                       "value": {}}},
        "algorithm": {"name": algo, **recipe["algorithm"]},
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
        "dataset": {"path": str(dataset), "prompt_column": "prompt", "metadata_columns": ["answer"]},
        "checkpoint": {"interval": 0, "keep": 1},
        "prompts_per_step": recipe["prompts_per_step"],
        "samples_per_prompt": 8,
        "steps": steps,
        "seed": seed,
        "metrics_port": 0,
        "run_dir": str(run_dir),
    }
    return build_config(data, overrides)


@dataclass(frozen=True)
class Prepared:
    """The warmed-up starting point of an RL run."""

    policy_dir: Path
    train_path: Path
    test_path: Path
    warmup_seconds: float
    accuracy: float  # greedy test accuracy of the warmed-up model


def prepare(run_dir: Path, *, seed: int, log: Callable[[str], None]) -> Prepared:
    """Task files and the warm-up checkpoint in `run_dir` (reused when made with the same settings)."""
    import torch

    from demo.modelkit.arithmetic import load_jsonl, make_arithmetic_task
    from demo.modelkit.evaluate import greedy_accuracy
    from demo.modelkit.model import DEMO_MODEL, build_tiny_model, count_parameters, save_checkpoint
    from demo.modelkit.tokenizer import build_char_tokenizer
    from demo.modelkit.warmup import DEMO_WARMUP, sft_warmup

    train_path, test_path = make_arithmetic_task(run_dir / "task", seed=seed, **TASK)
    dev_path = train_path.parent / "dev.jsonl"  # held out: decides when the warm-up stops
    stamp_path = run_dir / "warmup" / "quartet-warmup.json"
    settings = {"warmup": DEMO_WARMUP, "task": TASK, "model": DEMO_MODEL, "seed": seed}
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp["settings"] == json.loads(json.dumps(settings)):
            log(f"reusing the warm-up checkpoint in {stamp_path.parent}")
            return Prepared(stamp_path.parent, train_path, test_path, stamp["seconds"], stamp["accuracy"])
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, **DEMO_MODEL, seed=seed)
    target, cap = DEMO_WARMUP["target_accuracy"], DEMO_WARMUP["steps"]
    log(f"demo model: {count_parameters(model):,} parameters; supervised warm-up until held-out accuracy "
        f"reaches {target:.0%} (at most {cap} steps) ...")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread, no OpenMP waits under contention (see models.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            losses = sft_warmup(
                model, tokenizer, load_jsonl(train_path), seed=seed, eval_rows=load_jsonl(dev_path), **DEMO_WARMUP,
                progress=lambda step, loss: step % 100 == 0 and log(f"  warm-up step {step}: loss {loss:.3f}"),
            )
    finally:
        torch.set_num_threads(threads)
    warmup_seconds = time.perf_counter() - start
    log(f"warm-up stopped after {len(losses)} steps ({warmup_seconds:.0f} s)")
    policy = save_checkpoint(model, tokenizer, run_dir / "warmup")
    acc = greedy_accuracy(model, tokenizer, load_jsonl(test_path)[:EVAL_ROWS]).accuracy
    stamp_path.write_text(json.dumps({"settings": settings, "seconds": warmup_seconds, "accuracy": acc}))
    return Prepared(policy, train_path, test_path, warmup_seconds, acc)


def run_demo(*, algo: str = "grpo", steps: int = 150, run_dir: str | Path = "runs/demo", seed: int = 0,
             eval_every: int = 10, overrides: list[str] | None = None,
             log: Callable[[str], None] = print, on_step: Callable[[Any], None] | None = None,
             prepared: Prepared | None = None, max_seconds: float | None = None) -> DemoSummary:
    """The whole demo; returns (and writes) its summary.

    `run_dir` is the demo directory: the task and warm-up there are reused, the run gets a new numbered
    directory inside it (summary.run_dir). `prepared` reuses a warm-up made earlier (benchmarks run several
    algorithms from one); `max_seconds` stops the RL phase after the step that crosses it.
    """
    from demo.modelkit.arithmetic import load_jsonl
    from demo.modelkit.evaluate import greedy_accuracy
    from orchestrator.run.session import Session

    workspace = Path(run_dir)
    workspace.mkdir(parents=True, exist_ok=True)
    prep = prepared or prepare(workspace, seed=seed, log=log)
    before = prep.accuracy
    log(f"greedy test accuracy after warm-up: {before:.1%}")
    test_rows = load_jsonl(prep.test_path)[:EVAL_ROWS]
    run_dir = new_run_dir(workspace, algo)
    log(f"this run's directory: {run_dir}")
    cfg = demo_config(algo, steps=steps, run_dir=run_dir, policy=prep.policy_dir, dataset=prep.train_path,
                      seed=seed, overrides=overrides)
    curve: list[dict[str, float]] = [{"step": 0, "accuracy": before}]
    start = time.perf_counter()
    with Session(cfg, log=log) as session:
        o = session.orchestrator

        results = []
        while o.state.step < cfg.steps:
            r = o.step()
            results.append(r)
            last = o.state.step == cfg.steps or (max_seconds is not None and time.perf_counter() - start > max_seconds)
            point = {"step": r.step, "reward": r.rewards["mean"], "step_seconds": r.metrics["step_seconds"],
                     "seconds": time.perf_counter() - start}
            if r.step % eval_every == 0 or last:
                point["accuracy"] = greedy_accuracy(o.policy, o.tokenizer, test_rows).accuracy
            curve.append(point)
            if on_step is not None:
                on_step(r)
            if last:
                break
        session.save_final()
    rl_seconds = time.perf_counter() - start
    after = next(p["accuracy"] for p in reversed(curve) if "accuracy" in p)
    summary = DemoSummary(
        algo=algo, steps=len(results), accuracy_before=before, accuracy_after=after,
        reward_first=results[0].rewards["mean"] if results else 0.0,
        reward_last=results[-1].rewards["mean"] if results else 0.0,
        warmup_seconds=prep.warmup_seconds, rl_seconds=rl_seconds,
        step_seconds_mean=sum(r.metrics["step_seconds"] for r in results) / max(1, len(results)),
        curve=curve, run_dir=str(run_dir),
    )
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    plot(summary, run_dir / "curves.png", log=log)
    return summary


def new_run_dir(workspace: Path, algo: str) -> Path:
    """A new directory for one demo run, numbered after the highest in `workspace`: e.g. runs/demo/003-grpo."""
    taken = [int(m.group(1)) for p in workspace.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    n = max(taken, default=0) + 1
    while True:
        path = workspace / f"{n:03d}-{algo}"
        try:
            path.mkdir()  # atomic: two demos started together never share one
            return path
        except FileExistsError:
            n += 1


def plot(summary: DemoSummary, path: Path, *, log: Callable[[str], None] = print) -> Path | None:
    """Reward (left axis) and greedy test accuracy (right axis) over steps, as a PNG.

    matplotlib is an optional dependency (the `plot` extra): without it the summary is still written
    and the plot is skipped with a line saying how to get it.
    """
    try:
        import matplotlib
    except ImportError:
        log(f"no plot: matplotlib is not installed (pip install 'quartet-rl[plot]'); the curve is in {path.parent / 'summary.json'}")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    pts = [p for p in summary.curve if "reward" in p]
    ax.plot([p["step"] for p in pts], [p["reward"] for p in pts], color="tab:blue", label="mean reward")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward", color="tab:blue")
    ax2 = ax.twinx()
    acc = [p for p in summary.curve if "accuracy" in p]
    ax2.plot([p["step"] for p in acc], [p["accuracy"] for p in acc], "o-", color="tab:orange", label="test accuracy")
    ax2.set_ylabel("greedy test accuracy", color="tab:orange")
    ax2.set_ylim(0, 1)
    ax.set_title(f"quartet demo ({summary.algo}): accuracy {summary.accuracy_before:.0%} -> {summary.accuracy_after:.0%}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
