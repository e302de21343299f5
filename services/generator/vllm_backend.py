"""Sampling with vLLM (CUDA GPU), behind the same interface as the transformers backend.

vLLM is imported lazily, inside `load()`: this module imports everywhere, the engine only exists
where vllm and a GPU do. Written from vLLM's documentation (LLM, SamplingParams, RequestOutput,
LLM.apply_model, LLM.reset_prefix_cache; logprobs_mode); it cannot run on the CPU-only machines
this project is developed on, so its test is skipped there.

How it keeps the backend contracts:
- Seeding: every sample is its own vLLM request with n=1 and seed = sample_seed(seed, i, j), so a
  sample does not depend on the batch or on n (vLLM's own n>1 fan-out would derive seeds its own
  way). Prefix caching makes the repeated prompt cheap.
- Logprobs: `logprobs_mode="raw_logprobs"` (log-softmax of the unprocessed logits) and
  `SamplingParams(logprobs=0)`, which returns exactly the sampled token's logprob per position.
- New weights: the staged tensors (HF checkpoint names) go to the model's own `load_weights`
  inside the worker through `LLM.apply_model` (it maps HF names onto vLLM's fused layers), then the
  prefix cache is reset so no KV computed with old weights is reused. For GPU-to-GPU transfer
  vLLM >= 0.16 has `vllm.distributed.weight_transfer` (NCCL / IPC); the gRPC stream stays the
  portable path and is what this backend receives.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from services.common import hf
from services.common.role import ModelConfig
from services.generator.backend import (
    BackendInfo,
    GeneratedSample,
    GenerationRequest,
    GeneratorBackend,
    sample_seed,
)

_VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _load_into_model(named: list[tuple[str, torch.Tensor]], model: torch.nn.Module) -> int:
    """Runs inside the vLLM worker: copy HF-named tensors into the (possibly fused) parameters."""
    model.load_weights(weights=iter(named))  # type: ignore[operator]
    return len(named)


def checkpoint_specs(path: str | Path, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in a safetensors checkpoint, read from file headers only.

    Floating-point tensors are expected in the served `dtype` (senders cast with `dtype=`).
    """
    from safetensors import safe_open

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(path)!r}: the vllm backend needs them to know "
                                "which tensors an UpdateWeights must carry")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = st.get_slice(name)
                stored = getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
                                         "I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool"}
                                 .get(sl.get_dtype(), "float32"))
                specs[name] = (tuple(sl.get_shape()), dtype if stored.is_floating_point else stored)
    return specs


class VLLMBackend(GeneratorBackend):
    """vllm.LLM in this process; see the module docstring."""

    name = "vllm"

    def __init__(self, model: ModelConfig, options) -> None:  # type: ignore[no-untyped-def]
        self.model_config = model
        self.options = options
        self.version = 0
        self._info: BackendInfo | None = None

    def load(self) -> None:
        if not self.model_config.path:
            raise ValueError("model.path is required for the generator (a local checkpoint directory)")
        device = hf.resolve_device(self.model_config.device, field="model.device")
        if device.type != "cuda":
            raise ValueError("the vllm backend needs a CUDA device; set options.backend=transformers on CPU")
        dtype = hf.resolve_dtype(self.model_config.dtype, device=device, field="model.dtype")
        # apply_model sends a function (pickled) to the engine's worker process
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        import vllm  # lazily: only GPU machines have it

        self._vllm = vllm
        path = str(self.model_config.path)
        kwargs = {
            "model": path, "tokenizer": path, "dtype": _VLLM_DTYPES[dtype], "seed": 0,
            "gpu_memory_utilization": self.options.gpu_memory_utilization,
            "enable_prefix_caching": self.options.enable_prefix_caching,
            "enforce_eager": self.options.enforce_eager, "logprobs_mode": "raw_logprobs",
        }
        if self.options.max_model_len is not None:
            kwargs["max_model_len"] = self.options.max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = hf.load_tokenizer(path)
        self._specs = checkpoint_specs(path, dtype)
        model_cfg = self.llm.llm_engine.model_config
        eos = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        self._info = BackendInfo(
            backend=self.name, model_path=path, tokenizer_fingerprint=hf.tokenizer_fingerprint(self.tokenizer),
            vocab_size=int(model_cfg.get_vocab_size()), dtype=_VLLM_DTYPES[dtype], device=str(device),
            eos_token_ids=tuple(sorted(eos)), max_positions=int(model_cfg.max_model_len),
        )

    @property
    def info(self) -> BackendInfo:
        if self._info is None:
            raise RuntimeError("backend not loaded")
        return self._info

    def expected_weights(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._specs)

    def apply_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        # The staged tensors are reused by the next update: hand vLLM its own copies only if it
        # keeps references (it does not: load_weights copies into the parameters).
        self.llm.apply_model(functools.partial(_load_into_model, list(state.items())))
        self.llm.reset_prefix_cache()
        self.version = version

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate_many(self, requests: list[GenerationRequest]) -> list[list[GeneratedSample]]:
        import secrets

        vllm = self._vllm
        prompts, params, owner = [], [], []
        for r, req in enumerate(requests):
            p = req.params
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            for i, prompt in enumerate(req.prompts):
                for j in range(p.n):
                    prompts.append({"prompt_token_ids": list(prompt)})
                    params.append(vllm.SamplingParams(
                        n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else -1,
                        max_tokens=p.max_new_tokens, stop_token_ids=list(p.stop_token_ids),
                        seed=sample_seed(seed, i, j), logprobs=0, detokenize=False))
                    owner.append((r, i))
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        out: list[list[GeneratedSample]] = [[] for _ in requests]
        for (r, i), result in zip(owner, outputs, strict=True):
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            # with logprobs=0 each position's dict holds the sampled token (and nothing else)
            lps = [float(pos[tok].logprob) for pos, tok in zip(completion.logprobs, ids, strict=True)]
            reason = "stop" if completion.finish_reason == "stop" else "length"
            out[r].append(GeneratedSample(prompt_index=i, token_ids=ids, logprobs=lps, finish_reason=reason))
        return out

    def close(self) -> None:
        self.llm = None  # type: ignore[assignment]
