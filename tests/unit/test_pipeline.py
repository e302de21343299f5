"""Pipelined (one-step off-policy) rollouts through the real Orchestrator loop, in process, with the
in-memory fake services of test_step_inprocess: the next step's Generate runs during the update, its
samples come from the weights one version back, the truncated IS weights enter the loss, the version stamp
is checked, and a resume from a checkpoint trains on exactly the samples the uninterrupted run did."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from dataclasses import replace

import pytest
import torch

from demo.modelkit import TEST_MODEL, build_char_tokenizer, build_tiny_model
from orchestrator.run import checkpoint
from orchestrator.run.config import build_config
from orchestrator.run.data import PromptRow, PromptStream
from orchestrator.step.loop import Orchestrator, RunState, Services
from orchestrator.step.pipeline import Pending
from orchestrator.step.trainer import PolicyTrainer
from services.common.hf import load_causal_lm
from tests.unit.test_step_inprocess import PROMPTS, FakeGenerator, FakeReference, FakeReward

ROWS = [PromptRow(p, {}) for p in [*PROMPTS, "2+2=", "8-1=", "3*3=", "6+5="]]


class RecordingGenerator(FakeGenerator):
    """The fake generator, logging the order of Generate calls and weight pushes (from any thread)."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__(model, tokenizer)
        self.events: list[tuple[str, object]] = []
        self.sampled_with: dict[str, int] = {}  # request id -> weight version that sampled it
        self.lock = threading.Lock()

    def generate(self, prompt_ids, **kw):
        with self.lock:  # the real generator swaps weights only between batches
            self.events.append(("generate", kw["request_id"]))
            samples = super().generate(prompt_ids, **kw)
            self.sampled_with[kw["request_id"]] = samples.weight_version
            return samples

    def update_weights(self, named_tensors, version):
        with self.lock:
            self.events.append(("push", version))
            return super().update_weights(named_tensors, version)


def _config(tmp_path, *, pipeline: bool, steps: int = 4, **extra):
    return build_config({
        "models": {"policy": str(tmp_path / "unused-policy")},
        "services": {"local": True},
        "algorithm": {"name": "grpo", "lr": 3e-2, "kl_coef": 0.04},
        "sampling": {"max_new_tokens": 5},
        "dataset": {"path": str(tmp_path / "unused.jsonl"), "shuffle": True},
        "rollout": {"pipeline": pipeline},
        "prompts_per_step": 2, "samples_per_prompt": 4, "steps": steps, "seed": 3, "metrics_port": None,
        "run_dir": str(tmp_path / "run"), **extra,
    })


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _orchestrator(cfg, tokenizer, policy, gen, *, state=None, reference=None):
    services = Services(gen, [FakeReward()], reference or FakeReference(policy), None)
    return Orchestrator(cfg, services, policy=policy, tokenizer=tokenizer,
                        trainer=PolicyTrainer(policy, cfg.algorithm, seed=cfg.seed),
                        prompts=PromptStream(ROWS, seed=cfg.seed, shuffle=True), state=state or RunState())


def _run(cfg, tokenizer):
    """A whole run from the seeded tiny model; returns the generator (its event log) and the step results."""
    torch.manual_seed(cfg.seed)
    policy = build_tiny_model(tokenizer, **TEST_MODEL, seed=0)
    gen = RecordingGenerator(policy, tokenizer)
    orch = _orchestrator(cfg, tokenizer, policy, gen)
    try:
        return gen, orch.run()
    finally:
        orch.close()


