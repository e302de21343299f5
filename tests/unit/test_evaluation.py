"""Held-out evaluation (orchestrator/run/evaluation.py): the rates by hand, when it runs, and whole in-process
sessions with the demo's tiny model and arithmetic rule (the in-memory roles of test_step_inprocess.py; the
grader is the real reward rule in its worker process).

The session checks compare the evaluation, which answers through the generator, with greedy decoding of the
trainer's own policy (demo.modelkit.evaluate.greedy_complete): the rows' answers are chosen from those
completions so the expected accuracy is known before the run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from demo.modelkit import TEST_MODEL, build_char_tokenizer, build_tiny_model, save_checkpoint
from demo.modelkit.arithmetic import encode_prompt, make_arithmetic_rows
from demo.modelkit.evaluate import greedy_accuracy, greedy_complete
from demo.modelkit.warmup import sft_warmup
from orchestrator.run import checkpoint
from orchestrator.run.config import ConfigError, build_config
from orchestrator.run.data import PromptRow
from orchestrator.run.evaluation import EvalLog, Evaluator, Grader, due, resolve_rule, summarize
from orchestrator.run.metrics import RunMetrics
from orchestrator.run.session import Session
from services.reward.rule import extract_number
from tests.unit.test_run_dir import config, contacted  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL_PROMPTS = ["1+1=", "2+5=", "3*3=", "8-6=", "4+4=", "9-1=", "6*2=", "7+3="]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after a short warm-up on one-digit sums (well under a second): it answers with digits,
    so the arithmetic rule has answers to judge (a random-init model answers none with a number)."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, **TEST_MODEL, seed=0)
    rows, _ = make_arithmetic_rows(n_train=100, n_test=0, seed=0, max_operand=9)
    sft_warmup(model, tokenizer, rows, steps=40, batch_size=32, lr=3e-3, seed=0)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("warm"))


def test_summarize_by_hand() -> None:
    r = summarize(4, [True, False, False, True], [True, True, False, True], [3, 5, 8, 4], [True, True, False, True],
                  failures=1, seconds=2.5)
    assert (r.step, r.n, r.accuracy, r.format_rate, r.length_mean, r.truncated_fraction) == (4, 4, 0.5, 0.75, 5.0, 0.25)
    assert (r.verifier_failures, r.seconds) == (1, 2.5)
    with pytest.raises(ValueError, match="N > 0"):
        summarize(0, [], [], [], [])
    with pytest.raises(ValueError, match="length N"):
        summarize(0, [True], [True, False], [1], [True])


def test_due_steps() -> None:
    every3 = [s for s in range(11) if due(s, every=3, at_start=True, last=10)]
    assert every3 == [0, 3, 6, 9, 10]  # the start, every 3rd step and the last one
    assert [s for s in range(6) if due(s, every=0, at_start=True, last=5)] == [0]
    assert [s for s in range(6) if due(s, every=2, at_start=False, last=5)] == [2, 4, 5]


def test_rule_follows_the_local_reward() -> None:
    assert resolve_rule("auto", None, reward={}, dataset_kind="prompts") == ("arithmetic", ("boxed", "answer_is",
                                                                                           "hash", "last_number"))
    assert resolve_rule("auto", None, reward={"rule": "math", "extract": ["hash"]}, dataset_kind="gsm8k") == \
        ("math", ("hash",))
    assert resolve_rule("auto", None, reward={"rule": "final_answer"}, dataset_kind="gsm8k")[0] == "math"
    assert resolve_rule("auto", None, reward={"kind": "plugin", "rule": "arithmetic"}, dataset_kind="gsm8k")[0] == "math"


def test_math_grader_uses_the_reward_rule() -> None:
    grader = Grader("math", ("boxed", "answer_is", "hash", "last_number"), math_engine="sympy")
    try:
        texts = ["so \\boxed{12}", "The answer is 7.", "I think 3 then 4", "no idea"]
        verdicts, failures = grader.correct(texts, [{"answer": "12"}, {"answer": "8"}, {"answer": "4"},
                                                    {"answer": "1"}])
        assert (verdicts, failures) == ([True, False, True, False], 0)
        assert [grader.formatted(t) for t in texts] == [True, True, False, False]  # last_number is not a stated answer
        with pytest.raises(ValueError, match="no 'answer'"):
            grader.correct(["1"], [{"other": "1"}])
        with pytest.raises(ValueError, match=r"eval rows \[1\] have no 'answer'"):  # at start-up, before any step
            Evaluator([PromptRow("q", {"answer": "1"}), PromptRow("q", {"ref": "1"})], None, grader, max_samples=0,
                      max_new_tokens=4)
    finally:
        grader.close()


def test_eval_config_names_what_is_missing(tmp_path: Path, policy_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval\.dataset\.path"):
        config(tmp_path, policy_dir, "eval.every=1")
    with pytest.raises(ConfigError, match="reads the training rows"):  # held-out accuracy on the training set
        config(tmp_path, policy_dir, "eval.every=1", f"eval.dataset.path={tmp_path / 'prompts.jsonl'}")
    with pytest.raises(ConfigError, match=r"eval\.dataset: kind: Input should be 'prompts'"):
        config(tmp_path, policy_dir, "eval.every=1", "eval.dataset.kind=nonsense")
    gsm8k = build_config({"models": {"policy": "m"}, "services": {"local": True},
                          "dataset": {"kind": "gsm8k", "path": "train.jsonl"}})
    with pytest.raises(ConfigError, match=r"eval\.dataset\.split='test' applies to a save_to_disk directory"):
        build_config(gsm8k.model_dump(mode="json"), ["eval.every=1", "eval.dataset.split=test"])
    held_out = build_config(gsm8k.model_dump(mode="json"), ["eval.every=1", "eval.dataset.path=test.jsonl"])
    assert (held_out.eval_dataset().path, held_out.eval_dataset().kind) == ("test.jsonl", "gsm8k")


def _eval_file(tmp_path: Path, policy_dir: Path, max_new_tokens: int) -> tuple[Path, float]:
    """Eval rows whose answer is the policy's own greedy answer on even rows and a wrong one on odd rows;
    returns the file and the accuracy greedy decoding of the policy should get."""
    tokenizer = build_char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    completions = greedy_complete(model, tokenizer, [encode_prompt(tokenizer, p) for p in EVAL_PROMPTS],
                                  max_new_tokens=max_new_tokens)
    rows, right = [], 0
    for i, (prompt, ids) in enumerate(zip(EVAL_PROMPTS, completions, strict=True)):
        said = extract_number(tokenizer.decode(ids, skip_special_tokens=True))
        if said is not None and i % 2 == 0:
            answer, right = said, right + 1
        else:
            answer = str(int(said) + 1) if said is not None else "5"
        rows.append({"prompt": prompt, "answer": answer})
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert right > 0, "the tiny model answered no even row with a number: pick another seed"
    return path, right / len(rows)


def _session(cfg, **kw) -> tuple[Session, list]:
    with Session(cfg, **kw) as session:
        gen = session.services.generator
        calls: list[float] = []
        generate = gen.generate

        def recording(prompts, **args):
            calls.append(args["temperature"])
            return generate(prompts, **args)

        gen.generate = recording
        session.run()
        session.save_final()
    return session, calls


def test_session_evaluates_the_served_policy_and_resumes(tmp_path: Path, policy_dir: Path,
                                                         contacted: list[str]) -> None:  # noqa: F811
    path, expected = _eval_file(tmp_path, policy_dir, max_new_tokens=4)
    sets = ["eval.every=1", "eval.at_start=true", f"eval.dataset.path={path}", "eval.max_new_tokens=4"]
    cfg = config(tmp_path, policy_dir, *sets)
    session, calls = _session(cfg)
    run_dir = Path(cfg.run_dir)
    evals = EvalLog(run_dir / "eval.jsonl").read()
    assert [e["step"] for e in evals] == [0, 1, 2]
    assert evals[0]["accuracy"] == pytest.approx(expected)  # the starting policy, through the generator
    assert all(e["n"] == len(EVAL_PROMPTS) and 0 <= e["format_rate"] <= 1 for e in evals)
    assert calls.count(0.0) == 3 and calls.count(1.0) == 2  # one greedy Generate per evaluation, 2 training ones
    assert session.evaluation.results[-1].accuracy == evals[-1]["accuracy"]
    # After step 2 the generator served the trained policy: its greedy accuracy, decoded here from the checkpoint.
    trained = AutoModelForCausalLM.from_pretrained(Path(cfg.checkpoint_dir) / checkpoint.step_name(2) / "policy")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    direct = greedy_accuracy(trained, build_char_tokenizer(), rows, max_new_tokens=4)
    assert evals[-1]["accuracy"] == pytest.approx(direct.accuracy)

    # Resume to step 3: steps 0-2 are already evaluated, only step 3 is new.
    _, calls = _session(config(tmp_path, policy_dir, *sets, "steps=3"), resume=True)
    assert [e["step"] for e in EvalLog(run_dir / "eval.jsonl").read()] == [0, 1, 2, 3]
    assert calls.count(0.0) == 1


@pytest.mark.parametrize("pipeline", [False, True])
def test_evaluation_leaves_the_training_unchanged(tmp_path: Path, policy_dir: Path, contacted: list[str],  # noqa: F811
                                                  pipeline: bool) -> None:
    path, _ = _eval_file(tmp_path, policy_dir, max_new_tokens=4)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mode = f"rollout.pipeline={str(pipeline).lower()}"  # pipelined: the next step's samples are drawn meanwhile
    plain = config(tmp_path / "a", policy_dir, mode)
    evaluated = config(tmp_path / "b", policy_dir, mode, "eval.every=1", "eval.at_start=true",
                       f"eval.dataset.path={path}")
    torch.manual_seed(123)  # the session seeds everything itself: this must not matter
    _session(plain)
    _session(evaluated)
    keep = ("policy_loss", "kl_ref", "entropy", "grad_norm", "approx_kl", "clipfrac")

    def lines(cfg) -> list[dict]:
        out = []
        for line in (Path(cfg.run_dir) / "steps.jsonl").read_text().splitlines():
            d = json.loads(line)
            out.append({"reward": d["reward"], **{k: d[k] for k in keep if k in d}})
        return out

    assert lines(plain) == lines(evaluated)
    assert EvalLog(Path(evaluated.run_dir) / "eval.jsonl").steps() == {0, 1, 2}


def test_eval_metrics_are_exported() -> None:
    m = RunMetrics()
    m.record_eval(summarize(5, [True, False], [True, True], [2, 4], [True, False], seconds=1.0).as_dict())
    get = m.registry.get_sample_value
    assert (get("quartet_eval_step"), get("quartet_eval_accuracy"), get("quartet_eval_format_rate")) == (5, 0.5, 1.0)
    assert (get("quartet_eval_truncated_fraction"), get("quartet_eval_response_length_tokens")) == (0.5, 3.0)


def test_quartet_train_prints_the_evaluation_and_plots_it(tmp_path: Path, policy_dir: Path,
                                                          contacted: list[str]) -> None:  # noqa: F811
    import yaml
    from typer.testing import CliRunner

    from cli.main import app

    path, expected = _eval_file(tmp_path, policy_dir, max_new_tokens=4)
    cfg = config(tmp_path, policy_dir, "eval.every=2", "eval.at_start=true", f"eval.dataset.path={path}",
                 "eval.max_new_tokens=4")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["train", str(config_file)], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"eval after step 0: accuracy {expected:.1%} of {len(EVAL_PROMPTS)}" in out, out
    assert "eval after step 2:" in out and "eval after step 1:" not in out
    last = EvalLog(Path(cfg.run_dir) / "eval.jsonl").read()[-1]
    row = rf"eval accuracy\W+{expected:.1%}\W+{last['accuracy']:.1%}".replace(".", r"\.")
    assert re.search(row, out), out  # the summary: first vs last evaluation
    assert (Path(cfg.run_dir) / "curves.png").stat().st_size > 1000


def test_quartet_eval_on_a_task_file(tmp_path: Path, policy_dir: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    path, expected = _eval_file(tmp_path, policy_dir, max_new_tokens=4)
    result = CliRunner().invoke(app, ["eval", str(policy_dir), "--task", str(path), "--max-new-tokens", "4"],
                                terminal_width=300)
    assert result.exit_code == 0, result.output
    n = len(EVAL_PROMPTS)
    assert f"accuracy {expected:.1%} ({round(expected * n)}/{n})" in " ".join(result.output.split()), result.output
    both = CliRunner().invoke(app, ["eval", str(policy_dir), "--task", str(path), "--dataset", "gsm8k"],
                                terminal_width=300)
    assert both.exit_code == 2 and "exactly one of --task" in both.output
    missing = CliRunner().invoke(app, ["eval", str(policy_dir), "--task", str(tmp_path / "nope.jsonl")],
                                   terminal_width=300)
    assert missing.exit_code == 2 and "nope.jsonl" in missing.output, missing.output
