"""The VectorStore interface, run against both implementations.

Edge runs for real (qdrant-edge-py shards in a temporary folder). No Qdrant server can
run here, so the server store is exercised through qdrant-client's local mode
(`AsyncQdrantClient(location=":memory:")`), which speaks the same client API; the tests
that use it say "server_local_mode" in their ids.
"""

import asyncio
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient

from services.common.errors import Unavailable
from services.common.vectors import (
    CollectionNotFound,
    DimensionMismatch,
    EdgeVectorStore,
    HasId,
    Match,
    Prefix,
    QdrantServerStore,
    Range,
    VectorFolderInUse,
    VectorPoint,
    VectorStoreUnavailable,
    open_vector_store,
    where,
)

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect")

DIMENSION = 64
FIELDS = {"tenant": "keyword", "doc": "keyword", "tags": "keyword", "n": "integer"}


def structured(count: int, dimension: int = DIMENSION, seed: int = 0) -> np.ndarray:
    """Unit vectors with the shape of real embeddings: topic clusters in a low-rank
    subspace plus a little isotropic noise (random vectors say nothing about recall)."""
    rng = np.random.default_rng(seed)
    rank = min(24, dimension)
    basis = rng.standard_normal((rank, dimension))
    centres = rng.standard_normal((max(8, count // 60), rank))
    latent = centres[rng.integers(0, len(centres), count)] + 0.7 * rng.standard_normal(
        (count, rank)
    )
    vectors = latent @ basis + 0.15 * rng.standard_normal((count, dimension))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def make_points(vectors: np.ndarray, tenants: int = 2, start: int = 0) -> list[VectorPoint]:
    return [
        VectorPoint(
            str(uuid.UUID(int=start + i + 1)),
            vector,
            {
                "tenant": f"t{(start + i) % tenants}",
                "doc": f"d{(start + i) // 10}",
                "tags": ["even" if (start + i) % 2 == 0 else "odd"]
                + (["three"] if (start + i) % 3 == 0 else []),
                "n": start + i,
            },
        )
        for i, vector in enumerate(vectors)
    ]


def exact_top(vectors: np.ndarray, query: np.ndarray, mask: np.ndarray, k: int):
    scores = vectors @ (query / np.linalg.norm(query))
    scores = np.where(mask, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[: min(k, int(mask.sum()))]
    return [str(uuid.UUID(int=int(i) + 1)) for i in order], scores[order]


@pytest.fixture(params=["edge", "server_local_mode"])
async def store(request, tmp_path):
    if request.param == "edge":
        opened = await EdgeVectorStore.open(tmp_path / "vectors")
    else:
        opened = QdrantServerStore(client=AsyncQdrantClient(location=":memory:"))
    yield opened
    await opened.close()


@pytest.fixture
async def filled(store):
    vectors = structured(300)
    await store.ensure_collection("chunks", DIMENSION, FIELDS)
    await store.upsert("chunks", make_points(vectors))
    return store, vectors


async def test_upsert_search_count_delete_by_filter(filled):
    store, vectors = filled
    assert await store.count("chunks") == 300
    assert await store.count("chunks", where(tenant="t0")) == 150
    assert await store.count("chunks", where(tenant="t0", doc=["d0", "d1"])) == 10
    hits = await store.search("chunks", vectors[4], where(tenant="t0"), limit=3)
    assert hits[0][0] == str(uuid.UUID(int=5))
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    await store.delete("chunks", where(doc="d0"))
    assert await store.count("chunks") == 290
    assert await store.count("chunks", where(doc="d0")) == 0


async def test_tenant_filter_never_returns_another_tenants_point(filled):
    store, vectors = filled
    tenant_of = {str(uuid.UUID(int=i + 1)): f"t{i % 2}" for i in range(300)}
    for i in range(0, 300, 7):
        # The query is a t1 point itself; asking as t0 must still not return it.
        asked = "t0" if i % 2 else "t1"
        hits = await store.search("chunks", vectors[i], where(tenant=asked), limit=20)
        assert len(hits) == 20
        assert {tenant_of[point_id] for point_id, _ in hits} == {asked}


async def test_deleted_point_stops_answering_at_once(filled):
    store, vectors = filled
    target = str(uuid.UUID(int=43))
    assert (await store.search("chunks", vectors[42], limit=1))[0][0] == target
    await store.delete("chunks", (Match("n", 42),))
    hits = await store.search("chunks", vectors[42], limit=10)
    assert target not in [point_id for point_id, _ in hits]
    assert await store.count("chunks", (Match("n", 42),)) == 0


async def test_search_agrees_with_exact_numpy(filled):
    store, vectors = filled
    tenants = np.arange(300) % 2
    queries = structured(12, seed=7)
    for query in queries:
        for mask, conditions in (
            (np.ones(300, bool), ()),
            (tenants == 1, where(tenant="t1")),
            (
                (np.arange(300) % 3 == 0) & (tenants == 0),
                (Match("tags", ["three"]), *where(tenant="t0")),
            ),
        ):
            expected_ids, expected_scores = exact_top(vectors, query, mask, 10)
            hits = await store.search("chunks", query, conditions, limit=10)
            assert [point_id for point_id, _ in hits] == expected_ids
            np.testing.assert_allclose([s for _, s in hits], expected_scores, atol=1e-5)


async def test_several_conditions_on_one_field_must_all_hold(filled):
    store, _ = filled
    both = (Match("tags", "even"), Match("tags", "three"))
    assert await store.count("chunks", both) == 50  # multiples of 6
    assert await store.count("chunks", (Match("tags", ["even", "three"]),)) == 200
    assert await store.count("chunks", (Match("tags", []),)) == 0


async def test_range_filters_on_numbers_and_datetimes(store):
    start = datetime(2025, 1, 1, tzinfo=UTC)
    await store.ensure_collection("memory", DIMENSION, {"session": "keyword", "at": "datetime"})
    vectors = structured(20, seed=3)
    await store.upsert(
        "memory",
        [
            VectorPoint(str(uuid.uuid4()), v, {"session": "s", "at": start + timedelta(days=i)})
            for i, v in enumerate(vectors)
        ],
    )
    recent = (Range("at", gte=start + timedelta(days=15)), *where(session="s"))
    assert await store.count("memory", recent) == 5
    hits = await store.search("memory", vectors[0], recent, limit=10)
    assert len(hits) == 5


async def test_number_range(filled):
    store, _ = filled
    assert await store.count("chunks", (Range("n", gte=10, lt=20),)) == 10


async def test_points_by_id(filled):
    store, vectors = filled
    chosen = [str(uuid.UUID(int=n)) for n in (1, 2, 3, 4)]
    assert await store.count("chunks", (HasId(chosen),)) == 4
    assert await store.count("chunks", (HasId(chosen), *where(tenant="t0"))) == 2
    hits = await store.search("chunks", vectors[0], (HasId(chosen[2:]),), limit=10)
    assert sorted(p for p, _ in hits) == chosen[2:]
    await store.delete("chunks", (HasId(chosen[:2]),))
    assert await store.count("chunks") == 298
    assert await store.count("chunks", (HasId([]),)) == 0
    with pytest.raises(ValueError, match="UUID"):
        HasId(["not-a-uuid"])


async def test_ids_lists_every_matching_point(filled):
    store, _ = filled
    ids = [point_id async for point_id in store.ids("chunks", where(tenant="t1"))]
    assert sorted(ids) == sorted(str(uuid.UUID(int=i + 1)) for i in range(1, 300, 2))


async def test_missing_collection_searches_as_empty(store):
    query = structured(1)[0]
    assert await store.search("never_made", query, where(tenant="t0")) == []
    assert await store.count("never_made") == 0
    assert [i async for i in store.ids("never_made")] == []
    await store.delete("never_made", where(tenant="t0"))  # no error
    with pytest.raises(CollectionNotFound):
        await store.upsert("never_made", make_points(structured(1)))


async def test_dimension_mismatch_is_refused(filled):
    store, _ = filled
    with pytest.raises(DimensionMismatch):
        await store.ensure_collection("chunks", DIMENSION * 2, FIELDS)
    with pytest.raises(DimensionMismatch):
        await store.upsert("chunks", make_points(structured(2, dimension=DIMENSION * 2)))
    with pytest.raises(DimensionMismatch):
        await store.search("chunks", np.ones(DIMENSION + 1))


async def test_delete_and_count_across_a_prefix(store):
    for name in ("chunks_a_64", "chunks_b_64", "other"):
        await store.ensure_collection(name, DIMENSION, FIELDS)
        await store.upsert(name, make_points(structured(20, seed=len(name))))
    assert await store.collections("chunks_") == ["chunks_a_64", "chunks_b_64"]
    assert await store.count(Prefix("chunks_"), where(doc="d0")) == 20
    await store.delete(Prefix("chunks_"), where(doc="d0"))
    assert await store.count(Prefix("chunks_")) == 20
    assert await store.count("other") == 20
    await store.drop_collection("other")
    assert await store.collections() == ["chunks_a_64", "chunks_b_64"]


async def test_delete_needs_a_filter(filled):
    store, _ = filled
    with pytest.raises(ValueError, match="filter"):
        await store.delete("chunks", ())


async def test_upsert_replaces_a_point_with_the_same_id(filled):
    store, vectors = filled
    point_id = str(uuid.UUID(int=1))
    await store.upsert("chunks", [VectorPoint(point_id, vectors[100], {"tenant": "t9"})])
    assert await store.count("chunks") == 300
    hits = await store.search("chunks", vectors[100], where(tenant="t9"), limit=5)
    assert hits == [(point_id, pytest.approx(1.0, abs=1e-5))]


# ---------------------------------------------------------------- Edge only


async def test_edge_persists_across_close_and_reopen(tmp_path):
    folder = tmp_path / "vectors"
    vectors = structured(500)
    store = await EdgeVectorStore.open(folder)
    await store.ensure_collection("chunks", DIMENSION, FIELDS)
    await store.upsert("chunks", make_points(vectors))
    await store.delete("chunks", where(doc="d1"))
    before = await store.search("chunks", vectors[7], where(tenant="t1"), limit=10)
    await store.close()

    store = await EdgeVectorStore.open(folder)
    try:
        assert await store.collections() == ["chunks"]
        assert await store.count("chunks") == 490
        assert await store.search("chunks", vectors[7], where(tenant="t1"), limit=10) == before
        # Payload indexes and dimension come back too.
        await store.ensure_collection("chunks", DIMENSION, FIELDS)
        with pytest.raises(DimensionMismatch):
            await store.ensure_collection("chunks", DIMENSION + 1)
    finally:
        await store.close()


async def test_edge_second_open_of_a_folder_fails_clearly(tmp_path):
    folder = tmp_path / "vectors"
    store = await EdgeVectorStore.open(folder)
    await store.ensure_collection("chunks", DIMENSION, FIELDS)
    try:
        with pytest.raises(VectorFolderInUse, match="in use") as raised:
            await EdgeVectorStore.open(folder)
        assert isinstance(raised.value, Unavailable)
        # Another process gets the same answer.
        script = (
            "import asyncio, sys\n"
            "from services.common.vectors import EdgeVectorStore, VectorFolderInUse\n"
            "try:\n"
            f"    asyncio.run(EdgeVectorStore.open({str(folder)!r}))\n"
            "except VectorFolderInUse as exc:\n"
            "    print(exc.reason); sys.exit(3)\n"
        )
        child = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == 3, child.stderr
        assert child.stdout.strip() == "VECTOR_FOLDER_IN_USE"
    finally:
        await store.close()
    reopened = await EdgeVectorStore.open(folder)  # free again once closed
    await reopened.close()


async def test_edge_shard_opened_directly_elsewhere_names_the_wal_lock(tmp_path):
    store = await EdgeVectorStore.open(tmp_path / "vectors")
    await store.ensure_collection("chunks", DIMENSION)
    shard_folder = next((tmp_path / "vectors" / "chunks").glob("shard-*"))
    try:
        (tmp_path / "copy").mkdir()
        script = (
            "from qdrant_edge import EdgeShard\n"
            "from services.common.vectors import _edge_call, VectorFolderInUse\n"
            "try:\n"
            f"    _edge_call(EdgeShard.load, {str(shard_folder)!r})\n"
            "except VectorFolderInUse:\n"
            "    raise SystemExit(3)\n"
        )
        child = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", script], capture_output=True, timeout=60
        )
        assert child.returncode == 3, child.stderr
    finally:
        await store.close()


async def test_edge_leftovers_of_an_interrupted_optimization_are_removed(tmp_path):
    folder = tmp_path / "vectors"
    store = await EdgeVectorStore.open(folder)
    await store.ensure_collection("chunks", DIMENSION, FIELDS)
    await store.upsert("chunks", make_points(structured(50)))
    await store.close()
    stray = folder / "chunks" / "shard-000002"
    stray.mkdir()
    (stray / "junk").write_text("half a copy")
    store = await EdgeVectorStore.open(folder)
    try:
        assert not stray.exists()
        assert await store.count("chunks") == 50
    finally:
        await store.close()


async def test_edge_background_optimization_keeps_answering_with_high_recall(tmp_path):
    """Optimization runs in a child process: searches answer (exactly) while it runs,
    writes made meanwhile survive the swap, and the HNSW index then agrees with an
    exact scan on nearly every top-10."""
    count, dimension = 12_000, 96
    vectors = structured(count, dimension, seed=11)
    # A low full-scan threshold, so that at this size every search below walks a graph.
    options = {"optimize_threshold": 5_000, "full_scan_threshold_kb": 100}
    store = await EdgeVectorStore.open(tmp_path / "vectors", **options)
    try:
        await store.ensure_collection("chunks", dimension, FIELDS)
        await store.upsert("chunks", make_points(vectors[:-200]))
        status = await store.status("chunks")
        assert status.optimizing  # the upsert crossed the threshold
        assert status.indexed_points == 0

        answered_while_optimizing = 0
        queries = structured(40, dimension, seed=12)
        alive = np.arange(count) < count - 200
        wrote_during = False
        while (await store.status("chunks")).optimizing:
            query = queries[answered_while_optimizing % len(queries)]
            hits = await store.search("chunks", query, limit=10)
            expected, _ = exact_top(vectors, query, alive, 10)
            assert [point_id for point_id, _ in hits] == expected
            answered_while_optimizing += 1
            if not wrote_during:
                await store.upsert("chunks", make_points(vectors[-200:], start=count - 200))
                await store.delete("chunks", where(doc="d0"))
                alive = np.arange(count) >= 10
                wrote_during = True
            await asyncio.sleep(0.05)
        assert answered_while_optimizing >= 1
        assert wrote_during

        status = await store.status("chunks")
        assert status.points == count - 10
        assert status.indexed_points >= count - 200 - 10
        assert await store.count("chunks", where(doc="d0")) == 0

        tenants = np.arange(count) % 2
        threes = np.arange(count) % 3 == 0
        cases = {
            "all": (alive, ()),
            "tenant": (alive & (tenants == 1), where(tenant="t1")),  # its own graph
            "tenant and tag": (alive & (tenants == 1) & threes, where(tenant="t1", tags="three")),
        }
        for name, (mask, conditions) in cases.items():
            recalls = []
            for query in queries:
                expected, _ = exact_top(vectors, query, mask, 10)
                hits = await store.search("chunks", query, conditions, limit=10)
                recalls.append(len(set(expected) & {p for p, _ in hits}) / 10)
            assert np.mean(recalls) >= 0.95, (name, np.mean(recalls))
    finally:
        await store.close()

    reopened = await EdgeVectorStore.open(tmp_path / "vectors", **options)
    try:
        status = await reopened.status("chunks")
        assert status.points == count - 10
        assert status.indexed_points >= count - 200 - 10
    finally:
        await reopened.close()


async def test_edge_close_during_an_optimization_loses_nothing(tmp_path):
    folder = tmp_path / "vectors"
    store = await EdgeVectorStore.open(folder, optimize_threshold=2_000)
    await store.ensure_collection("chunks", DIMENSION, FIELDS)
    await store.upsert("chunks", make_points(structured(3_000)))
    assert (await store.status("chunks")).optimizing
    await store.close()  # cancels it: the child is stopped and its copy removed

    assert [p.name for p in (folder / "chunks").glob("shard-*")] == ["shard-000001"]
    store = await EdgeVectorStore.open(folder, optimize_threshold=0)
    try:
        assert await store.count("chunks") == 3_000
        assert await store.optimize("chunks")
        assert (await store.status("chunks")).indexed_points == 3_000
    finally:
        await store.close()


async def test_edge_exact_option_matches_numpy_after_optimizing(tmp_path):
    count = 8_000
    vectors = structured(count, seed=21)
    store = await EdgeVectorStore.open(tmp_path / "v", exact=True, optimize_threshold=0)
    try:
        await store.ensure_collection("chunks", DIMENSION, FIELDS)
        await store.upsert("chunks", make_points(vectors))
        assert not (await store.status("chunks")).optimizing  # threshold 0: never by itself
        assert await store.optimize("chunks")
        assert (await store.status("chunks")).indexed_points == count
        for query in structured(10, seed=22):
            expected, _ = exact_top(vectors, query, np.ones(count, bool), 10)
            hits = await store.search("chunks", query, limit=10)
            assert [point_id for point_id, _ in hits] == expected
    finally:
        await store.close()


# ---------------------------------------------------------------- server only


async def test_server_outage_raises_unavailable():
    store = QdrantServerStore("http://127.0.0.1:9", timeout=2)  # nothing listens on port 9
    try:
        with pytest.raises(VectorStoreUnavailable, match="unavailable") as raised:
            await store.search("chunks", np.ones(DIMENSION))
        assert raised.value.reason == "VECTOR_STORE_UNAVAILABLE"
        with pytest.raises(VectorStoreUnavailable):
            await store.ensure_collection("chunks", DIMENSION, FIELDS)
    finally:
        await store.close()


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
async def test_open_vector_store_picks_the_implementation(tmp_path):
    edge = await open_vector_store("", "", tmp_path / "v")
    server = await open_vector_store("http://127.0.0.1:9", "key", tmp_path / "unused")
    try:
        assert isinstance(edge, EdgeVectorStore)
        assert isinstance(server, QdrantServerStore)
        with pytest.raises(ValueError, match="folder"):
            await open_vector_store("", "", None)
        with pytest.raises(TypeError):
            await open_vector_store("", "", tmp_path / "w", no_such_option=1)
    finally:
        await edge.close()
        await server.close()
