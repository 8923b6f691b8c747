"""Embed's RSS under sustained load: does it level off?

    python -m bench.embed_memory [--minutes 10] [--interval 10] [--chunk-callers 4]
                                 [--query-callers 8] [--margin 32] [--env KEY=VALUE ...]

Starts `python -m services.embed` (the default settings, the export under var/models) and
presses it with the mix ingest sends: callers each sending batches of 32 chunks, half of
the batches all full chunks (250 to 300 words, at or past the model's 256 tokens, as the
body of a long document cut into ingest's CHUNK_TOKENS of 256 gives: the largest forward
pass there is) and half of varied shorter chunks (8 to 250 words: short documents, the
ends of sections), each batch after a Tokenize call on the section it was cut from, and
callers sending one short query at a time. Every --interval seconds it prints the
service's RSS, the requests answered so far and the load average. At the end one more
batch of 32 chunks of 300 words shows whether the RSS still had room to grow.

Verdict: the RSS counts as warm once a third of the run has passed; it levels off when
the RSS at the end is within --margin MiB of the highest RSS of that first third, and
keeps growing otherwise. Exit status 1 when it keeps growing, or when a call fails.
"""

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter

import grpc
import psutil

from bench.embed_bench import MODEL, MODELS_DIR, WORDS, embed_service
from ragmesh.embed.v1 import embed_pb2, embed_pb2_grpc
from services.common.clients import wait_until_serving

CHUNKS_PER_CALL = 32  # ingest's EMBED_BATCH_SIZE default
FULL_BATCHES = 0.5  # the share of batches whose chunks are all at the model's window
LARGEST = f"{CHUNKS_PER_CALL} chunks of 300 words in one request"
# Words of other shapes than WORDS (numbers, names, pieces the tokenizer splits), so
# token counts vary as in real documents.
EXTRA = "2026 v1.32 onnxruntime gRPC PostgreSQL kubectl naïve café 東京 don't x86_64".split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS + EXTRA) for _ in range(words))


def batch_words(rng: random.Random) -> list[int]:
    """Words per chunk of one batch. Ingest cuts text into chunks of CHUNK_TOKENS (256): a
    batch from the body of a long document is all full chunks (the largest forward pass
    there is), one from short documents or sections mixes lengths."""
    if rng.random() < FULL_BATCHES:
        return [rng.randint(250, 300) for _ in range(CHUNKS_PER_CALL)]
    return [rng.randint(8, 250) for _ in range(CHUNKS_PER_CALL)]


async def chunk_caller(stub, rng, counts: Counter, stop: float) -> None:
    """As ingest does per section: Tokenize the text, then Embed its chunks."""
    while time.monotonic() < stop:
        chunks = [text(rng, words) for words in batch_words(rng)]
        await stub.Tokenize(embed_pb2.TokenizeRequest(texts=[" ".join(chunks)]))
        counts["Tokenize"] += 1
        await stub.Embed(
            embed_pb2.EmbedRequest(texts=chunks, kind=embed_pb2.EMBED_KIND_DOCUMENT, normalize=True)
        )
        counts["Embed chunks"] += 1


async def query_caller(stub, rng, counts: Counter, stop: float) -> None:
    while time.monotonic() < stop:
        query = f"how does {text(rng, rng.randint(2, 12))} work?"
        await stub.Embed(
            embed_pb2.EmbedRequest(texts=[query], kind=embed_pb2.EMBED_KIND_QUERY, normalize=True)
        )
        counts["Embed query"] += 1


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


async def largest_pass(stub) -> None:
    """The largest forward pass there is: a full batch of texts past the model's window."""
    rng = random.Random(0)
    chunks = [text(rng, 300) for _ in range(CHUNKS_PER_CALL)]
    await stub.Embed(embed_pb2.EmbedRequest(texts=chunks, normalize=True))


