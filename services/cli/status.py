"""ragmesh status: the host and the mesh as the telemetry service sees them."""

import json
import sys
from typing import Annotated

import typer
from google.protobuf import duration_pb2
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ragmesh.telemetry.v1 import telemetry_pb2
from services.cli.output import JsonFlag, add_row, console, print_json, size, table, to_dict, when

SEVERITY_STYLES = {"CRITICAL": "bold red", "WARNING": "yellow", "INFO": "cyan"}
STATE_STYLES = {
    "SERVING": "green",
    "REACHABLE": "green",
    "NOT_SERVING": "yellow",
    "UNREACHABLE": "red",
}


def _bar(percent: float) -> Table:
    """A usage bar with its percentage."""
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=100, completed=percent, width=20), f"{percent:4.0f}%")
    return grid


def _uptime(duration: duration_pb2.Duration) -> str:
    minutes = duration.seconds // 60
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    return f"{days} d {hours} h" if days else f"{hours} h {minutes} min"


def render(system: telemetry_pb2.SystemStatus, mesh: telemetry_pb2.GetMeshStatusResponse):
    """The whole view: host, CPU, memory, disks, GPUs, warnings, every node, the mesh and
    its figures."""
    cpu, memory, swap = system.cpu, system.memory, system.swap
    parts = [
        Text.assemble(
            (system.hostname, "bold"),
            f" on node {system.node_name}" if system.node_name != system.hostname else "",
            (f"  up {_uptime(system.uptime)} · {when(system.time)}", "dim"),
        )
    ]
    usage = table("", "USAGE", "")
    cores = f"{cpu.logical_cores} cores ({cpu.physical_cores} physical)"
    if cpu.current_frequency_mhz:
        cores += f" · {cpu.current_frequency_mhz / 1000:.1f} GHz"
    add_row(
        usage,
        "CPU",
        _bar(cpu.usage_percent),
        f"{cores} · load {cpu.load_average_1m:.2f} {cpu.load_average_5m:.2f} "
        f"{cpu.load_average_15m:.2f}",
    )
    add_row(
        usage,
        "memory",
        _bar(memory.used_percent),
        f"{size(memory.used_bytes)} of {size(memory.total_bytes)}, "
        f"{size(memory.available_bytes)} available",
    )
    if swap.total_bytes:
        add_row(
            usage,
            "swap",
            _bar(swap.used_percent),
            f"{size(swap.used_bytes)} of {size(swap.total_bytes)}",
        )
    parts.append(usage)

    disks = table("DISK", "USAGE", "FREE", "DATA")
    for disk in system.disks:
        add_row(
            disks,
            f"{disk.mountpoint} ({disk.device}, {disk.filesystem})",
            _bar(disk.used_percent),
            f"{size(disk.free_bytes)} of {size(disk.total_bytes)}",
            ", ".join(disk.data_directories),
        )
    parts.append(disks)

    if system.gpus:
        gpus = table("GPU", "USAGE", "MEMORY", "TEMP", "POWER")
        for gpu in system.gpus:
            add_row(
                gpus,
                f"{gpu.index} {gpu.name}",
                _bar(gpu.utilization_percent),
                f"{size(gpu.memory_used_bytes)} of {size(gpu.memory_total_bytes)}",
                f"{gpu.temperature_celsius:.0f} °C",
                f"{gpu.power_draw_watts:.0f} of {gpu.power_limit_watts:.0f} W"
                if gpu.power_limit_watts
                else "",
            )
        parts.append(gpus)
    else:
        parts.append(Text(f"GPUs: none ({system.gpu_unavailable_reason})", style="dim"))

    for warning in system.warnings:
        severity = telemetry_pb2.Warning.Severity.Name(warning.severity).removeprefix("SEVERITY_")
        parts.append(
            Text.assemble(
                (f"{severity} {warning.code}", SEVERITY_STYLES.get(severity, "")),
                f": {warning.message}",
            )
        )

    parts.append(_nodes(mesh))
    services = table("SERVICE", "TARGET", "STATE", "LATENCY", "")
    for service in mesh.services:
        state = telemetry_pb2.ServiceHealth.State.Name(service.state).removeprefix("STATE_")
        latency = service.latency.ToMicroseconds() / 1000
        add_row(
            services,
            service.name,
            service.target,
            Text(state, style=STATE_STYLES.get(state, "")),
            f"{latency:.1f} ms" if service.HasField("latency") else "",
            service.error,
        )
    parts.append(services)
    parts.extend(_figures(mesh))
    return Group(*parts)


