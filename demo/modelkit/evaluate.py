"""Greedy test accuracy: the number the demo and `quartet eval` report before and after RL.

Greedy (argmax) decoding, not sampling, so the number is a property of the weights alone and two
evaluations of one checkpoint agree. Prompts are batched with left padding: every row then ends at
the same column and new tokens are appended in lockstep; the attention mask (and the position ids
transformers derives from it) make a padded row decode exactly as it would alone, which the unit
tests check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demo.modelkit.arithmetic import encode_prompt, is_correct


@dataclass(frozen=True)
class AccuracyResult:
    accuracy: float  # correct / n, in [0, 1]; 0.0 when n == 0
    n: int  # rows evaluated
    correct: int  # rows whose completion's leading integer equals the answer
    examples: tuple[tuple[str, str, str], ...]  # (prompt, completion text, answer) for every row, in order


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into `input_ids` (B, P) and `attention_mask` (B, P), 1 on real tokens."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, length - len(r) :] = torch.tensor(list(r))
            attention_mask[i, length - len(r) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def greedy_complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 6,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy completion ids of each prompt, cut after the first `<eos>` (kept) or at max_new_tokens.

    `prompt_ids` are full prompt encodings (with `<bos>`), B lists of any lengths.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[list[int]] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            input_ids, attention_mask = left_pad(prompt_ids[start : start + batch_size], pad)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for row in out[:, input_ids.shape[1] :].tolist():
                completions.append(row[: row.index(eos) + 1] if eos in row else row)
    finally:
        model.train(was_training)
    return completions


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, str]],
    *,
    max_new_tokens: int = 6,
    batch_size: int = 64,
) -> AccuracyResult:
    """Fraction of `{"prompt", "answer"}` rows whose greedy completion is correct (`is_correct`)."""
    prompt_ids = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    completions = greedy_complete(
        model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    examples = tuple(
        (r["prompt"], tokenizer.decode(c, skip_special_tokens=True), r["answer"])
        for r, c in zip(rows, completions, strict=True)
    )
    correct = sum(is_correct(text, answer) for _, text, answer in examples)
    return AccuracyResult(
        accuracy=correct / len(rows) if rows else 0.0, n=len(rows), correct=correct, examples=examples
    )
