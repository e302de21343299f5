"""Per-token log-probs and entropy of a causal LM on right-padded prompt ++ response rows.

Layout (the one the reference and value services use too: ``services.common.batching.right_pad``): row i is
``prompt_i ++ response_i`` right-padded to L; response token k of row i sits at position
``response_start[i] + k`` and is predicted by the logits at the position before it. Right padding
keeps every real token at its unbatched position and a causal model never lets a real position see
the padding after it, so batched outputs equal per-sequence ones up to float reassociation.

Shapes: ``B`` rows, ``L`` padded row length, ``T`` response tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from rl.masked import zero_padding
from services.common.batching import plan_micro_batches

# Default token budget of one forward pass (rows x padded length); logits take rows x L x V floats.
DEFAULT_MICRO_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded prompt ++ response rows, what a forward pass needs."""

    input_ids: Tensor  # [B, L] int64 prompt ++ response, right-padded with the pad id
    attention_mask: Tensor  # [B, L] int64 1 on real tokens (prompt and response)
    position_ids: Tensor  # [B, L] int64 0..len-1 on real tokens, 0 on padding
    response_start: Tensor  # [B] int64 index of the first response token (= prompt length >= 1)
    response_length: int  # T, the longest response

    def rows(self, index: Tensor | slice) -> TokenBatch:
        """The sub-batch of rows ``index`` (same T)."""
        return TokenBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            position_ids=self.position_ids[index],
            response_start=self.response_start[index],
            response_length=self.response_length,
        )

    def to(self, device: torch.device | str) -> TokenBatch:
        """The same batch with its tensors on `device`."""
        return TokenBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            response_start=self.response_start.to(device),
            response_length=self.response_length,
        )

    @property
    def response_mask(self) -> Tensor:
        """[B, T] bool, True on real response tokens."""
        positions = self.response_start[:, None] + torch.arange(
            self.response_length, device=self.input_ids.device
        )
        return positions < self.attention_mask.sum(dim=1)[:, None]


@dataclass(frozen=True)
class TokenLogProbs:
    """Log-probs of the tokens in each response, and the policy's entropy where each was chosen."""

    logprobs: Tensor  # [B, T] fp32 log π(a_t|s_t), 0 at padding
    entropy: (
        Tensor | None
    )  # [B, T] fp32 H(π(·|s_t)) of the full distribution, 0 at padding; None if not asked


def response_logits(model: torch.nn.Module, batch: TokenBatch) -> Tensor:
    """[B, T, V] fp32 logits at the positions that predict each response token (one forward pass).

    The batch is trimmed to its longest real row first, and models that take ``logits_to_keep``
    project only the positions from the earliest response start on (the LM head over a large
    vocabulary is most of the activation memory). Positions past a row's response are clamped to a
    real position and hold finite junk: mask them with ``batch.response_mask``.
    """
    width = int(batch.attention_mask.sum(dim=1).max())
    keep = width - (int(batch.response_start.min()) - 1)
    # A DistributedDataParallel wrapper passes keyword arguments on to the model it wraps.
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    extra = {"logits_to_keep": keep} if _takes_logits_to_keep(type(inner)) else {}
    out = model(
        input_ids=batch.input_ids[:, :width],
        attention_mask=batch.attention_mask[:, :width],
        position_ids=batch.position_ids[:, :width],
        use_cache=False,
        **extra,
    )
    logits = out.logits  # [B, kept, V]: the last `kept` positions of the row
    offset = width - logits.shape[1]
    # Logits at position p predict token p + 1: response token k is read at response_start + k - 1.
    steps = torch.arange(batch.response_length, device=logits.device)
    index = (batch.response_start[:, None] - 1 - offset + steps[None, :]).clamp(max=logits.shape[1] - 1)
    gathered = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))
    return gathered.float()


@functools.cache
def _takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def response_tokens(batch: TokenBatch) -> Tensor:
    """[B, T] int64 the response token ids (clamped junk past each row's end: mask it)."""
    steps = torch.arange(batch.response_length, device=batch.input_ids.device)
    index = (batch.response_start[:, None] + steps[None, :]).clamp(max=batch.input_ids.shape[1] - 1)
    return batch.input_ids.gather(1, index)


def logprobs_from_logits(logits: Tensor, batch: TokenBatch, *, with_entropy: bool = True,
                         entropy_grad: bool = True) -> TokenLogProbs:
    """Log-probs of the response tokens (and entropy) from ``response_logits`` output [B, T, V].

    log_softmax in fp32 whatever the model dtype: bf16 log-probs carry ~1e-2 error, enough to move
    the PPO ratio by itself. ``entropy_grad=False``: the entropy is a metric only (no entropy bonus),
    computed outside the graph, which then keeps no [B, T, V] tensors for it.
    """
    real = batch.response_mask
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, response_tokens(batch)[:, :, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = zero_padding(-(logp.exp() * logp).sum(dim=-1), real)
    return TokenLogProbs(logprobs=zero_padding(token_logp, real), entropy=entropy)


def micro_batch_rows(batch: TokenBatch, micro_batch_tokens: int) -> list[Tensor]:
    """Row indices of each micro-batch: at most ``micro_batch_tokens`` padded tokens per forward pass
    (rows x widest row), longest rows first, as the reference and value services plan theirs
    (``plan_micro_batches``). A row longer than the budget gets a pass of its own."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    budget = max(micro_batch_tokens, max(lengths, default=1))
    return [torch.as_tensor(g, dtype=torch.int64) for g in plan_micro_batches(lengths, budget)]


def sequence_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    *,
    micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS,
    with_entropy: bool = True,
) -> TokenLogProbs:
    """Log-probs [B, T] of each response token under ``model`` and the entropy [B, T] of its
    next-token distribution there, in micro-batches of at most ``micro_batch_tokens`` padded tokens.

    Runs under the caller's grad mode: wrap in ``torch.no_grad()`` for old log-probs. With grad on,
    every micro-batch's graph is kept until the caller's backward; a trainer that needs to bound
    memory calls this per micro-batch and backpropagates each (see trainer.py).
    """
    groups = micro_batch_rows(batch, micro_batch_tokens)
    pieces = [
        logprobs_from_logits(response_logits(model, batch.rows(g)), batch.rows(g), with_entropy=with_entropy)
        for g in groups
    ]
    order = torch.cat(groups).to(batch.input_ids.device)
    # Back to the batch's row order: row order[k] is the k-th row of the concatenated pieces.
    logprobs = _unpermute(torch.cat([p.logprobs for p in pieces]), order)
    entropy = _unpermute(torch.cat([p.entropy for p in pieces]), order) if with_entropy else None  # type: ignore[misc]
    return TokenLogProbs(logprobs=logprobs, entropy=entropy)


def _unpermute(stacked: Tensor, order: Tensor) -> Tensor:
    out = torch.empty_like(stacked)
    out[order] = stacked
    return out
