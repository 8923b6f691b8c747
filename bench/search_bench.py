"""Search at 10k, 100k and 1M chunks on the embedded default (SQLite, Qdrant Edge):

    python -m bench.search_bench [--sizes 10k,100k,1m] [--folder DIR]

Per size: the chunks are written straight into a fresh ingest database (READY documents,
ten tenants, each chunk row keeping its vector, as the worker writes them) and their
vectors into the vector store: a sample in the worker's batches of 32, the rest by the
repair command's rebuild from those rows; then the HNSW build that ingest would start in
the background. The ingest service then starts in a process of its own on that folder
(start-up time to readiness, RSS), and every query goes through the Search RPC as one
tenant, embedded by a real embed service in its own process: p50/p95 per mode. After it
stops, the bench opens the store itself: the tenant-filtered store search next to a
masked numpy scan of the same vectors (what the in-memory index did before the vector
store), recall@10 of the HNSW search against exact search, reopen time, and the repair
check (a dry run) over the whole store.

Texts are Zipf-distributed words; vectors are the mixture of real all-MiniLM-L6-v2
embeddings that bench/vector_bench.py makes (uniform random vectors would make recall
meaningless), and semantic queries are pyref's 80 questions. Figures are printed, not
asserted, with the load average next to them (the machine is shared).
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

from bench.vector_bench import PYREF, numpy_scan, real_embeddings, synthesize
from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common.clients import wait_until_serving
from services.common.database import create_engine, sessionmaker, utcnow
from services.common.vectors import EdgeVectorStore, where
from services.ingest import storage
from services.ingest.index import ChunkVectors, Point, collection_name
from services.ingest.repair import reconcile
from services.ingest.settings import IngestSettings

WORDS_PER_CHUNK = 180
CHUNKS_PER_DOCUMENT = 20
TENANTS = ["default", *(f"tenant-{n}" for n in range(1, 10))]  # the RPCs run as "default"
WORKER_BATCH = 32  # the worker upserts one embed batch at a time (EMBED_BATCH_SIZE)
WORKER_SAMPLE = 10_000
MODES = {
    "keyword": ingest_pb2.SEARCH_MODE_KEYWORD,
    "semantic": ingest_pb2.SEARCH_MODE_SEMANTIC,
    "hybrid": ingest_pb2.SEARCH_MODE_HYBRID,
}


def _load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def _percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"p50 {statistics.median(ms):7.2f} ms  p95 {ms[int(0.95 * (len(ms) - 1))]:7.2f} ms"


def _vocabulary(rng: np.random.Generator, size: int = 30_000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(size)])


def _document(n: int) -> str:
    return str(uuid.UUID(int=n // CHUNKS_PER_DOCUMENT + 1))


def _chunk(n: int) -> str:
    return str(uuid.UUID(int=(1 << 64) + n))


def _tenant(n: int) -> str:
    return TENANTS[(n // CHUNKS_PER_DOCUMENT) % len(TENANTS)]


async def _fill(database_url: str, vectors: np.ndarray, collection: str, rng) -> None:
    """READY documents with their chunk rows, each keeping its vector."""
    engine = create_engine(database_url)
    await storage.migrate(engine)
    vocabulary = _vocabulary(rng)
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    now = utcnow()
    sessions = sessionmaker(engine)
    for first in range(0, len(vectors), 5000):
        documents, rows = [], []
        last = min(first + 5000, len(vectors))
        words = rng.choice(vocabulary, size=(last - first, WORDS_PER_CHUNK), p=weights)
        for n in range(first, last):
            if n % CHUNKS_PER_DOCUMENT == 0:
                documents.append(
                    dict(
                        id=_document(n),
                        tenant=_tenant(n),
                        filename=f"doc-{n}.txt",
                        mime_type="text/plain",
                        size_bytes=1,
                        sha256=f"{n:064x}",
                        tags=[],
                        attributes={},
                        status=storage.READY,
                        error="",
                        page_count=0,
                        chunk_count=CHUNKS_PER_DOCUMENT,
                        vector_collection=collection,
                        created_at=now,
                        updated_at=now,
                    )
                )
            rows.append(
                dict(
                    id=_chunk(n),
                    document_id=_document(n),
                    tenant=_tenant(n),
                    index=n % CHUNKS_PER_DOCUMENT,
                    text=" ".join(words[n - first]),
                    start_char=0,
                    end_char=1,
                    page=0,
                    token_count=WORDS_PER_CHUNK,
                    heading="",
                    vector=vectors[n].tobytes(),
                )
            )
        async with sessions() as session, session.begin():
            if documents:
                await session.execute(storage.DocumentRow.__table__.insert(), documents)
            await session.execute(storage.ChunkRow.__table__.insert(), rows)
    await engine.dispose()


async def _write_vectors(database_url: str, folder: Path, vectors, collection: str) -> None:
    store = await EdgeVectorStore.open(folder, optimize_threshold=0)
    try:
        chunk_vectors = ChunkVectors(store)
        await chunk_vectors.ensure_collection(collection, vectors.shape[1])
        sample = min(WORKER_SAMPLE, len(vectors))
        started = time.perf_counter()
        for first in range(0, sample, WORKER_BATCH):
            await chunk_vectors.upsert(
                collection,
                [
                    Point(_chunk(n), vectors[n], _document(n), 0, _tenant(n), [], "text/plain")
                    for n in range(first, min(sample, first + WORKER_BATCH))
                ],
            )
        seconds = time.perf_counter() - started
        print(
            f"  upsert in the worker's batches of {WORKER_BATCH}: {sample / seconds:,.0f} "
            f"points/s ({sample:,} points)",
            flush=True,
        )
        engine = create_engine(database_url)
        try:
            started = time.perf_counter()
            report = await reconcile(sessionmaker(engine), store, fix=True)
            seconds = time.perf_counter() - started
        finally:
            await engine.dispose()
        rebuilt = report.collections[0].missing
        if rebuilt:
            print(
                f"  rebuild of the rest from the chunk rows (repair): {rebuilt / seconds:,.0f} "
                f"points/s ({rebuilt:,} points in {seconds:.1f} s)",
                flush=True,
            )
        started = time.perf_counter()
        await store.optimize(collection)
        status = await store.status(collection)
        print(
            f"  HNSW build (child process): {time.perf_counter() - started:.1f} s; "
            f"{status.indexed_points:,} of {status.points:,} points indexed   [{_load()}]",
            flush=True,
        )
    finally:
        await store.close()


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


async def _ingest_process(data_dir: Path, embed_target: str, log: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "RAGMESH_INGEST_PORT": str(port),
        "RAGMESH_INGEST_DATA_DIR": str(data_dir),
        "RAGMESH_INGEST_EMBED_TARGET": embed_target,
    }
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.ingest", env=env, stdout=out, stderr=out
        )
    return process, f"127.0.0.1:{port}"


async def _queries(embed_target: str, rng) -> tuple[dict[str, list[str]], list[float]]:
    """Query texts per mode, and the time one query takes to embed."""
    questions = [json.loads(line)["text"] for line in (PYREF / "queries.jsonl").open()]
    words = _vocabulary(np.random.default_rng(0))[:2000]
    keyword = [" ".join(rng.choice(words, size=4)) for _ in questions]
    hybrid = [f"{q} {' '.join(rng.choice(words, size=2))}" for q in questions]
    embedding = []
    async with grpc.aio.insecure_channel(embed_target) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        for text in [questions[0], *questions]:
            started = time.perf_counter()
            await stub.Embed(
                embed_pb2.EmbedRequest(
                    texts=[text], kind=embed_pb2.EMBED_KIND_QUERY, normalize=True
                )
            )
            embedding.append(time.perf_counter() - started)
    return {"keyword": keyword, "semantic": questions, "hybrid": hybrid}, embedding[1:]


async def _serve_and_search(data_dir: Path, embed_target: str, queries, folder: Path) -> None:
    started = time.perf_counter()
    process, target = await _ingest_process(data_dir, embed_target, folder / "ingest.log")
    try:
        await wait_until_serving(target, 3600, lambda: process.returncode is None)
        ready = time.perf_counter() - started
        rss = _status_kib(process.pid, "VmRSS") / 1024
        print(
            f"  ingest process: ready (SERVING) {ready:.1f} s after it started; RSS "
            f"{rss:,.0f} MiB   [{_load()}]",
            flush=True,
        )
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for name, mode in MODES.items():
                samples = []
                for text in [queries[name][0], *queries[name]]:
                    t = time.perf_counter()
                    await stub.Search(ingest_pb2.SearchRequest(query=text, mode=mode, top_k=10))
                    samples.append(time.perf_counter() - t)
                print(f"  Search {name:<9} {_percentiles(samples[1:])}", flush=True)
        peak = _status_kib(process.pid, "VmHWM") / 1024
        rss = _status_kib(process.pid, "VmRSS") / 1024
        print(f"  ingest RSS after the queries {rss:,.0f} MiB (peak {peak:,.0f} MiB)")
    finally:
        process.terminate()
        await process.wait()


async def _store_alone(folder: Path, database_url: str, vectors, query_vectors, collection):
    started = time.perf_counter()
    store = await EdgeVectorStore.open(folder, optimize_threshold=0)
    reopened = time.perf_counter() - started
    try:
        tenants = np.array([TENANTS.index(_tenant(n)) for n in range(len(vectors))])
        timings: dict[str, list[float]] = {"numpy scan": [], "edge exact": [], "edge hnsw": []}
        recalls, agreement = [], []
        for round_ in range(3):
            for k, query in enumerate(query_vectors):
                t = (k + round_) % len(TENANTS)
                mask, condition = tenants == t, where(tenant=TENANTS[t])
                start = time.perf_counter()
                best = numpy_scan(vectors, mask, query)
                timings["numpy scan"].append(time.perf_counter() - start)
                start = time.perf_counter()
                exact = await store.search(collection, query, condition, exact=True)
                timings["edge exact"].append(time.perf_counter() - start)
                start = time.perf_counter()
                approximate = await store.search(collection, query, condition)
                timings["edge hnsw"].append(time.perf_counter() - start)
                if round_ == 0:
                    truth = {p for p, _ in exact}
                    recalls.append(len(truth & {p for p, _ in approximate}) / 10)
                    agreement.append(len(truth & {_chunk(int(n)) for n in best}) / 10)
        print(
            f"  tenant-filtered top 10 (10% of the points), 3 rounds of {len(query_vectors)} "
            f"queries; recall@10 of HNSW vs exact {np.mean(recalls):.4f} (worst query "
            f"{min(recalls):.1f}); exact vs the numpy scan {np.mean(agreement):.4f}"
        )
        for method, samples in timings.items():
            print(f"    {method:<11} {_percentiles(samples)}")
        engine = create_engine(database_url)
        try:
            started = time.perf_counter()
            report = await reconcile(sessionmaker(engine), store, fix=False)
            checked = time.perf_counter() - started
        finally:
            await engine.dispose()
        print(
            f"  reopen of the store {reopened:.2f} s; repair --dry-run {checked:.1f} s "
            f"({report})   [{_load()}]",
            flush=True,
        )
    finally:
        await store.close()


async def run_size(count: int, embed_target: str, real, query_vectors, folder: Path) -> None:
    print(f"--- {count:,} chunks, {len(TENANTS)} tenants   [{_load()}]", flush=True)
    rng = np.random.default_rng(count)
    data_dir = folder / f"ingest-{count}"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    database_url = f"sqlite+aiosqlite:///{data_dir / 'ingest.db'}"
    collection = await _collection(embed_target)
    vectors = synthesize(real, count)
    started = time.perf_counter()
    await _fill(database_url, vectors, collection, rng)
    print(f"  rows written in {time.perf_counter() - started:.0f} s", flush=True)
    vector_folder = IngestSettings(data_dir=data_dir).vector_folder
    await _write_vectors(database_url, vector_folder, vectors, collection)
    queries, embedding = await _queries(embed_target, rng)
    print(f"  query embedding alone (Embed RPC) {_percentiles(embedding)}", flush=True)
    await _serve_and_search(data_dir, embed_target, queries, folder)
    await _store_alone(vector_folder, database_url, vectors, query_vectors, collection)
    shutil.rmtree(data_dir, ignore_errors=True)


async def _collection(embed_target: str) -> str:
    async with grpc.aio.insecure_channel(embed_target) as channel:
        info = await embed_pb2_grpc.EmbedServiceStub(channel).GetModelInfo(
            embed_pb2.GetModelInfoRequest()
        )
    return collection_name(info.model, info.dimension)


async def _embed_process(folder: Path):
    """The embed service in its own process, as deployed; returns (process, target)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAGMESH_EMBED_PORT": str(port), "RAGMESH_EMBED_DATA_DIR": str(folder)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.embed",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"
    try:
        await wait_until_serving(target, 300, lambda: process.returncode is None)
    except BaseException:
        process.terminate()
        raise
    return process, target


async def _run(sizes: list[int], folder: Path) -> None:
    real, query_vectors = real_embeddings()
    embed, target = await _embed_process(folder / "embed")
    try:
        print("search: the embedded default (SQLite, Qdrant Edge), top_k 10")
        for size in sizes:
            await run_size(size, target, real, query_vectors, folder)
    finally:
        embed.terminate()
        await embed.wait()


def _size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1000, "m": 1_000_000}.get(text[-1:], 1)
    try:
        return int(float(text.rstrip("km")) * scale)
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not a chunk count (10000, 10k, 1m)") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="10k,100k", help="comma-separated chunk counts: 10000,100000 or 10k,1m"
    )
    parser.add_argument("--folder", type=Path, default=None, help="where data goes (a temp dir)")
    # Known options only: `python -m bench search` leaves the benchmark names in argv.
    args, _ = parser.parse_known_args(argv)
    sizes = [_size(s) for s in args.sizes.split(",")]
    folder = args.folder or Path(tempfile.mkdtemp(prefix="ragmesh-search-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_run(sizes, folder))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
