"""Scoring ragged batches of full sequences in right-padded micro-batches.

Reference (log-probabilities) and value (critic values) both take B sequences `prompt ++ response`
of different lengths and answer one number per response token. They share this module:

1. `check_sequences`: validate the batch (ids in the vocabulary, response starts, size limits), raising
   InvalidArgument / OutOfRange that name the field and the limit.
2. `plan_micro_batches`: group rows so that each forward pass holds at most `max_tokens` *padded*
   tokens (rows x widest row), longest rows first so that rows of similar length share a pass.
3. `pad_micro_batch`: right-pad one group to [b, W] with attention mask and position ids 0..len-1
   (`right_pad`, the layout the orchestrator's trainer uses too, so that its log-probs and the
   reference's agree and the KL at step 0 is 0).
   Right padding keeps real tokens at the positions they have unbatched, and a causal model never
   lets a real position see the padding after it, so the real positions' outputs are the unbatched
   ones (up to float reassociation in batched matmuls).
4. `MicroBatch.response_view` / `response_rows`: map per-position outputs [b, W] back to one row per
   response token.
5. `CallGate`: admission control, at most N scoring calls at once, the next refused with Overloaded.

Alignment (the one rule both roles follow): the output at position p belongs to the state after
tokens 0..p, i.e. it is about token p + 1. Response token k (response_start <= k < len) is therefore
read at position k - 1: logits at k - 1 predict token k, and the value of the state that emits token
k is the head on the hidden state at k - 1. A row's response occupies positions
[response_start - 1, len - 1) and has len - response_start entries (possibly 0).

Shapes: B sequences in the request, b rows in one micro-batch, W its widest row, T its longest response.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from services.common.codec import RaggedTensor
from services.common.errors import InvalidArgument, OutOfRange, Overloaded

TOKENS_FIELD = "sequences.token_ids"
START_FIELD = "sequences.response_start"

SequencesLike = RaggedTensor | Sequence[Tensor] | Sequence[Sequence[int]]


def as_rows(sequences: SequencesLike) -> list[Tensor]:
    """Any accepted sequence batch as a list of int64 1-d CPU tensors (views where possible)."""
    rows = sequences.rows() if isinstance(sequences, RaggedTensor) else list(sequences)
    out = []
    for i, r in enumerate(rows):
        t = r if isinstance(r, Tensor) else torch.as_tensor(list(r), dtype=torch.int64)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
            raise InvalidArgument(TOKENS_FIELD, f"row {i}: token ids must be integers, got {t.dtype}")
        out.append(t.reshape(-1).to(torch.int64))
    return out


def check_sequences(
    sequences: SequencesLike,
    response_start: Sequence[int] | Tensor,
    *,
    vocab_size: int,
    max_sequences: int,
    max_tokens: int,
    max_row_tokens: int | None = None,
) -> tuple[list[Tensor], list[int]]:
    """Validate a batch of prompt ++ response rows; return (rows as int64 tensors, response starts).

    Rules: at least one row; one response_start per row with 1 <= response_start <= len (a prompt
    must hold at least one token, because response token k is scored from position k - 1; a row with
    response_start == len has no response tokens and gets an empty row back); ids in [0, vocab_size);
    at most `max_sequences` rows, `max_tokens` tokens in all, and `max_row_tokens` in one row.

    Raises:
        InvalidArgument: malformed batch or a configured size limit exceeded (the message names the limit).
        OutOfRange: a token id outside the vocabulary.
    """
    rows = as_rows(sequences)
    starts = [int(s) for s in (response_start.tolist() if isinstance(response_start, Tensor) else response_start)]
    if not rows:
        raise InvalidArgument(TOKENS_FIELD, "empty batch: send at least one sequence")
    if len(rows) > max_sequences:
        raise InvalidArgument(TOKENS_FIELD, f"{len(rows)} sequences exceed the limit max_batch_sequences={max_sequences}")
    if len(starts) != len(rows):
        raise InvalidArgument(START_FIELD, f"has {len(starts)} entries for {len(rows)} sequences; send one per sequence")
    total = sum(r.numel() for r in rows)
    if total > max_tokens:
        raise InvalidArgument(TOKENS_FIELD, f"{total} tokens exceed the limit max_tokens_per_call={max_tokens}")
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        n = row.numel()
        if max_row_tokens is not None and n > max_row_tokens:
            raise InvalidArgument(TOKENS_FIELD, f"row {i} has {n} tokens, more than the limit of {max_row_tokens} per sequence "
                                                f"(the smaller of max_batch_tokens and the model's max_position_embeddings)")
        if not 1 <= start <= n:
            raise InvalidArgument(START_FIELD, f"row {i}: response_start={start} must be in [1, {n}] (row length {n})")
        if n and (int(row.min()) < 0 or int(row.max()) >= vocab_size):
            bad = int(row[(row < 0) | (row >= vocab_size)][0])
            raise OutOfRange(TOKENS_FIELD, f"row {i}: token id {bad} is outside [0, vocab_size={vocab_size})")
    return rows, starts


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, *, max_rows: int | None = None) -> list[list[int]]:
    """Group row indices so that each group's padded size (rows x longest row) is <= max_tokens.

    Rows are taken longest first (ties in input order), so the first row of a group is its widest and
    similar lengths share a pass. Deterministic. Every index appears in exactly one group.

    Raises:
        ValueError: a single row is longer than max_tokens (the caller should have rejected it).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups: list[list[int]] = []
    width = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        if n > max_tokens:
            raise ValueError(f"row {i} has {n} tokens, more than the micro-batch budget max_tokens={max_tokens}")
        full = bool(groups) and max_rows is not None and len(groups[-1]) >= max_rows
        if groups and not full and (len(groups[-1]) + 1) * width <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
            width = n
    return groups


