"""Final-answer extraction: from a model's completion, and from a dataset's reference solution.

Why a module of its own: the reward (is the final answer right? is there a final answer at all?),
the dataset loader (GSM8K's `#### N`, MATH's last `\\boxed{}` as the reference) and evaluation must
read answers the same way, or a run's reward and its reported accuracy disagree. Pure standard
library: it runs inside the reward worker processes, which never import torch.

Completion strategies, tried in a configurable order (DeepSeekMath-style prompts ask for
`\\boxed{}`; GSM8K-trained models write `#### N`; chat models say "The answer is N"):
- boxed: the last complete `\\boxed{...}` (nested braces; `\\fbox{}` and `\\boxed N` too).
- answer_is: what follows the last "the (final) answer is" / "answer:" on its line.
- hash: what follows the last `#### ` on its line.
- last_number: the last number in the text (a weak fallback: any stray number passes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Strategy = Literal["boxed", "answer_is", "hash", "last_number"]
STRATEGIES: tuple[Strategy, ...] = ("boxed", "answer_is", "hash", "last_number")
#: Strategies that show the model *stated* a final answer: the format reward's default. last_number
#: is left out because nearly every completion contains some number.
STATED_STRATEGIES: tuple[Strategy, ...] = ("boxed", "answer_is", "hash")

_BOX = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_IS = re.compile(r"\b(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_HASH = re.compile(r"####")
# A number: optional sign, digits with optional thousands commas, optional decimals, or a bare ".5".
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])|(?<![\w\d])-?\.\d+")
# A number at the start of an answer, taken alone only when what follows cannot continue an
# expression: "18 eggs." and "$1,200 per month" are numbers, "3/4", "2^10" and "5x" are not.
_LEADING_NUMBER = re.compile(r"^\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?=\s|$|[.;!?)%*$]|:(?!\d)|,(?!\s*\d))")
# What after a number shows it is the start of an expression ("3 * 10", "18 x 2"), not the answer.
_CONTINUED = re.compile(r"\s*(?:[-+*/×÷^]|[xX]\s)\s*[\d(]")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MATH_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


@dataclass(frozen=True)
class Extraction:
    """An extracted answer and the strategy that found it (for metrics: which format the model uses)."""

    answer: str
    strategy: Strategy


def extract_answer(text: str, strategies: Sequence[Strategy] = STRATEGIES) -> Extraction | None:
    """The completion's final answer by the first strategy (in `strategies` order) that finds one."""
    for name in strategies:
        found = EXTRACTORS[name](text)
        if found:
            return Extraction(found, name)
    return None


def validate_strategies(strategies: Iterable[str]) -> tuple[Strategy, ...]:
    """The strategies as a tuple; ValueError naming the valid ones for an unknown or repeated name."""
    out: list[Strategy] = []
    for name in strategies:
        if name not in EXTRACTORS:
            raise ValueError(f"unknown answer extraction strategy {name!r}; use any of {', '.join(STRATEGIES)}")
        if name in out:
            raise ValueError(f"extraction strategy {name!r} is listed twice; list each once, in the order to try")
        out.append(name)  # type: ignore[arg-type]
    if not out:
        raise ValueError(f"no extraction strategy given; list one or more of {', '.join(STRATEGIES)}")
    return tuple(out)


# ---- strategies ---------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed N`), or None.

    Braces nest (`\\boxed{\\frac{1}{2}}`); an unclosed box (a completion cut by the length limit)
    is skipped in favour of an earlier complete one.
    """
    for match in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, match.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def _box_content(text: str, i: int) -> str | None:
    if i < len(text) and text[i] == " ":  # "\boxed 5": TeX takes the next token as the argument
        rest = text[i:].lstrip(" ")
        token = re.match(r"[^\s$]+", rest)
        return token.group(0) if token and not rest.startswith("{") else _box_content(text, i + 1)
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif text[j] == "}" and text[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def answer_is(text: str) -> str | None:
    """What follows the last "the answer is" / "final answer:" on its line, cleaned (see `clean_answer`)."""
    matches = list(_ANSWER_IS.finditer(text))
    for match in reversed(matches):
        tail = text[match.end():].split("\n", 1)[0]
        found = clean_answer(tail)
        if found:
            return found
    return None


def hash_answer(text: str) -> str | None:
    """What follows the last `####` on its line, cleaned."""
    for match in reversed(list(_HASH.finditer(text))):
        found = clean_answer(text[match.end():].split("\n", 1)[0])
        if found:
            return found
    return None


def last_number(text: str) -> str | None:
    """The last number in the text, thousands commas removed ("1,000" -> "1000")."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


