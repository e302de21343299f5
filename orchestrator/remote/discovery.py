"""From a role's endpoint config to its client: one client for one address, a replica set for several.

An endpoint names replicas as a list of addresses, or (`discovery: dns`) as one DNS name that
resolves to several addresses, as a Kubernetes headless Service does; its addresses are looked up at
start and again whenever removed replicas are probed (ReplicaSet.rediscover), so pods that come and
go are followed. A single static address gives the plain client, exactly as before replicas existed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from orchestrator.remote.clients import GeneratorClient, ReferenceClient, RewardClient
from orchestrator.remote.replica_generator import ReplicaGenerator
from orchestrator.remote.replicas import ReferenceReplicas, ReplicaSet, RewardReplicas
from orchestrator.remote.retry import RetryPolicy, ServiceError
from orchestrator.run.config import Endpoint, RewardEndpoint

Lookup = Callable[..., list[Any]]


def resolve_addresses(target: str, *, lookup: Lookup = socket.getaddrinfo) -> list[str]:
    """Every address `target` ("name:port") resolves to, as sorted "ip:port" ("[ip6]:port") strings.

    Raises OSError (socket.gaierror) when the name does not resolve.
    """
    host, _, port = target.rpartition(":")
    found = {info[4][0] for info in lookup(host, int(port), type=socket.SOCK_STREAM)}
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in sorted(found)]


def first_lookup(role: str, target: str, *, budget_s: float, lookup: Lookup = socket.getaddrinfo,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> list[str]:
    """The replicas behind `target` at start, looked up again each second for up to `budget_s` while there are
    none (pods still starting: a headless Service has no record before a pod is ready)."""
    end = clock() + budget_s
    while True:
        try:
            found = resolve_addresses(target, lookup=lookup)
            problem = "no address records"
        except OSError as e:
            found, problem = [], str(e)
        if found:
            return found
        if clock() >= end:
            raise ServiceError(f"{role} at {target}", "DNS lookup", f"{problem} after {budget_s:g} s "
                               "(services.retry.budget_s): check the name, and that its Service has ready pods")
        sleep(1.0)


def _replica_set(role: str, ep: Endpoint, make: Callable[[Endpoint], Any], probe_interval_s: float,
                 lookup: Lookup, retry: RetryPolicy | None) -> ReplicaSet:
    def make_client(address: str):
        return make(ep.for_replica(address))

    if ep.discovery == "dns":
        target = ep.replica_addresses()[0]
        found = first_lookup(role, target, budget_s=(retry or RetryPolicy()).budget_s, lookup=lookup)
        return ReplicaSet(role, found, make_client, probe_interval_s=probe_interval_s,
                          resolve=lambda: resolve_addresses(target, lookup=lookup))
    return ReplicaSet(role, ep.replica_addresses(), make_client, probe_interval_s=probe_interval_s)


def connect_generator(ep: Endpoint, *, probe_interval_s: float, lookup: Lookup = socket.getaddrinfo,
                      **client_kw: Any) -> GeneratorClient | ReplicaGenerator:
    if not ep.replicated:
        return GeneratorClient(ep, **client_kw)
    return ReplicaGenerator(_replica_set("generator", ep, lambda e: GeneratorClient(e, **client_kw),
                                         probe_interval_s, lookup, client_kw.get("retry")))


def connect_reward(ep: RewardEndpoint, *, probe_interval_s: float, lookup: Lookup = socket.getaddrinfo,
                   **client_kw: Any) -> RewardClient | RewardReplicas:
    if not ep.replicated:
        return RewardClient(ep, weight=ep.weight, **client_kw)
    return RewardReplicas(_replica_set("reward", ep, lambda e: RewardClient(e, weight=ep.weight, **client_kw),
                                       probe_interval_s, lookup, client_kw.get("retry")), weight=ep.weight,
                          label=ep.name)


def connect_reference(ep: Endpoint, *, probe_interval_s: float, lookup: Lookup = socket.getaddrinfo,
                      **client_kw: Any) -> ReferenceClient | ReferenceReplicas:
    if not ep.replicated:
        return ReferenceClient(ep, **client_kw)
    return ReferenceReplicas(_replica_set("reference", ep, lambda e: ReferenceClient(e, **client_kw),
                                          probe_interval_s, lookup, client_kw.get("retry")))
