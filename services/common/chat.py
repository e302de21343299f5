"""What a chat model's template says about where an assistant turn ends.

A chat model trained on a template stops by emitting the template's end-of-turn marker
(`<|im_end|>` for ChatML models such as SmolLM2 and Qwen2, `<end_of_turn>` for Gemma,
`<|eot_id|>` for Llama 3). That marker is often *not* the tokenizer's `eos_token`, and a generator
that stops only on `eos_token` runs every completion to the length limit. The template itself is
the only source of truth, so the marker is read off a rendered conversation rather than a table of
model families.
"""

from __future__ import annotations

from typing import Any

_PROBE_USER = "QUARTET_PROBE_USER"
_PROBE_REPLY = "QUARTET_PROBE_REPLY"


def end_of_turn_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn special token(s) and eos.

    Renders a user + assistant exchange with `apply_chat_template` and takes the special tokens that
    directly follow the assistant's content (whitespace-only tokens such as the newline after
    `<|im_end|>` are skipped, a non-special token ends the search). `eos_token_id` is always
    included: base models and templates without a marker still end on it. Returns ids in the order
    found, no duplicates. A tokenizer without a chat template gives just the eos id (if any).
    """
    ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        convo = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
        text = tokenizer.apply_chat_template(convo, tokenize=False)
        tail = text[text.rfind(_PROBE_REPLY) + len(_PROBE_REPLY):]
        special = set(tokenizer.all_special_ids) | _added_special_ids(tokenizer)
        for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
            if token_id in special:
                ids.append(int(token_id))
            elif tokenizer.decode([token_id]).strip():
                break
    eos = tokenizer.eos_token_id
    for token_id in eos if isinstance(eos, list) else [eos]:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def _added_special_ids(tokenizer: Any) -> set[int]:
    """Ids of added tokens flagged special (templates' markers are often added tokens, not named ones)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
