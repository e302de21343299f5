"""Role replicas over real gRPC on 127.0.0.1: two generator replicas sample exactly what one does, and
a GRPO run over two generator and two reference replicas goes on when one of each is stopped mid-run,
then takes them back (the generator at the run's current weight version)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from orchestrator.remote.clients import GeneratorClient
from orchestrator.remote.discovery import connect_generator
from orchestrator.remote.replica_generator import ReplicaGenerator
from orchestrator.remote.retry import RetryPolicy
from orchestrator.run.config import Endpoint, build_config
from orchestrator.run.services_config import GeneratorEndpoint
from orchestrator.run.session import Session
from services.common import hf
from services.common.config import ServerConfig
from services.common.role import ModelConfig
from services.common.server import RunningServer, start_server

CALL, ADMIN = "replica-call-token", "replica-admin-token"
FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.02, max_backoff_s=0.1, budget_s=1.0)


def _serve(role: str, path: Path | None, port: int = 0, **options) -> RunningServer:
    model = ModelConfig(path=str(path), dtype="float32", device="cpu") if path else None
    return start_server(role, model=model, options=options or None,
                        server=ServerConfig(port=port, token=CALL, admin_token=ADMIN, metrics_port=None))


@pytest.fixture
def servers() -> Iterator[list[RunningServer]]:
    started: list[RunningServer] = []
    yield started
    for s in started:
        s.stop(grace=0)


def _endpoint(addresses: list[str]) -> GeneratorEndpoint:
    return GeneratorEndpoint(address=addresses if len(addresses) > 1 else addresses[0], token=CALL, admin_token=ADMIN,
                             weights_transport="grpc")


def _sample(gen, prompts: list[list[int]]):
    return gen.generate(prompts, n=3, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, stop_token_ids=[],
                        seed=1234, request_id="replicas")


def test_two_generator_replicas_sample_bit_identical_to_one(tiny_checkpoint, servers) -> None:
    servers += [_serve("generator", tiny_checkpoint) for _ in range(3)]
    tok = hf.load_tokenizer(tiny_checkpoint)
    prompts = [tok(p)["input_ids"] for p in ("12+34=", "7*8=", "1", "99-5=", "3+3=")]
    one = GeneratorClient(_endpoint([servers[0].address]), deadline_s=30, weights_deadline_s=30)
    two = connect_generator(_endpoint([servers[1].address, servers[2].address]), deadline_s=30, weights_deadline_s=30,
                            probe_interval_s=60)
    assert isinstance(two, ReplicaGenerator)
    try:
        one.info()
        info = two.info()
        assert info.max_batch_sequences > 0 and info.queue_depth == 0  # GetInfo's limits and queue: the share weights
        alone, split = _sample(one, prompts), _sample(two, prompts)
        assert split.completion_ids == alone.completion_ids and split.texts == alone.texts
        assert split.finished == alone.finished
        # Log-probs come from a batched forward, whose float sums depend on the batch's size and padding
        # (as within one generator): equal to fp32 rounding, not bit for bit.
        for a, b in zip(split.logprobs, alone.logprobs, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)
        shares = {a: (st.calls.get("Generate", 0), st.share) for a, _ok, st in two.replicas.snapshot()}
        assert shares == {servers[1].address: (1, 0.6), servers[2].address: (1, 0.4)}  # 3 + 2 of the 5 prompts
    finally:
        one.close(), two.close()


def _run_config(tmp_path: Path, policy: Path, gens: list[str], refs: list[str], reward: str):
    from demo.modelkit.arithmetic import make_arithmetic_task

    train, _ = make_arithmetic_task(tmp_path / "task", n_train=32, n_test=4, seed=0, max_operand=9)
    auth = {"token": CALL, "admin_token": ADMIN}
    return build_config({
        "models": {"policy": str(policy)},
        "services": {
            "generator": {"address": gens, "weights_transport": "grpc", **auth},
            "reference": {"address": refs, **auth},
            "rewards": [{"address": reward, **auth}],
            "retry": {"max_attempts": 3, "initial_backoff_s": 0.02, "max_backoff_s": 0.1, "budget_s": 1.0},
            "replica_probe_interval_s": 0.05,
        },
        "algorithm": {"name": "grpo", "lr": 1e-3, "kl_coef": 0.04},
        "sampling": {"max_new_tokens": 4},
        "dataset": {"path": str(train)},
        "prompts_per_step": 4, "samples_per_prompt": 2, "steps": 5, "seed": 0,
        "metrics_port": None, "run_dir": str(tmp_path / "run"),
    })


def test_run_goes_on_without_a_stopped_replica_and_takes_it_back(tiny_checkpoint, tmp_path, servers) -> None:
    gens = [_serve("generator", tiny_checkpoint) for _ in range(2)]
    refs = [_serve("reference", tiny_checkpoint) for _ in range(2)]
    reward = _serve("reward", None, kind="rule", rule="arithmetic")
    servers += [*gens, *refs, reward]
    cfg = _run_config(tmp_path, tiny_checkpoint, [g.address for g in gens], [r.address for r in refs], reward.address)
    seen: dict[int, dict[str, bool]] = {}
    with Session(cfg) as session:
        o = session.orchestrator
        gen_set, ref_set = o.services.generator.replicas, o.services.reference.replicas
        back: dict[str, RunningServer] = {}

        def on_step(result) -> None:
            seen[result.step] = {a: ok for rs in (gen_set, ref_set) for a, ok, _st in rs.snapshot()}
            if result.step == 1:  # one generator and one reference replica go away mid-run
                gens[1].stop(grace=0), refs[1].stop(grace=0)
            if result.step == 3:  # and come back on their ports, the generator with its starting weights
                back["gen"] = _serve("generator", tiny_checkpoint, port=gens[1].port)
                back["ref"] = _serve("reference", tiny_checkpoint, port=refs[1].port)
                servers.extend(back.values())
                # The orchestrator's channels to them sit in gRPC's reconnect backoff (at most 2 s): steps here
                # take a fraction of that, so wait for the channels rather than for more steps.
                for rs, srv in ((gen_set, gens[1]), (ref_set, refs[1])):
                    client = next(r.client for r in rs.replicas if r.address == srv.address)
                    grpc.channel_ready_future(client._channel).result(timeout=10)

        results = o.run(on_step)
        assert [r.step for r in results] == [1, 2, 3, 4, 5]
        assert all(r.generated_tokens > 0 for r in results)
        # out after the failure (step 2's calls failed over to the survivors) ...
        assert seen[2][gens[1].address] is False and seen[2][refs[1].address] is False
        assert seen[3][gens[0].address] and seen[3][refs[0].address]
        # ... and back: the generator got the weights pushed after step 4 and served step 5 at that version
        stats = {a: (ok, st) for rs in (gen_set, ref_set) for a, ok, st in rs.snapshot()}
        g_ok, g_stats = stats[gens[1].address]
        assert g_ok and g_stats.removals == 1 and g_stats.readmissions == 1
        assert back["gen"].role.backend.version == o.weights.version == gens[0].role.backend.version
        assert back["gen"].registry.get_sample_value(
            "quartet_rpc_requests_total", {"role": "generator", "method": "Generate", "code": "OK"}
        ) == 1.0  # step 5's share
        r_ok, r_stats = stats[refs[1].address]
        assert r_ok and r_stats.removals == 1 and r_stats.readmissions == 1
        assert g_stats.failures and r_stats.failures.get("LogProbs") == 1
        # the session exposes them on the run's metrics
        scrape = session.metrics.registry.get_sample_value
        g1 = {"role": "generator", "address": gens[1].address}
        assert scrape("quartet_replica_admitted", g1) == 1.0 and scrape("quartet_replica_readmissions_total", g1) == 1.0
        assert scrape("quartet_replica_weight_sync_seconds", g1) > 0
        assert scrape("quartet_replica_failures_total", {"role": "reference", "address": refs[1].address,
                                                          "method": "LogProbs"}) == 1.0


def test_single_address_endpoint_stays_a_plain_client(tiny_checkpoint) -> None:
    ep = Endpoint(address="127.0.0.1:1", token=CALL)
    from orchestrator.remote.discovery import connect_reference

    client = connect_reference(ep, deadline_s=1, probe_interval_s=1, retry=FAST)
    assert type(client).__name__ == "ReferenceClient"
    client.close()


def test_prompt_index_offset_seeds_and_numbers_the_prompts(tiny_checkpoint, servers) -> None:
    from quartet.v1 import generator_pb2, generator_pb2_grpc
    from services.common.channel import open_channel
    from services.common.codec import decode_ragged, encode_ragged

    servers.append(_serve("generator", tiny_checkpoint))
    stub = generator_pb2_grpc.GeneratorStub(open_channel(servers[0].address, token=CALL))
    tok = hf.load_tokenizer(tiny_checkpoint)
    prompts = [tok(p)["input_ids"] for p in ("12+34=", "7*8=", "1", "99-5=", "3+3=")]

    def generate(rows, offset):
        req = generator_pb2.GenerateRequest(
            prompt_ids=encode_ragged([torch.tensor(p) for p in rows], torch.int64), prompt_index_offset=offset,
            params=generator_pb2.SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=77))
        resp = stub.Generate(req, timeout=30)
        return [r.tolist() for r in decode_ragged(resp.completion_ids, dtypes=(torch.int64,)).rows()], list(resp.prompt_index)

    whole, index = generate(prompts, 0)
    tail, tail_index = generate(prompts[3:], 3)
    assert index == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and tail_index == [3, 3, 4, 4]
    assert tail == whole[6:] and generate(prompts[3:], 0)[0] != whole[6:]  # without the offset: other samples
    with pytest.raises(grpc.RpcError) as e:
        generate(prompts, 2**31 - 3)
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE and "prompt_index_offset" in e.value.details()


def test_a_generator_replica_lost_during_generate_gives_the_same_samples(tiny_checkpoint, servers) -> None:
    servers += [_serve("generator", tiny_checkpoint) for _ in range(3)]
    tok = hf.load_tokenizer(tiny_checkpoint)
    prompts = [tok(p)["input_ids"] for p in ("12+34=", "7*8=", "1", "99-5=")]
    one = GeneratorClient(_endpoint([servers[0].address]), deadline_s=30, weights_deadline_s=30)
    two = connect_generator(_endpoint([servers[1].address, servers[2].address]), deadline_s=30, weights_deadline_s=30,
                            probe_interval_s=60, retry=FAST)
    try:
        one.info(), two.info()
        servers[2].stop(grace=0)  # admitted, then gone: its slice (prompts 2, 3) fails and is redone on the other
        alone, split = _sample(one, prompts), _sample(two, prompts)
        assert split.completion_ids == alone.completion_ids and split.texts == alone.texts
        state = {a: (ok, dict(st.calls), dict(st.failures)) for a, ok, st in two.replicas.snapshot()}
        assert state[servers[2].address] == (False, {"GetInfo": 1}, {"Generate": 1})
        assert state[servers[1].address][1]["Generate"] == 2  # its own slice, then the lost one
    finally:
        one.close(), two.close()
