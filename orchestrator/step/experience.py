"""From what the services returned for one step (a ``Rollout``) to the padded batch the update
trains on (an ``Experience``): old log-probs, KL to the reference, token rewards, advantages.

Shapes: ``B`` = prompts x G sequences (prompt-major: each prompt's G samples are contiguous rows),
``L`` padded prompt ++ response length, ``T`` longest response. ``mask`` is 1 on real response
tokens. Every formula comes from orchestrator.algorithms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from orchestrator.run.algo_config import AlgorithmConfig
from orchestrator.step.policy import DEFAULT_MICRO_BATCH_TOKENS, TokenBatch, sequence_logprobs
from rl.advantages import gae, group_advantages, kl_penalised_scores, masked_whiten, token_rewards
from rl.kl import kl_estimate
from rl.masked import lookup, zero_padding
from services.common.batching import right_pad


@dataclass(frozen=True)
class Rollout:
    """What the services returned for one step. Rows are prompt-major: B = prompts x group_size."""

    prompt_ids: list[list[int]]  # [B] prompt token ids, each >= 1 token
    completion_ids: list[list[int]]  # [B] sampled response ids, each >= 1 token
    generator_logprobs: list[list[float]]  # [B] log π_gen of each sampled token, aligned with completion_ids
    rewards: Tensor  # [B] float32 sequence scores (weighted sum over reward endpoints)
    group_size: int  # G samples per prompt
    ref_logprobs: list[Tensor] | None = None  # [B] rows [C_i] log π_ref of each sampled token
    values: list[Tensor] | None = None  # [B] rows [C_i] critic V(s_t) at each response token
    finished: list[bool] | None = None  # [B] True if stopped by EOS / stop string, False if cut by length

    def __post_init__(self) -> None:
        b = len(self.prompt_ids)
        if b == 0:
            raise ValueError("empty rollout: at least one prompt's samples are needed")
        if self.group_size < 1 or b % self.group_size:
            raise ValueError(
                f"{b} rows is not a multiple of group_size={self.group_size}: keep G samples per prompt"
            )
        _check_rows("completion_ids", self.completion_ids, b)
        _check_rows("generator_logprobs", self.generator_logprobs, b)
        if tuple(self.rewards.shape) != (b,):
            raise ValueError(f"rewards must be [B]=[{b}], got shape {tuple(self.rewards.shape)}")
        for i, (p, c) in enumerate(zip(self.prompt_ids, self.completion_ids, strict=True)):
            if len(p) == 0:
                raise ValueError(
                    f"row {i}: empty prompt; a response token is scored from the position before it"
                )
            if len(c) == 0:
                raise ValueError(
                    f"row {i}: empty completion; the generator always returns >= 1 token, so this is a bug upstream"
                )
        lengths = [len(c) for c in self.completion_ids]
        for name in ("generator_logprobs", "ref_logprobs", "values"):
            rows = getattr(self, name)
            if rows is not None:
                _check_rows(name, rows, b)
                bad = [i for i, (r, n) in enumerate(zip(rows, lengths, strict=True)) if len(r) != n]
                if bad:
                    raise ValueError(
                        f"{name} row {bad[0]} has {len(rows[bad[0]])} entries, its completion {lengths[bad[0]]}"
                    )
        if self.finished is not None:
            _check_rows("finished", self.finished, b)


def _check_rows(name: str, rows: Sequence[object], b: int) -> None:
    if len(rows) != b:
        raise ValueError(f"{name} has {len(rows)} rows, expected B={b} (one per completion)")


@dataclass(frozen=True)
class LogprobGap:
    """|generator - trainer| log-prob of the sampled tokens over real tokens: sampler/trainer mismatch."""

    mean: float
    max: float


@dataclass(frozen=True)
class Experience:
    """One step's training batch (OpenRLHF style). Per-token tensors are over response tokens."""

    input_ids: Tensor  # [B, L] int64 prompt ++ completion, right-padded with the pad id
    attention_mask: Tensor  # [B, L] int64 1 on real tokens
    position_ids: Tensor  # [B, L] int64 0..len-1 on real tokens
    response_start: Tensor  # [B] int64 = prompt length: index of the first response token
    mask: Tensor  # [B, T] float32 1 on real response tokens
    old_logprobs: Tensor | None  # [B, T] log π_old(a_t|s_t), the ratio's denominator; None: the update's own forward
    generator_logprobs: Tensor  # [B, T] log π_gen(a_t|s_t) reported by the sampler
    ref_logprobs: Tensor | None  # [B, T] log π_ref(a_t|s_t), None without a reference
    values: Tensor | None  # [B, T] V(s_t) at rollout time, None without a critic
    rewards: Tensor  # [B] float32 sequence scores
    kl: Tensor | None  # [B, T] per-token KL(π_old || π_ref) (cfg.kl_estimator), 0 without a reference; None: pending
    token_rewards: Tensor  # [B, T] score on the last real token, - kl_coef * kl when kl_placement = reward
    advantages: Tensor  # [B, T] A_t (group advantages broadcast over tokens), 0 at padding
    returns: Tensor | None  # [B, T] GAE value targets A_t + V(s_t), None for group advantages
    group_size: int  # G samples per prompt
    logprob_gap: LogprobGap | None  # generator vs trainer log-probs of the sampled tokens; None: pending
    kl_ref: float | None  # mean of kl over real tokens; None: pending

    @property
    def pending(self) -> bool:
        """True when the old log-probs (and kl, logprob_gap, kl_ref) come from the update's own forward."""
        return self.old_logprobs is None

    def completed(self, old_logprobs: Tensor | None, cfg: AlgorithmConfig) -> Experience:
        """See ``complete_experience``."""
        return complete_experience(self, old_logprobs, cfg)

    @property
    def batch(self) -> TokenBatch:
        """The token rows as a TokenBatch for forward passes."""
        return TokenBatch(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            response_start=self.response_start,
            response_length=self.mask.shape[1],
        )

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Real response tokens in the batch."""
        return int(self.mask.sum())


def pad_rows(
    rows: Sequence[Sequence[float] | Tensor], width: int, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Right-pad ragged rows into [B, width] with zeros."""
    if rows and not any(isinstance(r, Tensor) for r in rows):  # lists (a service's answer): one tensor, 10x faster
        return torch.tensor([[*r, *[0.0] * (width - len(r))] for r in rows], dtype=dtype).reshape(len(rows), width)
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        values = torch.as_tensor(row, dtype=dtype).reshape(-1)
        out[i, : values.numel()] = values
    return out