EXTRACTORS: dict[Strategy, Callable[[str], str | None]] = {
    "boxed": last_boxed,
    "answer_is": answer_is,
    "hash": hash_answer,
    "last_number": last_number,
}


def clean_answer(tail: str) -> str | None:
    """The answer in the text after an answer marker, or None when nothing answer-like is there.

    Read within the marker's sentence: a boxed answer wins; math delimiters are unwrapped
    (`$\\frac{1}{2}$`, while `$12` is a price); a worked equation gives what follows its last "="
    ("3 * 10 = 30" -> "30"); a leading number is taken alone when no expression continues it
    ("$1,200 per month." -> "1200", but "3/4" and "1:2" stay whole); else the sentence, trimmed.
    """
    text = tail.strip().lstrip(":").strip()
    if not text:
        return None
    if re.match(r"[\s$]*(?:\\[(\[])?\s*\\(?:boxed|fbox)", text):  # "The answer is $\boxed{7}$"
        boxed = last_boxed(text)
        if boxed:
            return boxed
    if not re.match(r"\$\s*\d", text):  # "$12" is a price, not the start of a math span
        for open_, close in _MATH_DELIMS:
            end = text.find(close, len(open_)) if text.startswith(open_) else -1
            if end > len(open_):
                inner = text[len(open_):end].strip().rstrip(".").strip()
                inner = inner.rsplit("=", 1)[-1].strip() if "=" in inner and "\\" not in inner else inner
                return inner.replace(",", "") if _PLAIN_NUMBER.fullmatch(inner) else inner
    sentence = re.split(r"\.(?:\s|$)", text, maxsplit=1)[0]
    if "=" in sentence:
        sentence = sentence.rsplit("=", 1)[1]
    sentence = sentence.strip().rstrip(".,;!").strip().strip("*").strip()
    number = _LEADING_NUMBER.match(sentence)
    if number and not _CONTINUED.match(sentence, number.end()):
        return number.group(1).replace(",", "")
    return sentence or None


# ---- reference answers --------------------------------------------------------------------------

def gsm8k_reference(solution: str) -> str:
    """GSM8K's answer: the number after the last `####`, commas removed. ValueError when there is none."""
    matches = list(_HASH.finditer(solution))
    if not matches:
        raise ValueError("no '#### <answer>' line in the GSM8K solution")
    answer = solution[matches[-1].end():].strip().split("\n", 1)[0].strip()
    answer = answer.replace(",", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", answer):
        raise ValueError(f"the GSM8K answer after '####' is not a number: {answer!r}")
    return answer


def math_reference(solution: str) -> str:
    """MATH's answer: the content of the solution's last complete `\\boxed{}`. ValueError when there is none."""
    answer = last_boxed(solution)
    if answer is None:
        raise ValueError("no complete \\boxed{...} in the MATH solution")
    return answer


def number_reference(value: str | float | int) -> str:
    """A numeric answer column (SVAMP's 145.0, MAWPS's 43.0, ASDiv's "9 (apples)" and "5/2") as a plain number.

    Whole floats lose their ".0" so that string comparison and math-verify agree with "145".
    """
    text = str(value).strip()
    fraction = re.fullmatch(r"(-?)\(?(\d+/\d+)\)?", text.replace(" ", ""))
    if fraction:  # ASDiv's "5/2" and "-(1/3)"
        return fraction.group(1) + fraction.group(2)
    number = _LEADING_NUMBER.match(text)
    if number is None:
        raise ValueError(f"the reference answer {text!r} does not start with a number")
    answer = number.group(1).replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", answer):
        answer = answer.split(".")[0]
    return answer


ReferenceKind = Literal["gsm8k", "math", "number", "plain"]
REFERENCE_EXTRACTORS: dict[ReferenceKind, Callable[[str], str]] = {
    "gsm8k": gsm8k_reference,
    "math": math_reference,
    "number": number_reference,
    "plain": lambda value: str(value).strip(),
}
