"""Assembles the telemetry service: settings in, running server out."""

from dataclasses import dataclass

from ragmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.server import RunningServer, ServiceSpec, create_server
from services.telemetry.gpu import load_nvml
from services.telemetry.mesh import MeshProber
from services.telemetry.peers import Peers
from services.telemetry.servicer import TelemetryServicer
from services.telemetry.settings import TelemetrySettings
from services.telemetry.system import SystemReader

SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name


@dataclass
class TelemetryApp:
    server: RunningServer
    prober: MeshProber
    peers: Peers

    @property
    def port(self) -> int:
        return self.server.port

    async def close(self) -> None:
        await self.prober.close()
        await self.peers.close()


async def start(settings: TelemetrySettings, nvml=None) -> TelemetryApp:
    """Starts the service. nvml replaces the real pynvml module (tests pass a fake)."""
    if nvml is None:
        nvml, _ = load_nvml()
    reader = SystemReader(settings, nvml)
    prober = MeshProber(settings.mesh_targets, settings.mesh_probe_timeout_seconds)
    peers = Peers(settings.peers, settings.mesh_probe_timeout_seconds, settings.peer_api_key)
    servicer = TelemetryServicer(settings, reader, prober, peers)
    server = await create_server(
        settings,
        [
            ServiceSpec(
                SERVICE_NAME, servicer, telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server
            )
        ],
    )
    return TelemetryApp(server, prober, peers)