def pad_sequences(
    prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *, pad_token_id: int
) -> TokenBatch:
    """Prompt ++ completion rows, right-padded to the longest with ``pad_token_id`` (``right_pad``:
    the layout of the reference and value services)."""
    rows = [torch.as_tensor([*p, *c], dtype=torch.int64) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    padded = right_pad(rows, pad_id=pad_token_id)
    return TokenBatch(
        input_ids=padded.input_ids,
        attention_mask=padded.attention_mask,
        position_ids=padded.position_ids,
        response_start=torch.as_tensor([len(p) for p in prompt_ids], dtype=torch.int64),
        response_length=max(len(c) for c in completion_ids),
    )


def logprob_gap(generator_logprobs: Tensor, trainer_logprobs: Tensor, mask: Tensor) -> LogprobGap:
    """Mean and max |generator - trainer| over real tokens ([B, T] each)."""
    real = mask.bool()
    gap = zero_padding((generator_logprobs - trainer_logprobs).abs(), real)
    count = int(real.sum())
    return LogprobGap(mean=float(gap.sum()) / max(count, 1), max=float(gap.max()) if count else 0.0)


@dataclass(frozen=True)
class _AdvantageInputs:
    rewards: Tensor  # [B]
    mask: Tensor  # [B, T] float
    kl: Tensor  # [B, T] per-token KL estimate, 0 at padding
    values: Tensor | None  # [B, T]
    group_size: int


@dataclass(frozen=True)
class _Advantages:
    token_rewards: Tensor  # [B, T]
    advantages: Tensor  # [B, T]
    returns: Tensor | None  # [B, T]


def _reward_kl_coef(cfg: AlgorithmConfig) -> float:
    """The KL weight inside the rewards: kl_coef when the KL is placed in the reward, else 0."""
    return cfg.kl_coef if cfg.kl_placement == "reward" else 0.0


def _gae_advantages(x: _AdvantageInputs, cfg: AlgorithmConfig) -> _Advantages:
    if x.values is None:
        raise ValueError(
            "advantage: gae needs the critic's values: configure the value service, or use advantage: group_zscore"
        )
    rewards = token_rewards(x.rewards, x.mask, kl=x.kl, kl_coef=_reward_kl_coef(cfg))
    out = gae(rewards, x.values, x.mask, gamma=cfg.gamma, lam=cfg.lam)
    return _Advantages(token_rewards=rewards, advantages=out.advantages, returns=out.returns)


def _group_zscore_advantages(x: _AdvantageInputs, cfg: AlgorithmConfig) -> _Advantages:
    coef = _reward_kl_coef(cfg)
    sequence_rewards = kl_penalised_scores(x.rewards, x.kl, x.mask, kl_coef=coef)
    per_sequence = group_advantages(sequence_rewards, x.group_size, scale=cfg.group_scale)
    advantages = zero_padding(per_sequence[:, None].expand_as(x.mask), x.mask.bool())
    rewards = token_rewards(x.rewards, x.mask, kl=x.kl, kl_coef=coef)
    return _Advantages(token_rewards=rewards, advantages=advantages, returns=None)


# The config literal -> advantage estimator table.
ADVANTAGE_ESTIMATORS: dict[str, Callable[[_AdvantageInputs, AlgorithmConfig], _Advantages]] = {
    "gae": _gae_advantages,
    "group_zscore": _group_zscore_advantages,
}


def _old_from_trainer(trainer: Tensor, generator: Tensor) -> Tensor:
    return trainer


def _old_from_generator(trainer: Tensor, generator: Tensor) -> Tensor:
    return generator


# The config literal -> source of the old log-probs (the PPO ratio's denominator).
OLD_LOGPROB_SOURCES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "trainer": _old_from_trainer,
    "generator": _old_from_generator,
}


