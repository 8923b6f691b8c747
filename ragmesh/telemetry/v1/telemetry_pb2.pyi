import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from ragmesh.telemetry.v1 import metrics_pb2 as _metrics_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetSystemStatusRequest(_message.Message):
    __slots__ = ("skip_gpu_processes",)
    SKIP_GPU_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    skip_gpu_processes: bool
    def __init__(self, skip_gpu_processes: _Optional[bool] = ...) -> None: ...

class GetSystemStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: SystemStatus
    def __init__(self, status: _Optional[_Union[SystemStatus, _Mapping]] = ...) -> None: ...

class WatchSystemStatusRequest(_message.Message):
    __slots__ = ("interval", "skip_gpu_processes")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SKIP_GPU_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    skip_gpu_processes: bool
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., skip_gpu_processes: _Optional[bool] = ...) -> None: ...

class WatchSystemStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: SystemStatus
    def __init__(self, status: _Optional[_Union[SystemStatus, _Mapping]] = ...) -> None: ...

class GetMeshStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMeshStatusResponse(_message.Message):
    __slots__ = ("services", "nodes")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceHealth]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceHealth, _Mapping]]] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "target", "state", "system", "latency", "error")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[NodeStatus.State]
        STATE_REACHABLE: _ClassVar[NodeStatus.State]
        STATE_UNREACHABLE: _ClassVar[NodeStatus.State]
    STATE_UNSPECIFIED: NodeStatus.State
    STATE_REACHABLE: NodeStatus.State
    STATE_UNREACHABLE: NodeStatus.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    target: str
    state: NodeStatus.State
    system: SystemStatus
    latency: _duration_pb2.Duration
    error: str
    def __init__(self, name: _Optional[str] = ..., target: _Optional[str] = ..., state: _Optional[_Union[NodeStatus.State, str]] = ..., system: _Optional[_Union[SystemStatus, _Mapping]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class SystemStatus(_message.Message):
    __slots__ = ("time", "hostname", "boot_time", "uptime", "cpu", "memory", "swap", "disks", "gpus", "gpu_unavailable_reason", "temperatures", "network", "warnings", "process_rss_bytes", "node_name")
    TIME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    BOOT_TIME_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SWAP_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPU_UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    hostname: str
    boot_time: _timestamp_pb2.Timestamp
    uptime: _duration_pb2.Duration
    cpu: CpuStatus
    memory: MemoryStatus
    swap: SwapStatus
    disks: _containers.RepeatedCompositeFieldContainer[DiskStatus]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuStatus]
    gpu_unavailable_reason: str
    temperatures: _containers.RepeatedCompositeFieldContainer[TemperatureSensor]
    network: NetworkStatus
    warnings: _containers.RepeatedCompositeFieldContainer[Warning]
    process_rss_bytes: int
    node_name: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hostname: _Optional[str] = ..., boot_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cpu: _Optional[_Union[CpuStatus, _Mapping]] = ..., memory: _Optional[_Union[MemoryStatus, _Mapping]] = ..., swap: _Optional[_Union[SwapStatus, _Mapping]] = ..., disks: _Optional[_Iterable[_Union[DiskStatus, _Mapping]]] = ..., gpus: _Optional[_Iterable[_Union[GpuStatus, _Mapping]]] = ..., gpu_unavailable_reason: _Optional[str] = ..., temperatures: _Optional[_Iterable[_Union[TemperatureSensor, _Mapping]]] = ..., network: _Optional[_Union[NetworkStatus, _Mapping]] = ..., warnings: _Optional[_Iterable[_Union[Warning, _Mapping]]] = ..., process_rss_bytes: _Optional[int] = ..., node_name: _Optional[str] = ...) -> None: ...

class CpuStatus(_message.Message):
    __slots__ = ("usage_percent", "per_core_usage_percent", "logical_cores", "physical_cores", "current_frequency_mhz", "max_frequency_mhz", "load_average_1m", "load_average_5m", "load_average_15m")
    USAGE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    PER_CORE_USAGE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_CORES_FIELD_NUMBER: _ClassVar[int]
    PHYSICAL_CORES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FREQUENCY_MHZ_FIELD_NUMBER: _ClassVar[int]
    MAX_FREQUENCY_MHZ_FIELD_NUMBER: _ClassVar[int]
    LOAD_AVERAGE_1M_FIELD_NUMBER: _ClassVar[int]
    LOAD_AVERAGE_5M_FIELD_NUMBER: _ClassVar[int]
    LOAD_AVERAGE_15M_FIELD_NUMBER: _ClassVar[int]
    usage_percent: float
    per_core_usage_percent: _containers.RepeatedScalarFieldContainer[float]
    logical_cores: int
    physical_cores: int
    current_frequency_mhz: float
    max_frequency_mhz: float
    load_average_1m: float
    load_average_5m: float
    load_average_15m: float
    def __init__(self, usage_percent: _Optional[float] = ..., per_core_usage_percent: _Optional[_Iterable[float]] = ..., logical_cores: _Optional[int] = ..., physical_cores: _Optional[int] = ..., current_frequency_mhz: _Optional[float] = ..., max_frequency_mhz: _Optional[float] = ..., load_average_1m: _Optional[float] = ..., load_average_5m: _Optional[float] = ..., load_average_15m: _Optional[float] = ...) -> None: ...

class MemoryStatus(_message.Message):
    __slots__ = ("total_bytes", "available_bytes", "used_bytes", "used_percent")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    available_bytes: int
    used_bytes: int
    used_percent: float
    def __init__(self, total_bytes: _Optional[int] = ..., available_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., used_percent: _Optional[float] = ...) -> None: ...

