"""Tiny random-init causal LMs that take the same path as a real checkpoint.

The model is a stock Qwen2 (or Llama) architecture from transformers, so every service loads it
with `AutoModelForCausalLM.from_pretrained(dir)` exactly as it would load a downloaded model; no
custom code path exists only for tests.

Llama is the default architecture because of how transformers 5 loads tokenizers: for model type
"qwen2" `AutoTokenizer` ignores `tokenizer_class` in tokenizer_config.json and rebuilds a byte-level
BPE `Qwen2Tokenizer` (NFC normalizer, GPT-2 pre-tokenizer regex, ByteLevel decoder), which turns the
character tokenizer's "23 + 48" into "23+48" on a round trip. For "llama" it honours the saved
`TokenizersBackend` class and tokenizer.json as written. A Qwen2 model can still be built in memory;
`make_tiny_checkpoint` refuses to write a checkpoint whose tokenizer does not survive reloading.

Parameter counts with the default 54-token character tokenizer (tied embeddings, measured):
- test model `TEST_MODEL` (hidden 64, 2 layers, 4 heads, intermediate 256): 134,848 (llama), 135,232 (qwen2)
- demo model `DEMO_MODEL` (hidden 128, 4 layers, 4 heads, intermediate 512): 1,056,640 (llama), 1,058,176 (qwen2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from demo.modelkit.tokenizer import build_char_tokenizer

Arch = Literal["qwen2", "llama"]

# The ~1M-parameter model of `quartet demo` and the step-time benchmark.
DEMO_MODEL: dict[str, Any] = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}
# The model of unit and integration tests: fast enough that a forward pass is noise.
TEST_MODEL: dict[str, Any] = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    arch: Arch = "llama",
    seed: int = 0,
    max_position_embeddings: int = 128,
) -> PreTrainedModel:
    """A randomly initialised causal LM sized for `tokenizer`, fp32, in eval mode.

    `intermediate_size` defaults to 4 * hidden_size. Embeddings are tied to the LM head (at this size
    untied heads would double the parameter count for nothing). The initialisation depends only on
    `seed`: the global RNG is forked, so callers' random state is untouched.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": True,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif arch == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        raise ValueError(f"arch={arch!r} is not supported; use 'qwen2' or 'llama'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.to(torch.float32)
    model.eval()
    return model


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write model (safetensors) and tokenizer into `out_dir`, the layout of a Hub checkpoint."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_checkpoint(out_dir: str | Path, **kw: Any) -> Path:
    """Build the character tokenizer and a tiny model (`kw` go to `build_tiny_model`) and save both.

    Returns `out_dir`, loadable with `AutoTokenizer` / `AutoModelForCausalLM` (or
    `services.common.hf.load_tokenizer` / `load_causal_lm`).
    """
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, **kw)
    out = save_checkpoint(model, tokenizer, out_dir)
    check_tokenizer_reload(tokenizer, out)
    return out


def check_tokenizer_reload(tokenizer: PreTrainedTokenizerBase, checkpoint_dir: str | Path) -> None:
    """Raise if `AutoTokenizer` reads the saved tokenizer back as something that encodes differently.

    Guards against transformers substituting a model-type-specific tokenizer class for the saved one
    (it does for qwen2, see the module docstring); services would then silently disagree with the
    trainer about what the ids mean.
    """
    reloaded = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
    probe = "12+34= -5*6 ab, c."
    want, got = tokenizer(probe)["input_ids"], reloaded(probe)["input_ids"]
    decoded = reloaded.decode(got, skip_special_tokens=True)
    if got != want or decoded != probe:
        raise RuntimeError(
            f"AutoTokenizer reloads the tokenizer in {str(checkpoint_dir)!r} as {type(reloaded).__name__}, "
            f"which encodes {probe!r} as {got} (expected {want}) and decodes it to {decoded!r}; "
            "use arch='llama' for checkpoints with the character tokenizer"
        )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
