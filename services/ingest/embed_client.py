"""The ingest side of the embed service: model facts, tokenization and embeddings."""

from dataclasses import dataclass

import grpc

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.clients import Upstream


@dataclass(frozen=True)
class EmbedModel:
    name: str
    dimension: int
    max_tokens: int
    max_texts: int
    max_chars: int


class EmbedClient:
    def __init__(self, target: str, *, timeout: float, api_key: str = "") -> None:
        # Ingest calls embed as itself, with its own key when one is set (the caller's
        # credentials otherwise), in calls and in background jobs alike.
        self._upstream = Upstream(
            "embed",
            target,
            embed_pb2_grpc.EmbedServiceStub,
            default_timeout=timeout,
            api_key=api_key,
            forward_caller=False,
        )
        self._model: EmbedModel | None = None

    async def close(self) -> None:
        await self._upstream.close()

    async def model(self) -> EmbedModel:
        """The model's facts, asked once: a different model needs a restart of ingest too."""
        if self._model is None:
            try:
                info = await self._upstream.stub.GetModelInfo(embed_pb2.GetModelInfoRequest())
            except grpc.aio.AioRpcError as exc:
                raise self._upstream.error(exc) from exc
            self._model = EmbedModel(
                info.model,
                info.dimension,
                info.max_tokens,
                info.max_texts_per_request,
                info.max_chars_per_text,
            )
        return self._model

    async def tokenize(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        try:
            reply = await self._upstream.stub.Tokenize(embed_pb2.TokenizeRequest(texts=texts))
        except grpc.aio.AioRpcError as exc:
            raise self._upstream.error(exc) from exc
        return [list(zip(t.token_starts, t.token_ends, strict=True)) for t in reply.texts]

    async def embed(self, texts: list[str], *, query: bool = False) -> list[list[float]]:
        """Unit-length vectors for chunks (or, with query=True, for search queries)."""
        kind = embed_pb2.EMBED_KIND_QUERY if query else embed_pb2.EMBED_KIND_DOCUMENT
        try:
            reply = await self._upstream.stub.Embed(
                embed_pb2.EmbedRequest(texts=texts, kind=kind, normalize=True)
            )
        except grpc.aio.AioRpcError as exc:
            raise self._upstream.error(exc) from exc
        return [list(embedding.values) for embedding in reply.embeddings]
