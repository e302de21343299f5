"""Services that die and come back mid-run (issue 7): bring them up to date before their answers count.

A restarted service answers on the same address (the launcher, or Docker's restart policy), and the
clients' retries reach it. Reward and reference are stateless: their answers are the same as before.
The two stateful roles come back on their starting state:

- generator: serves the checkpoint it was started from (weight version 0). Every Generate answer is
  stamped with the version that produced it, so the orchestrator sees the difference, re-sends the
  trainer's policy (before the step's update that is exactly what the generator should serve) and
  samples again with the same seed: per-sample seeds make the samples identical to an undisturbed run's.
- value: comes back without its training. `CriticKeeper` knows which critic the value service should
  hold (last TrainStep id and the number applied) and the last save it verified; when GetInfo or a
  TrainStep answer disagrees, it has the service Load that save and reports the TrainSteps lost (those
  after the save). TrainStep ids stay idempotent, so nothing is trained twice.

Saves alternate between two slots, and a slot counts as good only once GetInfo after the Save shows the
critic the orchestrator expected: a Save that reached a freshly restarted service never replaces the
last good one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from orchestrator.remote.clients import ServiceError, ValueClient, ValueTrainResult
from orchestrator.remote.retry import RETRYABLE

log = logging.getLogger("quartet.orchestrator.rejoin")

# Most times one step brings a service back before giving up (a service that keeps dying mid-step).
MAX_REJOINS = 5


class Rejoined(Exception):
    """A service came back and was brought up to date; the step's rollout is redone (nothing was applied)."""


@dataclass(frozen=True)
class CriticState:
    """What identifies a critic's training: the last TrainStep id applied (-1: none) and how many were."""

    last_step_id: int
    steps_trained: int


@dataclass(frozen=True)
class ValueSave:
    """A value checkpoint (name inside the value service's checkpoint directory) and the critic it holds."""

    name: str
    state: CriticState


def resend_version(expected: int, served: int) -> int:
    """The version to push to a generator serving `served` when it should serve `expected`.

    The same number as before when the generator accepts it (it only takes versions above what it
    serves): version k then always names the same weights. Otherwise one above what it serves.
    """
    return expected if expected > served else served + 1


