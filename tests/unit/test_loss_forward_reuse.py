"""One on-policy optimizer step takes its old log-probs from the loss forward (issue 14): the same
update as with a separate log-prob pass, the gap and KL metrics measured on that forward, the
forward run ahead (while the services score) giving the same update, and refusals where the ratio
needs the separate pass."""

from __future__ import annotations

import copy

import pytest
import torch

from orchestrator.run.algo_config import AlgorithmConfig
from orchestrator.step.experience import Rollout, build_experience, trainer_logprobs
from orchestrator.step.trainer import PolicyTrainer

PAD = 0
PROMPTS = [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
COMPLETIONS = [[10, 11, 12], [13], [14, 15], [16, 17, 18, 19]]
pytestmark = pytest.mark.usefixtures("one_thread")
GRPO = AlgorithmConfig(name="grpo", lr=1e-2, kl_coef=0.04, aggregation="token_mean")


def rollout(model) -> Rollout:
    """Fixed samples, generator log-probs -2, a reference 0.1 below the model's own log-probs."""
    own = trainer_logprobs(PROMPTS, COMPLETIONS, model, pad_token_id=PAD)
    return Rollout(prompt_ids=PROMPTS, completion_ids=COMPLETIONS,
                   generator_logprobs=[[-2.0] * len(c) for c in COMPLETIONS], rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
                   group_size=2, ref_logprobs=[own[i, : len(c)] - 0.1 for i, c in enumerate(COMPLETIONS)])


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"name": "grpo"}, True),
    ({"name": "grpo", "reuse_loss_forward": False}, False),
    ({"name": "grpo", "epochs": 2}, False),
    ({"name": "grpo", "minibatch_size": 2}, False),  # two optimizer steps over B = 4
    ({"name": "grpo", "minibatch_size": 4}, True),
    ({"name": "grpo", "old_logprobs": "generator"}, False),
    ({"name": "grpo", "kl_placement": "reward", "kl_estimator": "k1"}, False),  # the KL enters the advantages
    ({"name": "grpo", "kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.0}, True),
    ({"name": "ppo"}, False),  # 4 epochs, KL in the reward
    ({"name": "ppo", "epochs": 1, "kl_placement": "loss"}, True),
    ({"name": "trpo"}, False),
])
def test_the_separate_pass_is_skipped_only_for_one_on_policy_step(overrides, expected):
    assert AlgorithmConfig(**overrides).old_logprobs_from_update(4) is expected


