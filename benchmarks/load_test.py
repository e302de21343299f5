"""Load test: many concurrent clients drive Score, LogProbs and Generate past capacity on loopback.

Each role runs as a real `quartet serve` child process on 127.0.0.1 with a tiny model and small
admission limits (reference max_concurrent, generator max_queue, and for reward, which has no queue
of its own, the server's max_concurrent_rpcs), so that most of the offered load is excess. For each
role the report gives accepted vs rejected calls, p50/p99 latency of both, calls by status code, and
the server's resident memory (VmRSS of its process) after 1,000 and after all calls (10,000 by
default): a leak per call would show as growth between the two.

Bounded: `--calls` per role and `--time-limit` seconds per role; every call carries a deadline.

    python benchmarks/load_test.py [--calls 10000] [--clients 32] [--roles reward,reference,generator]
                                   [--out runs/bench/load_test.json]

`drive` and `LoadResult` are also used by tests/integration/test_load_smoke.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

TOKEN = "load-test-token"
START_TIMEOUT_S = 120.0


# ---- the driver ----

@dataclass(frozen=True)
class LoadResult:
    """Outcome of `drive`: every call is counted once, by its final status code."""

    calls: int  # calls made
    accepted: int  # calls that returned OK
    rejected: int  # calls refused with RESOURCE_EXHAUSTED
    codes: dict[str, int]  # calls by status code name ("OK", "RESOURCE_EXHAUSTED", ...)
    accepted_p50_s: float
    accepted_p99_s: float
    accepted_max_s: float
    rejected_p50_s: float
    rejected_p99_s: float
    rejected_max_s: float
    wall_s: float
    calls_per_s: float

    @property
    def other_errors(self) -> dict[str, int]:
        """Codes other than OK and RESOURCE_EXHAUSTED: under overload there should be none."""
        return {k: v for k, v in self.codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def drive(call: Callable[[], object], *, calls: int, clients: int, time_limit_s: float) -> LoadResult:
    """Make `calls` calls of `call()` from `clients` threads at once, as fast as they go.

    `call` raises grpc.RpcError on a non-OK status. Stops early (fewer calls) when time_limit_s passes.
    """
    lock = threading.Lock()
    issued = 0
    records: list[tuple[str, float]] = []
    deadline = time.monotonic() + time_limit_s

    def worker() -> None:
        nonlocal issued
        mine: list[tuple[str, float]] = []
        while True:
            with lock:
                if issued >= calls or time.monotonic() > deadline:
                    break
                issued += 1
            t0 = time.perf_counter()
            try:
                call()
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            mine.append((code, time.perf_counter() - t0))
        with lock:
            records.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, name=f"load-client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [s for c, s in records if c == "OK"]
    busy = [s for c, s in records if c == "RESOURCE_EXHAUSTED"]
    return LoadResult(
        calls=len(records), accepted=len(ok), rejected=len(busy), codes=dict(Counter(c for c, _ in records)),
        accepted_p50_s=percentile(ok, 50), accepted_p99_s=percentile(ok, 99), accepted_max_s=max(ok, default=0.0),
        rejected_p50_s=percentile(busy, 50), rejected_p99_s=percentile(busy, 99),
        rejected_max_s=max(busy, default=0.0), wall_s=wall, calls_per_s=len(records) / wall if wall else 0.0,
    )


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS from /proc/PID/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---- the services ----

@dataclass(frozen=True)
class Role:
    """How one role is served and called under load."""

    name: str
    options: dict[str, object]  # --set options.<k>=<v>
    server: dict[str, object]  # --set server.<k>=<v>
    method: str  # the RPC driven


def roles() -> dict[str, Role]:
    # Small admission limits so that 32 clients overload every service.
    return {
        "reward": Role("reward", {"kind": "rule", "rule": "arithmetic", "workers": 1}, {"max_concurrent_rpcs": 2},
                       "Score"),
        "reference": Role("reference", {"max_concurrent": 2, "max_batch_tokens": 256}, {}, "LogProbs"),
        "generator": Role("generator", {"max_queue": 2, "max_batch_tokens": 256, "preallocate_weight_buffers": False},
                          {}, "Generate"),
    }


def quartet_command() -> list[str]:
    script = Path(sys.executable).parent / "quartet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


@dataclass(frozen=True)
class Served:
    address: str
    pid: int


@contextmanager
def serve(role: Role, model: Path, workdir: Path) -> Iterator[Served]:
    """A `quartet serve` child process on 127.0.0.1 (free port, metrics off); SIGTERM on exit."""
    ready = workdir / f"{role.name}.ready.json"
    log = workdir / f"{role.name}.log"
    sets = [f"options.{k}={v}" for k, v in role.options.items()] + [f"server.{k}={v}" for k, v in role.server.items()]
    args = [*quartet_command(), "serve", role.name, "--model", str(model), "--dtype", "float32", "--device", "cpu",
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--ready-file", str(ready)]
    for s in sets:
        args += ["--set", s]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUARTET_")}
    env.update(PYTHONUNBUFFERED="1", QUARTET_TOKEN=TOKEN)  # the token travels in the environment, not argv
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"quartet serve {role.name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield Served(json.loads(ready.read_text())["address"], proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_call(role: Role, channel: grpc.Channel, timeout_s: float) -> Callable[[], object]:
    """One representative call of the role's driven method (a few rows of a tiny model)."""
    import torch

    from quartet.v1 import (
        common_pb2,
        generator_pb2,
        generator_pb2_grpc,
        reference_pb2,
        reference_pb2_grpc,
        reward_pb2,
        reward_pb2_grpc,
    )
    from services.common.codec import encode_ragged

    if role.name == "reward":
        stub = reward_pb2_grpc.RewardStub(channel)
        req = reward_pb2.ScoreRequest(completion_text=["71", "12", "x", "70"] * 2,
                                      metadata=[reward_pb2.Metadata(values={"answer": "71"})] * 8)
        return lambda: stub.Score(req, timeout=timeout_s)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 50, (n,), generator=g) for n in (12, 20, 7, 16)]
    if role.name == "reference":
        stub = reference_pb2_grpc.ReferenceStub(channel)
        batch = common_pb2.SequenceBatch(token_ids=encode_ragged(rows, dtype=torch.int64), response_start=[4, 10, 3, 8])
        req = reference_pb2.LogProbsRequest(sequences=batch)
        return lambda: stub.LogProbs(req, timeout=timeout_s)
    stub = generator_pb2_grpc.GeneratorStub(channel)
    req = generator_pb2.GenerateRequest(prompt_ids=encode_ragged(rows[:2], dtype=torch.int64),
                                        params=generator_pb2.SamplingParams(n=2, temperature=1.0, max_new_tokens=4,
                                                                            seed=1))
    return lambda: stub.Generate(req, timeout=timeout_s)


