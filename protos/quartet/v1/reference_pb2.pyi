from quartet.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogProbsRequest(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _common_pb2.SequenceBatch
    def __init__(self, sequences: _Optional[_Union[_common_pb2.SequenceBatch, _Mapping]] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _common_pb2.Ragged
    def __init__(self, logprobs: _Optional[_Union[_common_pb2.Ragged, _Mapping]] = ...) -> None: ...
