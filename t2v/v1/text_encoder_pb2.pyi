from t2v.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("prompts", "request_id")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PromptInfo(_message.Message):
    __slots__ = ("num_tokens", "truncated", "dropped_text")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TEXT_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    truncated: bool
    dropped_text: str
    def __init__(self, num_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., dropped_text: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("embeddings", "prompts")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _tensor_pb2.Tensor
    prompts: _containers.RepeatedCompositeFieldContainer[PromptInfo]
    def __init__(self, embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., prompts: _Optional[_Iterable[_Union[PromptInfo, _Mapping]]] = ...) -> None: ...
