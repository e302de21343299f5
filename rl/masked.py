"""Masked helpers shared by the RL math: padding-safe zeroing, masked means and the config tables.

Padded positions may hold any value, NaN and inf included: ``zero_padding`` replaces them with
``torch.where`` (never a multiplication by the mask), so neither outputs nor gradients depend on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import Tensor

_V = TypeVar("_V")


def lookup(table: Mapping[str, _V], key: str, what: str) -> _V:
    """``table[key]``, or a ValueError naming the accepted choices (shared by the algorithm tables)."""
    try:
        return table[key]
    except KeyError:
        choices = ", ".join(repr(k) for k in table)
        raise ValueError(f"unknown {what} {key!r}: choose one of {choices}") from None


def zero_padding(x: Tensor, real: Tensor) -> Tensor:
    """``x`` where ``real`` is True and exactly 0 elsewhere, even where ``x`` is NaN or inf.

    The gradient reaching ``x`` at padded positions is exactly 0 too (``torch.where`` routes it,
    where a multiplication by the mask would give 0 * NaN = NaN).
    """
    return torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, real: Tensor) -> Tensor:
    """Mean of ``x`` [B, T] over the positions where ``real`` [B, T] is True; 0 when there are none."""
    count = real.sum().clamp(min=1)
    return zero_padding(x, real).sum() / count
