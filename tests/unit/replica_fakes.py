"""Pieces the replica-set unit tests share: a settable clock and the ServiceInfo fake replicas report."""

from __future__ import annotations

from orchestrator.remote.client_base import ServiceInfo


def service_info(version: int = 0, batch: int = 8, queue: int = 0) -> ServiceInfo:
    """What a fake reference, generator or reward replica answers to GetInfo: weight `version`, batch and
    queue limits `batch` and `queue`."""
    return ServiceInfo("reference", "ref@h", "m", "b", "fp", version, 10, -1, batch, queue)


class Clock:
    """A monotonic clock that moves only when a test sets `t`."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t
