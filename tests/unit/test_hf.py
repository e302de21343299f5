"""services.common.hf: dtype/device rules, loading from local dirs, tokenizer fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from demo.modelkit.model import make_tiny_checkpoint
from demo.modelkit.tokenizer import build_char_tokenizer
from services.common.hf import (
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=3)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
    ],
)
def test_resolve_dtype_names(name: str, want: torch.dtype) -> None:
    assert resolve_dtype(name) is want


def test_resolve_dtype_auto_follows_device() -> None:
    assert resolve_dtype("auto", device=torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", device=torch.device("cuda")) is torch.bfloat16
    want = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert resolve_dtype("auto") is want


def test_resolve_dtype_rejects_unknown_and_names_field() -> None:
    with pytest.raises(ValueError, match=r"policy_dtype='float8'.*bf16"):
        resolve_dtype("float8", field="policy_dtype")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"generator\.device='tpu0'"):
        resolve_device("tpu0", field="generator.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_resolve_device_cuda_unavailable_names_field() -> None:
    with pytest.raises(ValueError, match=r"value\.device='cuda' but CUDA is not available.*'cpu' or 'auto'"):
        resolve_device("cuda", field="value.device")


def test_missing_checkpoint_dir_is_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_causal_lm(missing, dtype=torch.float32, device="cpu")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


def test_dir_without_config_is_file_not_found(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_causal_lm(tmp_path, dtype=torch.float32, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_load_causal_lm_dtype_device_eval(checkpoint: Path) -> None:
    model = load_causal_lm(checkpoint, dtype=torch.bfloat16, device="cpu", attn_implementation="eager")
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert next(model.parameters()).device == torch.device("cpu")
    assert model.config._attn_implementation == "eager"


def test_load_tokenizer_sets_missing_pad_to_eos(checkpoint: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token is None
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    # Filling in pad must not make this service look different from one without the fix-up.
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)


def test_fingerprint_stable_across_save_load(checkpoint: Path) -> None:
    built = build_char_tokenizer()
    fp = tokenizer_fingerprint(built)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert tokenizer_fingerprint(load_tokenizer(checkpoint)) == fp
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)) == fp
    assert tokenizer_fingerprint(build_char_tokenizer()) == fp


def test_fingerprint_differs_when_vocab_differs() -> None:
    base = tokenizer_fingerprint(build_char_tokenizer())
    assert tokenizer_fingerprint(build_char_tokenizer("0123456789+=")) != base
    # Same characters, two swapped: same vocabulary size, different ids.
    assert (
        tokenizer_fingerprint(build_char_tokenizer("1023456789+-*= abcdefghijklmnopqrstuvwxyz.,:;?!()/"))
        != base
    )
    added = build_char_tokenizer()
    added.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    assert tokenizer_fingerprint(added) != base
