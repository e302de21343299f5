"""Generator throughput on a tiny model, through the real service (gRPC on loopback).

    python benchmarks/generator_throughput.py [--model DIR] [--repeats 5] [--backend transformers|vllm|both]

Workloads: 64 prompts x 1 sample x 6 new tokens, and 8 prompts x 8 samples x 6 new tokens (the
demo's step; --max-new-tokens changes the 6). Reports median seconds, samples per second and
completion tokens per second, for the backend alone (on the batcher's thread) and for a Generate
call; plus UpdateWeights seconds for the same model's weights. Without --model it builds the test
model (hidden 64, 2 layers; transformers only: head_dim 16 is below vLLM's CPU minimum of 32) and
the demo model (~1M parameters).

--backend vllm needs the `vllm` import: on CPU run it with the venv of scripts/vllm_ci.sh
(`.venv-vllm/bin/python benchmarks/generator_throughput.py --backend both`); both backends then
run under the same torch and transformers. vLLM's CPU worker binds itself to one core by default
(VLLM_CPU_OMP_THREADS_BIND=auto, one core reserved); --cpu-threads-bind changes that.
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


def run(path: Path, repeats: int, *, backend: str = "transformers", max_new_tokens: int = 6,
        cpu_threads_bind: str | None = None) -> None:
    from quartet.v1 import generator_pb2, generator_pb2_grpc
    from services.common import hf
    from services.common.channel import open_channel
    from services.common.codec import decode_ragged, encode_ragged
    from services.common.role import ModelConfig
    from services.common.server import start_server
    from services.common.weights import push_weights
    from services.generator.backend import GenerationRequest, SamplingParams

    tok = hf.load_tokenizer(path)
    options: dict[str, object] = {"backend": backend}
    if cpu_threads_bind is not None:
        options["cpu_threads_bind"] = cpu_threads_bind
    t0 = time.perf_counter()
    srv = start_server("generator", model=ModelConfig(path=str(path), dtype="float32", device="cpu"), options=options)
    load_s = time.perf_counter() - t0
    try:
        stub = generator_pb2_grpc.GeneratorStub(open_channel(srv.address))
        # the checkpoint's own weights: the update benchmark sends what the service already serves
        model = hf.load_causal_lm(path, dtype=torch.float32, device="cpu")
        nparams = sum(p.numel() for p in model.parameters())
        print(f"[{backend}] model {path.name}: {nparams:,} parameters, torch threads {torch.get_num_threads()}, "
              f"service start {load_s:.1f} s")
        prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in zip(range(10, 74), range(30, 94), strict=True)]
        for label, rows, n in ((f"64 x 1 x {max_new_tokens}", prompts, 1), (f"8 x 8 x {max_new_tokens}", prompts[:8], 8)):
            # On the batcher's worker thread, the one thread that runs torch in the service: calling the
            # backend from a second thread makes two OpenMP teams fight over 2 cores (measured 100x slower).
            job = GenerationRequest(rows, SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=0))
            tokens = sum(len(s.token_ids) for s in srv.role.batcher.generate(job).samples)
            t_backend = _median_time(lambda job=job: srv.role.batcher.generate(job), repeats)
            req = generator_pb2.GenerateRequest(
                prompt_ids=encode_ragged([torch.tensor(r) for r in rows], dtype=torch.int64),
                params=generator_pb2.SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=0))
            resp = stub.Generate(req)
            assert decode_ragged(resp.completion_ids).values.numel() == tokens
            t_rpc = _median_time(lambda req=req: stub.Generate(req), repeats)
            samples = len(rows) * n
            print(f"[{backend}] {label}: {samples} samples, {tokens} tokens; backend {t_backend * 1e3:.1f} ms = "
                  f"{samples / t_backend:.0f} samples/s, {tokens / t_backend:.0f} tok/s; Generate RPC "
                  f"{t_rpc * 1e3:.1f} ms = {samples / t_rpc:.0f} samples/s, {tokens / t_rpc:.0f} tok/s")
        state = model.state_dict()
        admin = open_channel(srv.address)
        version = iter(range(1, 1000))
        t_update = _median_time(lambda: push_weights(admin, state.items(), next(version), timeout=60), repeats)
        nbytes = sum(t.numel() * t.element_size() for t in dict(model.named_parameters()).values())
        print(f"[{backend}] UpdateWeights ({nbytes / 1e6:.2f} MB): {t_update * 1e3:.1f} ms")
    finally:
        srv.stop(grace=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: build tiny ones)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--backend", choices=("transformers", "vllm", "both"), default="transformers")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--cpu-threads-bind", default=None,
                        help="vllm on CPU: its worker's cores (VLLM_CPU_OMP_THREADS_BIND), e.g. 0-1; default auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backends = ("transformers", "vllm") if args.backend == "both" else (args.backend,)
    kw = {"max_new_tokens": args.max_new_tokens, "cpu_threads_bind": args.cpu_threads_bind}
    if args.model is not None:
        for backend in backends:
            run(args.model, args.repeats, backend=backend, **kw)
        return
    from demo.modelkit import DEMO_MODEL, TEST_MODEL, make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if "transformers" in backends:
            run(make_tiny_checkpoint(Path(tmp) / "test-model", **TEST_MODEL), args.repeats, **kw)
        demo = make_tiny_checkpoint(Path(tmp) / "demo-model", **DEMO_MODEL)
        for backend in backends:
            run(demo, args.repeats, backend=backend, **kw)


if __name__ == "__main__":  # vLLM spawns its engine processes: this guard is required
    main()
