"""Reward rules, options and the batch/result checks, in-process (no worker pool, no gRPC)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from services.common.errors import BackendError, InvalidArgument
from services.reward import Options
from services.reward.backend import RewardBackend, RewardBatch, RewardMetrics, RewardResult
from services.reward.plugin import load_plugin, make_plugin_scorer
from services.reward.rule import RuleSettings, make_rule_scorer, resolve_math_engine
from services.reward.sympy_math import sympy_equal, to_expr

HAVE_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


def _scores(name: str, completions: list[str], answers: list[str] | None = None, **kw) -> list[float]:
    scorer = make_rule_scorer(vars(RuleSettings(name=name, **kw)))
    meta = [{"answer": a} for a in answers] if answers else [{} for _ in completions]
    return scorer([""] * len(completions), completions, meta)


def test_arithmetic_rule_right_wrong_garbage() -> None:
    got = _scores("arithmetic", ["71", "71<eos>", "071", "70", "", "abc", "-5", "7 1"],
                  ["71", "71", "71", "71", "71", "71", "-5", "71"])
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_arithmetic_rule_uses_configured_rewards_and_key() -> None:
    scorer = make_rule_scorer(vars(RuleSettings(name="arithmetic", answer_key="y", correct_reward=2.0,
                                                incorrect_reward=-1.0)))
    assert scorer(["1+1="] * 2, ["2", "3"], [{"y": "2"}, {"y": "2"}]) == [2.0, -1.0]


def test_format_rule_regex_and_length_bounds() -> None:
    got = _scores("format", ["42", " 42\n", "42 apples", "", "123456"], max_chars=5)
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert _scores("format", [r"so \boxed{3}", "3"], format_regex=r".*\\boxed\{.+\}") == [1.0, 0.0]


@pytest.mark.parametrize("engine", ["sympy", pytest.param("math_verify", marks=pytest.mark.skipif(
    not HAVE_MATH_VERIFY, reason="math-verify not installed"))])
def test_math_rule_equivalence(engine: str) -> None:
    completions = [r"The answer is $\frac{1}{2}$", r"so \boxed{0.5}", r"$\sqrt{8}$", "3.0", "71<eos>", "garbage", "72"]
    answers = ["0.5", r"\frac{1}{2}", r"2\sqrt{2}", "3", "71", "71", "71"]
    assert _scores("math", completions, answers, math_engine=engine) == [1, 1, 1, 1, 1, 0, 0]


def test_math_rule_refuses_unparseable_reference_answer() -> None:
    scorer = make_rule_scorer(vars(RuleSettings(name="math", math_engine="sympy")))
    with pytest.raises(ValueError, match="unknown name 'import'"):
        scorer([""], ["1"], [{"answer": "import os"}])


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "exit()", "x.evalf", "open(1)", "a" * 400])
def test_sympy_parser_rejects_code(text: str) -> None:
    with pytest.raises(ValueError):
        to_expr(text)
    assert sympy_equal(text, "7") is False  # an unreadable completion is wrong, not an error


def test_math_engine_refused_at_startup_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("math_verify", "sympy") else real(name, *a))
    with pytest.raises(ValueError, match=r"needs math-verify \(pip install 'quartet-rl\[math\]'\) or sympy"):
        resolve_math_engine("auto")
    with pytest.raises(ValueError, match="math-verify is not installed"):
        resolve_math_engine("math_verify")


def test_options_say_what_to_change() -> None:
    with pytest.raises(ValidationError, match=r"kind=plugin needs options\.plugin"):
        Options(kind="plugin")
    with pytest.raises(ValidationError, match="must be 'module:function'"):
        Options(kind="plugin", plugin="just_a_module")
    with pytest.raises(ValidationError, match="set kind=plugin or drop them"):
        Options(kind="rule", plugin="m:f")
    with pytest.raises(ValidationError, match="not a valid regex"):
        Options(format_regex="(")
    with pytest.raises(ValidationError, match="extra"):
        Options(colour="red")
    for name in ("correct_reward", "failure_reward"):
        with pytest.raises(ValidationError, match="finite"):
            Options(**{name: float("nan")})


def test_plugin_loading_errors_name_the_problem(tmp_path) -> None:
    (tmp_path / "plug_mod.py").write_text("VALUE = 3\ndef score(p, c, m):\n    return {'rewards': [1.0]}\n")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        load_plugin("no_such_module:score", str(tmp_path))
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_plugin("plug_mod:missing", str(tmp_path))
    with pytest.raises(ValueError, match="is a int, not a function"):
        load_plugin("plug_mod:VALUE", str(tmp_path))
    scorer = make_plugin_scorer({"target": "plug_mod:score"})
    with pytest.raises(TypeError, match="returned a dict; expected a list of 1 floats"):
        scorer(["p"], ["c"], [{}])


# --- batch assembly and result checks -------------------------------------------------------


def test_batch_build_infers_b_and_fills_absent_fields() -> None:
    batch = RewardBatch.build(completion_text=["a", "b"], metadata=[{"answer": "1"}, {"answer": "2"}])
    assert len(batch) == 2 and batch.prompt_text == ["", ""] and batch.present == {"completion_text", "metadata"}
    assert [r.numel() for r in batch.completion_ids] == [0, 0]
    ids = RewardBatch.build(completion_ids=[torch.tensor([1, 2]), torch.tensor([3])])
    assert len(ids) == 2 and ids.present == {"completion_ids"}


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"completion_text": ["a", "b"], "prompt_text": ["p"]}, "prompt_text"),
    ({"completion_text": ["a"], "metadata": [{}, {}]}, "completion_text"),
    ({"completion_text": ["a", "b"], "completion_ids": [torch.tensor([1])]}, "completion_ids"),
    ({"completion_text": ["a"], "prompt_ids": []}, "prompt_ids"),  # sent with zero rows: still must have B
])
def test_batch_build_names_the_disagreeing_field(kwargs, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        RewardBatch.build(**kwargs)
    assert e.value.field == field


class _Fixed(RewardBackend):
    """A backend returning a canned result, to drive the checks in `score`."""

    kind = "test"
    identity = "test:fixed"

    def __init__(self, result: RewardResult, **kw) -> None:
        self.registry = CollectorRegistry()
        super().__init__(RewardMetrics(self.registry), max_batch=kw.pop("max_batch", 8))
        self.result = result
        self.required_metadata = kw.pop("required_metadata", ())

    def compute(self, batch: RewardBatch) -> RewardResult:
        return self.result


def _batch(n: int, **kw) -> RewardBatch:
    return RewardBatch.build(completion_text=["x"] * n, completion_ids=[torch.tensor([1, 2])] * n, **kw)


def test_score_returns_float32_rewards_and_observes_metrics() -> None:
    backend = _Fixed(RewardResult(rewards=[1, 0.5, 0], failed=[False, False, True]))
    rewards, failed, tok = backend.score(_batch(3))
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.5, 0.0]
    assert failed == [False, False, True] and tok is None
    sample = backend.registry.get_sample_value
    assert sample("quartet_reward_samples_total", {"kind": "test"}) == 3
    assert sample("quartet_reward_value_count", {"kind": "test"}) == 2  # the failed sample is not observed
    assert sample("quartet_reward_batch_mean", {"kind": "test"}) == 0.75


@pytest.mark.parametrize(("result", "match"), [
    (RewardResult(rewards=[1.0, 2.0], failed=[False] * 3), "returned 2 rewards for 3 samples"),
    (RewardResult(rewards=[1.0, float("nan"), float("inf")], failed=[False] * 3), r"non-finite rewards at samples \[1, 2\]"),
    (RewardResult(rewards=[1.0] * 3, failed=[False]), "returned 1 failed flags for 3 samples"),
    (RewardResult(rewards=["a", "b", "c"], failed=[False] * 3), "rewards are not numbers"),
])
def test_malformed_results_are_backend_errors_naming_the_backend(result: RewardResult, match: str) -> None:
    backend = _Fixed(result)
    with pytest.raises(BackendError, match=match) as e:
        backend.score(_batch(3))
    assert "reward backend test:fixed" in str(e.value)
    assert backend.registry.get_sample_value("quartet_reward_errors_total",
                                             {"kind": "test", "reason": "invalid_output"}) == 1


def test_token_rewards_must_align_with_completion_ids() -> None:
    good = _Fixed(RewardResult(rewards=[1.0], failed=[False], token_rewards=[torch.tensor([0.0, 1.0])]))
    _, _, tok = good.score(_batch(1, want_token_rewards=True))
    assert tok is not None and tok[0].tolist() == [0.0, 1.0]
    assert good.score(_batch(1))[2] is None  # not asked for: not returned
    bad = _Fixed(RewardResult(rewards=[1.0], failed=[False], token_rewards=[torch.tensor([1.0])]))
    with pytest.raises(BackendError, match="token rewards of sample 0 have 1 entries, its completion_ids 2"):
        bad.score(_batch(1, want_token_rewards=True))


def test_batch_checks_empty_oversized_missing_field_and_answer() -> None:
    backend = _Fixed(RewardResult(rewards=[1.0], failed=[False]), max_batch=2, required_metadata=("answer",))
    with pytest.raises(InvalidArgument, match="empty batch"):
        backend.score(RewardBatch.build())
    with pytest.raises(InvalidArgument, match="3 samples exceed max_batch=2"):
        backend.score(RewardBatch.build(completion_text=["1"] * 3))
    with pytest.raises(InvalidArgument) as e:
        backend.score(RewardBatch.build(prompt_text=["p"], metadata=[{"answer": "1"}]))
    assert e.value.field == "completion_text"
    with pytest.raises(InvalidArgument) as e:
        backend.score(RewardBatch.build(completion_text=["1", "2"], metadata=[{"answer": "1"}, {"other": "2"}]))
    assert e.value.field == "metadata[1]" and "missing key 'answer'" in str(e.value)


def test_worker_side_modules_do_not_import_torch() -> None:
    """Each worker process imports these; torch would cost seconds and hundreds of MB per worker."""
    import subprocess
    import sys

    code = ("import sys\nfrom services.reward.worker import ScorerSpec, build_scorer\n"
            "for name in ('arithmetic', 'format', 'math'):\n"
            "    build_scorer(ScorerSpec('services.reward.rule:make_rule_scorer', {'name': name}))\n"
            "import services.reward.plugin\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'grpc') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
