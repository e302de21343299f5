"""Hugging Face loading shared by every role.

Every service (generator, reference, value) loads its tokenizer and model through these helpers so
that they agree on dtype and device rules and on how a tokenizer is fingerprinted: the orchestrator
refuses to start a run whose services report different fingerprints, so the fingerprint must be
computed the same way everywhere.

Nothing here touches the network: checkpoints are local directories (`local_files_only=True`), and a
missing directory is reported as such instead of being mistaken for a Hub repository id.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Any of these marks a directory as holding a tokenizer (fast, sentencepiece or BPE vocab files).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_device(name: str, *, field: str = "device") -> torch.device:
    """Turn a config string into a device.

    "auto" picks CUDA when present, else CPU. Asking for CUDA on a machine without it is a config
    error, not something to fall back from silently: a run meant for a GPU would crawl on CPU.
    """
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(key)
    except RuntimeError as e:
        raise ValueError(f"{field}={name!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{field}={name!r} but CUDA is not available here; set {field} to 'cpu' or 'auto'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{field}={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"pick an index below {torch.cuda.device_count()}"
            )
    return device


def resolve_dtype(name: str, *, device: torch.device | None = None, field: str = "dtype") -> torch.dtype:
    """Turn a config string into a torch dtype.

    "auto" means fp32 on CPU (bf16 matmuls on CPU are many times slower and fp32 keeps CPU runs
    bit-reproducible) and bf16 on CUDA. `device` is the device the model will live on; when None,
    "auto" follows `resolve_device("auto")`.
    """
    key = name.strip().lower()
    if key == "auto":
        dev = device if device is not None else resolve_device("auto")
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if key not in _DTYPES:
        raise ValueError(f"{field}={name!r} is not a supported dtype; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


def _checkpoint_dir(path: str | Path, *, need: tuple[str, ...], what: str) -> Path:
    """The directory `path`, or a FileNotFoundError naming it and saying what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} directory {str(p)!r} does not exist (only local checkpoints are loaded)"
        )
    if not any((p / f).is_file() for f in need):
        raise FileNotFoundError(f"{what} directory {str(p)!r} has none of {', '.join(need)}")
    return p


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory.

    A tokenizer without a pad token gets eos as pad: batching needs some pad id, and every consumer
    masks padding out with the attention mask, so which id fills the gaps does not matter.
    """
    p = _checkpoint_dir(path, need=_TOKENIZER_FILES, what="tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer in {str(p)!r} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a local directory, on `device` in `dtype`, in eval mode.

    Eval mode because most roles only run forward passes (and dropout would make logprobs
    irreproducible); a trainer calls `.train()` itself. `attn_implementation="eager"` is needed where
    double backpropagation through attention is required (TRPO's Fisher-vector product on CPU).
    """
    p = _checkpoint_dir(path, need=("config.json",), what="model")
    kwargs: dict[str, object] = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    model.to(torch.device(device))
    model.eval()
    return model


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 hex of what decides the meaning of token ids.

    Covers the vocabulary (token -> id, added tokens included), the named special tokens with their
    ids, and the tokenizer class. The pad token is left out of the named ones: padding is always
    masked, and `load_tokenizer` may set pad = eos, which must not make a service look different from
    one that loaded the same files with plain transformers (a distinct pad token is still covered
    through the vocabulary and the set of special tokens). Two services agree on the fingerprint iff the same ids mean the same
    text to both. Stable across save_pretrained / from_pretrained because it hashes a canonical JSON
    of sorted items, never object identity or file bytes.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    special = {}
    for attr in ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token"):
        token = getattr(tokenizer, attr, None)
        if token is not None:
            special[attr] = [str(token), tokenizer.convert_tokens_to_ids(str(token))]
    extra = sorted((str(t), tokenizer.convert_tokens_to_ids(str(t))) for t in tokenizer.all_special_tokens)
    payload = {"class": type(tokenizer).__name__, "vocab": vocab, "special": special, "all_special": extra}
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
