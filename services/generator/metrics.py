"""The generator's own Prometheus metrics (the runtime adds per-RPC counts and latencies)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.generator.backend import GeneratedSample

_POW2 = tuple(float(2**i) for i in range(11))  # 1 .. 1024


class GeneratorMetrics:
    """Metrics of one generator, registered on the role's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens_generated = Counter(
            "quartet_generator_tokens_generated", "Completion tokens sampled.", registry=registry)
        self.sequences = Counter("quartet_generator_sequences", "Completions sampled.", registry=registry)
        self.batch_sequences = Histogram(
            "quartet_generator_batch_sequences", "Sequences (prompts x samples) per backend batch.",
            buckets=_POW2, registry=registry)
        self.batch_requests = Histogram(
            "quartet_generator_batch_requests", "Generate calls merged into one backend batch.",
            buckets=_POW2, registry=registry)
        self.tokens_per_second = Gauge(
            "quartet_generator_tokens_per_second", "Completion tokens per second of the last batch.",
            registry=registry)
        self.queue_depth = Gauge(
            "quartet_generator_queue_depth", "Generate calls waiting for a batch.", registry=registry)
        self.weight_version = Gauge(
            "quartet_generator_weight_version", "Weight version now served (0 = as loaded).", registry=registry)
        self.weight_update_seconds = Histogram(
            "quartet_generator_weight_update_seconds", "Seconds per successful UpdateWeights (receive + apply).",
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100), registry=registry)
        self.weight_update_bytes = Counter(
            "quartet_generator_weight_update_bytes", "Tensor bytes received by successful UpdateWeights.",
            registry=registry)
        self.weight_update_failures = Counter(
            "quartet_generator_weight_update_failures", "Weight updates refused or interrupted, by reason (the "
            "error type; shm_<type> for UpdateWeightsShared, shm_disabled when the option refuses it).",
            ["reason"], registry=registry)
        self.weight_updates = Counter(
            "quartet_generator_weight_updates", "Weight updates applied, by transport: grpc (the UpdateWeights "
            "stream) or shm (UpdateWeightsShared, same-host shared memory).", ["transport"], registry=registry)

    def observe_batch(self, results: list[list[GeneratedSample]], seconds: float) -> None:
        """Record one backend batch: `results` per request, `seconds` of wall time."""
        sequences = sum(len(r) for r in results)
        tokens = sum(len(s.token_ids) for r in results for s in r)
        self.tokens_generated.inc(tokens)
        self.sequences.inc(sequences)
        self.batch_sequences.observe(sequences)
        self.batch_requests.observe(len(results))
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)
