"""OpenTelemetry metrics: one meter provider per server, read by people and exported.

Every server counts its calls in `rpc.server.duration` (a histogram in milliseconds, by
method and status code: its count is the request count, the codes other than OK are the
errors), and services with a model queue report it through `watch_queue`. The figures
are read two ways:

- summed up for people by the server's MetricsService (ragmesh.telemetry.v1), which the
  telemetry service reads from every service it probes, so `ragmesh status` shows them
  with nothing to configure;
- pushed over OTLP/gRPC to the service's `OTLP_ENDPOINT`, when it is set, every
  `OTEL_METRIC_EXPORT_INTERVAL` milliseconds (60 s by default) and once more at shutdown.

Each server has its own provider, so services started in one process keep their own
figures and their own `service.name`.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from ragmesh.telemetry.v1 import metrics_pb2, metrics_pb2_grpc

SERVICE_NAME = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name
RPC_DURATION = "rpc.server.duration"
QUEUE_DEPTH = "ragmesh.queue.depth"
BATCHES = "ragmesh.queue.batches"
BATCHED_ITEMS = "ragmesh.queue.batched_items"
MAX_BATCH_SIZE = "ragmesh.queue.max_batch_size"
# Milliseconds: a health check takes well under 1 ms, a long answer a minute or more.
LATENCY_BOUNDS_MS = (
    *(0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500),
    *(1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000),
)
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class QueueFigures:
    """A model queue as of now: items waiting, and the batches run since start."""

    depth: int
    batches: int
    batched_items: int
    max_batch_size: int


class ServerMetrics:
    def __init__(self, service_name: str, otlp_endpoint: str = "") -> None:
        self.service_name = f"ragmesh-{service_name}"
        self.start_time_ns = time.time_ns()
        self._reader = InMemoryMetricReader()
        readers: list[MetricReader] = [self._reader]
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=otlp_endpoint, insecure=True)
                )
            )
        self._provider = MeterProvider(
            metric_readers=readers,
            resource=Resource.create({"service.name": self.service_name}),
            views=[
                View(
                    instrument_name=RPC_DURATION,
                    aggregation=ExplicitBucketHistogramAggregation(LATENCY_BOUNDS_MS),
                )
            ],
        )
        meter = self._provider.get_meter("ragmesh")
        self._duration = meter.create_histogram(
            RPC_DURATION, unit="ms", description="Time from a call's arrival to its status"
        )
        self._queues: dict[str, Callable[[], QueueFigures]] = {}
        self._lock = threading.Lock()
        for name, make, pick, description in (
            (QUEUE_DEPTH, meter.create_observable_gauge, "depth", "Items waiting now"),
            (BATCHES, meter.create_observable_counter, "batches", "Batches run"),
            (BATCHED_ITEMS, meter.create_observable_counter, "batched_items", "Items batched"),
            (MAX_BATCH_SIZE, meter.create_observable_gauge, "max_batch_size", "Largest batch"),
        ):
            make(name, callbacks=[self._observer(pick)], unit="1", description=description)

    def _observer(self, pick: str):
        def observe(options: CallbackOptions):
            with self._lock:
                queues = list(self._queues.items())
            return [Observation(getattr(read(), pick), {"queue": name}) for name, read in queues]

        return observe

    def record_call(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self._duration.record(
            seconds * 1000,
            {
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": name,
                "rpc.grpc.status_code": code.value[0],
            },
        )

    def watch_queue(self, name: str, read: Callable[[], QueueFigures]) -> None:
        """Reports the queue called name from now on; read() is called at each reading."""
        with self._lock:
            self._queues[name] = read

    def snapshot(self) -> metrics_pb2.ServiceMetrics:
        """The figures as of now, summed up per RPC and per queue."""
        message = metrics_pb2.ServiceMetrics(service_name=self.service_name)
        message.start_time.FromNanoseconds(self.start_time_ns)
        message.time.FromNanoseconds(time.time_ns())
        rpcs: dict[str, list[HistogramDataPoint]] = {}
        queues: dict[str, dict[str, int]] = {}
        data = self._reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attributes = point.attributes or {}
                        if metric.name == RPC_DURATION:
                            method = f"/{attributes['rpc.service']}/{attributes['rpc.method']}"
                            rpcs.setdefault(method, []).append(point)
                        else:
                            queue = queues.setdefault(str(attributes["queue"]), {})
                            queue[metric.name] = int(point.value)
        for method, points in sorted(rpcs.items()):
            message.rpcs.append(_rpc_figures(method, points))
        for name, values in sorted(queues.items()):
            batches, items = values.get(BATCHES, 0), values.get(BATCHED_ITEMS, 0)
            message.queues.append(
                metrics_pb2.QueueMetrics(
                    name=name,
                    depth=values.get(QUEUE_DEPTH, 0),
                    batches=batches,
                    batched_items=items,
                    mean_batch_size=items / batches if batches else 0.0,
                    max_batch_size=values.get(MAX_BATCH_SIZE, 0),
                )
            )
        return message

    def shutdown(self) -> None:
        """Stops the readers; the OTLP one exports what it has not sent yet."""
        self._provider.shutdown()


def _rpc_figures(method: str, points: list[HistogramDataPoint]) -> metrics_pb2.RpcMetrics:
    figures = metrics_pb2.RpcMetrics(method=method)
    buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    total_ms, low, high = 0.0, float("inf"), 0.0
    for point in points:
        code = _CODE_NAMES.get(int(point.attributes["rpc.grpc.status_code"]), "UNKNOWN")
        figures.calls += point.count
        if code != "OK":
            figures.errors += point.count
            figures.errors_by_code[code] += point.count
        total_ms += point.sum
        low, high = min(low, point.min), max(high, point.max)
        for n, count in enumerate(point.bucket_counts):
            buckets[n] += count
    if figures.calls:
        figures.mean_ms = total_ms / figures.calls
        figures.p50_ms = _percentile(buckets, 0.5, low, high)
        figures.p95_ms = _percentile(buckets, 0.95, low, high)
        figures.max_ms = high
    return figures


def _percentile(buckets: list[int], q: float, low: float, high: float) -> float:
    """The q-th latency, interpolated within the bucket that holds it, inside [low, high]."""
    rank = q * sum(buckets)
    seen = 0
    for n, count in enumerate(buckets):
        if count and seen + count >= rank:
            floor = max(LATENCY_BOUNDS_MS[n - 1] if n else low, low)
            ceiling = min(LATENCY_BOUNDS_MS[n] if n < len(LATENCY_BOUNDS_MS) else high, high)
            return floor + (ceiling - floor) * (rank - seen) / count
        seen += count
    return high


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def GetServiceMetrics(self, request, context):
        return metrics_pb2.GetServiceMetricsResponse(metrics=self._metrics.snapshot())
