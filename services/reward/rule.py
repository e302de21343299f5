"""Built-in verifiable-reward rules. They run inside the worker processes of `verify.VerifierPool`.

Every rule is a check `(prompt, completion, metadata) -> bool`; the reward is correct_reward when
it passes and incorrect_reward when it does not. A check that raises marks the sample failed
(failure_reward): an unparseable *completion* is simply wrong, but an unparseable *reference
answer* is a data problem and must not pass as a zero reward silently.

- arithmetic: the completion's leading integer equals the answer (`is_correct`; the demo's task).
- math: answer equivalence. math-verify when installed (`pip install 'quartet-rl[math]'`), else
  a small sympy checker. math-verify's own SIGALRM timeouts are switched off: a timeout there
  returns "wrong" silently; the pool's hard per-sample timeout is counted instead.
- format: the stripped completion fully matches `format_regex` and has min_chars..max_chars characters.
- final_answer: the completion states a final answer by one of the `extract` strategies
  (`\\boxed{}`, "The answer is", `#### N`): the format reward beside math correctness.

`extract` (ordered strategies, extract.py) makes the math rule compare only the extracted final
answer, as DeepSeekMath-style rewards do; empty, math-verify reads the whole completion.

No torch here: workers stay light (this module is imported in each of them).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.common.answers import STATED_STRATEGIES, extract_answer, validate_strategies

Check = Callable[[str, str, dict[str, str]], bool]


@dataclass(frozen=True)
class RuleSettings:
    """The options a rule needs, as plain values sent to the workers."""

    name: str
    answer_key: str = "answer"
    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    math_engine: str = "auto"
    format_regex: str = r"-?\d+"
    min_chars: int = 1
    max_chars: int = 0
    extract: tuple[str, ...] = ()


def resolve_math_engine(requested: str) -> str:
    """"math_verify" or "sympy" for a requested engine; ValueError saying what to install otherwise."""
    have_mv = importlib.util.find_spec("math_verify") is not None
    have_sympy = importlib.util.find_spec("sympy") is not None
    if requested == "math_verify" and not have_mv:
        raise ValueError("math_engine=math_verify but math-verify is not installed: pip install 'quartet-rl[math]' "
                         "(or set math_engine=auto to fall back to sympy)")
    if requested == "sympy" and not have_sympy:
        raise ValueError("math_engine=sympy but sympy is not installed: pip install sympy")
    if requested == "auto":
        if have_mv:
            return "math_verify"
        if have_sympy:
            return "sympy"
        raise ValueError("rule=math needs math-verify (pip install 'quartet-rl[math]') or sympy; neither is installed")
    return requested


def extract_number(text: str) -> str | None:
    """The integer a completion starts with, in canonical form, or None.

    Reads an optional '-' then digits from the start of `text` and stops at the first other
    character (`<eos>` text, a space, another digit group never counts). Leading zeros are
    normalised ("007" -> "7", "-0" -> "0") so that only the value is judged.
    """
    i = 1 if text.startswith("-") else 0
    j = i
    while j < len(text) and text[j].isascii() and text[j].isdigit():
        j += 1
    if j == i:
        return None
    return str(int(text[:j]))


def is_correct(completion_text: str, answer: str) -> bool:
    """Whether the completion's leading integer equals `answer` (itself an integer string)."""
    got = extract_number(completion_text)
    want = extract_number(answer.strip())
    return got is not None and got == want


def arithmetic_check(settings: RuleSettings) -> Check:
    key = settings.answer_key
    return lambda prompt, completion, meta: is_correct(completion, meta[key])


def format_check(settings: RuleSettings) -> Check:
    pattern = re.compile(settings.format_regex, re.DOTALL)
    lo, hi = settings.min_chars, settings.max_chars or None

    def check(prompt: str, completion: str, meta: dict[str, str]) -> bool:
        text = completion.strip()
        if len(text) < lo or (hi is not None and len(text) > hi):
            return False
        return pattern.fullmatch(text) is not None

    return check


def math_check(settings: RuleSettings) -> Check:
    engine = resolve_math_engine(settings.math_engine)
    key = settings.answer_key
    if engine == "math_verify":
        equal: Callable[[str, str], bool] = math_verify_equal
    else:
        from services.reward.sympy_math import sympy_equal

        equal = sympy_equal
    if not settings.extract:
        return lambda prompt, completion, meta: equal(completion, meta[key])
    strategies = validate_strategies(settings.extract)
    # An extracted answer such as "\frac{1}{2}" is only read whole by math-verify inside delimiters.
    wrap = (lambda answer: f"${answer}$") if engine == "math_verify" else (lambda answer: answer)

    def check(prompt: str, completion: str, meta: dict[str, str]) -> bool:
        found = extract_answer(completion, strategies)
        return found is not None and equal(wrap(found.answer), meta[key])

    return check


def final_answer_check(settings: RuleSettings) -> Check:
    strategies = validate_strategies(settings.extract or STATED_STRATEGIES)
    return lambda prompt, completion, meta: extract_answer(completion, strategies) is not None


def math_verify_equal(completion: str, answer: str) -> bool:
    """math-verify equivalence of the completion's final answer and the reference `answer`."""
    from math_verify import parse, verify

    # A bare reference such as "2\sqrt{2}" is only read whole inside math delimiters.
    gold = parse(f"${answer}$", parsing_timeout=None) or parse(answer, parsing_timeout=None)
    if not gold:
        raise ValueError(f"cannot parse the reference answer {answer!r}")
    pred = parse(completion, parsing_timeout=None)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None, raise_on_error=True))


CHECKS: dict[str, Callable[[RuleSettings], Check]] = {
    "arithmetic": arithmetic_check,
    "math": math_check,
    "format": format_check,
    "final_answer": final_answer_check,
}


def make_rule_scorer(settings: dict[str, Any]) -> Callable[[list[str], list[str], list[dict[str, str]]], list[float]]:
    """Worker factory (see `worker.ScorerSpec`): the scorer of one unit for the named rule."""
    s = RuleSettings(**{**settings, "extract": tuple(settings.get("extract", ()))})
    check = CHECKS[s.name](s)
    # Warm up (lazy imports, regex compilation) now, at start-up, not against the first sample's timeout.
    check("", "\\boxed{1} The answer is 1. #### 1", {s.answer_key: "1"})

    def scorer(prompts: list[str], completions: list[str], metadata: list[dict[str, str]]) -> list[float]:
        return [s.correct_reward if check(p, c, m) else s.incorrect_reward
                for p, c, m in zip(prompts, completions, metadata, strict=True)]

    return scorer
