"""Search through the real RPC on both backends: modes, scores, filters, limits, deletes."""

import grpc
import pytest

from ragmesh.ingest.v1 import ingest_pb2
from services.ingest.app import start

READY = ingest_pb2.DOCUMENT_STATUS_READY
KEYWORD, SEMANTIC, HYBRID = (
    ingest_pb2.SEARCH_MODE_KEYWORD,
    ingest_pb2.SEARCH_MODE_SEMANTIC,
    ingest_pb2.SEARCH_MODE_HYBRID,
)
CORPUS = {
    "volcano.txt": (
        "Volcanoes erupt when magma rises through the crust. Lava flows and ash clouds "
        "follow an eruption; Mount Etna in Sicily is among the most active volcanoes.",
        ["geology"],
    ),
    "bread.md": (
        "# Baking bread\n\nMix flour, water, salt and yeast. Knead the dough, let it rise "
        "for two hours, then bake it in a hot oven until the crust is brown.",
        ["food"],
    ),
    "tennis.txt": (
        "Tennis players serve, volley and rally across the net. A match at Wimbledon is "
        "played on grass courts in London each summer.",
        ["sport"],
    ),
}


@pytest.fixture
async def corpus(client):
    documents = {}
    for name, (text, tags) in CORPUS.items():
        document = await client.ingest(name, text.encode(), tags=tags)
        assert document.status == READY, document.error
        documents[name] = document
    return documents


async def search(client, query, **fields):
    return await client.call("Search", query=query, **fields)


@pytest.mark.parametrize("mode", [KEYWORD, SEMANTIC, HYBRID])
async def test_each_mode_ranks_the_right_document_first(client, corpus, mode):
    reply = await search(client, "Which mountain in Sicily erupts lava?", mode=mode)
    assert reply.mode == mode
    assert reply.hits[0].filename == "volcano.txt"
    assert reply.hits[0].document_id == corpus["volcano.txt"].id


async def test_semantic_finds_meaning_without_shared_words(client, corpus):
    reply = await search(client, "a racket sport", mode=SEMANTIC)
    assert reply.hits[0].filename == "tennis.txt"
    keyword = await search(client, "a racket sport", mode=KEYWORD)
    assert [h.filename for h in keyword.hits] == []


async def test_hybrid_hits_carry_each_channel_and_fused_score(client, corpus):
    reply = await search(client, "knead the dough and bake", top_k=3)
    assert reply.mode == HYBRID
    best = reply.hits[0]
    assert best.filename == "bread.md"
    assert best.keyword.rank == 1 and best.keyword.score > 0
    assert best.semantic.rank == 1 and 0 < best.semantic.score <= 1
    # First in both channels: the top of both normalised scores.
    assert best.score == pytest.approx(1.0)
    assert best.text.startswith("Baking bread") or "dough" in best.text
    assert set(best.matched_terms) >= {"knead", "dough", "bake"}
    assert [h.score for h in reply.hits] == sorted((h.score for h in reply.hits), reverse=True)
    assert len(reply.hits) <= 3


async def test_filters_by_document_tag_and_type(client, corpus):
    query = "a summer afternoon"

    async def names(**search_filter):
        reply = await search(client, query, filter=ingest_pb2.SearchFilter(**search_filter))
        return {hit.filename for hit in reply.hits}

    assert await names(document_ids=[corpus["bread.md"].id]) == {"bread.md"}
    assert await names(tags=["sport"]) == {"tennis.txt"}
    assert await names(mime_types=["text/markdown"]) == {"bread.md"}
    assert await names(tags=["no-such-tag"]) == set()


async def test_min_score_and_top_k_limit_the_hits(client, corpus):
    everything = await search(client, "crust", mode=KEYWORD, top_k=10)
    assert {h.filename for h in everything.hits} == {"volcano.txt", "bread.md"}
    one = await search(client, "crust", mode=KEYWORD, top_k=1)
    assert len(one.hits) == 1
    scores = [h.score for h in everything.hits]
    above_all = await search(client, "crust", mode=KEYWORD, min_score=max(scores) * 1.001)
    assert list(above_all.hits) == []
    at_lowest = await search(client, "crust", mode=KEYWORD, min_score=min(scores))
    assert len(at_lowest.hits) == len(scores)


async def test_neighbours_give_context(client):
    paragraphs = [f"Paragraph {n} talks about topic{n} in some detail." * 6 for n in range(6)]
    document = await client.ingest("long.txt", "\n\n".join(paragraphs).encode())
    assert document.chunk_count >= 3
    reply = await search(client, "topic3", mode=KEYWORD, include_neighbors=True, top_k=1)
    hit = reply.hits[0]
    assert hit.previous.index == hit.chunk_index - 1
    assert hit.next.index == hit.chunk_index + 1
    assert hit.previous.document_id == hit.document_id


