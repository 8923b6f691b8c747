"""The embed service through a real server: vectors, order, micro-batching, limits, health."""

import asyncio
import itertools
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.errors import Unavailable
from services.embed.app import start
from services.embed.model import Kind
from services.embed.servicer import EmbedServicer
from services.embed.settings import EmbedSettings

SENTENCES = [f"Sentence number {i} talks about topic {i % 7}." for i in range(40)]


async def test_health_is_serving_once_loaded(embed_channel):
    stub = health_pb2_grpc.HealthStub(embed_channel)
    for name in ("", "ragmesh.embed.v1.EmbedService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_sentence_transformers_model_given_to_start_is_served_on_torch(st_model, tmp_path):
    app = await start(EmbedSettings(host="127.0.0.1", port=0, data_dir=tmp_path), model=st_model)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            reply = await stub.Embed(embed_pb2.EmbedRequest(texts=SENTENCES[:3], normalize=True))
    finally:
        await app.server.stop(0)
        await app.close()
    expected = st_model.encode(SENTENCES[:3], normalize_embeddings=True)
    np.testing.assert_allclose([e.values for e in reply.embeddings], expected, atol=1e-4)
    # Nothing was exported: the model was served as given.
    assert not (tmp_path / "models").exists()


async def test_model_info(embed_stub):
    info = await embed_stub.GetModelInfo(embed_pb2.GetModelInfoRequest())
    assert info.model == "all-MiniLM-L6-v2"
    assert info.dimension == 384
    assert info.max_tokens == 256
    assert info.device == "cpu"
    assert info.max_texts_per_request == 64
    assert info.max_chars_per_text == 5_000


async def test_embed_matches_the_model_in_input_order(embed_stub, st_model):
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by 12 percent.", "Hello"]
    reply = await embed_stub.Embed(embed_pb2.EmbedRequest(texts=texts, normalize=True))
    assert reply.model == "all-MiniLM-L6-v2"
    assert reply.dimension == 384
    got = np.array([e.values for e in reply.embeddings])
    expected = st_model.encode(texts, normalize_embeddings=True)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert reply.token_counts[2] == 3  # [CLS] hello [SEP]


async def test_unnormalized_vectors_keep_their_length(embed_stub, st_model):
    reply = await embed_stub.Embed(
        embed_pb2.EmbedRequest(texts=["a short text"], kind=embed_pb2.EMBED_KIND_QUERY)
    )
    expected = st_model.encode(["a short text"], normalize_embeddings=False)[0]
    np.testing.assert_allclose(reply.embeddings[0].values, expected, atol=1e-4)


async def test_concurrent_callers_share_batches_and_get_their_own_vectors(embed_stub, st_model):
    before = await embed_stub.GetStats(embed_pb2.GetStatsRequest())
    replies = await asyncio.gather(
        *(embed_stub.Embed(embed_pb2.EmbedRequest(texts=[t], normalize=True)) for t in SENTENCES)
    )
    expected = st_model.encode(SENTENCES, normalize_embeddings=True)
    for reply, vector in zip(replies, expected, strict=True):
        np.testing.assert_allclose(reply.embeddings[0].values, vector, atol=1e-4)
    after = await embed_stub.GetStats(embed_pb2.GetStatsRequest())
    assert after.requests - before.requests == len(SENTENCES)
    assert after.texts - before.texts == len(SENTENCES)
    # Forty callers at once must not cost forty forward passes.
    assert after.batches - before.batches < len(SENTENCES)
    assert after.max_batch_size > 1


async def test_tokenize_gives_character_spans(embed_stub):
    text = "Embeddings are dense vectors."
    reply = await embed_stub.Tokenize(embed_pb2.TokenizeRequest(texts=[text, "x" * 3000]))
    spans = list(zip(reply.texts[0].token_starts, reply.texts[0].token_ends, strict=True))
    assert spans[0][0] == 0
    assert spans[-1][1] == len(text)
    # Spans are in order, never overlap, and together cover every non-space character.
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert "".join(text[s:e] for s, e in spans) == text.replace(" ", "")
    # Tokenize never truncates, unlike Embed.
    assert reply.texts[1].token_ends[-1] == 3000


@pytest.mark.parametrize(
    ("request_", "code", "reason", "needle"),
    [
        (embed_pb2.EmbedRequest(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "texts"),
        (
            embed_pb2.EmbedRequest(texts=["ok", "  "]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "texts[1]",
        ),
        (
            embed_pb2.EmbedRequest(texts=["x"] * 65),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TOO_MANY_TEXTS",
            "64",
        ),
        (
            embed_pb2.EmbedRequest(texts=["y" * 5_001]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "TEXT_TOO_LONG",
            "5000",
        ),
        (
            embed_pb2.EmbedRequest(texts=["x"], kind=42),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            "kind",
        ),
    ],
)
async def test_bad_requests_are_refused_with_the_limit(
    embed_stub, reason_of, request_, code, reason, needle
):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed_stub.Embed(request_)
    assert caught.value.code() == code
    assert reason_of(caught.value) == reason
    assert needle in caught.value.details()


async def test_tokenize_checks_limits_too(embed_stub, reason_of):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await embed_stub.Tokenize(embed_pb2.TokenizeRequest(texts=["z"] * 65))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_cancelled_caller_does_not_disturb_others(embed_stub):
    call = embed_stub.Embed(embed_pb2.EmbedRequest(texts=SENTENCES[:30]))
    others = asyncio.gather(
        *(embed_stub.Embed(embed_pb2.EmbedRequest(texts=[t])) for t in SENTENCES[:5])
    )
    call.cancel()
    replies = await others
    assert all(len(r.embeddings[0].values) == 384 for r in replies)


class HeldOnText:
    """The real backend, except that a batch holding `text` waits in encode until released."""

    def __init__(self, backend, text: str) -> None:
        self._backend = backend
        self._text = text
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def encode(self, texts):
        if any(self._text in text for text in texts):
            self.entered.set()
            self.release.wait(timeout=120)
        return self._backend.encode(texts)


async def test_texts_past_the_queue_bound_are_refused_until_it_drains(
    onnx_backend, tmp_path, reason_of
):
    settings = EmbedSettings(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path,
        max_texts_per_request=4,
        max_queued_texts=4,
        max_batch_size=4,
    )
    model = HeldOnText(onnx_backend, "hold")
    app = await start(settings, backend=model)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            # One batch keeps the model busy; four texts then wait behind it: the bound.
            busy = asyncio.ensure_future(stub.Embed(embed_pb2.EmbedRequest(texts=["hold"])))
            await asyncio.to_thread(model.entered.wait, 60)
            waiting = asyncio.create_task(
                app.embedder.embed(["a", "b", "c", "d"], Kind.DOCUMENT, normalize=True)
            )
            await asyncio.sleep(0)  # the task runs up to waiting for its vectors
            assert app.embedder.queued_texts == 4
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(embed_pb2.EmbedRequest(texts=["one more"]), timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason_of(caught.value) == "QUEUE_FULL"
            assert "RAGMESH_EMBED_MAX_QUEUED_TEXTS" in caught.value.details()

            model.release.set()
            assert len((await busy).embeddings) == 1
            assert len((await waiting).vectors) == 4
            reply = await stub.Embed(embed_pb2.EmbedRequest(texts=["one more"]))
            assert len(reply.embeddings) == 1
    finally:
        model.release.set()
        await app.server.stop(0)
        await app.close()


def test_a_queue_bound_below_one_full_request_is_refused_at_start():
    with pytest.raises(ValidationError, match="max_queued_texts"):
        EmbedSettings(max_texts_per_request=300, max_queued_texts=256)


async def test_calls_before_the_model_is_loaded_are_unavailable():
    with pytest.raises(Unavailable) as caught:
        await EmbedServicer().Embed(embed_pb2.EmbedRequest(texts=["x"]), None)
    assert caught.value.reason == "MODEL_LOADING"


@pytest.mark.parametrize("backend", ["auto", "torch"])
async def test_a_model_that_cannot_load_stops_the_start(tmp_path, backend):
    settings = EmbedSettings(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path,
        model=str(tmp_path / "no-such-model"),
        backend=backend,
    )
    with pytest.raises(ValueError, match="no-such-model"):
        await start(settings)
