"""Load on the mesh: concurrent chat streams, uploads and searches for a bounded time.

    python -m bench.load [--seconds 300] [--streams 32] [--uploads 8] [--searches 4]
                         [--answer-tokens 48] [--no-documents]
                         [--target ingest=HOST:PORT --target sessions=HOST:PORT]

Without --target it starts embed, ingest, llm and sessions as processes on loopback
ports (data in a temporary folder, models from the shared caches under var/cache) and
stops them at the end. After a warm-up (one upload, one search of each mode, one
answer), for --seconds: each chat stream sends a question and reads its answer, again
and again, in a session naming the warm-up document (so retrieval searches it); a
question refused with RESOURCE_EXHAUSTED is resent with the same client_request_id
(sessions reuses the stored question) after exponential backoff with jitter (1 s
doubling to 30 s), until the run's time is up (it then counts as given up); each
uploader uploads a small Markdown file and follows it with WatchDocument until it is
indexed; each searcher runs keyword and semantic searches; what is in flight at the end
runs to its end.

It prints requests per second, p50/p95/p99 per RPC, errors by status code
(RESOURCE_EXHAUSTED is the expected answer to overload; INTERNAL or UNKNOWN is a
failure), how the questions ended (answered, answered after refusals, given up, a
status; each question counted once however often it was resent), each process's RSS once
warm and at the end (only for the processes it started), and the load average. At the
end it checks that nothing was lost: every accepted upload is READY or FAILED, and every
chat stream ended with a stored answer (a defined finish reason) or a status. Exit
status 1 when any call failed with INTERNAL or UNKNOWN, or something was lost.
"""

import argparse
import asyncio
import dataclasses
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import psutil

from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.clients import wait_until_serving

REPO = Path(__file__).resolve().parents[1]
# The embed export and the llm's prepared default model, made once and kept.
EMBED_MODELS = REPO / "var" / "cache" / "mesh" / "embed-models"
LLM_MODELS = REPO / "var" / "cache" / "llm-tests" / "models"
READY_SECONDS = {"embed": 300, "ingest": 60, "llm": 600, "sessions": 60}
FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FINISHED = (ingest_pb2.DOCUMENT_STATUS_READY, ingest_pb2.DOCUMENT_STATUS_FAILED)
# A refused question waits this long before it is resent, doubling per refusal up to the
# most (sessions does not pass on the llm's expected wait).
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MOST_SECONDS = 30.0
GIVEN_UP = "given up (refused until the run's end)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ProcessMesh:
    """The services as separate processes on fixed loopback ports, each with its own data
    folder under root: started, killed with SIGKILL and started again on the same ports
    and data. extra_env[name] adds RAGMESH_<NAME>_* settings (without the prefix);
    elsewhere names the targets of services another mesh runs."""

    def __init__(
        self,
        root: Path,
        extra_env: dict[str, dict[str, str]] | None = None,
        elsewhere: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.ports = {name: free_port() for name in READY_SECONDS}
        self.extra_env = extra_env or {}
        self.elsewhere = elsewhere or {}
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    def target(self, name: str) -> str:
        return self.elsewhere.get(name) or f"127.0.0.1:{self.ports[name]}"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def _env(self, name: str) -> dict[str, str]:
        settings = {
            "PORT": str(self.ports[name]),
            "DATA_DIR": str(self.root / name),
            "SHUTDOWN_GRACE_SECONDS": "2",
        }
        if name == "embed":
            settings["MODELS_DIR"] = str(EMBED_MODELS)
        if name == "llm":
            settings["MODELS_DIR"] = str(LLM_MODELS)
        if name in ("ingest", "sessions"):
            settings["EMBED_TARGET"] = self.target("embed")
        if name == "sessions":
            settings["INGEST_TARGET"] = self.target("ingest")
            settings["LLM_TARGET"] = self.target("llm")
        settings.update(self.extra_env.get(name, {}))
        prefix = f"RAGMESH_{name.upper()}_"
        return {**os.environ, **{prefix + key: value for key, value in settings.items()}}

    async def start(self, *names: str) -> None:
        """Starts each service (in the order given) and waits until it is SERVING."""
        for name in names:
            self.root.mkdir(parents=True, exist_ok=True)
            with self.log(name).open("ab") as out:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    f"services.{name}",
                    env=self._env(name),
                    stdout=out,
                    stderr=out,
                    cwd=REPO,
                )
            self.processes[name] = process
            try:
                await wait_until_serving(
                    self.target(name),
                    READY_SECONDS[name],
                    still_running=lambda process=process: process.returncode is None,
                )
            except (RuntimeError, TimeoutError) as exc:
                tail = self.log(name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} did not start: {exc}\n{tail}") from exc

    async def kill(self, name: str) -> list[psutil.Process]:
        """SIGKILL: no drain, no cleanup, as a crash or the OOM killer stops it. Returns
        the processes the service had started (a caller checks they go with it)."""
        process = self.processes.pop(name)
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        return children

    async def stop(self, name: str) -> None:
        """SIGTERM, as an orchestrator stops it: the service drains and closes."""
        process = self.processes.pop(name)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def close(self) -> None:
        for name in reversed(list(self.processes)):
            await self.stop(name)

    def rss(self) -> dict[str, int]:
        """Each running service's resident memory, bytes."""
        found = {}
        for name, process in self.processes.items():
            try:
                found[name] = psutil.Process(process.pid).memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return found


