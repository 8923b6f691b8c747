"""Qdrant Edge through services.common.vectors at 10k, 100k and 1M points:

    python -m bench.vector_bench [--sizes 10k,100k,1m] [--rounds 3] [--folder DIR]

Per size: upsert rate; the background optimization (duration, and how the event loop and
queries fare while it runs); p50/p95 of a tenant-filtered top-10 for Edge exact, Edge
HNSW and a masked numpy scan of the same vectors, in interleaved rounds; recall@10 of
HNSW against exact; reopen time; RSS and size on disk. Figures are printed, not asserted,
with the load average next to them (the machine is shared).

Vectors look like real embeddings: all-MiniLM-L6-v2 embeddings of Python's documentation
(bench/data/pyref: every paragraph and every 800-character window, about 7k texts),
extended to any size by mixing. Each synthetic vector is w·a + (1-w)·b + e, normalised,
where a and b are two real embeddings drawn at random, w ~ U(0.55, 1), and e is Gaussian
noise drawn with the real embeddings' own covariance (their top 96 principal
components, scaled by 0.45). Queries are the real embeddings of pyref's 80 questions.
The mixture keeps the real vectors' subspace and neighbour structure (a synthetic set of
7k has nearest-neighbour similarities close to the real 7k), which recall depends on;
uniform random vectors would make every HNSW figure meaningless. The real embeddings are
computed once (a few minutes on CPU) and cached under var/bench/.
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from services.common.vectors import EdgeVectorStore, VectorPoint, where

ROOT = Path(__file__).resolve().parents[1]
PYREF = ROOT / "bench" / "data" / "pyref"
CACHE = ROOT / "var" / "bench" / "pyref-minilm.npz"
TENANTS = 10
CHUNKS_PER_DOCUMENT = 20
COLLECTION = "chunks_bench_384"
WRITE_BATCH = 20  # points upserted each second while optimizing: about ingest's pace
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _texts() -> tuple[list[str], list[str]]:
    passages = []
    for line in (PYREF / "corpus.jsonl").open():
        text = json.loads(line)["text"]
        passages += [p.strip()[:1000] for p in text.split("\n\n") if len(p.strip()) > 40]
        passages += [
            text[s : s + 800].strip()
            for s in range(0, len(text), 600)
            if len(text[s : s + 800].strip()) > 200
        ]
    queries = [json.loads(line)["text"] for line in (PYREF / "queries.jsonl").open()]
    return passages, queries


def real_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """(passages, queries) embedded by all-MiniLM-L6-v2, unit length; cached."""
    if CACHE.exists():
        cached = np.load(CACHE)
        return cached["passages"], cached["queries"]
    from services.embed.model import load_model

    passages, queries = _texts()
    print(f"embedding {len(passages)} pyref passages once (cached in {CACHE}) ...", flush=True)
    model = load_model("all-MiniLM-L6-v2", "cpu")
    encoded = [
        model.encode(texts, batch_size=64, normalize_embeddings=True).astype(np.float32)
        for texts in (passages, queries)
    ]
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(CACHE, passages=encoded[0], queries=encoded[1])
    return encoded[0], encoded[1]


def synthesize(real: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` unit vectors mixed from real embeddings (see the module docstring)."""
    rng = np.random.default_rng(seed)
    _, singular, components = np.linalg.svd(real - real.mean(0), full_matrices=False)
    rank = 96
    spread = ((singular[:rank] / np.sqrt(len(real)))[:, None] * components[:rank]).astype(
        np.float32
    )
    out = np.empty((count, real.shape[1]), np.float32)
    for first in range(0, count, 50_000):
        size = min(50_000, count - first)
        a = real[rng.integers(0, len(real), size)]
        b = real[rng.integers(0, len(real), size)]
        w = rng.uniform(0.55, 1.0, (size, 1)).astype(np.float32)
        noise = 0.45 * (rng.standard_normal((size, rank), dtype=np.float32) @ spread)
        mixed = w * a + (1 - w) * b + noise
        out[first : first + size] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    return out


