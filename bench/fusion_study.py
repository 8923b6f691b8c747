"""Which hybrid fusion to use: every variant on the same two channel runs of every set.

    python -m bench.fusion_study [--sets pyref,curlref] [--state var/fusion_study]
                                 [--depth 50] [--refresh] [--edge]

For each set (a BEIR folder under bench/data), the corpus is uploaded once through the
public RPCs to an embed and an ingest service started in-process over a folder kept in
--state, and every query is searched in SEARCH_MODE_KEYWORD and SEARCH_MODE_SEMANTIC
(top_k 100, scores kept). The runs are cached in --state/<set>.runs.json, so later
calls start no service and only fuse; --refresh searches again (the uploaded corpus is
kept; delete the folder to upload again).

Each fusion is then applied to the top --depth chunks of each channel (50 is what the
service fuses for top_k 10: max(3 * top_k, 50) candidates per channel), and scored by
nDCG@10 at document level as bench/retrieval_eval does (a document ranks at its best
chunk). Every variant uses the same parameters on every set. The table gives each
variant's nDCG@10 per set, its margin over the better single channel of that set, and
the worse of those margins, which is what a variant is picked by.

The variants: RRF (k 1 to 100), convex combinations over min-max, z-score and
top-ratio normalised scores (semantic weight 0.3 to 0.8), Qdrant's DBSF, and
query-adaptive weightings (by each channel's steepness or top z-score, or by whether the
query names an identifier). top_ratio_fusion below is the function proposed for
services/ingest/search.py, run verbatim.

--edge also runs Qdrant Edge's own Fusion.Rrf and Fusion.Dbsf (qdrant-edge-py) over
Prefetches that return exactly the same two lists, to show they compute what our rrf
and dbsf functions here do (up to the order of equal scores).
"""

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.retrieval_eval import load_beir, load_corpus, ndcg_at

DATA = Path(__file__).parent / "data"
DEFAULT_STATE = Path(__file__).parent.parent / "var" / "fusion_study"
TOP_K = 100

Run = list[tuple[str, float]]  # (chunk id, score), best first

# --- collecting the channel runs -----------------------------------------------------


@contextlib.asynccontextmanager
async def mesh(folder: Path):
    """An embed and an ingest service on free ports over `folder` (kept between calls)."""
    from services.embed import app as embed_app
    from services.embed.settings import EmbedSettings
    from services.ingest import app as ingest_app
    from services.ingest.settings import IngestSettings

    embed = await embed_app.start(EmbedSettings(port=0, data_dir=folder / "embed"))
    ingest = await ingest_app.start(
        IngestSettings(
            port=0, data_dir=folder / "ingest", embed_target=f"127.0.0.1:{embed.server.port}"
        )
    )
    try:
        yield f"127.0.0.1:{ingest.server.port}"
    finally:
        for app in (ingest, embed):
            await app.server.stop(0)
            await app.close()


async def search_all(stub, queries: dict[str, str]) -> dict[str, dict[str, list]]:
    from ragmesh.ingest.v1 import ingest_pb2

    modes = {"keyword": ingest_pb2.SEARCH_MODE_KEYWORD, "semantic": ingest_pb2.SEARCH_MODE_SEMANTIC}
    runs: dict[str, dict[str, list]] = {}
    for qid, text in queries.items():
        runs[qid] = {"text": text}
        for name, mode in modes.items():
            answer = await stub.Search(ingest_pb2.SearchRequest(query=text, mode=mode, top_k=TOP_K))
            runs[qid][name] = [[hit.chunk_id, hit.document_id, hit.score] for hit in answer.hits]
    return runs


async def collect(folder: Path, state: Path, refresh: bool) -> dict:
    """The cached runs of one set, searching (and uploading) only what is missing."""
    import grpc

    from ragmesh.ingest.v1 import ingest_pb2_grpc

    corpus, queries, _ = load_beir(folder)
    cache = state / f"{folder.name}.runs.json"
    cached = json.loads(cache.read_text()) if cache.exists() and not refresh else {"runs": {}}
    missing = {
        qid: text
        for qid, text in queries.items()
        if cached["runs"].get(qid, {}).get("text") != text
    }
    if not missing:
        return cached
    home = state / f"{folder.name}.mesh"
    uploaded = home / "documents.json"
    async with mesh(home) as target, grpc.aio.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        if not uploaded.exists():
            started = time.perf_counter()
            by_document = await load_corpus(stub, corpus)
            uploaded.write_text(json.dumps(by_document))
            seconds = time.perf_counter() - started
            print(f"{folder.name}: {len(corpus)} passages uploaded in {seconds:.0f} s")
        started = time.perf_counter()
        cached["runs"].update(await search_all(stub, missing))
        seconds = time.perf_counter() - started
        print(f"{folder.name}: {len(missing)} queries searched in {seconds:.0f} s")
    cached["by_document"] = json.loads(uploaded.read_text())
    cache.write_text(json.dumps(cached))
    return cached


