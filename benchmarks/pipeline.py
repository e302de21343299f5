r"""Pipelined (one-step off-policy) rollouts against synchronous ones: step time and learning curve (issue 14).

From the demo's warm-up checkpoint, GRPO through the embedded stack, the same steps, data and seeds with
`rollout.pipeline` false and true, seed by seed (sync then pipelined, so that a load change on the box
hits both). Per run: the median step and phase seconds from its step log, greedy test accuracy before and
after, the mean reward of the first and last 10 steps, and the reward / accuracy curve. The learning
curves are compared against the seed-to-seed spread of the synchronous runs (the noise).

    python benchmarks/pipeline.py [--steps 60] [--seeds 0 1] [--eval-every 20] [--set key=value ...]

With `--config RUN.yaml` (e.g. examples/gsm8k_grpo.yaml with the real 135M model) each arm is a
`quartet train RUN.yaml --set rollout.pipeline=...` of its own instead; the curve is then the reward and
each reward service's mean per step (and the run's own `eval:` points, when it has any):

    python benchmarks/pipeline.py --config examples/gsm8k_grpo.yaml --steps 30 --seeds 0 \
        --set prompts_per_step=2 --set sampling.max_new_tokens=200 --set algorithm.lr=1e-5 \
        --set algorithm.kl_coef=0 --set eval.every=15 --set eval.max_samples=100

(About 75 s a step per arm on 2 CPU cores. At 128 new tokens SmolLM2-135M's answers were cut in 90-100%
of samples, so hardly any group carried a reward signal and neither arm had anything to learn.)

Writes <run-dir>/pipeline.json and <run-dir>/pipeline.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

PHASES = ("generate", "score", "reference", "update", "prefetch_wait", "sync")


def _step_log(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "steps.jsonl").read_text().splitlines()]


def _medians(lines: list[dict], skip: int) -> dict[str, float]:
    rows = lines[skip:] or lines
    out = {"step_seconds": statistics.median(r["step_seconds"] for r in rows)}
    for phase in PHASES:
        values = [r["phases"].get(phase, 0.0) for r in rows]
        if any(values):
            out[phase] = statistics.median(values)
    return out


@dataclass
class _Arm:
    """What the report needs of one finished run, whichever way it was started."""

    run_dir: Path
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    curve: list[dict] = field(default_factory=list)


def _train_arm(config: Path, run_dir: Path, seed: int, steps: int, overrides: list[str]) -> _Arm:
    """One `quartet train` run of a user config; the curve from its step log and eval.jsonl."""
    sets = [*overrides, f"run_dir={run_dir}", f"seed={seed}", f"steps={steps}"]
    cmd = [sys.executable, "-m", "cli.main", "train", str(config), "--overwrite"]
    for item in sets:
        cmd += ["--set", item]
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return _read_arm(run_dir)


def _read_arm(run_dir: Path) -> _Arm:
    curve = [{"step": r["step"], "reward": r["reward"]["mean"], **r.get("reward_components", {})}
             for r in _step_log(str(run_dir))]
    evals = run_dir / "eval.jsonl"
    points = [json.loads(line) for line in evals.read_text().splitlines()] if evals.exists() else []
    curve += [{"step": e["step"], "accuracy": e["accuracy"]} for e in points]
    return _Arm(run_dir, points[0]["accuracy"] if points else None, points[-1]["accuracy"] if points else None, curve)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the timing medians")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bench-pipeline"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="run-config override for every run")
    ap.add_argument("--config", type=Path, help="a run config to train instead of the demo (quartet train)")
    ap.add_argument("--report-only", action="store_true",
                    help="with --config: train nothing, report the arms already in --run-dir (an interrupted run)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the orchestrator (models.threads) and the local services

    from demo.run import prepare, run_demo

    args.run_dir.mkdir(parents=True, exist_ok=True)
    prep = None if args.config else prepare(args.run_dir, seed=0, log=print)
    report: dict = {"steps": args.steps, "load_before": os.getloadavg(), "runs": []}
    for seed in args.seeds:
        for pipelined in (False, True):
            mode = "pipelined" if pipelined else "sync"
            overrides = [*args.sets, f"rollout.pipeline={str(pipelined).lower()}"]
            run_dir = args.run_dir / f"{mode}-seed{seed}"
            if args.config and args.report_only:
                if not (run_dir / "steps.jsonl").exists():
                    continue
                s = _read_arm(run_dir)
            elif args.config:
                s = _train_arm(args.config, run_dir, seed, args.steps, overrides)
            else:
                s = run_demo(algo="grpo", steps=args.steps, run_dir=run_dir, seed=seed,
                             eval_every=args.eval_every, overrides=overrides, prepared=prep, log=lambda _m: None)
            lines = _step_log(s.run_dir)
            run = {"mode": mode, "seed": seed, "accuracy_before": s.accuracy_before, "accuracy_after": s.accuracy_after,
                   "reward_components_last10": {k: statistics.mean(r.get("reward_components", {}).get(k, 0.0)
                                                                 for r in lines[-10:])
                                                for k in lines[-1].get("reward_components", {})},
                   "reward_first10": statistics.mean(r["reward"]["mean"] for r in lines[:10]),
                   "reward_last10": statistics.mean(r["reward"]["mean"] for r in lines[-10:]),
                   "medians": _medians(lines, args.skip), "curve": s.curve,
                   "staleness": sorted({r.get("rollout_staleness", 0.0) for r in lines}),
                   "is_weight_mean": statistics.mean(r.get("is_weight_mean", 1.0) for r in lines)}
            report["runs"].append(run)
            m = run["medians"]
            accuracy = (f"accuracy {s.accuracy_before:.1%} -> {s.accuracy_after:.1%}; "
                        if s.accuracy_after is not None else "")
            print(f"seed {seed} {mode:9s}: {m['step_seconds']:.3f} s/step "
                  f"({', '.join(f'{k} {v:.3f}' for k, v in m.items() if k != 'step_seconds')}); {accuracy}"
                  f"reward {run['reward_first10']:.3f} -> {run['reward_last10']:.3f}", flush=True)
    report["load_after"] = os.getloadavg()
    by_mode = {mode: [r for r in report["runs"] if r["mode"] == mode] for mode in ("sync", "pipelined")}
    if not all(by_mode.values()):
        raise SystemExit(f"need a finished run of each mode in {args.run_dir}")
    summary = {}
    for mode, runs in by_mode.items():
        summary[mode] = {"step_seconds": statistics.median(r["medians"]["step_seconds"] for r in runs),
                         "accuracy_after": [r["accuracy_after"] for r in runs],
                         "reward_last10": [r["reward_last10"] for r in runs]}
    summary["speedup"] = summary["sync"]["step_seconds"] / summary["pipelined"]["step_seconds"]
    report["summary"] = summary
    print(json.dumps(summary, indent=1))
    (args.run_dir / "pipeline.json").write_text(json.dumps(report, indent=1))
    _plot(report, args.run_dir / "pipeline.png")
    print(f"wrote {args.run_dir / 'pipeline.json'} and {args.run_dir / 'pipeline.png'}")


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points: one step's reward from a few groups is too noisy to read."""
    return [statistics.mean(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, report["steps"] // 12)
    fig, (reward_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    has_accuracy = any("accuracy" in p for run in report["runs"] for p in run["curve"])
    for run in report["runs"]:
        style = "-" if run["mode"] == "sync" else "--"
        label = f"{run['mode']} seed {run['seed']}"
        points = [p for p in run["curve"] if "reward" in p]
        steps = [p["step"] for p in points]
        reward_ax.plot(steps, _smooth([p["reward"] for p in points], window), style, label=label, alpha=0.8)
        if has_accuracy:
            acc = [p for p in run["curve"] if "accuracy" in p]
            acc_ax.plot([p["step"] for p in acc], [p["accuracy"] for p in acc], style + "o", label=label)
        for name in run["reward_components_last10"]:
            acc_ax.plot(steps, _smooth([p.get(name, 0.0) for p in points], window), style, alpha=0.8,
                        label=f"{label}: {name}")
    reward_ax.set(xlabel="step", ylabel=f"mean reward ({window}-step mean)", title="GRPO reward: sync vs pipelined")
    acc_ax.set(xlabel="step", ylabel="accuracy / reward component",
               title="held-out accuracy" if has_accuracy else "reward services")
    reward_ax.legend(fontsize=7)
    acc_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