# ---- the run ----

@dataclass(frozen=True)
class RoleReport:
    role: str
    method: str
    limit: str  # the admission limit that made the excess
    first: LoadResult  # the first `checkpoint` calls
    rest: LoadResult  # the remaining calls
    rss_start_kib: int  # after one warm-up call
    rss_after_first_kib: int
    rss_after_all_kib: int

    @property
    def rss_growth(self) -> float:
        """RSS after all calls / RSS after the first `checkpoint` calls - 1."""
        return self.rss_after_all_kib / self.rss_after_first_kib - 1


def run_role(role: Role, model: Path, workdir: Path, *, calls: int, checkpoint: int, clients: int,
             time_limit_s: float, call_timeout_s: float) -> RoleReport:
    from services.common.channel import open_channel

    with serve(role, model, workdir) as served:
        channel = open_channel(served.address, token=TOKEN)
        try:
            call = make_call(role, channel, call_timeout_s)
            call()  # warm-up: first-call allocations are not a leak
            rss0 = rss_kib(served.pid)
            first = drive(call, calls=checkpoint, clients=clients, time_limit_s=time_limit_s)
            rss1 = rss_kib(served.pid)
            rest = drive(call, calls=calls - checkpoint, clients=clients, time_limit_s=time_limit_s)
            rss2 = rss_kib(served.pid)
        finally:
            channel.close()
    limit = ", ".join(f"{k}={v}" for k, v in {**role.server, **role.options}.items() if "max_" in k)
    return RoleReport(role.name, role.method, limit, first, rest, rss0, rss1, rss2)