@dataclass(frozen=True)
class MicroBatch:
    """b rows of the request, right-padded for one forward pass."""

    index: Tensor  # [b] int64 row numbers in the request
    input_ids: Tensor  # [b, W] int64, pad_id after each row's end
    attention_mask: Tensor  # [b, W] int64, 1 on real tokens
    position_ids: Tensor  # [b, W] int64, 0..len-1 on real tokens, 0 on padding
    lengths: Tensor  # [b] int64 row lengths
    response_start: Tensor  # [b] int64
    response_positions: Tensor  # [b, T] int64 position read for response token t (clamped on padding)
    response_mask: Tensor  # [b, T] float32, 1 on real response tokens

    @property
    def num_tokens(self) -> int:
        """Padded tokens in the pass (b x W), what the budget bounds."""
        return self.input_ids.numel()

    def response_view(self, per_position: Tensor) -> Tensor:
        """[b, W] (or [b, W, ...]) per-position outputs -> [b, T(, ...)] per response token.

        Entry [i, t] is per_position[i, response_start_i - 1 + t]; entries where response_mask is 0
        hold some other position's output and must be masked. Differentiable (a gather).
        """
        idx = self.response_positions.to(per_position.device)
        if per_position.dim() > 2:
            idx = idx.view(*idx.shape, *([1] * (per_position.dim() - 2))).expand(*idx.shape, *per_position.shape[2:])
        return torch.gather(per_position, 1, idx)

    def response_rows(self, per_position: Tensor) -> list[Tensor]:
        """[b, W] per-position outputs -> b rows of len_i - response_start_i values, in micro-batch order."""
        return self.split_responses(self.response_view(per_position))

    def split_responses(self, view: Tensor) -> list[Tensor]:
        """[b, T(, ...)] per response token (a response_view) -> b rows of len_i - response_start_i."""
        counts = (self.lengths - self.response_start).tolist()
        return [view[i, :n] for i, n in enumerate(counts)]

    def pad_responses(self, rows: Sequence[Tensor], pad_value: float = 0.0) -> Tensor:
        """Per-request response rows (e.g. returns, [B] rows) -> [b, T] for this micro-batch's rows."""
        t = self.response_mask.shape[1]
        out = torch.full((len(self.index), t), pad_value, dtype=rows[0].dtype if rows else torch.float32)
        for j, i in enumerate(self.index.tolist()):
            r = rows[i]
            out[j, : r.numel()] = r
        return out


