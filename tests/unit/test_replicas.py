"""Replica sets without gRPC: the split / balance / reassembly math with hand-worked numbers, and
reference and reward replica sets over fake clients: failover, re-admission, per-replica metrics.
The generator's version rule, the endpoint config and discovery: test_replicas_generator_discovery.py."""

from __future__ import annotations

import random

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from orchestrator.remote.client_base import ServiceInfo
from orchestrator.remote.replicas import ReferenceReplicas, ReplicaSet
from orchestrator.remote.retry import ServiceError
from orchestrator.remote.sharding import apportion, contiguous, in_order, replica_weight, split
from orchestrator.run.metrics import RunMetrics
from tests.unit.replica_fakes import Clock, service_info


# -- the math ----------------------------------------------------------------------------------------
def test_apportion_hand_worked() -> None:
    assert apportion([1, 1], 5) == [3, 2]  # 2.5 / 2.5: the tie goes to the lower index
    assert apportion([2, 1, 1], 10) == [5, 3, 2]  # exact 5, 2.5, 2.5
    assert apportion([1, 3], 3) == [1, 2]  # exact 0.75, 2.25: floors 0, 2; the larger remainder (0.75) gets the 1
    assert apportion([64, 32, 32], 8) == [4, 2, 2]
    assert apportion([1, 1, 1], 0) == [0, 0, 0]
    assert apportion([0, 5], 4) == [0, 4]


def test_apportion_sums_and_stays_within_one_of_the_exact_share() -> None:
    rng = random.Random(0)
    for _ in range(300):
        weights = [rng.choice([0.0, rng.uniform(0.1, 10)]) for _ in range(rng.randint(1, 6))]
        if sum(weights) == 0:
            weights[0] = 1.0
        total = rng.randint(0, 200)
        shares = apportion(weights, total)
        assert sum(shares) == total and all(s >= 0 for s in shares)
        for w, s in zip(weights, shares, strict=True):
            assert abs(s - w * total / sum(weights)) < 1.0


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1]])
def test_apportion_refuses_weights_without_mass(weights) -> None:
    with pytest.raises(ValueError, match="positive weight"):
        apportion(weights, 3)


def test_replica_weight_is_capacity_over_queue() -> None:
    assert replica_weight(64, 0) == 64
    assert replica_weight(64, 3) == 16
    assert replica_weight(0, 0) == 1  # not reported: counts as 1


def test_split_and_reassemble_in_the_original_order() -> None:
    assert contiguous([3, 0, 2], start=10) == [range(10, 13), range(13, 13), range(13, 15)]
    slices = split(range(4, 11), [1, 2])  # 7 items: exact 2.33, 4.67 -> 2, 5
    assert slices == [range(4, 6), range(6, 11)]
    items = list("abcdefghij")
    parts = [(r, items[r.start:r.stop]) for r in (range(6, 10), range(0, 3), range(3, 3), range(3, 6))]
    random.Random(1).shuffle(parts)
    assert [x for p in in_order(parts, 10) for x in p] == items


@pytest.mark.parametrize("slices, says", [
    ([range(0, 3), range(4, 10)], "item 3"),          # a gap
    ([range(0, 5), range(3, 10)], "item 5"),          # an overlap
    ([range(0, 4)], "cover 0..4, expected 0..10"),    # short
])
def test_reassembly_refuses_slices_that_do_not_tile(slices, says) -> None:
    with pytest.raises(ValueError, match=says):
        in_order([(r, None) for r in slices], 10)


# -- a replica set over fake clients -------------------------------------------------------------------
class FakeReference:
    """A reference client whose answer row k is [start + k] and which can be made to fail."""

    def __init__(self, address: str) -> None:
        self.address, self.name = address, f"reference at {address}"
        self.down: grpc.StatusCode | None = None
        self.batch, self.seen = 8, []

    def info(self, *, retry: bool = True) -> ServiceInfo:
        if self.down is not None:
            raise ServiceError(self.name, "GetInfo", "down", code=grpc.StatusCode.UNAVAILABLE)
        return service_info(batch=self.batch)

    def logprobs(self, prompt_ids, completion_ids):
        if self.down is not None:
            raise ServiceError(self.name, "LogProbs", "down", code=self.down)
        self.seen.append(len(completion_ids))
        return [torch.tensor([float(c[0])]) for c in completion_ids]

    def close(self) -> None:
        pass


def _reference(n: int, clock: Clock | None = None):
    clients: dict[str, FakeReference] = {}

    def make(address: str) -> FakeReference:
        clients[address] = FakeReference(address)
        return clients[address]

    rs = ReplicaSet("reference", [f"10.0.0.{i}:1" for i in range(n)], make, probe_interval_s=5.0,
                    clock=clock or Clock())
    return ReferenceReplicas(rs), clients


def _rows(b: int):
    return [[1]] * b, [[k] for k in range(b)]


def test_split_by_batch_limit_and_reassembled_in_order() -> None:
    ref, clients = _reference(2)
    clients["10.0.0.1:1"].batch = 24  # three times the capacity of 10.0.0.0: three times the rows
    ref.info()
    out = ref.logprobs(*_rows(8))
    assert [float(r[0]) for r in out] == list(range(8))
    assert clients["10.0.0.0:1"].seen == [2] and clients["10.0.0.1:1"].seen == [6]
    snap = {a: (ok, st.share) for a, ok, st in ref.replicas.snapshot()}
    assert snap == {"10.0.0.0:1": (True, 0.25), "10.0.0.1:1": (True, 0.75)}