def complete_experience(exp: Experience, old_logprobs: Tensor | None, cfg: AlgorithmConfig) -> Experience:
    """A pending experience with the old log-probs [B, T] its update took from its loss forward, and the
    KL to the reference, its mean and the generator-vs-trainer gap measured on them."""
    if old_logprobs is None:
        raise ValueError("a pending experience needs the old log-probs of its update (UpdateStats.old_logprobs)")
    if not exp.pending:
        raise ValueError("the experience has its old log-probs already")
    old_logprobs = zero_padding(old_logprobs.detach().cpu(), exp.mask.bool())
    kl = _kl(old_logprobs, exp.ref_logprobs, exp.mask, cfg)
    return replace(exp, old_logprobs=old_logprobs, kl=kl, kl_ref=float(kl.sum()) / max(int(exp.mask.sum()), 1),
                   logprob_gap=logprob_gap(exp.generator_logprobs, old_logprobs, exp.mask))


def _kl(old_logprobs: Tensor, ref_logprobs: Tensor | None, mask: Tensor, cfg: AlgorithmConfig) -> Tensor:
    if ref_logprobs is None:
        return torch.zeros_like(mask)
    return kl_estimate(old_logprobs, ref_logprobs, mask, cfg.kl_estimator).per_token


def trainer_logprobs(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    policy_model: torch.nn.Module,
    *,
    pad_token_id: int,
    micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS,
) -> Tensor:
    """The policy's log-probs of the sampled tokens (no grad): [B, T] on the CPU, T the longest
    completion, 0 on padding. Needs only the samples, so the loop runs it while the reward,
    reference and value services work on the same samples."""
    batch = pad_sequences(prompt_ids, completion_ids, pad_token_id=pad_token_id)
    device = next(policy_model.parameters()).device
    with torch.no_grad():
        return sequence_logprobs(
            policy_model, batch.to(device), micro_batch_tokens=micro_batch_tokens, with_entropy=False
        ).logprobs.cpu()


def build_experience(
    rollout: Rollout,
    policy_model: torch.nn.Module,
    cfg: AlgorithmConfig,
    *,
    pad_token_id: int,
    micro_batch_tokens: int | None = None,
    policy_logprobs: Tensor | None = None,
    from_update: bool = False,
) -> Experience:
    """Pad the rollout, recompute the policy's log-probs (no grad), estimate the KL to the reference
    and compute advantages with ``cfg.advantage``.

    The trainer's log-probs are computed every step, even with ``old_logprobs: generator``, because
    the generator/trainer gap is a metric every step. ``policy_logprobs`` passes them in when they
    were computed already (``trainer_logprobs`` of the same samples and model, [B, T]). With
    ``from_update`` (only where ``cfg.old_logprobs_from_update(B)`` holds) there is no such pass: the experience
    is pending, the update takes them from its loss forward and ``complete_experience`` adds them.

    Raises:
        ValueError: GAE without values, or a non-zero kl_coef without reference log-probs, or
            ``policy_logprobs`` of another shape than the padded rollout.
    """
    batch = pad_sequences(rollout.prompt_ids, rollout.completion_ids, pad_token_id=pad_token_id)
    trainer_lp = _trainer_logprobs(rollout, batch, policy_model, cfg, policy_logprobs, from_update,
                                   pad_token_id=pad_token_id, micro_batch_tokens=micro_batch_tokens)
    width = batch.response_length
    mask = batch.response_mask.to(torch.float32)
    generator_logprobs = pad_rows(rollout.generator_logprobs, width)
    old_logprobs = None if from_update else lookup(OLD_LOGPROB_SOURCES, cfg.old_logprobs, "old_logprobs source")(
        trainer_lp, generator_logprobs
    )
    ref_logprobs = _ref_logprobs(rollout, width, cfg)
    # Pending: the KL enters no advantage (cfg.old_logprobs_from_update), so zeros stand in until completed.
    kl = torch.zeros_like(mask) if old_logprobs is None else _kl(old_logprobs, ref_logprobs, mask, cfg)
    values = None if rollout.values is None else pad_rows(rollout.values, width)
    rewards = rollout.rewards.detach().to(torch.float32).cpu()
    inputs = _AdvantageInputs(rewards=rewards, mask=mask, kl=kl, values=values, group_size=rollout.group_size)
    adv = lookup(ADVANTAGE_ESTIMATORS, cfg.advantage, "advantage estimator")(inputs, cfg)
    advantages = masked_whiten(adv.advantages, mask) if cfg.whiten_advantages else adv.advantages
    pending = old_logprobs is None
    return Experience(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        response_start=batch.response_start,
        mask=mask,
        old_logprobs=old_logprobs,
        generator_logprobs=zero_padding(generator_logprobs, mask.bool()),
        ref_logprobs=ref_logprobs,
        values=values,
        rewards=rewards,
        kl=None if pending else kl,
        token_rewards=adv.token_rewards,
        advantages=advantages,
        returns=adv.returns,
        group_size=rollout.group_size,
        logprob_gap=None if pending else logprob_gap(generator_logprobs, trainer_lp, mask),
        kl_ref=None if pending else float(kl.sum()) / max(int(mask.sum()), 1),
    )



