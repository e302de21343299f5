"""Held-out evaluation: greedy pass@1 of the policy, scored by the reward's own answer rule.

One implementation for both uses: `quartet train` (eval: every N steps, through the generator service,
whose weights are the policy's after the step's sync) and `quartet eval` (a model directory, through the
generator backend in process). Both hand `Evaluator` a `generate(prompts, max_new_tokens)` function.

What is measured, over the first max_samples eval rows:
- accuracy: the rule says correct (math: the extracted final answer equals the reference under math-verify,
  else sympy; arithmetic: the leading integer) — the reward service's rule code, run in worker processes with
  a hard timeout per answer (services/reward/verify.py), so reward and accuracy cannot disagree;
- format: the answer is stated (math: `\\boxed{}`, "the answer is", `#### N`; arithmetic: a leading integer);
- length_mean (tokens) and truncated_fraction (stopped by max_new_tokens, not by an end token).

Results go to run_dir/eval.jsonl, one line per evaluation ({"step": N, ...}), not onto the step log's line:
the step's line is written before the evaluation runs, and the evaluation at the start has no step line.
Determinism: greedy decoding with the eval's own seed, no draw from the run's RNG streams, so a run with
evaluation trains exactly as one without. On resume the lines after the checkpoint's step are dropped (those
steps are run again, and so are their evaluations); a step already in the file is not evaluated again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.remote.client_base import Samples
from orchestrator.run.data import PromptRow
from orchestrator.run.metrics import EVAL_GAUGES
from services.common.answers import STATED_STRATEGIES, STRATEGIES, extract_answer
from services.reward.rule import RuleSettings, extract_number, resolve_math_engine
from services.reward.verify import ScorerSpec, VerifierPool

EVAL_LOG = "eval.jsonl"

#: generate(prompt token ids [P], max_new_tokens) -> one greedy sample per prompt.
Generate = Callable[[list[list[int]], int], Samples]


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of the policy after `step` completed steps (0: the starting policy)."""

    step: int
    n: int  # problems evaluated
    accuracy: float  # share the rule scores correct
    format_rate: float  # share that state an answer in the rule's format
    length_mean: float  # mean completion length, tokens
    truncated_fraction: float  # share stopped by max_new_tokens without an end token
    verifier_failures: int  # answers whose check timed out or crashed (counted wrong)
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(step: int, correct: Sequence[bool], formatted: Sequence[bool], lengths: Sequence[int],
              finished: Sequence[bool], *, failures: int = 0, seconds: float = 0.0) -> EvalResult:
    """The rates over N answers: correct, formatted, finished each [N] bools, lengths [N] token counts."""
    n = len(correct)
    if not n or not len(formatted) == len(lengths) == len(finished) == n:
        raise ValueError(f"summarize needs N > 0 answers with every list of length N (got {n}, {len(formatted)}, "
                         f"{len(lengths)}, {len(finished)})")
    return EvalResult(step, n, sum(correct) / n, sum(formatted) / n, sum(lengths) / n,
                      sum(not f for f in finished) / n, failures, seconds)


def due(step: int, *, every: int, at_start: bool, last: int) -> bool:
    """Whether the evaluation runs after `step` completed steps of a run that ends at step `last`."""
    if step == 0:
        return at_start
    return every > 0 and (step % every == 0 or step == last)


def resolve_rule(rule: str, extract: Sequence[str] | None, *, reward: dict[str, Any],
                 dataset_kind: str) -> tuple[str, tuple[str, ...]]:
    """(rule, extraction order) of an eval config: "auto" follows the local reward options (see EvalConfig)."""
    if rule == "auto":
        local = reward.get("rule") if reward.get("kind", "rule") == "rule" else None
        rule = local if local in ("math", "arithmetic") else ("arithmetic" if dataset_kind == "prompts" else "math")
    if extract is None:
        extract = reward.get("extract") if reward.get("rule") == rule else None
    return rule, tuple(extract or STRATEGIES)


