"""The telemetry service over real gRPC: snapshot values, watch stream, mesh view, the
nodes of the mesh as its peers report them."""

import asyncio
import socket
from types import SimpleNamespace

import grpc
import psutil
import pytest
from google.protobuf import duration_pb2
from pydantic import ValidationError

from ragmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.telemetry import app as telemetry_app
from services.telemetry.settings import TelemetrySettings

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def telemetry(tmp_path):
    apps = []

    async def start(nvml=None, **overrides):
        settings = TelemetrySettings(
            **{"port": 0, "data_directories": [tmp_path], "mesh_targets": {}, **overrides}
        )
        app = await telemetry_app.start(settings, nvml=nvml)
        apps.append(app)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        return app, telemetry_pb2_grpc.TelemetryServiceStub(channel)

    yield start
    for app in apps:
        await app.server.stop(0)
        await app.close()


async def test_system_status_values_are_sane(telemetry, tmp_path):
    _, stub = await telemetry()
    status = (await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())).status
    assert status.hostname
    assert status.cpu.logical_cores == psutil.cpu_count()
    assert len(status.cpu.per_core_usage_percent) == status.cpu.logical_cores
    assert 0 <= status.cpu.usage_percent <= 100
    assert status.memory.total_bytes == psutil.virtual_memory().total
    assert 0 < status.memory.available_bytes <= status.memory.total_bytes
    assert status.uptime.seconds > 0
    assert status.boot_time.seconds < status.time.seconds
    assert status.process_rss_bytes > 10 * 2**20
    data_disks = [d for d in status.disks if str(tmp_path.resolve()) in d.data_directories]
    assert len(data_disks) == 1
    assert data_disks[0].total_bytes >= data_disks[0].used_bytes > 0
    # No GPU on this machine: an empty list and a reason, not an error.
    assert list(status.gpus) == []
    assert status.gpu_unavailable_reason


async def test_warnings_name_a_full_disk_and_low_memory(telemetry):
    _, stub = await telemetry(disk_warning_percent=0.0, memory_warning_percent=0.0)
    status = (await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())).status
    codes = {w.code for w in status.warnings}
    assert {"DISK_NEARLY_FULL", "MEMORY_LOW"} <= codes
    assert all(w.message for w in status.warnings)
    severities = [w.severity for w in status.warnings]
    assert severities == sorted(severities, reverse=True)


async def test_watch_yields_updates_and_ends_on_cancel(telemetry):
    _, stub = await telemetry(watch_min_interval_seconds=0.1)
    call = stub.WatchSystemStatus(
        telemetry_pb2.WatchSystemStatusRequest(interval=duration_pb2.Duration(nanos=100_000_000))
    )
    times = []
    for _ in range(3):
        times.append((await call.read()).status.time.ToNanoseconds())
    assert times == sorted(times) and len(set(times)) == 3
    call.cancel()
    assert call.cancelled()
    # The service keeps answering after a cancelled stream.
    assert (await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())).status.hostname


async def test_watch_rejects_negative_interval(telemetry):
    _, stub = await telemetry()
    call = stub.WatchSystemStatus(
        telemetry_pb2.WatchSystemStatusRequest(interval=duration_pb2.Duration(seconds=-1))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interval" in caught.value.details()


async def test_mesh_status_reports_serving_and_unreachable(telemetry):
    first, _ = await telemetry()
    _, stub = await telemetry(
        mesh_targets={"alive": f"127.0.0.1:{first.port}", "gone": "127.0.0.1:1"},
        mesh_probe_timeout_seconds=5,
    )
    services = (await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())).services
    by_name = {s.name: s for s in services}
    assert by_name["alive"].state == telemetry_pb2.ServiceHealth.STATE_SERVING
    assert by_name["alive"].latency.ToNanoseconds() > 0
    assert by_name["gone"].state == telemetry_pb2.ServiceHealth.STATE_UNREACHABLE
    assert by_name["gone"].error