def _trainer_logprobs(
    rollout: Rollout,
    batch: TokenBatch,
    policy_model: torch.nn.Module,
    cfg: AlgorithmConfig,
    policy_logprobs: Tensor | None,
    from_update: bool,
    *,
    pad_token_id: int,
    micro_batch_tokens: int | None,
) -> Tensor | None:
    """``build_experience``'s trainer log-probs [B, T]: ``policy_logprobs`` checked against the padded
    ``batch``, or computed when None (``micro_batch_tokens`` per pass, default ``cfg.micro_batch_tokens``);
    with ``from_update`` (checked to be allowed) none are needed."""
    if from_update:
        if not cfg.old_logprobs_from_update(len(rollout.completion_ids)):
            raise ValueError("from_update needs an update of one on-policy step: see "
                             "AlgorithmConfig.old_logprobs_from_update")
    elif policy_logprobs is None:
        policy_logprobs = trainer_logprobs(rollout.prompt_ids, rollout.completion_ids, policy_model,
                                           pad_token_id=pad_token_id,
                                           micro_batch_tokens=micro_batch_tokens or cfg.micro_batch_tokens)
    elif tuple(policy_logprobs.shape) != (len(rollout.completion_ids), batch.response_length):
        raise ValueError(f"policy_logprobs has shape {tuple(policy_logprobs.shape)}, the rollout pads to "
                         f"{(len(rollout.completion_ids), batch.response_length)}")
    return policy_logprobs


def _ref_logprobs(rollout: Rollout, width: int, cfg: AlgorithmConfig) -> Tensor | None:
    """The reference's log-probs padded to [B, width]; None without a reference, which a non-zero
    kl_coef refuses."""
    ref_logprobs = None if rollout.ref_logprobs is None else pad_rows(rollout.ref_logprobs, width)
    if ref_logprobs is None and cfg.kl_coef > 0:
        raise ValueError(
            f"kl_coef={cfg.kl_coef} needs the reference's log-probs: configure the reference service, or set kl_coef: 0"
        )
    return ref_logprobs

@dataclass(frozen=True)
class ValueTrainInputs:
    """Ragged rows for Value.TrainStep, one per completion (length C_i)."""

    returns: list[Tensor]  # [B] rows [C_i] float32 GAE return targets
    old_values: list[Tensor]  # [B] rows [C_i] float32 values at rollout time
    mask: list[Tensor]  # [B] rows [C_i] float32 1 = train on this token

    def __iter__(self) -> Iterator[list[Tensor]]:
        """Unpacks as ``returns, old_values, mask`` (attribute access reads better)."""
        return iter((self.returns, self.old_values, self.mask))


def value_train_inputs(exp: Experience) -> ValueTrainInputs:
    """The critic's targets from a GAE experience, as rows trimmed to each completion's length."""
    if exp.returns is None or exp.values is None:
        raise ValueError("the critic trains on GAE returns: use advantage: gae (with the value service)")
    lengths = exp.mask.sum(dim=1).to(torch.int64).tolist()
    return ValueTrainInputs(
        returns=[exp.returns[i, :n].clone() for i, n in enumerate(lengths)],
        old_values=[exp.values[i, :n].clone() for i, n in enumerate(lengths)],
        mask=[exp.mask[i, :n].clone() for i, n in enumerate(lengths)],
    )
