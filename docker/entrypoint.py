#!/usr/bin/env python
"""`quartet-docker`: what a container needs beyond the `quartet` command.

    quartet-docker prepare [--warmup-steps N]     the demo model + arithmetic task on the volumes
    quartet-docker train CONFIG [--set k=v]... [--resume] [--retries N]

`train` is `quartet train` itself (same options; --retries / QUARTET_TRAIN_RETRIES resumes a run stopped
by a service error from its last checkpoint), called with what a container adds (cli.train.TrainHooks):
- tokens come from the secret files (QUARTET_TOKEN_FILE / QUARTET_ADMIN_TOKEN_FILE) or the
  QUARTET_TOKEN / QUARTET_ADMIN_TOKEN variables and are filled into every endpoint of the run
  config that has none, so they are never written into a config file or baked into an image;
- the orchestrator's metrics are reachable from the Prometheus container (port
  QUARTET_METRICS_PORT, all interfaces of the container's own network namespace);
- after the last step the metrics stay up QUARTET_METRICS_LINGER_S seconds (default 15) so
  Prometheus scrapes the final values of a run that is shorter than a scrape interval; a SIGTERM
  (`docker stop`) during that linger ends it early and the run still exits 0 (it is complete);
- one plain log line per step (`docker compose logs orchestrator` has no terminal for a progress bar).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def _secret(file_var: str, value_var: str) -> str | None:
    path = os.environ.get(file_var)
    if path:
        text = Path(path).read_text(encoding="utf-8").strip()
        if not text:
            sys.exit(f"quartet-docker: {file_var}={path} is empty")
        return text
    return os.environ.get(value_var) or None


def prepare(args: argparse.Namespace) -> int:
    """The demo's starting point: arithmetic task files and a (warmed-up) ~1M-parameter checkpoint."""
    import torch

    from demo.modelkit import (
        DEMO_MODEL,
        build_char_tokenizer,
        build_tiny_model,
        load_jsonl,
        make_arithmetic_task,
        save_checkpoint,
        sft_warmup,
    )
    from demo.run import TASK, WARMUP

    steps = WARMUP["steps"] if args.warmup_steps is None else args.warmup_steps
    policy, task = Path(args.models) / "policy", Path(args.data) / "task"
    if (policy / "config.json").is_file() and (task / "train.jsonl").is_file() and not args.force:
        print(f"prepare: {policy} and {task} exist; nothing to do (--force rebuilds them)")
        return 0
    train_path, _test_path = make_arithmetic_task(task, seed=args.seed, **TASK)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, **DEMO_MODEL, seed=args.seed)
    if steps > 0:
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            sft_warmup(model, tokenizer, load_jsonl(train_path), seed=args.seed, **{**WARMUP, "steps": steps})
        print(f"prepare: {steps} supervised warm-up steps (as `quartet demo`) in {time.perf_counter() - start:.1f} s")
    save_checkpoint(model, tokenizer, policy)
    print(f"prepare: policy checkpoint {policy}, task {task}")
    return 0


def _linger(seconds: float) -> None:
    """Keep the process (and its metrics endpoint) up `seconds`; SIGTERM ends the wait early.

    As PID 1 of a container the process ignores SIGTERM unless it installs a handler, so without
    this `docker stop` during the linger would wait for its kill timeout and report exit 137.
    """
    if threading.current_thread() is not threading.main_thread():
        time.sleep(seconds)  # signal handlers can only be installed from the main thread
        return
    done = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        print(f"run complete: metrics stay up {seconds:g} s for a final scrape", flush=True)
        if done.wait(seconds):
            print("run complete: SIGTERM ended the metrics linger", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


class ContainerRun:
    """The container's additions to `quartet train` (see the module docstring)."""

    def __init__(self) -> None:
        self.linger = float(os.environ.get("QUARTET_METRICS_LINGER_S", "15"))
        self.steps: int | None = None
        self.metrics_on = False

    def configure(self, cfg) -> None:
        """Tokens from the secrets into endpoints without one; metrics on all interfaces at QUARTET_METRICS_PORT."""
        token = _secret("QUARTET_TOKEN_FILE", "QUARTET_TOKEN")
        admin = _secret("QUARTET_ADMIN_TOKEN_FILE", "QUARTET_ADMIN_TOKEN")
        s = cfg.services
        for ep in (s.generator, s.reference, s.value, *s.rewards):
            if ep is not None and ep.token is None:
                ep.token = token
                ep.admin_token = ep.admin_token or admin
        cfg.metrics_host = os.environ.get("QUARTET_METRICS_HOST", "0.0.0.0")
        cfg.metrics_port = int(os.environ.get("QUARTET_METRICS_PORT", "9100"))
        self.steps, self.metrics_on = cfg.steps, cfg.metrics_port is not None

    def on_step(self, r) -> None:
        """One JSON line per step; after the last one, the metrics linger."""
        line = {"step": r.step, "reward_mean": round(r.rewards["mean"], 4), "reward_services": r.reward_services,
                "kl_ref": round(r.metrics.get("kl_ref", 0.0), 5), "step_seconds": round(r.metrics["step_seconds"], 3)}
        print(json.dumps(line), flush=True)
        if self.steps is not None and r.step >= self.steps and self.linger > 0 and self.metrics_on:
            _linger(self.linger)


def train(argv: list[str]) -> int:
    """`quartet train ARGV` with the container's hooks; exits with the command's status."""
    from cli.main import app
    from cli.train import TrainHooks

    run = ContainerRun()
    app(["train", *argv], prog_name="quartet-docker", obj=TrainHooks(run.configure, run.on_step))
    return 0  # not reached: the command exits with its own status (click's standalone mode)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # parsed by `quartet train` itself: one CLI
        return train(argv[1:])
    parser = argparse.ArgumentParser(prog="quartet-docker", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="Write the demo model and arithmetic task (skipped when present).")
    p.add_argument("--models", default="/models", help="Models volume; the checkpoint goes to MODELS/policy.")
    p.add_argument("--data", default="/data", help="Data volume; the task goes to DATA/task/{train,test}.jsonl.")
    env_steps = os.environ.get("QUARTET_WARMUP_STEPS", "").strip()
    p.add_argument("--warmup-steps", type=int, default=int(env_steps) if env_steps else None,
                   help="Supervised warm-up steps (0: random init; default: $QUARTET_WARMUP_STEPS, else the demo's).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the task, model and warm-up.")
    p.add_argument("--force", action="store_true", help="Rebuild even if both exist.")
    sub.add_parser("train", help="`quartet train` with tokens from secrets, scrapeable metrics and a line per step "
                   "(quartet-docker train --help).")
    return prepare(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
