"""Telemetry service settings (env prefix RAGMESH_TELEMETRY_)."""

import socket
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
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
    # The other nodes' telemetry services, host:port each, asked for their snapshots by
    # GetMeshStatus. A name is resolved again on every call and each of its addresses is
    # a peer, so a headless Service over the DaemonSet gives every node.
    peers: list[str] = Field(default_factory=list)
    # Sent to the peers (one of their API_KEYS); empty: the caller's credentials are.
    peer_api_key: str = ""
    # The name this node goes by in the mesh view: the NODE_NAME environment variable
    # (unprefixed: in Kubernetes the downward API's spec.nodeName), else the hostname.
    node_name: str = Field(
        default_factory=socket.gethostname, validation_alias=AliasChoices("NODE_NAME", "node_name")
    )
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

    @field_validator("peers")
    @classmethod
    def _peers_are_host_and_port(cls, value: list[str]) -> list[str]:
        for peer in value:
            host, _, port = peer.rpartition(":")
            if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"peer {peer!r} is not host:port (for example telemetry:50055)")
        return value