@dataclass(frozen=True)
class RightPadded:
    """Rows right-padded to the widest: the one padding layout of every forward pass over sequences
    (the reference and value services here, the orchestrator's trainer through `right_pad`)."""

    input_ids: Tensor  # [b, W] int64, pad_id after each row's end
    attention_mask: Tensor  # [b, W] int64, 1 on real tokens
    position_ids: Tensor  # [b, W] int64, 0..len-1 on real tokens, 0 on padding
    lengths: Tensor  # [b] int64 row lengths


def right_pad(rows: Sequence[Tensor], *, pad_id: int = 0) -> RightPadded:
    """Right-pad 1-d int64 rows into [b, W] (W = the longest row, at least 1).

    Real tokens keep their unbatched positions 0..len-1; padding gets position 0 and attention 0,
    and a causal model never lets a real position see the padding after it.
    """
    lengths = torch.tensor([r.numel() for r in rows], dtype=torch.int64)
    width = max(int(lengths.max()) if len(rows) else 0, 1)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for j, r in enumerate(rows):
        input_ids[j, : r.numel()] = r
    arange = torch.arange(width).unsqueeze(0)
    real = arange < lengths.unsqueeze(1)
    return RightPadded(input_ids=input_ids, attention_mask=real.to(torch.int64),
                       position_ids=torch.where(real, arange, 0), lengths=lengths)


def pad_micro_batch(rows: Sequence[Tensor], response_start: Sequence[int], index: Sequence[int], *,
                    pad_id: int = 0) -> MicroBatch:
    """Right-pad rows[index] into one MicroBatch (see the module doc for the alignment)."""
    padded = right_pad([rows[i] for i in index], pad_id=pad_id)
    lengths, width = padded.lengths, padded.input_ids.shape[1]
    starts = torch.tensor([int(response_start[i]) for i in index], dtype=torch.int64)
    n_resp = lengths - starts
    t = max(int(n_resp.max()), 0)
    t_range = torch.arange(t).unsqueeze(0)
    positions = (starts.unsqueeze(1) - 1 + t_range).clamp(0, width - 1)
    return MicroBatch(
        index=torch.tensor(list(index), dtype=torch.int64),
        input_ids=padded.input_ids,
        attention_mask=padded.attention_mask,
        position_ids=padded.position_ids,
        lengths=lengths,
        response_start=starts,
        response_positions=positions,
        response_mask=(t_range < n_resp.unsqueeze(1)).to(torch.float32),
    )


def micro_batches(rows: Sequence[Tensor], response_start: Sequence[int], max_tokens: int, *,
                  pad_id: int = 0, max_rows: int | None = None) -> list[MicroBatch]:
    """Plan and pad every micro-batch of a request (see plan_micro_batches and pad_micro_batch)."""
    groups = plan_micro_batches([r.numel() for r in rows], max_tokens, max_rows=max_rows)
    return [pad_micro_batch(rows, response_start, g, pad_id=pad_id) for g in groups]


def unbatch(pieces: Sequence[tuple[MicroBatch, Sequence[Tensor]]], batch_size: int) -> list[Tensor]:
    """Put each micro-batch's response rows back in request order: [B] rows."""
    out: list[Tensor | None] = [None] * batch_size
    for mb, rows in pieces:
        for j, i in enumerate(mb.index.tolist()):
            out[i] = rows[j]
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        raise ValueError(f"rows {missing} are in no micro-batch")
    return out  # type: ignore[return-value]


class CallGate:
    """At most `limit` calls inside at once; the next one gets Overloaded (RESOURCE_EXHAUSTED) at once.

    Calls beyond the limit are refused rather than queued: a caller that backs off and retries sees
    the overload, where a hidden queue would only turn it into deadline errors.
    """

    def __init__(self, limit: int, what: str) -> None:
        self._sem = threading.BoundedSemaphore(limit)
        self._limit = limit
        self._what = what

    @contextmanager
    def enter(self) -> Iterator[None]:
        if not self._sem.acquire(blocking=False):
            raise Overloaded(f"{self._what}: {self._limit} calls already running (max_concurrent={self._limit}); retry later")
        try:
            yield
        finally:
            self._sem.release()
