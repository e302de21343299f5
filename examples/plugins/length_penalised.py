"""Example reward plugin: correctness with a small penalty for long completions.

Serve it with the reward role (no install needed; plugin_path puts this folder on sys.path):

    quartet serve reward --set options.kind=plugin \
        --set options.plugin=length_penalised:score \
        --set options.plugin_path=examples/plugins

The contract every plugin follows (services/reward/plugin.py):

- One plain function `score(prompts, completions, metadata) -> list[float]`: three lists of the
  same length B (prompt texts, completion texts, and each sample's dataset columns as a
  dict[str, str]); it returns B finite floats, in order.
- It is imported once at start-up, in the service and in each worker process, and called from a
  worker process with a hard timeout (options.timeout_seconds per sample). Keep it a pure
  function of its inputs: no state is shared between workers or kept between calls.
- Raising, returning NaN or the wrong number of values fails that Score call with INTERNAL naming
  the plugin; running past the timeout scores the samples options.failure_reward, failed=True.

This one gives 1 for a completion whose leading integer equals metadata["answer"] (the arithmetic
task) and 0 otherwise, minus 0.01 per character beyond the answer's own length, floored at -0.5:
a correct answer followed by rambling earns less than a clean one.
"""

from __future__ import annotations

import re

PENALTY_PER_CHAR = 0.01
MAX_PENALTY = 0.5
_LEADING_INT = re.compile(r"\s*(-?\d+)")


def _leading_int(text: str) -> int | None:
    m = _LEADING_INT.match(text)
    return int(m.group(1)) if m else None


def score(prompts: list[str], completions: list[str], metadata: list[dict[str, str]]) -> list[float]:
    """Length-penalised correctness, one float per sample."""
    rewards = []
    for completion, meta in zip(completions, metadata, strict=True):
        answer = meta.get("answer", "").strip()
        got = _leading_int(completion)
        correct = got is not None and answer.lstrip("-").isdigit() and got == int(answer)
        extra = max(0, len(completion.strip()) - len(answer))
        rewards.append((1.0 if correct else 0.0) - min(MAX_PENALTY, PENALTY_PER_CHAR * extra))
    return rewards
