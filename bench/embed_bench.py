"""Embed service vs direct SentenceTransformer.encode: large batches and concurrent callers."""

import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "data model server vector query document search index token batch chunk cache page "
    "network memory thread engine storage latency request answer question system"
).split()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def service(name: str, env: dict[str, str]):
    """Runs `python -m services.<name>` and yields its process once it reports SERVING."""
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)


async def wait_serving(target: str, patience: float = 180.0) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{target} did not become SERVING")


def start_embed(port: int, data_dir: str):
    return service(
        "embed",
        {
            "RAGMESH_EMBED_PORT": str(port),
            "RAGMESH_EMBED_DATA_DIR": data_dir,
            "RAGMESH_EMBED_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
        },
    )


def long_texts(count: int, words: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(count)]


async def _measure(target: str, model, chunks: list[str], sentences: list[str]) -> dict:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        await stub.Embed(embed_pb2.EmbedRequest(texts=chunks[:4]))
        started = time.perf_counter()
        await stub.Embed(embed_pb2.EmbedRequest(texts=chunks, normalize=True))
        service_batch = time.perf_counter() - started

        started = time.perf_counter()
        for first in range(0, len(sentences), 32):
            await asyncio.gather(
                *(
                    stub.Embed(embed_pb2.EmbedRequest(texts=[s], normalize=True))
                    for s in sentences[first : first + 32]
                )
            )
        service_concurrent = time.perf_counter() - started
        stats = await stub.GetStats(embed_pb2.GetStatsRequest())

    model.encode(chunks[:4])
    started = time.perf_counter()
    model.encode(chunks, normalize_embeddings=True)
    direct_batch = time.perf_counter() - started
    started = time.perf_counter()
    for sentence in sentences:
        model.encode([sentence], normalize_embeddings=True)
    direct_single = time.perf_counter() - started
    return {
        "service_batch": service_batch,
        "direct_batch": direct_batch,
        "service_concurrent": service_concurrent,
        "direct_single": direct_single,
        "mean_batch": stats.mean_batch_size,
    }


def main() -> None:
    from services.embed.model import load_model

    chunks = long_texts(128, 250)  # about 256 model tokens each
    sentences = [
        f"Sentence {n}: {' '.join(long_texts(1, 10, seed=n)[0].split())}." for n in range(128)
    ]
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir, start_embed(port, data_dir) as process:
        asyncio.run(wait_serving(f"127.0.0.1:{port}"))
        model = load_model("all-MiniLM-L6-v2", "cpu")
        result = asyncio.run(_measure(f"127.0.0.1:{port}", model, chunks, sentences))
        rss = peak_rss_mib(process.pid)
    n, m = len(chunks), len(sentences)
    print("embed service vs direct SentenceTransformer.encode (same texts, same run)")
    print(
        f"  {n} chunks of ~256 tokens, one batch: service {n / result['service_batch']:.1f}/s,"
        f" direct {n / result['direct_batch']:.1f}/s,"
        f" ratio {result['direct_batch'] / result['service_batch']:.2f}x (aim >= 0.95x)"
    )
    print(
        f"  {m} sentences, 32 concurrent callers: service "
        f"{m / result['service_concurrent']:.1f}/s vs one by one "
        f"{m / result['direct_single']:.1f}/s, ratio "
        f"{result['direct_single'] / result['service_concurrent']:.2f}x (aim >= 4x);"
        f" mean batch {result['mean_batch']:.1f}"
    )
    print(f"  embed service peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