def _ids(count: int) -> list[str]:
    return [str(uuid.UUID(int=i + 1)) for i in range(count)]


def numpy_scan(vectors, mask, query, limit=10):
    """What the in-process index does today (services/ingest/search_index.py): gather the
    matching rows and score them, or score everything when there is no filter."""
    if mask is None:
        selected, scores = None, vectors @ query
    else:
        selected = np.flatnonzero(mask)
        scores = vectors[selected] @ query
    best = np.argpartition(-scores, limit)[:limit]
    best = best[np.argsort(-scores[best])]
    return best if selected is None else selected[best]


def _percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"p50 {statistics.median(ms):7.2f} ms  p95 {ms[int(0.95 * (len(ms) - 1))]:7.2f} ms"


async def _while(work, store, queries, vectors=None) -> dict:
    """Runs `work` while a ticker measures event-loop stalls, queries keep coming and (with
    `vectors`) a writer upserts WRITE_BATCH points a second, as ingest would."""
    stalls, latencies, writes = [], [], []
    done = asyncio.Event()

    async def tick():
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            stalls.append((now - last - 0.01, now))
            last = now

    async def ask():
        k = 0
        while not done.is_set():
            start = time.perf_counter()
            condition = where(tenant=f"t{k % TENANTS}")
            await store.search(COLLECTION, queries[k % len(queries)], condition)
            latencies.append(time.perf_counter() - start)
            k += 1
            await asyncio.sleep(0.02)

    async def write():
        first = len(vectors)
        while not done.is_set():
            batch = [
                VectorPoint(str(uuid.UUID(int=first + i + 1)), vectors[i], {"tenant": "writer"})
                for i in range(WRITE_BATCH)
            ]
            start = time.perf_counter()
            await store.upsert(COLLECTION, batch)
            writes.append(time.perf_counter() - start)
            first += WRITE_BATCH
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(tick()), asyncio.create_task(ask())]
    if vectors is not None:
        tasks.append(asyncio.create_task(write()))
    start = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - start
    done.set()
    await asyncio.gather(*tasks)
    return {"seconds": elapsed, "stalls": stalls, "latencies": latencies, "writes": writes}


def _report(label: str, run: dict, optimization=None) -> None:
    stall, at = max(run["stalls"])
    line = (
        f"  {label}: {len(run['latencies'])} filtered queries {_percentiles(run['latencies'])}"
        f"; longest event-loop stall {stall * 1000:.0f} ms"
    )
    if optimization is not None:
        phases = (
            ("copy", optimization.copy_seconds),
            ("build", optimization.build_seconds),
            ("swap", optimization.swap_seconds),
        )
        ends = np.cumsum([seconds for _, seconds in phases]) + optimization.started
        inside = [name for (name, _), end in zip(phases, ends, strict=True) if at <= end]
        line += f" (in the {inside[0] if inside else 'after'} phase)"
    if run["writes"]:
        line += (
            f"; {len(run['writes'])} upserts of {WRITE_BATCH}, longest {max(run['writes']):.2f} s"
        )
    print(line, flush=True)


