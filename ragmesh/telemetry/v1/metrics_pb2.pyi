import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetServiceMetricsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServiceMetricsResponse(_message.Message):
    __slots__ = ("metrics",)
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: ServiceMetrics
    def __init__(self, metrics: _Optional[_Union[ServiceMetrics, _Mapping]] = ...) -> None: ...

class ServiceMetrics(_message.Message):
    __slots__ = ("service_name", "start_time", "time", "rpcs", "queues")
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RPCS_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    service_name: str
    start_time: _timestamp_pb2.Timestamp
    time: _timestamp_pb2.Timestamp
    rpcs: _containers.RepeatedCompositeFieldContainer[RpcMetrics]
    queues: _containers.RepeatedCompositeFieldContainer[QueueMetrics]
    def __init__(self, service_name: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rpcs: _Optional[_Iterable[_Union[RpcMetrics, _Mapping]]] = ..., queues: _Optional[_Iterable[_Union[QueueMetrics, _Mapping]]] = ...) -> None: ...

class RpcMetrics(_message.Message):
    __slots__ = ("method", "calls", "errors", "errors_by_code", "mean_ms", "p50_ms", "p95_ms", "max_ms")
    class ErrorsByCodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_BY_CODE_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    method: str
    calls: int
    errors: int
    errors_by_code: _containers.ScalarMap[str, int]
    mean_ms: float
    p50_ms: float
    p95_ms: float
    max_ms: float
    def __init__(self, method: _Optional[str] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., errors_by_code: _Optional[_Mapping[str, int]] = ..., mean_ms: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., max_ms: _Optional[float] = ...) -> None: ...

class QueueMetrics(_message.Message):
    __slots__ = ("name", "depth", "batches", "batched_items", "mean_batch_size", "max_batch_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCHED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    depth: int
    batches: int
    batched_items: int
    mean_batch_size: float
    max_batch_size: int
    def __init__(self, name: _Optional[str] = ..., depth: _Optional[int] = ..., batches: _Optional[int] = ..., batched_items: _Optional[int] = ..., mean_batch_size: _Optional[float] = ..., max_batch_size: _Optional[int] = ...) -> None: ...
