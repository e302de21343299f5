"""TrainStep pieces: validating per-token targets, the pre-update statistics, one optimizer step.

Shapes: B sequences, rows of n_i = len_i - response_start_i response tokens; in a micro-batch
[b, T] right-padded with a response mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.losses import value_loss
from services.common.batching import MicroBatch, micro_batches, unbatch
from services.common.codec import RaggedTensor
from services.common.errors import InvalidArgument
from services.value.model import Critic

RowsLike = RaggedTensor | Sequence[Tensor] | Sequence[Sequence[float]]


@dataclass(frozen=True)
class Targets:
    """Per-response-token training inputs, one row per sequence (fp32 CPU)."""

    returns: list[Tensor]  # [B] rows of n_i: regression targets R
    old_values: list[Tensor]  # [B] rows of n_i: V at rollout time (= returns' shape; zeros when unclipped)
    mask: list[Tensor]  # [B] rows of n_i: 1 = train on this token


def _rows(x: RowsLike, field: str, counts: Sequence[int], *, binary: bool = False) -> list[Tensor]:
    rows = x.rows() if isinstance(x, RaggedTensor) else [torch.as_tensor(r) for r in x]
    if len(rows) != len(counts):
        raise InvalidArgument(field, f"has {len(rows)} rows for {len(counts)} sequences; send one per sequence")
    out = []
    for i, (r, n) in enumerate(zip(rows, counts, strict=True)):
        r = r.reshape(-1).to(torch.float32)
        if r.numel() != n:
            raise InvalidArgument(field, f"row {i} has {r.numel()} values but the sequence has {n} response tokens")
        if not bool(torch.isfinite(r).all()):
            raise InvalidArgument(field, f"row {i} holds NaN or infinite values")
        if binary and not bool(((r == 0) | (r == 1)).all()):
            raise InvalidArgument(field, f"row {i} holds values other than 0 and 1")
        out.append(r)
    return out


def check_targets(counts: Sequence[int], returns: RowsLike, old_values: RowsLike | None,
                  mask: RowsLike | None, clip_range: float | None) -> Targets:
    """Validate TrainStep's per-token inputs against the response lengths `counts` [B].

    Raises:
        InvalidArgument naming returns / old_values / mask / clip_range: wrong row count or length,
        NaN or inf, a mask that is not 0/1, clip_range <= 0 or non-finite, old_values missing while
        clip_range is set.
    """
    if clip_range is not None and not (math.isfinite(clip_range) and clip_range > 0):
        raise InvalidArgument("clip_range", f"must be a finite number > 0 (or unset for the unclipped loss), got {clip_range}")
    r = _rows(returns, "returns", counts)
    if old_values is None:
        if clip_range is not None:
            raise InvalidArgument("old_values", "required when clip_range is set (the clip is around them)")
        old = [torch.zeros_like(x) for x in r]
    else:
        old = _rows(old_values, "old_values", counts)
    m = [torch.ones_like(x) for x in r] if mask is None else _rows(mask, "mask", counts, binary=True)
    return Targets(r, old, m)


@dataclass(frozen=True)
class Stats:
    """Clipped value loss and diagnostics of given values against the targets (no gradient)."""

    loss: float  # token-mean clipped loss over real tokens
    clip_fraction: float  # share of real tokens where the clipped branch is strictly larger
    explained_variance: float  # 1 - Var(R - V) / Var(R) over real tokens; NaN when Var(R) = 0 or no tokens


def statistics(values: Sequence[Tensor], targets: Targets, clip_range: float | None) -> Stats:
    """Stats of `values` ([B] rows of n_i) against `targets`, all rows flattened into one [1, N] batch."""
    v = torch.cat([x.float().cpu() for x in values]).unsqueeze(0)
    r = torch.cat(targets.returns).unsqueeze(0)
    old = torch.cat(targets.old_values).unsqueeze(0)
    m = torch.cat(targets.mask).unsqueeze(0)
    out = value_loss(v, old, r, m, clip=clip_range, aggregation="token_mean")
    real = m.bool()
    if int(real.sum()) == 0:
        return Stats(0.0, 0.0, math.nan)
    var_r = r[real].var(unbiased=False)
    ev = math.nan if float(var_r) == 0.0 else float(1 - (r[real] - v[real]).var(unbiased=False) / var_r)
    return Stats(float(out.loss), float(out.clipfrac), ev)


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step over a minibatch."""

    grad_norm: float  # total gradient norm before clipping
    applied: bool  # False when skipped: no real tokens, or a non-finite gradient
    values: list[Tensor] | None  # [b] rows of the forward pass (detached, before the step), minibatch order


def optimizer_step(
    critic: Critic,
    optimizer: torch.optim.Optimizer,
    rows: Sequence[Tensor],
    starts: Sequence[int],
    targets: Targets,
    *,
    clip_range: float | None,
    max_batch_tokens: int,
    max_grad_norm: float | None,
    pad_id: int,
    device: torch.device,
) -> StepOutcome:
    """Accumulate the clipped value loss over micro-batches of `rows`, clip gradients, step AdamW.

    The loss is the token mean over the minibatch's real tokens: each micro-batch's loss is divided by
    the minibatch's token count (`num_items`), so the accumulated gradient equals the full-batch one.
    """
    num_items = int(sum(int(m.sum()) for m in targets.mask))
    if num_items == 0:
        return StepOutcome(0.0, False, None)
    optimizer.zero_grad(set_to_none=True)
    pieces: list[tuple[MicroBatch, list[Tensor]]] = []
    params = [p for p in critic.parameters() if p.requires_grad]
    for mb in micro_batches(rows, starts, max_batch_tokens, pad_id=pad_id):
        per_position = critic(mb.input_ids.to(device), mb.attention_mask.to(device), mb.position_ids.to(device))
        values = mb.response_view(per_position)  # [b, T]
        mask = (mb.pad_responses(targets.mask) * mb.response_mask).to(device)
        out = value_loss(
            values, mb.pad_responses(targets.old_values).to(device), mb.pad_responses(targets.returns).to(device),
            mask, clip=clip_range, aggregation="token_mean", num_items=num_items,
        )
        out.loss.backward()
        pieces.append((mb, mb.split_responses(values.detach().cpu())))
    limit = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
    values_rows = unbatch(pieces, len(rows))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepOutcome(grad_norm, False, values_rows)
    optimizer.step()
    return StepOutcome(grad_norm, True, values_rows)


def minibatches(batch_size: int, minibatch_size: int, generator: torch.Generator | None) -> list[list[int]]:
    """Row indices of each minibatch of one epoch: a permutation (identity when generator is None) in chunks."""
    order = torch.randperm(batch_size, generator=generator).tolist() if generator is not None else list(range(batch_size))
    size = batch_size if minibatch_size <= 0 else min(minibatch_size, batch_size)
    return [order[i : i + size] for i in range(0, batch_size, size)]
