"""`quartet demo`: a tiny model learns arithmetic with RL through the embedded stack.

Build the ~1M-parameter demo model and the arithmetic task (model kit), a short supervised warm-up
so some answers are right, greedy test accuracy, an RL run (GRPO by default) with the four roles as
local services, greedy accuracy again; a PNG plot of reward and accuracy over steps and a JSON
summary in the run directory. No GPU, no download.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import RunConfig, build_config

# Warm-up settings: enough supervised steps that greedy test accuracy starts well above 0 but far
# from 100%, leaving RL something to do (measured on 2 CPU cores, see the demo's JSON summary).
WARMUP = {"steps": 500, "batch_size": 64, "lr": 3e-3}
TASK = {"n_train": 5000, "n_test": 200, "max_operand": 99}
EVAL_ROWS = 200


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
    """The run config of the demo: local services, arithmetic rule reward, 8 prompts x 8 samples."""
    algorithm: dict[str, Any] = {"name": algo, "lr": 1e-4}
    if algo == "ppo":
        algorithm.update(epochs=2, kl_coef=0.01)
    data = {
        "models": {"policy": str(policy)},
        "services": {"local": True, "local_options": {"reward": {"kind": "rule", "rule": "arithmetic"},
                                                       "value": {}}},
        "algorithm": algorithm,
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
        "dataset": {"path": str(dataset), "prompt_column": "prompt", "metadata_columns": ["answer"]},
        "checkpoint": {"interval": 0, "keep": 1},
        "prompts_per_step": 8,
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

    from services.common.modelkit.arithmetic import load_jsonl, make_arithmetic_task
    from services.common.modelkit.evaluate import greedy_accuracy
    from services.common.modelkit.model import DEMO_MODEL, build_tiny_model, count_parameters, save_checkpoint
    from services.common.modelkit.tokenizer import build_char_tokenizer
    from services.common.modelkit.warmup import sft_warmup

    train_path, test_path = make_arithmetic_task(run_dir / "task", seed=seed, **TASK)
    stamp_path = run_dir / "warmup" / "quartet-warmup.json"
    settings = {"warmup": WARMUP, "task": TASK, "model": DEMO_MODEL, "seed": seed}
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp["settings"] == json.loads(json.dumps(settings)):
            log(f"reusing the warm-up checkpoint in {stamp_path.parent}")
            return Prepared(stamp_path.parent, train_path, test_path, stamp["seconds"], stamp["accuracy"])
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, **DEMO_MODEL, seed=seed)
    log(f"demo model: {count_parameters(model):,} parameters; supervised warm-up for {WARMUP['steps']} steps ...")
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread, no OpenMP waits under contention (see models.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            sft_warmup(model, tokenizer, load_jsonl(train_path), seed=seed, **WARMUP,
                       progress=lambda step, loss: step % 100 == 0 and log(f"  warm-up step {step}: loss {loss:.3f}"))
    finally:
        torch.set_num_threads(threads)
    warmup_seconds = time.perf_counter() - start
    policy = save_checkpoint(model, tokenizer, run_dir / "warmup")
    acc = greedy_accuracy(model, tokenizer, load_jsonl(test_path)[:EVAL_ROWS]).accuracy
    stamp_path.write_text(json.dumps({"settings": settings, "seconds": warmup_seconds, "accuracy": acc}))
    return Prepared(policy, train_path, test_path, warmup_seconds, acc)


def run_demo(*, algo: str = "grpo", steps: int = 60, run_dir: str | Path = "runs/demo", seed: int = 0,
             eval_every: int = 10, overrides: list[str] | None = None,
             log: Callable[[str], None] = print, on_step: Callable[[Any], None] | None = None,
             prepared: Prepared | None = None, max_seconds: float | None = None) -> DemoSummary:
    """The whole demo; returns (and writes) its summary.

    `prepared` reuses a warm-up made earlier (benchmarks run several algorithms from one);
    `max_seconds` stops the RL phase after the step that crosses it.
    """
    from orchestrator.session import Session
    from services.common.modelkit.arithmetic import load_jsonl
    from services.common.modelkit.evaluate import greedy_accuracy

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prep = prepared or prepare(run_dir, seed=seed, log=log)
    before = prep.accuracy
    log(f"greedy test accuracy after warm-up: {before:.1%}")
    test_rows = load_jsonl(prep.test_path)[:EVAL_ROWS]
    cfg = demo_config(algo, steps=steps, run_dir=run_dir / "rl", policy=prep.policy_dir, dataset=prep.train_path,
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
    plot(summary, run_dir / "curves.png")
    return summary


def plot(summary: DemoSummary, path: Path) -> Path:
    """Reward (left axis) and greedy test accuracy (right axis) over steps, as a PNG."""
    import matplotlib

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
