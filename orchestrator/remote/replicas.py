"""Several replicas of one role behind the client interface the step already uses.

`ReplicaSet` keeps the membership: which replicas are admitted (take work) and which were removed
(failed a call after the client's retry policy, or serve stale weights), and brings removed ones
back. Every batch call is cut into contiguous slices sized by the replicas' GetInfo (batch limit
over queue depth, orchestrator/remote/sharding.py), the slices run in parallel threads, and a slice
whose replica failed is redone on the replicas still admitted; the run fails only when none is
left. Answers are reassembled in the original order, so the step sees one role.

Removed replicas are probed again (GetInfo, one attempt) at most every `probe_interval_s`, in the
background: a call starts the probes that are due and takes the answers of those that finished, and
never waits for one (a replica whose host is cut off would otherwise stall a step for the GetInfo
deadline). A reward / reference replica that answered is re-admitted at the next call (stateless); a
generator replica only once it serves the current weight version (replica_generator.py pushes it
the weights first). The value role is not replicated: its critic trains (one writer; see
services_config.ServicesConfig).

`RewardReplicas` and `ReferenceReplicas` are the stateless roles; `ReplicaGenerator` is in
orchestrator/remote/replica_generator.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import torch

from orchestrator.remote.client_base import RoleClient, Scores, ServiceInfo
from orchestrator.remote.retry import ServiceError
from orchestrator.remote.sharding import in_order, replica_weight, split

log = logging.getLogger("quartet.orchestrator.replicas")

C = TypeVar("C", bound=RoleClient)
P = TypeVar("P")

# The request itself is at fault: every replica would refuse it, so it is not redone elsewhere.
REQUEST_FAULTS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})


@dataclass
class ReplicaStats:
    """What the orchestrator's metrics show of one replica (orchestrator/run/metrics.py reads it)."""

    calls: dict[str, int] = field(default_factory=dict)  # method -> calls answered
    failures: dict[str, int] = field(default_factory=dict)  # method -> calls that took the replica out
    share: float = 0.0  # fraction of the items of the last split call this replica answered
    removals: int = 0
    readmissions: int = 0
    sync_seconds: float = 0.0  # generator: seconds of its last UpdateWeights


@dataclass
class Replica(Generic[C]):
    address: str
    client: C
    admitted: bool = False
    reason: str = "not probed yet"  # why it is not admitted
    weight: float = 1.0  # share weight from its last GetInfo (sharding.replica_weight)
    answered: ServiceInfo | None = None  # while removed: its GetInfo since it was taken out (it is reachable)
    stats: ReplicaStats = field(default_factory=ReplicaStats)


