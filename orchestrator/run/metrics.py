"""The orchestrator's Prometheus endpoint: one gauge per step metric, phase timings, weight sync.

Names follow Prometheus conventions (quartet_ prefix, base units, _total counters, _seconds
durations); the phase is a label, and the reward service identity used at each step is an
info-style gauge (value 1) whose label carries the identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.common.metrics import peak_rss_bytes

PHASES = ("generate", "score", "reference", "values", "update", "value_train", "sync", "checkpoint")

# step-log key -> (metric name, help). Each is a gauge holding the value of the last step.
GAUGES: dict[str, tuple[str, str]] = {
    "step": ("quartet_step", "Last completed step."),
    "kl_ref": ("quartet_kl_reference", "Mean per-token KL of the policy to the reference (estimator of the config)."),
    "policy_loss": ("quartet_policy_loss", "Policy loss of the last update."),
    "value_loss": ("quartet_value_loss", "Clipped value loss reported by the value service."),
    "value_explained_variance": ("quartet_value_explained_variance", "Explained variance of the critic's values "
                                 "on the returns, before its last update (1 = perfect, <= 0 = no better than the mean)."),
    "clipfrac": ("quartet_clip_fraction", "Share of tokens where the PPO/GRPO ratio was clipped."),
    "entropy": ("quartet_entropy", "Mean per-token policy entropy (nats)."),
    "approx_kl": ("quartet_approx_kl", "Approximate KL between the old and the new policy."),
    "trpo_accepted": ("quartet_trpo_accepted", "TRPO: 1 if the last line search accepted a step, else 0."),
    "trpo_backtracks": ("quartet_trpo_line_search_steps", "TRPO: backtracking steps of the last line search."),
    "trpo_final_kl": ("quartet_trpo_final_kl", "TRPO: mean KL of the accepted step."),
    "trpo_step_size": ("quartet_trpo_step_size", "TRPO: step size β scaling the natural-gradient direction."),
    "grad_norm": ("quartet_grad_norm", "Policy gradient norm before clipping."),
    "logprob_gap_mean": ("quartet_logprob_gap", "Mean |generator - trainer| logprob of sampled tokens."),
    "logprob_gap_max": ("quartet_logprob_gap_max", "Max |generator - trainer| logprob of sampled tokens."),
    "tokens_per_second": ("quartet_tokens_per_second", "Generated tokens per second of step wall time."),
    "step_seconds": ("quartet_step_seconds", "Wall time of the last step."),
    "sync_seconds": ("quartet_weight_sync_seconds", "Seconds of the last weight broadcast to the generator."),
    "sync_bytes": ("quartet_weight_sync_last_bytes", "Bytes of the last weight broadcast."),
    "weight_version": ("quartet_weight_version", "Weight version the generator serves."),
    "response_length_mean": ("quartet_response_length_tokens", "Mean completion length in tokens."),
    "group_signal_fraction": ("quartet_group_signal_fraction", "Share of the last step's prompt groups whose "
                              "samples' rewards differ (the groups a group-relative advantage learns from)."),
    "rollout_staleness": ("quartet_rollout_staleness", "Pipelined rollouts: weight versions between the weights "
                          "that sampled the last step and the weights it trained."),
    "is_weight_mean": ("quartet_is_weight_mean", "Mean truncated importance weight min(pi_old / pi_gen, tis_cap)."),
    "is_truncated_fraction": ("quartet_is_truncated_fraction", "Share of tokens whose importance weight was cut "
                              "to tis_cap."),
    "truncated_fraction": ("quartet_truncated_fraction", "Share of the last step's samples that reached "
                           "max_new_tokens without an end token, stop token or stop string."),
}
REWARD_STATS = ("mean", "std", "min", "max")
# EvalResult field -> (metric name, help): the last held-out evaluation (orchestrator/run/evaluation.py).
EVAL_GAUGES: dict[str, tuple[str, str]] = {
    "step": ("quartet_eval_step", "Completed steps when the last evaluation ran (0: the starting policy)."),
    "accuracy": ("quartet_eval_accuracy", "Greedy pass@1 on the held-out problems at the last evaluation."),
    "format_rate": ("quartet_eval_format_rate", "Share of held-out answers stating an answer in the rule's format."),
    "length_mean": ("quartet_eval_response_length_tokens", "Mean held-out answer length in tokens."),
    "truncated_fraction": ("quartet_eval_truncated_fraction", "Share of held-out answers cut by max_new_tokens."),
    "seconds": ("quartet_eval_seconds", "Wall time of the last evaluation."),
}


def stop_fractions(finished: Sequence[bool]) -> dict[str, float]:
    """finished_fraction and truncated_fraction (cut by max_new_tokens) of B samples' [B] finished flags."""
    n = max(1, len(finished))
    return {"finished_fraction": sum(finished) / n, "truncated_fraction": sum(not f for f in finished) / n}