async def run_size(count: int, real, queries, rounds: int, folder: Path) -> None:
    print(f"--- {count:,} points, {TENANTS} tenants, 384 dimensions   [{_load()}]", flush=True)
    vectors = synthesize(real, count)
    ids = _ids(count)
    tenants = np.arange(count) % TENANTS
    tags = np.random.default_rng(1).integers(0, 3, count)
    path = folder / f"edge-{count}"
    shutil.rmtree(path, ignore_errors=True)
    rss_before = _rss_mib()
    store = await EdgeVectorStore.open(path, optimize_threshold=0)
    await store.ensure_collection(COLLECTION, 384, ["tenant", "document_id", "tags"])
    start = time.perf_counter()
    for first in range(0, count, 5000):
        await store.upsert(
            COLLECTION,
            [
                VectorPoint(
                    ids[i],
                    vectors[i],
                    {
                        "tenant": f"t{tenants[i]}",
                        "document_id": f"d{i // CHUNKS_PER_DOCUMENT}",
                        "tags": [f"g{tags[i]}"],
                    },
                )
                for i in range(first, min(count, first + 5000))
            ],
        )
    upsert = time.perf_counter() - start
    print(f"upsert: {count / upsert:,.0f} points/s ({upsert:.1f} s)   [{_load()}]", flush=True)

    quiet = await _while(lambda: asyncio.sleep(5), store, queries)
    during = await _while(lambda: store.optimize(COLLECTION), store, queries, vectors)
    status = await store.status(COLLECTION)
    print(
        f"optimize (child process): {during['seconds']:.1f} s = {status.last_optimization}; "
        f"{status.indexed_points:,} of {status.points:,} indexed in {status.segments} "
        f"segments   [{_load()}]"
    )
    print("  (queries are exact until the swap: nothing was indexed before)")
    _report("5 s before it", quiet)
    _report("while it ran", during, status.last_optimization)

    cases = {
        "tenant (10%)": lambda t, g: (tenants == t, where(tenant=f"t{t}")),
        "tenant+tag (3%)": lambda t, g: (
            (tenants == t) & (tags == g),
            where(tenant=f"t{t}", tags=f"g{g}"),
        ),
        "unfiltered": lambda t, g: (None, ()),
    }
    for name, make in cases.items():
        timings: dict[str, list[float]] = {"numpy scan": [], "edge exact": [], "edge auto": []}
        recalls = []
        for round_ in range(rounds):
            for k, query in enumerate(queries):
                mask, condition = make((k + round_) % TENANTS, k % 3)
                start = time.perf_counter()
                numpy_scan(vectors, mask, query)
                timings["numpy scan"].append(time.perf_counter() - start)
                start = time.perf_counter()
                exact = await store.search(COLLECTION, query, condition, exact=True)
                timings["edge exact"].append(time.perf_counter() - start)
                start = time.perf_counter()
                auto = await store.search(COLLECTION, query, condition)
                timings["edge auto"].append(time.perf_counter() - start)
                if round_ == 0:
                    recalls.append(len({p for p, _ in exact} & {p for p, _ in auto}) / 10)
        print(
            f"{name} top-10, {rounds} interleaved rounds of {len(queries)} queries; recall@10 "
            f"of auto vs exact {np.mean(recalls):.4f} (worst query {min(recalls):.1f})"
        )
        for method, samples in timings.items():
            print(f"  {method:11s} {_percentiles(samples)}")
    print(f"  [{_load()}]  (auto: HNSW, with ACORN for tenant+tag)", flush=True)

    rss = _rss_mib()
    await store.close()
    start = time.perf_counter()
    store = await EdgeVectorStore.open(path, optimize_threshold=0)
    reopened = time.perf_counter() - start
    start = time.perf_counter()
    await store.search(COLLECTION, queries[0], where(tenant="t0"))
    first = time.perf_counter() - start
    await store.close()
    print(
        f"reopen {reopened:.2f} s, first query after it {first * 1000:.1f} ms; RSS "
        f"{rss:,.0f} MiB, of which the open store {rss - rss_before:,.0f} MiB (the bench's "
        f"own numpy copy is {vectors.nbytes / 2**20:,.0f} MiB); on disk "
        f"{_disk_mib(path):,.0f} MiB   [{_load()}]",
        flush=True,
    )
    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10k,100k", help="comma-separated: 10k,100k,1m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where shards go (a temp dir)")
    # Known options only: `python -m bench vector` leaves the benchmark names in argv.
    args, _ = parser.parse_known_args(argv)
    sizes = [SIZES[s.strip().lower()] for s in args.sizes.split(",")]
    real, queries = real_embeddings()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="vector-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"vector bench: {len(real)} real embeddings, {len(queries)} real queries   [{_load()}]")
    for count in sizes:
        asyncio.run(run_size(count, real, queries, args.rounds, folder))
    if args.folder is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
