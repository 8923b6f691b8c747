"""Production mode's trace: embed, ingest, llm (SmolLM2) and sessions run as separate
processes with OTLP_ENDPOINT pointing at a real OTLP/gRPC receiver started here. One
SendMessage is one trace, sessions → ingest → embed and sessions → llm, linked parent to
child across the processes, and the SendMessage span carries the session, the retrieval
sizes, the model and the token counts. The same receiver gets each service's metrics."""

import asyncio
import json
import os
import signal
import socket
import sys

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2
from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.clients import wait_until_serving

KEYS = json.dumps({"alice-key": "alice:acme"})
USER = (("authorization", "Bearer alice-key"),)
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT


def _service(resource) -> str:
    return next(a.value.string_value for a in resource.attributes if a.key == "service.name")


class Collector(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """The receiving end of OTLP/gRPC, as a collector runs it: keeps every span and every
    metric data point, with the service that sent it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self.points: list[tuple[str, str, object]] = []

    async def Export(self, request, context):
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource_spans in request.resource_spans:
                service = _service(resource_spans.resource)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource_metrics in request.resource_metrics:
            service = _service(resource_metrics.resource)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    data = getattr(metric, metric.WhichOneof("data"))
                    self.points.extend((service, metric.name, p) for p in data.data_points)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
async def collector():
    server = grpc.aio.server()
    collected = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collected, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collected, f"http://127.0.0.1:{port}"
    await server.stop(0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Mesh:
    """Service processes, each logging to a file under the test's folder."""

    def __init__(self, folder, otlp: str) -> None:
        self.folder = folder
        self.otlp = otlp
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.targets: dict[str, str] = {}

    async def start(self, name: str, patience: float, **settings: str) -> str:
        port = free_port()
        prefix = f"RAGMESH_{name.upper()}_"
        env = {
            **os.environ,
            **{prefix + key.upper(): value for key, value in settings.items()},
            f"{prefix}PORT": str(port),
            f"{prefix}DATA_DIR": str(self.folder / name),
            f"{prefix}OTLP_ENDPOINT": self.otlp,
        }
        with (self.folder / f"{name}.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"services.{name}", env=env, stdout=log, stderr=log
            )
        self.processes[name] = process
        target = self.targets[name] = f"127.0.0.1:{port}"
        await wait_until_serving(target, patience, lambda: process.returncode is None)
        return target

    async def stop(self) -> None:
        """SIGTERM to each, as an orchestrator stops them: each drains and flushes."""
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            await asyncio.wait_for(process.wait(), 60)


def attributes(span) -> dict:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            values[attribute.key] = [v.string_value for v in value.array_value.values]
        else:
            values[attribute.key] = getattr(value, kind)
    return values


async def test_one_send_message_is_one_trace_across_the_four_services(collector, tmp_path):
    collected, otlp = collector
    mesh = Mesh(tmp_path, otlp)
    try:
        embed = await mesh.start("embed", 300)
        ingest = await mesh.start(
            "ingest", 60, embed_target=embed, api_keys=KEYS, job_poll_seconds="0.2"
        )
        llm = await mesh.start("llm", 300, api_keys=KEYS, models_dir=str(tmp_path / "models"))
        sessions = await mesh.start(
            "sessions",
            60,
            api_keys=KEYS,
            ingest_target=ingest,
            embed_target=embed,
            llm_target=llm,
        )
        async with grpc.aio.insecure_channel(ingest) as channel:
            documents = ingest_pb2_grpc.IngestServiceStub(channel)
            text = b"The keeper of Skerry Light winds the clockwork of the lens at dusk."

            def upload():
                yield ingest_pb2.UploadDocumentRequest(
                    metadata=ingest_pb2.DocumentMetadata(filename="light.txt")
                )
                yield ingest_pb2.UploadDocumentRequest(data=text)

            document = (await documents.UploadDocument(upload(), metadata=USER)).document
            watch = documents.WatchDocument(
                ingest_pb2.WatchDocumentRequest(document_id=document.id),
                metadata=USER,
                timeout=120,
            )
            states = [reply.document async for reply in watch]
            assert states[-1].status == ingest_pb2.DOCUMENT_STATUS_READY, states[-1].error
        async with grpc.aio.insecure_channel(sessions) as channel:
            stub = sessions_pb2_grpc.SessionsServiceStub(channel)
            session = (
                await stub.CreateSession(
                    sessions_pb2.CreateSessionRequest(document_ids=[document.id]),
                    metadata=USER,
                )
            ).session
            events = [
                event
                async for event in stub.SendMessage(
                    sessions_pb2.SendMessageRequest(
                        session_id=session.id,
                        content="When is the clockwork wound?",
                        document_top_k=3,
                        memory_top_k=2,
                        overrides=llm_pb2.GenerationOverrides(max_new_tokens=12),
                    ),
                    metadata=USER,
                )
            ]
        answer = events[-1].assistant_message
        assert answer.content and answer.completion_tokens > 0
    finally:
        await mesh.stop()

    (root,) = [
        span
        for service, span in collected.spans
        if service == "ragmesh-sessions" and span.name.endswith("SessionsService/SendMessage")
    ]
    assert root.kind == SERVER and not root.parent_span_id  # the caller is not traced
    trace = [(service, s) for service, s in collected.spans if s.trace_id == root.trace_id]
    assert {service for service, _ in trace} == {
        "ragmesh-sessions",
        "ragmesh-ingest",
        "ragmesh-embed",
        "ragmesh-llm",
    }

    def one(service: str, kind: int, method: str, parent) -> trace_pb2.Span:
        found = [
            s
            for name, s in trace
            if name == service
            and s.kind == kind
            and s.name.endswith(method)
            and s.parent_span_id == parent.span_id
        ]
        assert len(found) == 1, (service, method, [(n, s.name) for n, s in trace])
        return found[0]

    # sessions → ingest (Search) → embed (the query's vector)
    asks_ingest = one("ragmesh-sessions", CLIENT, "IngestService/Search", root)
    searches = one("ragmesh-ingest", SERVER, "IngestService/Search", asks_ingest)
    asks_embed = one("ragmesh-ingest", CLIENT, "EmbedService/Embed", searches)
    one("ragmesh-embed", SERVER, "EmbedService/Embed", asks_embed)
    # sessions → llm (the answer)
    asks_llm = one("ragmesh-sessions", CLIENT, "LlmService/Chat", root)
    one("ragmesh-llm", SERVER, "LlmService/Chat", asks_llm)

    described = attributes(root)
    assert described["ragmesh.session.id"] == session.id
    assert described["ragmesh.retrieval.chunks_requested"] == 3
    assert described["ragmesh.retrieval.chunks_returned"] == len(answer.citations) == 1
    assert described["ragmesh.retrieval.memories_requested"] == 2
    # A first message: nothing to remember yet.
    assert described["ragmesh.retrieval.memories_recalled"] == 0
    # The session names no model: the llm's loaded one (SmolLM2) answered.
    assert "gen_ai.request.model" not in described
    assert described["gen_ai.response.model"] == answer.model
    assert "SmolLM2" in answer.model
    assert described["gen_ai.usage.input_tokens"] == answer.prompt_tokens > 0
    assert described["gen_ai.usage.output_tokens"] == answer.completion_tokens

    # Each service's metrics reached the receiver at shutdown: the calls above, counted.
    def calls(service: str, method: str) -> int:
        return sum(
            point.count
            for name, metric, point in collected.points
            if name == service
            and metric == "rpc.server.duration"
            and {a.key: a.value.string_value for a in point.attributes}["rpc.method"] == method
        )

    assert calls("ragmesh-sessions", "SendMessage") == 1
    assert calls("ragmesh-llm", "Chat") == 1
    assert calls("ragmesh-ingest", "Search") == 1
    assert calls("ragmesh-embed", "Embed") >= 2  # the chunk, the query, the memory probe

    def queue(service: str, queue: str) -> dict[str, int]:
        return {
            metric.removeprefix("ragmesh.queue."): point.as_int
            for name, metric, point in collected.points
            if name == service
            and metric.startswith("ragmesh.queue.")
            and {a.key: a.value.string_value for a in point.attributes} == {"queue": queue}
        }

    # One decode step of one sequence per token after the first, which comes with the
    # prompt; an answer that ends on EOS generated the EOS token too, uncounted.
    generated = answer.completion_tokens + (answer.finish_reason == sessions_pb2.FINISH_REASON_EOS)
    llm_queue = queue("ragmesh-llm", "decode")
    assert llm_queue["depth"] == 0
    assert llm_queue["batches"] == llm_queue["batched_items"] == generated - 1
    assert llm_queue["max_batch_size"] == 1
    embed_queue = queue("ragmesh-embed", "batcher")
    assert embed_queue["depth"] == 0 and 2 <= embed_queue["batches"]
    assert embed_queue["batches"] <= embed_queue["batched_items"]