# --- fusions ---------------------------------------------------------------------------
# Each takes the two channel runs (already cut to --depth) and the query text and returns
# chunk id -> fused score; higher is better.

Fusion = Callable[[Run, Run, str], dict[str, float]]


def min_max(run: Run) -> dict[str, float]:
    scores = [s for _, s in run]
    low, high = min(scores), max(scores)
    return {c: (s - low) / (high - low) if high > low else 1.0 for c, s in run}


def z_scores(run: Run) -> dict[str, float]:
    scores = [s for _, s in run]
    mean = statistics.fmean(scores)
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return {c: (s - mean) / std if std > 0 else 0.0 for c, s in run}


def top_ratio(run: Run) -> dict[str, float]:
    """Each score as a fraction of the channel's top score (negative scores count as 0).
    Unlike min-max it keeps the channel's own contrast: a BM25 list whose top hit stands
    far above the rest stays steep, a cosine list whose hits are all alike stays flat."""
    top = run[0][1]
    return {c: max(s, 0.0) / top if top > 0 else 1.0 for c, s in run}


def distribution(run: Run) -> dict[str, float]:
    """Qdrant's DBSF normalisation: (s - (mean - 3 std)) / 6 std, sample std, no clipping;
    a single hit scores 0.5."""
    if len(run) < 2:
        return {c: 0.5 for c, _ in run}
    scores = [s for _, s in run]
    mean, std = statistics.fmean(scores), statistics.stdev(scores)
    low, high = mean - 3 * std, mean + 3 * std
    return {c: (s - low) / (high - low) if high > low else 0.5 for c, s in run}


def weighted_sum(parts: list[tuple[float, dict[str, float], float]]) -> dict[str, float]:
    """Sum of weight * normalised score; a chunk a channel did not return gets that
    channel's `missing` value."""
    keys = set().union(*(scores for _, scores, _ in parts))
    return {k: sum(w * scores.get(k, missing) for w, scores, missing in parts) for k in keys}


def convex(alpha: float, normalise=min_max, missing_at_min: bool = True) -> Fusion:
    """alpha * semantic + (1 - alpha) * keyword over normalised scores (the service's
    convex_fusion is min-max with a missing chunk at the channel's minimum, 0)."""

    def fuse(keyword: Run, semantic: Run, query: str) -> dict[str, float]:
        parts = []
        for weight, run in ((1 - alpha, keyword), (alpha, semantic)):
            if run:
                scores = normalise(run)
                parts.append((weight, scores, min(scores.values()) if missing_at_min else 0.0))
        return weighted_sum(parts) if parts else {}

    return fuse


def top_ratio_fusion(
    keyword: list[tuple[str, float]], semantic: list[tuple[str, float]], semantic_weight: float
) -> dict[str, float]:
    """The function proposed for services/ingest/search.py, verbatim: weight * semantic +
    (1 - weight) * keyword, each score divided by its channel's top score; a chunk one
    channel did not return counts as that channel's lowest ratio.

    Dividing by the top (not min-max) keeps each channel's own contrast for this query: a
    BM25 list whose first hit matches a rare identifier stays steep and decides the order,
    a cosine list whose hits are all alike stays flat and only reorders them.
    """
    channels = []
    for weight, run in ((1.0 - semantic_weight, keyword), (semantic_weight, semantic)):
        if not run:
            continue
        top = max(score for _, score in run)
        ratios = {key: max(score, 0.0) / top if top > 0 else 1.0 for key, score in run}
        channels.append((weight, ratios, min(ratios.values())))
    keys = set().union(*(ratios for _, ratios, _ in channels))
    return {
        key: sum(weight * ratios.get(key, floor) for weight, ratios, floor in channels)
        for key in keys
    }


def dbsf(keyword: Run, semantic: Run, query: str) -> dict[str, float]:
    """Qdrant's Fusion.Dbsf: distribution-normalised scores summed, a missing chunk adds 0."""
    return weighted_sum([(1.0, distribution(run), 0.0) for run in (keyword, semantic) if run])


