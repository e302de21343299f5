"""Generator throughput on a tiny model, through the real service (gRPC on loopback).

    python benchmarks/generator_throughput.py [--model DIR] [--repeats 5]

Workloads: 64 prompts x 1 sample x 6 new tokens, and 8 prompts x 8 samples x 6 new tokens (the
demo's step). Reports median seconds and completion tokens per second, for the backend alone and
for a Generate call; plus UpdateWeights seconds for the same model's weights. Without --model it
builds the test model (hidden 64, 2 layers) and the demo model (~1M parameters).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(path: Path, repeats: int) -> None:
    from quartet.v1 import generator_pb2, generator_pb2_grpc
    from services.common import hf
    from services.common.channel import open_channel
    from services.common.codec import decode_ragged, encode_ragged
    from services.common.role import ModelConfig
    from services.common.server import start_server
    from services.common.weights import push_weights
    from services.generator.backend import GenerationRequest, SamplingParams

    tok = hf.load_tokenizer(path)
    srv = start_server("generator", model=ModelConfig(path=str(path), dtype="float32", device="cpu"))
    try:
        stub = generator_pb2_grpc.GeneratorStub(open_channel(srv.address))
        backend = srv.role.backend
        nparams = sum(p.numel() for p in backend.model.parameters())
        print(f"model {path.name}: {nparams:,} parameters, torch threads {torch.get_num_threads()}")
        prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in zip(range(10, 74), range(30, 94), strict=True)]
        for label, rows, n in (("64 x 1 x 6", prompts, 1), ("8 x 8 x 6", prompts[:8], 8)):
            # On the batcher's worker thread, the one thread that runs torch in the service: calling the
            # backend from a second thread makes two OpenMP teams fight over 2 cores (measured 100x slower).
            job = GenerationRequest(rows, SamplingParams(n=n, temperature=1.0, max_new_tokens=6, seed=0))
            tokens = sum(len(s.token_ids) for s in srv.role.batcher.generate(job).samples)
            t_backend = _median_time(lambda job=job: srv.role.batcher.generate(job), repeats)
            req = generator_pb2.GenerateRequest(
                prompt_ids=encode_ragged([torch.tensor(r) for r in rows], dtype=torch.int64),
                params=generator_pb2.SamplingParams(n=n, temperature=1.0, max_new_tokens=6, seed=0))
            resp = stub.Generate(req)
            assert decode_ragged(resp.completion_ids).values.numel() == tokens
            t_rpc = _median_time(lambda req=req: stub.Generate(req), repeats)
            print(f"{label}: {tokens} tokens; backend {t_backend * 1e3:.1f} ms = {tokens / t_backend:.0f} tok/s; "
                  f"Generate RPC {t_rpc * 1e3:.1f} ms = {tokens / t_rpc:.0f} tok/s")
        state = backend.model.state_dict()
        admin = open_channel(srv.address)
        version = iter(range(1, 1000))
        t_update = _median_time(lambda: push_weights(admin, state.items(), next(version), timeout=60), repeats)
        nbytes = sum(t.numel() * t.element_size() for t in dict(backend.model.named_parameters()).values())
        print(f"UpdateWeights ({nbytes / 1e6:.2f} MB): {t_update * 1e3:.1f} ms")
    finally:
        srv.stop(grace=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: build tiny ones)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is not None:
        run(args.model, args.repeats)
        return
    from demo.modelkit import DEMO_MODEL, TEST_MODEL, make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        run(make_tiny_checkpoint(Path(tmp) / "test-model", **TEST_MODEL), args.repeats)
        run(make_tiny_checkpoint(Path(tmp) / "demo-model", **DEMO_MODEL), args.repeats)


if __name__ == "__main__":
    main()