@dataclasses.dataclass
class Stats:
    latencies: dict[str, list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = dataclasses.field(default_factory=lambda: defaultdict(Counter))
    # Accepted uploads, by document id; chat streams and how each ended.
    uploads: list[str] = dataclasses.field(default_factory=list)
    stream_ends: Counter = dataclasses.field(default_factory=Counter)
    # How each question ended, once per question however often it was resent; how many
    # were refused at least once, and the refusals in all.
    questions: Counter = dataclasses.field(default_factory=Counter)
    refused_questions: int = 0
    refusals: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def record(self, rpc: str, started: float, code: grpc.StatusCode, details: str = "") -> None:
        self.latencies[rpc].append(time.perf_counter() - started)
        self.statuses[rpc][code.name] += 1
        if code in FAILURES:
            self.failures.append(f"{rpc}: {code.name}: {details}")

    @property
    def requests(self) -> int:
        return sum(len(values) for values in self.latencies.values())


@dataclasses.dataclass(frozen=True)
class Load:
    seconds: float
    streams: int = 32
    uploads: int = 8
    searches: int = 4
    # Tokens per answer: short answers keep many streams turning over.
    answer_tokens: int = 48
    # Chat sessions name a document, so each message also searches it and the prompt
    # carries its passages; without, answers come from the question alone.
    documents: bool = True


WORDS = (
    "harbour lighthouse keeper storm tide lens beacon vessel granite channel reef pilot "
    "signal fog horn gallery lantern wick clockwork shipping chart compass anchor"
).split()
QUESTIONS = [
    "What does the keeper do every evening?",
    "How far does the beam reach on a clear night?",
    "When are supplies brought to the rock?",
    "Why is the glass washed at dawn?",
]


def document_text(rng: random.Random, n: int) -> bytes:
    paragraphs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))).capitalize() + "."
        for _ in range(rng.randint(2, 6))
    ]
    return (f"# Log {n}\n\n" + "\n\n".join(paragraphs) + "\n").encode()


async def _upload_loop(stub, stats: Stats, deadline: float, worker: int) -> None:
    rng = random.Random(worker)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        data = document_text(rng, n)

        def requests(data=data, n=n):
            yield ingest_pb2.UploadDocumentRequest(
                metadata=ingest_pb2.DocumentMetadata(filename=f"log-{worker}-{n}.md")
            )
            yield ingest_pb2.UploadDocumentRequest(data=data)

        started = time.perf_counter()
        try:
            reply = await stub.UploadDocument(requests(), timeout=60)
        except grpc.aio.AioRpcError as exc:
            stats.record("UploadDocument", started, exc.code(), exc.details())
            await asyncio.sleep(0.5)
            continue
        stats.record("UploadDocument", started, grpc.StatusCode.OK)
        stats.uploads.append(reply.document.id)
        # As a person's upload does: followed until it is indexed (or failed).
        started = time.perf_counter()
        try:
            async for _ in stub.WatchDocument(
                ingest_pb2.WatchDocumentRequest(document_id=reply.document.id), timeout=300
            ):
                pass
        except grpc.aio.AioRpcError as exc:
            stats.record("WatchDocument (to done)", started, exc.code(), exc.details())
            continue
        stats.record("WatchDocument (to done)", started, grpc.StatusCode.OK)


