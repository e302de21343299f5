from quartet.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValuesRequest(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _common_pb2.SequenceBatch
    def __init__(self, sequences: _Optional[_Union[_common_pb2.SequenceBatch, _Mapping]] = ...) -> None: ...

class ValuesResponse(_message.Message):
    __slots__ = ("values", "steps_trained")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    STEPS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    values: _common_pb2.Ragged
    steps_trained: int
    def __init__(self, values: _Optional[_Union[_common_pb2.Ragged, _Mapping]] = ..., steps_trained: _Optional[int] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("sequences", "returns", "old_values", "mask", "clip_range", "step_id", "epochs", "minibatch_size")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUES_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MINIBATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    sequences: _common_pb2.SequenceBatch
    returns: _common_pb2.Ragged
    old_values: _common_pb2.Ragged
    mask: _common_pb2.Ragged
    clip_range: float
    step_id: int
    epochs: int
    minibatch_size: int
    def __init__(self, sequences: _Optional[_Union[_common_pb2.SequenceBatch, _Mapping]] = ..., returns: _Optional[_Union[_common_pb2.Ragged, _Mapping]] = ..., old_values: _Optional[_Union[_common_pb2.Ragged, _Mapping]] = ..., mask: _Optional[_Union[_common_pb2.Ragged, _Mapping]] = ..., clip_range: _Optional[float] = ..., step_id: _Optional[int] = ..., epochs: _Optional[int] = ..., minibatch_size: _Optional[int] = ...) -> None: ...

class TrainStepResponse(_message.Message):
    __slots__ = ("loss", "clip_fraction", "explained_variance", "grad_norm", "duplicate", "steps_trained", "last_step_id")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    loss: float
    clip_fraction: float
    explained_variance: float
    grad_norm: float
    duplicate: bool
    steps_trained: int
    last_step_id: int
    def __init__(self, loss: _Optional[float] = ..., clip_fraction: _Optional[float] = ..., explained_variance: _Optional[float] = ..., grad_norm: _Optional[float] = ..., duplicate: _Optional[bool] = ..., steps_trained: _Optional[int] = ..., last_step_id: _Optional[int] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SaveResponse(_message.Message):
    __slots__ = ("path", "steps_trained", "last_step_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEPS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    steps_trained: int
    last_step_id: int
    def __init__(self, path: _Optional[str] = ..., steps_trained: _Optional[int] = ..., last_step_id: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("steps_trained", "last_step_id")
    STEPS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    steps_trained: int
    last_step_id: int
    def __init__(self, steps_trained: _Optional[int] = ..., last_step_id: _Optional[int] = ...) -> None: ...
