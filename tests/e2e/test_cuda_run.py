"""The embedded stack with every role and the trainer on CUDA (transformers backend): each
algorithm, fp32 and bf16, a few steps. Skipped without a CUDA device; run where a GPU is lent.
(Checked on an H100 with the demo model: steady steps of 0.14 s GRPO, 0.26 s PPO, 0.59 s TRPO
for 8 prompts x 8 samples; log-prob gap between generator and trainer ~4e-7 in fp32.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.test_run import e2e_config, task  # noqa: F401  (task is a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(("algo", "dtype"), [("grpo", "float32"), ("ppo", "float32"), ("trpo", "float32"),
                                             ("grpo", "bfloat16")])
def test_run_on_cuda(algo: str, dtype: str, tiny_checkpoint, task, tmp_path: Path) -> None:  # noqa: F811
    from orchestrator.run.session import Session

    cfg = e2e_config(algo, tiny_checkpoint, task, tmp_path / algo, "models.device=cuda", f"models.dtype={dtype}",
                     "metrics_port=null")
    with Session(cfg) as session:
        o = session.orchestrator
        assert next(o.policy.parameters()).device.type == "cuda"
        assert all(_served_device(session, role).startswith("cuda") for role in ("generator", "reference"))
        before = {k: v.detach().clone() for k, v in o.policy.state_dict().items()}
        results = o.run()
    assert [r.step for r in results] == [1, 2, 3]
    changed = [k for k, v in o.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed"
    for r in results:
        assert all(map(_finite, r.metrics.values())), r.metrics
        # The generator and the trainer run the same weights on the same device type.
        assert r.metrics["logprob_gap_mean"] < (1e-3 if dtype == "float32" else 5e-2)
    lines = [json.loads(line) for line in (tmp_path / algo / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]


def _served_device(session, role: str) -> str:
    """The device a local service reports in GetInfo (the orchestrator's ServiceInfo keeps less)."""
    from quartet.v1 import common_pb2, generator_pb2_grpc, reference_pb2_grpc
    from services.common.channel import open_channel

    svc = session.stack.services[role]
    stub = {"generator": generator_pb2_grpc.GeneratorStub, "reference": reference_pb2_grpc.ReferenceStub}[role]
    channel = open_channel(svc.address, token=svc.token)
    try:
        return stub(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=10).device
    finally:
        channel.close()


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
