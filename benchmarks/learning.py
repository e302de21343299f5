"""Learning benchmark: from the demo's warm-up checkpoint, does RL raise greedy test accuracy?

Target (issue 5): GRPO raises greedy test accuracy on the arithmetic task by >= 20 points within
10 minutes on 2 CPU cores; PPO and TRPO raise the mean reward. One warm-up is shared by all
algorithms; each then runs through the embedded stack for at most --minutes (wall clock, test-set
evaluations included) and its curve (reward per step, accuracy every --eval-every steps) is
written to <run-dir>/learning.json and <run-dir>/<algo>/curves.png.

    python benchmarks/learning.py [--algos grpo ppo trpo] [--minutes 10] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", default=["grpo", "ppo", "trpo"])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=5000, help="upper bound on steps per algorithm (--minutes usually ends it)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bench-learning"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="run-config override for every algo")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the orchestrator (models.threads) and the local services

    from demo.run import prepare, run_demo

    args.run_dir.mkdir(parents=True, exist_ok=True)
    prep = prepare(args.run_dir, seed=args.seed, log=print)
    print(f"warm-up: {prep.warmup_seconds:.0f} s, greedy test accuracy {prep.accuracy:.1%}")
    report = {"warmup_seconds": prep.warmup_seconds, "accuracy_warmup": prep.accuracy, "runs": {}}
    for algo in args.algos:
        summary = run_demo(algo=algo, steps=args.steps, run_dir=args.run_dir / algo, seed=args.seed,
                           eval_every=args.eval_every, overrides=args.sets, prepared=prep,
                           max_seconds=args.minutes * 60, log=print)
        rewards = [p["reward"] for p in summary.curve if "reward" in p]
        head = sum(rewards[:10]) / max(1, len(rewards[:10]))
        tail = sum(rewards[-10:]) / max(1, len(rewards[-10:]))
        report["runs"][algo] = {**asdict(summary), "reward_first10": head, "reward_last10": tail}
        print(f"{algo}: {summary.steps} steps in {summary.rl_seconds:.0f} s; accuracy {summary.accuracy_before:.1%} -> "
              f"{summary.accuracy_after:.1%} ({100 * (summary.accuracy_after - summary.accuracy_before):+.1f} points); "
              f"mean reward first 10 steps {head:.3f} -> last 10 {tail:.3f}")
        (args.run_dir / "learning.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.run_dir / 'learning.json'}")


if __name__ == "__main__":
    main()