class ReplicaSet(Generic[C]):
    """The replicas of one role: membership, probing, and split calls with failover.

    `make_client(address)` builds one replica's client; `resolve()` (DNS discovery) returns the
    addresses now behind the endpoint and is asked again at every probe.
    """

    def __init__(self, role: str, addresses: Sequence[str], make_client: Callable[[str], C], *,
                 probe_interval_s: float = 5.0, resolve: Callable[[], list[str]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not addresses:
            raise ValueError(f"{role}: no replica addresses")
        self.role, self.make_client, self.resolve = role, make_client, resolve
        self.probe_interval_s, self.clock = probe_interval_s, clock
        self.replicas: list[Replica[C]] = [Replica(a, make_client(a)) for a in dict.fromkeys(addresses)]
        self.name = f"{role} replicas ({len(self.replicas)}: {', '.join(r.address for r in self.replicas)})"
        self._lock = threading.Lock()
        self._last_probe = float("-inf")
        self._probes: dict[str, Future[ServiceInfo]] = {}  # address -> background GetInfo of a removed replica
        # Room for one call and one background probe per replica, and for DNS to name more later.
        self.pool = ThreadPoolExecutor(max_workers=max(16, 2 * len(self.replicas)),
                                       thread_name_prefix=f"quartet-{role}-replica")

    # -- membership ------------------------------------------------------------------------------
    def admitted(self) -> list[Replica[C]]:
        with self._lock:
            return [r for r in self.replicas if r.admitted]

    def removed(self) -> list[Replica[C]]:
        with self._lock:
            return [r for r in self.replicas if not r.admitted]

    def admit(self, r: Replica[C], info: ServiceInfo | None) -> None:
        """Let `r` take work; `info` (its latest GetInfo, if any) sets its share weight."""
        if info is not None:
            r.weight = replica_weight(info.max_batch_sequences, info.queue_depth)
        if not r.admitted:
            if r.reason != "not probed yet":
                r.stats.readmissions += 1
                log.warning("%s at %s is back: re-admitted", self.role, r.address)
            r.admitted, r.reason = True, ""
        r.answered = None

    def remove(self, r: Replica[C], reason: str, *, answered: ServiceInfo | None = None) -> None:
        """Take `r` out; `answered`: the GetInfo it just gave (it is reachable, e.g. it serves other weights)."""
        if r.admitted:
            r.stats.removals += 1
            log.warning("%s at %s taken out of the replica set: %s", self.role, r.address, reason)
        r.admitted, r.reason, r.answered = False, reason, answered

    def probe(self, replicas: Sequence[Replica[C]], *, retry: bool) -> dict[str, ServiceInfo]:
        """GetInfo of `replicas` in parallel: address -> info for those that answered (no one is admitted here)."""
        futures = {r.address: self.pool.submit(r.client.info, retry=retry) for r in replicas}
        out = {}
        for r in replicas:
            try:
                out[r.address] = futures[r.address].result()
                r.stats.calls["GetInfo"] = r.stats.calls.get("GetInfo", 0) + 1
            except ServiceError as e:
                r.stats.failures["GetInfo"] = r.stats.failures.get("GetInfo", 0) + 1
                self.remove(r, str(e))
        return out

    def due(self) -> bool:
        """True when removed replicas (and DNS) should be looked at again; starts a new interval."""
        now = self.clock()
        if now - self._last_probe < self.probe_interval_s:
            return False
        self._last_probe = now
        return True

    def rediscover(self) -> None:
        """Add the addresses DNS now names, drop those it no longer names (a failed lookup changes nothing)."""
        if self.resolve is None:
            return
        try:
            found = self.resolve()
        except OSError as e:
            log.warning("%s: DNS lookup failed, keeping %d known replicas: %s", self.role, len(self.replicas), e)
            return
        if not found:
            return
        with self._lock:
            known = {r.address for r in self.replicas}
            gone = [r for r in self.replicas if r.address not in found]
            self.replicas = [r for r in self.replicas if r.address in found]
            self.replicas += [Replica(a, self.make_client(a)) for a in found if a not in known]
        for r in gone:
            self._probes.pop(r.address, None)
            log.warning("%s at %s no longer in DNS: dropped", self.role, r.address)
            r.client.close()

    def collect(self) -> None:
        """Take the answers of the background probes that finished (a removed replica that answered is
        `answered`); when due, rediscover and start probes of the removed replicas. Never waits."""
        for r in self.removed():
            fut = self._probes.get(r.address)
            if fut is None or not fut.done():
                continue
            del self._probes[r.address]
            try:
                r.answered = fut.result()
                r.stats.calls["GetInfo"] = r.stats.calls.get("GetInfo", 0) + 1
            except ServiceError as e:
                r.stats.failures["GetInfo"] = r.stats.failures.get("GetInfo", 0) + 1
                r.reason, r.answered = str(e), None
        if self.due():
            self.rediscover()
            for r in self.removed():
                if r.address not in self._probes:
                    self._probes[r.address] = self.pool.submit(r.client.info, retry=False)

    def refresh(self, accept: Callable[[Replica[C], ServiceInfo], bool] = lambda _r, _i: True) -> dict[str, ServiceInfo]:
        """`collect`, then admit the removed replicas that answered and `accept` takes.

        Returns address -> GetInfo of the replicas it admitted.
        """
        self.collect()
        taken = {}
        for r in self.removed():
            info = r.answered
            if info is not None and accept(r, info):
                self.admit(r, info)
                taken[r.address] = info
        return taken

    def wait_probes(self, timeout: float | None = None) -> None:
        """Block until the background probes now running have finished (or `timeout` passed)."""
        futures_wait(list(self._probes.values()), timeout=timeout)

    # -- split calls -----------------------------------------------------------------------------
    def run_split(self, method: str, n_items: int, call: Callable[[C, range], P]) -> list[P]:
        """`call(client, rows)` over contiguous slices of range(n_items) on the admitted replicas, in parallel.

        A replica whose call fails (after its client's retries) is removed and its slice split again over
        the others. Returns the answers in slice order (the caller concatenates them). Raises the last
        ServiceError when no replica is left, or at once when the request itself is refused.
        """
        parts: list[tuple[range, P]] = []
        pending, last, served = [range(0, n_items)], None, {}
        while pending:
            live = self.admitted()
            if not live:
                raise ServiceError(self.name, method, f"no replica left to serve it (last: {last})",
                                   code=last.code if last else None)
            jobs = [(r, rows) for block in pending for r, rows in zip(live, split(block, [x.weight for x in live]),
                                                                          strict=True) if len(rows)]
            futures = [(r, rows, self.pool.submit(call, r.client, rows)) for r, rows in jobs]
            pending = []
            for r, rows, fut in futures:
                try:
                    parts.append((rows, fut.result()))
                    r.stats.calls[method] = r.stats.calls.get(method, 0) + 1
                    served[r.address] = served.get(r.address, 0) + len(rows)
                except ServiceError as e:
                    if e.code in REQUEST_FAULTS:
                        raise
                    r.stats.failures[method] = r.stats.failures.get(method, 0) + 1
                    self.remove(r, str(e))
                    pending.append(rows)
                    last = e
        for r in self.replicas:
            r.stats.share = served.get(r.address, 0) / max(1, n_items)
        return in_order(parts, n_items)

    def snapshot(self) -> list[tuple[str, bool, ReplicaStats]]:
        """(address, admitted, stats) of every replica, for the metrics."""
        with self._lock:
            return [(r.address, r.admitted, r.stats) for r in self.replicas]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for r in self.replicas:
            r.client.close()


class _Stateless(Generic[C]):
    """A stateless role's replicas: every replica that answers GetInfo takes work."""

    def __init__(self, replicas: ReplicaSet[C]) -> None:
        self.replicas = replicas
        self.name = replicas.name
        self._started = False

    def info(self, *, retry: bool = True) -> ServiceInfo:
        """GetInfo of the admitted replicas (every replica the first time: they may still be starting, so
        with retries) and, when due, one probe of the removed ones; the first admitted one's answer stands
        for the role."""
        rs = self.replicas
        asked = rs.admitted() if self._started else list(rs.replicas)
        self._started = True
        infos = rs.probe(asked, retry=retry)
        for r in asked:
            if r.address in infos:
                rs.admit(r, infos[r.address])
        infos.update(rs.refresh())
        return first_answer(rs, infos)

    def close(self) -> None:
        self.replicas.close()


def first_answer(rs: ReplicaSet, infos: dict[str, ServiceInfo]) -> ServiceInfo:
    """The GetInfo of the first admitted replica that answered; ServiceError listing why each is out when none."""
    for r in rs.admitted():
        if r.address in infos:
            return infos[r.address]
    raise ServiceError(rs.name, "GetInfo", "no replica serves: " +
                       "; ".join(f"{r.address}: {r.reason}" for r in rs.replicas))


def _identity(parts: Sequence[Scores]) -> str:
    """One identity for the role: the replicas' when they agree, else the common part before '@host'."""
    ids = {s.identity for s in parts}
    if len(ids) <= 1:
        return next(iter(ids), "")
    return sorted(ids)[0].split("@", 1)[0] + "@replicas"


class RewardReplicas(_Stateless):
    """RewardClient.score over several reward replicas (one weighted reward service of the run)."""

    def __init__(self, replicas: ReplicaSet, *, weight: float = 1.0, label: str | None = None) -> None:
        super().__init__(replicas)
        self.weight, self.label = weight, label

    def score(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
              prompt_text: Sequence[str], completion_text: Sequence[str], metadata: Sequence[Any]) -> Scores:
        def part(client, rows: range) -> Scores:
            return client.score(prompt_ids[rows.start:rows.stop], completion_ids[rows.start:rows.stop],
                                prompt_text[rows.start:rows.stop], completion_text[rows.start:rows.stop],
                                metadata[rows.start:rows.stop])

        self.replicas.refresh()
        parts = self.replicas.run_split("Score", len(completion_ids), part)
        return Scores(torch.cat([p.rewards for p in parts]) if parts else torch.zeros(0),
                      [f for p in parts for f in p.failed], _identity(parts))


class ReferenceReplicas(_Stateless):
    """ReferenceClient.logprobs over several reference replicas (the reference is frozen: any may answer)."""

    def logprobs(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        def part(client, rows: range) -> list[torch.Tensor]:
            return client.logprobs(prompt_ids[rows.start:rows.stop], completion_ids[rows.start:rows.stop])

        self.replicas.refresh()
        return [row for p in self.replicas.run_split("LogProbs", len(completion_ids), part) for row in p]