def _nodes(mesh: telemetry_pb2.GetMeshStatusResponse) -> Table:
    """One row per node: its CPU, memory, fullest disk, GPUs and warnings, or why its
    telemetry service did not answer."""
    nodes = table("NODE", "STATE", "CPU", "MEMORY", "FULLEST DISK", "GPUS", "WARNINGS")
    for node in mesh.nodes:
        state = telemetry_pb2.NodeStatus.State.Name(node.state).removeprefix("STATE_")
        cells = [node.name, Text(state, style=STATE_STYLES.get(state, ""))]
        if not node.HasField("system"):
            add_row(nodes, *cells, "", "", "", "", Text(node.error, style="red"))
            continue
        system = node.system
        fullest = max(system.disks, key=lambda disk: disk.used_percent, default=None)
        gpus = "none"
        if system.gpus:
            busy = sum(gpu.utilization_percent for gpu in system.gpus) / len(system.gpus)
            models = {gpu.name for gpu in system.gpus}
            kind = models.pop() if len(models) == 1 else "GPUs"
            gpus = f"{len(system.gpus)} x {kind}, {busy:.0f}% busy"
        worst = max((warning.severity for warning in system.warnings), default=0)
        severity = telemetry_pb2.Warning.Severity.Name(worst).removeprefix("SEVERITY_")
        add_row(
            nodes,
            *cells,
            f"{system.cpu.usage_percent:.0f}% of {system.cpu.logical_cores} cores",
            f"{system.memory.used_percent:.0f}% of {size(system.memory.total_bytes)}",
            f"{fullest.used_percent:.0f}% {fullest.mountpoint}" if fullest else "",
            gpus,
            Text(
                ", ".join(warning.code for warning in system.warnings),
                style=SEVERITY_STYLES.get(severity, ""),
            ),
        )
    return nodes


def _ms(value: float) -> str:
    if value >= 10:
        return f"{value:.0f} ms"
    return f"{value:.1f} ms" if value >= 1 else f"{value:.2f} ms"


def _figures(mesh: telemetry_pb2.GetMeshStatusResponse) -> list[Table]:
    """The calls per RPC and the model queues each service reported, when any did."""
    rpcs = table("SERVICE/RPC", "CALLS", "ERRORS", "P50", "P95", "MAX")
    queues = table("SERVICE/QUEUE", "WAITING", "BATCHES", "MEAN BATCH", "MAX BATCH")
    for service in mesh.services:
        for rpc in service.metrics.rpcs:
            errors = ", ".join(
                f"{count} {code}" for code, count in sorted(rpc.errors_by_code.items())
            )
            add_row(
                rpcs,
                f"{service.name}/{rpc.method.rsplit('/', 1)[-1]}",
                str(rpc.calls),
                Text(errors, style="red") if errors else "0",
                _ms(rpc.p50_ms),
                _ms(rpc.p95_ms),
                _ms(rpc.max_ms),
            )
        for queue in service.metrics.queues:
            add_row(
                queues,
                f"{service.name}/{queue.name}",
                str(queue.depth),
                str(queue.batches),
                f"{queue.mean_batch_size:.1f}",
                str(queue.max_batch_size),
            )
    return [figures for figures in (rpcs, queues) if figures.row_count]


def status(
    ctx: typer.Context,
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep the view up to date until Ctrl-C.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.5, help="Seconds between updates with --watch.")
    ] = 2.0,
    json_: JsonFlag = False,
) -> None:
    """The host (CPU, memory, disks, GPUs, warnings), every node of the mesh, the health
    of every service, its calls per RPC (errors, latencies) and its model queue."""
    mesh = ctx.obj
    stub = mesh.stub("telemetry")
    as_json = json_ or mesh.json
    if not watch:
        system = stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest()).status
        services = stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())
        if as_json:
            print_json({"system": to_dict(system), "mesh": to_dict(services)})
        else:
            console.print(render(system, services))
        return
    period = duration_pb2.Duration()
    period.FromNanoseconds(int(interval * 1e9))
    updates = stub.WatchSystemStatus(telemetry_pb2.WatchSystemStatusRequest(interval=period))
    try:
        if as_json:
            # One JSON object a line, for scripts that follow the stream.
            for update in updates:
                services = stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())
                line = {"system": to_dict(update.status), "mesh": to_dict(services)}
                sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
                sys.stdout.flush()
        else:
            with Live(console=console, auto_refresh=False) as live:
                for update in updates:
                    services = stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())
                    live.update(render(update.status, services), refresh=True)
    except KeyboardInterrupt:
        updates.cancel()