def _lines(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        # Timings differ run to run; a resumed run numbers the weight versions it pushes afresh.
        for timing in ("phases", "step_seconds", "tokens_per_second", "sync_seconds", "weight_version"):
            row.pop(timing, None)
        out.append(row)
    return out


def test_the_next_step_samples_during_the_update_from_the_weights_one_version_back(tokenizer, tmp_path) -> None:
    cfg = _config(tmp_path, pipeline=True)
    assert cfg.algorithm.tis_cap == 2.0  # a pipelined run corrects for staleness by default
    gen, results = _run(cfg, tokenizer)
    # Step k+1's Generate is sent before step k pushes its weights, and the last step sends none.
    assert gen.events == [("generate", "step-0"), ("generate", "step-1"), ("push", 1), ("generate", "step-2"),
                          ("push", 2), ("generate", "step-3"), ("push", 3), ("push", 4)]
    assert gen.sampled_with == {"step-0": 0, "step-1": 0, "step-2": 1, "step-3": 2}
    assert [r.metrics["rollout_staleness"] for r in results] == [0.0, 1.0, 1.0, 1.0]
    # On-policy the IS weights are exactly 1; one version back they are not, and stay within the cap.
    first, later = results[0].metrics, [r.metrics for r in results[1:]]
    assert first["is_weight_mean"] == pytest.approx(1.0, abs=1e-5) and first["is_truncated_fraction"] == 0.0
    assert all(abs(m["is_weight_mean"] - 1.0) > 1e-4 for m in later), [m["is_weight_mean"] for m in later]
    assert all(0.0 < m["is_weight_mean"] <= 2.0 for m in later)
    assert all("prefetch_wait" in r.phases for r in results)


def test_a_synchronous_run_is_unchanged(tokenizer, tmp_path) -> None:
    cfg = _config(tmp_path, pipeline=False, steps=2)
    assert cfg.algorithm.tis_cap is None
    gen, results = _run(cfg, tokenizer)
    assert gen.events == [("generate", "step-0"), ("push", 1), ("generate", "step-1"), ("push", 2)]
    assert all("rollout_staleness" not in r.metrics and "is_weight_mean" not in r.metrics for r in results)
    assert all("prefetch_wait" not in r.phases for r in results)


def test_samples_of_a_version_the_run_never_served_are_drawn_again(tokenizer, tmp_path) -> None:
    cfg = _config(tmp_path, pipeline=True, steps=3)
    torch.manual_seed(cfg.seed)
    policy = build_tiny_model(tokenizer, **TEST_MODEL, seed=0)
    gen = RecordingGenerator(policy, tokenizer)
    orch = _orchestrator(cfg, tokenizer, policy, gen)
    try:
        orch.step()
        # As if the generator restarted after step 0 and something else pushed version 7 to it: the
        # prefetched answer for step 1 carries a stamp of weights this run never sent.
        ahead = orch.source._ahead
        stamped = ahead.future.result()
        ahead.future = Future()
        ahead.future.set_result(replace(stamped, weight_version=7))
        gen.version = 7
        result = orch.step()
    finally:
        orch.close()
    # The answer was dropped, the weights re-sent (the generator served 7, the run 1), step 1 sampled again.
    assert result.recovery.get("stale_rollouts") == 1 and result.recovery.get("weight_resends") == 1
    assert result.metrics["rollout_staleness"] == 0.0
    assert [e for e in gen.events if e[0] == "generate"].count(("generate", "step-1")) == 2


def test_resume_from_a_checkpoint_trains_on_the_same_samples(tokenizer, tmp_path) -> None:
    # Uninterrupted: 4 pipelined steps.
    cfg = _config(tmp_path / "a", pipeline=True)
    torch.manual_seed(cfg.seed)
    policy = build_tiny_model(tokenizer, **TEST_MODEL, seed=0)
    reference = FakeReference(policy)
    orch = _orchestrator(cfg, tokenizer, policy, RecordingGenerator(policy, tokenizer), reference=reference)
    try:
        orch.run()
    finally:
        orch.close()
    uninterrupted = {k: v.clone() for k, v in policy.state_dict().items()}

    # Interrupted: 2 steps with a checkpoint after step 2 (it holds step 3's samples), then a new process.
    cfg_b = _config(tmp_path / "b", pipeline=True, checkpoint={"interval": 2})
    torch.manual_seed(cfg_b.seed)
    policy_b = build_tiny_model(tokenizer, **TEST_MODEL, seed=0)
    orch = _orchestrator(cfg_b, tokenizer, policy_b, RecordingGenerator(policy_b, tokenizer), reference=reference)
    try:
        orch.step()
        orch.step()
    finally:
        orch.close()
    saved = checkpoint.read(checkpoint.latest(cfg_b.checkpoint_dir))
    pending = Pending.from_state(saved.pending_rollout)
    assert (saved.step, pending.step, pending.behind) == (2, 2, 1) and pending.cursor == saved.cursor

    resumed_policy = load_causal_lm(saved.path / "policy", dtype=torch.float32, device=torch.device("cpu"))
    gen = RecordingGenerator(resumed_policy, tokenizer)  # a fresh generator: version 0, numbering anew
    orch = _orchestrator(cfg_b, tokenizer, resumed_policy, gen, reference=reference,
                         state=RunState(saved.step, saved.cursor, 0, pending))
    orch.trainer.load_state_dict(saved.trainer_state)
    checkpoint.set_rng_states(saved.rng)
    orch.weights.push(1)  # as the session does: the generator serves the restored policy
    try:
        results = orch.run()
    finally:
        orch.close()
    # Step 3 trained on the checkpoint's samples (no Generate for it), step 4's were drawn during step 3.
    assert [e for e in gen.events if e[0] == "generate"] == [("generate", "step-3")]
    assert [r.metrics["rollout_staleness"] for r in results] == [1.0, 1.0]
    assert _lines(tmp_path / "a" / "run" / "steps.jsonl")[2:] == _lines(tmp_path / "b" / "run" / "steps.jsonl")[2:]
    assert all(torch.equal(resumed_policy.state_dict()[k], v) for k, v in uninterrupted.items())
