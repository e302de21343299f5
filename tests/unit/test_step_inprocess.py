"""One step of each algorithm through the real Orchestrator loop, in process, with in-memory fake clients.

The fakes have the methods of orchestrator/remote/clients.py's clients and no gRPC: the generator samples
from its own copy of the tiny model (seeded per sample, log-probs of the raw policy) and takes pushed
weights, the reward is a rule (share of digits in the completion: varied from the first step), the
reference is a frozen copy of the starting policy, the value service answers fixed numbers and counts
its TrainSteps like a real critic. Seconds, where the end-to-end run with four service processes takes
minutes: the loop's wiring (rollout -> experience -> critic -> update -> sync -> log -> checkpoint) is
checked here, the wire in tests/e2e.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from demo.modelkit import TEST_MODEL, build_char_tokenizer, build_tiny_model
from orchestrator.remote.clients import Samples, Scores, ServiceInfo, ValueTrainResult, WeightSync
from orchestrator.run import checkpoint
from orchestrator.run.config import build_config
from orchestrator.run.data import PromptRow, PromptStream
from orchestrator.run.metrics import RunMetrics
from orchestrator.step.loop import Orchestrator, RunState, Services
from orchestrator.step.trainer import PolicyTrainer

PROMPTS = ["1+2=", "7-3=", "4*2=", "9+9="]


def _info(role: str, *, vocab: int = 0, weight_version: int = 0, last_step_id: int = -1) -> ServiceInfo:
    return ServiceInfo(role, f"fake:{role}", "", "fake", "", weight_version, vocab, last_step_id)


@torch.no_grad()
def _token_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log π(a_t | s_t) of each completion token under `model`, one sequence, no padding: [T]."""
    ids = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[positions, torch.tensor(completion)]


class FakeGenerator:
    """GeneratorClient in memory: samples from its own copy of the policy, serves the weights pushed to it."""

    name = "fake-generator"

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = copy.deepcopy(model), tokenizer
        self.version = 0
        self.pushed: list[int] = []  # versions received by update_weights
        self.prompts: list[list[int]] = []  # every prompt it was asked to continue

    def info(self) -> ServiceInfo:
        return _info("generator", vocab=len(self.tokenizer), weight_version=self.version)

    @torch.no_grad()
    def generate(self, prompt_ids, *, n, temperature, top_p, top_k, max_new_tokens, stop_token_ids, seed,
                 request_id, stop=()) -> Samples:
        assert not stop, "stop strings are not simulated here (tests/integration/test_generator.py has them)"
        eos = {self.tokenizer.eos_token_id, *stop_token_ids}
        self.prompts += [list(p) for p in prompt_ids]
        completions, logprobs, finished = [], [], []
        for i, prompt in enumerate(prompt_ids):
            for j in range(n):
                rng = torch.Generator().manual_seed(seed + 1000 * i + j)  # per sample, as the real generator
                ids: list[int] = []
                while len(ids) < max_new_tokens and (not ids or ids[-1] not in eos):
                    logits = self.model(torch.tensor([list(prompt) + ids])).logits[0, -1].float()
                    if temperature == 0:  # greedy, as the real generator reads temperature 0
                        ids.append(int(logits.argmax()))
                    else:
                        ids.append(int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=rng)))
                completions.append(ids)
                logprobs.append(_token_logprobs(self.model, list(prompt), ids).tolist())
                finished.append(ids[-1] in eos)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        self.finished = finished  # [B] of the last call: True = stopped on EOS / a stop token
        return Samples(completions, logprobs, finished, texts, self.version)

    def update_weights(self, named_tensors, version: int) -> WeightSync:
        self.model.load_state_dict(dict(named_tensors))
        self.version = version
        self.pushed.append(version)
        nbytes = sum(t.numel() * t.element_size() for t in named_tensors.values())
        return WeightSync(version, len(named_tensors), nbytes, 0.0)

    def close(self) -> None:
        pass


class FakeReward:
    """RewardClient in memory: the share of digit characters in each completion."""

    name, weight = "fake-reward", 1.0

    def info(self) -> ServiceInfo:
        return _info("reward")

    def __init__(self) -> None:
        self.returned: list[torch.Tensor] = []  # the rewards of each call

    def score(self, prompt_ids, completion_ids, prompt_text, completion_text, metadata) -> Scores:
        rewards = torch.tensor([sum(c.isdigit() for c in t) / max(1, len(t)) for t in completion_text])
        self.returned.append(rewards)
        return Scores(rewards, [False] * len(completion_ids), "rule:digits")

    def close(self) -> None:
        pass


class FakeReference:
    """ReferenceClient in memory: log-probs of a frozen copy of the starting policy."""

    name = "fake-reference"

    def __init__(self, model) -> None:
        self.model = copy.deepcopy(model)

    def info(self) -> ServiceInfo:
        return _info("reference")

    def logprobs(self, prompt_ids, completion_ids) -> list[torch.Tensor]:
        return [_token_logprobs(self.model, list(p), list(c)) for p, c in zip(prompt_ids, completion_ids, strict=True)]

    def close(self) -> None:
        pass


