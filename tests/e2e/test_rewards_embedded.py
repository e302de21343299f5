"""End to end: several reward services combined with weights in the embedded stack.

Two local reward services, each its own process with its own options, name and weight: a plugin (digit share
of the completion: varied for a random model) and the arithmetic rule. The step log holds each one's own mean
(reward_components) beside the weights (reward_services), and the total reward's mean is their weighted sum;
Prometheus has one quartet_reward_component_mean series per name. GRPO without a reference (kl_coef 0), so
three service processes start. The run also evaluates through the real generator service, graded by the
arithmetic reward's rule: its accuracy equals greedy decoding of the final checkpoint done here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.run.config import build_config
from tests.e2e.test_run import PLUGIN, scrape


def test_two_weighted_reward_services(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from demo.modelkit.arithmetic import make_arithmetic_task
    from orchestrator.run.session import Session

    train, test = make_arithmetic_task(tmp_path / "task", n_train=16, n_test=12, seed=0, max_operand=9)
    (tmp_path / "digits_reward.py").write_text(PLUGIN)
    digits = {"kind": "plugin", "plugin": "digits_reward:score", "plugin_path": str(tmp_path), "workers": 1}
    rewards = [{"name": "digits", "weight": 1.0, "options": digits},
               {"name": "arith", "weight": 0.5, "options": {"kind": "rule", "rule": "arithmetic", "workers": 1}}]
    cfg = build_config({
        "models": {"policy": str(tiny_checkpoint)},
        "services": {"local": True, "local_options": {"rewards": rewards}},
        "algorithm": {"name": "grpo", "lr": 1e-3, "kl_coef": 0.0},
        "sampling": {"max_new_tokens": 4},
        "dataset": {"path": str(train)},
        "prompts_per_step": 4, "samples_per_prompt": 4, "steps": 2, "seed": 0, "metrics_port": 0,
        "run_dir": str(tmp_path / "run"),
        "eval": {"every": 2, "dataset": {"path": str(test)}, "max_new_tokens": 4},
    })
    with Session(cfg) as session:
        assert sorted(session.stack.services) == ["generator", "reward-arith", "reward-digits"]
        results = session.run()
        metrics = scrape(session.metrics.port)
        final = session.save_final()
    run_dir = tmp_path / "run"
    assert (run_dir / "services" / "reward-digits.log").is_file() and (run_dir / "services" / "reward-arith.log").is_file()
    lines = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert line["reward_services"] == {"digits": 1.0, "arith": 0.5}
        parts = line["reward_components"]
        assert set(parts) == {"digits", "arith"} and all(0 <= v <= 1 for v in parts.values())
        # The total is the weighted sum per sample, so its mean is the weighted sum of the means.
        assert line["reward"]["mean"] == pytest.approx(parts["digits"] + 0.5 * parts["arith"], abs=1e-6)
    assert any(line["reward_components"]["digits"] > 0 for line in lines)  # the plugin's reward reached the log
    last = results[-1].reward_components
    for name in ("digits", "arith"):
        assert metrics[("quartet_reward_component_mean", (("identity", name),))] == pytest.approx(last[name])

    from transformers import AutoModelForCausalLM

    from demo.modelkit.arithmetic import encode_prompt, load_jsonl
    from demo.modelkit.evaluate import greedy_accuracy, greedy_complete
    from services.common.hf import load_tokenizer

    (evaluation,) = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    policy, tokenizer, rows = AutoModelForCausalLM.from_pretrained(final / "policy"), load_tokenizer(tiny_checkpoint), \
        load_jsonl(test)
    direct = greedy_accuracy(policy, tokenizer, rows, max_new_tokens=4)
    answers = greedy_complete(policy, tokenizer, [encode_prompt(tokenizer, r["prompt"]) for r in rows], max_new_tokens=4)
    lengths = [len(a) for a in answers]
    cut = [len(a) == 4 and a[-1] != tokenizer.eos_token_id for a in answers]
    assert (evaluation["step"], evaluation["n"]) == (2, 12) and evaluation["accuracy"] == pytest.approx(direct.accuracy)
    assert evaluation["length_mean"] == pytest.approx(sum(lengths) / 12)
    assert evaluation["truncated_fraction"] == pytest.approx(sum(cut) / 12)
