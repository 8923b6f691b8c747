"""kill -9 of ingest and of embed while documents are being processed, then a restart on
the same ports and data: every accepted document ends READY or FAILED, once, and the
chunk rows, their vectors and the vector store agree."""

import asyncio
import random

import grpc
import numpy as np
import psutil
from harness import ingest_stub, upload, wait_for_status, wait_until_finished
from sqlalchemy import select
from sqlalchemy.orm import undefer

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from ragmesh.ingest.v1 import ingest_pb2
from services.common.database import create_engine, sessionmaker
from services.common.vectors import open_vector_store
from services.ingest import storage

WORDS = (
    "the keeper trims the wick at dusk and winds the clockwork that turns the lens while "
    "ships count two short flashes and one long one every fifteen seconds across the reef"
).split()


def prose(seed: int, words: int) -> bytes:
    rng = random.Random(seed)
    paragraphs = []
    while words > 0:
        size = min(words, rng.randint(60, 140))
        paragraphs.append(" ".join(rng.choice(WORDS) for _ in range(size)).capitalize() + ".")
        words -= size
    return f"# Logbook {seed}\n\n".encode() + "\n\n".join(paragraphs).encode()


def slow_html() -> bytes:
    """Seconds of parsing (tens of thousands of elements) around a little text."""
    return (
        "<html><body><p>The keeper trims the wick at dusk.</p>"
        + "<div><span><i></i></span></div>" * 25_000
        + "</body></html>"
    ).encode()


async def all_documents(stub) -> list[ingest_pb2.Document]:
    found, token = [], ""
    while True:
        page = await stub.ListDocuments(
            ingest_pb2.ListDocumentsRequest(page_size=100, page_token=token), timeout=30
        )
        found.extend(page.documents)
        token = page.next_page_token
        if not token:
            return found


async def all_chunks(stub, document_id: str) -> list[ingest_pb2.Chunk]:
    found, token = [], ""
    while True:
        page = await stub.ListChunks(
            ingest_pb2.ListChunksRequest(document_id=document_id, page_size=500, page_token=token),
            timeout=30,
        )
        found.extend(page.chunks)
        token = page.next_page_token
        if not token:
            return found


async def stored(data_dir):
    """What the stopped service left: documents, chunk rows (with their vectors) and the
    vector store's point ids per collection."""
    engine = create_engine(f"sqlite+aiosqlite:///{data_dir / 'ingest.db'}")
    try:
        async with sessionmaker(engine)() as session:
            documents = (await session.scalars(select(storage.DocumentRow))).all()
            chunks = (
                await session.scalars(
                    select(storage.ChunkRow).options(undefer(storage.ChunkRow.vector))
                )
            ).all()
            jobs = (await session.scalars(select(storage.JobRow))).all()
    finally:
        await engine.dispose()
    store = await open_vector_store(folder=data_dir / "ingest-vectors", exact=True)
    try:
        points = {
            name: {point async for point in store.ids(name)}
            for name in await store.collections("chunks_")
        }
        # The store's vector of each chunk is the one its row keeps: searching with the
        # row's vector finds that very point first, at similarity 1.
        nearest = {}
        for chunk in chunks:
            document = next(d for d in documents if d.id == chunk.document_id)
            vector = np.frombuffer(chunk.vector, dtype=np.float32)
            hits = await store.search(document.vector_collection, vector, limit=1)
            nearest[chunk.id] = hits[0] if hits else None
    finally:
        await store.close()
    return documents, chunks, jobs, points, nearest


def check_agreement(documents, chunks, jobs, points, nearest, uploaded: list[str]) -> None:
    assert sorted(d.id for d in documents) == sorted(uploaded), "a document was lost or doubled"
    assert {d.status for d in documents} <= {storage.READY, storage.FAILED}
    assert jobs == [], "work is left owed after every document finished"
    by_document: dict[str, list] = {}
    for chunk in chunks:
        by_document.setdefault(chunk.document_id, []).append(chunk)
    ready_chunks = set()
    for document in documents:
        rows = sorted(by_document.get(document.id, []), key=lambda c: c.index)
        if document.status == storage.FAILED:
            assert rows == [], f"FAILED {document.filename} keeps chunks"
            continue
        assert [c.index for c in rows] == list(range(document.chunk_count)), document.filename
        ready_chunks |= {c.id for c in rows}
    assert set().union(*points.values()) == ready_chunks, "points and READY chunks differ"
    for chunk_id, hit in nearest.items():
        assert hit is not None and hit[0] == chunk_id and hit[1] > 0.999, chunk_id