class FakeValue:
    """ValueClient in memory: fixed values, and TrainStep / Save / Load bookkeeping of a real critic."""

    name = "fake-value"

    def __init__(self) -> None:
        self.last_step_id, self.steps_trained = -1, 0
        self.saves: dict[str, tuple[int, int]] = {}
        self.train_ids: list[int] = []

    def info(self) -> ServiceInfo:
        return _info("value", weight_version=self.steps_trained, last_step_id=self.last_step_id)

    def values(self, prompt_ids, completion_ids) -> list[torch.Tensor]:
        return [torch.full((len(c),), 0.25) for c in completion_ids]

    def train_step(self, prompt_ids, completion_ids, *, returns, old_values, mask, clip_range, step_id,
                   epochs=1, minibatch_size=0) -> ValueTrainResult:
        self.train_ids.append(step_id)
        duplicate = step_id <= self.last_step_id
        if not duplicate:
            self.last_step_id, self.steps_trained = step_id, self.steps_trained + 1
        loss = float(torch.cat([(r - v) ** 2 for r, v in zip(returns, old_values, strict=True)]).mean())
        return ValueTrainResult(loss, 0.0, 0.0, 0.0, duplicate, self.steps_trained, self.last_step_id)

    def save(self, name: str) -> str:
        self.saves[name] = (self.last_step_id, self.steps_trained)
        return name

    def load(self, name: str) -> int:
        self.last_step_id, self.steps_trained = self.saves[name]
        return self.last_step_id

    def close(self) -> None:
        pass


ALGOS = {
    "grpo": {"name": "grpo"},
    "ppo": {"name": "ppo", "advantage": "gae"},
    "trpo": {"name": "trpo"},
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.mark.parametrize("algo", list(ALGOS))
def test_one_step_of_each_algorithm_with_fake_services(algo, tokenizer, tmp_path) -> None:
    cfg = build_config({
        "models": {"policy": str(tmp_path / "unused-policy")},
        "services": {"local": True},
        "algorithm": {**ALGOS[algo], "lr": 1e-3},
        "sampling": {"max_new_tokens": 6},
        "dataset": {"path": str(tmp_path / "unused.jsonl"), "shuffle": False},
        "prompts_per_step": 2, "samples_per_prompt": 4, "steps": 1, "seed": 0, "metrics_port": None,
        "checkpoint": {"interval": 1}, "run_dir": str(tmp_path / "run"),
    })
    torch.manual_seed(cfg.seed)
    policy = build_tiny_model(tokenizer, **TEST_MODEL, seed=0)
    start = {k: v.detach().clone() for k, v in policy.named_parameters()}
    gen, value = FakeGenerator(policy, tokenizer), FakeValue()
    reward = FakeReward()
    services = Services(gen, [reward], FakeReference(policy) if cfg.uses_reference else None,
                        value if cfg.uses_value else None)
    metrics = RunMetrics(trpo=algo == "trpo")
    # The second row carries the loader's token ids (as a chat-templated prompt does): sent as they are.
    loader_ids = tuple(tokenizer("7-3=", add_special_tokens=False)["input_ids"])  # no BOS: differs from the text's
    rows = [PromptRow(PROMPTS[0], {}), PromptRow(PROMPTS[1], {}, loader_ids), *(PromptRow(p, {}) for p in PROMPTS[2:])]
    orch = Orchestrator(
        cfg, services, policy=policy, tokenizer=tokenizer, trainer=PolicyTrainer(policy, cfg.algorithm, seed=cfg.seed),
        prompts=PromptStream(rows, seed=cfg.seed, shuffle=False),
        state=RunState(), metrics=metrics,
    )
    try:
        (result,) = orch.run()
    finally:
        orch.close()

    assert result.step == 1 and orch.state.step == 1
    assert gen.prompts == [tokenizer(PROMPTS[0])["input_ids"], list(loader_ids)]
    assert math.isfinite(result.metrics["policy_loss"]), result.metrics
    assert result.rewards["std"] > 0, "the rule gives varied rewards: every algorithm has a gradient"
    # Groups are the G = 4 consecutive samples of a prompt; a group "carries signal" when its rewards differ.
    (scores,) = reward.returned
    groups = [scores[i : i + 4].tolist() for i in range(0, len(scores), 4)]
    assert result.metrics["group_signal_fraction"] == sum(len(set(g)) > 1 for g in groups) / len(groups)
    same = [k for k, p in policy.named_parameters() if torch.equal(p.detach(), start[k])]
    assert same == [], f"{algo}: parameters the step did not change: {same}"
    # The new weights went to the generator as version 1, and it serves exactly the trainer's policy.
    assert gen.pushed == [1] and orch.state.weight_version == 1 and result.metrics["weight_version"] == 1.0
    assert all(torch.equal(v, gen.model.state_dict()[k]) for k, v in policy.state_dict().items())
    # One step-log line, the step's metrics in the registry, the same line in the step's checkpoint.
    lines = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1 and orch.last_log_line == lines[0]
    reg = metrics.registry
    assert reg.get_sample_value("quartet_steps_total") == 1.0
    assert reg.get_sample_value("quartet_reward", {"stat": "mean"}) == pytest.approx(result.rewards["mean"])
    assert reg.get_sample_value("quartet_reward_service_info", {"identity": "rule:digits", "weight": "1"}) == 1.0
    truncated = sum(not f for f in gen.finished) / len(gen.finished)  # reached max_new_tokens without EOS
    assert result.metrics["truncated_fraction"] == truncated == reg.get_sample_value("quartet_truncated_fraction")
    saved = checkpoint.read(checkpoint.latest(cfg.checkpoint_dir))
    assert (saved.step, saved.weight_version) == (1, 1)
    assert saved.log_line is not None and json.loads(saved.log_line)["step"] == 1
    if cfg.uses_value:  # the critic trained once on step id 0; the checkpoint names its save
        assert value.train_ids == [0] and math.isfinite(result.metrics["value_loss"])
        assert saved.value_checkpoint == f"run-{checkpoint.step_name(1)}" and saved.value_last_step_id == 0
    else:
        assert "value_loss" not in result.metrics and saved.value_checkpoint is None
    if algo == "trpo":
        assert result.metrics["trpo_accepted"] == 1.0
    else:  # a 0 would read as a rejected line search on a dashboard
        assert not any(key.startswith("trpo_") for key in json.loads(saved.log_line)), saved.log_line
