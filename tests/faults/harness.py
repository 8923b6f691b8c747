"""What the fault tests share: stubs on a ProcessMesh, uploads, following a document."""

import asyncio
import contextlib
import functools

import grpc
import throwaway_postgres

from bench.load import ProcessMesh
from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2_grpc

# Short leases and polls, so a job a killed worker held is taken over in seconds.
INGEST = {"JOB_LEASE_SECONDS": "3", "JOB_POLL_SECONDS": "0.2", "WORKERS": "2"}
FINISHED = (ingest_pb2.DOCUMENT_STATUS_READY, ingest_pb2.DOCUMENT_STATUS_FAILED)


@contextlib.asynccontextmanager
async def ingest_stub(mesh: ProcessMesh):
    async with grpc.aio.insecure_channel(mesh.target("ingest")) as channel:
        yield ingest_pb2_grpc.IngestServiceStub(channel)


@contextlib.asynccontextmanager
async def sessions_stub(mesh: ProcessMesh):
    async with grpc.aio.insecure_channel(mesh.target("sessions")) as channel:
        yield sessions_pb2_grpc.SessionsServiceStub(channel)


async def upload(stub, filename: str, data: bytes) -> str:
    def requests():
        yield ingest_pb2.UploadDocumentRequest(
            metadata=ingest_pb2.DocumentMetadata(filename=filename)
        )
        for start in range(0, len(data), 1 << 20):
            yield ingest_pb2.UploadDocumentRequest(data=data[start : start + (1 << 20)])

    reply = await stub.UploadDocument(requests(), timeout=60)
    return reply.document.id


async def wait_for_status(stub, document_id: str, wanted, seconds: float = 120):
    """Follows WatchDocument until the document is in one of the wanted states; returns
    the document. A guard against a hang, never a measure."""
    async with asyncio.timeout(seconds):
        watch = stub.WatchDocument(ingest_pb2.WatchDocumentRequest(document_id=document_id))
        try:
            async for reply in watch:
                if reply.document.status in wanted:
                    return reply.document
        finally:
            watch.cancel()
    raise AssertionError(f"document {document_id}: the watch ended before {wanted}")


async def wait_until_finished(stub, document_ids, seconds: float = 180) -> dict:
    """Each document once it is READY or FAILED, by id."""
    return {
        document_id: await wait_for_status(stub, document_id, FINISHED, seconds)
        for document_id in document_ids
    }


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server of the test's own (a fault test stops it; the suite's shared
    one must stay up): yields its executor (stop it with executor.stopped()) and a URL
    maker for fresh databases."""
    with throwaway_postgres.running("ragmesh-faults-pg-") as (executor, port):
        yield executor, functools.partial(throwaway_postgres.create_database, port)
