"""PolicyTrainer: each algorithm moves the policy the right way, TRPO stays in its trust region,
updates are deterministic and resumable, micro-batching does not change the update, config checks."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from pydantic import ValidationError

from orchestrator.run.algo_config import ALGORITHM_DEFAULTS, AlgorithmConfig
from orchestrator.step.experience import Experience, Rollout, build_experience
from orchestrator.step.policy import response_logits, sequence_logprobs
from orchestrator.step.trainer import PolicyTrainer, UpdateStats, value_train_inputs
from rl.trpo import mean_categorical_kl

PAD = 0
PROMPTS = [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
COMPLETIONS = [[10, 11, 12], [13], [14, 15], [16, 17, 18, 19]]
G = 2
# The tiny model (tests/unit/conftest.py) with one torch thread for the whole module.
pytestmark = pytest.mark.usefixtures("one_thread")


def experience(model, cfg: AlgorithmConfig, *, rewards=(1.0, 0.0, 0.0, 1.0), ref_shift=0.0) -> Experience:
    """An experience on fixed completions, with a reference = the model's own log-probs + ref_shift
    and values 0 (so every algorithm / advantage combination can be built)."""
    probe = Rollout(
        prompt_ids=PROMPTS,
        completion_ids=COMPLETIONS,
        generator_logprobs=[[-2.0] * len(c) for c in COMPLETIONS],
        rewards=torch.tensor(rewards),
        group_size=G,
    )
    with torch.no_grad():
        own = build_experience(probe, model, AlgorithmConfig(kl_coef=0.0), pad_token_id=PAD).old_logprobs
    rollout = dataclasses.replace(
        probe,
        ref_logprobs=[own[i, : len(c)] + ref_shift for i, c in enumerate(COMPLETIONS)],
        values=[torch.zeros(len(c)) for c in COMPLETIONS],
    )
    return build_experience(rollout, model, cfg, pad_token_id=PAD)


def positive_advantages(exp: Experience) -> Experience:
    return dataclasses.replace(exp, advantages=exp.mask.clone())


def sampled_logprobs(model, exp: Experience) -> torch.Tensor:
    """[B, T] log π of the sampled tokens under the model now."""
    with torch.no_grad():
        return sequence_logprobs(model, exp.batch, with_entropy=False).logprobs


def mean_logprob(model, exp: Experience) -> float:
    return float((sampled_logprobs(model, exp) * exp.mask).sum() / exp.mask.sum())


def assert_finite(stats: UpdateStats) -> None:
    bad = {k: v for k, v in stats.as_dict().items() if not math.isfinite(v)}
    assert not bad, bad


UPDATE_CASES = {
    "ppo": {"lr": 1e-3},
    "grpo": {"lr": 1e-3},
    "trpo": {"trpo_max_kl": 0.01},
}


@pytest.mark.parametrize("name", ["ppo", "grpo", "trpo"])
def test_positive_advantages_raise_the_sampled_tokens_logprob_and_train_every_parameter(tiny_qwen, name):
    model = copy.deepcopy(tiny_qwen)
    cfg = AlgorithmConfig.defaults_for(name, **UPDATE_CASES[name])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exp = positive_advantages(experience(model, cfg))
    trainer = PolicyTrainer(model, cfg, seed=0)
    start = mean_logprob(model, exp)
    for _ in range(3):
        stats = trainer.update(exp)
        assert_finite(stats)
    assert mean_logprob(model, exp) > start + 0.05
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"{name} left parameters unchanged: {unchanged}"
    if name == "trpo":
        assert stats.trpo_accepted == 1.0 and stats.optimizer_steps == 1
    else:
        assert stats.optimizer_steps == cfg.epochs and stats.lr == cfg.lr


def test_grpo_moves_probability_towards_the_rewarded_sample_of_each_group(tiny_qwen):
    model = copy.deepcopy(tiny_qwen)
    cfg = AlgorithmConfig(name="grpo", lr=1e-3, kl_coef=0.0)
    exp = experience(model, cfg, rewards=(1.0, 0.0, 0.0, 1.0))
    trainer = PolicyTrainer(model, cfg, seed=0)
    start = sampled_logprobs(model, exp).sum(dim=1)
    for _ in range(3):
        trainer.update(exp)
    gain = sampled_logprobs(model, exp).sum(dim=1) - start
    assert gain[0] > gain[1] and gain[3] > gain[2]  # the rewarded sample beats its group mate


def test_kl_in_the_loss_pulls_the_policy_towards_the_reference(tiny_qwen):
    # Zero advantages: only the k3 term moves the policy, towards a reference 0.5 nats above it.
    cfg = AlgorithmConfig(name="grpo", lr=1e-3, kl_coef=0.5)
    model = copy.deepcopy(tiny_qwen)
    exp = dataclasses.replace(experience(model, cfg, ref_shift=0.5), advantages=torch.zeros(4, 4))
    start = mean_logprob(model, exp)
    stats = PolicyTrainer(model, cfg, seed=0).update(exp)
    assert mean_logprob(model, exp) > start and stats.kl_ref > 0
    # With kl_coef = 0 the same batch gives a zero loss and AdamW (no weight decay) leaves the weights.
    still = copy.deepcopy(tiny_qwen)
    no_kl = cfg.model_copy(update={"kl_coef": 0.0})
    PolicyTrainer(still, no_kl, seed=0).update(dataclasses.replace(exp, ref_logprobs=None))
    assert all(torch.equal(p, q) for p, q in zip(still.parameters(), tiny_qwen.parameters(), strict=True))


def test_trpo_accepted_step_stays_within_the_trust_region(tiny_qwen):
    model = copy.deepcopy(tiny_qwen)
    cfg = AlgorithmConfig(name="trpo", trpo_max_kl=0.002, kl_coef=0.0)
    exp = experience(model, cfg)
    with torch.no_grad():
        old = torch.log_softmax(response_logits(model, exp.batch), dim=-1)
    stats = PolicyTrainer(model, cfg, seed=0).update(exp)
    assert stats.trpo_accepted == 1.0
    assert 0 < stats.trpo_final_kl <= cfg.trpo_max_kl and stats.trpo_step_size > 0
    with torch.no_grad():
        kl = float(mean_categorical_kl(response_logits(model, exp.batch), old, exp.mask))
    assert kl == pytest.approx(stats.trpo_final_kl, rel=1e-4) and kl <= cfg.trpo_max_kl * (1 + 1e-4)
    assert stats.policy_loss < 0  # -E[r A] with A = 0 on average per group: the step made it negative


def test_trpo_without_a_usable_direction_leaves_the_policy_unchanged(tiny_qwen):
    # Every group's rewards equal: zero advantages, zero gradient, nothing to step along.
    model = copy.deepcopy(tiny_qwen)
    cfg = AlgorithmConfig(name="trpo", kl_coef=0.0)
    exp = experience(model, cfg, rewards=(1.0, 1.0, 0.0, 0.0))
    assert exp.advantages.eq(0).all()
    stats = PolicyTrainer(model, cfg, seed=0).update(exp)
    assert_finite(stats)
    assert stats.trpo_accepted == 0.0 and stats.optimizer_steps == 0 and stats.grad_norm == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), tiny_qwen.parameters(), strict=True))


@pytest.mark.parametrize(("name", "advantage"), [("grpo", "gae"), ("trpo", "gae"), ("ppo", "group_zscore")])
def test_algorithm_and_advantage_combine_freely(tiny_qwen, name, advantage):
    model = copy.deepcopy(tiny_qwen)
    cfg = AlgorithmConfig(name=name, advantage=advantage, lr=1e-3)
    stats = PolicyTrainer(model, cfg, seed=0).update(experience(model, cfg))
    assert_finite(stats)
    assert any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), tiny_qwen.parameters(), strict=True)
    )


def test_entropy_bonus_raises_the_entropy(tiny_qwen):
    model = copy.deepcopy(tiny_qwen)
    cfg = AlgorithmConfig(name="ppo", lr=1e-3, kl_coef=0.0, entropy_coef=1.0, epochs=1)
    exp = dataclasses.replace(experience(model, cfg), advantages=torch.zeros(4, 4))
    trainer = PolicyTrainer(model, cfg, seed=0)
    first = trainer.update(exp).entropy
    for _ in range(3):
        last = trainer.update(exp).entropy
    assert last > first


def test_dr_grpo_normaliser_uses_the_generation_budget_when_given(tiny_qwen):
    cfg = AlgorithmConfig(name="grpo", kl_coef=0.0, aggregation="seq_mean_token_sum_norm")
    exp = positive_advantages(experience(tiny_qwen, cfg))
    batch_t = PolicyTrainer(copy.deepcopy(tiny_qwen), cfg, seed=0).update(exp)
    budget = PolicyTrainer(copy.deepcopy(tiny_qwen), cfg, seed=0, max_len=8).update(exp)
    # On-policy ratio 1 and A = 1: loss = -(real tokens) / (B x max_len), max_len = T = 4 or 8.
    assert batch_t.policy_loss == pytest.approx(-10 / (4 * 4), abs=1e-6)
    assert budget.policy_loss == pytest.approx(-10 / (4 * 8), abs=1e-6)


CONFIGS = {
    "ppo_minibatches": {"name": "ppo", "lr": 1e-3, "epochs": 2, "minibatch_size": 2},
    "grpo": {"name": "grpo", "lr": 1e-3, "epochs": 2, "minibatch_size": 2},
    "trpo": {"name": "trpo"},
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_same_seed_and_inputs_give_bit_identical_updates(tiny_qwen, case):
    cfg = AlgorithmConfig(**CONFIGS[case])
    models = [copy.deepcopy(tiny_qwen) for _ in range(2)]
    exp = experience(tiny_qwen, cfg)
    for m in models:
        trainer = PolicyTrainer(m, cfg, seed=7)
        trainer.update(exp)
        trainer.update(exp)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_resuming_from_state_dict_continues_bit_identically(tiny_qwen):
    cfg = AlgorithmConfig(name="ppo", lr=1e-3, epochs=2, minibatch_size=2)
    exp = experience(tiny_qwen, cfg)
    straight = copy.deepcopy(tiny_qwen)
    trainer = PolicyTrainer(straight, cfg, seed=3)
    trainer.update(exp)
    trainer.update(exp)
    first = copy.deepcopy(tiny_qwen)
    half = PolicyTrainer(first, cfg, seed=3)
    half.update(exp)
    state = copy.deepcopy(half.state_dict())
    resumed_model = copy.deepcopy(first)
    resumed = PolicyTrainer(resumed_model, cfg, seed=999)  # the seed is overridden by the state
    resumed.load_state_dict(state)
    resumed.update(exp)
    assert resumed.updates == 2
    for p, q in zip(straight.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("budget_from", ["argument", "config"])
def test_micro_batching_does_not_change_the_update(tiny_qwen, aggregation, budget_from):
    cfg = AlgorithmConfig(name="ppo", lr=1e-3, epochs=1, aggregation=aggregation)
    exp = experience(tiny_qwen, cfg)
    whole, split = copy.deepcopy(tiny_qwen), copy.deepcopy(tiny_qwen)
    a = PolicyTrainer(whole, cfg, seed=0).update(exp)
    if budget_from == "argument":
        b_trainer = PolicyTrainer(split, cfg, seed=0, micro_batch_tokens=1)  # one row per micro-batch
    else:  # algorithm.micro_batch_tokens, as a run config sets it
        b_trainer = PolicyTrainer(split, cfg.model_copy(update={"micro_batch_tokens": 1}), seed=0)
    assert b_trainer.micro_batch_tokens == 1 and PolicyTrainer(whole, cfg, seed=0).micro_batch_tokens == 16384
    b = b_trainer.update(exp)
    assert a.policy_loss == pytest.approx(b.policy_loss, abs=1e-6)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    # Compare the accumulated gradients (left in .grad after the step), not the weights: Adam's
    # m / sqrt(v) turns a 1e-9 gradient difference on a near-zero gradient into a visible one.
    for p, q in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)


def test_value_train_inputs_are_the_gae_targets_trimmed_to_each_completion(tiny_qwen):
    cfg = AlgorithmConfig(name="ppo")
    exp = experience(tiny_qwen, cfg)
    rows = value_train_inputs(exp)
    assert [len(r) for r in rows.returns] == [len(c) for c in COMPLETIONS]
    for i, c in enumerate(COMPLETIONS):
        assert torch.equal(rows.returns[i], exp.returns[i, : len(c)])
        assert torch.equal(rows.old_values[i], torch.zeros(len(c)))
        assert torch.equal(rows.mask[i], torch.ones(len(c)))
    returns, old_values, mask = PolicyTrainer(copy.deepcopy(tiny_qwen), cfg, seed=0).value_train_inputs(exp)
    assert returns is not None and old_values is not None and mask is not None
    with pytest.raises(ValueError, match="advantage: gae"):
        value_train_inputs(experience(tiny_qwen, AlgorithmConfig(name="grpo")))


@pytest.mark.parametrize("name", ["ppo", "grpo", "trpo"])
def test_each_algorithm_gets_its_defaults_and_explicit_fields_win(name):
    cfg = AlgorithmConfig.defaults_for(name)
    for field, value in ALGORITHM_DEFAULTS[name].items():
        assert getattr(cfg, field) == value, field
    assert AlgorithmConfig(name=name, advantage="gae", kl_coef=0.0).advantage == "gae"
    assert AlgorithmConfig(name=name, kl_coef=0.0).kl_coef == 0.0


def test_config_errors_say_what_to_change():
    with pytest.raises(ValidationError, match="set kl_estimator: k3"):
        AlgorithmConfig(name="grpo", kl_estimator="k1")
    with pytest.raises(ValidationError, match="extra"):
        AlgorithmConfig(name="ppo", clip=0.2)
    with pytest.raises(ValidationError, match="clip_low"):
        AlgorithmConfig(clip_low=1.5)
    assert AlgorithmConfig(name="grpo", advantage="gae").advantage == "gae"  # unusual but allowed
    assert all(f.description for f in AlgorithmConfig.model_fields.values())


def test_trpo_fisher_on_a_subsample_still_keeps_the_whole_batch_in_the_trust_region(tiny_qwen):
    model = copy.deepcopy(tiny_qwen)
    cfg = AlgorithmConfig(name="trpo", trpo_max_kl=0.002, kl_coef=0.0, trpo_fisher_fraction=0.5)
    exp = experience(model, cfg)
    with torch.no_grad():
        old = torch.log_softmax(response_logits(model, exp.batch), dim=-1)
    full = PolicyTrainer(copy.deepcopy(tiny_qwen), cfg.model_copy(update={"trpo_fisher_fraction": 1.0}),
                         seed=0).update(exp)
    stats = PolicyTrainer(model, cfg, seed=0).update(exp)
    assert stats.trpo_accepted == 1.0 and stats.trpo_step_size != full.trpo_step_size
    assert stats.grad_norm == pytest.approx(full.grad_norm)
    with torch.no_grad():
        kl = float(mean_categorical_kl(response_logits(model, exp.batch), old, exp.mask))
    assert kl == pytest.approx(stats.trpo_final_kl, rel=1e-4) and kl <= cfg.trpo_max_kl * (1 + 1e-4)
