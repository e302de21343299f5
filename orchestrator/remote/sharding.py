"""How a batch is split across replicas and put back together: pure functions, no I/O.

A batch of N items (prompts for Generate, sequences for Score / LogProbs / Values) is cut into
contiguous slices, one per replica, sized in proportion to each replica's weight; the answers are
put back in the original order by the slices' starts. Contiguous slices keep prompt-major Generate
answers prompt-major when concatenated, and let a prompt's seed index be its slice start + i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def replica_weight(max_batch_sequences: int, queue_depth: int) -> float:
    """Share weight of a replica from its GetInfo: capacity / (1 + calls already waiting).

    max_batch_sequences 0 (not reported) counts as 1; a replica with twice the batch limit gets twice
    the items, one with k calls queued gets 1 / (k + 1) of what an idle twin gets.
    """
    return max(1, max_batch_sequences) / (1 + max(0, queue_depth))


def apportion(weights: Sequence[float], total: int) -> list[int]:
    """Split `total` items into shares proportional to `weights` (largest remainder, Hamilton's method).

    weights: [R] non-negative, at least one > 0. Returns [R] ints >= 0 summing to `total`. Ties in the
    remainders go to the lower index, so the split is a function of its inputs (reproducible runs).
    """
    if total < 0:
        raise ValueError(f"total {total} is negative")
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {list(weights)}: need at least one positive weight and none negative")
    mass = sum(weights)
    exact = [w * total / mass for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda r: (-(exact[r] - shares[r]), r))
    for r in order[: total - sum(shares)]:
        shares[r] += 1
    return shares


def contiguous(shares: Sequence[int], start: int = 0) -> list[range]:
    """Consecutive slices of the given sizes from `start`: [3, 0, 2] from 10 -> range(10, 13), range(13, 13), range(13, 15)."""
    out, at = [], start
    for n in shares:
        if n < 0:
            raise ValueError(f"share {n} is negative")
        out.append(range(at, at + n))
        at += n
    return out


def split(block: range, weights: Sequence[float]) -> list[range]:
    """`block` cut into one contiguous slice per weight (possibly empty), in proportion to the weights."""
    return contiguous(apportion(weights, len(block)), block.start)


def in_order(parts: Sequence[tuple[range, T]], total: int) -> list[T]:
    """The parts' answers ordered by slice start, after checking the slices tile range(0, total) exactly once.

    parts: (slice, answer for that slice) in any order, empty slices allowed (they are dropped).
    """
    filled = sorted(((rows, part) for rows, part in parts if len(rows)), key=lambda p: p[0].start)
    at = 0
    for rows, _ in filled:
        if rows.start != at or rows.step != 1:
            raise ValueError(f"slices do not tile 0..{total}: slice {rows.start}..{rows.stop} found where item {at} "
                             "was expected")
        at = rows.stop
    if at != total:
        raise ValueError(f"slices cover 0..{at}, expected 0..{total}")
    return [part for _, part in filled]