async def press(target: str, pid: int, args) -> list[tuple[float, float, int]]:
    """Runs the callers for --minutes; returns (seconds, RSS MiB, requests) samples."""
    process = psutil.Process(pid)

    def rss() -> float:
        return process.memory_info().rss / 2**20

    counts: Counter[str] = Counter()
    samples: list[tuple[float, float, int]] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        print(f"serving: RSS {rss():.0f} MiB")
        started = time.monotonic()
        stop = started + args.minutes * 60
        callers = [chunk_caller] * args.chunk_callers + [query_caller] * args.query_callers
        tasks = [
            asyncio.create_task(caller(stub, random.Random(seed), counts, stop))
            for seed, caller in enumerate(callers)
        ]

        def sample() -> None:
            seconds = time.monotonic() - started
            samples.append((seconds, rss(), counts.total()))
            print(
                f"{seconds:6.0f} s  RSS {samples[-1][1]:6.0f} MiB  requests {counts.total():7d}"
                f"  load {load_average()}",
                flush=True,
            )

        sample()
        while not all(task.done() for task in tasks):
            await asyncio.wait(tasks, timeout=args.interval)
            sample()
        await asyncio.gather(*tasks)  # raises the first failed call
        stats = await stub.GetStats(embed_pb2.GetStatsRequest())
        print(
            f"answered: {', '.join(f'{name} {n}' for name, n in sorted(counts.items()))};"
            f" model: {stats.texts} texts in {stats.batches} batches"
            f" (mean {stats.mean_batch_size:.1f}, max {stats.max_batch_size})"
        )
        await largest_pass(stub)
        print(f"after one more largest pass ({LARGEST}): RSS {rss():.0f} MiB")
    return samples


def verdict(samples: list[tuple[float, float, int]], minutes: float, margin: float) -> bool:
    """Prints the verdict line; True when the RSS levelled off."""
    warm_at = minutes * 60 / 3
    warm = [rss for seconds, rss, _ in samples if seconds <= warm_at]
    after = [(seconds, rss) for seconds, rss, _ in samples if seconds > warm_at]
    ceiling = max(warm)
    end = samples[-1][1]
    peak_seconds, peak = max(after, key=lambda pair: pair[1])
    if end <= ceiling + margin:
        print(
            f"verdict: levels off: {ceiling:.0f} MiB by {warm_at:.0f} s,"
            f" {end:.0f} MiB at the end ({end - ceiling:+.0f}, margin {margin:.0f} MiB;"
            f" highest after warm-up {peak:.0f} at {peak_seconds:.0f} s)"
        )
        return True
    print(
        f"verdict: keeps growing: {ceiling:.0f} MiB by {warm_at:.0f} s,"
        f" {end:.0f} MiB at the end ({end - ceiling:+.0f}, past the margin of {margin:.0f} MiB)"
    )
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.embed_memory", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--chunk-callers", type=int, default=4)
    parser.add_argument("--query-callers", type=int, default=8)
    parser.add_argument(
        "--margin", type=float, default=32.0, help="MiB of growth allowed once warm"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the embed process (repeatable)",
    )
    args = parser.parse_args(argv if argv is not None else [])
    if args.minutes <= 0 or args.interval <= 0:
        parser.error("--minutes and --interval must be positive")
    if min(args.chunk_callers, args.query_callers) < 0 or not (
        args.chunk_callers or args.query_callers
    ):
        parser.error("--chunk-callers and --query-callers must be >= 0, and not both 0")
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env takes KEY=VALUE, not {item!r}")
        env[key] = value
    from services.embed.provision import provision

    provision(MODEL, MODELS_DIR)
    print(
        f"embed RSS under load: {args.chunk_callers} callers of {CHUNKS_PER_CALL} chunks"
        f" ({FULL_BATCHES:.0%} all of 250-300 words, the rest 8-250) after a Tokenize of their"
        f" section, {args.query_callers} query callers,"
        f" {args.minutes:g} min, on {os.cpu_count()} cores;"
        f" load {load_average()} before" + (f"; env {' '.join(args.env)}" if args.env else "")
    )
    with tempfile.TemporaryDirectory() as data_dir, embed_service(data_dir, env) as started:
        target, process = started
        asyncio.run(wait_until_serving(target, 300))
        samples = asyncio.run(press(target, process.pid, args))
    levelled = verdict(samples, args.minutes, args.margin)
    print(f"load average {load_average()} after")
    if not levelled:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