class CriticKeeper:
    """Tracks the critic the value service should hold and reloads it into a service that came back behind.

    `on_reload(lost)` is called with the list of TrainStep ids lost by each reload (for metrics).
    """

    def __init__(self, client: ValueClient, *, slot_prefix: str, expected: CriticState, saved: ValueSave | None,
                 on_reload: Callable[[list[int]], None] | None = None) -> None:
        self.client = client
        self.slots = (f"{slot_prefix}-a", f"{slot_prefix}-b")
        self.expected = expected
        self.saved = saved
        self.on_reload = on_reload

    @classmethod
    def start(cls, client: ValueClient, *, slot_prefix: str, loaded: str | None, value_interval: int,
              on_reload: Callable[[list[int]], None] | None = None) -> CriticKeeper:
        """The keeper of a run's start: the service holds the critic of value save `loaded` (a resume), or
        its starting critic, which is saved first when value_interval > 0 (what a value service that dies
        before its first save goes back to)."""
        info = client.info()
        if loaded is None and info.last_step_id >= 0:
            # Its TrainStep ids would collide with this run's (0, 1, ...): they would be acknowledged as
            # duplicates and the critic would silently not train until this run passed the old ids.
            raise ServiceError(
                client.name, "GetInfo",
                f"the value service already holds a critic trained by another run (last step id "
                f"{info.last_step_id}, {info.weight_version} TrainSteps): restart it for a fresh critic, or resume "
                "the run that trained it (quartet train CONFIG --resume)", code=grpc.StatusCode.FAILED_PRECONDITION)
        now = CriticState(info.last_step_id, info.weight_version)
        keeper = cls(client, slot_prefix=slot_prefix, expected=now, saved=ValueSave(loaded, now) if loaded else None,
                     on_reload=on_reload)
        if loaded is None and value_interval > 0:
            try:
                keeper.save()
            except ServiceError as e:
                if e.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                raise ServiceError(e.service, e.call, f"{e.problem} (checkpoint.value_interval={value_interval} saves "
                                   "the critic: give the value service a checkpoint directory, or set "
                                   "checkpoint.value_interval: 0)", code=e.code) from None
        return keeper

    def observed(self) -> CriticState:
        """The critic the service holds now (GetInfo; weight_version is the TrainStep count), retried."""
        info = self.client.info()
        return CriticState(info.last_step_id, info.weight_version)

    def ensure(self) -> bool:
        """Reload the last good save if the service does not hold the expected critic; True if it did."""
        seen = self.observed()
        if seen == self.expected:
            return False
        self.reload(seen)
        return True

    def reload(self, seen: CriticState) -> None:
        """Bring a service that holds `seen` (not the expected critic) back to the last good save."""
        want, saved = self.expected, self.saved
        if saved is None:
            # Nothing saved yet: the restarted service's own starting critic is the best there is.
            lost = list(range(want.last_step_id - want.steps_trained + 1, want.last_step_id + 1))
            self.expected = seen
            log.warning("%s came back holding %s instead of %s and no value save exists yet: continuing from it; "
                        "lost the critic training of TrainStep ids %s", self.client.name, _show(seen), _show(want), _ids(lost))
        else:
            self.client.load(saved.name)
            now = self.observed()
            if now != saved.state:
                raise ServiceError(self.client.name, "Load", f"after loading {saved.name!r} it holds {_show(now)}, "
                                   f"but that save holds {_show(saved.state)}")
            lost = list(range(saved.state.last_step_id + 1, want.last_step_id + 1))
            self.expected = saved.state
            log.warning("%s came back holding %s instead of %s: loaded value save %r (%s); lost the critic "
                        "training of TrainStep ids %s", self.client.name, _show(seen), _show(want), saved.name, _show(saved.state),
                        _ids(lost))
        if self.on_reload is not None:
            self.on_reload(lost)

    def trained(self, step_id: int, result: ValueTrainResult) -> None:
        """Accept a TrainStep answer, or reload and raise Rejoined if it came from a critic that restarted.

        A duplicate (an earlier attempt landed, its answer was lost) is fine when the counters show
        exactly one application of `step_id` on the expected critic.
        """
        want = CriticState(step_id, self.expected.steps_trained + 1)
        got = CriticState(result.last_step_id, result.steps_trained)
        if got == want:
            self.expected = want
            return
        if self.saved is None:
            # No save to go back to: the restarted critic, trained on this step, is the best there is.
            self.reload(got)
            return
        self.reload(got)
        raise Rejoined(f"value TrainStep {step_id} ran on a critic holding {_show(got)}, expected {_show(want)}")

    def save(self, name: str | None = None) -> ValueSave | None:
        """Save the expected critic under `name` (default: the slot not holding the last good save).

        Returns the verified save, or None after the service turned out to have restarted (it is then
        reloaded; the caller decides whether to redo the step or save again).
        """
        if name is None:
            name = self.slots[1] if self.saved is not None and self.saved.name == self.slots[0] else self.slots[0]
        try:
            self.client.save(name)
        except ServiceError as e:
            if e.code not in RETRYABLE:
                raise
            self.ensure()  # GetInfo is retried: it waits for the restarted service
            return None
        seen = self.observed()
        if seen != self.expected:
            self.reload(seen)
            return None
        self.saved = ValueSave(name, self.expected)
        return self.saved


    def for_checkpoint(self, name: str, *, newest_fit: int, fallback: bool) -> ValueSave | None:
        """The critic a run checkpoint refers to: the expected one, saved now under `name`.

        It must have applied TrainStep ids up to `newest_fit` and no further. With `fallback` (a checkpoint
        left after a failure) a service that cannot save, or whose critic already trained past `newest_fit`,
        is represented by the last good save instead; None if no save fits.
        """
        try:
            if self.expected.last_step_id <= newest_fit:
                for _ in range(2):  # a Save that met a restarted service is redone once after the reload
                    if (save := self.save(name)) is not None:
                        return save
            if not fallback:
                raise ServiceError(self.client.name, "Save", f"could not save a critic at TrainStep id {newest_fit}")
        except ServiceError:
            if not fallback:
                raise
        good = self.saved
        if good is None or good.state.last_step_id > newest_fit:
            log.warning("no value save holds a critic up to TrainStep id %d: the checkpoint has none (a resume "
                        "continues with the value service's own)", newest_fit)
            return None
        log.warning("the checkpoint refers to the last good value save %r (%s)", good.name, _show(good.state))
        return good


def _show(s: CriticState) -> str:
    return f"last TrainStep id {s.last_step_id}, {s.steps_trained} applied"


def _ids(ids: list[int]) -> str:
    if not ids:
        return "none"
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}..{ids[-1]} ({len(ids)})"
