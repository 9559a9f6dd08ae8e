from t2v.v1 import generation_pb2 as _generation_pb2
from t2v.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("request_id", "embeddings", "num_frames", "height", "width", "num_inference_steps", "guidance_scale", "seed", "scheduler", "checkpoint_every", "resume", "cache", "preview_every")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    embeddings: _tensor_pb2.Tensor
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    checkpoint_every: int
    resume: DenoiseCheckpoint
    cache: str
    preview_every: int
    def __init__(self, request_id: _Optional[str] = ..., embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_frames: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., scheduler: _Optional[str] = ..., checkpoint_every: _Optional[int] = ..., resume: _Optional[_Union[DenoiseCheckpoint, _Mapping]] = ..., cache: _Optional[str] = ..., preview_every: _Optional[int] = ...) -> None: ...

class DenoiseCheckpoint(_message.Message):
    __slots__ = ("step", "latents", "scheduler", "num_inference_steps", "model_outputs", "lower_order_nums")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LOWER_ORDER_NUMS_FIELD_NUMBER: _ClassVar[int]
    step: int
    latents: _tensor_pb2.Tensor
    scheduler: str
    num_inference_steps: int
    model_outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    lower_order_nums: int
    def __init__(self, step: _Optional[int] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scheduler: _Optional[str] = ..., num_inference_steps: _Optional[int] = ..., model_outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., lower_order_nums: _Optional[int] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("progress", "latents", "checkpoint", "preview", "warning")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    progress: _generation_pb2.StepProgress
    latents: _tensor_pb2.Tensor
    checkpoint: DenoiseCheckpoint
    preview: _generation_pb2.Preview
    warning: str
    def __init__(self, progress: _Optional[_Union[_generation_pb2.StepProgress, _Mapping]] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., checkpoint: _Optional[_Union[DenoiseCheckpoint, _Mapping]] = ..., preview: _Optional[_Union[_generation_pb2.Preview, _Mapping]] = ..., warning: _Optional[str] = ...) -> None: ...
