"""OpenTelemetry tracing: one tracer provider per process, exported over OTLP when set.

Every service's entry point configures it from its `OTLP_ENDPOINT` setting before
anything else starts, so the server's spans and the spans of its calls to other
services (see `clients.open_channel`) land in one trace.
"""

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_process_provider: TracerProvider | None = None


def configure_tracing(service_name: str, otlp_endpoint: str) -> TracerProvider | None:
    """The process's provider exporting to otlp_endpoint (made on the first call), or
    None when tracing is off."""
    global _process_provider
    if not otlp_endpoint:
        return _process_provider
    if _process_provider is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(
            resource=Resource.create({"service.name": f"ragmesh-{service_name}"})
        )
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
        trace.set_tracer_provider(provider)
        _process_provider = provider
    return _process_provider


def process_tracer_provider() -> TracerProvider | None:
    """The provider configure_tracing made, or None while tracing is off."""
    return _process_provider