async def test_tenants_never_see_each_other(client, new_client, ingest_channel, corpus):
    other = new_client(ingest_channel)
    for mode in (KEYWORD, SEMANTIC, HYBRID):
        assert list((await search(other, "volcano lava", mode=mode)).hits) == []


async def test_a_deleted_document_never_answers_again(client, corpus):
    volcano = corpus["volcano.txt"].id
    await client.call("DeleteDocument", document_id=volcano)
    for mode in (KEYWORD, SEMANTIC, HYBRID):
        reply = await search(client, "volcano lava eruption", mode=mode)
        assert volcano not in {hit.document_id for hit in reply.hits}


@pytest.mark.parametrize(
    "query",
    [
        '"unbalanced',
        "*",
        "title:x",
        "((a OR b",
        "x AND NEAR(y)",
        "'; DROP TABLE chunks; --",
        "\\",
        "%_",
        "🙂 ünïcödé",
    ],
)
async def test_any_typed_characters_are_safe_in_every_mode(client, corpus, query):
    for mode in (KEYWORD, SEMANTIC, HYBRID):
        reply = await search(client, query, mode=mode)
        assert reply.mode == mode


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x" * 4097}, "query"),
        ({"query": "ok", "top_k": 101}, "top_k"),
        ({"query": "ok", "top_k": -1}, "top_k"),
        ({"query": "ok", "mode": 42}, "mode"),
    ],
)
async def test_bad_requests_name_the_field(client, fields, field, reason_of):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.call("Search", **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


async def test_search_answers_the_same_after_a_restart(make_settings, tmp_path, new_client):
    """The keyword index is rebuilt from the database; the vectors persist in the store."""
    settings = make_settings(tmp_path)
    app = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            text = CORPUS["tennis.txt"][0].encode()
            assert (await client.ingest("tennis.txt", text)).status == READY
    finally:
        await app.server.stop(0)
        await app.close()
    restarted = await start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.server.port}") as channel:
            client.stub = type(client.stub)(channel)
            for mode in (KEYWORD, SEMANTIC, HYBRID):
                reply = await search(client, "Wimbledon grass courts", mode=mode)
                assert reply.hits[0].filename == "tennis.txt"
    finally:
        await restarted.server.stop(0)
        await restarted.close()


async def test_semantic_search_without_embed_is_unavailable_and_keyword_still_works(
    make_settings, tmp_path, new_client, reason_of
):
    app = await start(make_settings(tmp_path, embed_target="127.0.0.1:1", embed_timeout_seconds=2))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            client = new_client(channel)
            for mode in (SEMANTIC, HYBRID):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await search(client, "anything", mode=mode)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "embed" in caught.value.details()
            assert list((await search(client, "anything", mode=KEYWORD)).hits) == []
    finally:
        await app.server.stop(0)
        await app.close()


async def test_a_second_replica_catches_up_with_documents_it_did_not_index(
    make_settings, tmp_path, new_client, backend, eventually
):
    if backend == "sqlite":
        pytest.skip("replicas share a database server; SQLite is one process's file")
    settings = make_settings(tmp_path, index_sync_seconds=0.2)
    first = await start(settings)
    second = await start(settings.model_copy(update={"data_dir": tmp_path / "second"}))
    try:
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") for app in (first, second)
        ]
        writer = new_client(channels[0])
        reader = new_client(channels[1])
        reader.metadata = writer.metadata
        document = await writer.ingest("tennis.txt", CORPUS["tennis.txt"][0].encode())

        async def found() -> bool:
            reply = await search(reader, "Wimbledon", mode=KEYWORD)
            return [h.document_id for h in reply.hits] == [document.id]

        await eventually(found)
        # Its own shard caught up too, from the vectors the chunk rows keep.
        assert await second.vectors.count_document(document.id) == document.chunk_count
        reply = await search(reader, "a racket sport", mode=SEMANTIC)
        assert [h.document_id for h in reply.hits] == [document.id]

        await writer.call("DeleteDocument", document_id=document.id)
        for mode in (KEYWORD, SEMANTIC, HYBRID):
            assert list((await search(reader, "Wimbledon", mode=mode)).hits) == []

        async def removed() -> bool:
            return await second.vectors.count_document(document.id) == 0

        await eventually(removed)
        for channel in channels:
            await channel.close()
    finally:
        for app in (first, second):
            await app.server.stop(0)
            await app.close()