class FakeNvml:
    """A fake pynvml: two GPUs, one hot, one without a fan reading."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_GRAPHICS = 0
    NVML_CLOCK_MEM = 2

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.shutdowns = 0

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return f"NVIDIA H100 #{handle}"

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle:04d}"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 * 2**30, used=10 * 2**30, free=70 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=75, memory=40)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 90 if handle == 1 else 50

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetFanSpeed(self, handle):
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return 30

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980 if clock == self.NVML_CLOCK_GRAPHICS else 2619

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=psutil.Process().pid, usedGpuMemory=2**30)]


async def test_gpus_through_fake_nvml(telemetry):
    fake = FakeNvml()
    _, stub = await telemetry(nvml=fake)
    status = (await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())).status
    assert status.gpu_unavailable_reason == ""
    assert [g.uuid for g in status.gpus] == ["GPU-0000", "GPU-0001"]
    first, hot = status.gpus
    assert first.driver_version == "550.54.15"
    assert first.memory_total_bytes == 80 * 2**30
    assert first.power_draw_watts == 250.0 and first.power_limit_watts == 700.0
    assert first.fan_speed_percent == 30 and first.HasField("fan_speed_percent")
    assert not hot.HasField("fan_speed_percent")
    assert first.processes[0].used_memory_bytes == 2**30
    assert first.processes[0].name == psutil.Process().name()
    gpu_warnings = [w for w in status.warnings if w.code == "GPU_HOT"]
    assert len(gpu_warnings) == 1 and "GPU 1" in gpu_warnings[0].message
    assert fake.shutdowns == 1
    skipped = await stub.GetSystemStatus(
        telemetry_pb2.GetSystemStatusRequest(skip_gpu_processes=True)
    )
    assert list(skipped.status.gpus[0].processes) == []


async def test_fake_nvml_init_failure_is_a_reason_not_an_error(telemetry):
    fake = FakeNvml()

    def broken_init():
        raise FakeNvml.NVMLError("Driver Not Loaded")

    fake.nvmlInit = broken_init
    _, stub = await telemetry(nvml=fake)
    status = (await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())).status
    assert list(status.gpus) == []
    assert "Driver Not Loaded" in status.gpu_unavailable_reason


async def test_snapshots_do_not_block_the_event_loop(telemetry):
    _, stub = await telemetry(cpu_sample_seconds=0.5)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())
    task.cancel()
    # A blocked loop would tick once; a free one ticks throughout the 0.5 s sample.
    assert ticks > 10


REACHABLE = telemetry_pb2.NodeStatus.STATE_REACHABLE
UNREACHABLE = telemetry_pb2.NodeStatus.STATE_UNREACHABLE


async def test_mesh_status_lists_every_peer_node_and_marks_dead_ones_unreachable_fake_gpus(
    telemetry,
):
    """Three real telemetry servers, one with fake GPUs (no NVIDIA driver here); the one
    asked names the other two, one of them twice (by a DNS name and by its address), a
    port nothing listens on and a name that does not resolve."""
    b, _ = await telemetry(node_name="node-b")
    c, _ = await telemetry(node_name="node-c", nvml=FakeNvml(), disk_warning_percent=0.0)
    _, stub = await telemetry(
        node_name="node-a",
        peers=[
            f"127.0.0.1:{c.port}",
            f"localhost:{b.port}",
            f"127.0.0.1:{b.port}",
            "127.0.0.1:1",
            "no-such-node.invalid:50055",
        ],
        mesh_targets={"peer": f"127.0.0.1:{b.port}"},
        mesh_probe_timeout_seconds=5,
    )
    response = await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())
    nodes = list(response.nodes)
    assert [n.name for n in nodes] == [
        "node-a",
        "node-b",
        "node-c",
        "127.0.0.1:1",
        "no-such-node.invalid:50055",
    ]
    assert [n.state for n in nodes] == [REACHABLE] * 3 + [UNREACHABLE] * 2
    own, node_b, node_c, dead, unknown = nodes
    # The node asked reports itself, read locally.
    assert own.target == "" and own.system.node_name == "node-a"
    assert not own.HasField("latency") and own.error == ""
    for node in (own, node_b, node_c):
        assert node.system.cpu.logical_cores == psutil.cpu_count()
        assert node.system.memory.total_bytes == psutil.virtual_memory().total
        assert node.system.disks
    assert node_b.target == f"127.0.0.1:{b.port}"
    assert node_b.latency.ToNanoseconds() > 0
    assert list(node_b.system.gpus) == [] and node_b.system.gpu_unavailable_reason
    assert node_c.target == f"127.0.0.1:{c.port}"
    assert [g.uuid for g in node_c.system.gpus] == ["GPU-0000", "GPU-0001"]
    assert {"DISK_NEARLY_FULL", "GPU_HOT"} <= {w.code for w in node_c.system.warnings}
    assert not any(w.code == "GPU_HOT" for w in node_b.system.warnings)
    for node in (dead, unknown):
        assert not node.HasField("system") and not node.HasField("latency")
    assert dead.target == "127.0.0.1:1" and dead.error.startswith("UNAVAILABLE")
    assert "no-such-node.invalid does not resolve" in unknown.error
    # The services are still probed alongside.
    (service,) = response.services
    assert service.state == telemetry_pb2.ServiceHealth.STATE_SERVING


async def test_mesh_status_without_peers_lists_this_node(telemetry):
    _, stub = await telemetry()
    (node,) = (await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())).nodes
    assert node.state == REACHABLE and node.name == socket.gethostname()
    assert node.system.hostname == socket.gethostname()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_a_service_that_comes_back_is_serving_on_the_next_call(telemetry):
    port = free_port()
    _, stub = await telemetry(
        mesh_targets={"late": f"127.0.0.1:{port}"}, mesh_probe_timeout_seconds=5
    )
    for _ in range(3):  # long enough down for gRPC's reconnect backoff to grow
        (before,) = (await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())).services
        assert before.state == telemetry_pb2.ServiceHealth.STATE_UNREACHABLE
    await telemetry(port=port)
    (after,) = (await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())).services
    assert after.state == telemetry_pb2.ServiceHealth.STATE_SERVING


async def test_a_peer_that_comes_up_is_listed_on_the_next_call(telemetry):
    port = free_port()
    _, stub = await telemetry(
        node_name="node-a", peers=[f"127.0.0.1:{port}"], mesh_probe_timeout_seconds=5
    )
    before = (await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())).nodes
    assert [(n.name, n.state) for n in before] == [
        ("node-a", REACHABLE),
        (f"127.0.0.1:{port}", UNREACHABLE),
    ]
    await telemetry(node_name="node-b", port=port)
    after = (await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())).nodes
    assert [(n.name, n.state) for n in after] == [("node-a", REACHABLE), ("node-b", REACHABLE)]


async def test_peers_get_the_services_own_key_else_the_callers(telemetry):
    keys = {"user-key": "alice:acme", "peer-key": "telemetry:acme"}
    b, _ = await telemetry(node_name="node-b", api_keys=keys)
    user = (("authorization", "Bearer user-key"),)

    async def node_b_as_seen(**settings) -> telemetry_pb2.NodeStatus:
        _, stub = await telemetry(
            node_name="node-a",
            api_keys=keys,
            peers=[f"127.0.0.1:{b.port}"],
            mesh_probe_timeout_seconds=5,
            **settings,
        )
        response = await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest(), metadata=user)
        return response.nodes[1]

    assert (await node_b_as_seen(peer_api_key="peer-key")).state == REACHABLE
    refused = await node_b_as_seen(peer_api_key="not-a-key")
    assert refused.state == UNREACHABLE and refused.name == f"127.0.0.1:{b.port}"
    assert refused.error.startswith("UNAUTHENTICATED")
    # Without a key of its own, the caller's is forwarded.
    assert (await node_b_as_seen()).system.node_name == "node-b"


async def test_node_name_comes_from_node_name_else_the_hostname(monkeypatch):
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert TelemetrySettings().node_name == socket.gethostname()
    monkeypatch.setenv("NODE_NAME", "gpu-node-7")
    assert TelemetrySettings().node_name == "gpu-node-7"
    monkeypatch.setenv("RAGMESH_TELEMETRY_PEERS", '["telemetry-peers:50055", "[::1]:50055"]')
    assert TelemetrySettings().peers == ["telemetry-peers:50055", "[::1]:50055"]


@pytest.mark.parametrize("peer", ["telemetry", "telemetry:", ":50055", "telemetry:http", "a:0"])
async def test_a_peer_without_host_and_port_stops_the_service_at_start(peer):
    with pytest.raises(ValidationError, match="is not host:port"):
        TelemetrySettings(peers=[peer])
