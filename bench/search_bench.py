"""Search latency per mode at 10k and 100k chunks on the embedded default, next to a
brute-force numpy scan of the same vectors: python -m bench.search_bench [SIZES...]

Chunks are synthetic (Zipf-distributed words, random unit vectors) and written straight
into a fresh ingest database, so the run measures search, not embedding; the ingest
service then starts on that database (loading its index) and every query goes through
the Search RPC, with the query embedded by a real embed service in its own process.
"""

import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from services.common.clients import wait_until_serving
from services.common.database import create_engine, sessionmaker, utcnow
from services.ingest import app as ingest_app
from services.ingest import storage
from services.ingest.settings import IngestSettings

DIMENSION = 384
WORDS_PER_CHUNK = 180
CHUNKS_PER_DOCUMENT = 20
QUERIES = 40
TENANT = "default"
MODES = {
    "keyword": ingest_pb2.SEARCH_MODE_KEYWORD,
    "semantic": ingest_pb2.SEARCH_MODE_SEMANTIC,
    "hybrid": ingest_pb2.SEARCH_MODE_HYBRID,
}


def _vocabulary(rng: np.random.Generator, size: int = 30_000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(size)])


async def _fill(settings: IngestSettings, chunks: int, rng: np.random.Generator) -> np.ndarray:
    """Writes READY documents with chunks and unit vectors; returns the vectors."""
    engine = create_engine(settings.resolved_database_url)
    await storage.migrate(engine)
    vocabulary = _vocabulary(rng)
    ranks = np.arange(1, len(vocabulary) + 1)
    weights = (1.0 / ranks) / (1.0 / ranks).sum()
    vectors = rng.standard_normal((chunks, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    now = utcnow()
    sessions = sessionmaker(engine)
    for first in range(0, chunks, 5000):
        documents, rows = [], []
        for n in range(first, min(first + 5000, chunks)):
            document_id = str(uuid.UUID(int=n // CHUNKS_PER_DOCUMENT))
            if n % CHUNKS_PER_DOCUMENT == 0:
                documents.append(
                    dict(
                        id=document_id,
                        tenant=TENANT,
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
                        created_at=now,
                        updated_at=now,
                    )
                )
            words = rng.choice(vocabulary, size=WORDS_PER_CHUNK, p=weights)
            rows.append(
                dict(
                    id=str(uuid.UUID(int=(1 << 64) + n)),
                    document_id=document_id,
                    tenant=TENANT,
                    index=n % CHUNKS_PER_DOCUMENT,
                    text=" ".join(words),
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
    return vectors


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.95)] * 1000


async def _measure(size: int, embed_target: str, rng: np.random.Generator, folder: Path) -> None:
    settings = IngestSettings(port=0, data_dir=folder / f"ingest-{size}", embed_target=embed_target)
    settings.data_dir.mkdir(parents=True)
    started = time.perf_counter()
    vectors = await _fill(settings, size, rng)
    filled = time.perf_counter() - started
    started = time.perf_counter()
    app = await ingest_app.start(settings)
    loaded = time.perf_counter() - started
    vocabulary_sample = _vocabulary(np.random.default_rng(1))[:2000]
    queries = [" ".join(rng.choice(vocabulary_sample, size=4)) for _ in range(QUERIES)]
    results = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for name, mode in MODES.items():
                samples = []
                for query in [queries[0], *queries]:
                    t = time.perf_counter()
                    await stub.Search(ingest_pb2.SearchRequest(query=query, mode=mode, top_k=10))
                    samples.append(time.perf_counter() - t)
                results[name] = _percentiles(samples[1:])
    finally:
        await app.server.stop(0)
        await app.close()
    scan = []
    for _ in range(QUERIES):
        q = rng.standard_normal(DIMENSION).astype(np.float32)
        q /= np.linalg.norm(q)
        t = time.perf_counter()
        scores = vectors @ q
        top = np.argpartition(-scores, 10)[:10]
        top[np.argsort(-scores[top])]
        scan.append(time.perf_counter() - t)
    results["numpy scan"] = _percentiles(scan)
    print(
        f"  {size:>7} chunks (written in {filled:.0f} s, index loaded at start in {loaded:.1f} s)"
    )
    for name, (p50, p95) in results.items():
        ratio = f"  {p50 / results['numpy scan'][0]:.1f}x scan" if name != "numpy scan" else ""
        print(f"    {name:<11} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms{ratio}")


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


async def _run(sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="ragmesh-search-bench-") as folder:
        embed, target = await _embed_process(Path(folder) / "embed")
        try:
            print("search: latency through the Search RPC, top_k 10, embedded default")
            for size in sizes:
                await _measure(size, target, rng, Path(folder))
        finally:
            embed.terminate()
            await embed.wait()


def main() -> None:
    sizes = [int(arg) for arg in sys.argv[1:] if arg.isdigit()] or [10_000, 100_000]
    asyncio.run(_run(sizes))


if __name__ == "__main__":
    main()
