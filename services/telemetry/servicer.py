"""gRPC servicer for ragmesh.telemetry.v1.TelemetryService: validation and conversion."""

import asyncio
import dataclasses
from datetime import datetime, timedelta

from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from ragmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.errors import InvalidArgument
from services.telemetry.mesh import MeshProber
from services.telemetry.peers import PeerAnswer, Peers
from services.telemetry.settings import TelemetrySettings
from services.telemetry.system import SystemReader

# The range google.protobuf.Duration allows (about 10,000 years).
_MAX_DURATION_SECONDS = 315_576_000_000


def to_pb(value, message_class: type[Message]) -> Message:
    """Converts a dataclass whose fields carry the proto's names into message_class."""
    message = message_class()
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if item is None:
            continue
        field_descriptor = message_class.DESCRIPTOR.fields_by_name[f.name]
        nested = field_descriptor.message_type
        if nested is None:
            if isinstance(item, list):
                getattr(message, f.name).extend(item)
            else:
                setattr(message, f.name, item)
        elif isinstance(item, datetime):
            getattr(message, f.name).FromDatetime(item)
        elif isinstance(item, timedelta):
            getattr(message, f.name).FromTimedelta(item)
        elif isinstance(item, list):
            nested_class = GetMessageClass(nested)
            getattr(message, f.name).extend(to_pb(i, nested_class) for i in item)
        else:
            getattr(message, f.name).CopyFrom(to_pb(item, GetMessageClass(nested)))
    return message


class TelemetryServicer(telemetry_pb2_grpc.TelemetryServiceServicer):
    def __init__(
        self, settings: TelemetrySettings, reader: SystemReader, prober: MeshProber, peers: Peers
    ):
        self._settings = settings
        self._reader = reader
        self._prober = prober
        self._peers = peers

    async def _snapshot(self, skip_gpu_processes: bool) -> telemetry_pb2.SystemStatus:
        # psutil's CPU sampling sleeps and NVML calls block: keep them off the event loop.
        snapshot = await asyncio.to_thread(self._reader.snapshot, not skip_gpu_processes)
        return to_pb(snapshot, telemetry_pb2.SystemStatus)

    async def GetSystemStatus(self, request, context):
        return telemetry_pb2.GetSystemStatusResponse(
            status=await self._snapshot(request.skip_gpu_processes)
        )

    async def WatchSystemStatus(self, request, context):
        interval = self._settings.watch_default_interval_seconds
        if request.HasField("interval"):
            requested = request.interval.seconds + request.interval.nanos / 1e9
            if requested < 0:
                raise InvalidArgument("interval must not be negative", field="interval")
            if requested > _MAX_DURATION_SECONDS:
                raise InvalidArgument(
                    f"interval is at most {_MAX_DURATION_SECONDS} s (google.protobuf.Duration)",
                    field="interval",
                )
            interval = max(requested, self._settings.watch_min_interval_seconds)
        while True:
            yield telemetry_pb2.WatchSystemStatusResponse(
                status=await self._snapshot(request.skip_gpu_processes)
            )
            await asyncio.sleep(interval)

    async def GetMeshStatus(self, request, context):
        probes, own, answers = await asyncio.gather(
            self._prober.probe_all(), self._snapshot(False), self._peers.ask_all()
        )
        services = []
        for probe in probes:
            health = telemetry_pb2.ServiceHealth(
                name=probe.name, target=probe.target, state=probe.state, error=probe.error
            )
            if probe.latency_seconds is not None:
                health.latency.FromTimedelta(timedelta(seconds=probe.latency_seconds))
            if probe.metrics is not None:
                health.metrics.CopyFrom(probe.metrics)
            services.append(health)
        return telemetry_pb2.GetMeshStatusResponse(services=services, nodes=_nodes(own, answers))


def _nodes(
    own: telemetry_pb2.SystemStatus, answers: list[PeerAnswer]
) -> list[telemetry_pb2.NodeStatus]:
    """This node first, then the other nodes by name, then the unreachable peers. A node
    that answered twice (this one through the peers' DNS name, or by IPv4 and IPv6) is
    listed once."""
    reachable = telemetry_pb2.NodeStatus.STATE_REACHABLE
    seen = {own.node_name}
    others = []
    for answer in answers:
        if answer.status is None:
            others.append(
                telemetry_pb2.NodeStatus(
                    name=answer.target,
                    target=answer.target,
                    state=telemetry_pb2.NodeStatus.STATE_UNREACHABLE,
                    error=answer.error,
                )
            )
        elif answer.status.node_name not in seen:
            seen.add(answer.status.node_name)
            node = telemetry_pb2.NodeStatus(
                name=answer.status.node_name,
                target=answer.target,
                state=reachable,
                system=answer.status,
            )
            node.latency.FromTimedelta(timedelta(seconds=answer.latency_seconds))
            others.append(node)
    others.sort(key=lambda node: (node.state != reachable, node.name))
    return [telemetry_pb2.NodeStatus(name=own.node_name, state=reachable, system=own), *others]
