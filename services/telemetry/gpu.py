"""Reads NVIDIA GPUs through NVML (the `pynvml` module of nvidia-ml-py)."""

import logging
from dataclasses import dataclass, field
from types import ModuleType

import psutil

_LOGGER = logging.getLogger(__name__)


@dataclass
class GpuProcess:
    pid: int
    name: str
    used_memory_bytes: int


@dataclass
class Gpu:
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
    fan_speed_percent: int | None
    graphics_clock_mhz: int
    memory_clock_mhz: int
    processes: list[GpuProcess] = field(default_factory=list)


def load_nvml() -> tuple[ModuleType | None, str]:
    """The pynvml module, or None and why it cannot be used."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    return pynvml, ""


def read_gpus(nvml: ModuleType | None, include_processes: bool = True) -> tuple[list[Gpu], str]:
    """Every GPU NVML sees, or an empty list and the reason there are none."""
    if nvml is None:
        return [], "nvidia-ml-py is not installed"
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return [], f"NVML unavailable ({exc}): no NVIDIA driver on this host"
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = [
            _read_one(nvml, index, driver, include_processes)
            for index in range(nvml.nvmlDeviceGetCount())
        ]
        return gpus, "" if gpus else "NVML found no GPUs"
    except nvml.NVMLError as exc:
        _LOGGER.warning("reading GPUs through NVML failed: %s", exc)
        return [], f"NVML error: {exc}"
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def _read_one(nvml: ModuleType, index: int, driver: str, include_processes: bool) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def optional(read, default):
        # Boards differ in what they report; a missing reading is not an error.
        try:
            return read()
        except nvml.NVMLError:
            return default

    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle), None)
    processes = []
    if include_processes:
        for proc in optional(lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle), []):
            processes.append(
                GpuProcess(
                    pid=proc.pid,
                    name=_process_name(proc.pid),
                    used_memory_bytes=proc.usedGpuMemory or 0,
                )
            )
    return Gpu(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        driver_version=driver,
        memory_total_bytes=memory.total,
        memory_used_bytes=memory.used,
        memory_free_bytes=memory.free,
        utilization_percent=utilization.gpu if utilization else 0,
        memory_utilization_percent=utilization.memory if utilization else 0,
        temperature_celsius=float(
            optional(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU), 0)
        ),
        power_draw_watts=optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle), 0) / 1000.0,
        power_limit_watts=optional(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle), 0)
        / 1000.0,
        fan_speed_percent=optional(lambda: nvml.nvmlDeviceGetFanSpeed(handle), None),
        graphics_clock_mhz=optional(
            lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_GRAPHICS), 0
        ),
        memory_clock_mhz=optional(
            lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM), 0
        ),
        processes=processes,
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return ""
