"""Real services as separate processes, as they are deployed: ingest's background jobs
reach an embed service that enforces keys with ingest's own key, and one search is
traced across both services into a real OTLP/gRPC receiver."""

import asyncio
import json
import os
import signal
import socket
import sys

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common.clients import wait_until_serving

USER = (("authorization", "Bearer alice-key"),)


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC, as a collector runs it: keeps every span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []

    async def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
async def receiver():
    server = grpc.aio.server()
    collected = OtlpReceiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield collected, f"http://127.0.0.1:{port}"
    await server.stop(0)


async def start_service(name: str, env: dict[str, str], log_path) -> asyncio.subprocess.Process:
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"services.{name}",
            env={**os.environ, **env},
            stdout=log,
            stderr=log,
        )


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)


async def test_upload_reaches_ready_with_keys_enforced_and_search_is_one_trace(receiver, tmp_path):
    collected, otlp = receiver
    embed_port, ingest_port = free_port(), free_port()
    embed = await start_service(
        "embed",
        {
            "RAGMESH_EMBED_PORT": str(embed_port),
            "RAGMESH_EMBED_DATA_DIR": str(tmp_path / "embed"),
            # Only ingest's own key: a user's key forwarded by ingest would be refused.
            "RAGMESH_EMBED_API_KEYS": json.dumps({"ingest-key": "ingest:system"}),
            "RAGMESH_EMBED_OTLP_ENDPOINT": otlp,
        },
        tmp_path / "embed.log",
    )
    ingest = await start_service(
        "ingest",
        {
            "RAGMESH_INGEST_PORT": str(ingest_port),
            "RAGMESH_INGEST_DATA_DIR": str(tmp_path / "ingest"),
            "RAGMESH_INGEST_API_KEYS": json.dumps({"alice-key": "alice:acme"}),
            "RAGMESH_INGEST_EMBED_TARGET": f"127.0.0.1:{embed_port}",
            "RAGMESH_INGEST_EMBED_API_KEY": "ingest-key",
            "RAGMESH_INGEST_OTLP_ENDPOINT": otlp,
        },
        tmp_path / "ingest.log",
    )
    try:
        await wait_until_serving(f"127.0.0.1:{embed_port}", 180, lambda: embed.returncode is None)
        await wait_until_serving(f"127.0.0.1:{ingest_port}", 60, lambda: ingest.returncode is None)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest_port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            text = b"The lighthouse keeper of Skerryvore logs the tides every morning at six."

            def requests():
                yield ingest_pb2.UploadDocumentRequest(
                    metadata=ingest_pb2.DocumentMetadata(filename="keeper.txt")
                )
                yield ingest_pb2.UploadDocumentRequest(data=text)

            uploaded = await stub.UploadDocument(requests(), metadata=USER)
            watch = stub.WatchDocument(
                ingest_pb2.WatchDocumentRequest(document_id=uploaded.document.id),
                metadata=USER,
                timeout=120,
            )
            states = [reply.document async for reply in watch]
            assert states[-1].status == ingest_pb2.DOCUMENT_STATUS_READY, states[-1].error
            found = await stub.Search(
                ingest_pb2.SearchRequest(
                    query="when are the tides recorded", mode=ingest_pb2.SEARCH_MODE_SEMANTIC
                ),
                metadata=USER,
            )
            assert [hit.document_id for hit in found.hits] == [uploaded.document.id]
    finally:
        await stop(ingest)
        await stop(embed)
    by_service: dict[str, list] = {}
    for service, span in collected.spans:
        by_service.setdefault(service, []).append(span)
    search = next(
        s for s in by_service["ragmesh-ingest"] if s.name.endswith("IngestService/Search")
    )
    trace = [s for spans in by_service.values() for s in spans if s.trace_id == search.trace_id]
    call_to_embed = next(
        s for s in trace if s.parent_span_id == search.span_id and s.name.endswith("/Embed")
    )
    served_by_embed = [s for s in by_service["ragmesh-embed"] if s.trace_id == search.trace_id]
    assert [s.name for s in served_by_embed] == [call_to_embed.name]
    assert served_by_embed[0].parent_span_id == call_to_embed.span_id
