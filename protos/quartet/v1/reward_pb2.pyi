from quartet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metadata(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, str]
    def __init__(self, values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("prompt_ids", "completion_ids", "prompt_text", "completion_text", "metadata", "want_token_rewards")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    WANT_TOKEN_REWARDS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _common_pb2.Ragged
    completion_ids: _common_pb2.Ragged
    prompt_text: _containers.RepeatedScalarFieldContainer[str]
    completion_text: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.RepeatedCompositeFieldContainer[Metadata]
    want_token_rewards: bool
    def __init__(self, prompt_ids: _Optional[_Union[_common_pb2.Ragged, _Mapping]] = ..., completion_ids: _Optional[_Union[_common_pb2.Ragged, _Mapping]] = ..., prompt_text: _Optional[_Iterable[str]] = ..., completion_text: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Iterable[_Union[Metadata, _Mapping]]] = ..., want_token_rewards: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("rewards", "token_rewards", "failed", "identity")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_REWARDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    rewards: _common_pb2.Tensor
    token_rewards: _common_pb2.Ragged
    failed: _containers.RepeatedScalarFieldContainer[bool]
    identity: str
    def __init__(self, rewards: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., token_rewards: _Optional[_Union[_common_pb2.Ragged, _Mapping]] = ..., failed: _Optional[_Iterable[bool]] = ..., identity: _Optional[str] = ...) -> None: ...
