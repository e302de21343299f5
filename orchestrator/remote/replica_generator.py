"""Several generator replicas behind GeneratorClient's interface (info, generate, update_weights).

Invariant: every admitted replica serves `version`, the weight version the trainer last pushed.
`update_weights` sends the weights to every admitted replica and to every removed one that answers
GetInfo since it was taken out (a background probe, ReplicaSet.collect), all at once in threads,
and the answer comes back only when each has confirmed (or failed and been removed): the step's Generate that follows sees one version everywhere. A replica that
comes back after a failure or a restart is admitted only by such a push (or when GetInfo shows it
already serves `version`, e.g. after a network partition): the orchestrator keeps no copy of the
weights to send outside a push, and the policy's own tensors may already be ahead of `version`.

Generate splits the prompts over the admitted replicas (orchestrator/remote/sharding.py) and sends
each slice with `prompt_index_offset` = its first prompt's index, so sample j of prompt i is seeded
from (seed, i, j) whichever replica draws it: the samples are bit-identical to one generator's. A
slice answered with another weight version (the replica restarted in between) counts as a failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from orchestrator.remote.client_base import Samples, ServiceInfo, WeightSync
from orchestrator.remote.clients import GeneratorClient
from orchestrator.remote.replicas import Replica, ReplicaSet, first_answer
from orchestrator.remote.retry import ServiceError

log = logging.getLogger("quartet.orchestrator.replicas")
# Added to a replica's push bound (push_limit_s) for scheduling on a loaded host.
PUSH_SLACK_S = 10.0


class ReplicaGenerator:
    """The generator role over a ReplicaSet of GeneratorClients; the step calls it like one client."""

    role = "generator"

    def __init__(self, replicas: ReplicaSet[GeneratorClient]) -> None:
        self.replicas = replicas
        self.name = replicas.name
        self.version: int | None = None  # set by the first info(): the newest version a replica serves
        self._started = False

    def _current(self, r: Replica, info: ServiceInfo) -> bool:
        return info.weight_version == self.version

    def info(self, *, retry: bool = True) -> ServiceInfo:
        """GetInfo of the admitted replicas (all of them the first time, with retries: they may be starting).

        Replicas serving another version are taken out until the next push. When none serves the current
        version but some answer (all restarted), one of their answers is returned: its other weight version
        makes the caller re-send the weights (WeightKeeper), and that push admits every replica that takes it.
        """
        rs = self.replicas
        asked = rs.admitted() if self._started else list(rs.replicas)
        infos = rs.probe(asked, retry=retry)
        if not self._started and infos:
            # Replicas left by another run may disagree: the newest stands, the others get the next push.
            self.version = max(i.weight_version for i in infos.values())
        self._started = True
        for r in asked:
            info = infos.get(r.address)
            if info is None:
                continue
            if info.weight_version == self.version:
                rs.admit(r, info)
            else:
                rs.remove(r, f"serves weight version {info.weight_version}, the replica set {self.version}: it "
                             "gets the weights at the next update", answered=info)
        infos.update(rs.refresh(accept=self._current))
        if not rs.admitted() and infos:
            return next(iter(infos.values()))
        return first_answer(rs, infos)

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> WeightSync:
        """Push `version` to every admitted replica and every removed one that answered GetInfo since, in parallel.

        Returns when each has confirmed or failed (failed ones are taken out); ServiceError when none took it.
        `seconds` is the wall time of the whole fan-out, `bytes` the sum over the replicas.
        """
        rs = self.replicas
        rs.collect()
        back = {r.address: r.answered for r in rs.removed() if r.answered is not None}
        targets = rs.admitted() + [r for r in rs.removed() if r.address in back]
        start = time.perf_counter()
        futures = [(r, rs.pool.submit(r.client.update_weights, named_tensors, version)) for r in targets]
        syncs, errors = [], []
        for r, fut in futures:
            limit = push_limit_s(r.client)
            try:
                try:
                    sync = fut.result(timeout=limit)
                except FutureTimeout:
                    raise ServiceError(r.client.name, "UpdateWeights", f"no answer within {limit:.0f} s (every attempt's "
                                       "deadline and the retry budget); taken out") from None
            except ServiceError as e:
                r.stats.failures["UpdateWeights"] = r.stats.failures.get("UpdateWeights", 0) + 1
                rs.remove(r, str(e))
                errors.append(f"{r.address}: {e}")
                continue
            r.stats.calls["UpdateWeights"] = r.stats.calls.get("UpdateWeights", 0) + 1
            r.stats.sync_seconds = sync.seconds
            rs.admit(r, back.get(r.address))
            syncs.append(sync)
        seconds = time.perf_counter() - start
        if not syncs:
            raise ServiceError(self.name, "UpdateWeights", "no replica took the weights: " +
                               ("; ".join(errors) or "none answers GetInfo"))
        self.version = version
        transports = ",".join(sorted({s.transport for s in syncs}))
        return WeightSync(version, syncs[0].tensors, sum(s.bytes for s in syncs), seconds, transports)

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], *, n: int, temperature: float, top_p: float, top_k: int,
        max_new_tokens: int, stop_token_ids: Sequence[int], seed: int, request_id: str, prompt_index_offset: int = 0,
        stop: Sequence[str] = (),
    ) -> Samples:
        """GeneratorClient.generate with the prompts split over the admitted replicas; prompt-major answer."""
        version = self.version

        def part(client: GeneratorClient, rows: range) -> Samples:
            s = client.generate(
                prompt_ids[rows.start:rows.stop], n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, seed=seed, request_id=request_id,
                prompt_index_offset=prompt_index_offset + rows.start, stop=stop)
            if s.weight_version != version:
                raise ServiceError(client.name, "Generate", f"sampled with weight version {s.weight_version}, the "
                                                            f"replica set serves {version} (it restarted)")
            return s

        parts = self.replicas.run_split("Generate", len(prompt_ids), part)
        return Samples(
            completion_ids=[row for p in parts for row in p.completion_ids],
            logprobs=[row for p in parts for row in p.logprobs],
            finished=[f for p in parts for f in p.finished],
            texts=[t for p in parts for t in p.texts],
            weight_version=int(version if version is not None else parts[0].weight_version),
        )

    def close(self) -> None:
        self.replicas.close()


def push_limit_s(client) -> float | None:
    """The longest one replica's weight push can take when every deadline holds: each attempt to its
    deadline plus the GetInfo that checks a refused retry, and the retry budget's backoffs. A push still
    running after that is given up on, so one replica whose call never returns cannot stall the run.
    None (no bound) for a client without deadlines."""
    deadline, retry = getattr(client, "weights_deadline_s", None), getattr(client, "retry", None)
    if deadline is None or retry is None:
        return None
    info = getattr(client, "info_deadline_s", 10.0)
    return retry.max_attempts * (deadline + info) + retry.budget_s + PUSH_SLACK_S