class Grader:
    """The rule's verdict on answers: the reward rule's own check, in worker processes with a hard timeout."""

    def __init__(self, rule: str, extract: Sequence[str], *, answer_key: str = "answer", workers: int = 1,
                 timeout_seconds: float = 5.0, math_engine: str = "auto") -> None:
        self.rule, self.answer_key = rule, answer_key
        engine = resolve_math_engine(math_engine) if rule == "math" else math_engine
        settings = RuleSettings(name=rule, answer_key=answer_key, math_engine=engine,
                                extract=tuple(extract) if rule == "math" else ())
        self.pool = VerifierPool(ScorerSpec("services.reward.rule:make_rule_scorer", asdict(settings)),
                                 workers=workers, timeout_seconds=timeout_seconds)
        self.pool.start()

    def correct(self, texts: Sequence[str], metadata: Sequence[dict[str, str]]) -> tuple[list[bool], int]:
        """([N] verdicts, number of answers whose check failed: timed out, raised or crashed; counted wrong)."""
        missing = [i for i, m in enumerate(metadata) if self.answer_key not in m]
        if missing:
            raise ValueError(f"eval rows {missing[:5]} have no {self.answer_key!r} in their metadata; the {self.rule} "
                             "rule needs the reference answer there")
        outcomes = self.pool.run([([""], [t], [dict(m)]) for t, m in zip(texts, metadata, strict=True)])
        verdicts = [o.status == "ok" and o.values[0] > 0.5 for o in outcomes]
        return verdicts, sum(o.status != "ok" for o in outcomes)

    def formatted(self, text: str) -> bool:
        """Whether the answer is stated in the rule's format (the format reward's test for math)."""
        if self.rule == "arithmetic":
            return extract_number(text) is not None
        return extract_answer(text, STATED_STRATEGIES) is not None

    def close(self) -> None:
        self.pool.close()


class Evaluator:
    """Greedy answers to the eval rows through `generate`, graded; `run(step)` is one evaluation."""

    def __init__(self, rows: Sequence[PromptRow], tokenizer: Any, grader: Grader, *, max_samples: int,
                 max_new_tokens: int, batch_size: int = 32) -> None:
        if not rows:
            raise ValueError("the evaluation has no rows")
        self.rows = list(rows[:max_samples] if max_samples else rows)
        missing = [i for i, r in enumerate(self.rows) if grader.answer_key not in r.metadata]
        if missing:  # found now, not after the first step
            raise ValueError(f"eval rows {missing[:5]} have no {grader.answer_key!r} in their metadata: the reference "
                             "answer the rule checks (set dataset.metadata_columns / answer_key)")
        self.prompts = [r.token_ids(tokenizer) for r in self.rows]
        self.grader = grader
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.last: Samples | None = None  # the answers of the last run(), row order

    def answers(self, generate: Generate, on_batch: Callable[[int], None] | None = None) -> Samples:
        """One greedy answer per row, in row order; on_batch(rows done) after each Generate."""
        ids, lps, finished, texts = [], [], [], []
        for start in range(0, len(self.prompts), self.batch_size):
            s = generate(self.prompts[start:start + self.batch_size], self.max_new_tokens)
            ids += s.completion_ids
            lps += s.logprobs
            finished += s.finished
            texts += s.texts
            if on_batch is not None:
                on_batch(len(ids))
        return Samples(ids, lps, finished, texts, s.weight_version)

    def run(self, step: int, generate: Generate, on_batch: Callable[[int], None] | None = None) -> EvalResult:
        """Evaluate the policy `generate` answers with, as of `step` completed steps."""
        started = time.perf_counter()
        s = self.last = self.answers(generate, on_batch)
        correct, failures = self.grader.correct(s.texts, [r.metadata for r in self.rows])
        formatted = [self.grader.formatted(t) for t in s.texts]
        return summarize(step, correct, formatted, [len(c) for c in s.completion_ids], s.finished,
                         failures=failures, seconds=time.perf_counter() - started)

    def close(self) -> None:
        self.grader.close()


