"""One worker thread in front of the backend: queued Generate calls batched under a token budget,
and weight updates applied between batches.

Callers block in `generate()` on a future. The worker takes queued requests in arrival order while
their budget (sum over samples of prompt + max_new_tokens) fits `max_batch_tokens` (the first one
always goes, validation already capped it) and runs them as one backend batch. A weight update is
queued in its own slot and the worker applies it before the next batch, so no batch ever runs on
a mix of old and new weights; every result is stamped with the version that produced it.
More than `max_queue` waiting calls -> Overloaded (RESOURCE_EXHAUSTED): the caller backs off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from services.common.errors import NotReady, Overloaded
from services.generator.backend import GeneratedSample, GenerationRequest, GeneratorBackend
from services.generator.metrics import GeneratorMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """One request's samples and the weight version that produced them."""

    samples: list[GeneratedSample]   # [P * n], prompt-major
    weight_version: int


@dataclass
class _Job:
    request: GenerationRequest
    future: Future = field(default_factory=Future)
    cancelled: bool = False          # the caller went away before the batch started


@dataclass
class _Update:
    state: dict[str, torch.Tensor]
    version: int
    future: Future = field(default_factory=Future)


class Batcher:
    """Owns the backend's thread: every generate and every weight swap runs on it."""

    def __init__(self, backend: GeneratorBackend, *, max_queue: int, max_batch_tokens: int,
                 metrics: GeneratorMetrics) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self._queue: deque[_Job] = deque()
        self._update: _Update | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="generator-batcher", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Generate calls waiting for a batch now (GetInfo reports it: callers balance replicas by it)."""
        return len(self._queue)

    def submit(self, request: GenerationRequest) -> _Job:
        """Queue a validated request; Overloaded when `max_queue` calls already wait."""
        job = _Job(request)
        with self._cv:
            if self._closed:
                raise NotReady("generator is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"generate queue is full ({self.max_queue} calls waiting); retry with backoff")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify()
        return job

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> BatchResult:
        """submit() and wait for the result."""
        job = self.submit(request)
        try:
            return job.future.result(timeout)
        finally:
            job.cancelled = True  # a no-op when done; skips the batch if we gave up waiting

    def apply_weights(self, state: dict[str, torch.Tensor], version: int) -> float:
        """Have the worker swap in `state` before the next batch; returns the seconds the swap took."""
        update = _Update(state, version)
        with self._cv:
            if self._closed:
                raise NotReady("generator is shutting down")
            self._update = update
            self._cv.notify()
        return update.future.result()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _take(self) -> tuple[_Update | None, list[_Job]]:
        """Wait for work: a pending weight update first, else requests under the token budget."""
        with self._cv:
            while not self._queue and self._update is None and not self._closed:
                self._cv.wait()
            if self._closed:
                pending = list(self._queue)
                self._queue.clear()
                for job in pending:
                    job.future.set_exception(NotReady("generator is shutting down"))
                if self._update is not None:
                    self._update.future.set_exception(NotReady("generator is shutting down"))
                return None, []
            if self._update is not None:
                update, self._update = self._update, None
                return update, []
            jobs: list[_Job] = []
            budget = 0
            while self._queue:
                job = self._queue[0]
                cost = job.request.budget_tokens
                if jobs and budget + cost > self.max_batch_tokens:
                    break
                self._queue.popleft()
                if not job.cancelled and job.future.set_running_or_notify_cancel():
                    jobs.append(job)
                    budget += cost
            self.metrics.queue_depth.set(len(self._queue))
            return None, jobs

    def _run(self) -> None:
        while True:
            update, jobs = self._take()
            if update is not None:
                self._apply(update)
            elif jobs:
                self._batch(jobs)
            elif self._closed:
                return

    def _apply(self, update: _Update) -> None:
        t0 = time.perf_counter()
        try:
            self.backend.apply_weights(update.state, update.version)
        except BaseException as e:  # hand every failure to the waiting RPC, keep the worker alive
            log.exception("applying weights version %d failed", update.version)
            update.future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        self.metrics.weight_version.set(update.version)
        update.future.set_result(seconds)

    def _batch(self, jobs: list[_Job]) -> None:
        version = self.backend.version
        t0 = time.perf_counter()
        try:
            results = self.backend.generate_many([j.request for j in jobs])
        except BaseException as e:
            log.exception("generate batch of %d requests failed", len(jobs))
            for job in jobs:
                job.future.set_exception(e)
            return
        seconds = time.perf_counter() - t0
        self.metrics.observe_batch(results, seconds)
        for job, samples in zip(jobs, results, strict=True):
            job.future.set_result(BatchResult(samples, version))
