"""Chaos run: a GRPO run through the embedded stack while random services are SIGKILLed every few seconds.

Workload: the demo's (its algorithm recipe, 8 samples per prompt, <= 6 new tokens, the ~1M-parameter
demo model after its supervised warm-up, arithmetic rule reward, GRPO with a reference) with 8 prompts
per step instead of the demo's 32 so that kills land on many steps, 30 steps by default. The
warm-up is the demo's own (`demo.run.prepare`, cached in the run directory), or a
`quartet demo` run directory's with --from-demo. Warmed up, some answers are right, so rewards vary
and the policy moves: the weight comparison below means something.

First an undisturbed run, then the same run while a thread SIGKILLs one service, chosen at random,
every --kill-every seconds (uniform jitter of +-50%). The launcher restarts each killed service on
its port; the orchestrator retries, re-sends weights to a generator that came back, reloads a
critic (with --algo ppo, GAE: the value service is in play too). Reported: whether the run completed,
kills and restarts per service, the rejoin actions of the step log, wall time against the
undisturbed run's, the step log's every-step-once check, and whether the final weights equal the
undisturbed run's bit for bit (they should: the samples are seeded per sample) and moved at all.

    python benchmarks/chaos.py [--steps 30] [--kill-every 5] [--algo grpo|ppo] [--seed 0]
                               [--run-dir runs/chaos] [--from-demo runs/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the shared helpers are imported as `benchmarks.*`
    sys.path.insert(0, str(REPO))

ROLES = {"grpo": ("generator", "reward", "reference"), "ppo": ("generator", "reward", "reference", "value")}
# Patient retries (a restarted service needs seconds to load) and restarts enough for every kill.
CHAOS_SETS = ["metrics_port=null", "prompts_per_step=8", "services.retry.max_attempts=1000", "services.retry.initial_backoff_s=0.1",
              "services.retry.max_backoff_s=1", "services.retry.budget_s=180",
              "services.local_options.max_restarts=1000", "services.local_options.restart_backoff_s=0.2",
              "services.local_options.restart_backoff_max_s=0.2"]


class Killer(threading.Thread):
    """SIGKILLs a random live service of `stack` every `every` seconds (+-50%) until stopped."""

    def __init__(self, stack, roles: tuple[str, ...], *, every: float, seed: int) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.stack, self.roles, self.every = stack, roles, every
        self.rng = random.Random(seed)  # its own stream: the run's seeded RNGs stay untouched
        self.done = threading.Event()
        self.kills: dict[str, int] = dict.fromkeys(roles, 0)
        self.timeline: list[tuple[float, str]] = []
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.done.wait(self.every * self.rng.uniform(0.5, 1.5)):
            role = self.rng.choice(self.roles)
            proc = self.stack.procs.get(role)
            if proc is None or proc.poll() is not None:
                continue  # already dead and being restarted: a kill would count nothing new
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills[role] += 1
            self.timeline.append((round(time.perf_counter() - self.start_time, 2), role))
            print(f"  [{self.timeline[-1][0]:7.2f} s] SIGKILL {role} (pid {proc.pid})", flush=True)


def one_run(cfg, *, chaos: tuple[tuple[str, ...], float, int] | None) -> dict[str, Any]:
    from orchestrator.run.session import Session

    out: dict[str, Any] = {"completed": False}
    t_open = time.perf_counter()
    with Session(cfg, overwrite=True) as session:  # a benchmark re-measures: its last run is not kept
        o, stack = session.orchestrator, session.stack
        killer = Killer(stack, chaos[0], every=chaos[1], seed=chaos[2]) if chaos else None
        t0 = time.perf_counter()
        if killer is not None:
            killer.start()
        try:
            o.run(lambda r: print(f"  step {r.step:3d}  reward {r.rewards['mean']:.3f}  "
                                  f"{r.metrics['step_seconds']:.2f} s", flush=True))
            out["completed"] = True
        except Exception as e:  # the report says how the run ended
            out["error"] = f"{type(e).__name__}: {e}"
        finally:
            if killer is not None:
                killer.done.set()
                killer.join()
        out["run_seconds"] = time.perf_counter() - t0
        out["startup_seconds"] = t0 - t_open
        out["weights"] = {k: v.detach().clone() for k, v in o.policy.state_dict().items()}
        out["restarts"] = dict(stack.restarts)
        out["gave_up"] = list(stack.gave_up)
        if killer is not None:
            out["kills"], out["timeline"] = killer.kills, killer.timeline
    lines = [json.loads(line) for line in (Path(cfg.run_dir) / "steps.jsonl").read_text().splitlines()]
    out["logged_steps"] = [line["step"] for line in lines]
    recovery: dict[str, int] = {}
    for line in lines:
        for action, n in line.get("recovery", {}).items():
            recovery[action] = recovery.get(action, 0) + n
    out["recovery"] = recovery
    out["step_seconds"] = [line["step_seconds"] for line in lines]
    out["rewards"] = [line["reward"]["mean"] for line in lines]
    return out


def main() -> None:
    from benchmarks.reports import write_report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills (uniform +-50%%)")
    ap.add_argument("--algo", choices=sorted(ROLES), default="grpo", help="ppo uses GAE, so the value service too")
    ap.add_argument("--seed", type=int, default=0, help="seed of the run and of the kill schedule")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/chaos"))
    ap.add_argument("--from-demo", type=Path, default=None, help="use a demo run's warmup/ model and task/ data")
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: RUN_DIR/chaos.json)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the orchestrator (models.threads) and the local services

    from demo.run import demo_config, prepare
    from services.common.hf import load_causal_lm

    if args.from_demo is not None:
        policy, train = args.from_demo / "warmup", args.from_demo / "task" / "train.jsonl"
    else:
        prep = prepare(args.run_dir, seed=args.seed, log=print)
        policy, train = prep.policy_dir, prep.train_path
    initial = load_causal_lm(policy, dtype=torch.float32, device="cpu").state_dict()
    sets = [*CHAOS_SETS, *(["algorithm.advantage=gae"] if args.algo == "ppo" else [])]

    def config(name: str):
        return demo_config(args.algo, steps=args.steps, run_dir=args.run_dir / name, policy=policy, dataset=train,
                           seed=args.seed, overrides=sets)

    print(f"undisturbed {args.algo} run, {args.steps} steps ...", flush=True)
    calm = one_run(config("undisturbed"), chaos=None)
    print(f"chaos run: a random one of {', '.join(ROLES[args.algo])} SIGKILLed every ~{args.kill_every:g} s ...",
          flush=True)
    wild = one_run(config("chaos"), chaos=(ROLES[args.algo], args.kill_every, args.seed))

    same = calm["completed"] and wild["completed"] and all(
        torch.equal(calm["weights"][k], wild["weights"][k]) for k in calm["weights"])
    report = {
        "workload": f"{args.algo}, {args.steps} steps, 8 prompts x 8 samples, <= 6 new tokens, demo architecture",
        "kill_every_s": args.kill_every, "seed": args.seed,
        "completed": wild["completed"], "error": wild.get("error"),
        "kills": wild["kills"], "kills_total": sum(wild["kills"].values()), "restarts": wild["restarts"],
        "gave_up": wild["gave_up"], "recovery": wild["recovery"], "timeline": wild["timeline"],
        "every_step_once": wild["logged_steps"] == list(range(1, args.steps + 1)),
        "weights_equal_undisturbed": same,
        "policy_moved": any(not torch.equal(initial[k], calm["weights"][k]) for k in calm["weights"]),
        "reward_mean_first_last": [calm["rewards"][0], calm["rewards"][-1]] if calm["rewards"] else None,
        "run_seconds": {"undisturbed": calm["run_seconds"], "chaos": wild["run_seconds"]},
        "overhead_seconds": wild["run_seconds"] - calm["run_seconds"],
        "overhead_share": wild["run_seconds"] / calm["run_seconds"] - 1,
        "startup_seconds": {"undisturbed": calm["startup_seconds"], "chaos": wild["startup_seconds"]},
        "max_step_seconds": {"undisturbed": max(calm["step_seconds"], default=0.0),
                             "chaos": max(wild["step_seconds"], default=0.0)},
    }
    print(json.dumps({k: v for k, v in report.items() if k != "timeline"}, indent=1))
    write_report(report, args.out or args.run_dir / "chaos.json")


if __name__ == "__main__":
    main()