class SwapStatus(_message.Message):
    __slots__ = ("total_bytes", "used_bytes", "used_percent")
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    total_bytes: int
    used_bytes: int
    used_percent: float
    def __init__(self, total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., used_percent: _Optional[float] = ...) -> None: ...

class DiskStatus(_message.Message):
    __slots__ = ("mountpoint", "device", "filesystem", "total_bytes", "used_bytes", "free_bytes", "used_percent", "data_directories")
    MOUNTPOINT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FILESYSTEM_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    DATA_DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    mountpoint: str
    device: str
    filesystem: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    used_percent: float
    data_directories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mountpoint: _Optional[str] = ..., device: _Optional[str] = ..., filesystem: _Optional[str] = ..., total_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., used_percent: _Optional[float] = ..., data_directories: _Optional[_Iterable[str]] = ...) -> None: ...

class GpuStatus(_message.Message):
    __slots__ = ("index", "name", "uuid", "driver_version", "memory_total_bytes", "memory_used_bytes", "memory_free_bytes", "utilization_percent", "memory_utilization_percent", "temperature_celsius", "power_draw_watts", "power_limit_watts", "fan_speed_percent", "graphics_clock_mhz", "memory_clock_mhz", "processes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_DRAW_WATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    FAN_SPEED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    GRAPHICS_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    uuid: str
    driver_version: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int
    memory_utilization_percent: int
    temperature_celsius: float
    power_draw_watts: float
    power_limit_watts: float
    fan_speed_percent: int
    graphics_clock_mhz: int
    memory_clock_mhz: int
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., driver_version: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ..., utilization_percent: _Optional[int] = ..., memory_utilization_percent: _Optional[int] = ..., temperature_celsius: _Optional[float] = ..., power_draw_watts: _Optional[float] = ..., power_limit_watts: _Optional[float] = ..., fan_speed_percent: _Optional[int] = ..., graphics_clock_mhz: _Optional[int] = ..., memory_clock_mhz: _Optional[int] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ...) -> None: ...

class GpuProcess(_message.Message):
    __slots__ = ("pid", "name", "used_memory_bytes")
    PID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    name: str
    used_memory_bytes: int
    def __init__(self, pid: _Optional[int] = ..., name: _Optional[str] = ..., used_memory_bytes: _Optional[int] = ...) -> None: ...

class TemperatureSensor(_message.Message):
    __slots__ = ("chip", "label", "current_celsius", "high_celsius", "critical_celsius")
    CHIP_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    HIGH_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    chip: str
    label: str
    current_celsius: float
    high_celsius: float
    critical_celsius: float
    def __init__(self, chip: _Optional[str] = ..., label: _Optional[str] = ..., current_celsius: _Optional[float] = ..., high_celsius: _Optional[float] = ..., critical_celsius: _Optional[float] = ...) -> None: ...

class NetworkStatus(_message.Message):
    __slots__ = ("bytes_sent", "bytes_received", "packets_sent", "packets_received", "errors_in", "errors_out")
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PACKETS_SENT_FIELD_NUMBER: _ClassVar[int]
    PACKETS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_IN_FIELD_NUMBER: _ClassVar[int]
    ERRORS_OUT_FIELD_NUMBER: _ClassVar[int]
    bytes_sent: int
    bytes_received: int
    packets_sent: int
    packets_received: int
    errors_in: int
    errors_out: int
    def __init__(self, bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., packets_sent: _Optional[int] = ..., packets_received: _Optional[int] = ..., errors_in: _Optional[int] = ..., errors_out: _Optional[int] = ...) -> None: ...

class Warning(_message.Message):
    __slots__ = ("severity", "code", "message")
    class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SEVERITY_UNSPECIFIED: _ClassVar[Warning.Severity]
        SEVERITY_INFO: _ClassVar[Warning.Severity]
        SEVERITY_WARNING: _ClassVar[Warning.Severity]
        SEVERITY_CRITICAL: _ClassVar[Warning.Severity]
    SEVERITY_UNSPECIFIED: Warning.Severity
    SEVERITY_INFO: Warning.Severity
    SEVERITY_WARNING: Warning.Severity
    SEVERITY_CRITICAL: Warning.Severity
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    severity: Warning.Severity
    code: str
    message: str
    def __init__(self, severity: _Optional[_Union[Warning.Severity, str]] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ServiceHealth(_message.Message):
    __slots__ = ("name", "target", "state", "latency", "error", "metrics")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ServiceHealth.State]
        STATE_SERVING: _ClassVar[ServiceHealth.State]
        STATE_NOT_SERVING: _ClassVar[ServiceHealth.State]
        STATE_UNREACHABLE: _ClassVar[ServiceHealth.State]
    STATE_UNSPECIFIED: ServiceHealth.State
    STATE_SERVING: ServiceHealth.State
    STATE_NOT_SERVING: ServiceHealth.State
    STATE_UNREACHABLE: ServiceHealth.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    target: str
    state: ServiceHealth.State
    latency: _duration_pb2.Duration
    error: str
    metrics: _metrics_pb2.ServiceMetrics
    def __init__(self, name: _Optional[str] = ..., target: _Optional[str] = ..., state: _Optional[_Union[ServiceHealth.State, str]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[str] = ..., metrics: _Optional[_Union[_metrics_pb2.ServiceMetrics, _Mapping]] = ...) -> None: ...
