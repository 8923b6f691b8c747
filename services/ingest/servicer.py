"""gRPC face of the ingest service: request checks and protobuf conversion, nothing more."""

from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common.context import current_tenant
from services.common.errors import InvalidArgument
from services.ingest import search
from services.ingest.documents import Documents, UploadMetadata
from services.ingest.search_index import Filter
from services.ingest.storage import ChunkRow, DocumentRow

_STATUS_TO_PB = {
    name: ingest_pb2.DocumentStatus.Value(f"DOCUMENT_STATUS_{name}")
    for name in ("PENDING", "PARSING", "CHUNKING", "EMBEDDING", "READY", "FAILED", "DELETING")
}
_STATUS_FROM_PB = {value: name for name, value in _STATUS_TO_PB.items()}


def _timestamp(value) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def document_to_pb(row: DocumentRow) -> ingest_pb2.Document:
    return ingest_pb2.Document(
        id=row.id,
        tenant=row.tenant,
        filename=row.filename,
        mime_type=row.mime_type,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        tags=row.tags,
        attributes=row.attributes,
        status=_STATUS_TO_PB[row.status],
        error=row.error,
        page_count=row.page_count,
        chunk_count=row.chunk_count,
        create_time=_timestamp(row.created_at),
        update_time=_timestamp(row.updated_at),
    )


def chunk_to_pb(row: ChunkRow) -> ingest_pb2.Chunk:
    return ingest_pb2.Chunk(
        id=row.id,
        document_id=row.document_id,
        index=row.index,
        text=row.text,
        start_char=row.start_char,
        end_char=row.end_char,
        page=row.page,
        token_count=row.token_count,
        heading=row.heading,
    )


async def _upload_bytes(requests: AsyncIterator) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("content") != "data":
            raise InvalidArgument("only the first message may carry metadata", field="metadata")
        yield request.data


_MODES = {
    ingest_pb2.SEARCH_MODE_UNSPECIFIED: search.HYBRID,
    ingest_pb2.SEARCH_MODE_HYBRID: search.HYBRID,
    ingest_pb2.SEARCH_MODE_KEYWORD: search.KEYWORD,
    ingest_pb2.SEARCH_MODE_SEMANTIC: search.SEMANTIC,
}
_MODE_TO_PB = {
    search.HYBRID: ingest_pb2.SEARCH_MODE_HYBRID,
    search.KEYWORD: ingest_pb2.SEARCH_MODE_KEYWORD,
    search.SEMANTIC: ingest_pb2.SEARCH_MODE_SEMANTIC,
}
DEFAULT_TOP_K = 10


def hit_to_pb(hit: search.Hit) -> ingest_pb2.SearchHit:
    def channel(found: tuple[float, int] | None) -> ingest_pb2.ChannelScore:
        return ingest_pb2.ChannelScore(score=found[0], rank=found[1]) if found else None

    return ingest_pb2.SearchHit(
        chunk_id=hit.chunk.id,
        document_id=hit.chunk.document_id,
        filename=hit.filename,
        chunk_index=hit.chunk.index,
        page=hit.chunk.page,
        text=hit.chunk.text,
        score=hit.score,
        keyword=channel(hit.keyword),
        semantic=channel(hit.semantic),
        matched_terms=hit.matched_terms,
        previous=chunk_to_pb(hit.previous) if hit.previous else None,
        next=chunk_to_pb(hit.next) if hit.next else None,
    )


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, documents: Documents, retrieval: search.Retrieval) -> None:
        self._documents = documents
        self._retrieval = retrieval

    async def UploadDocument(self, request_iterator, context):
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("content") != "metadata":
            raise InvalidArgument("the first message must carry metadata", field="metadata")
        meta = first.metadata
        row, duplicate = await self._documents.upload(
            current_tenant(),
            UploadMetadata(meta.filename, meta.mime_type, list(meta.tags), dict(meta.attributes)),
            _upload_bytes(requests),
        )
        return ingest_pb2.UploadDocumentResponse(document=document_to_pb(row), duplicate=duplicate)

    async def GetDocument(self, request, context):
        row = await self._documents.get(current_tenant(), request.document_id)
        return ingest_pb2.GetDocumentResponse(document=document_to_pb(row))

    async def ListDocuments(self, request, context):
        status = None
        if request.status:
            status = _STATUS_FROM_PB.get(request.status)
            if status is None:
                raise InvalidArgument(f"unknown status {request.status}", field="status")
        rows, token = await self._documents.list_documents(
            current_tenant(),
            page_size=request.page_size,
            page_token=request.page_token,
            status=status,
            tag=request.tag,
        )
        return ingest_pb2.ListDocumentsResponse(
            documents=[document_to_pb(row) for row in rows], next_page_token=token
        )

    async def DeleteDocument(self, request, context):
        await self._documents.delete(current_tenant(), request.document_id)
        return ingest_pb2.DeleteDocumentResponse()

    async def WatchDocument(self, request, context):
        async for row in self._documents.watch(current_tenant(), request.document_id):
            yield ingest_pb2.WatchDocumentResponse(document=document_to_pb(row))

    async def GetDocumentText(self, request, context):
        result = await self._documents.text(
            current_tenant(), request.document_id, request.start, request.end
        )
        return ingest_pb2.GetDocumentTextResponse(
            text=result.text, total_chars=result.total_chars, start=result.start, end=result.end
        )

    async def ListChunks(self, request, context):
        rows, token = await self._documents.chunks(
            current_tenant(),
            request.document_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return ingest_pb2.ListChunksResponse(
            chunks=[chunk_to_pb(row) for row in rows], next_page_token=token
        )

    async def Search(self, request, context):
        mode = _MODES.get(request.mode)
        if mode is None:
            raise InvalidArgument(f"unknown search mode {request.mode}", field="mode")
        where = request.filter
        hits = await self._retrieval.search(
            search.Query(
                text=request.query,
                mode=mode,
                top_k=request.top_k or DEFAULT_TOP_K,
                where=Filter(
                    tenant=current_tenant(),
                    document_ids=list(where.document_ids),
                    tags=list(where.tags),
                    mime_types=list(where.mime_types),
                ),
                min_score=request.min_score,
                include_neighbors=request.include_neighbors,
            )
        )
        return ingest_pb2.SearchResponse(hits=[hit_to_pb(h) for h in hits], mode=_MODE_TO_PB[mode])