async def test_ingest_killed_while_parsing_and_while_embedding_loses_and_doubles_nothing(mesh):
    await mesh.start("ingest")
    files = {
        "slow.html": slow_html(),
        "long.md": prose(1, 12_000),
        **{f"note-{n}.txt": prose(10 + n, 300) for n in range(4)},
    }
    async with ingest_stub(mesh) as stub:
        ids = {name: await upload(stub, name, data) for name, data in files.items()}
        await wait_for_status(stub, ids["slow.html"], {ingest_pb2.DOCUMENT_STATUS_PARSING})
    children = await mesh.kill("ingest")
    # The parser child reading slow.html goes with the service, it is not left running.
    assert children
    _, alive = await asyncio.to_thread(psutil.wait_procs, children, 10)
    assert not alive, alive

    await mesh.start("ingest")
    async with ingest_stub(mesh) as stub:
        await wait_for_status(stub, ids["long.md"], {ingest_pb2.DOCUMENT_STATUS_EMBEDDING})
    await mesh.kill("ingest")

    await mesh.start("ingest")
    async with ingest_stub(mesh) as stub:
        finished = await wait_until_finished(stub, ids.values())
        assert {
            name: ingest_pb2.DocumentStatus.Name(finished[i].status) for name, i in ids.items()
        } == dict.fromkeys(files, "DOCUMENT_STATUS_READY")
        listed = await all_documents(stub)
        assert sorted(d.id for d in listed) == sorted(ids.values())
        for document in listed:
            chunks = await all_chunks(stub, document.id)
            assert [c.index for c in chunks] == list(range(document.chunk_count))
        found = await stub.Search(
            ingest_pb2.SearchRequest(query="clockwork lens", top_k=50), timeout=60
        )
        assert {hit.document_id for hit in found.hits} >= {ids["long.md"]}
    await mesh.stop("ingest")
    check_agreement(*await stored(mesh.root / "ingest"), uploaded=list(ids.values()))


async def embed_stats(embed) -> embed_pb2.GetStatsResponse:
    return await embed.GetStats(embed_pb2.GetStatsRequest(), timeout=10)


async def test_embed_killed_mid_batch_direct_callers_get_unavailable_and_ingest_retries(
    mesh, models
):
    await mesh.start("ingest")
    async with (
        ingest_stub(mesh) as stub,
        grpc.aio.insecure_channel(models.target("embed")) as embed_channel,
    ):
        embed = embed_pb2_grpc.EmbedServiceStub(embed_channel)
        # A direct caller, alone on the service: 256 texts are several batches.
        before = await embed_stats(embed)
        request = embed_pb2.EmbedRequest(
            texts=[prose(100 + n, 150).decode() for n in range(256)],
            kind=embed_pb2.EMBED_KIND_DOCUMENT,
            normalize=True,
        )
        direct = asyncio.ensure_future(embed.Embed(request, timeout=120))
        async with asyncio.timeout(60):
            while (await embed_stats(embed)).batches == before.batches:
                assert not direct.done()
        assert not direct.done(), "the call finished before a kill could reach it"
        await models.kill("embed")
        try:
            await direct
            raise AssertionError("a call in flight when embed died got an answer")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        await models.start("embed")

        # ingest's batches: the document waits while embed is down, then is finished.
        document_id = await upload(stub, "long.md", prose(2, 12_000))
        await wait_for_status(stub, document_id, {ingest_pb2.DOCUMENT_STATUS_EMBEDDING})
        await models.kill("embed")
        document = (
            await stub.GetDocument(ingest_pb2.GetDocumentRequest(document_id=document_id))
        ).document
        assert document.status != ingest_pb2.DOCUMENT_STATUS_FAILED, document.error
        await models.start("embed")
        finished = await wait_until_finished(stub, [document_id])
        assert finished[document_id].status == ingest_pb2.DOCUMENT_STATUS_READY, finished[
            document_id
        ].error
        chunks = await all_chunks(stub, document_id)
        assert [c.index for c in chunks] == list(range(finished[document_id].chunk_count))
        # Every stored vector is its own chunk's: the restarted model gives the same ones.
        reference = await embed.Embed(
            embed_pb2.EmbedRequest(
                texts=[c.text for c in chunks], kind=embed_pb2.EMBED_KIND_DOCUMENT, normalize=True
            ),
            timeout=120,
        )
    await mesh.stop("ingest")
    documents, rows, jobs, points, nearest = await stored(mesh.root / "ingest")
    check_agreement(documents, rows, jobs, points, nearest, uploaded=[document_id])
    by_index = {row.index: np.frombuffer(row.vector, dtype=np.float32) for row in rows}
    for index, vector in enumerate(reference.embeddings):
        assert float(np.dot(by_index[index], np.asarray(vector.values))) > 0.999, index


async def test_ingest_killed_mid_upload_keeps_no_part_of_it(mesh):
    await mesh.start("ingest")
    parts = mesh.root / "ingest" / "blobs" / "tmp"
    async with ingest_stub(mesh) as stub:
        call = stub.UploadDocument(timeout=60)
        await call.write(
            ingest_pb2.UploadDocumentRequest(
                metadata=ingest_pb2.DocumentMetadata(filename="half.md")
            )
        )
        await call.write(ingest_pb2.UploadDocumentRequest(data=prose(3, 20_000)))
        # The service has the first bytes on disk: the upload is half done.
        async with asyncio.timeout(30):
            while True:
                if any(p.stat().st_size for p in parts.glob("*.part")):
                    break
                await asyncio.sleep(0.05)
        await mesh.kill("ingest")
        try:
            await call
            raise AssertionError("an upload cut short by a crash was accepted")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc

    await mesh.start("ingest")
    async with ingest_stub(mesh) as stub:
        assert await all_documents(stub) == []
        whole = await upload(stub, "whole.md", prose(4, 300))
        finished = await wait_until_finished(stub, [whole])
        assert finished[whole].status == ingest_pb2.DOCUMENT_STATUS_READY
    assert list(parts.iterdir()) == [], "the cut-short upload's bytes are still on disk"
    blobs = [p.name for p in (mesh.root / "ingest" / "blobs").glob("*/*") if p.parent != parts]
    assert blobs == [whole]
