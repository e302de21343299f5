"""CriticKeeper and resend_version: bringing a restarted value service or generator back up to date.

The value service here is a small in-memory stand-in with the counters the real one reports
(GetInfo's last_step_id and weight_version = TrainSteps applied), named saves, and a restart that
loses everything but the saves; the real service is exercised by tests/e2e/test_kill_services.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest

from orchestrator.remote.clients import ServiceError, ValueTrainResult
from orchestrator.remote.rejoin import CriticKeeper, CriticState, Rejoined, ValueSave, resend_version


@dataclass
class Info:
    last_step_id: int
    weight_version: int


@dataclass
class FakeValue:
    """The value service as the keeper sees it: counters, saves, restarts, an outage."""

    name: str = "value at 127.0.0.1:1"
    critic: CriticState = field(default_factory=lambda: CriticState(-1, 0))
    saves: dict[str, CriticState] = field(default_factory=dict)
    down: bool = False
    calls: list[str] = field(default_factory=list)

    def _reach(self, call: str) -> None:
        self.calls.append(call)
        if self.down:
            raise ServiceError(self.name, call, "UNAVAILABLE: down", code=grpc.StatusCode.UNAVAILABLE)

    def info(self) -> Info:
        self._reach("GetInfo")
        return Info(self.critic.last_step_id, self.critic.steps_trained)

    def save(self, name: str) -> str:
        self._reach("Save")
        self.saves[name] = self.critic
        return name

    def load(self, name: str) -> int:
        self._reach("Load")
        self.critic = self.saves[name]
        return self.critic.last_step_id

    def train(self, step_id: int) -> ValueTrainResult:
        """A TrainStep as the service applies it (a step id at or below the last one is a duplicate)."""
        duplicate = step_id <= self.critic.last_step_id
        if not duplicate:
            self.critic = CriticState(step_id, self.critic.steps_trained + 1)
        return ValueTrainResult(0.0, 0.0, 0.0, 0.0, duplicate, self.critic.steps_trained, self.critic.last_step_id)

    def restart(self) -> None:
        self.critic = CriticState(-1, 0)


def keeper_for(value: FakeValue, lost: list[list[int]] | None = None) -> CriticKeeper:
    return CriticKeeper.start(value, slot_prefix="run-value-live", loaded=None, value_interval=1,  # type: ignore[arg-type]
                              on_reload=None if lost is None else lost.append)


def train_steps(keeper: CriticKeeper, value: FakeValue, ids: range, *, save: bool = True) -> None:
    for i in ids:
        keeper.trained(i, value.train(i))
        if save:
            assert keeper.save() is not None


def test_resend_version_reuses_the_number_when_the_generator_accepts_it() -> None:
    assert resend_version(expected=6, served=0) == 6  # a restarted generator: version 6 names the same weights
    assert resend_version(expected=0, served=0) == 1
    assert resend_version(expected=3, served=7) == 8  # it only takes versions above what it serves


def test_the_starting_critic_is_saved_and_saves_alternate_between_two_slots() -> None:
    value = FakeValue()
    keeper = keeper_for(value)
    assert keeper.saved == ValueSave("run-value-live-a", CriticState(-1, 0))
    train_steps(keeper, value, range(3))
    # a: the start, b: after id 0, a: after id 1, b: after id 2
    assert keeper.saved == ValueSave("run-value-live-b", CriticState(2, 3))
    assert value.saves["run-value-live-a"] == CriticState(1, 2), "the other slot keeps the save before"


def test_a_restarted_service_is_reloaded_from_the_last_save_and_nothing_is_lost() -> None:
    value, lost = FakeValue(), []
    keeper = keeper_for(value, lost)
    train_steps(keeper, value, range(3))
    value.restart()
    assert keeper.ensure() is True
    assert value.critic == CriticState(2, 3) == keeper.expected
    assert lost == [[]]
    assert keeper.ensure() is False, "in step now: no second reload"


def test_lost_train_steps_are_those_after_the_last_save() -> None:
    value, lost = FakeValue(), []
    keeper = keeper_for(value, lost)
    train_steps(keeper, value, range(2))
    train_steps(keeper, value, range(2, 5), save=False)  # value_interval > 1: steps 2-4 not saved yet
    value.restart()
    keeper.ensure()
    assert value.critic == CriticState(1, 2)
    assert lost == [[2, 3, 4]]


def test_a_train_step_applied_by_a_restarted_service_is_reloaded_and_redone() -> None:
    value = FakeValue()
    keeper = keeper_for(value)
    train_steps(keeper, value, range(3))
    value.restart()  # between Values and TrainStep: the retry reaches an untrained critic
    with pytest.raises(Rejoined):
        keeper.trained(3, value.train(3))
    assert value.critic == keeper.expected == CriticState(2, 3), "back to the save; step 3 is trained again"
    keeper.trained(3, value.train(3))
    assert keeper.expected == CriticState(3, 4)


def test_a_duplicate_whose_first_attempt_landed_is_accepted() -> None:
    value = FakeValue()
    keeper = keeper_for(value)
    train_steps(keeper, value, range(2))
    value.train(2)  # applied, but the answer was lost
    keeper.trained(2, value.train(2))  # the retry: acknowledged as a duplicate
    assert keeper.expected == CriticState(2, 3)


def test_a_save_that_reached_a_restarted_service_never_replaces_the_good_one() -> None:
    value = FakeValue()
    keeper = keeper_for(value)
    train_steps(keeper, value, range(2))
    good = keeper.saved
    value.restart()  # after TrainStep, before Save: the Save writes an untrained critic into the free slot
    assert keeper.save() is None
    assert keeper.saved == good and value.critic == good.state, "reloaded from the good save"


def test_without_any_save_a_restarted_critic_is_taken_as_it_is() -> None:
    value, lost = FakeValue(), []
    keeper = CriticKeeper.start(value, slot_prefix="p", loaded=None, value_interval=0,  # type: ignore[arg-type]
                                on_reload=lost.append)
    train_steps(keeper, value, range(3), save=False)
    value.restart()
    keeper.trained(3, value.train(3))  # no save to go back to: no redo, the training of 0..2 is lost
    assert keeper.expected == CriticState(3, 1)
    assert lost == [[0, 1, 2]]


def test_a_checkpoint_falls_back_to_the_last_good_save_only_when_asked() -> None:
    value = FakeValue()
    keeper = keeper_for(value)
    train_steps(keeper, value, range(3))
    assert keeper.for_checkpoint("run-step-3", newest_fit=2, fallback=False) == ValueSave("run-step-3", CriticState(2, 3))
    value.down = True
    with pytest.raises(ServiceError):
        keeper.for_checkpoint("run-step-4", newest_fit=2, fallback=False)
    assert keeper.for_checkpoint("run-step-4", newest_fit=2, fallback=True) == ValueSave("run-step-3", CriticState(2, 3))
    value.down = False
    keeper.trained(3, value.train(3))  # the critic trained step 3, but the run state is still 3 steps
    assert keeper.for_checkpoint("run-step-3b", newest_fit=2, fallback=True) == ValueSave("run-step-3", CriticState(2, 3))
    assert keeper.for_checkpoint("run-step-1", newest_fit=0, fallback=True) is None, "no save fits step 1"


def test_a_value_service_without_a_checkpoint_directory_says_what_to_change() -> None:
    value = FakeValue()

    def refuse(name: str) -> str:
        raise ServiceError(value.name, "Save", "FAILED_PRECONDITION: no checkpoint directory",
                           code=grpc.StatusCode.FAILED_PRECONDITION)

    value.save = refuse  # type: ignore[method-assign]
    with pytest.raises(ServiceError, match=r"checkpoint\.value_interval: 0"):
        keeper_for(value)


def test_a_fresh_run_refuses_a_value_service_another_run_trained() -> None:
    # Its step ids 0, 1, ... would be acknowledged as duplicates of the old run's: no silent non-training.
    used = FakeValue(critic=CriticState(39, 40))
    with pytest.raises(ServiceError, match=r"trained by another run \(last step id 39, 40 TrainSteps\).*restart it"):
        keeper_for(used)
    assert used.calls == ["GetInfo"]  # refused before anything was saved or trained
    # A resume that loads its own save first is what such a service is for.
    used.saves["run-value-live-a"] = used.critic
    keeper = CriticKeeper.start(used, slot_prefix="run-value-live", loaded="run-value-live-a",  # type: ignore[arg-type]
                                value_interval=1)
    assert keeper.expected == CriticState(39, 40)