def rrf(k: int, semantic_weight: float = 0.5) -> Fusion:
    """sum of w / (k + rank), ranks from 1; weights 2 * (1 - s), 2 * s (1, 1 when even)."""

    def fuse(keyword: Run, semantic: Run, query: str) -> dict[str, float]:
        fused: dict[str, float] = {}
        for weight, run in ((2 * (1 - semantic_weight), keyword), (2 * semantic_weight, semantic)):
            for rank, (key, _) in enumerate(run, start=1):
                fused[key] = fused.get(key, 0.0) + weight / (k + rank)
        return fused

    return fuse


# Query-adaptive weights ---------------------------------------------------------------


def steepness(run: Run, at: int = 10) -> float:
    """How far the top hit stands out: (s1 - s_at) / (s1 - s_last), 0..1; a channel with
    a clear winner is steep, a flat list is not."""
    if len(run) < 2:
        return 0.0
    first, last = run[0][1], run[-1][1]
    nth = run[min(at, len(run)) - 1][1]
    return (first - nth) / (first - last) if first > last else 0.0


def top_z(run: Run) -> float:
    """The top hit's z-score within its own list."""
    if len(run) < 2:
        return 0.0
    return max(0.0, z_scores(run)[run[0][0]])


def adaptive(confidence: Callable[[Run], float], prior: float = 0.5) -> Fusion:
    """Convex min-max fusion whose semantic weight is the prior shifted by each channel's
    confidence, read off its own scores for this query:
    alpha = p * conf(semantic) / (p * conf(semantic) + (1 - p) * conf(keyword))."""

    def fuse(keyword: Run, semantic: Run, query: str) -> dict[str, float]:
        ck, cs = confidence(keyword), confidence(semantic)
        total = prior * cs + (1 - prior) * ck
        alpha = prior * cs / total if total > 0 else prior
        return convex(alpha)(keyword, semantic, query)

    return fuse


_IDENTIFIER = re.compile(
    r"(^|\s)-{1,2}[A-Za-z]|\w_\w|[A-Za-z]\d|\d[A-Za-z]|\b\d+\b|[a-z][A-Z]|\b[A-Z]{3,}\b|[.(]\w"
)


def looks_exact(query: str) -> bool:
    """Whether the query names something to match exactly: a flag, an identifier with _ or
    camelCase or digits, a number, an all-caps name, a dotted or called name."""
    return bool(_IDENTIFIER.search(query))


def by_query_shape(exact_alpha: float, plain_alpha: float) -> Fusion:
    def fuse(keyword: Run, semantic: Run, query: str) -> dict[str, float]:
        alpha = exact_alpha if looks_exact(query) else plain_alpha
        return convex(alpha)(keyword, semantic, query)

    return fuse


def variants() -> dict[str, Fusion]:
    found: dict[str, Fusion] = {}
    for k in (1, 10, 20, 40, 60, 100):
        found[f"rrf k={k}" + (" (=Qdrant default k=2)" if k == 1 else "")] = rrf(k)
    for alpha in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        found[f"minmax a={alpha}" + (" (current)" if alpha == 0.7 else "")] = convex(alpha)
    for alpha in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        found[f"zscore a={alpha}"] = convex(alpha, z_scores)
    for alpha in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        found[f"top-ratio a={alpha}"] = convex(alpha, top_ratio)
    found["top-ratio a=0.7, missing=0"] = convex(0.7, top_ratio, missing_at_min=False)
    found["top_ratio_fusion(w=0.7) (proposed)"] = lambda k, s, q: top_ratio_fusion(k, s, 0.7)
    found["dbsf (Qdrant)"] = dbsf
    for alpha in (0.4, 0.6):
        found[f"dbsf a={alpha}"] = convex(alpha, distribution, missing_at_min=False)
    for prior in (0.5, 0.7):
        found[f"adaptive: steepness@10, prior {prior}"] = adaptive(steepness, prior)
        found[f"adaptive: top z-score, prior {prior}"] = adaptive(top_z, prior)
    for exact, plain in ((0.3, 0.7), (0.4, 0.7), (0.5, 0.7)):
        found[f"shape: a={exact} exact / {plain} plain"] = by_query_shape(exact, plain)
    return found


# --- scoring ---------------------------------------------------------------------------


def documents(ranked_chunks: list[str], chunk_document: dict[str, str], by_document) -> list[str]:
    ranked: list[str] = []
    for chunk in ranked_chunks:
        for beir_id in by_document.get(chunk_document[chunk], []):
            if beir_id not in ranked:
                ranked.append(beir_id)
    return ranked


