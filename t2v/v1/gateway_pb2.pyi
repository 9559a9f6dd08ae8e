from t2v.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_TEXT_ENCODER: _ClassVar[Stage]
    STAGE_DENOISER: _ClassVar[Stage]
    STAGE_DECODER: _ClassVar[Stage]
STAGE_UNSPECIFIED: Stage
STAGE_TEXT_ENCODER: Stage
STAGE_DENOISER: Stage
STAGE_DECODER: Stage

class GenerateRequest(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: _generation_pb2.GenerationParams
    def __init__(self, params: _Optional[_Union[_generation_pb2.GenerationParams, _Mapping]] = ...) -> None: ...

class StageStarted(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ...) -> None: ...

class VideoResult(_message.Message):
    __slots__ = ("video", "mime_type", "seed", "num_frames", "height", "width", "fps", "num_inference_steps", "guidance_scale", "scheduler")
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    video: bytes
    mime_type: str
    seed: int
    num_frames: int
    height: int
    width: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    def __init__(self, video: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., seed: _Optional[int] = ..., num_frames: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., fps: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., scheduler: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("job_id", "stage", "progress", "result", "warnings")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    stage: StageStarted
    progress: _generation_pb2.StepProgress
    result: VideoResult
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., stage: _Optional[_Union[StageStarted, _Mapping]] = ..., progress: _Optional[_Union[_generation_pb2.StepProgress, _Mapping]] = ..., result: _Optional[_Union[VideoResult, _Mapping]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...
