"""Options of the reward role: which backend scores, and its limits.

Kept apart from the backends so that worker processes (which import this package) never pull in
torch or gRPC, only pydantic.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Options(BaseModel):
    """Reward role options (`quartet serve reward --set options.kind=plugin ...`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["rule", "model", "plugin"] = Field(
        "rule", description="Backend: a built-in rule, a sequence-classification reward model "
        "(loaded from --model), or a user's Python function (options.plugin).")
    rule: Literal["arithmetic", "math", "format", "final_answer"] = Field(
        "arithmetic", description="Built-in rule for kind=rule: arithmetic (the completion's leading "
        "integer equals the answer), math (answer equivalence with math-verify, else sympy), format "
        "(the completion matches format_regex and the length bounds), final_answer (the completion states "
        "a final answer by one of the extract strategies: a format reward).")
    extract: list[Literal["boxed", "answer_is", "hash", "last_number"]] | None = Field(
        None, description="Answer extraction, tried in order: boxed (last \\boxed{}), answer_is (after "
        "'the answer is'), hash (after '####'), last_number. For rule=math: compare only the extracted "
        "answer (unset: math-verify reads the whole completion). For rule=final_answer: what counts as a "
        "stated answer (unset: boxed, answer_is, hash).")
    plugin: str | None = Field(
        None, description="For kind=plugin: 'module:function', imported once at start-up. The function "
        "takes (prompts, completions, metadata) lists and returns one float per sample.")
    plugin_path: str | None = Field(
        None, description="Directory prepended to sys.path before importing the plugin module (e.g. the "
        "folder holding my_rewards.py). Unset: the module must already be importable.")
    plugin_batch_size: int = Field(
        1, ge=1, description="Samples per plugin call. The timeout of a call is timeout_seconds times its "
        "samples, and a call that times out fails all of them: 1 gives exact per-sample timeouts.")
    answer_key: str = Field(
        "answer", min_length=1, description="Metadata key holding the reference answer (arithmetic and math rules).")
    timeout_seconds: float = Field(
        2.0, gt=0, le=3600, description="Hard limit per sample for rules and plugins; a sample past it is "
        "scored failure_reward, marked failed, counted in quartet_reward_timeouts_total, and its worker "
        "process is killed and replaced.")
    workers: int = Field(
        2, ge=1, le=256, description="Worker processes running rules or plugins (unused for kind=model).")
    failure_reward: float = Field(
        0.0, description="Reward of a sample whose verifier timed out, raised or crashed (failed=True).")
    correct_reward: float = Field(1.0, description="Reward when a rule's check passes.")
    incorrect_reward: float = Field(0.0, description="Reward when a rule's check fails.")
    math_engine: Literal["auto", "math_verify", "sympy"] = Field(
        "auto", description="Math rule engine: auto (math-verify if installed, else sympy), or force one.")
    format_regex: str = Field(
        r"-?\d+", description="Format rule: Python regex the whole completion (stripped of surrounding "
        "whitespace) must match (re.fullmatch, DOTALL).")
    min_chars: int = Field(1, ge=0, description="Format rule: fewest characters in the stripped completion.")
    max_chars: int = Field(
        0, ge=0, description="Format rule: most characters in the stripped completion (0 = no limit).")
    max_batch: int = Field(
        4096, ge=1, description="Most samples in one Score call; larger calls get INVALID_ARGUMENT.")
    max_concurrent: int = Field(
        16, ge=1, description="Score calls running at once; one more gets RESOURCE_EXHAUSTED at once (retry with "
        "backoff). Calls share the worker pool or the model, so more at once would only queue behind each other.")
    model_batch_size: int = Field(
        16, ge=1, description="Kind=model: sequences per forward pass.")
    model_max_tokens: int = Field(
        2048, ge=8, description="Kind=model: longer prompt+completion texts keep their last tokens (left truncation).")
    startup_timeout_seconds: float = Field(
        120.0, gt=0, description="How long worker processes may take to start and import their rule or plugin.")

    @model_validator(mode="after")
    def _consistent(self) -> Options:
        for name in ("failure_reward", "correct_reward", "incorrect_reward"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.kind == "plugin":
            if not self.plugin:
                raise ValueError("kind=plugin needs options.plugin='module:function', e.g. 'my_rewards:score'")
            module, sep, fn = self.plugin.partition(":")
            if not sep or not module.strip() or not fn.strip():
                raise ValueError(f"plugin={self.plugin!r} must be 'module:function', e.g. 'my_rewards:score'")
        elif self.plugin or self.plugin_path:
            raise ValueError(f"plugin/plugin_path are set but kind={self.kind!r}; set kind=plugin or drop them")
        try:
            re.compile(self.format_regex)
        except re.error as e:
            raise ValueError(f"format_regex={self.format_regex!r} is not a valid regex: {e}") from e
        if self.extract is not None:
            if self.kind != "rule" or self.rule not in ("math", "final_answer"):
                raise ValueError("extract applies to kind=rule with rule=math or rule=final_answer; drop it or change rule")
            if not self.extract or len(set(self.extract)) != len(self.extract):
                raise ValueError(f"extract={self.extract} must list one or more strategies, each once, in the order to try")
        if self.max_chars and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars={self.max_chars} is below min_chars={self.min_chars}; raise it or set 0")
        return self