def per_query(cached: dict, qrels, fusion: Fusion | str, depth: int) -> dict[str, float]:
    by_document = cached["by_document"]
    scores = {}
    for qid, run in cached["runs"].items():
        if qid not in qrels:
            continue
        chunk_document = {c: d for c, d, _ in run["keyword"] + run["semantic"]}
        if isinstance(fusion, str):  # one channel alone, as its own mode returns it
            ranked = [c for c, _, _ in run[fusion]]
        else:
            keyword = [(c, s) for c, _, s in run["keyword"][:depth]]
            semantic = [(c, s) for c, _, s in run["semantic"][:depth]]
            fused = fusion(keyword, semantic, run["text"])
            ranked = sorted(fused, key=lambda c: (-fused[c], c))
        scores[qid] = ndcg_at(documents(ranked, chunk_document, by_document), qrels[qid])
    return scores


def bootstrap(differences: list[float], rounds: int = 2000, seed: int = 7) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(
        statistics.fmean(rng.choices(differences, k=len(differences))) for _ in range(rounds)
    )
    return means[int(0.025 * rounds)], means[int(0.975 * rounds)]


# --- Qdrant Edge -----------------------------------------------------------------------


def edge_check(cached: dict, qrels, depth: int) -> list[tuple]:
    """Puts each query's two lists into a Qdrant Edge shard as sparse vectors (dimension =
    query number, value = the channel's score), so a Prefetch on that dimension returns
    exactly that list; then fuses with Edge's Fusion.Rrf(k=k + 1) (Edge ranks from 0) and
    Fusion.Dbsf. Returns (Edge fusion, our equivalent, nDCG@10 per query, the largest
    fused-score difference from our function applied to the lists as Edge's prefetches
    order them, the same against our function on the service's lists, and the number of
    queries whose top 10 documents differ from ours)."""
    import qdrant_edge as edge

    qids = [q for q in cached["runs"] if q in qrels]
    vectors: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for n, qid in enumerate(qids):
        for channel in ("keyword", "semantic"):
            for chunk, _, score in cached["runs"][qid][channel][:depth]:
                indices, values = vectors.setdefault(chunk, {}).setdefault(channel, ([], []))
                indices.append(n)
                values.append(score)
    ids = {chunk: i for i, chunk in enumerate(vectors)}
    chunks = list(vectors)
    ours = {"rrf k=60": rrf(60), "rrf k=1": rrf(1), "dbsf (Qdrant)": dbsf}
    results = []
    with tempfile.TemporaryDirectory(prefix="fusion-edge-") as folder:
        shard = edge.EdgeShard.create(
            folder,
            edge.EdgeConfig(
                sparse_vectors={
                    "keyword": edge.EdgeSparseVectorParams(),
                    "semantic": edge.EdgeSparseVectorParams(),
                }
            ),
        )
        points = [
            edge.Point(
                ids[chunk],
                {ch: edge.SparseVector(ix, vals) for ch, (ix, vals) in channels.items()},
            )
            for chunk, channels in vectors.items()
        ]
        for start in range(0, len(points), 1000):
            shard.update(edge.UpdateOperation.upsert_points(points[start : start + 1000]))
        for name, query, equivalent in (
            ("edge Fusion.Rrf(k=61)", edge.Fusion.Rrf(k=61), "rrf k=60"),
            ("edge Fusion.Rrf(k=2) default", edge.Fusion.Rrf(k=2), "rrf k=1"),
            ("edge Fusion.Dbsf()", edge.Fusion.Dbsf(), "dbsf (Qdrant)"),
        ):
            scores, worst, formula, differ = {}, 0.0, 0.0, 0
            for n, qid in enumerate(qids):
                prefetches = [
                    edge.Prefetch(
                        limit=depth,
                        query=edge.Query.Nearest(edge.SparseVector([n], [1.0]), using=channel),
                    )
                    for channel in ("keyword", "semantic")
                ]
                request = edge.QueryRequest(limit=2 * depth, query=query, prefetches=prefetches)
                fused = {chunks[hit.id]: hit.score for hit in shard.query(request)}
                run = cached["runs"][qid]
                mine = ours[equivalent](
                    [(c, s) for c, _, s in run["keyword"][:depth]],
                    [(c, s) for c, _, s in run["semantic"][:depth]],
                    run["text"],
                )
                # The formula, on the lists in the order Edge's own prefetches return them
                # (equal scores may come in another order than the service gave them).
                lists = [
                    [
                        (chunks[h.id], h.score)
                        for h in shard.query(
                            edge.QueryRequest(limit=depth, query=p.query, prefetches=None)
                        )
                    ]
                    for p in prefetches
                ]
                on_edge_lists = ours[equivalent](lists[0], lists[1], run["text"])
                formula = max([formula] + [abs(fused[c] - v) for c, v in on_edge_lists.items()])
                worst = max([worst] + [abs(fused.get(c, 0.0) - v) for c, v in mine.items()])
                chunk_document = {c: d for c, d, _ in run["keyword"] + run["semantic"]}
                ranked = documents(list(fused), chunk_document, cached["by_document"])
                mine_ranked = documents(
                    sorted(mine, key=lambda c: (-mine[c], c)), chunk_document, cached["by_document"]
                )
                differ += ranked[:10] != mine_ranked[:10]
                scores[qid] = ndcg_at(ranked, qrels[qid])
            results.append((name, equivalent, scores, formula, worst, differ))
        shard.close()
    return results


