"""Ingest of a mixed corpus end to end vs the embedding time alone for the same chunks."""

import asyncio
import io
import tempfile
import time

import grpc

from bench.embed_bench import (
    free_port,
    long_texts,
    peak_rss_mib,
    service,
    start_embed,
)
from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common.clients import wait_until_serving

READY = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_READY")


def corpus() -> list[tuple[str, bytes]]:
    import docx
    from reportlab.pdfgen import canvas

    files = []
    for n, text in enumerate(long_texts(16, 1500, seed=7)):
        paragraphs = [text[i : i + 600] for i in range(0, len(text), 600)]
        kind = n % 4
        if kind == 0:
            body = "\n\n".join(f"## Part {i}\n\n{p}" for i, p in enumerate(paragraphs))
            files.append((f"doc{n}.md", f"# Document {n}\n\n{body}".encode()))
        elif kind == 1:
            body = "".join(f"<h2>Part {i}</h2><p>{p}</p>" for i, p in enumerate(paragraphs))
            files.append((f"doc{n}.html", f"<html><body>{body}</body></html>".encode()))
        elif kind == 2:
            buffer = io.BytesIO()
            pdf = canvas.Canvas(buffer)
            for p in paragraphs:
                y = 800
                for line in (p[i : i + 90] for i in range(0, len(p), 90)):
                    pdf.drawString(40, y, line)
                    y -= 14
                pdf.showPage()
            pdf.save()
            files.append((f"doc{n}.pdf", buffer.getvalue()))
        else:
            document = docx.Document()
            for i, p in enumerate(paragraphs):
                document.add_heading(f"Part {i}", level=2)
                document.add_paragraph(p)
            buffer = io.BytesIO()
            document.save(buffer)
            files.append((f"doc{n}.docx", buffer.getvalue()))
    return files


async def _run(ingest: str, embed: str, files) -> dict:
    async with grpc.aio.insecure_channel(ingest) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)

        async def one(name: str, data: bytes) -> ingest_pb2.Document:
            requests = [
                ingest_pb2.UploadDocumentRequest(
                    metadata=ingest_pb2.DocumentMetadata(filename=name)
                ),
                ingest_pb2.UploadDocumentRequest(data=data),
            ]
            reply = await stub.UploadDocument(iter(requests))
            last = None
            async for update in stub.WatchDocument(
                ingest_pb2.WatchDocumentRequest(document_id=reply.document.id)
            ):
                last = update.document
            return last

        started = time.perf_counter()
        documents = await asyncio.gather(*(one(name, data) for name, data in files))
        ingest_seconds = time.perf_counter() - started
        texts = []
        for document in documents:
            assert document.status == READY, (document.filename, document.error)
            reply = await stub.ListChunks(
                ingest_pb2.ListChunksRequest(document_id=document.id, page_size=1000)
            )
            texts += [chunk.text for chunk in reply.chunks]
    async with grpc.aio.insecure_channel(embed) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        started = time.perf_counter()
        for first in range(0, len(texts), 32):
            await stub.Embed(embed_pb2.EmbedRequest(texts=texts[first : first + 32]))
        embed_seconds = time.perf_counter() - started
    return {"ingest": ingest_seconds, "embed": embed_seconds, "chunks": len(texts)}


def main() -> None:
    files = corpus()
    embed_port, ingest_port = free_port(), free_port()
    with (
        tempfile.TemporaryDirectory() as data_dir,
        start_embed(embed_port, data_dir + "/embed") as embed_process,
        service(
            "ingest",
            {
                "RAGMESH_INGEST_PORT": str(ingest_port),
                "RAGMESH_INGEST_DATA_DIR": data_dir,
                "RAGMESH_INGEST_EMBED_TARGET": f"127.0.0.1:{embed_port}",
                "RAGMESH_INGEST_LOG_LEVEL": "WARNING",
            },
        ) as ingest_process,
    ):
        asyncio.run(wait_until_serving(f"127.0.0.1:{embed_port}", 180))
        asyncio.run(wait_until_serving(f"127.0.0.1:{ingest_port}", 180))
        result = asyncio.run(_run(f"127.0.0.1:{ingest_port}", f"127.0.0.1:{embed_port}", files))
        rss = {"ingest": peak_rss_mib(ingest_process.pid), "embed": peak_rss_mib(embed_process.pid)}
    size = sum(len(data) for _, data in files) / 1024
    print(
        f"ingest of {len(files)} files ({size:.0f} KiB: md, html, pdf, docx), "
        f"{result['chunks']} chunks"
    )
    print(
        f"  end to end {result['ingest']:.1f} s, embedding alone {result['embed']:.1f} s, "
        f"ratio {result['embed'] / result['ingest']:.2f}x (aim >= 0.8x)"
    )
    print(f"  peak RSS: ingest {rss['ingest']:.0f} MiB, embed {rss['embed']:.0f} MiB")


if __name__ == "__main__":
    main()
