"""Takes snapshots of the host: CPU, memory, disks, GPUs, sensors, network, warnings."""

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import psutil

from services.telemetry.gpu import Gpu, read_gpus
from services.telemetry.settings import TelemetrySettings


@dataclass
class Cpu:
    usage_percent: float
    per_core_usage_percent: list[float]
    logical_cores: int
    physical_cores: int
    current_frequency_mhz: float
    max_frequency_mhz: float
    load_average_1m: float
    load_average_5m: float
    load_average_15m: float


@dataclass
class Memory:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    used_percent: float


@dataclass
class Swap:
    total_bytes: int
    used_bytes: int
    used_percent: float


@dataclass
class Disk:
    mountpoint: str
    device: str
    filesystem: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    used_percent: float
    data_directories: list[str] = field(default_factory=list)


@dataclass
class Temperature:
    chip: str
    label: str
    current_celsius: float
    high_celsius: float
    critical_celsius: float


@dataclass
class Network:
    bytes_sent: int
    bytes_received: int
    packets_sent: int
    packets_received: int
    errors_in: int
    errors_out: int


@dataclass
class Alert:
    severity: int  # 2 warning, 3 critical (the proto's Severity values)
    code: str
    message: str


WARNING, CRITICAL = 2, 3


@dataclass
class Snapshot:
    time: datetime
    hostname: str
    boot_time: datetime
    uptime: timedelta
    cpu: Cpu
    memory: Memory
    swap: Swap
    disks: list[Disk]
    gpus: list[Gpu]
    gpu_unavailable_reason: str
    temperatures: list[Temperature]
    network: Network
    warnings: list[Alert]
    process_rss_bytes: int
    node_name: str


