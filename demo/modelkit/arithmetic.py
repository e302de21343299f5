"""A seeded arithmetic task with a verifiable answer: the demo's reward needs no model.

Rows are `{"prompt": "23+48=", "answer": "71"}`. The policy sees `<bos>` + the prompt characters
and should emit the answer digits followed by `<eos>`; a completion is correct when its leading
integer equals the answer (the reward service's `arithmetic` rule: `services.reward.rule.is_correct`).
"""

from __future__ import annotations

import json
import operator
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from services.reward.rule import extract_number, is_correct

__all__ = [
    "encode_answer",
    "encode_prompt",
    "extract_number",
    "is_correct",
    "load_jsonl",
    "make_arithmetic_rows",
    "make_arithmetic_task",
    "make_dev_rows",
    "write_jsonl",
]

_OPS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids as every role sees them: `<bos>` (added by the tokenizer) then the characters."""
    return list(tokenizer(prompt)["input_ids"])


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """The target completion: the answer characters then `<eos>` (no `<bos>`: it continues a prompt)."""
    return [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def _all_prompts(max_operand: int, ops: Sequence[str]) -> list[tuple[str, str]]:
    """Every (prompt, answer) with operands in [0, max_operand], in a fixed order."""
    return [
        (f"{a}{op}{b}=", str(_OPS[op](a, b)))
        for op in ops
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


def make_arithmetic_rows(
    *, n_train: int, n_test: int, seed: int, max_operand: int = 99, ops: Sequence[str] = ("+",)
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train and test rows drawn without replacement from all operand pairs.

    The draw depends only on the arguments (a private `random.Random(seed)`), so the same seed gives
    the same files on every machine. Disjoint by prompt: test accuracy measures generalisation, not
    memorisation of the warm-up set.
    """
    bad = [op for op in ops if op not in _OPS]
    if bad or not ops:
        raise ValueError(f"ops={tuple(ops)!r}: each op must be one of {', '.join(_OPS)}")
    if max_operand < 0:
        raise ValueError(f"max_operand={max_operand} must be >= 0")
    pool = _all_prompts(max_operand, ops)
    if n_train < 0 or n_test < 0 or n_train + n_test > len(pool):
        raise ValueError(
            f"n_train={n_train} + n_test={n_test} must be non-negative and at most {len(pool)}, the number of "
            f"distinct prompts with max_operand={max_operand} and ops={tuple(ops)!r}; raise max_operand or ask for fewer"
        )
    picked = random.Random(seed).sample(pool, n_train + n_test)
    rows = [{"prompt": p, "answer": a} for p, a in picked]
    return rows[:n_train], rows[n_train:]


def make_dev_rows(
    train: Sequence[dict[str, str]], test: Sequence[dict[str, str]], *, n_dev: int, seed: int,
    max_operand: int = 99, ops: Sequence[str] = ("+",),
) -> list[dict[str, str]]:
    """`n_dev` rows outside both `train` and `test`, drawn by `seed`: a held-out set to decide when
    to stop a warm-up without looking at the test set (whose accuracy is what gets reported)."""
    used = {r["prompt"] for r in (*train, *test)}
    rest = [(p, a) for p, a in _all_prompts(max_operand, ops) if p not in used]
    if not 0 <= n_dev <= len(rest):
        raise ValueError(f"n_dev={n_dev} must be between 0 and {len(rest)}, the prompts left outside train and test")
    return [{"prompt": p, "answer": a} for p, a in random.Random(f"dev:{seed}").sample(rest, n_dev)]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, str]]) -> Path:
    """One JSON object per line, keys in a fixed order so files are byte-identical for a seed."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return p


def load_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Rows of a jsonl file (blank lines skipped); a bad line is reported with its number."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    return rows


def make_arithmetic_task(
    out_dir: str | Path,
    *,
    n_train: int,
    n_test: int,
    seed: int,
    max_operand: int = 99,
    ops: Sequence[str] = ("+",),
    n_dev: int = 0,
) -> tuple[Path, Path]:
    """Write `train.jsonl` and `test.jsonl` into `out_dir` (and `dev.jsonl`, `n_dev` held-out rows
    outside both, when `n_dev` > 0); returns the train and test paths."""
    train, test = make_arithmetic_rows(
        n_train=n_train, n_test=n_test, seed=seed, max_operand=max_operand, ops=ops
    )
    out = Path(out_dir)
    if n_dev:
        dev = make_dev_rows(train, test, n_dev=n_dev, seed=seed, max_operand=max_operand, ops=ops)
        write_jsonl(out / "dev.jsonl", dev)
    return write_jsonl(out / "train.jsonl", train), write_jsonl(out / "test.jsonl", test)
