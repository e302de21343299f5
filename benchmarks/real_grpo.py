"""A timed GRPO run on a real chat model and real math problems, with held-out accuracy before and after.

SmolLM2-135M-Instruct (converted, fp32, CPU) on GSM8K train, for `--minutes` of wall clock. The roles run as
their own processes on 127.0.0.1 (`python -m services serve`): the generator, and two reward services
combined with weights: `math` (1 when the extracted final answer equals the reference) and
`final_answer` (1 when the completion states a final answer at all). The format reward gives the groups
whose samples are all wrong a signal, since the model is rarely right. No reference model by default
(`kl_coef: 0`, as DAPO and Dr. GRPO): its forward would take a third of the CPU.

Measured per step (from the step log): reward per service, the share of groups with any reward
variance (the groups GRPO learns from), the share of groups with a correct sample, truncation, step
time and phases, weight-sync seconds; before and after: greedy accuracy, answer-format rate and
truncation on `--eval-n` GSM8K *test* problems (benchmarks/real_math.py; disjoint from training).

    python benchmarks/real_grpo.py --model DIR [--minutes 60] [--prompts 2] [--samples 8]
        [--max-new-tokens 192] [--lr 5e-6] [--eval-n 200] [--out runs/bench-real-grpo] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Solve the problem step by step. End with: The answer is N."
EXTRACT = ["boxed", "answer_is", "hash", "last_number"]


def _serve(name: str, role: str, out: Path, *, model: Path | None, options: dict) -> tuple[subprocess.Popen, Path]:
    ready = out / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    cfg = {"role": role, "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None}, "ready_file": str(ready),
           "options": options}
    if model is not None:
        cfg["model"] = {"path": str(model)}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    log = (out / f"{name}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "services", "serve", "--config", str(out / f"{name}.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, ready


def _address(proc: subprocess.Popen, ready: Path, name: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start; see its log")
        time.sleep(0.5)
    info = json.loads(ready.read_text())
    return f"127.0.0.1:{info['port']}"


def _evaluate(model: Path, n: int, out: Path) -> dict:
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_math.py"), "--model", str(model), "--n", str(n),
                    "--datasets", "gsm8k", "--max-new-tokens", "256", "--system-prompt", SYSTEM, "--batch-size", "16",
                    "--out", str(out)], check=True, cwd=REPO)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--format-weight", type=float, default=0.25)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--skip-before", action="store_true", help="reuse <out>/before.json")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-real-grpo"))
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "load_before": os.getloadavg()}
    if not (args.skip_before and (out / "before.json").exists()):
        _evaluate(args.model, args.eval_n, out / "before.json")
    report["before"] = json.loads((out / "before.json").read_text())

    started = {
        "generator": _serve("generator", "generator", out, model=args.model, options={}),
        "reward-math": _serve("reward-math", "reward", out, model=None,
                              options={"kind": "rule", "rule": "math", "extract": EXTRACT, "workers": 1}),
        "reward-format": _serve("reward-format", "reward", out, model=None,
                                options={"kind": "rule", "rule": "final_answer", "workers": 1}),
    }
    try:
        addr = {name: _address(p, r, name) for name, (p, r) in started.items()}
        from orchestrator.run.config import build_config
        from orchestrator.run.datasets import packaged_dataset_path
        from orchestrator.run.session import Session

        run_dir = out / "run"
        cfg = build_config({
            "models": {"policy": str(args.model), "threads": 2},
            "services": {"generator": {"address": addr["generator"]},
                         "rewards": [{"address": addr["reward-math"], "weight": 1.0},
                                     {"address": addr["reward-format"], "weight": args.format_weight}]},
            "algorithm": {"name": "grpo", "lr": args.lr, "kl_coef": 0.0},
            "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
            "dataset": {"kind": "gsm8k", "path": str(packaged_dataset_path("gsm8k", "train")), "system_prompt": SYSTEM},
            "prompts_per_step": args.prompts, "samples_per_prompt": args.samples, "steps": 100000, "seed": 0,
            "metrics_port": None, "run_dir": str(run_dir), "progress": {"mode": "lines", "every_steps": 1},
            "checkpoint": {"interval": 0, "keep": 1},
        }, args.sets)
        deadline = time.monotonic() + args.minutes * 60
        with Session(cfg, overwrite=True) as session:
            orch = session.orchestrator
            while time.monotonic() < deadline:
                r = orch.step()
                print(f"step {r.step}: reward {r.rewards['mean']:.3f} {r.metrics['step_seconds']:.0f} s", flush=True)
            final = session.save_final()
    finally:
        for proc, _ in started.values():
            proc.terminate()
        for proc, _ in started.values():
            proc.wait(timeout=30)
    lines = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    report["steps"] = len(lines)
    report["step_seconds_median"] = statistics.median(r["step_seconds"] for r in lines)
    report["phases_median"] = {p: statistics.median(r["phases"].get(p, 0.0) for r in lines)
                               for p in sorted({p for r in lines for p in r["phases"]})}
    report["sync_seconds_median"] = statistics.median(r.get("sync_seconds", 0.0) for r in lines)
    report["group_signal_fraction_mean"] = statistics.mean(r["group_signal_fraction"] for r in lines)
    report["curve"] = [{"step": r["step"], "reward": r["reward"]["mean"], "finished": r["finished_fraction"],
                        "length": r["response_length_mean"], "signal": r["group_signal_fraction"]} for r in lines]
    report["after"] = _evaluate(final / "policy", args.eval_n, out / "after.json")
    report["load_after"] = os.getloadavg()
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
