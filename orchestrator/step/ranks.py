"""The policy update's view of its torch.distributed ranks: which rows of a minibatch a rank trains on,
and the three collectives the update needs. One process is ``Ranks()``: every method is then the
identity and nothing touches torch.distributed.

Why the update stays equal to one rank's: every rank holds the whole experience and the same shuffle
RNG, so all ranks cut the same minibatches; each trains on every ``size``-th row of a minibatch. The
loss normaliser (``Norm.num_items``) is counted over the whole minibatch, so each rank's loss is its
share of the one-rank loss and the gradients add up: DDP must SUM them (``sum_gradients_hook``), not
average them. Logged statistics are per-rank sums of one-rank terms, summed across ranks the same way.

Shapes: ``B`` sequences, ``T`` response tokens.
"""

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Ranks:
    """This process's place among the trainer's ranks (rank 0 drives the run)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def several(self) -> bool:
        return self.size > 1

    @property
    def backend(self) -> str:
        """The torch.distributed backend of ``device``: NCCL on CUDA, gloo on the CPU."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    def share(self, rows: int) -> Tensor:
        """[≤ ceil(rows / size)] int64 positions 0..rows-1 of a minibatch this rank trains on: every
        size-th one from ``rank``, so the ranks' shares differ by one row at most."""
        return torch.arange(self.rank, rows, self.size)

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the ranks (a new tensor, on ``values``' device)."""
        if not self.several:
            return values
        out = values.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(values.device)

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks (in float64)."""
        if not self.several:
            return values
        total = self.sum(torch.tensor(list(values.values()), dtype=torch.float64))
        return dict(zip(values, total.tolist(), strict=True))

    def accumulate(self, module: torch.nn.Module, *, last: bool) -> AbstractContextManager:
        """Around one micro-batch's forward and backward: gradients are all-reduced only on a step's
        last micro-batch (``DistributedDataParallel.no_sync`` before it)."""
        if not self.several or last:
            return nullcontext()
        return module.no_sync()  # type: ignore[operator]


def sum_gradients_hook(_state: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: all-reduce a gradient bucket by SUM (DDP's default divides by the world
    size), because each rank's loss already carries the global normaliser. (DDP checks these annotations
    as objects: this module does not postpone them.)"""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


__all__ = ["Ranks", "sum_gradients_hook"]
