"""The tiny model kit: a character tokenizer, tiny random-init causal LMs saved like real checkpoints,
a seeded arithmetic task with a verifiable answer, a supervised warm-up, and greedy evaluation.

Used by the tests, `quartet demo` and the benchmarks. Everything is built locally: no download.
"""

from demo.modelkit.arithmetic import (
    extract_number,
    is_correct,
    load_jsonl,
    make_arithmetic_rows,
    make_arithmetic_task,
    make_dev_rows,
)
from demo.modelkit.evaluate import AccuracyResult, greedy_accuracy, greedy_complete
from demo.modelkit.model import (
    DEMO_MODEL,
    TEST_MODEL,
    build_tiny_model,
    count_parameters,
    make_tiny_checkpoint,
    save_checkpoint,
)
from demo.modelkit.tokenizer import build_char_tokenizer
from demo.modelkit.warmup import DEMO_WARMUP, encode_answer, encode_prompt, sft_warmup

__all__ = [
    "DEMO_MODEL",
    "DEMO_WARMUP",
    "TEST_MODEL",
    "AccuracyResult",
    "build_char_tokenizer",
    "build_tiny_model",
    "count_parameters",
    "encode_answer",
    "encode_prompt",
    "extract_number",
    "greedy_accuracy",
    "greedy_complete",
    "is_correct",
    "load_jsonl",
    "make_arithmetic_rows",
    "make_arithmetic_task",
    "make_dev_rows",
    "make_tiny_checkpoint",
    "save_checkpoint",
    "sft_warmup",
]
