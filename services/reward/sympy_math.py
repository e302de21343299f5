"""Math answer equivalence with sympy alone: the fallback when math-verify is not installed.

Smaller than math-verify on purpose: it reads the final answer from `\\boxed{...}`, else from the
text after the last "answer is" / "answer:", else the last number in the text; understands a
little LaTeX (\\frac, \\sqrt, \\cdot, \\times, ^, \\pi, \\left/\\right); and calls two answers
equal when their difference simplifies to 0 or they agree numerically to 1e-6 (relative).

`sympy.parse_expr` evaluates Python, so text reaches it only after a whitelist: digits, operators,
parentheses, commas and a fixed set of names (single letters are symbols). No attribute access,
no builtins. Pathological sizes (9^9^9^9) are left to the worker pool's hard timeout.
"""

from __future__ import annotations

import re

_ALLOWED_NAMES = frozenset({"sqrt", "pi", "exp", "log", "ln", "sin", "cos", "tan", "oo"})
_SAFE_CHARS = re.compile(r"[0-9A-Za-z+\-*/^().,\s]*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_LATEX = [
    (re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}"), r"((\1)/(\2))"),
    (re.compile(r"\\sqrt\{([^{}]*)\}"), r"sqrt(\1)"),
    (re.compile(r"\\(?:cdot|times)"), "*"),
    (re.compile(r"\\(?:left|right|,|!|;|displaystyle)"), ""),
    (re.compile(r"\\pi"), "pi"),
    (re.compile(r"\\infty"), "oo"),
]
MAX_CHARS = 300


def final_answers(text: str) -> list[str]:
    """Candidates for the final answer, best first: the last \\boxed{...}; else the text after the last
    "answer is" / "answer:"; else the whole text (when it is one expression, e.g. "2^10") then its last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return [boxed]
    m = list(re.finditer(r"answer\s*(?:is|:)\s*", text, flags=re.IGNORECASE))
    if m:
        tail = text[m[-1].end():].strip().strip("$").rstrip(".").strip()
        return [tail.splitlines()[0]] if tail else []
    numbers = _NUMBER.findall(text)
    return [text.strip(), *numbers[-1:]]


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def to_expr(text: str):  # -> sympy.Expr
    """Parse a (lightly LaTeX) answer into a sympy expression; ValueError if it is not one we accept."""
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    s = text.strip().strip("$").strip().rstrip(".")
    for pattern, repl in _LATEX:
        s = pattern.sub(repl, s)
    s = s.replace("{", "(").replace("}", ")")
    if not s or len(s) > MAX_CHARS or not _SAFE_CHARS.fullmatch(s):
        raise ValueError(f"not a plain math answer: {text[:80]!r}")
    if re.search(r"\.\s*[A-Za-z_]", s):
        raise ValueError(f"attribute access is not allowed: {text[:80]!r}")
    for name in re.findall(r"[A-Za-z_]\w*", s):
        if len(name) > 1 and name not in _ALLOWED_NAMES:
            raise ValueError(f"unknown name {name!r} in {text[:80]!r}")
    s = s.replace("ln(", "log(")
    namespace: dict[str, object] = {}
    exec("from sympy import *", namespace)  # sympy's names only, and no builtins for the parsed text
    namespace["__builtins__"] = {}
    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor)
    return parse_expr(s, local_dict={}, global_dict=namespace, transformations=transformations)


def sympy_equal(completion: str, answer: str) -> bool:
    """Whether the completion's final answer equals `answer`; ValueError if `answer` itself cannot be parsed."""
    import sympy

    gold = to_expr(answer)
    pred = None
    for candidate in final_answers(completion):
        try:
            pred = to_expr(candidate)
            break
        except (ValueError, SyntaxError, TypeError, sympy.SympifyError):
            continue
    if pred is None:
        return False
    try:
        if sympy.simplify(pred - gold) == 0:
            return True
        a, b = complex(sympy.N(pred)), complex(sympy.N(gold))
    except (TypeError, ValueError, AttributeError):
        return False
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))
