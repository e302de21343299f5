"""Replica sets without gRPC: the split / balance / reassembly math with hand-worked numbers, failover,
re-admission, the generator's version rule, the endpoint config and the per-replica metrics."""

from __future__ import annotations

import random

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from orchestrator.remote.client_base import Samples, ServiceInfo, WeightSync
from orchestrator.remote.discovery import resolve_addresses
from orchestrator.remote.replica_generator import ReplicaGenerator
from orchestrator.remote.replicas import ReferenceReplicas, ReplicaSet
from orchestrator.remote.retry import ServiceError
from orchestrator.remote.sharding import apportion, contiguous, in_order, replica_weight, split
from orchestrator.run.config import ConfigError, build_config
from orchestrator.run.metrics import RunMetrics


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
def _info(version: int = 0, batch: int = 8, queue: int = 0) -> ServiceInfo:
    return ServiceInfo("reference", "ref@h", "m", "b", "fp", version, 10, -1, batch, queue)


class FakeReference:
    """A reference client whose answer row k is [start + k] and which can be made to fail."""

    def __init__(self, address: str) -> None:
        self.address, self.name = address, f"reference at {address}"
        self.down: grpc.StatusCode | None = None
        self.batch, self.seen = 8, []

    def info(self, *, retry: bool = True) -> ServiceInfo:
        if self.down is not None:
            raise ServiceError(self.name, "GetInfo", "down", code=grpc.StatusCode.UNAVAILABLE)
        return _info(batch=self.batch)

    def logprobs(self, prompt_ids, completion_ids):
        if self.down is not None:
            raise ServiceError(self.name, "LogProbs", "down", code=self.down)
        self.seen.append(len(completion_ids))
        return [torch.tensor([float(c[0])]) for c in completion_ids]

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


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


# -- the generator's version rule ------------------------------------------------------------------------
class FakeGenerator:
    """Sample j of prompt i is [seed, offset + i, j]; the weight version is what was last pushed."""

    def __init__(self, address: str, version: int = 0) -> None:
        self.address, self.name, self.version = address, f"generator at {address}", version
        self.down = False

    def info(self, *, retry: bool = True) -> ServiceInfo:
        if self.down:
            raise ServiceError(self.name, "GetInfo", "down", code=grpc.StatusCode.UNAVAILABLE)
        return _info(self.version)

    def update_weights(self, named, version: int) -> WeightSync:
        if self.down:
            raise ServiceError(self.name, "UpdateWeights", "down", code=grpc.StatusCode.UNAVAILABLE)
        self.version = version
        return WeightSync(version, len(named), 100, 0.01)

    def generate(self, prompt_ids, *, n, seed, prompt_index_offset=0, **_kw) -> Samples:
        rows = [[seed, prompt_index_offset + i, j] for i in range(len(prompt_ids)) for j in range(n)]
        b = len(rows)
        return Samples(rows, [[-0.1] * 3] * b, [True] * b, ["x"] * b, self.version)

    def close(self) -> None:
        pass


def _generators(versions: list[int]):
    gens = {f"10.0.1.{i}:1": FakeGenerator(f"10.0.1.{i}:1", v) for i, v in enumerate(versions)}
    rs = ReplicaSet("generator", list(gens), gens.__getitem__, probe_interval_s=5.0, clock=Clock())
    return ReplicaGenerator(rs), gens


def _generate(gen: ReplicaGenerator, prompts: int) -> Samples:
    return gen.generate([[1]] * prompts, n=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=3,
                        stop_token_ids=[], seed=7, request_id="t")


def test_generate_split_keeps_every_prompts_seed_index() -> None:
    gen, _ = _generators([0, 0, 0])
    gen.info()
    samples = _generate(gen, 5)
    assert samples.completion_ids == [[7, i, j] for i in range(5) for j in range(2)]


def test_stale_replica_waits_for_the_next_push_then_serves() -> None:
    gen, gens = _generators([3, 3, 0])  # a leftover at version 0: the newest version (3) stands
    assert gen.info().weight_version == 3 and gen.version == 3
    admitted = {a for a, ok, _ in gen.replicas.snapshot() if ok}
    assert admitted == {"10.0.1.0:1", "10.0.1.1:1"}
    sync = gen.update_weights({"w": torch.zeros(1)}, 4)
    assert sync.version == 4 and sync.bytes == 300  # all three took version 4
    assert all(g.version == 4 for g in gens.values()) and all(ok for _, ok, _ in gen.replicas.snapshot())


