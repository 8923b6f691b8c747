"""Benchmark of the llm service against direct transformers generate() on the same model."""

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
import psutil
import torch

from ragmesh.llm.v1 import llm_pb2, llm_pb2_grpc
from services.llm.provision import DEFAULT_MODEL_NAME, provision
from services.llm.settings import LlmSettings

MAX_NEW_TOKENS = 64
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


def _direct(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()

    def encode(prompts):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run(prompts, max_new_tokens):
        inputs = encode(prompts)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2
            )
        elapsed = time.perf_counter() - started
        new = out[:, inputs["input_ids"].shape[1] :]
        tokens = 0
        for row in new.tolist():
            # Count up to and without the end-of-sequence token, as the service does.
            tokens += (
                row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
            )
        return tokens, elapsed

    run(PROMPTS[:1], 4)  # warm-up
    ttft = min(run(PROMPTS[:1], 1)[1] for _ in range(3))
    single_tokens, single_s = run(PROMPTS[:1], MAX_NEW_TOKENS)
    batch_tokens, batch_s = run(PROMPTS, MAX_NEW_TOKENS)
    return {
        "ttft": ttft,
        "single": single_tokens / single_s,
        "single_tokens": single_tokens,
        "batch": batch_tokens / batch_s,
        "batch_tokens": batch_tokens,
    }


async def _one(stub, prompt: str) -> tuple[int, float, float]:
    request = llm_pb2.ChatRequest(
        messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=prompt)],
        overrides=llm_pb2.GenerationOverrides(
            temperature=0.0, repetition_penalty=1.0, max_new_tokens=MAX_NEW_TOKENS
        ),
    )
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async for response in stub.Chat(request, timeout=600):
        if response.WhichOneof("event") == "delta":
            first = first or time.perf_counter() - started
        else:
            tokens = response.completion.usage.completion_tokens
    return tokens, first, time.perf_counter() - started


async def _service(port: int) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        deadline = time.monotonic() + 300
        while True:
            try:
                status = (await stub.GetModelStatus(llm_pb2.GetModelStatusRequest())).status
                if status.state == llm_pb2.MODEL_STATE_READY:
                    break
                if status.state == llm_pb2.MODEL_STATE_FAILED:
                    raise SystemExit(f"the service failed to load: {status.error}")
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the service did not become READY")
            await asyncio.sleep(0.5)
        await _one(stub, PROMPTS[0])  # warm-up
        ttfts = []
        for _ in range(3):
            ttfts.append((await _one(stub, PROMPTS[0]))[1])
        tokens, _, elapsed = await _one(stub, PROMPTS[0])
        started = time.perf_counter()
        results = await asyncio.gather(*(_one(stub, p) for p in PROMPTS))
        batch_s = time.perf_counter() - started
        return {
            "ttft": min(ttfts),
            "single": tokens / elapsed,
            "single_tokens": tokens,
            "batch": sum(r[0] for r in results) / batch_s,
            "batch_tokens": sum(r[0] for r in results),
        }


def main() -> None:
    models_dir = LlmSettings().resolved_models_dir
    folder = provision(models_dir)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    port = _free_port()
    env = dict(
        os.environ,
        RAGMESH_LLM_PORT=str(port),
        RAGMESH_LLM_MODELS_DIR=str(models_dir),
        RAGMESH_LLM_DEFAULT_MODEL=DEFAULT_MODEL_NAME,
        RAGMESH_LLM_DATA_DIR=tempfile.mkdtemp(prefix="llm-bench-"),
        RAGMESH_LLM_LOG_LEVEL="WARNING",
    )
    service = subprocess.Popen([sys.executable, "-m", "services.llm"], env=env)
    try:
        served = asyncio.run(_service(port))
        rss = psutil.Process(service.pid).memory_info().rss
    finally:
        service.terminate()
        service.wait(timeout=30)
    direct = _direct(folder)
    print(
        f"llm bench: {DEFAULT_MODEL_NAME} fp32 on {torch.get_num_threads()} CPU threads, "
        f"greedy, {MAX_NEW_TOKENS} new tokens, chat template"
    )
    print(
        f"  one stream     direct {direct['single']:6.1f} tok/s   service {served['single']:6.1f} "
        f"tok/s   ratio {served['single'] / direct['single']:.2f}x (aim >= 0.95x)"
    )
    print(
        f"  first token    direct {direct['ttft'] * 1000:6.1f} ms      service "
        f"{served['ttft'] * 1000:6.1f} ms      difference "
        f"{(served['ttft'] - direct['ttft']) * 1000:+.1f} ms (aim within 20 ms)"
    )
    print(
        f"  eight streams  direct {direct['batch']:6.1f} tok/s   service {served['batch']:6.1f} "
        f"tok/s   ratio {served['batch'] / direct['batch']:.2f}x (aim >= 1.0x; direct batch 8 is "
        f"{direct['batch'] / direct['single']:.1f}x one stream)"
    )
    print(
        f"  tokens counted direct {direct['single_tokens']} + {direct['batch_tokens']}   service "
        f"{served['single_tokens']} + {served['batch_tokens']}"
    )
    print(
        f"  memory         service RSS {rss / 2**20:.0f} MiB with the model loaded; weights "
        f"{weights / 2**20:.0f} MiB ({rss / weights:.2f}x)"
    )


if __name__ == "__main__":
    main()