class SystemReader:
    """Reads snapshots. Blocking (CPU sampling sleeps): call it from a worker thread."""

    def __init__(self, settings: TelemetrySettings, nvml: ModuleType | None) -> None:
        self._settings = settings
        self._nvml = nvml
        self._process = psutil.Process()

    def snapshot(self, include_gpu_processes: bool = True) -> Snapshot:
        now = time.time()
        boot = psutil.boot_time()
        memory = psutil.virtual_memory()
        swap = psutil.swap_memory()
        disks = self._disks()
        gpus, gpu_reason = read_gpus(self._nvml, include_gpu_processes)
        temperatures = _temperatures()
        snapshot = Snapshot(
            time=datetime.fromtimestamp(now, UTC),
            hostname=socket.gethostname(),
            boot_time=datetime.fromtimestamp(boot, UTC),
            uptime=timedelta(seconds=max(now - boot, 0)),
            cpu=self._cpu(),
            memory=Memory(memory.total, memory.available, memory.used, memory.percent),
            swap=Swap(swap.total, swap.used, swap.percent),
            disks=disks,
            gpus=gpus,
            gpu_unavailable_reason=gpu_reason,
            temperatures=temperatures,
            network=_network(),
            warnings=[],
            process_rss_bytes=self._process.memory_info().rss,
            node_name=self._settings.node_name,
        )
        snapshot.warnings = self.warnings_for(snapshot)
        return snapshot

    def _cpu(self) -> Cpu:
        interval = self._settings.cpu_sample_seconds or None
        per_core = psutil.cpu_percent(interval=interval, percpu=True)
        frequency = psutil.cpu_freq()
        load = os.getloadavg()
        return Cpu(
            usage_percent=sum(per_core) / len(per_core) if per_core else 0.0,
            per_core_usage_percent=per_core,
            logical_cores=psutil.cpu_count(logical=True) or 0,
            physical_cores=psutil.cpu_count(logical=False) or 0,
            current_frequency_mhz=frequency.current if frequency else 0.0,
            max_frequency_mhz=frequency.max if frequency else 0.0,
            load_average_1m=load[0],
            load_average_5m=load[1],
            load_average_15m=load[2],
        )

    def _disks(self) -> list[Disk]:
        """Real disk mounts, plus the mounts holding the configured data directories."""
        all_partitions = {p.mountpoint: p for p in psutil.disk_partitions(all=True)}
        chosen = {p.mountpoint: p for p in psutil.disk_partitions(all=False)}
        data_dirs: dict[str, list[str]] = {}
        for directory in self._settings.data_directories:
            mount = _mount_of(directory, all_partitions)
            if mount is None:
                continue
            chosen.setdefault(mount, all_partitions[mount])
            data_dirs.setdefault(mount, []).append(str(directory.resolve()))
        disks = []
        for mountpoint, partition in sorted(chosen.items()):
            try:
                usage = psutil.disk_usage(mountpoint)
            except OSError:
                continue  # unmounted or unreadable since it was listed
            disks.append(
                Disk(
                    mountpoint=mountpoint,
                    device=partition.device,
                    filesystem=partition.fstype,
                    total_bytes=usage.total,
                    used_bytes=usage.used,
                    free_bytes=usage.free,
                    used_percent=usage.percent,
                    data_directories=data_dirs.get(mountpoint, []),
                )
            )
        return disks

    def warnings_for(self, snapshot: Snapshot) -> list[Alert]:
        s = self._settings
        found: list[Alert] = []
        for disk in snapshot.disks:
            if disk.used_percent >= s.disk_warning_percent:
                severity = CRITICAL if disk.used_percent >= s.disk_critical_percent else WARNING
                found.append(
                    Alert(
                        severity,
                        "DISK_NEARLY_FULL",
                        f"{disk.mountpoint} is {disk.used_percent:.0f}% full "
                        f"({disk.free_bytes / 2**30:.1f} GiB free): free space or grow the disk",
                    )
                )
        used = snapshot.memory.used_percent
        if used >= s.memory_warning_percent:
            found.append(
                Alert(
                    CRITICAL if used >= s.memory_critical_percent else WARNING,
                    "MEMORY_LOW",
                    f"memory is {used:.0f}% used "
                    f"({snapshot.memory.available_bytes / 2**30:.1f} GiB available): "
                    "unload a model or reduce batch sizes",
                )
            )
        if snapshot.swap.total_bytes and snapshot.swap.used_percent >= 50:
            found.append(
                Alert(
                    WARNING,
                    "SWAP_IN_USE",
                    f"swap is {snapshot.swap.used_percent:.0f}% used: inference will be slow",
                )
            )
        for gpu in snapshot.gpus:
            if gpu.temperature_celsius >= s.gpu_warning_celsius:
                found.append(
                    Alert(
                        CRITICAL if gpu.temperature_celsius >= s.gpu_critical_celsius else WARNING,
                        "GPU_HOT",
                        f"GPU {gpu.index} ({gpu.name}) is at {gpu.temperature_celsius:.0f} °C: "
                        "check cooling; the GPU will throttle",
                    )
                )
        for sensor in snapshot.temperatures:
            if sensor.critical_celsius and sensor.current_celsius >= sensor.critical_celsius - 5:
                found.append(
                    Alert(
                        CRITICAL,
                        "SENSOR_HOT",
                        f"{sensor.chip} {sensor.label} is at {sensor.current_celsius:.0f} °C, "
                        f"near its critical {sensor.critical_celsius:.0f} °C",
                    )
                )
        found.sort(key=lambda w: -w.severity)
        return found


def _mount_of(directory: Path, partitions: dict) -> str | None:
    """The mountpoint holding directory (or its nearest existing parent)."""
    path = directory.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    best = None
    for mountpoint in partitions:
        mount = Path(mountpoint)
        if (path == mount or mount in path.parents) and (
            best is None or len(mountpoint) > len(best)
        ):
            best = mountpoint
    return best


def _temperatures() -> list[Temperature]:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return []
    try:
        chips = read()
    except OSError:
        return []
    return [
        Temperature(chip, s.label or chip, s.current, s.high or 0.0, s.critical or 0.0)
        for chip, sensors in chips.items()
        for s in sensors
    ]


def _network() -> Network:
    counters = psutil.net_io_counters(pernic=True)
    total = Network(0, 0, 0, 0, 0, 0)
    for name, c in counters.items():
        if name.startswith("lo"):
            continue
        total.bytes_sent += c.bytes_sent
        total.bytes_received += c.bytes_recv
        total.packets_sent += c.packets_sent
        total.packets_received += c.packets_recv
        total.errors_in += c.errin
        total.errors_out += c.errout
    return total
