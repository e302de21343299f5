#!/usr/bin/env python
"""`quartet-docker`: the two container jobs that are not `quartet serve`.

    quartet-docker prepare [--warmup-steps N]     the demo model + arithmetic task on the volumes
    quartet-docker train CONFIG [--set k=v]... [--resume]

`train` is `quartet train` for a container:
- tokens come from the secret files (QUARTET_TOKEN_FILE / QUARTET_ADMIN_TOKEN_FILE) or the
  QUARTET_TOKEN / QUARTET_ADMIN_TOKEN variables and are filled into every endpoint of the run
  config that has none, so they are never written into a config file or baked into an image;
- the orchestrator's metrics are reachable from the Prometheus container (port
  QUARTET_METRICS_PORT, all interfaces of the container's own network namespace);
- after the last step the metrics stay up QUARTET_METRICS_LINGER_S seconds (default 15) so
  Prometheus scrapes the final values of a run that is shorter than a scrape interval; a SIGTERM
  (`docker stop`) during that linger ends it early and the run still exits 0 (it is complete);
- one plain log line per step (`docker compose logs orchestrator` has no terminal for a progress bar);
- with QUARTET_TRAIN_RETRIES=N (or --retries N), a run stopped by a service error is resumed from
  its last checkpoint after a backoff, up to N times: checkpoint every step (checkpoint.interval: 1)
  and nothing is redone. A safety net only: a service restart (e.g. the reward service being
  swapped) is ridden through by the clients' retries within the run config's services.retry
  budget; this resume is for an outage longer than that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
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


def _forward(listen_port: int, target_port: int) -> None:
    """Relay TCP from all interfaces to the orchestrator's loopback-only metrics endpoint.

    Only used while the run config has no `metrics_host` field (the orchestrator binds its metrics
    to 127.0.0.1): the relay makes them scrapeable from the Prometheus container.
    """
    server = socket.create_server(("0.0.0.0", listen_port), reuse_port=False)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while True:
            client, _ = server.accept()
            try:
                upstream = socket.create_connection(("127.0.0.1", target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, name="metrics-relay", daemon=True).start()


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


def train(args: argparse.Namespace) -> int:
    """Load the run config, fill in tokens and metrics address, run it like `quartet train`."""
    import typer
    from rich.console import Console

    from cli.train import print_summary, run_with_progress
    from orchestrator.run.config import ConfigError, RunConfig, load_config

    console = Console()
    try:
        cfg = load_config(args.config, args.set or [])
    except ConfigError as e:
        console.print(f"[bold red]config error:[/] {e}", highlight=False, markup=False)
        return 2
    token = _secret("QUARTET_TOKEN_FILE", "QUARTET_TOKEN")
    admin = _secret("QUARTET_ADMIN_TOKEN_FILE", "QUARTET_ADMIN_TOKEN")
    s = cfg.services
    for ep in (s.generator, s.reference, s.value, *s.rewards):
        if ep is not None and ep.token is None:
            ep.token = token
            ep.admin_token = ep.admin_token or admin
    public_port = int(os.environ.get("QUARTET_METRICS_PORT", "9100"))
    if "metrics_host" in RunConfig.model_fields:
        cfg.metrics_host = os.environ.get("QUARTET_METRICS_HOST", "0.0.0.0")  # type: ignore[attr-defined]
        cfg.metrics_port = public_port
    elif cfg.metrics_port is not None:
        cfg.metrics_port = cfg.metrics_port or public_port + 1
        _forward(public_port, cfg.metrics_port)
    linger = float(os.environ.get("QUARTET_METRICS_LINGER_S", "15"))

    def on_step(r) -> None:
        line = {"step": r.step, "reward_mean": round(r.rewards["mean"], 4), "reward_services": r.reward_services,
                "kl_ref": round(r.metrics.get("kl_ref", 0.0), 5), "step_seconds": round(r.metrics["step_seconds"], 3)}
        print(json.dumps(line), flush=True)
        if r.step >= cfg.steps and linger > 0 and cfg.metrics_port is not None:
            _linger(linger)

    resume, delay = args.resume, 5.0
    for attempt in range(args.retries + 1):
        try:
            results = run_with_progress(cfg, resume=resume, console=console, on_step=on_step)
        except typer.Exit as e:
            if e.exit_code != 1 or attempt == args.retries:
                return int(e.exit_code)
            # The run stopped on a service (or launch) error; its last checkpoint is complete.
            print(f"run stopped (attempt {attempt + 1} of {args.retries + 1}); resuming from the last "
                  f"checkpoint in {delay:g} s", flush=True)
            time.sleep(delay)
            resume, delay = True, min(60.0, delay * 2)
            continue
        print_summary(console, cfg, results)
        return 0
    return 1


def main(argv: list[str] | None = None) -> int:
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
    t = sub.add_parser("train", help="Run `quartet train` with tokens from secrets and scrapeable metrics.")
    t.add_argument("config", type=Path, help="YAML run config.")
    t.add_argument("--set", action="append", help="key=value override, repeatable.")
    t.add_argument("--resume", action="store_true", help="Continue from the last complete checkpoint.")
    t.add_argument("--retries", type=int, default=int(os.environ.get("QUARTET_TRAIN_RETRIES", "0")),
                   help="Resume after a service error up to N times (default: $QUARTET_TRAIN_RETRIES or 0).")
    args = parser.parse_args(argv)
    return prepare(args) if args.command == "prepare" else train(args)


if __name__ == "__main__":
    sys.exit(main())
