"""Weight-sync benchmark: push a ~1 GiB fp32 state dict over loopback, gRPC stream vs gloo broadcast.

    python benchmarks/weight_sync.py [--gib 1.0] [--chunk-kib 256,512,1024,2048,4096] [--repeats 3]

Two processes, the same two for both transports:
- the receiver: a gRPC server built by the service runtime (`build_grpc_server`, same options as a
  generator) with a receiver-only Generator servicer whose UpdateWeights runs the real
  `WeightAssembler` (validation, checksums, staging into its reusable buffer) but holds no model,
  so 1 GiB fits; it then joins a gloo group and receives the same tensors by `dist.broadcast`.
- the sender (this process): `push_weights` over a channel from `open_channel`, once per chunk
  size after a warm-up, then gloo broadcast of every tensor (after one warm-up broadcast).

Prints seconds and GB/s per chunk size and for gloo, and the ratio gRPC / gloo. Numbers on a shared
2-core machine are noisy: compare within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9


def make_state(gib: float) -> dict[str, torch.Tensor]:
    """A model-shaped fp32 state dict of ~`gib` GiB: per layer four 1024 x 2048 matrices and a norm."""
    per_layer = 4 * 1024 * 2048 * 4 + 1024 * 4
    layers = max(1, round(gib * (1 << 30) / per_layer))
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for name in ("q_proj", "o_proj", "up_proj", "down_proj"):
            state[f"layers.{i}.{name}.weight"] = torch.rand(1024, 2048, generator=gen)
        state[f"layers.{i}.norm.weight"] = torch.rand(1024, generator=gen)
    return state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def receiver(gib: float, conn) -> None:  # type: ignore[no-untyped-def]
    """Child process: serve UpdateWeights into a WeightAssembler; then take part in gloo broadcasts."""
    import torch.distributed as dist

    from quartet.v1 import generator_pb2, generator_pb2_grpc
    from services.common.config import ServerConfig
    from services.common.interceptors import ErrorInterceptor
    from services.common.server import build_grpc_server
    from services.common.weights import WeightAssembler, model_weight_specs

    torch.set_num_threads(1)
    state = make_state(gib)
    specs, aliases = model_weight_specs(state)
    assembler = WeightAssembler(specs, aliases=aliases)
    receive_seconds: list[float] = []

    class Receiver(generator_pb2_grpc.GeneratorServicer):
        version = 0

        def UpdateWeights(self, request_iterator, context):  # type: ignore[no-untyped-def]
            staged = assembler.assemble(request_iterator, current_version=self.version, is_active=context.is_active)
            self.version = staged.version
            receive_seconds.append(staged.receive_seconds)
            return generator_pb2.UpdateWeightsResponse(version=staged.version, tensors_updated=len(staged.tensors),
                                                       bytes_received=staged.nbytes)

    server, port = build_grpc_server(ServerConfig(), [ErrorInterceptor()])
    generator_pb2_grpc.add_GeneratorServicer_to_server(Receiver(), server)
    server.start()
    conn.send(port)
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            conn.send(list(receive_seconds))
            receive_seconds.clear()
        elif isinstance(cmd, tuple) and cmd[0] == "gloo":
            _gloo_side(cmd[1], cmd[2], 1, assembler, state, dist)
        elif cmd == "stop":
            server.stop(0)
            return


def _gloo_side(port: int, repeats: int, rank: int, assembler, state, dist):  # type: ignore[no-untyped-def]
    """Both ranks: one warm-up and `repeats` timed broadcasts of every tensor; rank 0 returns seconds."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # rank 1 receives into the same preallocated buffers the gRPC path writes into
    tensors = list(state.values()) if rank == 0 else [assembler._views[n] for n in state]
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        for t in tensors:
            dist.broadcast(t, src=0)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 1:
        ok = all(torch.equal(a, b) for a, b in zip(tensors, state.values(), strict=True))
        assert ok, "gloo delivered different bytes"
    dist.destroy_process_group()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="state dict size in GiB")
    parser.add_argument("--chunk-kib", default="256,512,1024,2048,4096", help="chunk sizes to measure, KiB")
    parser.add_argument("--repeats", type=int, default=3, help="timed pushes per chunk size (median reported)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch.distributed as dist

    from quartet.v1 import generator_pb2_grpc
    from services.common.channel import open_channel
    from services.common.weights import push_weights

    torch.set_num_threads(1)
    state = make_state(args.gib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(args.gib, child), daemon=True)
    proc.start()
    port = parent.recv()
    channel = open_channel(f"127.0.0.1:{port}")
    print(f"state: {len(state)} tensors, {nbytes / GB:.3f} GB fp32; receiver pid {proc.pid}; cpus {os.cpu_count()}")

    version = 0
    results: dict[str, dict[str, float]] = {}

    def push(chunk: int) -> float:
        nonlocal version
        version += 1
        t0 = time.perf_counter()
        resp = push_weights(channel, state.items(), version, timeout=600, chunk_bytes=chunk)
        assert resp.bytes_received == nbytes and resp.version == version
        return time.perf_counter() - t0

    push(1 << 20)  # warm-up: connection, receiver pages, sender allocator
    parent.send("stats")
    parent.recv()
    for kib in [int(x) for x in args.chunk_kib.split(",")]:
        times = [push(kib << 10) for _ in range(args.repeats)]
        parent.send("stats")
        recv = parent.recv()
        med = statistics.median(times)
        results[f"grpc_{kib}KiB"] = {"seconds": med, "gbps": nbytes / med / GB, "best_gbps": nbytes / min(times) / GB,
                                     "receiver_seconds": statistics.median(recv)}
        print(f"gRPC stream, {kib:5d} KiB chunks: {med:.3f} s  {nbytes / med / GB:.2f} GB/s "
              f"(best {nbytes / min(times) / GB:.2f})")

    # a stub (messages built by python-protobuf) for comparison with the pre-serialized fast path
    t0 = time.perf_counter()
    version += 1
    push_weights(generator_pb2_grpc.GeneratorStub(channel), state.items(), version, timeout=600)
    stub_s = time.perf_counter() - t0
    results["grpc_stub_1024KiB"] = {"seconds": stub_s, "gbps": nbytes / stub_s / GB}
    print(f"gRPC stream via stub (pb messages), 1024 KiB: {stub_s:.3f} s  {nbytes / stub_s / GB:.2f} GB/s")

    gloo_port = _free_port()
    parent.send(("gloo", gloo_port, args.repeats))
    gloo_times = _gloo_side(gloo_port, args.repeats, 0, None, state, dist)
    gloo = statistics.median(gloo_times)
    results["gloo"] = {"seconds": gloo, "gbps": nbytes / gloo / GB, "best_gbps": nbytes / min(gloo_times) / GB}
    print(f"gloo broadcast (per tensor):  {gloo:.3f} s  {nbytes / gloo / GB:.2f} GB/s "
          f"(best {nbytes / min(gloo_times) / GB:.2f})")
    best_key = min((k for k in results if k.startswith("grpc_") and "stub" not in k), key=lambda k: results[k]["seconds"])
    ratio = gloo / results[best_key]["seconds"]
    print(f"best gRPC ({best_key}) / gloo throughput ratio: {ratio:.2f}")
    for k in results:
        if k.startswith("grpc_"):
            results[k]["ratio_to_gloo"] = gloo / results[k]["seconds"]
    parent.send("stop")
    proc.join(10)
    if args.json:
        args.json.write_text(json.dumps({"bytes": nbytes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
