"""Fixtures of the unit tests that run a model in process (experience, trainer)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

PAD = 0  # the tiny model's padding token id


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module: a 100k-parameter model gains nothing from a second one, and
    on a loaded 2-core machine two threads ran its forwards and updates 20-100x slower (measured).
    Restored after the module, whatever an in-process run set meanwhile."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_qwen() -> Qwen2ForCausalLM:
    """A random Qwen2 (hidden 64, 2 layers, GQA 4/2 heads, vocab 32, pad id PAD), fp32, eval mode, with
    transformers' default attention (sdpa): TRPO's double backprop must work on it. Shared by a module:
    a test that trains it takes a copy."""
    return make_tiny_qwen()


def make_tiny_qwen() -> Qwen2ForCausalLM:
    """The model of ``tiny_qwen``, built anew (the same weights every time): for a process of its own."""
    config = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=32,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()