async def _search_loop(stub, stats: Stats, deadline: float, worker: int) -> None:
    rng = random.Random(1000 + worker)
    modes = [ingest_pb2.SEARCH_MODE_KEYWORD, ingest_pb2.SEARCH_MODE_SEMANTIC]
    while time.monotonic() < deadline:
        query = " ".join(rng.sample(WORDS, 3))
        started = time.perf_counter()
        try:
            await stub.Search(
                ingest_pb2.SearchRequest(query=query, mode=rng.choice(modes), top_k=5), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            stats.record("Search", started, exc.code(), exc.details())
            await asyncio.sleep(0.2)
            continue
        stats.record("Search", started, grpc.StatusCode.OK)


async def _chat_loop(
    stub, stats: Stats, deadline: float, worker: int, load: Load, document_id: str
) -> None:
    rng = random.Random(2000 + worker)
    started = time.perf_counter()
    try:
        created = await stub.CreateSession(
            sessions_pb2.CreateSessionRequest(
                name=f"load {worker}", document_ids=[document_id] if load.documents else []
            ),
            timeout=30,
        )
    except grpc.aio.AioRpcError as exc:
        stats.record("CreateSession", started, exc.code(), exc.details())
        stats.stream_ends[f"no session: {exc.code().name}"] += 1
        return
    stats.record("CreateSession", started, grpc.StatusCode.OK)
    asked = 0
    while time.monotonic() < deadline:
        asked += 1
        request = sessions_pb2.SendMessageRequest(
            session_id=created.session.id,
            content=rng.choice(QUESTIONS),
            overrides={"max_new_tokens": load.answer_tokens},
            client_request_id=f"load-{worker}-{asked}",
        )
        refusals = 0
        while True:
            end = await _send_message(stub, stats, request)
            if end != grpc.StatusCode.RESOURCE_EXHAUSTED.name:
                break
            refusals += 1
            wait = backoff_seconds(refusals, rng)
            if time.monotonic() + wait >= deadline:
                end = GIVEN_UP
                break
            await asyncio.sleep(wait)
        if refusals:
            stats.refused_questions += 1
            stats.refusals += refusals
            if end == "answered":
                end = "answered after refusals"
        stats.questions[end] += 1
        if end == GIVEN_UP:
            # The next resend would come after the run's end: the stream is done.
            return


def backoff_seconds(refusals: int, rng: random.Random) -> float:
    """The wait before resending a question refused `refusals` times: 1 s doubling to
    30 s, drawn between half and all of that so refused streams do not return together."""
    ceiling = min(BACKOFF_MOST_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (refusals - 1))
    return rng.uniform(ceiling / 2, ceiling)


async def _send_message(stub, stats: Stats, request) -> str:
    """One SendMessage call, read to its end; returns "answered" for a stored answer,
    else the status code's name (or how it ended without one)."""
    started = time.perf_counter()
    first: float | None = None
    stored = None
    try:
        async for event in stub.SendMessage(request, timeout=300):
            kind = event.WhichOneof("event")
            if kind == "delta" and first is None:
                first = time.perf_counter()
            elif kind == "assistant_message":
                stored = event.assistant_message
    except grpc.aio.AioRpcError as exc:
        stats.record("SendMessage", started, exc.code(), exc.details())
        stats.stream_ends[f"status {exc.code().name}"] += 1
        return exc.code().name
    if first is not None:
        stats.latencies["SendMessage first token"].append(first - started)
    stats.record("SendMessage", started, grpc.StatusCode.OK)
    if stored is None or stored.finish_reason == sessions_pb2.FINISH_REASON_UNSPECIFIED:
        stats.failures.append("SendMessage: a stream ended OK without a stored answer")
        stats.stream_ends["no stored answer"] += 1
        return "no stored answer"
    stats.stream_ends[sessions_pb2.FinishReason.Name(stored.finish_reason)] += 1
    return "answered"


async def _settle(stub, stats: Stats, seconds: float) -> Counter:
    """Waits (at most seconds) until every accepted upload is READY or FAILED; returns
    their states. A document that is missing counts as lost."""
    states: Counter = Counter()
    deadline = time.monotonic() + seconds
    pending = list(stats.uploads)
    while pending and time.monotonic() < deadline:
        still = []
        for document_id in pending:
            try:
                reply = await stub.GetDocument(
                    ingest_pb2.GetDocumentRequest(document_id=document_id), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    states["lost"] += 1
                    stats.failures.append(f"upload {document_id} accepted, then not found")
                    continue
                raise
            if reply.document.status in FINISHED:
                states[ingest_pb2.DocumentStatus.Name(reply.document.status)] += 1
            else:
                still.append(document_id)
        pending = still
        if pending:
            await asyncio.sleep(1)
    for document_id in pending:
        states["unfinished"] += 1
        stats.failures.append(f"upload {document_id} neither READY nor FAILED in {seconds:.0f} s")
    return states


@dataclasses.dataclass
class Result:
    stats: Stats
    elapsed: float
    documents: Counter
    rss_warm: dict[str, int]
    rss_end: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.stats.failures


async def run_load(targets: dict[str, str], load: Load, rss=lambda: {}) -> Result:
    """Runs the load against ingest and sessions at targets; rss() gives the processes'
    memory (measured once warm: after one upload, search and answer of each kind)."""
    stats = Stats()
    ingest_channel = grpc.aio.insecure_channel(targets["ingest"])
    sessions_channel = grpc.aio.insecure_channel(targets["sessions"])
    try:
        ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
        sessions = sessions_pb2_grpc.SessionsServiceStub(sessions_channel)
        document_id = await _warm_up(ingest, sessions, load.answer_tokens)
        rss_warm = rss()
        deadline = time.monotonic() + load.seconds
        started = time.monotonic()
        await asyncio.gather(
            *(
                _chat_loop(sessions, stats, deadline, n, load, document_id)
                for n in range(load.streams)
            ),
            *(_upload_loop(ingest, stats, deadline, n) for n in range(load.uploads)),
            *(_search_loop(ingest, stats, deadline, n) for n in range(load.searches)),
        )
        elapsed = time.monotonic() - started
        rss_end = rss()
        documents = await _settle(ingest, stats, 300)
    finally:
        await ingest_channel.close()
        await sessions_channel.close()
    return Result(stats, elapsed, documents, rss_warm, rss_end)


async def _warm_up(ingest, sessions, answer_tokens: int) -> str:
    """One upload (until it is indexed), one search of each mode and one answer, so
    models, indexes and caches are loaded before anything is measured; returns the
    uploaded document's id (the chat sessions' document)."""

    def upload():
        yield ingest_pb2.UploadDocumentRequest(
            metadata=ingest_pb2.DocumentMetadata(filename="warm-up.md")
        )
        yield ingest_pb2.UploadDocumentRequest(data=document_text(random.Random(0), 0))

    reply = await ingest.UploadDocument(upload(), timeout=60)
    async for _ in ingest.WatchDocument(
        ingest_pb2.WatchDocumentRequest(document_id=reply.document.id), timeout=300
    ):
        pass
    for mode in (ingest_pb2.SEARCH_MODE_KEYWORD, ingest_pb2.SEARCH_MODE_SEMANTIC):
        await ingest.Search(ingest_pb2.SearchRequest(query="keeper lens", mode=mode), timeout=60)
    created = await sessions.CreateSession(
        sessions_pb2.CreateSessionRequest(document_ids=[reply.document.id]), timeout=30
    )
    request = sessions_pb2.SendMessageRequest(
        session_id=created.session.id,
        content=QUESTIONS[0],
        overrides={"max_new_tokens": answer_tokens},
    )
    async for _ in sessions.SendMessage(request, timeout=300):
        pass
    return reply.document.id


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(result: Result, load: Load) -> str:
    stats = result.stats
    lines = [
        f"load: {load.streams} chat streams, {load.uploads} uploaders, {load.searches} "
        f"searchers for {result.elapsed:.0f} s; answers of at most {load.answer_tokens} tokens"
        + ("" if load.documents else ", sessions without documents"),
        f"requests: {stats.requests} ({stats.requests / result.elapsed:.1f}/s)",
        f"{'rpc':<26}{'calls':>7}{'per s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}  statuses",
    ]
    for rpc in sorted(stats.latencies):
        values = stats.latencies[rpc]
        codes = ", ".join(f"{code} {n}" for code, n in sorted(stats.statuses[rpc].items()))
        lines.append(
            f"{rpc:<26}{len(values):>7}{len(values) / result.elapsed:>8.2f}"
            f"{_percentile(values, 0.5) * 1000:>9.0f}{_percentile(values, 0.95) * 1000:>9.0f}"
            f"{_percentile(values, 0.99) * 1000:>9.0f}  {codes or '(time to first delta)'}"
        )
    errors = Counter()
    for counter in stats.statuses.values():
        errors.update({code: n for code, n in counter.items() if code != "OK"})
    expected = errors.pop("RESOURCE_EXHAUSTED", 0)
    lines.append(
        f"errors: {dict(errors) or 'none'}; RESOURCE_EXHAUSTED (expected under overload): "
        f"{expected}"
    )
    lines.append(f"chat streams ended: {dict(stats.stream_ends)}")
    lines.append(
        f"questions: {sum(stats.questions.values())}, ended: {dict(stats.questions)}; "
        f"{stats.refused_questions} refused at least once, {stats.refusals} refusals in all"
    )
    lines.append(f"uploads accepted: {len(stats.uploads)}, at the end: {dict(result.documents)}")
    for name in result.rss_warm:
        warm = result.rss_warm[name] / 2**20
        end = result.rss_end.get(name, 0) / 2**20
        lines.append(f"rss {name:<9} warm {warm:7.0f} MiB  end {end:7.0f} MiB  ({end - warm:+.0f})")
    one, five, fifteen = os.getloadavg()
    lines.append(f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs")
    for failure in stats.failures[:20]:
        lines.append(f"FAILURE {failure}")
    if len(stats.failures) > 20:
        lines.append(f"... and {len(stats.failures) - 20} more failures")
    return "\n".join(lines)


async def run_on_mesh(load: Load, root: Path) -> Result:
    """Starts the mesh as processes under root, runs the load, stops the mesh."""
    mesh = ProcessMesh(root)
    try:
        await mesh.start("embed", "ingest", "llm", "sessions")
        targets = {name: mesh.target(name) for name in ("ingest", "sessions")}
        return await run_load(targets, load, mesh.rss)
    finally:
        await mesh.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--searches", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument(
        "--no-documents", action="store_true", help="chat sessions without a document"
    )
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="SERVICE=HOST:PORT",
        help="a running ingest and sessions instead of starting the mesh",
    )
    # Known options only: `python -m bench load` leaves the benchmark names in argv.
    args, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.seconds <= 0 or min(args.streams, args.uploads, args.searches) < 0:
        parser.error("--seconds must be positive and the counts not negative")
    load = Load(
        args.seconds,
        args.streams,
        args.uploads,
        args.searches,
        args.answer_tokens,
        documents=not args.no_documents,
    )
    targets = dict(target.partition("=")[::2] for target in args.target)
    if targets and set(targets) != {"ingest", "sessions"}:
        parser.error("--target needs ingest=HOST:PORT and sessions=HOST:PORT")
    if targets:
        result = asyncio.run(run_load(targets, load))
    else:
        with tempfile.TemporaryDirectory(prefix="ragmesh-load-") as root:
            result = asyncio.run(run_on_mesh(load, Path(root)))
    print(report(result, load), flush=True)
    if not result.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
