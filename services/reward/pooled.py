"""Rule and plugin backends: both score text in the worker pool (`verify.VerifierPool`).

They differ only in what an error means. A rule that raises or crashes on one sample marks that
sample failed (failure_reward) and the call succeeds; a plugin that raises or crashes is a bug in
the plugin, so the call fails with INTERNAL naming it. A timeout is the same for both: the sample
(or the plugin call's samples) gets failure_reward and failed=True, counted, never silent.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from services.reward.backend import RewardBackend, RewardBatch, RewardMetrics, RewardResult
from services.reward.options import Options
from services.reward.plugin import load_plugin
from services.reward.rule import RuleSettings, resolve_math_engine
from services.reward.verify import ScorerSpec, Unit, UnitOutcome, VerifierPool

log = logging.getLogger(__name__)


class PoolBackend(RewardBackend):
    """Splits a batch into units, runs them in the pool, maps outcomes to rewards and failed flags."""

    unit_size = 1

    def __init__(self, spec: ScorerSpec, options: Options, metrics: RewardMetrics) -> None:
        super().__init__(metrics, max_batch=options.max_batch)
        self.options = options
        self.pool = VerifierPool(
            spec, workers=options.workers, timeout_seconds=options.timeout_seconds,
            on_restart=lambda reason: metrics.restarts.labels(reason).inc(),
        )

    def start(self) -> None:
        """Start the worker processes (they import the rule or plugin now, not on the first call)."""
        try:
            self.pool.start(self.options.startup_timeout_seconds)
        except RuntimeError as e:
            raise RuntimeError(f"reward backend {self.identity}: {e}") from e

    def close(self) -> None:
        self.pool.close()

    def compute(self, batch: RewardBatch) -> RewardResult:
        n, k = len(batch), self.unit_size
        units: list[Unit] = [
            (batch.prompt_text[i:i + k], batch.completion_text[i:i + k], batch.metadata[i:i + k])
            for i in range(0, n, k)
        ]
        rewards: list[float] = []
        failed: list[bool] = []
        for unit, outcome in zip(units, self.pool.run(units), strict=True):
            size = len(unit[0])
            if outcome.status == "ok":
                if len(outcome.values) != size:
                    raise self.error("invalid_output", f"returned {len(outcome.values)} rewards for {size} samples")
                rewards.extend(outcome.values)
                failed.extend([False] * size)
                continue
            self.on_failure(outcome, size)
            rewards.extend([self.options.failure_reward] * size)
            failed.extend([True] * size)
        return RewardResult(rewards=rewards, failed=failed)

    def on_failure(self, outcome: UnitOutcome, size: int) -> None:
        """Count a unit that timed out, raised or crashed (subclasses may raise instead)."""
        if outcome.status == "timeout":
            self.metrics.timeouts.labels(self.kind).inc(size)
            self.metrics.failed.labels(self.kind, "timeout").inc(size)
            return
        reason = "verifier_error" if outcome.status == "error" else "worker_crash"
        log.warning("%s: %d sample(s) scored failure_reward after %s: %s", self.identity, size, reason, outcome.error)
        self.metrics.errors.labels(self.kind, reason).inc(size)
        self.metrics.failed.labels(self.kind, reason).inc(size)

    def info(self) -> dict[str, str]:
        return {"workers": str(self.options.workers), "timeout_seconds": str(self.options.timeout_seconds),
                "failure_reward": str(self.options.failure_reward)}


class RuleBackend(PoolBackend):
    """A built-in rule (options.rule) scored in worker processes."""

    kind = "rule"

    def __init__(self, options: Options, metrics: RewardMetrics) -> None:
        engine = options.math_engine
        if options.rule == "math":
            engine = resolve_math_engine(options.math_engine)  # refuse at start-up, not on the first call
        settings = RuleSettings(
            name=options.rule, answer_key=options.answer_key, correct_reward=options.correct_reward,
            incorrect_reward=options.incorrect_reward, math_engine=engine, format_regex=options.format_regex,
            min_chars=options.min_chars, max_chars=options.max_chars, extract=tuple(options.extract or ()),
        )
        self.identity = f"rule:{options.rule}"
        self.engine = engine if options.rule == "math" else ""
        if options.rule in ("arithmetic", "math"):
            self.required_metadata = (options.answer_key,)
        super().__init__(ScorerSpec("services.reward.rule:make_rule_scorer", asdict(settings)), options, metrics)

    def info(self) -> dict[str, str]:
        extra = {"rule": self.options.rule, "answer_key": self.options.answer_key}
        if self.engine:
            extra["math_engine"] = self.engine
        return {**super().info(), **extra}


class PluginBackend(PoolBackend):
    """A user's `module:function` scored in worker processes."""

    kind = "plugin"

    def __init__(self, options: Options, metrics: RewardMetrics) -> None:
        assert options.plugin is not None  # Options guarantees it for kind=plugin
        self.target = options.plugin
        self.identity = f"plugin:{options.plugin}"
        self.unit_size = options.plugin_batch_size
        load_plugin(options.plugin, options.plugin_path)  # fail fast, in the service process, at start-up
        paths = (options.plugin_path,) if options.plugin_path else ()
        spec = ScorerSpec("services.reward.plugin:make_plugin_scorer", {"target": options.plugin}, paths)
        super().__init__(spec, options, metrics)

    def on_failure(self, outcome: UnitOutcome, size: int) -> None:
        if outcome.status == "error":
            raise self.error("plugin_error", f"raised {outcome.error}")
        if outcome.status == "crash":
            raise self.error("plugin_crash", f"crashed its worker process ({outcome.error})")
        super().on_failure(outcome, size)

    def info(self) -> dict[str, str]:
        return {**super().info(), "plugin": self.target, "plugin_batch_size": str(self.unit_size)}
