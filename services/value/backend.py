"""The critic service's backend: Values, TrainStep, Save, Load. A plain class, no gRPC.

Concurrency: one lock guards the weights. TrainStep, Save and Load hold it for their whole duration,
Values for its forward passes, so a Values call sees the weights of one training step, never a mix,
and TrainSteps are applied one at a time in arrival order (a retried step id waits for the first
attempt and is then acknowledged as a duplicate). Values and TrainStep calls are also admitted
through a CallGate (max_concurrent each): beyond it, Overloaded.

Counters: `steps_trained` counts applied TrainStep calls (not optimizer steps: one call may run
several epochs and minibatches), so it advances in step with the orchestrator's steps;
`last_step_id` is the step id of the last applied call, -1 before any.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge
from torch import Tensor

from services.common import hf
from services.common.batching import CallGate, SequencesLike, micro_batches, unbatch
from services.common.errors import FailedPrecondition, InvalidArgument, NotReady
from services.common.model_role import LoadedModel, ModelBackend
from services.common.role import ModelConfig
from services.value import checkpoint as ckpt
from services.value.model import Critic, load_critic
from services.value.training import RowsLike, Stats, check_targets, minibatches, optimizer_step, statistics

if TYPE_CHECKING:
    from services.value import Options


@dataclass(frozen=True)
class ValuesResult:
    values: list[Tensor]  # [B] fp32 rows of n_i = len_i - response_start_i: V(s) before each response token
    steps_trained: int  # TrainSteps applied to the weights that produced them


@dataclass(frozen=True)
class TrainStepResult:
    loss: float  # clipped value loss (token mean) before the update; 0 for a duplicate
    clip_fraction: float  # share of real tokens where the clipped branch was larger, before the update
    explained_variance: float  # 1 - Var(R - V) / Var(R) over real tokens, before the update (NaN if Var(R) = 0)
    grad_norm: float  # gradient norm before clipping, last optimizer step
    duplicate: bool  # step_id <= last applied: nothing trained
    steps_trained: int
    last_step_id: int
    optimizer_steps: int  # optimizer steps applied by this call
    seconds: float


@dataclass(frozen=True)
class CheckpointResult:
    path: str
    steps_trained: int
    last_step_id: int


class ValueBackend(ModelBackend):
    """Critic = AutoModel trunk + scalar head, trained by its own AdamW on the clipped value loss."""

    options: Options

    def __init__(self, model_cfg: ModelConfig, options: Options, registry: CollectorRegistry,
                 checkpoint_dir: Path | None) -> None:
        super().__init__(model_cfg, options)
        self.checkpoint_dir = checkpoint_dir
        self.steps_trained = 0
        self.last_step_id = -1
        self._critic: Critic | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._lock = threading.Lock()
        self.values_gate = CallGate(options.max_concurrent, "value Values")
        self.train_gate = CallGate(options.max_concurrent, "value TrainStep")
        self._metrics(registry)

    def _metrics(self, registry: CollectorRegistry) -> None:
        self.m_train_steps = Counter("quartet_value_train_steps", "TrainStep calls applied.", registry=registry)
        self.m_duplicates = Counter(
            "quartet_value_duplicate_steps", "TrainStep calls acknowledged as duplicates (step id already applied).",
            registry=registry)
        self.m_optimizer_steps = Counter(
            "quartet_value_optimizer_steps", "AdamW steps applied (epochs x minibatches per TrainStep).", registry=registry)
        self.m_skipped = Counter(
            "quartet_value_skipped_updates", "Optimizer steps skipped for a non-finite gradient.", registry=registry)
        self.m_loss = Gauge("quartet_value_loss", "Clipped value loss before the last applied TrainStep.", registry=registry)
        self.m_ev = Gauge("quartet_value_explained_variance", "Explained variance before the last applied TrainStep.",
                          registry=registry)
        self.m_clipfrac = Gauge("quartet_value_clip_fraction", "Clip fraction of the last applied TrainStep.",
                                registry=registry)
        self.m_grad_norm = Gauge("quartet_value_grad_norm", "Gradient norm before clipping, last optimizer step.",
                                 registry=registry)
        self.m_steps = Gauge("quartet_value_steps_trained", "TrainSteps applied to the served critic.", registry=registry)
        self.m_train_seconds = Gauge("quartet_value_train_step_seconds", "Duration of the last applied TrainStep.",
                                     registry=registry)
        self.m_sequences = Counter("quartet_value_sequences", "Sequences scored by Values.", registry=registry)
        self.m_tokens = Counter("quartet_value_tokens", "Response tokens whose value Values returned.", registry=registry)

    # ---- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Load tokenizer, trunk and a fresh head (slow); build AdamW. Until then calls raise NotReady."""
        path, device, dtype = self._placement()
        tokenizer = hf.load_tokenizer(path)
        o = self.options
        critic = load_critic(path, dtype=dtype, device=device, head_init_std=o.head_init_std, seed=o.seed,
                             attn_implementation=o.attn_implementation)
        self._optimizer = torch.optim.AdamW(
            critic.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self._loaded(path, dtype, device, critic.trunk, tokenizer)
        self._critic = critic
        self.m_steps.set(0)

    def _ready(self) -> tuple[Critic, torch.optim.Optimizer, LoadedModel]:
        if self._critic is None or self._optimizer is None or self.info is None:
            raise NotReady("value model is still loading")
        return self._critic, self._optimizer, self.info

    # ---- Values --------------------------------------------------------------------------------

    def values(self, sequences: SequencesLike, response_start: Sequence[int] | Tensor) -> ValuesResult:
        """V(s) before each response token (batching's alignment), fp32 CPU rows of len_i - response_start_i."""
        critic, _, info = self._ready()
        with self.values_gate.enter():
            rows, starts = self._check(sequences, response_start, info)
            with self._lock:
                out, steps = self._forward_rows(critic, rows, starts, info.device), self.steps_trained
        self.m_sequences.inc(len(rows))
        self.m_tokens.inc(sum(r.numel() for r in out))
        return ValuesResult(out, steps)

    def _forward_rows(self, critic: Critic, rows: Sequence[Tensor], starts: Sequence[int],
                      device: torch.device) -> list[Tensor]:
        pieces = []
        with torch.inference_mode():
            for mb in micro_batches(rows, starts, self.options.max_batch_tokens, pad_id=self._pad_id):
                per_position = critic(mb.input_ids.to(device), mb.attention_mask.to(device), mb.position_ids.to(device))
                pieces.append((mb, [r.clone() for r in mb.response_rows(per_position.float().cpu())]))
        return unbatch(pieces, len(rows))

    # ---- TrainStep -----------------------------------------------------------------------------

    def train_step(
        self,
        sequences: SequencesLike,
        response_start: Sequence[int] | Tensor,
        returns: RowsLike,
        old_values: RowsLike | None = None,
        mask: RowsLike | None = None,
        *,
        step_id: int,
        clip_range: float | None = None,
        epochs: int = 1,
        minibatch_size: int = 0,
    ) -> TrainStepResult:
        """Train the critic on one batch of returns, unless step_id was already applied.

        Args:
            sequences, response_start: as in `values`.
            returns: [B] rows of n_i regression targets.
            old_values: [B] rows of n_i rollout-time values, needed when clip_range is set.
            mask: [B] rows of n_i 0/1 (1 = train on the token); None = every response token.
            step_id: >= 0; a step id <= last_step_id is acknowledged (duplicate=True) without training.
            clip_range: value clip radius around old_values; None = unclipped squared error.
            epochs: passes over the batch (0 = 1). minibatch_size: sequences per optimizer step (0 = all),
                minibatches drawn by a permutation seeded from (options.seed, step_id, epoch).
        """
        critic, optimizer, info = self._ready()
        o = self.options
        if step_id < 0:
            raise InvalidArgument("step_id", f"must be >= 0, got {step_id}")
        epochs = epochs or 1
        if not 1 <= epochs <= o.max_epochs:
            raise InvalidArgument("epochs", f"must be in [1, max_epochs={o.max_epochs}] (0 = 1), got {epochs}")
        if minibatch_size < 0:
            raise InvalidArgument("minibatch_size", f"must be >= 0 (0 = whole batch), got {minibatch_size}")
        with self.train_gate.enter():
            rows, starts = self._check(sequences, response_start, info)
            targets = check_targets([r.numel() - s for r, s in zip(rows, starts, strict=True)],
                                    returns, old_values, mask, clip_range)
            with self._lock:
                if step_id <= self.last_step_id:
                    self.m_duplicates.inc()
                    return TrainStepResult(0.0, 0.0, 0.0, 0.0, True, self.steps_trained, self.last_step_id, 0, 0.0)
                return self._train_locked(critic, optimizer, info, rows, starts, targets, step_id=step_id,
                                          clip_range=clip_range, epochs=epochs, minibatch_size=minibatch_size)

    def _train_locked(self, critic: Critic, optimizer: torch.optim.Optimizer, info: LoadedModel,
                      rows: list[Tensor], starts: list[int], targets, *, step_id: int, clip_range: float | None,
                      epochs: int, minibatch_size: int) -> TrainStepResult:
        """The training loop (caller holds the lock): epochs x minibatches of optimizer steps."""
        t0 = time.perf_counter()
        o, n = self.options, len(rows)
        stats: Stats | None = None
        whole_batch = minibatch_size <= 0 or minibatch_size >= n
        if not whole_batch:  # later minibatches see updated weights: measure "before the update" apart
            stats = statistics(self._forward_rows(critic, rows, starts, info.device), targets, clip_range)
        grad_norm, applied = 0.0, 0
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(o.seed * 1_000_003 + step_id * 1_009 + epoch)
            for idx in minibatches(n, minibatch_size, None if whole_batch else gen):
                sub = _subset(targets, idx)
                outcome = optimizer_step(
                    critic, optimizer, [rows[i] for i in idx], [starts[i] for i in idx], sub,
                    clip_range=clip_range, max_batch_tokens=o.max_batch_tokens, max_grad_norm=o.max_grad_norm,
                    pad_id=self._pad_id, device=info.device,
                )
                if stats is None:  # whole batch, first step: its forward pass ran before any update
                    values = outcome.values if outcome.values is not None else [torch.zeros_like(r) for r in targets.returns]
                    stats = statistics(values, targets, clip_range)
                grad_norm = outcome.grad_norm if outcome.values is not None else grad_norm
                applied += int(outcome.applied)
                self.m_skipped.inc(int(not outcome.applied and outcome.values is not None))
        assert stats is not None
        self.steps_trained += 1
        self.last_step_id = step_id
        seconds = time.perf_counter() - t0
        self._record(stats, grad_norm, applied, seconds)
        return TrainStepResult(stats.loss, stats.clip_fraction, stats.explained_variance, grad_norm, False,
                               self.steps_trained, self.last_step_id, applied, seconds)

    def _record(self, stats: Stats, grad_norm: float, applied: int, seconds: float) -> None:
        self.m_train_steps.inc()
        self.m_optimizer_steps.inc(applied)
        self.m_loss.set(stats.loss)
        self.m_ev.set(stats.explained_variance)
        self.m_clipfrac.set(stats.clip_fraction)
        self.m_grad_norm.set(grad_norm)
        self.m_steps.set(self.steps_trained)
        self.m_train_seconds.set(seconds)

    # ---- Save / Load ---------------------------------------------------------------------------

    def save(self, name: str) -> CheckpointResult:
        """Write weights, optimizer state and counters under `name` inside the checkpoint directory."""
        critic, optimizer, info = self._ready()
        target = ckpt.resolve_name(self.checkpoint_dir, name)
        with self._lock:
            meta = ckpt.CheckpointMeta(self.steps_trained, self.last_step_id, info.path)
            ckpt.write_checkpoint(target, critic.state_dict(), optimizer.state_dict(), meta)
        return CheckpointResult(str(target), meta.steps_trained, meta.last_step_id)

    def load_checkpoint(self, name: str) -> CheckpointResult:
        """Restore weights, optimizer state and counters saved under `name`; nothing changes on error."""
        critic, optimizer, info = self._ready()
        target = ckpt.resolve_name(self.checkpoint_dir, name)
        weights, optimizer_state, meta = ckpt.read_checkpoint(target, info.device)
        with self._lock:
            ckpt.check_compatible(critic.state_dict(), weights, name)
            try:  # checks the parameter groups before changing anything
                optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError) as e:
                raise FailedPrecondition(f"checkpoint {name!r}: optimizer state does not fit this critic: {e}") from e
            # Hyperparameters come from this service's options, not from the run that saved.
            o = self.options
            for group in optimizer.param_groups:
                group.update(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
            critic.load_state_dict(weights, strict=True)
            self.steps_trained, self.last_step_id = meta.steps_trained, meta.last_step_id
            self.m_steps.set(self.steps_trained)
        return CheckpointResult(str(target), meta.steps_trained, meta.last_step_id)


def _subset(targets, idx: Sequence[int]):
    """The targets of rows `idx`, in that order."""
    return type(targets)([targets.returns[i] for i in idx], [targets.old_values[i] for i in idx],
                         [targets.mask[i] for i in idx])