def test_a_replica_that_restarted_is_taken_out_until_it_has_the_weights() -> None:
    gen, gens = _generators([0, 0])
    gen.info()
    gen.update_weights({"w": torch.zeros(1)}, 1)
    gens["10.0.1.1:1"].version = 0  # it restarted: serves its starting weights
    assert gen.info().weight_version == 1
    assert [a for a, ok, _ in gen.replicas.snapshot() if ok] == ["10.0.1.0:1"]
    assert _generate(gen, 3).weight_version == 1
    gen.update_weights({"w": torch.zeros(1)}, 2)
    assert all(ok for _, ok, _ in gen.replicas.snapshot()) and gens["10.0.1.1:1"].version == 2


def test_a_replica_down_during_the_push_is_out_and_the_push_succeeds_on_the_rest() -> None:
    gen, gens = _generators([0, 0])
    gen.info()
    gens["10.0.1.0:1"].down = True
    assert gen.update_weights({"w": torch.zeros(1)}, 1).version == 1
    assert [a for a, ok, _ in gen.replicas.snapshot() if ok] == ["10.0.1.1:1"]
    gens["10.0.1.1:1"].down = True
    with pytest.raises(ServiceError, match="no replica took the weights"):
        gen.update_weights({"w": torch.zeros(1)}, 2)


def test_all_replicas_restarted_reports_their_version_so_the_weights_are_resent() -> None:
    gen, gens = _generators([0, 0])
    gen.info()
    gen.update_weights({"w": torch.zeros(1)}, 1)
    for g in gens.values():
        g.version = 0
    assert gen.info().weight_version == 0  # WeightKeeper sees 0 != 1 and re-sends
    gen.update_weights({"w": torch.zeros(1)}, 1)
    assert gen.info().weight_version == 1 and all(ok for _, ok, _ in gen.replicas.snapshot())


# -- config, discovery, metrics --------------------------------------------------------------------------
def _cfg(services: dict) -> dict:
    return {"models": {"policy": "p"}, "dataset": {"path": "d.jsonl"}, "services": {"reference": {"address": "x:1"},
                                                                                    **services}}


def test_endpoint_takes_one_address_a_list_or_a_dns_name() -> None:
    one = build_config(_cfg({"generator": {"address": "h:1"}, "rewards": [{"address": "r:1"}]}))
    assert one.services.generator.replica_addresses() == ["h:1"] and not one.services.generator.replicated
    many = build_config(_cfg({"generator": {"address": ["a:1", "b:1"]}, "rewards": [{"address": "r:1"}]}))
    assert many.services.generator.replicated and many.services.generator.for_replica("a:1").address == "a:1"
    dns = build_config(_cfg({"generator": {"address": "gen-replicas:50051", "discovery": "dns", "tls_ca": "ca.pem"},
                                 "rewards": [{"address": "r:1"}]}))
    replica = dns.services.generator.for_replica("10.1.2.3:50051")
    assert dns.services.generator.replicated and replica.tls_server_name == "gen-replicas"


@pytest.mark.parametrize("endpoint, says", [
    ({"address": ["a:1", "a:1"]}, "a:1 twice"),
    ({"address": []}, "non-empty list"),
    ({"address": ["a:1", "b:1"], "discovery": "dns"}, "discovery: dns needs one name:port"),
    ({"address": "no-port", "discovery": "dns"}, "discovery: dns needs one name:port"),
])
def test_bad_replica_addresses_are_refused_naming_the_field(endpoint, says) -> None:
    with pytest.raises(ConfigError, match=r"services\.generator") as e:
        build_config(_cfg({"generator": endpoint, "rewards": [{"address": "r:1"}]}))
    assert says in str(e.value)


def test_several_value_endpoints_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="one writer") as e:
        build_config(_cfg({"generator": {"address": "g:1"}, "rewards": [{"address": "r:1"}],
                               "value": {"address": ["v:1", "v:2"]}}))
    assert str(e.value).startswith("services.value: ")


