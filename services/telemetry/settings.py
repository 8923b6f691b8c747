"""Telemetry service settings (env prefix RAGMESH_TELEMETRY_)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

DEFAULT_MESH = {
    "ingest": "localhost:50051",
    "embed": "localhost:50052",
    "llm": "localhost:50053",
    "sessions": "localhost:50054",
    "telemetry": "localhost:50055",
}


class TelemetrySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="RAGMESH_TELEMETRY_", extra="ignore", validate_default=True
    )

    port: int = Field(default=50055, ge=0, le=65535)
    # Folders whose disks are always reported (the other services' data folders).
    data_directories: list[Path] = Field(default_factory=lambda: [Path("var")])
    # Service name -> host:port probed by GetMeshStatus.
    mesh_targets: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_MESH))
    mesh_probe_timeout_seconds: float = Field(default=2.0, gt=0)
    cpu_sample_seconds: float = Field(default=0.1, ge=0)
    watch_min_interval_seconds: float = Field(default=0.5, gt=0)
    watch_default_interval_seconds: float = Field(default=5.0, gt=0)
    # Warning thresholds, percent / degrees Celsius.
    disk_warning_percent: float = 90.0
    disk_critical_percent: float = 97.0
    memory_warning_percent: float = 90.0
    memory_critical_percent: float = 95.0
    gpu_warning_celsius: float = 85.0
    gpu_critical_celsius: float = 95.0