def test_old_logprobs_from_the_loss_forward_give_the_update_and_metrics_of_the_separate_pass(tiny_qwen):
    separate_model, reuse_model = copy.deepcopy(tiny_qwen), copy.deepcopy(tiny_qwen)
    ro = rollout(tiny_qwen)
    separate = build_experience(ro, separate_model, GRPO, pad_token_id=PAD)
    pending = build_experience(ro, reuse_model, GRPO, pad_token_id=PAD, from_update=True)
    assert pending.pending and pending.kl is None and pending.logprob_gap is None and pending.kl_ref is None
    torch.testing.assert_close(pending.advantages, separate.advantages, rtol=0, atol=0)

    want = PolicyTrainer(separate_model, GRPO, seed=0).update(separate)
    got = PolicyTrainer(reuse_model, GRPO, seed=0).update(pending)
    assert want.old_logprobs is None and got.old_logprobs is not None
    assert "old_logprobs" not in got.as_dict()
    for (name, p), q in zip(reuse_model.named_parameters(), separate_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-3 * GRPO.lr, msg=name)
    for key in ("policy_loss", "kl_ref", "entropy", "grad_norm"):
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-5, abs=1e-7), key
    assert got.clipfrac == 0.0 and got.approx_kl == 0.0  # ratio exactly 1

    done = pending.completed(got.old_logprobs, GRPO)
    torch.testing.assert_close(done.old_logprobs, separate.old_logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(done.kl, separate.kl, rtol=0, atol=1e-6)
    assert done.kl_ref == pytest.approx(separate.kl_ref, abs=1e-6)
    assert done.logprob_gap.mean == pytest.approx(separate.logprob_gap.mean, abs=1e-6)
    assert done.logprob_gap.max == pytest.approx(separate.logprob_gap.max, abs=1e-6)
    assert done.kl_ref > 0  # the reference sits 0.1 below: a real KL is measured
    with pytest.raises(ValueError, match="already"):
        done.completed(got.old_logprobs, GRPO)


def test_the_forward_run_ahead_gives_the_same_update(tiny_qwen):
    ahead_model, plain_model = copy.deepcopy(tiny_qwen), copy.deepcopy(tiny_qwen)
    ro = rollout(tiny_qwen)
    ahead_trainer, plain_trainer = PolicyTrainer(ahead_model, GRPO, seed=0), PolicyTrainer(plain_model, GRPO, seed=0)
    for _ in range(2):  # the second step checks the ahead forward saw the updated parameters
        assert ahead_trainer.forward_samples(PROMPTS, COMPLETIONS, pad_token_id=PAD) is None
        assert ahead_trainer._ahead is not None
        got = ahead_trainer.update(build_experience(ro, ahead_model, GRPO, pad_token_id=PAD, from_update=True))
        assert ahead_trainer._ahead is None  # used once
        want = plain_trainer.update(build_experience(ro, plain_model, GRPO, pad_token_id=PAD, from_update=True))
        # The same gradients up to float reassociation (the rows run in another order). Parameters are
        # not compared: Adam turns the ~1e-10 noise of a gradient that is exactly 0 in exact arithmetic
        # (the key biases: softmax ignores a shift) into a step of ±lr.
        for (name, p), q in zip(ahead_model.named_parameters(), plain_model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
        plain_model.load_state_dict(ahead_model.state_dict())  # the next step from the same parameters
        torch.testing.assert_close(got.old_logprobs, want.old_logprobs, rtol=0, atol=1e-6)
        assert got.policy_loss == pytest.approx(want.policy_loss, abs=1e-7)
    assert ahead_trainer._shuffle.get_state().equal(plain_trainer._shuffle.get_state())  # same resumable state


def test_a_forward_run_ahead_on_other_rows_or_older_parameters_is_not_used(tiny_qwen):
    model = copy.deepcopy(tiny_qwen)
    trainer = PolicyTrainer(model, GRPO, seed=0)
    trainer.forward_samples(PROMPTS[:2], COMPLETIONS[:2], pad_token_id=PAD)  # other rows
    exp = build_experience(rollout(model), model, GRPO, pad_token_id=PAD, from_update=True)
    assert trainer._claim_ahead(exp) is None
    trainer.forward_samples(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    trainer.updates += 1  # as if an update ran in between
    assert trainer._claim_ahead(exp) is None


def test_the_separate_pass_still_runs_where_the_ratio_needs_it(tiny_qwen):
    ppo = AlgorithmConfig(name="ppo", kl_coef=0.0)  # 4 epochs: the ratio moves after the first step
    lp = PolicyTrainer(copy.deepcopy(tiny_qwen), ppo, seed=0).forward_samples(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    torch.testing.assert_close(lp, trainer_logprobs(PROMPTS, COMPLETIONS, tiny_qwen, pad_token_id=PAD))
    with pytest.raises(ValueError, match="one on-policy step"):
        build_experience(rollout(tiny_qwen), tiny_qwen, ppo, pad_token_id=PAD, from_update=True)


def test_a_pending_experience_is_refused_by_updates_of_several_steps_and_trpo(tiny_qwen):
    pending = build_experience(rollout(tiny_qwen), tiny_qwen, GRPO, pad_token_id=PAD, from_update=True)
    two_epochs = GRPO.model_copy(update={"epochs": 2})
    with pytest.raises(ValueError, match="one optimizer step"):
        PolicyTrainer(copy.deepcopy(tiny_qwen), two_epochs, seed=0).update(pending)
    trpo = AlgorithmConfig(name="trpo", kl_coef=0.0)
    with pytest.raises(ValueError, match="TRPO"):
        PolicyTrainer(copy.deepcopy(tiny_qwen), trpo, seed=0).update(pending)
