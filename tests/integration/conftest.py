"""Fixtures of the integration tests: the tiny checkpoint's tokenizer and the generator tests' prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common import hf

PROMPTS = ["12+34=", "7*8=", "1"]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    """The tiny checkpoint's char tokenizer (a module may override it with its own model's)."""
    return hf.load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    """PROMPTS tokenized: three prompts of different lengths."""
    return [tokenizer(p)["input_ids"] for p in PROMPTS]