class EvalLog:
    """run_dir/eval.jsonl: one EvalResult per line, in step order."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def steps(self) -> set[int]:
        return {int(line["step"]) for line in self.read()}

    def truncate(self, step: int) -> None:
        """Keep only evaluations of steps <= `step` (a resume from that step runs the later ones again)."""
        kept = [line for line in self.read() if int(line["step"]) <= step]
        if self.path.is_file():
            self.path.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in kept))

    def append(self, result: EvalResult) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(result.as_dict(), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True)
class _Greedy:
    """The sampling settings WeightKeeper.generate reads: temperature 0 is the generator's argmax."""

    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


class RunEvaluation:
    """The `eval:` section of a run: evaluates after the due steps through the generator, logs, exports.

    `weights` is the run's WeightKeeper: its generate() checks the generator serves the policy's version
    (re-sending the weights to a generator that restarted) and draws from no RNG of this process.
    """

    def __init__(self, cfg: Any, evaluator: Evaluator, weights: Any, *, metrics: Any = None, reporting: Any = None,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.cfg, self.evaluator, self.weights = cfg, evaluator, weights
        self.metrics, self.reporting, self.say = metrics, reporting, log
        self.eval_log = EvalLog(Path(cfg.run_dir) / EVAL_LOG)
        self.results: list[EvalResult] = []
        self._step = 0

    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> Samples:
        sampling = self.cfg.sampling
        greedy = _Greedy(max_new_tokens, tuple(sampling.stop_token_ids), tuple(sampling.stop))
        return self.weights.generate(prompts, n=1, sampling=greedy, seed=self.cfg.eval.seed, step=self._step)

    def after(self, step: int) -> EvalResult | None:
        """Evaluate after `step` completed steps when due and not already logged (a resumed run)."""
        ev = self.cfg.eval
        if not due(step, every=ev.every, at_start=ev.at_start, last=self.cfg.steps) or step in self.eval_log.steps():
            return None
        self._step = step
        result = self.evaluator.run(step, self._generate)
        self.eval_log.append(result)
        self.results.append(result)
        if self.metrics is not None:
            self.metrics.record_eval(result.as_dict())
        if self.reporting is not None:
            values = result.as_dict()  # report_to takes the Prometheus names, as for the steps
            self.reporting.report(step, {name: float(values[key]) for key, (name, _doc) in EVAL_GAUGES.items()
                                         if key != "step"})
        self.say(f"eval after step {step}: accuracy {result.accuracy:.1%} of {result.n}, format "
                 f"{result.format_rate:.1%}, truncated {result.truncated_fraction:.1%}, {result.length_mean:.1f} "
                 f"tokens, {result.seconds:.1f} s")
        return result

    def close(self) -> None:
        self.evaluator.close()


def grader_for(cfg: Any) -> Grader:
    """The Grader of a run config's eval section (rule resolved against the local reward options)."""
    # The local reward that checks answers (of several, the first math / arithmetic rule) sets the rule's options.
    rewards = [r.options for r in cfg.services.local_options.reward_services()] if cfg.services.local else []
    reward = dict(next((r for r in rewards if r.get("rule") in ("math", "arithmetic")), rewards[0] if rewards else {}))
    rule, extract = resolve_rule(cfg.eval.rule, cfg.eval.extract, reward=reward, dataset_kind=cfg.dataset.kind)
    answer_key = reward.get("answer_key") or cfg.dataset.answer_key
    return Grader(rule, extract, answer_key=answer_key, math_engine=reward.get("math_engine", "auto"))


__all__ = ["EVAL_LOG", "EvalLog", "EvalResult", "Evaluator", "Grader", "RunEvaluation", "due", "grader_for",
           "resolve_rule", "summarize"]
