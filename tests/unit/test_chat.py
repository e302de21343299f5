"""services/common/chat.py: the end-of-turn ids are read off the chat template itself.

The real ChatML case (SmolLM2, <|im_end|> = eos) is in tests/integration/test_real_model.py; here
the char tokenizer gets templates whose end marker is *not* eos, the case a generator that stops
only on eos gets wrong (every completion would run to the length limit).
"""

from __future__ import annotations

from demo.modelkit.tokenizer import build_char_tokenizer
from services.common.chat import end_of_turn_token_ids

GEMMA_LIKE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_no_template_means_eos_only() -> None:
    tokenizer = build_char_tokenizer()
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_template_end_marker_comes_first_then_eos() -> None:
    tokenizer = build_char_tokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_ \n")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_LIKE
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_token_ids(tokenizer) == [end, tokenizer.eos_token_id]


def test_template_ending_in_eos_lists_it_once() -> None:
    tokenizer = build_char_tokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_ \n")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>\n{% endfor %}"
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_plain_text_after_the_reply_ends_the_search() -> None:
    tokenizer = build_char_tokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_ \n")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} END<eos>{% endfor %}"
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.eos_token_id]  # eos only by the always-added rule


def test_transformers_generator_stops_on_the_template_end_marker(tiny_checkpoint, tmp_path) -> None:
    """The backend's stop set holds the template's end-of-turn id beside eos (vLLM's gets the same)."""
    import shutil

    from services.common.hf import load_tokenizer
    from services.common.role import ModelConfig
    from services.generator.transformers_backend import TransformersBackend

    path = tmp_path / "chat-model"
    shutil.copytree(tiny_checkpoint, path)
    tokenizer = load_tokenizer(path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_LIKE
    tokenizer.save_pretrained(path)
    backend = TransformersBackend(ModelConfig(path=str(path), dtype="float32", device="cpu"))
    backend.load()
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end != tokenizer.eos_token_id
    assert {end, tokenizer.eos_token_id} <= set(backend.info.eos_token_ids)  # + generation_config eos
