"""Rollout -> Experience: padding layout, trainer log-probs, logprob gap, KL placement, advantages."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from orchestrator.run.algo_config import AlgorithmConfig
from orchestrator.step.experience import Rollout, build_experience, pad_sequences, trainer_logprobs
from orchestrator.step.policy import sequence_logprobs
from rl.advantages import group_advantages
from rl.kl import kl_estimate

PAD = 0
PROMPTS = [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5], [6, 7, 8, 9], [6, 7, 8, 9]]
COMPLETIONS = [[10, 11], [12], [13, 14, 15, 16], [17], [18, 19, 20], [21, 22]]
G = 2
# The tiny model (tests/unit/conftest.py) with one torch thread for the whole module.
pytestmark = pytest.mark.usefixtures("one_thread")


def make_rollout(**overrides) -> Rollout:
    fields = {
        "prompt_ids": PROMPTS,
        "completion_ids": COMPLETIONS,
        "generator_logprobs": [[-1.0] * len(c) for c in COMPLETIONS],
        "rewards": torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 2.0]),
        "group_size": G,
    }
    fields.update(overrides)
    return Rollout(**fields)


def direct_logprobs(model, prompt: list[int], completion: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded single-sequence forward: log π of each completion token and the entropy there."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    token = logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    return token, -(logp.exp() * logp).sum(-1)


def test_padding_layout_right_pads_prompt_plus_completion():
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    lengths = [len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert batch.input_ids.shape == (6, max(lengths))
    assert batch.response_length == 4
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        n = len(p) + len(c)
        assert batch.input_ids[i, :n].tolist() == p + c
        assert batch.input_ids[i, n:].eq(PAD).all()
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert batch.position_ids[i, :n].tolist() == list(range(n))
        assert int(batch.response_start[i]) == len(p)
        assert batch.response_mask[i].tolist() == [True] * len(c) + [False] * (4 - len(c))


def test_trainer_and_services_share_one_padding_layout():
    """The reference and value services pad with pad_micro_batch; the trainer's batch must be the same
    tensors, or the step-0 KL between trainer and reference would not be 0."""
    from services.common.batching import pad_micro_batch

    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    rows = [torch.tensor(p + c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    mb = pad_micro_batch(rows, [len(p) for p in PROMPTS], range(len(rows)), pad_id=PAD)
    assert torch.equal(batch.input_ids, mb.input_ids)
    assert torch.equal(batch.attention_mask, mb.attention_mask)
    assert torch.equal(batch.position_ids, mb.position_ids)
    assert torch.equal(batch.response_start, mb.response_start)
    assert torch.equal(batch.response_mask, mb.response_mask.bool())


def test_experience_fields_are_padded_and_zero_past_each_completion(tiny_qwen):
    exp = build_experience(make_rollout(), tiny_qwen, AlgorithmConfig(name="grpo", kl_coef=0.0), pad_token_id=PAD)
    assert exp.mask.tolist()[1] == [1.0, 0.0, 0.0, 0.0]  # a one-token completion
    assert exp.mask.sum().item() == sum(len(c) for c in COMPLETIONS) == exp.num_tokens
    for name in ("old_logprobs", "generator_logprobs", "token_rewards", "advantages", "kl"):
        t = getattr(exp, name)
        assert t.shape == (6, 4), name
        assert t[exp.mask == 0].eq(0).all(), name
    assert exp.ref_logprobs is None and exp.values is None and exp.returns is None
    assert exp.group_size == G


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"completion_ids": [*COMPLETIONS[:-1], []]}, "empty completion"),
        ({"prompt_ids": [[], *PROMPTS[1:]]}, "empty prompt"),
        ({"generator_logprobs": [[-1.0]] * 6}, "generator_logprobs row 0"),
        ({"group_size": 4}, "multiple of group_size"),
        ({"rewards": torch.zeros(5)}, "rewards must be"),
        ({"ref_logprobs": [torch.zeros(1)] * 6}, "ref_logprobs row 0"),
    ],
)
def test_malformed_rollouts_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_rollout(**overrides)


@pytest.mark.parametrize("micro_batch_tokens", [1, 10_000])
def test_trainer_logprobs_equal_a_direct_per_sequence_forward(tiny_qwen, micro_batch_tokens):
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    with torch.no_grad():
        out = sequence_logprobs(tiny_qwen, batch, micro_batch_tokens=micro_batch_tokens)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        want_logp, want_entropy = direct_logprobs(tiny_qwen, p, c)
        torch.testing.assert_close(out.logprobs[i, : len(c)], want_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropy[i, : len(c)], want_entropy, atol=1e-5, rtol=0)
        assert out.logprobs[i, len(c) :].eq(0).all() and out.entropy[i, len(c) :].eq(0).all()


def test_logprob_gap_is_zero_when_the_generator_reports_the_trainers_logprobs(tiny_qwen):
    with torch.no_grad():
        trainer = sequence_logprobs(tiny_qwen, pad_sequences(PROMPTS, COMPLETIONS, pad_token_id=PAD)).logprobs
    rows = [trainer[i, : len(c)].tolist() for i, c in enumerate(COMPLETIONS)]
    cfg = AlgorithmConfig(kl_coef=0.0)
    exp = build_experience(make_rollout(generator_logprobs=rows), tiny_qwen, cfg, pad_token_id=PAD)
    assert exp.logprob_gap.mean < 1e-6 and exp.logprob_gap.max < 1e-6
    rows[2][3] += 0.5  # one token off by 0.5 out of 13
    exp = build_experience(make_rollout(generator_logprobs=rows), tiny_qwen, cfg, pad_token_id=PAD)
    assert exp.logprob_gap.max == pytest.approx(0.5, abs=1e-6)
    assert exp.logprob_gap.mean == pytest.approx(0.5 / 13, abs=1e-6)


def test_old_logprobs_come_from_the_trainer_or_the_generator(tiny_qwen):
    rollout = make_rollout()
    trainer = build_experience(rollout, tiny_qwen, AlgorithmConfig(kl_coef=0.0), pad_token_id=PAD)
    generator = build_experience(
        rollout, tiny_qwen, AlgorithmConfig(kl_coef=0.0, old_logprobs="generator"), pad_token_id=PAD
    )
    assert torch.equal(generator.old_logprobs, generator.generator_logprobs)
    assert torch.equal(generator.old_logprobs, -generator.mask)
    assert not torch.equal(trainer.old_logprobs, generator.old_logprobs)
    assert trainer.logprob_gap == generator.logprob_gap  # the gap is measured either way


def test_group_advantages_are_broadcast_over_each_completions_tokens(tiny_qwen):
    cfg = AlgorithmConfig(name="grpo", kl_coef=0.0)
    exp = build_experience(make_rollout(), tiny_qwen, cfg, pad_token_id=PAD)
    per_sequence = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 2.0]), G)
    assert per_sequence[2] == 0 and per_sequence[3] == 0  # equal rewards in a group: exactly 0
    assert torch.equal(exp.advantages, torch.where(exp.mask.bool(), per_sequence[:, None], 0.0))
    # The score sits on each completion's last real token.
    assert exp.token_rewards[2].tolist() == [0.0, 0.0, 0.0, 0.5]
    assert exp.token_rewards[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # reward 0 on the one-token answer


def test_gae_with_values_gives_monte_carlo_advantages_at_gamma_lambda_one(tiny_qwen):
    values = [torch.linspace(0.1, 0.4, len(c)) for c in COMPLETIONS]
    cfg = AlgorithmConfig(name="ppo", kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    rollout = make_rollout(values=values)
    exp = build_experience(rollout, tiny_qwen, cfg, pad_token_id=PAD)
    for i, c in enumerate(COMPLETIONS):
        # λ = γ = 1: A_t = score - V(s_t), returns = score on every real token.
        torch.testing.assert_close(
            exp.advantages[i, : len(c)], rollout.rewards[i] - values[i], atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            exp.returns[i, : len(c)], rollout.rewards[i].expand(len(c)), atol=1e-6, rtol=0
        )
    assert exp.returns[exp.mask == 0].eq(0).all()
    whitened = build_experience(
        rollout, tiny_qwen, cfg.model_copy(update={"whiten_advantages": True}), pad_token_id=PAD
    )
    real = whitened.advantages[whitened.mask.bool()]
    assert abs(float(real.mean())) < 1e-6 and float(real.std()) == pytest.approx(1.0, abs=1e-4)


def test_gae_without_values_and_kl_without_reference_say_what_to_change(tiny_qwen):
    with pytest.raises(ValueError, match="value service"):
        build_experience(make_rollout(), tiny_qwen, AlgorithmConfig(name="ppo", kl_coef=0.0), pad_token_id=PAD)
    with pytest.raises(ValueError, match="reference service"):
        build_experience(make_rollout(), tiny_qwen, AlgorithmConfig(name="grpo"), pad_token_id=PAD)


def _ref_rows(exp_old: torch.Tensor) -> list[torch.Tensor]:
    # A reference that differs from the policy by a known per-token amount.
    return [exp_old[i, : len(c)] - 0.1 * (1 + torch.arange(len(c))) for i, c in enumerate(COMPLETIONS)]


@pytest.mark.parametrize("advantage", ["gae", "group_zscore"])
def test_kl_placement_reward_shapes_rewards_and_loss_placement_does_not(tiny_qwen, advantage):
    values = [torch.zeros(len(c)) for c in COMPLETIONS]
    base = AlgorithmConfig(name="ppo", advantage=advantage, whiten_advantages=False, gamma=1.0, lam=1.0)
    probe = build_experience(
        make_rollout(values=values), tiny_qwen, base.model_copy(update={"kl_coef": 0.0}), pad_token_id=PAD
    )
    rollout = make_rollout(values=values, ref_logprobs=_ref_rows(probe.old_logprobs))
    in_reward = build_experience(rollout, tiny_qwen, base.model_copy(update={"kl_coef": 0.5}), pad_token_id=PAD)
    in_loss = build_experience(
        rollout, tiny_qwen, base.model_copy(update={"kl_coef": 0.5, "kl_placement": "loss"}), pad_token_id=PAD
    )
    want_kl = kl_estimate(probe.old_logprobs, in_reward.ref_logprobs, probe.mask, "k1").per_token
    torch.testing.assert_close(in_reward.kl, want_kl)
    torch.testing.assert_close(in_reward.kl, 0.1 * (1 + torch.arange(4.0)) * probe.mask)  # k1 = logp - ref
    assert torch.equal(in_loss.kl, in_reward.kl)  # measured either way
    assert in_reward.kl_ref == pytest.approx(float(want_kl.sum() / probe.mask.sum()), rel=1e-6)
    torch.testing.assert_close(in_reward.token_rewards, probe.token_rewards - 0.5 * want_kl)
    assert torch.equal(in_loss.token_rewards, probe.token_rewards)
    assert torch.equal(in_loss.advantages, probe.advantages)
    if advantage == "group_zscore":
        shaped = group_advantages(rollout.rewards - 0.5 * want_kl.sum(dim=1), G)
        torch.testing.assert_close(in_reward.advantages, shaped[:, None] * probe.mask)
    else:  # λ = γ = 1, V = 0: A_t = Σ_{s >= t} r_s
        want = in_reward.token_rewards.flip(1).cumsum(1).flip(1) * probe.mask
        torch.testing.assert_close(in_reward.advantages, want)


def test_experience_is_frozen(tiny_qwen):
    exp = build_experience(make_rollout(), tiny_qwen, AlgorithmConfig(kl_coef=0.0), pad_token_id=PAD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        exp.advantages = exp.mask  # type: ignore[misc]


def test_policy_logprobs_computed_ahead_give_the_same_experience(tiny_qwen):
    # The loop computes the trainer's log-probs while the services score the samples; passing them
    # in must change nothing, and log-probs of other samples must be refused, not silently used.
    rollout = make_rollout()
    cfg = AlgorithmConfig(name="grpo", kl_coef=0.0)
    ahead = trainer_logprobs(rollout.prompt_ids, rollout.completion_ids, tiny_qwen, pad_token_id=PAD)
    inline = build_experience(rollout, tiny_qwen, cfg, pad_token_id=PAD)
    passed = build_experience(rollout, tiny_qwen, cfg, pad_token_id=PAD, policy_logprobs=ahead)
    assert torch.equal(inline.old_logprobs, passed.old_logprobs)
    assert torch.equal(inline.advantages, passed.advantages)
    assert inline.logprob_gap == passed.logprob_gap
    with pytest.raises(ValueError, match="policy_logprobs has shape"):
        build_experience(rollout, tiny_qwen, cfg, pad_token_id=PAD, policy_logprobs=ahead[:, :-1])