def test_failed_replica_is_removed_and_its_share_redone_on_the_others() -> None:
    ref, clients = _reference(3)
    ref.info()
    clients["10.0.0.1:1"].down = grpc.StatusCode.UNAVAILABLE
    out = ref.logprobs(*_rows(9))
    assert [float(r[0]) for r in out] == list(range(9))
    # first pass 3 / 3 / 3; the failed middle slice (rows 3..5) is redone as 2 + 1 on the two left
    assert clients["10.0.0.0:1"].seen == [3, 2] and clients["10.0.0.2:1"].seen == [3, 1]
    state = {a: (ok, st.removals, dict(st.failures)) for a, ok, st in ref.replicas.snapshot()}
    assert state["10.0.0.1:1"] == (False, 1, {"LogProbs": 1})
    assert ref.logprobs(*_rows(4)) and clients["10.0.0.1:1"].seen == []  # no more work while out


def test_no_replica_left_fails_naming_the_last_error() -> None:
    ref, clients = _reference(2)
    ref.info()
    for c in clients.values():
        c.down = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ServiceError, match="no replica left") as e:
        ref.logprobs(*_rows(4))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_refused_request_is_not_redone_and_removes_nobody() -> None:
    ref, clients = _reference(2)
    ref.info()
    clients["10.0.0.0:1"].down = grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServiceError, match="LogProbs"):
        ref.logprobs(*_rows(4))
    assert all(ok for _a, ok, _s in ref.replicas.snapshot())


def test_removed_replica_is_readmitted_after_the_probe_interval() -> None:
    clock = Clock()
    ref, clients = _reference(2, clock)
    ref.info()
    clients["10.0.0.1:1"].down = grpc.StatusCode.UNAVAILABLE
    ref.logprobs(*_rows(4))
    clients["10.0.0.1:1"].down = None
    clock.t = 2.0  # inside the interval: still out
    ref.logprobs(*_rows(4))
    assert clients["10.0.0.1:1"].seen == []
    clock.t = 6.0
    ref.logprobs(*_rows(4))  # starts a background probe and does not wait for it
    assert clients["10.0.0.1:1"].seen == []
    ref.replicas.wait_probes(timeout=5)
    ref.logprobs(*_rows(4))  # takes its answer
    assert clients["10.0.0.1:1"].seen == [2]
    stats = {a: st for a, _ok, st in ref.replicas.snapshot()}["10.0.0.1:1"]
    assert stats.readmissions == 1 and stats.removals == 1


def test_dns_rediscovery_adds_and_drops_replicas() -> None:
    answers = [["10.0.0.0:1", "10.0.0.1:1"], ["10.0.0.1:1", "10.0.0.2:1"]]
    clock = Clock()
    rs = ReplicaSet("reference", answers[0], FakeReference, probe_interval_s=5.0, clock=clock,
                    resolve=lambda: answers[1])
    ref = ReferenceReplicas(rs)
    ref.info()  # the first info looks at DNS: 10.0.0.0 is dropped, 10.0.0.2 probed in the background
    assert [a for a, _ok, _ in rs.snapshot()] == ["10.0.0.1:1", "10.0.0.2:1"]
    rs.wait_probes(timeout=5)
    ref.info()
    assert sorted(a for a, ok, _ in rs.snapshot() if ok) == ["10.0.0.1:1", "10.0.0.2:1"]


def test_per_replica_metrics() -> None:
    ref, clients = _reference(2)
    ref.info()
    clients["10.0.0.1:1"].down = grpc.StatusCode.UNAVAILABLE
    ref.logprobs(*_rows(4))
    metrics = RunMetrics(CollectorRegistry())
    metrics.watch_replicas([ref.replicas])
    text = generate_latest(metrics.registry).decode()
    assert 'quartet_replica_admitted{address="10.0.0.1:1",role="reference"} 0.0' in text
    assert 'quartet_replica_admitted{address="10.0.0.0:1",role="reference"} 1.0' in text
    assert 'quartet_replica_failures_total{address="10.0.0.1:1",method="LogProbs",role="reference"} 1.0' in text
    assert 'quartet_replica_calls_total{address="10.0.0.0:1",method="LogProbs",role="reference"} 2.0' in text
    assert 'quartet_replica_share{address="10.0.0.0:1",role="reference"} 1.0' in text
    assert 'quartet_replica_removals_total{address="10.0.0.1:1",role="reference"} 1.0' in text


class FakeReward:
    """Reward of sample k is k / 10; sample 1 is a verifier failure; identities name the host."""

    def __init__(self, address: str) -> None:
        self.address, self.name = address, f"reward at {address}"

    def info(self, *, retry: bool = True) -> ServiceInfo:
        return service_info()

    def score(self, prompt_ids, completion_ids, prompt_text, completion_text, metadata):
        from orchestrator.remote.client_base import Scores

        ks = [int(c[0]) for c in completion_ids]
        return Scores(torch.tensor([k / 10 for k in ks]), [k == 1 for k in ks], f"reward/rule:x@{self.address}")

    def close(self) -> None:
        pass


def test_reward_replicas_reassemble_rewards_and_failures_in_order() -> None:
    from orchestrator.remote.replicas import RewardReplicas

    rs = ReplicaSet("reward", ["10.0.2.0:1", "10.0.2.1:1", "10.0.2.2:1"], FakeReward, clock=Clock())
    reward = RewardReplicas(rs, weight=0.5)
    reward.info()
    n = 7
    scores = reward.score([[1]] * n, [[k] for k in range(n)], ["p"] * n, ["c"] * n, [{}] * n)
    assert scores.rewards.tolist() == pytest.approx([k / 10 for k in range(n)])
    assert scores.failed == [k == 1 for k in range(n)] and reward.weight == 0.5
    assert scores.identity == "reward/rule:x@replicas"  # three hosts: one identity for the role's metric
