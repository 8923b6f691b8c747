"""The services sessions calls: ingest (documents, search), embed (memory vectors) and
the llm deployments (one per model), each behind the shared client.

Ingest and llm act for the caller inside a call (the caller's tenant scopes what ingest
returns, and llm's Cancel reaches only the caller's own requests) and with the service's
own key in background work. Embed serves the service itself: always its own key.
"""

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.clients import Upstream
from services.common.errors import FailedPrecondition
from services.sessions.settings import SessionsSettings


@dataclass(frozen=True)
class DocumentHit:
    chunk_id: str
    document_id: str
    filename: str
    page: int
    text: str
    score: float


class Ingest:
    def __init__(self, settings: SessionsSettings) -> None:
        self.upstream = Upstream(
            "ingest",
            settings.ingest_target,
            ingest_pb2_grpc.IngestServiceStub,
            default_timeout=settings.upstream_timeout_seconds,
            api_key=settings.ingest_api_key,
        )

    async def missing_documents(self, document_ids: Sequence[str]) -> list[str]:
        """The ids that are not documents of the caller's tenant, in the order given."""

        async def exists(document_id: str) -> bool:
            try:
                await self.upstream.stub.GetDocument(
                    ingest_pb2.GetDocumentRequest(document_id=document_id)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    return False
                raise self.upstream.error(exc) from exc
            return True

        found = await asyncio.gather(*(exists(d) for d in document_ids))
        return [d for d, ok in zip(document_ids, found, strict=True) if not ok]

    async def search(
        self, query: str, document_ids: Sequence[str], top_k: int
    ) -> list[DocumentHit]:
        try:
            answer = await self.upstream.stub.Search(
                ingest_pb2.SearchRequest(
                    query=query[:4096],
                    mode=ingest_pb2.SEARCH_MODE_HYBRID,
                    top_k=top_k,
                    filter=ingest_pb2.SearchFilter(document_ids=list(document_ids)),
                )
            )
        except grpc.aio.AioRpcError as exc:
            raise self.upstream.error(exc) from exc
        return [
            DocumentHit(h.chunk_id, h.document_id, h.filename, h.page, h.text, h.score)
            for h in answer.hits
        ]

    async def close(self) -> None:
        await self.upstream.close()


class Embed:
    def __init__(self, settings: SessionsSettings) -> None:
        self.upstream = Upstream(
            "embed",
            settings.embed_target,
            embed_pb2_grpc.EmbedServiceStub,
            default_timeout=settings.upstream_timeout_seconds,
            api_key=settings.embed_api_key,
            forward_caller=False,
        )
        self._model: tuple[str, int] | None = None

    async def model(self) -> tuple[str, int]:
        """The embedding model's name and dimension, asked once."""
        if self._model is None:
            try:
                info = await self.upstream.stub.GetModelInfo(embed_pb2.GetModelInfoRequest())
            except grpc.aio.AioRpcError as exc:
                raise self.upstream.error(exc) from exc
            self._model = (info.model, info.dimension)
        return self._model

    async def embed(self, texts: Sequence[str], *, query: bool) -> list[list[float]]:
        kind = embed_pb2.EMBED_KIND_QUERY if query else embed_pb2.EMBED_KIND_DOCUMENT
        try:
            reply = await self.upstream.stub.Embed(
                embed_pb2.EmbedRequest(texts=list(texts), kind=kind, normalize=True)
            )
        except grpc.aio.AioRpcError as exc:
            raise self.upstream.error(exc) from exc
        return [list(e.values) for e in reply.embeddings]

    async def close(self) -> None:
        await self.upstream.close()


class LlmRouter:
    """Routes a session's model to the llm deployment serving it.

    With `llm_targets` set, each listed model has its deployment; without it one
    deployment serves whatever model it has loaded, and a session that names a model
    is accepted only while that model is the one served.
    """

    def __init__(self, settings: SessionsSettings) -> None:
        def upstream(target: str) -> Upstream:
            return Upstream(
                "llm",
                target,
                llm_pb2_grpc.LlmServiceStub,
                default_timeout=settings.upstream_timeout_seconds,
                api_key=settings.llm_api_key,
            )

        self._default = upstream(settings.llm_target)
        self._by_model = {model: upstream(t) for model, t in settings.llm_targets.items()}
        self.stream_timeout = settings.llm_timeout_seconds

    async def _served_by_default(self) -> str:
        try:
            answer = await self._default.stub.GetModelStatus(llm_pb2.GetModelStatusRequest())
        except grpc.aio.AioRpcError as exc:
            raise self._default.error(exc) from exc
        return answer.status.serving_model

    async def check_model(self, model: str) -> None:
        """FAILED_PRECONDITION naming the models served when no deployment serves model."""
        if not model or model in self._by_model:
            return
        served = await self._served_by_default()
        if model == served:
            return
        available = sorted({*self._by_model, *([served] if served else [])})
        raise FailedPrecondition(
            f"no llm deployment serves {model!r}; served: {', '.join(available) or 'none'}",
            reason="MODEL_NOT_SERVED",
            metadata={"model": model, "available": ",".join(available)},
        )

    def for_model(self, model: str) -> Upstream:
        return self._by_model.get(model, self._default)

    async def context_length(self, llm: Upstream) -> int:
        try:
            answer = await llm.stub.GetModelStatus(llm_pb2.GetModelStatusRequest())
        except grpc.aio.AioRpcError as exc:
            raise llm.error(exc) from exc
        if answer.status.state != llm_pb2.MODEL_STATE_READY and not answer.status.serving_model:
            raise FailedPrecondition(
                f"the llm service at {llm.target} has no model ready "
                f"({llm_pb2.ModelState.Name(answer.status.state)})",
                reason="MODEL_NOT_READY",
            )
        return answer.status.context_length

    async def count_tokens(self, llm: Upstream, messages: Sequence[llm_pb2.ChatMessage]) -> int:
        try:
            answer = await llm.stub.CountTokens(
                llm_pb2.CountTokensRequest(messages=llm_pb2.ChatMessages(messages=messages))
            )
        except grpc.aio.AioRpcError as exc:
            raise llm.error(exc) from exc
        return answer.token_count

    def chat(
        self, llm: Upstream, request: llm_pb2.ChatRequest
    ) -> AsyncIterator[llm_pb2.ChatResponse]:
        return llm.stub.Chat(request, timeout=self.stream_timeout)

    async def cancel(self, llm: Upstream, request_id: str) -> None:
        try:
            await llm.stub.Cancel(llm_pb2.CancelRequest(request_id=request_id), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise llm.error(exc) from exc

    async def close(self) -> None:
        await self._default.close()
        for upstream in self._by_model.values():
            await upstream.close()
