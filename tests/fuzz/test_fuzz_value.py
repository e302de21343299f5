"""Fuzz the value service (Values, TrainStep, Save, Load) over real gRPC on 127.0.0.1 with hostile but
well-formed requests: each is refused with INVALID_ARGUMENT / OUT_OF_RANGE naming the field (escaping
checkpoint names: PERMISSION_DENIED), nothing is trained, and Values afterwards are bit-for-bit those
from before any fuzzing. Save/Load path escapes are tested one by one in tests/integration/test_value.py;
here they are drawn at random."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quartet.v1 import common_pb2, value_pb2, value_pb2_grpc
from services.common.codec import decode_ragged
from tests.fuzz.served import Served
from tests.fuzz.strategies import (
    DEADLINE_S,
    FLOAT_DTYPES,
    FUZZ,
    GOOD_ROWS,
    GOOD_STARTS,
    INT64_MAX,
    INT_DTYPES,
    NON_FINITE,
    REJECT_CODES,
    TOKENS,
    Hostile,
    broken_ragged,
    expect_rejected,
    out_of_vocab_ids,
    ragged,
    sequence_batch,
    token_rows,
)

OPTIONS = {"lr": 1e-2, "max_batch_tokens": 64, "max_batch_sequences": 8, "max_tokens_per_call": 200,
           "max_epochs": 4, "max_concurrent": 2}
PERMISSION = frozenset({grpc.StatusCode.PERMISSION_DENIED})


class Value:
    """The served critic, admin and call stubs, and its Values on a fixed batch before any fuzzing."""

    def __init__(self, served: Served) -> None:
        self.admin = value_pb2_grpc.ValueStub(served.admin)
        self.stub = value_pb2_grpc.ValueStub(served.call)
        self.vocab = int(self.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=DEADLINE_S).vocab_size)
        self.baseline = self.good()

    def values(self, request: value_pb2.ValuesRequest) -> value_pb2.ValuesResponse:
        return self.stub.Values(request, timeout=DEADLINE_S)

    def train(self, request: value_pb2.TrainStepRequest) -> value_pb2.TrainStepResponse:
        return self.admin.TrainStep(request, timeout=DEADLINE_S)

    def good(self) -> tuple[bytes, int]:
        out = self.values(value_pb2.ValuesRequest(sequences=sequence_batch(GOOD_ROWS, GOOD_STARTS)))
        return out.values.values.data, out.steps_trained

    def assert_unchanged(self, why: str) -> None:
        assert self.good() == self.baseline, f"{why}: the critic changed"
        info = self.stub.GetInfo(common_pb2.GetInfoRequest(), timeout=DEADLINE_S)
        assert (info.weight_version, info.last_step_id) == (0, -1), f"{why}: a step was counted"

    def reject_then_unchanged(self, call, case: Hostile, codes: frozenset[grpc.StatusCode] = REJECT_CODES) -> None:
        expect_rejected(call, case, codes)
        self.assert_unchanged(case.why)


@pytest.fixture(scope="module")
def val(serve: Callable[..., Served], tmp_path_factory: pytest.TempPathFactory) -> Value:
    return Value(serve("value", OPTIONS, checkpoint_dir=tmp_path_factory.mktemp("value-fuzz") / "ckpts"))


# ---- Values ----

@FUZZ
@given(data=st.data())
def test_values_refuse_broken_sequences(val: Value, data: st.DataObject) -> None:
    rows = data.draw(token_rows(val.vocab, min_len=2))
    kind = data.draw(st.sampled_from(["ragged", "vocab", "start"]))
    starts = [1] * len(rows)
    field = TOKENS
    if kind == "ragged":
        case = data.draw(broken_ragged(rows, allowed=INT_DTYPES, field=TOKENS))
        batch, why = common_pb2.SequenceBatch(token_ids=case.request, response_start=starts), case.why
    else:
        i = data.draw(st.integers(0, len(rows) - 1))
        if kind == "vocab":
            rows[i][0] = data.draw(out_of_vocab_ids(val.vocab))
        else:
            starts[i] = data.draw(st.one_of(st.integers(-INT64_MAX, 0), st.integers(len(rows[i]) + 1, INT64_MAX)))
            field = "sequences.response_start"
        batch, why = sequence_batch(rows, starts), f"{kind}: {rows} {starts}"
    val.reject_then_unchanged(val.values, Hostile(value_pb2.ValuesRequest(sequences=batch), field, why))


# ---- TrainStep ----

_TRAIN_KINDS = ["returns_nonfinite", "old_values_nonfinite", "returns_rows", "returns_length", "returns_ragged",
                "mask_not_binary", "returns_missing", "clip_range", "clip_without_old_values", "step_id", "epochs",
                "minibatch_size", "sequences"]


@st.composite
def hostile_train_steps(draw: st.DrawFn, vocab: int) -> Hostile:
    """A TrainStep with one defect among _TRAIN_KINDS on an otherwise valid batch."""
    rows = draw(token_rows(vocab, min_len=2, max_rows=4))
    starts = [draw(st.integers(1, len(r) - 1)) for r in rows]  # every row has >= 1 response token
    counts = [len(r) - s for r, s in zip(rows, starts, strict=True)]
    floats = st.floats(-10, 10, allow_nan=False, width=32)
    returns = [[draw(floats) for _ in range(n)] for n in counts]
    old = [[draw(floats) for _ in range(n)] for n in counts]
    req = value_pb2.TrainStepRequest(sequences=sequence_batch(rows, starts), returns=ragged(returns, common_pb2.DTYPE_FLOAT32),
                                     step_id=draw(st.integers(0, 1000)))
    kind = draw(st.sampled_from(_TRAIN_KINDS))
    i = draw(st.integers(0, len(rows) - 1))
    field = kind.split("_")[0] if kind.startswith(("returns", "mask")) else kind
    if kind == "returns_nonfinite":
        returns[i][draw(st.integers(0, counts[i] - 1))] = draw(st.sampled_from(NON_FINITE))
        req.returns.CopyFrom(ragged(returns, draw(st.sampled_from(FLOAT_DTYPES[:2] + FLOAT_DTYPES[3:]))))
    elif kind == "old_values_nonfinite":
        old[i][0] = draw(st.sampled_from(NON_FINITE))
        req.old_values.CopyFrom(ragged(old, common_pb2.DTYPE_FLOAT32))
        req.clip_range = 0.2
    elif kind == "returns_rows":
        req.returns.CopyFrom(ragged(returns[:i] if draw(st.booleans()) else [*returns, [0.0]],
                                    common_pb2.DTYPE_FLOAT32))
    elif kind == "returns_length":
        returns[i] = returns[i] + [1.0] if draw(st.booleans()) else returns[i][:-1]
        req.returns.CopyFrom(ragged(returns, common_pb2.DTYPE_FLOAT32))
    elif kind == "returns_ragged":
        req.returns.CopyFrom(draw(broken_ragged(returns, allowed=FLOAT_DTYPES, field="returns")).request)
    elif kind == "mask_not_binary":
        mask = [[1.0] * n for n in counts]
        mask[i][0] = draw(st.sampled_from([0.5, 2.0, -1.0, *NON_FINITE]))
        req.mask.CopyFrom(ragged(mask, common_pb2.DTYPE_FLOAT32))
    elif kind == "returns_missing":
        req.ClearField("returns")
    elif kind == "clip_range":
        req.old_values.CopyFrom(ragged(old, common_pb2.DTYPE_FLOAT32))
        req.clip_range = draw(st.sampled_from([0.0, -0.2, *NON_FINITE]))
    elif kind == "clip_without_old_values":
        req.clip_range, field = 0.2, "old_values"
    elif kind == "step_id":
        req.step_id = draw(st.integers(-(2**63), -1))
    elif kind == "epochs":
        req.epochs = draw(st.one_of(st.integers(-(2**31), -1), st.integers(OPTIONS["max_epochs"] + 1, 2**31 - 1)))
    elif kind == "minibatch_size":
        req.minibatch_size = draw(st.integers(-(2**31), -1))
    else:
        req.sequences.response_start[i] = draw(st.sampled_from([0, -1, len(rows[i]) + 1]))
    return Hostile(req, field, f"TrainStep {kind}")


@FUZZ
@given(data=st.data())
def test_train_step_refuses_hostile_targets_and_trains_nothing(val: Value, data: st.DataObject) -> None:
    val.reject_then_unchanged(val.train, data.draw(hostile_train_steps(val.vocab)))


# ---- Save / Load names ----

_SEGMENT = st.text(st.characters(codec="utf-8", exclude_characters="/\\\x00"), min_size=1, max_size=12)


@st.composite
def escaping_names(draw: st.DrawFn) -> str:
    """Checkpoint names that point outside the checkpoint directory."""
    inner = draw(st.lists(_SEGMENT.filter(lambda s: s not in (".", "..") and not s.startswith("~")), max_size=3))
    kind = draw(st.sampled_from(["dotdot", "absolute", "home", "backslash"]))
    if kind == "dotdot":
        parts = inner + [".."] * draw(st.integers(1, len(inner) + 2)) + draw(st.lists(_SEGMENT, max_size=2))
        return "/".join(parts)
    if kind == "absolute":
        return "/" + "/".join(inner or ["etc"])
    if kind == "home":
        return "~/" + "/".join(inner or ["x"])
    return "..\\" + "\\".join(inner or ["x"])


@FUZZ
@given(name=escaping_names(), method=st.sampled_from(["Save", "Load"]))
def test_escaping_checkpoint_names_are_denied(val: Value, name: str, method: str) -> None:
    call = val.admin.Save if method == "Save" else val.admin.Load
    request = value_pb2.SaveRequest(name=name) if method == "Save" else value_pb2.LoadRequest(name=name)
    expect_rejected(lambda r: call(r, timeout=DEADLINE_S), Hostile(request, "", f"{method}({name!r})"), PERMISSION)
    val.assert_unchanged(f"{method}({name!r})")


@FUZZ
@given(name=st.text(st.characters(codec="utf-8"), max_size=40))
def test_load_of_any_name_never_fails_internally(val: Value, name: str) -> None:
    """Nothing has been saved under these names: refused (named 'name' or denied), the critic untouched."""
    try:
        val.admin.Load(value_pb2.LoadRequest(name=name), timeout=DEADLINE_S)
    except grpc.RpcError as e:
        assert e.code() in REJECT_CODES | PERMISSION, f"Load({name!r}): {e.code()} {e.details()!r}"
    else:
        raise AssertionError(f"Load({name!r}) succeeded although nothing was saved")
    val.assert_unchanged(f"Load({name!r})")


@pytest.mark.parametrize("name", ["n" * 300, "y/" + "a" * 250 + "/" + "b" * 256, "c/" * 2100 + "d",
                                  "saved/meta.json/inner", "saved/critic.safetensors/inner"],
                         ids=["component-300B", "deep-component-256B", "path-4.2kB", "under-meta.json",
                              "under-weights-file"])
def test_unwritable_checkpoint_names_are_refused_not_internal(val: Value, name: str) -> None:
    val.admin.Save(value_pb2.SaveRequest(name="saved"), timeout=DEADLINE_S)  # a checkpoint whose files are in the way
    codes = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})
    expect_rejected(lambda r: val.admin.Save(r, timeout=DEADLINE_S),
                    Hostile(value_pb2.SaveRequest(name=name), "", f"Save({name[:40]!r})"), codes)
    val.assert_unchanged(f"Save({name[:40]!r})")


# ---- accepted but extreme ----

def test_extreme_finite_returns_leave_the_critic_finite(serve: Callable[..., Served], tmp_path: Path) -> None:
    """Returns near the float32 maximum are legal; the step is applied or skipped, never NaN weights."""
    with serve("value", OPTIONS, checkpoint_dir=tmp_path / "ckpts") as served:
        v = Value(served)
        counts = [len(r) - s for r, s in zip(GOOD_ROWS, GOOD_STARTS, strict=True)]
        for step, big in enumerate((3e38, -3e38, 1e30)):
            returns = [[big] * n for n in counts]
            v.train(value_pb2.TrainStepRequest(sequences=sequence_batch(GOOD_ROWS, GOOD_STARTS), step_id=step,
                                               returns=ragged(returns, common_pb2.DTYPE_FLOAT32)))
        out = v.values(value_pb2.ValuesRequest(sequences=sequence_batch(GOOD_ROWS, GOOD_STARTS)))
        assert bool(torch.isfinite(decode_ragged(out.values).values).all())