def merged(a: LoadResult, b: LoadResult) -> dict[str, object]:
    codes = Counter(a.codes) + Counter(b.codes)
    return {"calls": a.calls + b.calls, "accepted": a.accepted + b.accepted, "rejected": a.rejected + b.rejected,
            "codes": dict(codes)}


def print_report(reports: list[RoleReport], clients: int) -> None:
    print(f"\n{clients} concurrent clients per service, loopback, tiny model (hidden 64, 2 layers)")
    head = (f"{'role/method':<20} {'calls':>6} {'accepted':>8} {'rejected':>8} {'acc p50':>8} {'acc p99':>8} "
            f"{'rej p50':>8} {'rej p99':>8} {'rss@1k':>9} {'rss@all':>9} {'growth':>7}  other codes")
    print(head)
    for r in reports:
        m = merged(r.first, r.rest)
        other = {k: v for k, v in m["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED")}  # type: ignore[union-attr]
        # latencies from the long phase: it holds 90% of the calls
        print(f"{r.role + '/' + r.method:<20} {m['calls']:>6} {m['accepted']:>8} {m['rejected']:>8} "
              f"{r.rest.accepted_p50_s * 1e3:>6.1f}ms {r.rest.accepted_p99_s * 1e3:>6.1f}ms "
              f"{r.rest.rejected_p50_s * 1e3:>6.1f}ms {r.rest.rejected_p99_s * 1e3:>6.1f}ms "
              f"{r.rss_after_first_kib / 1024:>7.1f}MB {r.rss_after_all_kib / 1024:>7.1f}MB {r.rss_growth:>+7.1%}  "
              f"{other or '-'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000, help="Calls per role (RSS is compared at 1,000 and here).")
    p.add_argument("--checkpoint", type=int, default=1_000, help="Calls after which the first RSS is taken.")
    p.add_argument("--clients", type=int, default=32, help="Concurrent client threads per role.")
    p.add_argument("--roles", default="reward,reference,generator", help="Comma-separated roles to load.")
    p.add_argument("--time-limit", type=float, default=240.0, help="Seconds per phase per role at most.")
    p.add_argument("--call-timeout", type=float, default=30.0, help="Deadline of every call, seconds.")
    p.add_argument("--model", type=Path, default=None, help="Checkpoint to serve (default: a tiny one built now).")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "load_test.json")
    a = p.parse_args(argv)
    if not 0 < a.checkpoint < a.calls:
        p.error("--checkpoint must be between 0 and --calls")
    from demo.modelkit import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="quartet-load-") as tmp:
        work = Path(tmp)
        model = a.model or make_tiny_checkpoint(work / "model", seed=0)
        reports = []
        for name in a.roles.split(","):
            role = roles()[name.strip()]
            print(f"loading {role.name}.{role.method} with {a.calls} calls from {a.clients} clients ...", flush=True)
            reports.append(run_role(role, model, work, calls=a.calls, checkpoint=a.checkpoint, clients=a.clients,
                                    time_limit_s=a.time_limit, call_timeout_s=a.call_timeout))
    print_report(reports, a.clients)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    payload = [{**asdict(r), "rss_growth": r.rss_growth, "total": merged(r.first, r.rest)} for r in reports]
    a.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwritten to {a.out}")
    within = all(abs(r.rss_growth) <= 0.10 for r in reports)
    clean = all(not r.first.other_errors and not r.rest.other_errors for r in reports)
    print(f"RSS within 10%: {within}; no codes besides OK and RESOURCE_EXHAUSTED: {clean}")
    return 0 if within and clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
