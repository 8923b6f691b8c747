"""Embed service vs direct ONNX Runtime on the same texts; the torch backend beside them.

Three embed processes run at once, idle but for the one being measured: the default
(ONNX, one pass per batch, onnxruntime's threads on every core), ONNX with
COMPUTE_THREADS=2 (a batch split into two shards, one onnxruntime thread each) and
BACKEND=torch (one shard per core, one torch thread each). The direct baseline is
`OnnxBackend.encode` on the export the service loads, in this process, with
onnxruntime's default threads and with one (the faster counts); the bench's chunks and
sentences are each of about one length, so it runs every batch as one pass. Variants are
interleaved round by round, so all see the same machine; each figure is the best of its
rounds.
"""

import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.clients import wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-MiniLM-L6-v2"
# The export `make run` uses; made here first if it is not there yet.
MODELS_DIR = ROOT / "var" / "models"
CALLERS = 32
BATCH = 32  # MAX_BATCH_SIZE's default: direct calls get the same batches
ROUNDS = 3  # best of, for concurrent callers and single queries
BATCH_ROUNDS = 2  # best of, for the large batch
QUERIES = 40  # one after another, for the single-query p50
SERVICES = {
    "onnx": {},
    "onnx, 2 shards": {"RAGMESH_EMBED_COMPUTE_THREADS": "2"},
    "torch": {"RAGMESH_EMBED_BACKEND": "torch"},
}
WORDS = (
    "data model server vector query document search index token batch chunk cache page "
    "network memory thread engine storage latency request answer question system"
).split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def embed_service(data_dir: str, env: dict[str, str]):
    """Runs `python -m services.embed`; yields (target, process)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.embed"],
        cwd=ROOT,
        env={
            **os.environ,
            "RAGMESH_EMBED_PORT": str(port),
            "RAGMESH_EMBED_DATA_DIR": data_dir,
            "RAGMESH_EMBED_MODELS_DIR": str(MODELS_DIR),
            "RAGMESH_EMBED_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(timeout=60)


def long_texts(count: int, words: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


def batches(texts: list[str]) -> list[list[str]]:
    return [texts[start : start + BATCH] for start in range(0, len(texts), BATCH)]


async def service_batch(stub, chunks: list[str]) -> float:
    started = time.perf_counter()
    await stub.Embed(embed_pb2.EmbedRequest(texts=chunks, normalize=True))
    return time.perf_counter() - started


async def service_concurrent(stub, sentences: list[str]) -> tuple[float, int]:
    """32 concurrent callers, one sentence per call, in waves: each wave waits for all 32.

    Also how many forward passes the service ran for them.
    """
    before = await stub.GetStats(embed_pb2.GetStatsRequest())
    started = time.perf_counter()
    for wave in batches(sentences):
        await asyncio.gather(
            *(stub.Embed(embed_pb2.EmbedRequest(texts=[s], normalize=True)) for s in wave)
        )
    seconds = time.perf_counter() - started
    after = await stub.GetStats(embed_pb2.GetStatsRequest())
    return seconds, after.batches - before.batches


async def service_single(stub, queries: list[str]) -> float:
    """p50 of one short query at a time."""
    times = []
    for query in queries:
        started = time.perf_counter()
        await stub.Embed(
            embed_pb2.EmbedRequest(texts=[query], kind=embed_pb2.EMBED_KIND_QUERY, normalize=True)
        )
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def direct_batches(backend, texts: list[str]) -> float:
    started = time.perf_counter()
    for batch in batches(texts):
        backend.encode(batch)
    return time.perf_counter() - started


def direct_single(backend, queries: list[str]) -> float:
    times = []
    for query in queries:
        started = time.perf_counter()
        backend.encode([query])
        times.append(time.perf_counter() - started)
    return float(np.median(times))


async def measure(stubs: dict, directs: dict, chunks, sentences, queries) -> dict:
    """Best of the rounds for every variant, the variants interleaved within each round."""
    times: dict[tuple[str, str], list[float]] = {}
    passes: dict[str, int] = {}

    def record(variant: str, case: str, seconds: float) -> None:
        times.setdefault((variant, case), []).append(seconds)

    for round_ in range(ROUNDS):
        for name, stub in stubs.items():
            seconds, count = await service_concurrent(stub, sentences)
            record(name, "concurrent", seconds)
            passes[name] = passes.get(name, 0) + count
            record(name, "single", await service_single(stub, queries))
            if round_ < BATCH_ROUNDS:
                record(name, "batch", await service_batch(stub, chunks))
        for name, backend in directs.items():
            record(name, "concurrent", direct_batches(backend, sentences))
            record(name, "single", direct_single(backend, queries))
            if round_ < BATCH_ROUNDS:
                record(name, "batch", direct_batches(backend, chunks))
    result: dict = {key: min(values) for key, values in times.items()}
    for name, count in passes.items():
        result[name, "mean batch"] = ROUNDS * len(sentences) / count
    return result


async def service_vectors(stub, texts: list[str]) -> np.ndarray:
    vectors = []
    for batch in batches(texts):
        reply = await stub.Embed(embed_pb2.EmbedRequest(texts=batch, normalize=True))
        vectors.extend(e.values for e in reply.embeddings)
    return np.array(vectors, dtype=np.float32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(axis=1).min())  # both of unit length


async def run(stubs: dict, directs: dict, chunks, sentences, queries) -> tuple[dict, dict]:
    channels = {name: grpc.aio.insecure_channel(target) for name, target in stubs.items()}
    try:
        stubs = {name: embed_pb2_grpc.EmbedServiceStub(ch) for name, ch in channels.items()}
        for stub in stubs.values():  # a first call on each channel, outside the figures
            await stub.Embed(embed_pb2.EmbedRequest(texts=chunks[:4]))
        for backend in directs.values():
            backend.encode(chunks[:4])
        result = await measure(stubs, directs, chunks, sentences, queries)
        texts = chunks + sentences
        torch = await service_vectors(stubs["torch"], texts)
        agreement = {"onnx": min_cosine(await service_vectors(stubs["onnx"], texts), torch)}
    finally:
        for channel in channels.values():
            await channel.close()
    int8 = np.concatenate([directs["direct int8, 1 thread"].encode(b)[0] for b in batches(texts)])
    agreement["int8"] = min_cosine(int8, torch)
    return result, agreement


def main() -> None:
    from services.embed.onnx_backend import OnnxBackend
    from services.embed.provision import provision

    folder = provision(MODEL, MODELS_DIR)
    chunks = long_texts(128, 250)  # about 256 model tokens each
    sentences = [f"Sentence {n}: {long_texts(1, 10, seed=n)[0]}." for n in range(128)]
    queries = [f"how does the {w} {v} work?" for w, v in zip(WORDS, reversed(WORDS), strict=True)]
    queries = (queries * 2)[:QUERIES]
    directs = {
        "direct, default threads": OnnxBackend(folder, "fp32", threads=0),
        "direct, 1 thread": OnnxBackend(folder, "fp32", threads=1),
        "direct int8, default threads": OnnxBackend(folder, "int8", threads=0),
        "direct int8, 1 thread": OnnxBackend(folder, "int8", threads=1),
    }
    # Other work on the machine skews every side; the load says how much.
    load_before = " ".join(f"{value:.1f}" for value in os.getloadavg())
    with tempfile.TemporaryDirectory() as data_dir, ExitStack() as stack:
        started = {
            name: stack.enter_context(embed_service(f"{data_dir}/{i}", env))
            for i, (name, env) in enumerate(SERVICES.items())
        }

        async def ready() -> None:
            await asyncio.gather(*(wait_until_serving(t, 300) for t, _ in started.values()))

        asyncio.run(ready())
        ready_rss = {name: rss_mib(process.pid, "VmRSS") for name, (_, process) in started.items()}
        targets = {name: target for name, (target, _) in started.items()}
        result, agreement = asyncio.run(run(targets, directs, chunks, sentences, queries))
        peak_rss = {name: rss_mib(process.pid, "VmHWM") for name, (_, process) in started.items()}
    load_after = " ".join(f"{value:.1f}" for value in os.getloadavg())
    rss = {name: (ready_rss[name], peak_rss[name]) for name in SERVICES}
    report(result, agreement, rss, directs, len(chunks), len(sentences), load_before, load_after)


def report(result, agreement, rss, directs, n, m, load_before, load_after) -> None:
    def best_direct(case: str, precision: str = "") -> float:
        prefix = f"direct{' ' + precision if precision else ''},"
        return min(result[name, case] for name in directs if name.startswith(prefix))

    print(
        f"embed service vs direct ONNX Runtime (fp32; same texts, same run; best of {ROUNDS}"
        f" / {BATCH_ROUNDS} interleaved rounds; load average {load_before} before,"
        f" {load_after} after, on {os.cpu_count()} cores)"
    )
    direct = best_direct("batch")
    print(f"  {n} chunks of ~256 tokens, one request (direct: batches of {BATCH}):")
    for name in SERVICES:
        seconds = result[name, "batch"]
        print(f"    service {name:<14} {n / seconds:6.1f}/s  {direct / seconds:.2f}x direct")
    print(f"    direct fp32            {n / direct:6.1f}/s  (aim: service onnx >= 0.95x)")
    direct = best_direct("concurrent")
    print(f"  {m} sentences, {CALLERS} concurrent one-sentence callers vs direct batches:")
    for name in SERVICES:
        seconds = result[name, "concurrent"]
        print(
            f"    service {name:<14} {m / seconds:6.1f}/s  {direct / seconds:.2f}x direct,"
            f" mean batch {result[name, 'mean batch']:.1f}"
        )
    print(f"    direct fp32            {m / direct:6.1f}/s  (aim: service onnx >= 0.9x)")
    print("  one short query at a time, p50:")
    for name in SERVICES:
        print(f"    service {name:<14} {result[name, 'single'] * 1000:6.2f} ms")
    print(f"    direct fp32            {best_direct('single') * 1000:6.2f} ms")
    print(
        f"  int8 (ONNX_PRECISION=int8), direct: chunks"
        f" {best_direct('batch') / best_direct('batch', 'int8'):.2f}x fp32, sentences"
        f" {best_direct('concurrent') / best_direct('concurrent', 'int8'):.2f}x, single query"
        f" {best_direct('single', 'int8') * 1000:.2f} ms"
    )
    print(
        f"  min cosine to the torch service's vectors ({n + m} texts): service onnx"
        f" {agreement['onnx']:.7f} (aim >= 0.99999), int8 {agreement['int8']:.4f}"
    )
    print("  RSS once serving / peak (the peak is while 32 chunks of 256 tokens run):")
    for name, (ready, peak) in rss.items():
        print(f"    service {name:<14} {ready:6.0f} / {peak:.0f} MiB")


if __name__ == "__main__":
    main()
