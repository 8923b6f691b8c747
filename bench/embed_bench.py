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

from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.clients import wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
CALLERS = 32
ROUNDS = 3  # best of, for the concurrent callers and their one-by-one baseline
BATCH_ROUNDS = 2  # best of, for the large batch and its direct encode
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


async def _service_batch(stub, chunks: list[str]) -> float:
    started = time.perf_counter()
    await stub.Embed(embed_pb2.EmbedRequest(texts=chunks, normalize=True))
    return time.perf_counter() - started


async def _service_concurrent(stub, sentences: list[str]) -> float:
    """32 concurrent callers, one sentence per call, in waves: each wave waits for all 32."""
    started = time.perf_counter()
    for first in range(0, len(sentences), CALLERS):
        await asyncio.gather(
            *(
                stub.Embed(embed_pb2.EmbedRequest(texts=[s], normalize=True))
                for s in sentences[first : first + CALLERS]
            )
        )
    return time.perf_counter() - started


def _direct(model, batches: list[list[str]], threads: int) -> float:
    """encode() called once per batch, with torch's default threads (0) or `threads`."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        started = time.perf_counter()
        for batch in batches:
            model.encode(batch, normalize_embeddings=True)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(default)


async def _measure(target: str, model, chunks: list[str], sentences: list[str]) -> dict:
    """Best of ROUNDS for each side, the sides interleaved so both see the same machine."""
    times: dict[str, list[float]] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        await stub.Embed(embed_pb2.EmbedRequest(texts=chunks[:4]))
        model.encode(chunks[:4])
        before = await stub.GetStats(embed_pb2.GetStatsRequest())
        for _ in range(ROUNDS):
            times.setdefault("service_concurrent", []).append(
                await _service_concurrent(stub, sentences)
            )
            # What a caller without the service does: one encode call per sentence. With
            # torch's default threads and with one: the baseline is the faster of the two
            # (one thread holds up far better when other processes take a core).
            for threads in (0, 1):
                times.setdefault("direct_single", []).append(
                    _direct(model, [[s] for s in sentences], threads)
                )
        after = await stub.GetStats(embed_pb2.GetStatsRequest())
        for _ in range(BATCH_ROUNDS):
            times.setdefault("service_batch", []).append(await _service_batch(stub, chunks))
            for threads in (0, 1):
                times.setdefault("direct_batch", []).append(_direct(model, [chunks], threads))
    result = {name: min(values) for name, values in times.items()}
    result["mean_batch"] = (after.texts - before.texts) / max(after.batches - before.batches, 1)
    return result


def main() -> None:
    from services.embed.model import load_model

    chunks = long_texts(128, 250)  # about 256 model tokens each
    sentences = [
        f"Sentence {n}: {' '.join(long_texts(1, 10, seed=n)[0].split())}." for n in range(128)
    ]
    # Other work on the machine skews both sides; the load before the run says how much.
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir, start_embed(port, data_dir) as process:
        asyncio.run(wait_until_serving(f"127.0.0.1:{port}", 180))
        model = load_model("all-MiniLM-L6-v2", "cpu")
        result = asyncio.run(_measure(f"127.0.0.1:{port}", model, chunks, sentences))
        rss = peak_rss_mib(process.pid)
    n, m = len(chunks), len(sentences)
    print(
        "embed service vs direct SentenceTransformer.encode (same texts, same run; best of"
        f" {ROUNDS} / {BATCH_ROUNDS} interleaved rounds; load average before {load})"
    )
    print(
        f"  {n} chunks of ~256 tokens, one batch: service {n / result['service_batch']:.1f}/s,"
        f" direct {n / result['direct_batch']:.1f}/s,"
        f" ratio {result['direct_batch'] / result['service_batch']:.2f}x (aim >= 0.95x)"
    )
    print(
        f"  {m} sentences, {CALLERS} concurrent callers: service "
        f"{m / result['service_concurrent']:.1f}/s vs one by one "
        f"{m / result['direct_single']:.1f}/s, ratio "
        f"{result['direct_single'] / result['service_concurrent']:.2f}x (aim >= 4x);"
        f" mean batch {result['mean_batch']:.1f}"
    )
    print(f"  embed service peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