# --- report ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="pyref,curlref")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--refresh", action="store_true")
    parser.add_argument("--edge", action="store_true")
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    folders = [Path(n) if Path(n).is_dir() else DATA / n for n in args.sets.split(",")]
    sets = [folder.name for folder in folders]
    data, qrels_of = {}, {}
    for folder in folders:
        data[folder.name] = asyncio.run(collect(folder, args.state, args.refresh))
        qrels_of[folder.name] = load_beir(folder)[2]

    table: dict[str, dict[str, dict[str, float]]] = {}
    for channel in ("keyword", "semantic"):
        table[channel] = {s: per_query(data[s], qrels_of[s], channel, args.depth) for s in sets}
    for name, fusion in variants().items():
        table[name] = {s: per_query(data[s], qrels_of[s], fusion, args.depth) for s in sets}
    edge_notes = []
    if args.edge:
        for s in sets:
            for name, equivalent, scores, formula, worst, differ in edge_check(
                data[s], qrels_of[s], args.depth
            ):
                table.setdefault(name, {})[s] = scores
                edge_notes.append(
                    f"  {s}: {name} = our {equivalent} within {formula:.0e} on the lists as "
                    f"Edge orders them; on the service's order within {worst:.0e}, top 10 "
                    f"documents differ on {differ} of {len(scores)} queries"
                )

    mean = {
        name: {s: statistics.fmean(q.values()) for s, q in row.items()}
        for name, row in table.items()
    }
    better = {s: max(mean["keyword"][s], mean["semantic"][s]) for s in sets}
    better_name = {
        s: "keyword" if mean["keyword"][s] >= mean["semantic"][s] else "semantic" for s in sets
    }
    counts = ", ".join(f"{s} {len(qrels_of[s])} queries" for s in sets)
    print(f"nDCG@10 (document level), fusing the top {args.depth} chunks of each channel; {counts}")
    head = "".join(f"{s:>10}" for s in sets) + "".join(f"{'+' + s:>11}" for s in sets)
    print(f"{'variant':<38}{head}{'worse':>8}")
    for name, row in mean.items():
        margins = [row[s] - better[s] for s in sets]
        cells = "".join(f"{row[s]:10.3f}" for s in sets)
        gains = "".join(f"{100 * m:+11.1f}" for m in margins)
        worst = "" if name in ("keyword", "semantic") else f"{100 * min(margins):+8.1f}"
        print(f"{name:<38}{cells}{gains if worst else ' ' * len(gains)}{worst}")
    fused = [n for n in mean if n not in ("keyword", "semantic") and not n.startswith("edge")]

    def rank(name: str) -> tuple[float, float]:  # the worse margin, then the mean margin
        margins = [mean[name][s] - better[s] for s in sets]
        return round(min(margins), 3), statistics.fmean(margins)

    best = max(fused, key=rank)
    print(f"\nbest by the worse margin (ties by the mean margin): {best}")
    for s in sets:
        diffs = [table[best][s][q] - table[better_name[s]][s][q] for q in table[best][s]]
        low, high = bootstrap(diffs)
        wins = sum(d > 1e-9 for d in diffs)
        losses = sum(d < -1e-9 for d in diffs)
        print(
            f"  {s}: {100 * statistics.fmean(diffs):+.1f} points over {better_name[s]} "
            f"(95% bootstrap {100 * low:+.1f} to {100 * high:+.1f}; {wins} queries better, "
            f"{losses} worse)"
        )
    if edge_notes:
        print("\nQdrant Edge (qdrant-edge-py) over Prefetches returning the same two lists:")
        print("\n".join(edge_notes))


if __name__ == "__main__":
    main()
