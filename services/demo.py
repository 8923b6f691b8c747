"""A short tour of a running mesh, printed for a person: python -m services.mesh runs it."""

from pathlib import Path

import grpc

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from ragmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc

README = Path(__file__).resolve().parents[1] / "README.md"
QUESTION = "How do I run the tests?"


async def run(targets: dict[str, str]) -> None:
    channels = {name: grpc.aio.insecure_channel(target) for name, target in targets.items()}
    try:
        await _telemetry(telemetry_pb2_grpc.TelemetryServiceStub(channels["telemetry"]))
        await _embed(embed_pb2_grpc.EmbedServiceStub(channels["embed"]))
        document_id = await _ingest(ingest_pb2_grpc.IngestServiceStub(channels["ingest"]))
        await _llm(llm_pb2_grpc.LlmServiceStub(channels["llm"]))
        if document_id:
            await _sessions(
                sessions_pb2_grpc.SessionsServiceStub(channels["sessions"]), document_id
            )
    finally:
        for channel in channels.values():
            await channel.close()


async def _telemetry(stub) -> None:
    status = (await stub.GetSystemStatus(telemetry_pb2.GetSystemStatusRequest())).status
    print(
        f"\n[telemetry] {status.hostname}: {status.cpu.logical_cores} cores at "
        f"{status.cpu.usage_percent:.0f}%, {status.memory.available_bytes / 2**30:.1f} of "
        f"{status.memory.total_bytes / 2**30:.1f} GiB free, "
        f"GPUs: {len(status.gpus) or status.gpu_unavailable_reason}"
    )
    mesh = await stub.GetMeshStatus(telemetry_pb2.GetMeshStatusRequest())
    for service in mesh.services:
        state = telemetry_pb2.ServiceHealth.State.Name(service.state).removeprefix("STATE_")
        print(f"  {service.name:<10} {state:<12} {service.latency.ToMicroseconds() / 1000:.1f} ms")


async def _embed(stub) -> None:
    info = await stub.GetModelInfo(embed_pb2.GetModelInfoRequest())
    print(
        f"\n[embed] {info.model}: {info.dimension} dimensions, "
        f"{info.max_tokens} tokens, {info.device}"
    )


async def _ingest(stub) -> str:
    async def upload():
        yield ingest_pb2.UploadDocumentRequest(
            metadata=ingest_pb2.DocumentMetadata(filename=README.name, tags=["demo"])
        )
        yield ingest_pb2.UploadDocumentRequest(data=README.read_bytes())

    answer = await stub.UploadDocument(upload())
    document = answer.document
    print(
        f"\n[ingest] uploaded {document.filename} as {document.id}"
        f"{' (already stored)' if answer.duplicate else ''}"
    )
    async for update in stub.WatchDocument(
        ingest_pb2.WatchDocumentRequest(document_id=document.id)
    ):
        document = update.document
        print(f"  status {ingest_pb2.DocumentStatus.Name(document.status)}")
    if document.status != ingest_pb2.DOCUMENT_STATUS_READY:
        print(f"  failed: {document.error}")
        return ""
    print(f"  {document.chunk_count} chunks")
    result = await stub.Search(ingest_pb2.SearchRequest(query=QUESTION, top_k=3))
    print(f"  search {QUESTION!r}:")
    for hit in result.hits:
        print(f"    {hit.score:.3f} {hit.filename}#{hit.chunk_index}: {hit.text[:70]!r}")
    return document.id


async def _llm(stub) -> None:
    status = (await stub.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
    print(f"\n[llm] {status.model} is {llm_pb2.ModelState.Name(status.state)} on {status.device}")


async def _sessions(stub, document_id: str) -> None:
    created = await stub.CreateSession(
        sessions_pb2.CreateSessionRequest(document_ids=[document_id], tags=["demo"])
    )
    session = created.session
    print(f"\n[sessions] a session over {README.name}: {session.id}")
    for question in ("What is the capital of France?", QUESTION):
        print(f"  Q: {question}\n  A: ", end="", flush=True)
        request = sessions_pb2.SendMessageRequest(
            session_id=session.id,
            content=question,
            overrides=llm_pb2.GenerationOverrides(max_new_tokens=64, temperature=0),
        )
        async for event in stub.SendMessage(request):
            kind = event.WhichOneof("event")
            if kind == "delta":
                print(event.delta, end="", flush=True)
            elif kind == "assistant_message":
                answer = event.assistant_message
                print(
                    f"\n  ({sessions_pb2.FinishReason.Name(answer.finish_reason)}, "
                    f"{answer.completion_tokens} tokens, first token after "
                    f"{answer.time_to_first_token_seconds * 1000:.0f} ms)"
                )
                for citation in answer.citations[:3]:
                    print(f"    cited {citation.filename} ({citation.score:.3f})")
    session = (await stub.GetSession(sessions_pb2.GetSessionRequest(session_id=session.id))).session
    print(f"  the session is named {session.name!r}, tagged {list(session.auto_tags)}")
    found = await stub.SearchSessions(
        sessions_pb2.SearchSessionsRequest(query="running the test suite")
    )
    for match in found.matches[:3]:
        print(
            f"  search 'running the test suite': {match.session.name!r} "
            f"({match.score:.2f}, matched {', '.join(match.matched_fields)})"
        )
