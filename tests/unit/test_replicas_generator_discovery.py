"""Replica sets without gRPC, continued: the generator's version rule over fake generators (a stale or
restarted replica serves only once it has the weights), the prompt offset of a split Generate, the
endpoint config and DNS discovery. The sharding math and the reference and reward replica sets:
test_replicas.py."""

from __future__ import annotations

import grpc
import pytest
import torch

from orchestrator.remote.client_base import Samples, ServiceInfo, WeightSync
from orchestrator.remote.discovery import resolve_addresses
from orchestrator.remote.replica_generator import ReplicaGenerator
from orchestrator.remote.replicas import ReplicaSet
from orchestrator.remote.retry import ServiceError
from orchestrator.run.config import ConfigError, build_config
from tests.unit.replica_fakes import Clock, service_info


# -- the generator's version rule ------------------------------------------------------------------------
class FakeGenerator:
    """Sample j of prompt i is [seed, offset + i, j]; the weight version is what was last pushed."""

    def __init__(self, address: str, version: int = 0) -> None:
        self.address, self.name, self.version = address, f"generator at {address}", version
        self.down = False

    def info(self, *, retry: bool = True) -> ServiceInfo:
        if self.down:
            raise ServiceError(self.name, "GetInfo", "down", code=grpc.StatusCode.UNAVAILABLE)
        return service_info(self.version)

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


# -- config and discovery ----------------------------------------------------------------------------------
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


def test_a_push_that_never_returns_is_given_up_on_at_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # A replica whose UpdateWeights never comes back (its host cut off mid-stream, and the call's deadline
    # missed) is taken out once every attempt's deadline and the retry budget have passed; the run goes on.
    import threading
    import time

    from orchestrator.remote import replica_generator
    from orchestrator.remote.retry import RetryPolicy

    monkeypatch.setattr(replica_generator, "PUSH_SLACK_S", 0.2)
    gen, gens = _generators([0, 0])
    gen.info()
    release = threading.Event()
    stuck = gens["10.0.1.0:1"]
    stuck.weights_deadline_s, stuck.info_deadline_s = 0.1, 0.1
    stuck.retry = RetryPolicy(max_attempts=2, budget_s=0.3)
    stuck.update_weights = lambda named, version: release.wait(60)  # never answers within the test
    assert replica_generator.push_limit_s(stuck) == pytest.approx(2 * 0.2 + 0.3 + 0.2)
    assert replica_generator.push_limit_s(gens["10.0.1.1:1"]) is None  # no deadlines known: no bound
    try:
        t0 = time.monotonic()
        assert gen.update_weights({"w": torch.zeros(1)}, 1).version == 1
        assert 0.9 <= time.monotonic() - t0 < 10
        assert [a for a, ok, _ in gen.replicas.snapshot() if ok] == ["10.0.1.1:1"]
    finally:
        release.set()
