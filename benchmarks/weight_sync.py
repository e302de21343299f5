"""Weight-sync benchmark: push a ~1 GiB fp32 state dict on one host: shared memory vs gRPC stream vs gloo.

    python benchmarks/weight_sync.py [--gib 1.0] [--chunk-kib 256,512,1024,2048,4096] [--rounds 3]

Two processes, the same two for both transports:
- the receiver: a gRPC server built by the service runtime (`build_grpc_server`, same options as a
  generator) with a receiver-only UpdateWeights registered like the generator's (zero-copy chunk
  decoding) that runs the real `WeightAssembler` (validation, CRC-32 checks, staging into its
  reusable buffer) but holds no model, so 1 GiB fits; it also joins a gloo group and receives
  the same tensors by `dist.broadcast` into the same buffer, and serves UpdateWeightsShared with the
  real `SharedWeightsReceiver` (the segment opened and kept mapped, every tensor CRC-32- and
  finite-checked in place; a generator then copies the staged views into its model, as it copies
  the stream's staging buffer).
- the sender (this process): `push_weights` over a channel from `open_channel`, and
  `push_weights_shared` from one `SharedWeightsWriter` (its segment made once, rewritten per update).

Each round measures gloo, shared memory and every chunk size once, interleaved, so that all transports see
the same background load (this machine is shared and noisy); medians over rounds are reported,
with wall seconds, GB/s, and CPU seconds of sender + receiver (a load-independent cost measure).
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
    """Child process: serve UpdateWeights into a WeightAssembler; take part in gloo broadcasts."""
    import grpc
    import torch.distributed as dist

    from quartet.v1 import generator_pb2
    from services.common.config import ServerConfig
    from services.common.interceptors import ErrorInterceptor
    from services.common.server import build_grpc_server
    from services.common.shm_weights import SharedWeightsReceiver
    from services.common.weights import WeightAssembler, deserialize_chunk, model_weight_specs

    torch.set_num_threads(1)
    state = make_state(gib)
    specs, aliases = model_weight_specs(state)
    assembler = WeightAssembler(specs, aliases=aliases)
    shared = SharedWeightsReceiver(specs, aliases)
    shared_views: dict[str, torch.Tensor] = {}
    last: dict[str, float] = {}
    version = [0]

    def update_weights(request_iterator, context):  # type: ignore[no-untyped-def]
        cpu0 = time.process_time()
        staged = assembler.assemble(request_iterator, current_version=version[0], is_active=context.is_active)
        version[0] = staged.version
        last.update(cpu=time.process_time() - cpu0, receive=staged.receive_seconds)
        return generator_pb2.UpdateWeightsResponse(version=staged.version, tensors_updated=len(staged.tensors),
                                                   bytes_received=staged.nbytes)

    def update_weights_shared(request_iterator, context):  # type: ignore[no-untyped-def]
        cpu0 = time.process_time()
        update = shared.receive(request_iterator, current_version=version[0], is_active=context.is_active)
        try:
            staged = update.staged
            if staged is None:  # probe
                return generator_pb2.UpdateWeightsResponse(version=version[0])
            version[0] = staged.version
            shared_views.clear()
            shared_views.update(staged.tensors)
        finally:
            update.release()
        last.update(cpu=time.process_time() - cpu0, receive=staged.receive_seconds)
        return generator_pb2.UpdateWeightsResponse(version=staged.version, tensors_updated=len(staged.tensors),
                                                   bytes_received=staged.nbytes)

    server, port = build_grpc_server(ServerConfig(), [ErrorInterceptor()])
    handlers = {  # registered like GeneratorRole.add_to_server
        "UpdateWeights": grpc.stream_unary_rpc_method_handler(
            update_weights, request_deserializer=deserialize_chunk,
            response_serializer=generator_pb2.UpdateWeightsResponse.SerializeToString),
        "UpdateWeightsShared": grpc.stream_unary_rpc_method_handler(
            update_weights_shared, request_deserializer=generator_pb2.SharedWeights.FromString,
            response_serializer=generator_pb2.UpdateWeightsResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("quartet.v1.Generator", handlers),))
    server.start()
    conn.send(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{conn.recv()}", rank=1, world_size=2)
    buffers = [assembler._views[n] for n in state]  # gloo receives into the same staging buffer
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            conn.send(dict(last))
        elif cmd == "gloo":
            conn.send(_broadcast(buffers, dist))
        elif cmd == "check":
            conn.send(all(torch.equal(assembler._views[n], t) for n, t in state.items()))
        elif cmd == "check_shm":
            conn.send(all(torch.equal(shared_views[n], t) for n, t in state.items()))
        elif cmd == "stop":
            dist.destroy_process_group()
            server.stop(0)
            return


def _broadcast(tensors: list[torch.Tensor], dist) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Broadcast every tensor from rank 0, one call per tensor; wall and CPU seconds of this rank."""
    dist.barrier()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in tensors:
        dist.broadcast(t, src=0)
    dist.barrier()
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="state dict size in GiB")
    parser.add_argument("--chunk-kib", default="256,512,1024,2048,4096", help="chunk sizes to measure, KiB")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (gloo, shared memory, every chunk size); medians reported")
    parser.add_argument("--message-mib", type=int, default=16,
                        help="shared memory: tensor MiB announced per UpdateWeightsShared message")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch.distributed as dist

    from services.common.channel import open_channel
    from services.common.weights import SharedWeightsWriter, probe_shared, push_weights, push_weights_shared

    torch.set_num_threads(1)
    state = make_state(args.gib)
    tensors = list(state.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(args.gib, child), daemon=True)
    proc.start()
    channel = open_channel(f"127.0.0.1:{parent.recv()}")
    gloo_port = _free_port()
    parent.send(gloo_port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{gloo_port}", rank=0, world_size=2)
    print(f"state: {len(state)} tensors, {nbytes / GB:.3f} GB fp32; cpus {os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f}")

    version = 0

    def grpc_push(chunk: int) -> dict[str, float]:
        nonlocal version
        version += 1
        t0, cpu0 = time.perf_counter(), time.process_time()
        resp = push_weights(channel, state.items(), version, timeout=600, chunk_bytes=chunk)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert resp.bytes_received == nbytes and resp.version == version
        parent.send("stats")
        return {"wall": wall, "cpu_sender": cpu, "cpu_receiver": parent.recv()["cpu"]}

    writer = SharedWeightsWriter()

    def shm_push() -> dict[str, float]:
        nonlocal version
        version += 1
        t0, cpu0 = time.perf_counter(), time.process_time()
        resp = push_weights_shared(channel, writer, state.items(), version, timeout=600,
                                   message_bytes=args.message_mib << 20)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        assert resp.bytes_received == nbytes and resp.version == version
        parent.send("stats")
        return {"wall": wall, "cpu_sender": cpu, "cpu_receiver": parent.recv()["cpu"]}

    def gloo() -> dict[str, float]:
        parent.send("gloo")
        mine = _broadcast(tensors, dist)
        return {"wall": mine["wall"], "cpu_sender": mine["cpu"], "cpu_receiver": parent.recv()["cpu"]}

    chunks = [int(x) << 10 for x in args.chunk_kib.split(",")]
    gloo()  # warm-ups: connections, receiver pages, allocators, the segment (made and mapped once)
    grpc_push(1 << 20)
    t0 = time.perf_counter()
    probe_shared(channel, writer, nbytes + 64 * len(state), timeout=600)
    print(f"shared-memory segment made and probed once: {time.perf_counter() - t0:.2f} s")
    shm_push()
    runs: dict[str, list[dict[str, float]]] = {"gloo": [], "shm": [], **{f"grpc_{c >> 10}KiB": [] for c in chunks}}
    for _ in range(args.rounds):
        runs["gloo"].append(gloo())
        runs["shm"].append(shm_push())
        for c in chunks:
            runs[f"grpc_{c >> 10}KiB"].append(grpc_push(c))
    parent.send("check")
    assert parent.recv(), "receiver buffer differs from the sent state"
    parent.send("check_shm")
    assert parent.recv(), "shared-memory staged tensors differ from the sent state"

    results = {}
    for key, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        results[key] = {"seconds": wall, "gbps": nbytes / wall / GB, "best_gbps": nbytes / min(r["wall"] for r in rs) / GB,
                        "cpu_sender": statistics.median(r["cpu_sender"] for r in rs),
                        "cpu_receiver": statistics.median(r["cpu_receiver"] for r in rs)}
    gloo_s = results["gloo"]["seconds"]
    for key, r in results.items():
        r["ratio_to_gloo"] = gloo_s / r["seconds"]
        print(f"{key:>14}: {r['seconds']:.3f} s  {r['gbps']:.2f} GB/s (best {r['best_gbps']:.2f})  "
              f"cpu sender {r['cpu_sender']:.2f} s receiver {r['cpu_receiver']:.2f} s  "
              f"ratio to gloo {r['ratio_to_gloo']:.2f}")
    best = max((k for k in results if k.startswith("grpc")), key=lambda k: results[k]["gbps"])
    print(f"best gRPC: {best}, {results[best]['ratio_to_gloo']:.2f}x gloo's throughput")
    print(f"shared memory: {results['shm']['ratio_to_gloo']:.2f}x gloo's throughput")
    per_round = [(g["wall"] / s["wall"], g["wall"] / min(runs[k][i]["wall"] for k in runs if k.startswith("grpc")))
                 for i, (g, s) in enumerate(zip(runs["gloo"], runs["shm"], strict=True))]
    print("per round, ratio to gloo (shm, best gRPC): " + "  ".join(f"{a:.2f} {b:.2f}" for a, b in per_round))
    results["per_round_ratio_to_gloo"] = [{"shm": a, "grpc_best": b} for a, b in per_round]
    writer.close()
    channel.close()
    parent.send("stop")
    dist.destroy_process_group()
    proc.join(10)
    if args.json:
        args.json.write_text(json.dumps({"bytes": nbytes, "load_average": os.getloadavg(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