def metric_names(metrics: Mapping[str, float], phases: Mapping[str, float],
                 rewards: Mapping[str, float], components: Mapping[str, float] | None = None) -> dict[str, float]:
    """One step under its Prometheus names, labels folded into the name, for experiment trackers.

    quartet_reward{stat="mean"} -> quartet_reward_mean, quartet_phase_seconds{phase="update"} ->
    quartet_phase_seconds_update, quartet_reward_component_mean{identity="format"} ->
    quartet_reward_component_mean_format (each reward service's own mean); step-log keys without a gauge
    are left out.
    """
    out = {name: float(metrics[key]) for key, (name, _doc) in GAUGES.items() if key in metrics and key != "step"}
    out.update({f"quartet_reward_{stat}": float(rewards[stat]) for stat in REWARD_STATS if stat in rewards})
    out.update({f"quartet_phase_seconds_{phase}": float(s) for phase, s in phases.items()})
    out.update({f"quartet_reward_component_mean_{identity}": float(v) for identity, v in (components or {}).items()})
    return out

# Rejoin action (orchestrator/remote/rejoin.py; key of a step-log line's "recovery") -> (counter name, help).
REJOINS: dict[str, tuple[str, str]] = {
    "weight_resends": ("quartet_weight_resends_total", "Policy weights re-sent to a generator that came back serving "
                       "other weights (it restarted)."),
    "value_reloads": ("quartet_value_reloads_total", "Value saves loaded into a value service that came back behind."),
    "value_lost_train_steps": ("quartet_value_lost_train_steps_total", "Critic TrainSteps lost to value service "
                               "restarts (applied after the last value save)."),
    "rollout_redos": ("quartet_rollout_redos_total", "Step rollouts redone (same seed) after a service rejoined."),
    "stale_rollouts": ("quartet_stale_rollouts_total", "Pipelined rollouts: prefetched samples discarded and drawn "
                       "again (too stale, or from weights the run never served: a restarted generator)."),
    "prefetch_failures": ("quartet_prefetch_failures_total", "Pipelined rollouts: prefetched Generate calls that "
                          "failed (the step then sampled synchronously)."),
}


class ReplicaCollector:
    """Per-replica series of the role replica sets (orchestrator/remote/replicas.py), read at every scrape.

    `sets`: objects with `.role` and `.snapshot()` -> [(address, admitted, ReplicaStats)]. The `address`
    label is the replica's address as the orchestrator dials it (not `replica`: Prometheus sets that target
    label to the scraped process itself, the orchestrator's pod, and would rename a clashing one).
    """

    def __init__(self, sets: Sequence[Any]) -> None:
        self.sets = list(sets)

    def collect(self) -> Iterator[Metric]:
        pair, triple = ["role", "address"], ["role", "address", "method"]
        calls = CounterMetricFamily("quartet_replica_calls", "Calls a replica answered, by method.", labels=triple)
        failures = CounterMetricFamily("quartet_replica_failures", "Calls a replica failed after its retries (it "
                                       "was taken out), by method.", labels=triple)
        share = GaugeMetricFamily("quartet_replica_share", "Fraction of the last split call's items the replica "
                                  "answered.", labels=pair)
        admitted = GaugeMetricFamily("quartet_replica_admitted", "1 while the replica takes work, 0 while it is "
                                     "taken out.", labels=pair)
        removals = CounterMetricFamily("quartet_replica_removals", "Times the replica was taken out.", labels=pair)
        readmissions = CounterMetricFamily("quartet_replica_readmissions", "Times the replica came back and was "
                                           "re-admitted.", labels=pair)
        sync = GaugeMetricFamily("quartet_replica_weight_sync_seconds", "Seconds of the generator replica's last "
                                 "UpdateWeights.", labels=pair)
        for s in self.sets:
            for address, ok, st in s.snapshot():
                for method, n in st.calls.items():
                    calls.add_metric([s.role, address, method], n)
                for method, n in st.failures.items():
                    failures.add_metric([s.role, address, method], n)
                share.add_metric([s.role, address], st.share)
                admitted.add_metric([s.role, address], 1.0 if ok else 0.0)
                removals.add_metric([s.role, address], st.removals)
                readmissions.add_metric([s.role, address], st.readmissions)
                if s.role == "generator":
                    sync.add_metric([s.role, address], st.sync_seconds)
        yield from (calls, failures, share, admitted, removals, readmissions, sync)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no fixed series: the replicas are known only once a run connects


