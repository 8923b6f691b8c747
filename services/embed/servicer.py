"""gRPC face of the embed service: validates requests and converts to and from protobuf."""

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.errors import InvalidArgument, Unavailable
from services.embed.model import Embedder, Kind

_KINDS = {
    embed_pb2.EMBED_KIND_UNSPECIFIED: Kind.DOCUMENT,
    embed_pb2.EMBED_KIND_DOCUMENT: Kind.DOCUMENT,
    embed_pb2.EMBED_KIND_QUERY: Kind.QUERY,
}


class EmbedServicer(embed_pb2_grpc.EmbedServiceServicer):
    def __init__(self) -> None:
        # Set once the model is loaded and warm; until then calls answer UNAVAILABLE.
        self.embedder: Embedder | None = None

    def _ready(self) -> Embedder:
        if self.embedder is None:
            raise Unavailable(
                "the embedding model is still loading; retry shortly", reason="MODEL_LOADING"
            )
        return self.embedder

    async def Embed(self, request, context):
        embedder = self._ready()
        kind = _KINDS.get(request.kind)
        if kind is None:
            raise InvalidArgument(f"unknown kind {request.kind}", field="kind")
        result = await embedder.embed(list(request.texts), kind, request.normalize)
        return embed_pb2.EmbedResponse(
            embeddings=[embed_pb2.Embedding(values=row) for row in result.vectors.tolist()],
            model=embedder.info.name,
            dimension=embedder.info.dimension,
            token_counts=result.token_counts,
        )

    async def Tokenize(self, request, context):
        spans = await self._ready().tokenize(list(request.texts))
        return embed_pb2.TokenizeResponse(
            texts=[
                embed_pb2.TokenizedText(
                    token_starts=[start for start, _ in text],
                    token_ends=[end for _, end in text],
                )
                for text in spans
            ]
        )

    async def GetModelInfo(self, request, context):
        embedder = self._ready()
        info = embedder.info
        return embed_pb2.GetModelInfoResponse(
            model=info.name,
            dimension=info.dimension,
            max_tokens=info.max_tokens,
            device=info.device,
            max_texts_per_request=embedder.limits.max_texts_per_request,
            max_chars_per_text=embedder.limits.max_chars_per_text,
        )

    async def GetStats(self, request, context):
        stats = self._ready().stats
        return embed_pb2.GetStatsResponse(
            requests=stats.requests,
            texts=stats.texts,
            batches=stats.batches,
            mean_batch_size=stats.mean_batch_size,
            max_batch_size=stats.max_batch_size,
            queue_seconds=stats.queue_seconds,
            compute_seconds=stats.compute_seconds,
        )
