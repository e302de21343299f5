"""Weight fan-out to generator replicas on loopback: one update pushed to 1, 2 and 4 generators at once.

    python benchmarks/replica_fanout.py [--replicas 1,2,4] [--rounds 3] [--hidden 1024] [--layers 8]
                                        [--transport grpc|shm]

Starts max(replicas) real generator services (the service runtime, the transformers backend) as
child processes on free 127.0.0.1 ports, all serving one randomly initialised Llama-style checkpoint
(default hidden 1024, 8 layers: 134M parameters, 537 MB fp32, the size of SmolLM2-135M), then for
each replica count pushes the model's state dict through `ReplicaGenerator.update_weights` (one
thread per replica, the orchestrator's path) `--rounds` times. Reported per count: the median wall
seconds of the whole fan-out (what a step waits for), the median of each replica's own UpdateWeights
seconds, and the aggregate rate (bytes to all replicas / fan-out seconds). Every process shares this
machine's cores, so past the core count the replicas compete with each other and with the sender.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "protos"))

TOKEN = "fanout-benchmark-token"


def serve(path: str, conn) -> None:  # type: ignore[no-untyped-def]
    """Child: one generator service on a free port; sends its address, runs until the parent closes the pipe."""
    import services  # noqa: F401  (before grpc: fork support off)
    from services.common.config import ServerConfig
    from services.common.role import ModelConfig
    from services.common.server import start_server

    srv = start_server("generator", model=ModelConfig(path=path, dtype="float32", device="cpu"),
                       options={"torch_threads": 1}, server=ServerConfig(port=0, token=TOKEN, metrics_port=None))
    conn.send(srv.address)
    with contextlib.suppress(EOFError):
        conn.recv()
    srv.stop(grace=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--transport", choices=("grpc", "shm"), default="grpc")
    args = ap.parse_args()
    counts = [int(c) for c in args.replicas.split(",")]

    import torch

    from demo.modelkit import make_tiny_checkpoint
    from orchestrator.remote.discovery import connect_generator
    from orchestrator.run.services_config import GeneratorEndpoint

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="quartet-fanout-"))
    path = make_tiny_checkpoint(tmp / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=16,
                                max_position_embeddings=256)
    from services.common.hf import load_causal_lm

    state = dict(load_causal_lm(path, dtype=torch.float32, device="cpu").state_dict())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    ctx = mp.get_context("spawn")
    children, pipes, addresses = [], [], []
    for _ in range(max(counts)):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=serve, args=(str(path), child), daemon=True)
        p.start()
        children.append(p), pipes.append(parent)
    addresses = [pipe.recv() for pipe in pipes]
    version, rows = 0, []
    try:
        for n in counts:
            ep = GeneratorEndpoint(address=addresses[:n] if n > 1 else addresses[0], token=TOKEN,
                                   weights_transport=args.transport)
            gen = connect_generator(ep, deadline_s=60, weights_deadline_s=600, probe_interval_s=60)
            gen.info()
            walls, each = [], []
            for _ in range(args.rounds):
                version += 1
                sync = gen.update_weights(state, version)
                walls.append(sync.seconds)
                if n > 1:
                    each += [st.sync_seconds for _a, _ok, st in gen.replicas.snapshot()]
                else:
                    each.append(sync.seconds)
            gen.close()
            wall = statistics.median(walls)
            rows.append({"replicas": n, "fanout_s": round(wall, 3), "per_replica_s": round(statistics.median(each), 3),
                         "aggregate_GBps": round(n * nbytes / wall / 1e9, 3), "transport": args.transport})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for pipe in pipes:
            pipe.close()
        for p in children:
            p.join(timeout=10)
    print(json.dumps({"model_bytes": nbytes, "parameters": sum(t.numel() for t in state.values()),
                      "rounds": args.rounds, "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0],
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


if __name__ == "__main__":
    main()
