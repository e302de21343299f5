"""The trainer under torch.distributed: `quartet train` launched by torchrun with N ranks.

Rank 0 runs the whole run: the services and every RPC (called once, not N times), the experience,
checkpoints, the weight sync to the generator, metrics, logs and progress. Ranks 1..N-1 run no
session: each holds a replica of the policy and its optimizer and takes part in every policy update
(``follow``). The policy is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU), the
batch is sharded across the ranks and the update equals one rank's (see ``orchestrator.step.ranks``).

What rank 0 sends the others (``broadcast_object_list``, in this order):

- ``join``: once its policy and trainer state are final (restored from the checkpoint on resume):
  the optimizer state, shuffle RNG and update count. Every rank then wraps its policy in DDP, whose
  constructor copies rank 0's parameters to all: every rank starts from the same state.
- ``update``: before each update, the experience; every rank runs ``PolicyTrainer.update`` on it.
- ``stop``: rank 0 is done, finished or failed; the others return.

Before the first message every rank says where it runs (host, pid). Rank 0 that fails waits for the
ranks on its host to exit before it exits itself: torchrun stops all of its workers as soon as one
exits with an error, and a rank still tearing down after ``stop`` would be reported as killed.

TRPO takes ``autograd.grad``, which DDP does not all-reduce: its step sums the ranks' shares itself
(``rl.trpo.trpo_step``'s ``all_sum``) and runs on the unwrapped policy.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from orchestrator.run.config import ConfigError, RunConfig
from orchestrator.step.ranks import Ranks, sum_gradients_hook
from orchestrator.step.trainer import PolicyTrainer
from services.common.command import silence_progress_bars
from services.common.hf import load_causal_lm, resolve_device, resolve_dtype

# How long a rank waits for the others. Ranks 1..N-1 wait through rank 0's whole rollout between two
# updates, so this bounds a step, not a message; a rank that fails ends the others sooner (torchrun
# stops the whole group when one exits with an error, and rank 0 sends `stop` whenever it ends).
WAIT = timedelta(hours=24)
# How long a failing rank 0 waits for the other ranks on its host to exit after `stop`.
EXIT_WAIT_S = 30.0
JOIN, UPDATE, STOP = "join", "update", "stop"
_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


def check(cfg: RunConfig, world_size: int) -> None:
    """The config errors that only several trainer ranks make (ConfigError naming the field)."""
    if world_size <= 1:
        return
    batch = cfg.prompts_per_step * cfg.samples_per_prompt
    if cfg.algorithm.name == "trpo" and batch < world_size:
        raise ConfigError(
            f"prompts_per_step x samples_per_prompt = {batch} sequences cannot give each of {world_size} torchrun "
            "ranks a row of TRPO's batch: raise prompts_per_step or launch fewer ranks")
    device = cfg.models.device.strip().lower()
    if device.startswith("cuda:"):
        raise ConfigError(
            f"models.device={cfg.models.device!r} puts all {world_size} ranks on one GPU: set models.device: cuda "
            "(each rank takes the GPU of its LOCAL_RANK)")


def start(cfg: RunConfig) -> Ranks:
    """This process's rank: ``Ranks()`` without torchrun (WORLD_SIZE unset or 1), else the process group
    joined (gloo when models.device is the CPU, NCCL on CUDA, each rank on the GPU of its LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    check(cfg, size)
    if size <= 1:
        return Ranks()
    device = resolve_device(cfg.models.device, field="models.device")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(Ranks(device=device).backend, timeout=WAIT)
    return Ranks(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def attach(trainer: PolicyTrainer, ranks: Ranks) -> None:
    """Wrap the trainer's policy in DDP (collective: every rank calls it; rank 0's parameters win)."""
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    # No buffer broadcast at each forward: the policy's buffers (rotary tables) never change, and the ranks
    # run different numbers of forwards per step. (torch >= 2.13 names the switch forward_sync_buffers.)
    key = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"
    ddp = DistributedDataParallel(trainer.model, device_ids=ids, **{key: False})
    ddp.register_comm_hook(None, sum_gradients_hook)
    trainer.module, trainer.ranks = ddp, ranks


def detach(trainer: PolicyTrainer) -> None:
    """Undo ``attach``, and free the DDP wrapper now: one collected after its process group is destroyed
    hung the process at exit (gloo, about one run in four)."""
    trainer.module, trainer.ranks, trainer.before_update = trainer.model, Ranks(), None
    gc.collect()


def _cpu(obj: Any) -> Any:
    """``obj`` with every tensor on the CPU: an object broadcast unpickles a tensor on the device it was
    pickled from, which on rank 1 is rank 0's GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.init})
    return obj


def _broadcast(ranks: Ranks, message: tuple[str, Any] | None = None) -> tuple[str, Any]:
    box = [_cpu(message) if ranks.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=ranks.device if ranks.device.type == "cuda" else None)
    return box[0]


class Leader:
    """Rank 0's side: hands the trainer state and each experience to the other ranks, and stops them.

    A context manager: leaving it (the run finished, or failed anywhere) sends ``stop`` and leaves
    the process group.
    """

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self._stopped = False
        self._trainer: PolicyTrainer | None = None
        self._peers = _whereabouts()

    def join(self, trainer: PolicyTrainer) -> None:
        """Call once the trainer's state is final (after a resume's restore), before the first update."""
        _broadcast(self.ranks, (JOIN, {"state": trainer.state_dict(), "max_len": trainer.max_len,
                                       "micro_batch_tokens": trainer.micro_batch_tokens}))
        attach(trainer, self.ranks)
        trainer.before_update = lambda exp: _broadcast(self.ranks, (UPDATE, exp))
        self._trainer = trainer

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            _broadcast(self.ranks, (STOP, None))
            if self._trainer is not None:
                detach(self._trainer)
                self._trainer = None
            _leave()

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.stop()
        except Exception:
            # A rank that failed with the same error (an update raises on every rank alike) has left the
            # group: the error the run ends with is the one that ended it, not this one.
            if exc_type is None:
                raise
        if exc_type is not None:
            here = socket.gethostname()
            await_exit([pid for host, pid in self._peers[1:] if host == here], timeout_s=EXIT_WAIT_S)


def follow(cfg: RunConfig, ranks: Ranks) -> int:
    """Ranks 1..N-1: a policy replica that takes part in rank 0's updates until it stops; returns the
    number of updates taken part in."""
    _whereabouts()
    silence_progress_bars()
    torch.manual_seed(cfg.seed)
    if cfg.models.threads is not None:
        torch.set_num_threads(cfg.models.threads)
    # The architecture and dtype only: DDP's constructor (join) overwrites the weights with rank 0's.
    dtype = resolve_dtype(cfg.models.dtype, device=ranks.device, field="models.dtype")
    # As rank 0's: TRPO's Fisher-vector products need double backprop through attention.
    attn = "eager" if cfg.algorithm.name == "trpo" else None
    policy = load_causal_lm(cfg.models.policy, dtype=dtype, device=ranks.device, attn_implementation=attn)
    trainer = PolicyTrainer(policy, cfg.algorithm, seed=cfg.seed)
    updates = 0
    try:
        while True:
            kind, payload = _broadcast(ranks)
            if kind == STOP:
                break
            if kind == JOIN:
                trainer.max_len, trainer.micro_batch_tokens = payload["max_len"], payload["micro_batch_tokens"]
                trainer.load_state_dict(payload["state"])
                attach(trainer, ranks)
            elif kind == UPDATE:
                trainer.update(payload)
                updates += 1
            else:
                raise RuntimeError(f"rank {ranks.rank}: unknown message {kind!r} from rank 0")
    except BaseException:
        detach(trainer)
        dist.destroy_process_group()
        raise
    detach(trainer)
    _leave()
    return updates


def _whereabouts() -> list[tuple[str, int]]:
    """(host, pid) of every rank, by rank (collective: the first thing every rank does after start)."""
    peers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return [tuple(p) for p in peers]


def await_exit(pids: list[int], *, timeout_s: float, poll_s: float = 0.05) -> list[int]:
    """Wait until none of these processes runs any more (an exited one not yet reaped counts as gone),
    at most `timeout_s`; returns those still running."""
    deadline = time.monotonic() + timeout_s
    running = [p for p in pids if _running(p)]
    while running and time.monotonic() < deadline:
        time.sleep(poll_s)
        running = [p for p in running if _running(p)]
    return running


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; its parent (torchrun) reaps it at its next poll
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _leave() -> None:
    """Leave the process group together: a root's broadcast can return before the others have its
    message, and a group destroyed under it leaves them waiting (seen with gloo)."""
    dist.barrier()
    dist.destroy_process_group()


__all__ = ["EXIT_WAIT_S", "WAIT", "Leader", "attach", "await_exit", "check", "detach", "follow", "start"]