class RunMetrics:
    """Holds the registry and updates it from one step record."""

    def __init__(self, registry: CollectorRegistry | None = None, *, trpo: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        self.trpo = trpo
        r = self.registry
        self.gauges = {key: Gauge(name, doc, registry=r) for key, (name, doc) in GAUGES.items()}
        self.reward = Gauge("quartet_reward", "Reward statistics of the last step's samples.", ["stat"], registry=r)
        self.phase = Gauge("quartet_phase_seconds", "Seconds spent in each phase of the last step.", ["phase"], registry=r)
        self.phase_hist = Histogram(
            "quartet_phase_duration_seconds", "Distribution of per-phase seconds over steps.", ["phase"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.steps = Counter("quartet_steps_total", "Completed steps.", registry=r)
        self.tokens = Counter("quartet_generated_tokens_total", "Generated tokens.", registry=r)
        self.sync_bytes = Counter("quartet_weight_sync_bytes_total", "Bytes broadcast to the generator.", registry=r)
        self.service_restarts = Counter("quartet_service_restarts_total", "Restarts of crashed local services by "
                                        "the embedded launcher.", ["service"], registry=r)
        self.reward_service = Gauge(
            "quartet_reward_service_info", "Reward service identity used at the last step (value 1).",
            ["identity", "weight"], registry=r,
        )
        self.reward_component = Gauge(
            "quartet_reward_component_mean", "Mean of each reward service's own (unweighted) rewards at the last "
            "step; the total reward is the weighted sum.", ["identity"], registry=r,
        )
        self.trpo_ratio = Gauge("quartet_trpo_accepted_ratio", "TRPO: fraction of steps whose line search "
                                "accepted a step, over the run.", registry=r)
        self.peak_rss = Gauge("quartet_peak_rss_bytes", "Peak resident memory of this process (ru_maxrss), in bytes.",
                              ["role"], registry=r)
        self.peak_rss.labels("orchestrator").set_function(peak_rss_bytes)
        self._trpo = [0, 0]  # accepted, steps
        self.rejoins = {key: Counter(name, doc, registry=r) for key, (name, doc) in REJOINS.items()}
        self.eval = {key: Gauge(name, doc, registry=r) for key, (name, doc) in EVAL_GAUGES.items()}
        self.server = None
        self.port: int | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (port 0 = a free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.server = server
        self.port = int(server.server_port)
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def watch_replicas(self, sets: Sequence[Any]) -> None:
        """Expose the per-replica series of these replica sets (see ReplicaCollector)."""
        if sets:
            self.registry.register(ReplicaCollector(sets))

    def rejoin(self, action: str, n: int = 1) -> None:
        """Count a rejoin action (a key of REJOINS) as it happens, not at the step's end."""
        self.rejoins[action].inc(n)

    def record_eval(self, result: Mapping[str, float]) -> None:
        """Set the eval gauges from one evaluation (EvalResult.as_dict())."""
        for key, gauge in self.eval.items():
            gauge.set(float(result[key]))

    def record(self, metrics: Mapping[str, float], phases: Mapping[str, float], rewards: Mapping[str, float],
               reward_services: Mapping[str, float], generated_tokens: int, *,
               components: Mapping[str, float] | None = None) -> None:
        """Update every gauge from one completed step."""
        for key, gauge in self.gauges.items():
            if key in metrics:
                gauge.set(float(metrics[key]))
        for stat in REWARD_STATS:
            if stat in rewards:
                self.reward.labels(stat=stat).set(float(rewards[stat]))
        for name, seconds in phases.items():
            self.phase.labels(phase=name).set(seconds)
            self.phase_hist.labels(phase=name).observe(seconds)
        self.reward_service.clear()
        for identity, weight in reward_services.items():
            self.reward_service.labels(identity=identity, weight=f"{weight:g}").set(1)
        self.reward_component.clear()
        for identity, mean in (components or {}).items():
            self.reward_component.labels(identity=identity).set(mean)
        if self.trpo and "trpo_accepted" in metrics:
            self._trpo[0] += int(metrics["trpo_accepted"] > 0)
            self._trpo[1] += 1
            self.trpo_ratio.set(self._trpo[0] / self._trpo[1])
        self.steps.inc()
        self.tokens.inc(generated_tokens)
        if "sync_bytes" in metrics:
            self.sync_bytes.inc(float(metrics["sync_bytes"]))
