"""Retrieval quality of the ingest service's Search on any BEIR-format folder.

    python -m bench.retrieval_eval [FOLDER] [--ingest HOST:PORT] [--modes keyword,semantic,hybrid]

FOLDER holds corpus.jsonl (_id, title, text), queries.jsonl (_id, text) and
qrels/test.tsv (query-id, corpus-id, score); the default is bench/data/pyref, our own set
written over Python's documentation. Without --ingest, a fresh embed and ingest service
start in-process on a temporary folder. Every corpus entry is uploaded as one document
through the public RPCs; every test query is searched in each mode; nDCG@10 and
Recall@100 are computed at document level (a document scores as its best chunk).
"""

import argparse
import asyncio
import contextlib
import json
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import grpc

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc

DEFAULT_FOLDER = Path(__file__).parent / "data" / "pyref"
MODES = {
    "keyword": ingest_pb2.SEARCH_MODE_KEYWORD,
    "semantic": ingest_pb2.SEARCH_MODE_SEMANTIC,
    "hybrid": ingest_pb2.SEARCH_MODE_HYBRID,
}
TERMINAL = {ingest_pb2.DOCUMENT_STATUS_READY, ingest_pb2.DOCUMENT_STATUS_FAILED}


def load_beir(folder: Path):
    corpus = [json.loads(line) for line in (folder / "corpus.jsonl").open()]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (folder / "queries.jsonl").open())}
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with (folder / "qrels" / "test.tsv").open() as f:
        for line in f:
            qid, did, score = line.rstrip("\n").split("\t")[:3]
            if qid == "query-id":
                continue
            if int(score) > 0:
                qrels[qid][did] = int(score)
    return corpus, {q: t for q, t in queries.items() if q in qrels}, qrels


def ndcg_at(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: list[str], relevant: dict[str, int], k: int = 100) -> float:
    return len(set(ranked[:k]) & set(relevant)) / len(relevant)


async def load_corpus(stub, corpus, concurrency: int = 16) -> dict[str, list[str]]:
    """Uploads every entry; returns document id -> BEIR ids (identical texts share one)."""
    by_document: dict[str, list[str]] = defaultdict(list)
    limiter = asyncio.Semaphore(concurrency)

    async def upload(entry) -> None:
        text = f"{entry.get('title', '')}\n\n{entry['text']}".strip()

        async def messages():
            yield ingest_pb2.UploadDocumentRequest(
                metadata=ingest_pb2.DocumentMetadata(
                    filename=f"{entry['_id']}.txt",
                    mime_type="text/plain",
                    attributes={"beir_id": entry["_id"]},
                )
            )
            yield ingest_pb2.UploadDocumentRequest(data=text.encode())

        async with limiter:
            answer = await stub.UploadDocument(messages())
            by_document[answer.document.id].append(entry["_id"])
            async for update in stub.WatchDocument(
                ingest_pb2.WatchDocumentRequest(document_id=answer.document.id)
            ):
                if update.document.status in TERMINAL:
                    break

    await asyncio.gather(*(upload(entry) for entry in corpus))
    return by_document


async def evaluate(stub, queries, qrels, by_document, modes) -> dict[str, dict[str, float]]:
    results = {}
    for mode in modes:
        ndcgs, recalls, latencies = [], [], []
        for qid, text in queries.items():
            started = time.perf_counter()
            answer = await stub.Search(
                ingest_pb2.SearchRequest(query=text, mode=MODES[mode], top_k=100)
            )
            latencies.append(time.perf_counter() - started)
            ranked: list[str] = []
            for hit in answer.hits:
                for beir_id in by_document.get(hit.document_id, []):
                    if beir_id not in ranked:
                        ranked.append(beir_id)
            ndcgs.append(ndcg_at(ranked, qrels[qid]))
            recalls.append(recall_at(ranked, qrels[qid]))
        latencies.sort()
        results[mode] = {
            "ndcg@10": sum(ndcgs) / len(ndcgs),
            "recall@100": sum(recalls) / len(recalls),
            "p50_ms": latencies[len(latencies) // 2] * 1000,
        }
    return results


@contextlib.asynccontextmanager
async def fresh_mesh():
    """An embed and an ingest service on free ports over a temporary folder."""
    from services.embed import app as embed_app
    from services.embed.settings import EmbedSettings
    from services.ingest import app as ingest_app
    from services.ingest.settings import IngestSettings

    with tempfile.TemporaryDirectory(prefix="ragmesh-eval-") as folder:
        embed = await embed_app.start(EmbedSettings(port=0, data_dir=Path(folder) / "embed"))
        ingest = await ingest_app.start(
            IngestSettings(
                port=0,
                data_dir=Path(folder) / "ingest",
                embed_target=f"127.0.0.1:{embed.server.port}",
            )
        )
        try:
            yield f"127.0.0.1:{ingest.server.port}"
        finally:
            for app in (ingest, embed):
                await app.server.stop(0)
                await app.close()


async def run(folder: Path, target: str | None, modes: list[str]) -> None:
    corpus, queries, qrels = load_beir(folder)
    async with contextlib.AsyncExitStack() as stack:
        if target is None:
            target = await stack.enter_async_context(fresh_mesh())
        channel = await stack.enter_async_context(grpc.aio.insecure_channel(target))
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        started = time.perf_counter()
        by_document = await load_corpus(stub, corpus)
        load_seconds = time.perf_counter() - started
        results = await evaluate(stub, queries, qrels, by_document, modes)
    print(
        f"retrieval on {folder.name}: {len(corpus)} documents loaded in {load_seconds:.0f} s, "
        f"{len(queries)} queries"
    )
    print(f"  {'mode':<10} {'nDCG@10':>8} {'R@100':>8} {'p50 ms':>8}")
    for mode, figures in results.items():
        print(
            f"  {mode:<10} {figures['ndcg@10']:8.3f} {figures['recall@100']:8.3f} "
            f"{figures['p50_ms']:8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--ingest", help="host:port of a running ingest service")
    parser.add_argument("--modes", default="keyword,semantic,hybrid")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    asyncio.run(run(args.folder, args.ingest, modes))


if __name__ == "__main__":
    main()