def test_resolve_addresses_lists_every_record_once() -> None:
    records = [(2, 1, 6, "", ("10.0.0.2", 50051)), (2, 1, 6, "", ("10.0.0.1", 50051)),
               (2, 1, 6, "", ("10.0.0.2", 50051)), (10, 1, 6, "", ("fd00::1", 50051, 0, 0))]
    seen = []

    def lookup(host, port, **kw):
        seen.append((host, port))
        return records

    assert resolve_addresses("gen-replicas:50051", lookup=lookup) == ["10.0.0.1:50051", "10.0.0.2:50051",
                                                                       "[fd00::1]:50051"]
    assert seen == [("gen-replicas", 50051)]


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


def test_a_generator_that_ignores_the_prompt_offset_is_refused() -> None:
    from orchestrator.remote.clients import GeneratorClient
    from orchestrator.run.config import Endpoint
    from quartet.v1 import generator_pb2
    from services.common.codec import encode_ragged

    client = GeneratorClient(Endpoint(address="127.0.0.1:1"), deadline_s=1, weights_deadline_s=1)
    client.vocab_size = 10

    def answer(index: list[int]) -> generator_pb2.GenerateResponse:
        return generator_pb2.GenerateResponse(
            completion_ids=encode_ragged([torch.tensor([1]), torch.tensor([2])], torch.int64),
            logprobs=encode_ragged([torch.tensor([-0.5]), torch.tensor([-0.5])], torch.float32),
            finish_reasons=[1, 1], prompt_index=index, completion_text=["a", "b"], weight_version=0)

    try:
        assert client._check_samples(answer([2, 3]), n_prompts=2, n=1, max_new_tokens=4, offset=2).texts == ["a", "b"]
        for older in ([0, 1], []):  # numbered from 0, or not at all: the offset was not applied
            with pytest.raises(ServiceError, match="ignored prompt_index_offset=2"):
                client._check_samples(answer(older), n_prompts=2, n=1, max_new_tokens=4, offset=2)
        assert client._check_samples(answer([0, 1]), n_prompts=2, n=1, max_new_tokens=4).texts == ["a", "b"]
    finally:
        client.close()


def test_first_lookup_waits_for_records_then_gives_up_naming_the_budget() -> None:
    from orchestrator.remote.discovery import first_lookup

    answers = [[], [], [(2, 1, 6, "", ("10.0.0.9", 1))]]
    clock = Clock()

    def lookup(host, port, **kw):
        return answers.pop(0)

    def sleep(s: float) -> None:
        clock.t += s

    assert first_lookup("generator", "gen:1", budget_s=10, lookup=lookup, sleep=sleep, clock=clock) == ["10.0.0.9:1"]
    assert clock.t == 2.0

    def missing(host, port, **kw):
        raise OSError("Name or service not known")

    with pytest.raises(ServiceError, match=r"generator at gen:1 service, DNS lookup: Name or service not known after 3 s"):
        first_lookup("generator", "gen:1", budget_s=3, lookup=missing, sleep=sleep, clock=clock)


class FakeReward:
    """Reward of sample k is k / 10; sample 1 is a verifier failure; identities name the host."""

    def __init__(self, address: str) -> None:
        self.address, self.name = address, f"reward at {address}"

    def info(self, *, retry: bool = True) -> ServiceInfo:
        return _info()

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


def test_a_partitioned_generator_that_kept_its_weights_comes_back_without_a_push() -> None:
    gen, gens = _generators([0, 0])
    clock = gen.replicas.clock
    gen.info()
    gen.update_weights({"w": torch.zeros(1)}, 1)
    gens["10.0.1.1:1"].down = True
    gen.info()
    assert [a for a, ok, _ in gen.replicas.snapshot() if ok] == ["10.0.1.0:1"]
    gens["10.0.1.1:1"].down = False  # reachable again, still at version 1
    clock.t += 10
    gen.info()
    gen.replicas.wait_probes(timeout=5)
    gen.info()
    assert all(ok for _, ok, _ in gen.replicas.snapshot()) and gens["10.0.1.1:1"].version == 1
